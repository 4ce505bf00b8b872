"""FedNova: normalized averaging (Wang, Liu, Liang, Joshi & Poor 2020, "Tackling the
Objective Inconsistency Problem in Heterogeneous Federated Optimization", NeurIPS).

When clients take different numbers of local steps ``τ_i`` (local epochs over
shards of different sizes, slower devices), FedAvg's weighted mean of deltas
over-weights the clients that stepped more and converges to the optimum of a
*different* objective. FedNova divides every delta by its client's step count
before averaging and rescales the mean by an effective step count:

    p_i    client weight (``algorithm.weighting``, a WEIGHTINGS entry: examples, 1 with
           ``uniform``, examples x kept fraction with ``quality``)
    τ_i    the client's local steps (``update.metrics["steps"]``)
    d_i    = Δ_i / τ_i                                 normalized update
    τ_eff  = Σ p_i τ_i / Σ p_i
    x ← x + η τ_eff Σ p_i d_i / Σ p_i                  (η = ``algorithm.server_lr``)

(the paper's eq. (8) with ``a_i = [1, …, 1]``, so ``‖a_i‖₁ = τ_i``). With equal
``τ_i`` this is exactly FedAvg. The step ``τ_eff Σ p_i d_i / Σ p_i`` goes
through the same :class:`~fedfm.algorithms.fedopt.ServerOptimizer` as
FedAvg's mean (``ServerSGD(server_lr)``).

Caveat: ``a_i = [1, …, 1]`` is the paper's vector for plain local SGD, i.e.
``train.optimizer=sgd``. With local momentum ρ the paper's norm is
``‖a_i‖₁ = [τ_i − ρ(1 − ρ^τ_i)/(1 − ρ)] / (1 − ρ)``, and AdamW has no closed
form; this fold always normalizes by ``τ_i``, which is then a heuristic (it
still removes, to first order, the pull toward clients that step more).

The fold streams (one float64 running sum, O(model) memory) and is mergeable
across worker processes (``partial``/``merge``, like
:class:`~fedfm.algorithms.fedavg.MeanDeltaFold`). It needs each update's step
count, so it cannot run on a secure sum of deltas (no ``SECURE_SUM``) and a
robust rule or client-level DP cannot stand in for its mean (no
``MEAN_DELTA``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from fedfm.algorithms.base import Algorithm, Update
from fedfm.algorithms.fedavg import MeanDeltaFold, Weighting
from fedfm.algorithms.fedopt import ServerOptimizer, ServerSGD
from fedfm.registry import ALGORITHMS, ASYNC_SAFE, DELTA_ONLY, MERGEABLE, PLAIN_CLIENT

STEPS = "steps"  # the update metric holding the client's number of local steps


def local_steps(update: Update) -> float:
    """``τ_i``: the update's ``metrics["steps"]``; ValueError unless it is a finite number >= 1."""
    tau = update.metrics.get(STEPS)
    if tau is None:
        raise ValueError(f"client {update.client_id}: FedNova needs the update's local step count (metrics['steps'])")
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"client {update.client_id}: local steps must be a number, got {tau!r}") from None
    if not math.isfinite(tau) or tau < 1:
        raise ValueError(f"client {update.client_id}: local steps must be finite and >= 1, got {tau}")
    return tau


class FedNovaFold(MeanDeltaFold):
    """Normalized averaging: a running weighted mean of ``Δ_i / τ_i``, rescaled by ``τ_eff`` in ``finish``.

    Weighting, skipped zero-weight updates, non-float tensors and dtypes are
    as in :class:`~fedfm.algorithms.fedavg.MeanDeltaFold`; the running sums are
    ``Σ p_i d_i`` (float64), ``Σ p_i`` and ``Σ p_i τ_i``.
    """

    def __init__(self, optimizer: ServerOptimizer | None = None, weighting: Weighting = "examples") -> None:
        super().__init__(optimizer, weighting)
        self._tau_sum = 0.0  # Σ p_i τ_i

    def start(self, global_state, version: int = 0) -> None:
        super().start(global_state, version)
        self._tau_sum = 0.0

    def add(self, update: Update) -> bool:
        """Fold ``d_i = Δ_i / τ_i`` with weight ``p_i``; returns False when it was skipped (weight 0)."""
        g = self._require_started()
        tau = local_steps(update)
        w = self.weight(update)
        if w == 0:
            return False
        part = self._float_part(update.delta, g, f"client {update.client_id} delta")
        self._mean.add(OrderedDict((k, t.to(torch.float64) / tau) for k, t in part.items()), w)
        self._tau_sum += w * tau
        return True

    @property
    def tau_eff(self) -> float:
        """``Σ p_i τ_i / Σ p_i`` over the updates folded so far (0 before any)."""
        return self._tau_sum / self._mean.total_weight if self._mean.total_weight > 0 else 0.0

    # -- secure aggregation would need every τ_i: refused (no SECURE_SUM) ---------------------
    def summand(self, update: Update, max_weight: float):
        raise NotImplementedError("FedNova's fold needs each update's step count: it cannot run on a secure sum")

    def summand_layout(self, clip_range: float):
        raise NotImplementedError("FedNova's fold needs each update's step count: it cannot run on a secure sum")

    def absorb_sum(self, tensors, scalars, count) -> None:
        raise NotImplementedError("FedNova's fold needs each update's step count: it cannot run on a secure sum")

    # -- multi-process simulation: Σ p_i d_i is all-reduced, the scalars gathered -------------
    def partial(self):
        sums, scalars = super().partial()
        return sums, scalars + [self._tau_sum]

    def merge(self, sums, scalars: list[list[float]]) -> None:
        super().merge(sums, [s[:2] for s in scalars])
        self._tau_sum = float(sum(s[2] for s in scalars))

    def finish(self) -> "OrderedDict[str, torch.Tensor]":
        self._require_started()
        if self._mean.count > 0 and self._mean.total_weight > 0:
            tau_eff = self.tau_eff
            for acc in self._mean.sums.values():  # Σ p_i d_i → τ_eff Σ p_i d_i; MeanDeltaFold divides by Σ p_i
                acc.mul_(tau_eff)
        self._tau_sum = 0.0
        return super().finish()


class FedNova(Algorithm):
    """FedNova (Wang et al. 2020): plain local training + :class:`FedNovaFold`."""

    name = "fednova"

    def __init__(
        self,
        server_lr: float = 1.0,
        weighting: Weighting = "examples",
        server_opt: ServerOptimizer | None = None,
    ) -> None:
        super().__init__(FedNovaFold(server_opt or ServerSGD(server_lr), weighting))


@ALGORITHMS.register("fednova", capabilities={MERGEABLE, ASYNC_SAFE, PLAIN_CLIENT, DELTA_ONLY},
                     summary="FedNova (Wang et al. 2020): deltas normalized by local steps")
def _fednova(cfg, num_clients: int) -> FedNova:
    return FedNova(weighting=cfg.weighting, server_opt=ServerSGD(cfg.server_lr))
