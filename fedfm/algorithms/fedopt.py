"""Server optimizers applied to the averaged client delta (the FedOpt family).

The server treats the weighted mean of client deltas ``Δ = mean_i(y_i - x)``
as a negative pseudo-gradient and takes one optimizer step per round:

* :class:`ServerSGD` — ``x ← x + η Δ``; with ``η = 1`` this is FedAvg
  (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
  from Decentralized Data").
* :class:`ServerAvgM` — FedAvgM (Hsu, Qi & Brown 2019, "Measuring the Effects
  of Non-Identical Data Distribution for Federated Visual Classification"):
  ``v ← β v + Δ``, ``x ← x + η v``.
* :class:`ServerNesterov` — DiLoCo's outer optimizer (Douillard et al. 2023,
  "DiLoCo: Distributed Low-Communication Training of Language Models"):
  Nesterov momentum on the pseudo-gradient ``-Δ``, ``v ← μ v + Δ``,
  ``x ← x + η (Δ + μ v)``, i.e. ``torch.optim.SGD(nesterov=True)``.
* :class:`ServerAdagrad`, :class:`ServerAdam`, :class:`ServerYogi` — FedAdagrad,
  FedAdam, FedYogi exactly as in Algorithm 2 of Reddi et al. 2021, "Adaptive
  Federated Optimization" (ICLR), without bias correction::

      m ← β1 m + (1 - β1) Δ
      v ← v + Δ²                                  (FedAdagrad)
      v ← β2 v + (1 - β2) Δ²                      (FedAdam)
      v ← v - (1 - β2) Δ² sign(v - Δ²)            (FedYogi)
      x ← x + η m / (√v + τ)

  Initial moments: ``m₀ = 0`` and ``v₀ = τ²`` — Algorithm 2 only requires
  ``v₋₁ ≥ τ²``; we take the smallest allowed value, so the first step is
  ``η (1-β1) Δ / (√(τ² + ...) + τ)`` and never divides by ~0.

The options each reads from the ``algorithm:`` config section are declared
here (:class:`MomentumOptions`, :class:`DiLoCoOptions`,
:class:`AdaptiveOptions`); :mod:`fedfm.algorithms.fedavg` registers every
one as an algorithm (FedAvg's client and fold with this server optimizer).

Optimizer state is created lazily per tensor name on the first step and kept
across rounds (the optimizer object lives as long as the algorithm). All math
runs in the dtype of the tensors handed to :meth:`ServerOptimizer.step`; the
fold passes float32 (float64 for float64 states) so bf16/fp16 global states
keep full-precision moments.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
from pydantic import Field

from fedfm.algorithms.base import AlgorithmOptions


class MomentumOptions(AlgorithmOptions):
    momentum: float = Field(0.9, ge=0, lt=1)  # FedAvgM's beta; DiLoCo's Nesterov mu


class DiLoCoOptions(MomentumOptions):
    server_lr: float = Field(0.7, gt=0)  # DiLoCo's outer learning rate (Douillard et al. 2023) unless set


class AdaptiveOptions(AlgorithmOptions):
    """FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021): moments and adaptivity."""

    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # adaptivity (epsilon)


class ServerOptimizer:
    """One server step per round: ``step(x, delta) -> new x`` (all named tensors).

    ``x`` and ``delta`` are not modified; the returned tensors are new.
    Subclasses keep per-name state in ``self.state`` (a dict of dicts).
    """

    def __init__(self, lr: float = 1.0) -> None:
        if lr <= 0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def step(
        self, x: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
    ) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict()
        for k, xk in x.items():
            d = delta[k]
            if d.shape != xk.shape:
                raise ValueError(f"delta {k!r} has shape {tuple(d.shape)}, state has {tuple(xk.shape)}")
            out[k] = xk + self.direction(k, d.to(xk.dtype))
        return out

    def direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """The additive change for one tensor (already scaled by the lr)."""
        raise NotImplementedError

    def _slot(self, name: str, like: torch.Tensor, **init: float) -> dict[str, torch.Tensor]:
        """Per-name state, created filled with ``init`` values on first use."""
        slot = self.state.get(name)
        if slot is not None:
            first = next(iter(slot.values()))
            if first.shape != like.shape:
                raise ValueError(
                    f"server optimizer state for {name!r} has shape {tuple(first.shape)}, "
                    f"the new delta has {tuple(like.shape)}"
                )
            return slot
        slot = {key: torch.full_like(like, value) for key, value in init.items()}
        self.state[name] = slot
        return slot


class ServerSGD(ServerOptimizer):
    """``x ← x + η Δ`` (FedAvg when ``η = 1``). Stateless."""

    def direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        return delta * self.lr


class ServerAvgM(ServerOptimizer):
    """FedAvgM (Hsu et al. 2019): ``v ← β v + Δ``; ``x ← x + η v``; ``v₀ = 0``."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        v = self._slot(name, delta, v=0.0)["v"]
        v.mul_(self.momentum).add_(delta)
        return v * self.lr


class ServerNesterov(ServerAvgM):
    """DiLoCo's outer optimizer: Nesterov momentum on the pseudo-gradient ``g = -Δ``.

    Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
    Language Models" (Algorithm 1): every worker runs ``H`` inner AdamW steps
    from the global model, the server averages the outer gradients
    ``θ - θ_i = -Δ`` and applies Nesterov momentum (their defaults:
    ``η = 0.7``, ``μ = 0.9``). Implemented exactly as
    ``torch.optim.SGD(lr=η, momentum=μ, dampening=0, nesterov=True)`` stepping
    on ``grad = -Δ``, rewritten in terms of ``Δ`` (``v = -buf``)::

        v ← μ v + Δ                 (v₀ = 0, so v₁ = Δ: torch's first buf = grad)
        x ← x + η (Δ + μ v)

    With ``μ = 0`` this is :class:`ServerSGD`.
    """

    def __init__(self, lr: float = 0.7, momentum: float = 0.9) -> None:
        super().__init__(lr, momentum)

    def direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        v = super().direction(name, delta) / self.lr  # the heavy-ball buffer, updated
        return (delta + self.momentum * v) * self.lr


class _Adaptive(ServerOptimizer):
    """Shared part of Reddi et al. 2021, Algorithm 2 (``m₀ = 0``, ``v₀ = τ²``)."""

    def __init__(self, lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(lr)
        for label, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= b < 1:
                raise ValueError(f"{label} must be in [0, 1), got {b}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def second_moment_(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        raise NotImplementedError

    def direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        slot = self._slot(name, delta, m=0.0, v=self.tau**2)
        m, v = slot["m"], slot["v"]
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        self.second_moment_(v, delta * delta)
        return m * self.lr / (v.sqrt() + self.tau)


class ServerAdagrad(_Adaptive):
    """FedAdagrad: ``v ← v + Δ²`` (``beta2`` unused)."""

    def second_moment_(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.add_(d2)


class ServerAdam(_Adaptive):
    """FedAdam: ``v ← β2 v + (1 - β2) Δ²``."""

    def second_moment_(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(d2, alpha=1 - self.beta2)


class ServerYogi(_Adaptive):
    """FedYogi: ``v ← v - (1 - β2) Δ² sign(v - Δ²)``."""

    def second_moment_(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.sub_(d2 * torch.sign(v - d2), alpha=1 - self.beta2)
