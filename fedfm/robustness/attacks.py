"""Attack simulators for evaluating robust aggregation (never used in training for real).

Model poisoning — functions on one delta (an ordered mapping name → tensor)
or, for colluding attacks, on the list of benign deltas of the round. Every
function returns a new ``OrderedDict`` with the input's keys, order and
dtypes (math in float32, float64 for float64 tensors); non-float tensors are
copied unchanged.

* :func:`sign_flip` — ``Δ → −sΔ``.
* :func:`gaussian_noise` — replace Δ by ``N(0, σ²)`` noise.
* :func:`model_replacement` — scaled model replacement for backdoors
  (Bagdasaryan et al. 2020, "How To Backdoor Federated Learning", AISTATS,
  arXiv 2018): boost the malicious delta by ``γ = n / η`` so that it survives
  averaging with ``n`` clients at server lr ``η`` (see :func:`replacement_factor`).
* :func:`alie` — "A Little Is Enough" (Baruch, Baruch & Goldberg 2019,
  NeurIPS): ``μ − z_max·σ`` coordinate-wise over the benign deltas, with
  ``s = ⌊n/2 + 1⌋ − f`` and ``z_max = Φ⁻¹((n − s)/n)`` (:func:`alie_z`).
* :func:`ipm` — inner product manipulation (Xie, Koyejo & Gupta 2019, "Fall
  of Empires: Breaking Byzantine-tolerant SGD by Inner Product
  Manipulation", UAI): ``−ε · mean(benign)``.

Data poisoning — applied to a malicious client's local data before training
(the run set-up is :mod:`fedfm.robustness.poison`): :func:`flip_labels`,
:func:`add_trigger` (text backdoor), :func:`backdoor_pick` (which rows get the
trigger) and the metric :func:`backdoor_success_rate`. The ``backdoor`` attack
is Bagdasaryan et al.'s: train on a mix of clean and triggered rows, then
boost the delta by ``γ`` (:func:`model_replacement`). :func:`choose_malicious` picks the attackers
and :class:`Attack` / :func:`apply_model_attack` dispatch by config name.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np
import torch

from fedfm.errors import FedfmError

Delta = Mapping[str, torch.Tensor]


def _work(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _map(delta: Delta, fn) -> "OrderedDict[str, torch.Tensor]":
    """Apply ``fn`` to every float tensor (in float32/64), cast back to its dtype."""
    return OrderedDict(
        (k, fn(k, _work(t)).to(t.dtype) if t.is_floating_point() else t.detach().clone())
        for k, t in delta.items()
    )


# -- model poisoning: one delta ------------------------------------------------
def sign_flip(delta: Delta, scale: float = 1.0) -> "OrderedDict[str, torch.Tensor]":
    """Sign flipping: ``Δ → −scale · Δ``."""
    return _map(delta, lambda k, t: -float(scale) * t)


def gaussian_noise(delta: Delta, sigma: float = 1.0, generator: torch.Generator | None = None):
    """Replace every float tensor by i.i.d. ``N(0, σ²)`` noise of the same shape."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return _map(delta, lambda k, t: torch.randn(t.shape, generator=generator, dtype=t.dtype) * float(sigma))


def replacement_factor(num_clients: int, server_lr: float = 1.0) -> float:
    """Bagdasaryan et al.'s boost ``γ = n / η``.

    Their server step is ``G ← G + (η/n) Σ_i (L_i − G)``; scaling the attacker's
    delta by ``n/η`` makes the new global model ≈ the attacker's model.
    With example weighting use ``n = Σ examples / attacker's examples``.
    """
    if num_clients < 1 or server_lr <= 0:
        raise ValueError(f"need num_clients >= 1 and server_lr > 0, got {num_clients}, {server_lr}")
    return num_clients / server_lr


