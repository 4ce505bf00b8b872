"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys).

Each client minimises ``F_i(w) + (μ/2) ||w - w_g||²``. The proximal term's
gradient ``μ (w - w_g)`` is added to every trainable parameter's gradient
after each backward pass, so any local optimizer sees the proximal objective.
The server side is FedAvg's fold (optionally with a FedOpt server optimizer).
"""

from __future__ import annotations

from typing import Mapping

import torch
from pydantic import Field

from fedfm.algorithms.base import Algorithm, AlgorithmOptions, Broadcast, ClientHook
from fedfm.algorithms.fedavg import FEDAVG_CAPABILITIES, MeanDeltaFold, Weighting
from fedfm.algorithms.fedopt import ServerOptimizer, ServerSGD
from fedfm.registry import ALGORITHMS, PLAIN_CLIENT, SGD_SERVER_STEP


class FedProxHook(ClientHook):
    """Adds ``mu * (w - w_global)`` to each float parameter's gradient.

    Keeps its own detached copy of the global values (in each parameter's
    dtype and device, i.e. exactly the values local training started from),
    so it is safe even if the broadcast tensors alias live parameters.
    """

    def __init__(
        self,
        broadcast: Broadcast,
        params: Mapping[str, torch.nn.Parameter],
        client_state: dict,
        mu: float = 0.01,
    ) -> None:
        super().__init__(broadcast, params, client_state)
        self.mu = float(mu)
        self.anchor = {
            k: broadcast.state[k].detach().to(device=p.device, dtype=p.dtype, copy=True)
            for k, p in params.items()
            if p.is_floating_point()
        }

    @torch.no_grad()
    def on_gradients(self) -> None:
        if self.mu == 0:
            return
        for k, wg in self.anchor.items():
            p = self.params[k]
            prox = (p.detach() - wg).mul_(self.mu)
            if p.grad is None:  # the parameter got no data gradient: only the proximal term
                p.grad = prox
            else:
                p.grad.add_(prox)


class FedProx(Algorithm):
    """FedProx: proximal client hook + FedAvg server fold."""

    name = "fedprox"
    hook_class = FedProxHook

    def __init__(
        self,
        mu: float = 0.01,
        server_lr: float = 1.0,
        weighting: Weighting = "examples",
        server_opt: ServerOptimizer | None = None,
    ) -> None:
        if mu < 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        super().__init__(MeanDeltaFold(server_opt or ServerSGD(server_lr), weighting))
        self.mu = float(mu)

    def client_hook(self, broadcast, params, client_state) -> FedProxHook:
        return FedProxHook(broadcast, params, client_state, mu=self.mu)


class FedProxOptions(AlgorithmOptions):
    mu: float = Field(0.01, ge=0)  # proximal strength


@ALGORITHMS.register("fedprox", config=FedProxOptions, capabilities=(FEDAVG_CAPABILITIES - {PLAIN_CLIENT}) | {SGD_SERVER_STEP},
                     summary="FedProx (Li et al. 2020): proximal term on the client, FedAvg's fold")
def _fedprox(cfg, num_clients: int) -> FedProx:
    return FedProx(mu=cfg.mu, weighting=cfg.weighting, server_opt=ServerSGD(cfg.server_lr))
