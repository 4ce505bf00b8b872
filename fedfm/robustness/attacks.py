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
boost the delta by ``γ`` (:func:`model_replacement`). :func:`choose_malicious` picks the attackers.

Every attack registers itself in :data:`fedfm.registry.ATTACKS` (bottom of
this module) with its own options class and its capabilities
(``MODEL_POISONING``, ``COLLUDING``, ``POISONS_DATA``, ``FLIPS_LABELS``,
``TRIGGERS``, ``BOOSTS``); :class:`Attack` is the configured attack of a run
and asks its entry, never its name.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from statistics import NormalDist
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedfm.errors import FedfmError
from fedfm.registry import (
    ATTACKS,
    BOOSTS,
    COLLUDING,
    FLIPS_LABELS,
    MODEL_POISONING,
    POISONS_DATA,
    TRIGGERS,
    Entry,
)

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


class Attack:
    """Config-driven attack: which clients are malicious and what they send.

    ``name`` is a registered attack (:data:`fedfm.registry.ATTACKS`); its own
    options (``scale``, ``sigma``, ``epsilon``, ``z``, ``flip_mode``,
    ``flip_map``, ``poison_fraction``: see each attack's options class) are
    keyword arguments, validated with their defaults and readable as
    attributes; options another attack declares are accepted and ignored (a
    run config keeps them when its attack changes). A data attacker trains
    honestly on poisoned data (set up once by :mod:`fedfm.robustness.poison`);
    :meth:`apply` then returns its delta unchanged for ``label_flip`` and
    boosted by ``γ`` for ``backdoor`` (Bagdasaryan et al.'s scaled model
    replacement).

    ``scale`` is the sign-flip factor (default 1) and the boost ``γ`` of
    ``model_replacement`` / ``backdoor`` (default ``n / η``: the round's
    cohort size over ``server_lr``). ``target_label``, ``trigger`` and
    ``trigger_position`` describe the backdoor trigger (also evaluated
    without a backdoor attacker, ``eval.backdoor``).
    """

    def __init__(self, name: str = "none", fraction: float = 0.0, seed: int = 0, *, server_lr: float = 1.0,
                 target_label: int = 0, trigger: str = "cf", trigger_position: str = "start", **options) -> None:
        self.entry: Entry = ATTACKS.get(name)
        self.name = name
        if not 0 <= fraction <= 1:
            raise FedfmError(f"attack.fraction must be in [0, 1], got {fraction}")
        self.fraction, self.seed, self.server_lr = fraction, seed, server_lr  # η in γ = n / η
        self.target_label, self.trigger, self.trigger_position = target_label, trigger, trigger_position
        self.options = _options(self.entry, options)

    def __getattr__(self, key: str):
        options = self.__dict__.get("options")
        if options is not None and key in type(options).model_fields:
            return getattr(options, key)
        raise AttributeError(f"attack {self.__dict__.get('name')!r} has no option {key!r}")

    def __repr__(self) -> str:
        opts = self.options.model_dump() if self.options is not None else {}
        return f"Attack({self.name!r}, fraction={self.fraction}, {opts})"

    def supports(self, *capabilities: str) -> bool:
        return self.entry.supports(*capabilities)

    @property
    def active(self) -> bool:
        """True when malicious clients do anything (every attack but ``none``)."""
        return self.supports(MODEL_POISONING) or self.supports(POISONS_DATA)

    @property
    def colluding(self) -> bool:
        """True when the malicious delta needs the benign deltas of the round."""
        return self.supports(COLLUDING)

    @property
    def poisons_data(self) -> bool:
        return self.supports(POISONS_DATA)

    def malicious(self, num_clients: int) -> list[int]:
        return choose_malicious(num_clients, self.fraction, self.seed) if self.active else []

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
        return self.entry.obj(
            self, delta, benign_deltas, num_clients=num_clients, num_byzantine=num_byzantine,
            server_lr=self.server_lr if server_lr is None else server_lr, generator=generator,
        )


def _options(entry: Entry, given: dict) -> BaseModel | None:
    """``entry``'s options from ``given`` (defaults filled); other attacks' options are ignored."""
    declared = entry.config.model_fields if entry.config is not None else {}
    for key in given:
        if key not in declared and not ATTACKS.option_owners(key):
            raise FedfmError(f"attack {entry.name!r}: unknown option {key!r}")
    if entry.config is None:
        return None
    try:
        return entry.config.model_validate({k: v for k, v in given.items() if k in declared})
    except ValidationError as err:
        e = err.errors()[0]
        raise FedfmError(f"attack.{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})") from None