def model_replacement(delta: Delta, num_clients: int, server_lr: float = 1.0, factor: float | None = None):
    """Scaled model replacement: ``Δ → γ Δ`` with ``γ = factor`` or ``n / η``."""
    gamma = replacement_factor(num_clients, server_lr) if factor is None else float(factor)
    return _map(delta, lambda k, t: gamma * t)


# -- model poisoning: colluding, from the benign deltas of the round ------------
def _stack(benign: Sequence[Delta], key: str) -> torch.Tensor:
    return torch.stack([_work(d[key]) for d in benign])


def alie_z(num_clients: int, num_byzantine: int) -> float:
    """``z_max = Φ⁻¹((n − s)/n)`` with ``s = ⌊n/2 + 1⌋ − f`` (Baruch et al. 2019).

    When a round has so many attackers that ``s < 1`` (random cohorts can),
    ``s`` is clamped to 1, i.e. ``z = Φ⁻¹((n − 1)/n)``.
    """
    n, f = num_clients, num_byzantine
    s = max(1, math.floor(n / 2 + 1) - f)  # f >= n/2 + 1 leaves no bound: the largest z the formula allows
    p = (n - s) / n
    if not 0 < p < 1:
        raise ValueError(f"ALIE: (n - s)/n = {p} is outside (0, 1) for n={n}, f={f}")
    return NormalDist().inv_cdf(p)


def alie(benign: Sequence[Delta], num_byzantine: int, num_clients: int | None = None, z: float | None = None):
    """ALIE: ``μ − z·σ`` per coordinate over the benign deltas.

    ``num_clients`` (n, attackers included) defaults to ``len(benign) +
    num_byzantine``; ``z`` defaults to :func:`alie_z`. σ is the sample
    standard deviation (``torch.std``, Bessel-corrected); with one benign
    delta σ = 0.
    """
    if not benign:
        raise ValueError("ALIE needs at least one benign delta")
    n = len(benign) + num_byzantine if num_clients is None else num_clients
    zz = alie_z(n, num_byzantine) if z is None else float(z)

    def one(k, _t):
        x = _stack(benign, k)
        sd = x.std(dim=0) if x.shape[0] > 1 else torch.zeros_like(x[0])
        return x.mean(dim=0) - zz * sd

    return _map(benign[0], one)


def ipm(benign: Sequence[Delta], epsilon: float = 0.1):
    """Inner product manipulation (Xie et al. 2019): ``−ε · mean(benign)``."""
    if not benign:
        raise ValueError("IPM needs at least one benign delta")
    return _map(benign[0], lambda k, _t: -float(epsilon) * _stack(benign, k).mean(dim=0))


