"""Splitting a dataset across clients, and train/test splits.

Schemes (all deterministic per ``seed``; every example goes to exactly one
client; each client's indices are returned sorted):

- ``iid``: a shuffle cut into equal parts.
- ``dirichlet``: label skew as in Hsu, Qi & Brown 2019, "Measuring the
  Effects of Non-Identical Data Distribution for Federated Visual
  Classification": for every class, client shares ~ Dir(alpha).
- ``quantity``: quantity skew, client sizes ~ Dir(alpha), labels iid.
- ``natural``: one natural group (a user, a Shakespeare role as in LEAF,
  Caldas et al. 2018) never straddles two clients.

Every scheme registers itself in :data:`fedfm.registry.PARTITIONERS` as
``(num_clients, num_examples, labels, groups, alpha, min_examples, rng) ->
parts``; ``NEEDS_LABELS`` / ``NEEDS_GROUPS`` say what it cannot do without.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedfm.errors import FedfmError
from fedfm.registry import NEEDS_GROUPS, NEEDS_LABELS, PARTITIONERS

SCHEMES = PARTITIONERS  # the registered scheme names (iterable; discovered on first use)
DIRICHLET_ATTEMPTS = 100


def partition(
    num_clients: int,
    scheme: str,
    *,
    num_examples: int,
    labels: np.ndarray | None = None,
    groups: Sequence[str] | None = None,
    alpha: float = 0.5,
    min_examples: int = 1,
    seed: int = 0,
) -> list[np.ndarray]:
    """Assign ``num_examples`` examples to ``num_clients`` clients.

    Returns one sorted int64 index array per client; together they cover
    ``0..num_examples-1`` exactly once.
    """
    entry = PARTITIONERS.get(scheme)  # FedfmError naming the valid schemes
    if num_clients < 1:
        raise FedfmError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients * min_examples > num_examples:
        raise FedfmError(
            f"num_clients={num_clients} with min_examples={min_examples} needs "
            f"{num_clients * min_examples} examples but there are only {num_examples} to partition"
        )
    if entry.supports(NEEDS_LABELS) and labels is None:
        unlabeled = [n for n in PARTITIONERS.names() if not PARTITIONERS.supports(n, NEEDS_LABELS)]
        raise FedfmError(
            f"partition scheme '{scheme}' needs labels; use one of {', '.join(unlabeled)} for unlabeled data"
        )
    if entry.supports(NEEDS_GROUPS) and groups is None:
        raise FedfmError(f"partition scheme '{scheme}' needs a group per example (set data.group_column)")
    if entry.supports(NEEDS_LABELS):
        labels = _check_len(np.asarray(labels), num_examples, "labels")
    if entry.supports(NEEDS_GROUPS):
        groups = list(_check_len(groups, num_examples, "groups"))
    rng = np.random.default_rng(seed)
    return entry.obj(num_clients, num_examples, labels, groups, alpha, min_examples, rng)


@PARTITIONERS.register("iid", summary="a shuffle cut into equal parts")
def _iid(k: int, n: int, labels, groups, alpha: float, min_examples: int, rng) -> list[np.ndarray]:
    return _sorted(np.array_split(rng.permutation(n), k))


@PARTITIONERS.register("quantity", summary="quantity skew: client sizes ~ Dir(alpha), labels iid")
def _quantity_scheme(k: int, n: int, labels, groups, alpha: float, min_examples: int, rng) -> list[np.ndarray]:
    return _quantity(k, n, alpha, min_examples, rng)


@PARTITIONERS.register("dirichlet", capabilities={NEEDS_LABELS},
                       summary="label skew: per class, client shares ~ Dir(alpha) (Hsu et al. 2019)")
def _dirichlet_scheme(k: int, n: int, labels, groups, alpha: float, min_examples: int, rng) -> list[np.ndarray]:
    return _dirichlet(k, labels, alpha, min_examples, rng)


@PARTITIONERS.register("natural", capabilities={NEEDS_GROUPS},
                       summary="whole natural groups (users, roles) per client (LEAF, Caldas et al. 2018)")
def _natural_scheme(k: int, n: int, labels, groups, alpha: float, min_examples: int, rng) -> list[np.ndarray]:
    return _natural(k, groups, min_examples)


def _check_len(values, n: int, what: str):
    if len(values) != n:
        raise FedfmError(f"{what} has {len(values)} entries but num_examples={n}")
    return values


def _sorted(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _owner_to_parts(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    order = np.argsort(owner, kind="stable")  # indices grouped by client, ascending inside
    return _sorted(np.split(order, np.cumsum(np.bincount(owner, minlength=num_clients))[:-1]))


def _dirichlet(k: int, labels: np.ndarray, alpha: float, min_examples: int, rng) -> list[np.ndarray]:
    """Per class, split its examples across clients with shares ~ Dir(alpha) (Hsu et al. 2019).

    Redraws up to ``DIRICHLET_ATTEMPTS`` times until every client has
    ``min_examples``; if no draw gets there (very small alpha with many
    clients), the best draw is topped up by moving random examples from the
    largest clients, which keeps the skew almost intact.
    """
    n = len(labels)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    best, best_short = None, None
    for _ in range(DIRICHLET_ATTEMPTS):
        owner = np.empty(n, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(k, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                owner[chunk] = client
        short = np.maximum(min_examples - np.bincount(owner, minlength=k), 0).sum()
        if best_short is None or short < best_short:
            best, best_short = owner, short
        if short == 0:
            break
    if best_short:
        _top_up(best, k, min_examples, rng)
    return _owner_to_parts(best, k)


def _top_up(owner: np.ndarray, k: int, min_examples: int, rng) -> None:
    """Move random examples from the largest clients to those below ``min_examples`` (in place)."""
    sizes = np.bincount(owner, minlength=k)
    for client in np.flatnonzero(sizes < min_examples):
        while sizes[client] < min_examples:
            donor = int(np.argmax(sizes))  # has > min_examples since the total suffices
            moved = rng.choice(np.flatnonzero(owner == donor))
            owner[moved] = client
            sizes[donor] -= 1
            sizes[client] += 1


def _quantity(k: int, n: int, alpha: float, min_examples: int, rng) -> list[np.ndarray]:
    """Sizes = min_examples + Dir(alpha) share of the rest; examples drawn at random."""
    spare = n - k * min_examples
    raw = rng.dirichlet(np.full(k, alpha)) * spare
    extra = np.floor(raw).astype(np.int64)
    remainder = spare - int(extra.sum())
    extra[np.argsort(-(raw - extra), kind="stable")[:remainder]] += 1  # largest remainders
    sizes = min_examples + extra
    return _sorted(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


def _natural(k: int, groups: list, min_examples: int) -> list[np.ndarray]:
    """Whole groups per client: one each if they match, else largest-first to the smallest client."""
    keys = [str(g) for g in groups]
    names, inverse = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    if len(names) < k:
        raise FedfmError(
            f"natural partition needs at least num_clients={k} groups but the data has {len(names)}"
        )
    counts = np.bincount(inverse, minlength=len(names))
    if len(names) == k:
        group_client = np.arange(k)
    else:  # greedy longest-processing-time: biggest group to the currently smallest client
        group_client = np.empty(len(names), dtype=np.int64)
        sizes = np.zeros(k, dtype=np.int64)
        for g in sorted(range(len(names)), key=lambda g: (-counts[g], names[g])):
            client = int(np.argmin(sizes))
            group_client[g] = client
            sizes[client] += counts[g]
    parts = _owner_to_parts(group_client[inverse], k)
    small = [i for i, p in enumerate(parts) if len(p) < min_examples]
    if small:
        c = small[0]
        members = sorted(str(names[g]) for g in np.flatnonzero(group_client == c))
        raise FedfmError(
            f"natural partition: client {c} (group {', '.join(members)}) has {len(parts[c])} "
            f"examples, fewer than min_examples={min_examples}"
        )
    return parts


def train_test_split(
    num_examples: int, test_fraction: float, *, labels: np.ndarray | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays; stratified by label when ``labels`` is given.

    The test set has ``round(num_examples * test_fraction)`` examples (the
    train set keeps at least one); per class the quota is split by largest
    remainder so class proportions match as closely as possible.
    """
    if not 0 <= test_fraction < 1:
        raise FedfmError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = num_examples
    n_test = min(int(round(n * test_fraction)), max(n - 1, 0))
    rng = np.random.default_rng(seed)
    if n_test == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if labels is None:
        perm = rng.permutation(n)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    labels = _check_len(np.asarray(labels), n, "labels")
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    ideal = np.array([len(idx) for idx in by_class]) * (n_test / n)
    quota = np.floor(ideal).astype(np.int64)
    quota[np.argsort(-(ideal - quota), kind="stable")[: n_test - int(quota.sum())]] += 1
    test = np.concatenate([idx[:q] for idx, q in zip(by_class, quota)])
    train = np.concatenate([idx[q:] for idx, q in zip(by_class, quota)])
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def split_client(indices: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's local (train, test) split of ``indices`` (sorted arrays of the same ids).

    The test part gets ``round(len * test_fraction)`` examples, at least one
    when ``test_fraction > 0`` and the client has two or more, and the train
    part always keeps at least one.
    """
    indices = np.asarray(indices, dtype=np.int64)
    m = len(indices)
    if test_fraction <= 0 or m < 2:
        return np.sort(indices), np.zeros(0, dtype=np.int64)
    n_test = min(max(1, int(round(m * test_fraction))), m - 1)
    perm = np.random.default_rng(seed).permutation(m)
    return np.sort(indices[perm[n_test:]]), np.sort(indices[perm[:n_test]])


def cap_test_rows(test_parts: Sequence[np.ndarray], cap: int, seed: int) -> list[np.ndarray]:
    """At most ``cap`` rows in all clients' local test splits together, trimming the largest first.

    Water-filling: the largest per-client size ``t`` with ``sum_i min(n_i, t) <= cap``;
    a client with more than ``t`` test rows keeps a seeded random ``t`` of them,
    smaller clients keep all theirs (so the cap never pushes a small client
    under ``eval.min_client_test_examples``). Unchanged when the total fits.
    """
    sizes = np.array([len(p) for p in test_parts], dtype=np.int64)
    if sizes.sum() <= cap:
        return [np.asarray(p, dtype=np.int64) for p in test_parts]
    t = 0
    for size in np.unique(sizes):  # ascending: the budget at t=size is sum(min(n, size))
        if np.minimum(sizes, size).sum() > cap:
            below = sizes[sizes < size]  # clients kept whole; the rest share what is left equally
            t = (cap - int(below.sum())) // int((sizes >= size).sum())
            break
    rng = np.random.default_rng([seed, 0x7E57])
    return [np.sort(rng.choice(p, t, replace=False)).astype(np.int64) if len(p) > t else np.asarray(p, dtype=np.int64)
            for p in test_parts]