def apply_model_attack(
    name: str,
    delta: Delta,
    benign_deltas: Sequence[Delta] = (),
    *,
    scale: float | None = None,
    sigma: float = 1.0,
    epsilon: float = 0.1,
    num_clients: int | None = None,
    num_byzantine: int = 0,
    server_lr: float = 1.0,
    z: float | None = None,
    generator: torch.Generator | None = None,
):
    """The malicious delta for the registered attack ``name`` (:meth:`Attack.apply` in one call).

    ``delta`` is the attacker's own honestly trained delta (for
    ``model_replacement``: trained on backdoored data); ``benign_deltas`` are
    the honest deltas of the round (needed by ``alie`` and ``ipm``).
    ``scale`` is ``s`` for ``sign_flip`` (default 1); ``model_replacement``
    boosts by ``scale``, else ``γ = num_clients / server_lr``.
    """
    entry = ATTACKS.get(name)
    given = {"scale": scale, "sigma": sigma, "epsilon": epsilon, "z": z}
    declared = entry.config.model_fields if entry.config is not None else {}
    attack = Attack(name, server_lr=server_lr, **{k: v for k, v in given.items() if k in declared})
    return attack.apply(delta, benign_deltas, num_clients=num_clients, num_byzantine=num_byzantine,
                        generator=generator)


# -- the registered attacks ----------------------------------------------------------
# Each is ``(attack, delta, benign_deltas, *, num_clients, num_byzantine, server_lr, generator) -> delta``.
class AttackOptions(BaseModel):
    """Base of an attack's own options (``attack.<option>`` in the config)."""

    model_config = ConfigDict(extra="forbid")


class SignFlipOptions(AttackOptions):
    scale: float | None = Field(None, gt=0)  # the factor s of −sΔ; None: 1


class BoostOptions(AttackOptions):
    scale: float | None = Field(None, gt=0)  # the boost γ; None: n / η (Bagdasaryan et al.)


class GaussianOptions(AttackOptions):
    sigma: float = Field(1.0, gt=0)  # std of the replacement noise


class ALIEOptions(AttackOptions):
    z: float | None = None  # None: the paper's z_max for the cohort


class IPMOptions(AttackOptions):
    epsilon: float = Field(0.1, gt=0)


class LabelFlipOptions(AttackOptions):
    flip_mode: Literal["reverse", "shift"] = "reverse"  # y -> C-1-y, or y -> y+1 mod C
    flip_map: dict[int, int] | None = None  # an explicit {from: to}, overrides flip_mode


class BackdoorOptions(BoostOptions):
    poison_fraction: float = Field(0.5, gt=0, le=1)  # share of an attacker's rows that get the trigger


def _honest(delta: Delta) -> "OrderedDict[str, torch.Tensor]":
    return _map(delta, lambda k, t: t)


def _boosted(attack: Attack, delta: Delta, num_clients, server_lr) -> "OrderedDict[str, torch.Tensor]":
    return model_replacement(delta, 1, factor=attack.boost(num_clients, server_lr))


@ATTACKS.register("none", summary="no attackers")
def _no_attack(attack, delta, benign, *, num_clients, num_byzantine, server_lr, generator):
    return _honest(delta)


@ATTACKS.register("sign_flip", config=SignFlipOptions, capabilities={MODEL_POISONING}, summary="Δ → −sΔ")
def _sign_flip(attack, delta, benign, *, num_clients, num_byzantine, server_lr, generator):
    return sign_flip(delta, 1.0 if attack.scale is None else attack.scale)


@ATTACKS.register("gaussian", config=GaussianOptions, capabilities={MODEL_POISONING},
                  summary="Δ replaced by N(0, σ²) noise")
def _gaussian(attack, delta, benign, *, num_clients, num_byzantine, server_lr, generator):
    return gaussian_noise(delta, attack.sigma, generator)


@ATTACKS.register("model_replacement", config=BoostOptions, capabilities={MODEL_POISONING, BOOSTS},
                  summary="scaled model replacement (Bagdasaryan et al. 2020): Δ → γΔ")
def _model_replacement(attack, delta, benign, *, num_clients, num_byzantine, server_lr, generator):
    return _boosted(attack, delta, num_clients, server_lr)


@ATTACKS.register("alie", config=ALIEOptions, capabilities={MODEL_POISONING, COLLUDING},
                  summary="A Little Is Enough (Baruch et al. 2019): μ − zσ of the honest deltas")
def _alie(attack, delta, benign, *, num_clients, num_byzantine, server_lr, generator):
    return alie(benign, num_byzantine, num_clients, attack.z)


@ATTACKS.register("ipm", config=IPMOptions, capabilities={MODEL_POISONING, COLLUDING},
                  summary="inner product manipulation (Xie et al. 2019): −ε · mean(honest)")
def _ipm(attack, delta, benign, *, num_clients, num_byzantine, server_lr, generator):
    return ipm(benign, attack.epsilon)


@ATTACKS.register("label_flip", config=LabelFlipOptions, capabilities={POISONS_DATA, FLIPS_LABELS},
                  summary="training on flipped labels (Fang et al. 2020)")
def _label_flip(attack, delta, benign, *, num_clients, num_byzantine, server_lr, generator):
    return _honest(delta)


@ATTACKS.register("backdoor", config=BackdoorOptions,
                  capabilities={POISONS_DATA, TRIGGERS, MODEL_POISONING, BOOSTS},
                  summary="text backdoor with scaled model replacement (Bagdasaryan et al. 2020)")
def _backdoor(attack, delta, benign, *, num_clients, num_byzantine, server_lr, generator):
    return _boosted(attack, delta, num_clients, server_lr)