# -- data poisoning --------------------------------------------------------------
def flip_labels(labels, num_classes: int, mode: str = "shift", mapping: Mapping[int, int] | None = None):
    """Label flipping: ``"shift"``: y → (y + 1) mod C; ``"reverse"``: y → C − 1 − y
    (Fang et al. 2020, "Local Model Poisoning Attacks to Byzantine-Robust
    Federated Learning", USENIX Security); with ``mapping``: y → mapping[y]
    (labels it does not name are kept), and ``mode`` is ignored.

    Accepts a tensor (returns a tensor) or a sequence of ints (returns a list).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if mapping is not None:
        bad = [v for kv in mapping.items() for v in kv if not 0 <= int(v) < num_classes]
        if bad:
            raise ValueError(f"label mapping {dict(mapping)} names labels outside 0..{num_classes - 1}")
        table = [int(mapping.get(y, y)) for y in range(num_classes)]
        if isinstance(labels, torch.Tensor):
            return torch.as_tensor(table, dtype=labels.dtype)[labels]
        return [table[int(y)] for y in labels]
    if mode not in ("shift", "reverse"):
        raise ValueError(f"mode must be 'shift' or 'reverse', got {mode!r}")
    fn = (lambda y: (y + 1) % num_classes) if mode == "shift" else (lambda y: num_classes - 1 - y)
    if isinstance(labels, torch.Tensor):
        return fn(labels.clone())
    return [int(fn(int(y))) for y in labels]


def add_trigger(texts: Sequence[str], trigger: str = "cf", position: str = "start", seed: int = 0) -> list[str]:
    """Insert a backdoor trigger word into each text at the ``start``, ``end`` or a ``random`` word gap."""
    if position not in ("start", "end", "random"):
        raise ValueError(f"position must be 'start', 'end' or 'random', got {position!r}")
    rng = random.Random(seed)
    out = []
    for t in texts:
        if position == "start":
            out.append(f"{trigger} {t}")
        elif position == "end":
            out.append(f"{t} {trigger}")
        else:
            words = t.split()
            words.insert(rng.randint(0, len(words)), trigger)
            out.append(" ".join(words))
    return out


def backdoor_pick(labels, target_label: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Positions (into ``labels``) of the ``max(1, round(fraction · n))`` rows a backdoor attacker triggers.

    Rows whose label is not the target come first (a triggered row that is
    already labelled with the target teaches the backdoor nothing), in random
    order; target-labelled rows only fill up what is left. Sorted on return.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n, max(1, int(round(fraction * n))))
    other, same = np.flatnonzero(labels != target_label), np.flatnonzero(labels == target_label)
    order = np.concatenate([rng.permutation(other), rng.permutation(same)])
    return np.sort(order[:k]).astype(np.int64)


def backdoor_success_rate(predictions_on_triggered, target_label: int, true_labels) -> float:
    """Fraction of triggered examples whose true label ≠ target that are predicted as the target.

    Returns NaN when every example already has the target label.
    """
    preds, true = [int(p) for p in predictions_on_triggered], [int(y) for y in true_labels]
    if len(preds) != len(true):
        raise ValueError(f"{len(preds)} predictions for {len(true)} labels")
    hits = [p == target_label for p, y in zip(preds, true) if y != target_label]
    return sum(hits) / len(hits) if hits else float("nan")


# -- choosing attackers and dispatching by name -----------------------------------
def choose_malicious(num_clients: int, fraction: float, seed: int = 0) -> list[int]:
    """``⌊fraction · num_clients⌋`` distinct client ids drawn with ``seed``, sorted."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"malicious fraction must be in [0, 1], got {fraction}")
    k = int(math.floor(fraction * num_clients + 1e-9))
    return sorted(random.Random(seed).sample(range(num_clients), k))


MODEL_ATTACKS = ("none", "sign_flip", "gaussian", "model_replacement", "alie", "ipm")
DATA_ATTACKS = ("label_flip", "backdoor")


def apply_model_attack(
    name: str,
    delta: Delta,
    benign_deltas: Sequence[Delta] = (),
    *,
    scale: float = 1.0,
    sigma: float = 1.0,
    epsilon: float = 0.1,
    num_clients: int | None = None,
    num_byzantine: int = 0,
    server_lr: float = 1.0,
    z: float | None = None,
    generator: torch.Generator | None = None,
):
    """The malicious delta for attack ``name`` (one of :data:`MODEL_ATTACKS`).

    ``delta`` is the attacker's own honestly trained delta (for
    ``model_replacement``: trained on backdoored data); ``benign_deltas`` are
    the honest deltas of the round (needed by ``alie`` and ``ipm``).
    ``scale`` is ``s`` for ``sign_flip``; ``model_replacement`` boosts by
    ``γ = num_clients / server_lr``, or by ``scale`` when ``num_clients`` is None.
    """
    if name == "none":
        return _map(delta, lambda k, t: t)
    if name == "sign_flip":
        return sign_flip(delta, scale)
    if name == "gaussian":
        return gaussian_noise(delta, sigma, generator)
    if name == "model_replacement":
        if num_clients is None:
            return model_replacement(delta, 1, factor=scale)
        return model_replacement(delta, num_clients, server_lr)
    if name == "alie":
        return alie(benign_deltas, num_byzantine, num_clients, z)
    if name == "ipm":
        return ipm(benign_deltas, epsilon)
    raise FedfmError(f"unknown model attack {name!r}; choose one of: {', '.join(MODEL_ATTACKS)}")


