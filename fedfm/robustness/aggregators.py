"""Byzantine-robust aggregation rules and the server fold that applies them.

Every rule is a pure function on an ``[n, d]`` float tensor ``x`` of flattened
client deltas (one row per client) and returns the robust aggregate ``[d]``:

* :func:`coordinate_median` — coordinate-wise median (Yin et al. 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
  ICML); for even ``n`` the mean of the two middle values.
* :func:`trimmed_mean` — coordinate-wise β-trimmed mean (Yin et al. 2018):
  drop the ``⌊βn⌋`` largest and smallest values of each coordinate, average
  the rest.
* :func:`krum` / :func:`multi_krum` — Krum and Multi-Krum (Blanchard et al.
  2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent", NeurIPS): score(i) = sum of squared distances from ``x_i`` to its
  ``n − f − 2`` nearest other rows; Krum returns the best-scored row,
  Multi-Krum the mean of the ``m`` best. Needs ``n > 2f + 2``.
* :func:`bulyan` — Bulyan (El Mhamdi, Guerraoui & Rouault 2018, "The Hidden
  Vulnerability of Distributed Learning in Byzantium", ICML): select
  ``θ = n − 2f`` rows by iterated Krum, then per coordinate average the
  ``β = θ − 2f`` selected values closest to their median. Needs ``n ≥ 4f + 3``.
* :func:`norm_bounded_mean` — norm bounding (Sun et al. 2019, "Can You Really
  Backdoor Federated Learning?"): clip every row to L2 norm ≤ ``M``, then the
  weighted mean.
* :func:`fltrust` — FLTrust (Cao et al. 2021, "FLTrust: Byzantine-robust
  Federated Learning via Trust Bootstrapping", NDSS): the server computes its
  own update ``g_0`` on a small root dataset; trust ``TS_i = ReLU(cos(g_i,
  g_0))``; each ``g_i`` is rescaled to ``‖g_0‖``; the aggregate is
  ``Σ TS_i ḡ_i / Σ TS_i`` (zero when every trust score is zero).

Median, trimmed mean, Krum, Multi-Krum and Bulyan ignore client weights (a
Byzantine client could lie about its example count); norm bounding uses them.

:class:`RobustFold` is a :class:`~fedfm.algorithms.base.ServerFold` that
**wraps the algorithm's own fold**. Unlike
:class:`~fedfm.algorithms.fedavg.MeanDeltaFold` it **buffers every update of
the round** (memory O(n·model)) because these rules need all updates at once.
``finish()`` computes the robust aggregate Δ and hands it to the inner fold as
one update of weight 1, so the inner fold takes its own step (its server
optimizer, FedAvgM's momentum, FedAdam's moments) on Δ instead of on the
weighted mean; it returns the inner fold's new global state. The inner fold
must step on a weighted mean of deltas alone (capability ``MEAN_DELTA``).

Every rule registers itself in :data:`fedfm.registry.ROBUST_RULES` as a
:class:`RobustRule` (its options class, its cohort-size requirement, how it
wraps a fold); ``mean`` is the identity: the algorithm's own fold.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Literal, Mapping

import torch

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedfm.algorithms.base import ServerFold, Update
from fedfm.algorithms.fedavg import MeanDeltaFold, float_entries
from fedfm.algorithms.fedopt import ServerOptimizer
from fedfm.errors import FedfmError
from fedfm.registry import NEEDS_ALL_UPDATES, NEEDS_ROOT_DATA, ROBUST_RULES

Weighting = Literal["examples", "uniform"]
Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [n, d], weights [n]) -> [d]


class RobustAggregationError(FedfmError, ValueError):
    """A robust rule cannot run with these settings (e.g. too few clients for ``f``)."""


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise RobustAggregationError(f"expected a non-empty [n, d] tensor of deltas, got shape {tuple(x.shape)}")


# -- rules --------------------------------------------------------------------
def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median; for even ``n`` the mean of the two middle values."""
    _check(x)
    s, n = x.sort(dim=0).values, x.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def trim_count(n: int, beta: float) -> int:
    """``⌊βn⌋``, the number of values dropped at each end by :func:`trimmed_mean`."""
    if not 0 <= beta < 0.5:
        raise RobustAggregationError(f"trim fraction must be in [0, 0.5), got {beta}")
    return int(math.floor(beta * n + 1e-9))


