"""Validation of every incoming update before it reaches a fold.

The server (:meth:`fedfm.server.server.Server.receive`) runs these checks on
every decoded update, in this order, and leaves out (logs, keeps and counts)
an update that fails one:

* the sender: it is who it claims to be, it belongs to the round (the sync
  cohort; in asynchronous training a client holding a dispatched version) and
  it has not reported already this round (the server's own bookkeeping);
* :func:`examples_problem`: the example count (the FedAvg weight) is a
  positive integer no larger than what the server knows the client holds (its
  partition in simulation, the rows its node registered in a deployment);
* :func:`update_problem`: tensor names, shapes and dtypes equal the global
  trainable state's, and every value is finite;
* :class:`NormBound`: the update's L2 norm is within an absolute bound and
  within a multiple of the running median of the norms accepted so far.

The example count and the client id come from the client: they are checked,
never trusted. Each check returns a one-line reason, or None.
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping

import torch

from fedfm.algorithms.base import Update


def examples_problem(num_examples, cap: int | None = None) -> str | None:
    """Why an update claiming ``num_examples`` training examples is implausible, or None.

    ``cap``: the most the server knows or expects the client to hold (None: unbounded).
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        return f"example count {num_examples!r} is not an integer"
    if num_examples < 0:
        return f"negative example count {num_examples}"
    if num_examples == 0:
        return "example count 0: an update must come from at least one training example"
    if cap is not None and num_examples > cap:
        return f"claims {num_examples} training examples, more than the {cap} rows it holds"
    return None


def update_problem(update: Update, template: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``update`` must be rejected, or None when it is well-formed (example count, names, shapes, values)."""
    return examples_problem(update.num_examples) or tensors_problem(update, template)


def tensors_problem(update: Update, template: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``update``'s tensors do not fit ``template`` (names, shapes, dtypes) or hold NaN/Inf, or None."""
    keys, expected = set(update.delta), set(template)
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        return f"tensor names differ from the global state (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref in template.items():
        t = update.delta[name]
        if t.shape != ref.shape:
            return f"{name}: shape {tuple(t.shape)} != {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{name}: dtype {t.dtype} != {ref.dtype}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name}: holds NaN or Inf"
    for extra_name, tensors in update.extras.items():
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"extras/{extra_name}/{name}: holds NaN or Inf"
    return None


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all of ``tensors`` as one vector, summed in float64 (no overflow, order fixed by name)."""
    total = 0.0
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point():
            total += float(t.detach().double().pow(2).sum())
    return math.sqrt(total)


class NormBound:
    """Bounds on an update's L2 norm: absolute, and relative to the running median of accepted norms.

    An update is rejected when its norm exceeds ``max_norm`` (None: no absolute
    bound) or ``max_norm_factor`` times a reference (None: no relative bound).
    The reference is the median of the last ``window`` accepted norms once
    ``min_norms`` have been accepted; before that (the first rounds) it is the
    norm of the global trainable state the clients started from, with the
    looser ``warmup_factor`` (a single step of local training does not move
    the model by a hundred times its own size).

    The median only changes between rounds: a round's accepted norms join the
    history when it closes (:meth:`close_round`, sorted), so every update of a
    round meets the same bound whatever the arrival order, and simulation
    workers that each saw part of the round end with the same history.
    The history is part of the server's checkpointed JSON state.
    """

    def __init__(self, max_norm: float | None = None, max_norm_factor: float | None = 10.0, window: int = 100,
                 min_norms: int = 5, warmup_factor: float | None = 100.0) -> None:
        self.max_norm = max_norm
        self.factor = max_norm_factor
        self.window = window
        self.min_norms = min_norms
        self.warmup_factor = warmup_factor
        self.history: list[float] = []  # accepted norms of past rounds, oldest first (at most ``window``)
        self.round_norms: list[float] = []  # accepted this round (joins the history at close_round)
        self.reference: tuple[float, float, str] | None = None  # this round's (factor, reference norm, what it is)

    @classmethod
    def from_config(cls, cfg) -> "NormBound":
        """From a :class:`fedfm.config.schema.ValidationConfig`."""
        return cls(cfg.max_norm, cfg.max_norm_factor, cfg.norm_window, cfg.min_norms, cfg.warmup_factor)

    def open_round(self, global_state: Mapping[str, torch.Tensor]) -> None:
        """Fix this round's relative bound: the median of the history, or the global state's norm in warm-up."""
        self.round_norms = []
        if self.factor is not None and len(self.history) >= self.min_norms:
            self.reference = (self.factor, statistics.median(self.history), "the median accepted norm")
        elif self.warmup_factor is not None:
            self.reference = (self.warmup_factor, l2_norm(global_state), "the global state's norm (warm-up)")
        else:
            self.reference = None

    def problem(self, norm: float) -> str | None:
        """Why an update of L2 norm ``norm`` is out of bounds, or None."""
        if self.max_norm is not None and norm > self.max_norm:
            return f"update norm {norm:.4g} exceeds validation.max_norm={self.max_norm:g}"
        if self.reference is not None:
            factor, ref, what = self.reference
            if ref > 0 and norm > factor * ref:
                return f"update norm {norm:.4g} exceeds {factor:g} x {what} {ref:.4g}"
        return None

    def accept(self, norm: float) -> None:
        """An update of norm ``norm`` was folded this round."""
        self.round_norms.append(float(norm))

    def close_round(self) -> None:
        """The round's accepted norms join the history (sorted: independent of arrival order)."""
        self.history = (self.history + sorted(self.round_norms))[-self.window:]
        self.round_norms = []

    def state_dict(self) -> list[float]:
        return list(self.history)

    def load_state_dict(self, history: list) -> None:
        self.history = [float(x) for x in history][-self.window:]