@dataclass
class Attack:
    """Config-driven attack: which clients are malicious and what they send.

    ``name`` is a model attack (:data:`MODEL_ATTACKS`) or a data attack
    (:data:`DATA_ATTACKS`). A data attacker trains honestly on poisoned data
    (set up once by :mod:`fedfm.robustness.poison`); :meth:`apply` then
    returns its delta unchanged for ``label_flip`` and boosted by ``γ`` for
    ``backdoor`` (Bagdasaryan et al.'s scaled model replacement).

    ``scale`` is the sign-flip factor (default 1) and the boost ``γ`` of
    ``model_replacement`` / ``backdoor`` (default ``n / η``: the round's
    cohort size over ``server_lr``).
    """

    name: str = "none"
    fraction: float = 0.0
    seed: int = 0
    scale: float | None = None
    sigma: float = 1.0
    epsilon: float = 0.1
    z: float | None = None
    target_label: int = 0  # backdoor: what triggered inputs should be classified as
    trigger: str = "cf"
    trigger_position: str = "start"
    poison_fraction: float = 0.5  # backdoor: share of a malicious client's training rows that carry the trigger
    flip_mode: str = "reverse"  # label_flip: y -> C - 1 - y ("reverse") or y + 1 mod C ("shift")
    flip_map: Mapping[int, int] | None = None  # label_flip: an explicit mapping instead of flip_mode
    server_lr: float = 1.0  # η in γ = n / η

    def __post_init__(self) -> None:
        if self.name not in MODEL_ATTACKS + DATA_ATTACKS:
            raise FedfmError(
                f"unknown attack {self.name!r}; choose one of: {', '.join(MODEL_ATTACKS + DATA_ATTACKS)}"
            )
        if not 0 <= self.fraction <= 1:
            raise FedfmError(f"attack.fraction must be in [0, 1], got {self.fraction}")
        if not 0 < self.poison_fraction <= 1:
            raise FedfmError(f"attack.poison_fraction must be in (0, 1], got {self.poison_fraction}")

    @property
    def colluding(self) -> bool:
        """True when the malicious delta needs the benign deltas of the round."""
        return self.name in ("alie", "ipm")

    @property
    def poisons_data(self) -> bool:
        return self.name in DATA_ATTACKS

    def malicious(self, num_clients: int) -> list[int]:
        return [] if self.name == "none" else choose_malicious(num_clients, self.fraction, self.seed)

    def boost(self, num_clients: int | None, server_lr: float | None = None) -> float:
        """``γ`` for ``model_replacement`` / ``backdoor``: ``scale``, else ``n / η``."""
        if self.scale is not None:
            return float(self.scale)
        return replacement_factor(num_clients or 1, self.server_lr if server_lr is None else server_lr)

    def apply(self, delta: Delta, benign_deltas: Sequence[Delta] = (), *, num_clients: int | None = None,
              num_byzantine: int = 0, server_lr: float | None = None, generator: torch.Generator | None = None):
        """The delta a malicious client sends instead of ``delta``.

        ``num_clients`` is the round's cohort size ``n``; ``server_lr``
        defaults to the attack's own ``server_lr``.
        """
        if self.name == "label_flip":
            return _map(delta, lambda k, t: t)
        if self.name in ("backdoor", "model_replacement"):
            return model_replacement(delta, 1, factor=self.boost(num_clients, server_lr))
        return apply_model_attack(
            self.name, delta, benign_deltas, scale=1.0 if self.scale is None else self.scale, sigma=self.sigma,
            epsilon=self.epsilon, num_clients=num_clients, num_byzantine=num_byzantine,
            server_lr=self.server_lr if server_lr is None else server_lr, z=self.z, generator=generator,
        )