def trimmed_mean(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Coordinate-wise β-trimmed mean (Yin et al. 2018): drop ``⌊βn⌋`` per side."""
    _check(x)
    n = x.shape[0]
    k = trim_count(n, beta)
    if n - 2 * k <= 0:
        raise RobustAggregationError(f"trimmed mean: trimming {k} per side leaves nothing of {n} updates")
    return x.sort(dim=0).values[k : n - k].mean(dim=0)


def krum_scores(x: torch.Tensor, f: int, neighbours: int | None = None) -> torch.Tensor:
    """Krum score of every row: sum of squared distances to its ``n − f − 2`` nearest others."""
    _check(x)
    n = x.shape[0]
    k = n - f - 2 if neighbours is None else neighbours
    d2 = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    d2.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    k = max(0, min(k, n - 1))
    return d2.sort(dim=1).values[:, :k].sum(dim=1)


def krum_requirement(n: int, f: int) -> str | None:
    """Krum / Multi-Krum need ``n > 2f + 2`` updates (Blanchard et al. 2017); the bound, or None when met."""
    return None if n > 2 * f + 2 else "n > 2f + 2"


def bulyan_requirement(n: int, f: int) -> str | None:
    """Bulyan needs ``n >= 4f + 3`` updates (El Mhamdi et al. 2018); the bound, or None when met."""
    return None if n >= 4 * f + 3 else "n >= 4f + 3"


def cohort_requirement(rule: str, n: int, f: int) -> str | None:
    """The bound on the number of updates ``n`` that ``rule`` with ``f`` attackers violates, or None."""
    return ROBUST_RULES.get(rule).obj().requirement(n, f)


def _krum_guard(n: int, f: int, what: str) -> None:
    if f < 0:
        raise RobustAggregationError(f"{what}: num_byzantine must be >= 0, got {f}")
    if krum_requirement(n, f):
        raise RobustAggregationError(
            f"{what} needs n > 2f + 2 updates (Blanchard et al. 2017); got n={n}, f={f}"
        )


def krum_select(x: torch.Tensor, f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` best-scored rows (ties broken by index), best first."""
    _check(x)
    n = x.shape[0]
    _krum_guard(n, f, "Krum")
    if not 1 <= m <= n:
        raise RobustAggregationError(f"Multi-Krum: m must be in [1, n={n}], got {m}")
    scores = krum_scores(x, f)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return order[:m]


def krum(x: torch.Tensor, f: int) -> torch.Tensor:
    """Krum (Blanchard et al. 2017): the row with the lowest score."""
    return x[krum_select(x, f, 1)[0]].clone()


def multi_krum(x: torch.Tensor, f: int, m: int | None = None) -> torch.Tensor:
    """Multi-Krum: mean of the ``m`` best-scored rows (default ``m = n − f``)."""
    m = x.shape[0] - f if m is None else m
    return x[krum_select(x, f, m)].mean(dim=0)


def bulyan(x: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018) with Krum as the selection rule.

    Selection: ``θ = n − 2f`` times, run Krum on the rows not yet selected
    (neighbour count ``|R| − f − 2``, at least 1 — the last rounds have fewer
    rows than Krum's own bound) and move its pick to the selection. Then, per
    coordinate, average the ``β = θ − 2f`` selected values closest to the
    median of the selection.
    """
    _check(x)
    n = x.shape[0]
    if f < 0 or bulyan_requirement(n, f):
        raise RobustAggregationError(f"Bulyan needs n >= 4f + 3 updates (El Mhamdi et al. 2018); got n={n}, f={f}")
    theta, beta = n - 2 * f, n - 4 * f
    remaining, chosen = list(range(n)), []
    for _ in range(theta):
        sub = x[remaining]
        scores = krum_scores(sub, f, neighbours=max(1, len(remaining) - f - 2))
        best = min(range(len(remaining)), key=lambda i: (float(scores[i]), i))
        chosen.append(remaining.pop(best))
    sel = x[chosen]  # [θ, d]
    med = coordinate_median(sel)
    idx = (sel - med).abs().argsort(dim=0, stable=True)[:beta]  # β closest per coordinate
    return sel.gather(0, idx).mean(dim=0)


def norm_bounded_mean(x: torch.Tensor, weights: torch.Tensor, bound: float) -> torch.Tensor:
    """Norm bounding (Sun et al. 2019): scale each row to norm ≤ ``bound``, weighted mean."""
    _check(x)
    if not bound > 0:
        raise RobustAggregationError(f"norm bound must be > 0, got {bound}")
    norms = x.norm(dim=1, keepdim=True)
    clipped = x * torch.clamp(bound / norms.clamp_min(1e-30), max=1.0)
    w = weights.to(x.dtype).reshape(-1, 1)
    if float(w.sum()) <= 0:
        raise RobustAggregationError("norm bounding: weights sum to zero")
    return (clipped * w).sum(dim=0) / w.sum()


def fltrust_scores(x: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
    """FLTrust trust scores ``ReLU(cos(g_i, g_0))`` (0 for a zero ``g_i`` or ``g_0``)."""
    _check(x)
    n0, ni = g0.norm(), x.norm(dim=1)
    denom = (ni * n0).clamp_min(1e-30)
    cos = torch.where((ni > 0) & (n0 > 0), (x @ g0) / denom, torch.zeros_like(ni))
    return torch.relu(cos)


def fltrust(x: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
    """FLTrust (Cao et al. 2021): trust-weighted mean of updates rescaled to ``‖g_0‖``."""
    g0 = g0.to(x.dtype).reshape(-1)
    if g0.shape[0] != x.shape[1]:
        raise RobustAggregationError(f"FLTrust: server update has {g0.shape[0]} values, client updates {x.shape[1]}")
    ts = fltrust_scores(x, g0)
    if float(ts.sum()) <= 0:
        return torch.zeros_like(g0)
    rescaled = x * (g0.norm() / x.norm(dim=1).clamp_min(1e-30)).reshape(-1, 1)
    return (ts.reshape(-1, 1) * rescaled).sum(dim=0) / ts.sum()


# -- the fold -----------------------------------------------------------------
def as_fold(inner: ServerFold | ServerOptimizer | None) -> ServerFold:
    """The fold a robust rule wraps: ``inner`` itself, or FedAvg's fold with a given server optimizer.

    ``None`` is FedAvg's fold with ``ServerSGD(1.0)``; a
    :class:`~fedfm.algorithms.fedopt.ServerOptimizer` is FedAvg's fold with it.
    """
    if inner is None or isinstance(inner, ServerOptimizer):
        return MeanDeltaFold(inner, "uniform")
    return inner


class RobustFold(ServerFold):
    """Buffer every float delta of the round, aggregate with ``rule``, hand the result to ``inner``.

    ``rule(x, weights) -> Δ`` receives the stacked flattened deltas ``[n, d]``
    (float32, float64 when the global state has a float64 tensor) and their
    weights (``"uniform"``: 1 each; ``"examples"``: ``num_examples``, and an
    update with 0 examples is skipped as in MeanDeltaFold). ``finish()`` adds
    Δ to the inner fold as one update of weight 1 (``client_id=-1``) and
    returns the inner fold's ``finish()``; with nothing buffered, the inner
    fold finishes empty (copies of the global state). Inputs are never
    modified. ``client_ids`` lists the buffered clients in arrival order (row
    order of ``x``). ``optimizer`` is the inner fold's (checkpoints save it).

    Memory is O(n · model): robust rules need all updates at once.
    """

    def __init__(self, rule: Rule, inner: ServerFold | ServerOptimizer | None = None,
                 weighting: Weighting = "uniform", name: str = "robust") -> None:
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
        self.rule = rule
        self.inner = as_fold(inner)
        self.weighting = weighting
        self.name = name
        self.version = 0
        self._global: Mapping[str, torch.Tensor] | None = None
        self._float_keys: list[str] = []
        self._rows: list[torch.Tensor] = []
        self._weights: list[float] = []
        self.client_ids: list[int] = []

    @property
    def optimizer(self) -> ServerOptimizer:
        return self.inner.optimizer

    @property
    def num_folded(self) -> int:
        return len(self._rows)

    def _dtype(self) -> torch.dtype:
        g = self._global
        return torch.float64 if any(g[k].dtype == torch.float64 for k in self._float_keys) else torch.float32

    def start(self, global_state: Mapping[str, torch.Tensor], version: int = 0) -> None:
        self._global = global_state
        self._float_keys = [k for k, v in global_state.items() if v.is_floating_point()]
        self._rows, self._weights, self.client_ids = [], [], []
        self.version = version
        self.inner.start(global_state, version)

    def add(self, update: Update) -> bool:
        """Buffer one update; returns False when it was skipped (weight 0)."""
        self._require_started()
        if update.num_examples < 0:
            raise ValueError(f"client {update.client_id}: num_examples must be >= 0, got {update.num_examples}")
        w = 1.0 if self.weighting == "uniform" else float(update.num_examples)
        if w == 0:
            return False
        self._rows.append(self.flatten(update.delta, f"client {update.client_id} delta"))
        self._weights.append(w)
        self.client_ids.append(update.client_id)
        return True

    def finish(self) -> "OrderedDict[str, torch.Tensor]":
        g = self._require_started()
        agg = None
        try:  # the rule may still use the global state (FLTrust flattens g_0 with it)
            if self._rows:
                x = torch.stack(self._rows)
                w = torch.tensor(self._weights, dtype=x.dtype)
                self._rows = []  # free the buffer before the step
                agg = self.rule(x, w)
        finally:
            self._global = None  # the round is closed; the next one needs start()
        if agg is not None:
            delta, offset = OrderedDict(), 0
            for k in self._float_keys:
                dt = torch.float64 if g[k].dtype == torch.float64 else torch.float32
                numel = g[k].numel()
                delta[k] = agg[offset : offset + numel].reshape(g[k].shape).to(device=g[k].device, dtype=dt)
                offset += numel
            self.inner.add(Update(client_id=-1, delta=delta, num_examples=1))
        return self.inner.finish()

    def flatten(self, tensors: Mapping[str, torch.Tensor], what: str = "delta") -> torch.Tensor:
        """The float entries of ``tensors`` (global-state order) as one flat vector."""
        g = self._require_started()
        checked = float_entries(tensors, g, self._float_keys, what)
        parts = [t.reshape(-1).to(device="cpu", dtype=self._dtype()) for t in checked.values()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self._dtype())

    def _require_started(self) -> Mapping[str, torch.Tensor]:
        if self._global is None:
            raise RuntimeError("call start(global_state) before add()/finish()")
        return self._global


ServerUpdate = Callable[[Mapping[str, torch.Tensor], int], Mapping[str, torch.Tensor]]


class FLTrustFold(RobustFold):
    """FLTrust as a fold: ``server_update(global_state, version)`` returns the server's delta ``g_0``.

    It is called once per ``finish()`` (after every client update arrived)
    with the round's global state and version as given to ``start()``; the
    runtime supplies it — in a run, the same local training as the clients',
    on the server's root dataset (:func:`fedfm.server.compose.root_update`).
    After ``finish()``, ``last_trust`` holds the trust score of every
    buffered update (row order of ``client_ids``).
    """

    def __init__(self, server_update: ServerUpdate, inner: ServerFold | ServerOptimizer | None = None) -> None:
        super().__init__(self._aggregate, inner, "uniform", "fltrust")
        self.server_update = server_update
        self.last_trust: torch.Tensor | None = None

    def start(self, global_state: Mapping[str, torch.Tensor], version: int = 0) -> None:
        super().start(global_state, version)
        self.last_trust = None

    def round_stats(self) -> dict:
        """The trust score of every client folded in the last round (``fltrust_trust``)."""
        if self.last_trust is None:
            return {}
        return {"fltrust_trust": {str(c): round(float(t), 4) for c, t in zip(self.client_ids, self.last_trust)}}

    def _aggregate(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        g0 = self.flatten(self.server_update(self._require_started(), self.version), "server update")
        self.last_trust = fltrust_scores(x, g0.to(x.dtype))
        return fltrust(x, g0)


# -- the registered rules ---------------------------------------------------------
class RuleOptions(BaseModel):
    """Base of a robust rule's own options (``robust.<option>`` in the config)."""

    model_config = ConfigDict(extra="forbid")


class TrimmedMeanOptions(RuleOptions):
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)  # β, dropped at each end per coordinate


class MultiKrumOptions(RuleOptions):
    multi_krum_m: int | None = Field(None, ge=1)  # None: n − f


class NormBoundOptions(RuleOptions):
    norm_bound: float = Field(1.0, gt=0)  # M


class FLTrustOptions(RuleOptions):
    # the server's clean root dataset, carved out of the global holdout before the test set is fixed
    root_examples: int = Field(100, ge=1)


class RobustRule:
    """A registered robust rule: its cohort requirement and how it wraps the algorithm's fold.

    Subclasses implement :meth:`rule` (``options`` is the entry's options
    instance, ``f`` the number of attackers tolerated) or override :meth:`wrap`.
    """

    def requirement(self, n: int, f: int) -> str | None:
        """The bound on the round's number of updates ``n`` that ``f`` attackers violate, or None."""
        return None

    def rule(self, options, f: int) -> Rule:
        raise NotImplementedError

    def wrap(self, name: str, inner: ServerFold, options, *, num_byzantine: int,
             server_update: ServerUpdate | None, weighting: Weighting) -> ServerFold:
        return RobustFold(self.rule(options, num_byzantine), inner, weighting, name)


@ROBUST_RULES.register("mean", summary="no robust rule: the algorithm's own fold")
class MeanRule(RobustRule):
    def wrap(self, name, inner, options, *, num_byzantine, server_update, weighting) -> ServerFold:
        return inner


@ROBUST_RULES.register("median", capabilities={NEEDS_ALL_UPDATES},
                       summary="coordinate-wise median (Yin et al. 2018)")
class MedianRule(RobustRule):
    def rule(self, options, f):
        return lambda x, w: coordinate_median(x)


@ROBUST_RULES.register("trimmed_mean", config=TrimmedMeanOptions, capabilities={NEEDS_ALL_UPDATES},
                       summary="coordinate-wise β-trimmed mean (Yin et al. 2018)")
class TrimmedMeanRule(RobustRule):
    def rule(self, options, f):
        beta = options.trim_fraction
        return lambda x, w: trimmed_mean(x, beta)


@ROBUST_RULES.register("krum", capabilities={NEEDS_ALL_UPDATES}, summary="Krum (Blanchard et al. 2017)")
class KrumRule(RobustRule):
    def requirement(self, n, f):
        return krum_requirement(n, f)

    def rule(self, options, f):
        return lambda x, w: krum(x, f)


@ROBUST_RULES.register("multi_krum", config=MultiKrumOptions, capabilities={NEEDS_ALL_UPDATES},
                       summary="Multi-Krum (Blanchard et al. 2017): mean of the m best-scored updates")
class MultiKrumRule(KrumRule):
    def rule(self, options, f):
        m = options.multi_krum_m
        return lambda x, w: multi_krum(x, f, m)


@ROBUST_RULES.register("bulyan", capabilities={NEEDS_ALL_UPDATES},
                       summary="Bulyan over Krum (El Mhamdi et al. 2018)")
class BulyanRule(RobustRule):
    def requirement(self, n, f):
        return bulyan_requirement(n, f)

    def rule(self, options, f):
        return lambda x, w: bulyan(x, f)


@ROBUST_RULES.register("norm_bound", config=NormBoundOptions, capabilities={NEEDS_ALL_UPDATES},
                       summary="norm bounding (Sun et al. 2019): clip each update to M, weighted mean")
class NormBoundRule(RobustRule):
    def rule(self, options, f):
        bound = float(options.norm_bound)
        return lambda x, w: norm_bounded_mean(x, w, bound)


@ROBUST_RULES.register("fltrust", config=FLTrustOptions, capabilities={NEEDS_ALL_UPDATES, NEEDS_ROOT_DATA},
                       summary="FLTrust (Cao et al. 2021): trust from the server's root-data update")
class FLTrustRule(RobustRule):
    def wrap(self, name, inner, options, *, num_byzantine, server_update, weighting) -> ServerFold:
        if server_update is None:
            raise FedfmError("robust rule 'fltrust' needs a server_update callable (the server's root-data update)")
        return FLTrustFold(server_update, inner)


def rule_options(name: str, options: dict):
    """Robust rule ``name``'s options validated from ``options``; a one-line FedfmError for a bad one."""
    entry = ROBUST_RULES.get(name)
    declared = entry.config.model_fields if entry.config is not None else {}
    unknown = [k for k in options if k not in declared]
    if unknown:
        raise FedfmError(f"robust rule {name!r} has no option {unknown[0]!r} (its options: {', '.join(declared) or 'none'})")
    if entry.config is None:
        return None
    try:
        return entry.config.model_validate(options)
    except ValidationError as err:
        e = err.errors()[0]
        raise FedfmError(f"robust.{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})") from None


def build_robust_fold(
    name: str,
    inner: ServerFold | ServerOptimizer | None = None,
    *,
    num_byzantine: int = 0,
    server_update: ServerUpdate | None = None,
    weighting: Weighting = "uniform",
    **options,
) -> ServerFold:
    """The robust rule called ``name`` wrapped around the algorithm's fold ``inner``.

    ``inner`` is the algorithm's fold (a
    :class:`~fedfm.algorithms.fedopt.ServerOptimizer` stands for FedAvg's fold
    with it; None for plain FedAvg). ``num_byzantine`` is ``f`` for
    Krum/Multi-Krum/Bulyan; ``options`` are the rule's own
    (``trim_fraction``, ``multi_krum_m``, ``norm_bound``, ``root_examples``:
    see each rule's options class), validated with their defaults;
    ``server_update(global_state, version) -> delta`` (the server's update on
    its root data) is required for ``fltrust``. ``weighting`` only matters for
    ``norm_bound`` (the other rules ignore weights). ``mean`` returns ``inner``.
    """
    if num_byzantine < 0:
        raise FedfmError(f"robust.num_byzantine must be >= 0, got {num_byzantine}")
    entry = ROBUST_RULES.get(name)
    opts = rule_options(name, options)
    return entry.obj().wrap(name, as_fold(inner), opts, num_byzantine=int(num_byzantine),
                            server_update=server_update, weighting=weighting)
