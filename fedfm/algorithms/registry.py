"""One registry from ``algorithm.name`` in the run config to an implementation.

Every algorithm is a client hook plus :class:`~fedfm.algorithms.fedavg.MeanDeltaFold`
(or its SCAFFOLD extension) composed with a
:class:`~fedfm.algorithms.fedopt.ServerOptimizer`, so FedAvgM/FedAdam/FedYogi/
FedAdagrad/DiLoCo are FedAvg with another server optimizer, not separate classes.
"""

from __future__ import annotations

from typing import Callable

from fedfm.algorithms.base import Algorithm
from fedfm.algorithms.fedavg import FedAvg
from fedfm.algorithms.fedopt import (
    ServerAdagrad,
    ServerAdam,
    ServerAvgM,
    ServerNesterov,
    ServerOptimizer,
    ServerSGD,
    ServerYogi,
)
from fedfm.algorithms.fedprox import FedProx
from fedfm.algorithms.scaffold import Scaffold
from fedfm.errors import FedfmError

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "diloco")

# name -> server optimizer factory, for the algorithms that are FedAvg + a server optimizer
_SERVER_OPTS: dict[str, Callable[..., ServerOptimizer]] = {
    "fedavg": lambda c: ServerSGD(c.server_lr),
    "fedavgm": lambda c: ServerAvgM(c.server_lr, c.momentum),
    "diloco": lambda c: ServerNesterov(c.server_lr, c.momentum),  # Douillard et al. 2023
    "fedadam": lambda c: ServerAdam(c.server_lr, c.beta1, c.beta2, c.tau),
    "fedyogi": lambda c: ServerYogi(c.server_lr, c.beta1, c.beta2, c.tau),
    "fedadagrad": lambda c: ServerAdagrad(c.server_lr, c.beta1, c.beta2, c.tau),
}


def build_algorithm(cfg, num_clients: int) -> Algorithm:
    """The algorithm named by ``cfg.name`` (an ``AlgorithmConfig``); ``num_clients`` is N (SCAFFOLD)."""
    name = cfg.name
    if name == "fedprox":
        return FedProx(mu=cfg.mu, weighting=cfg.weighting, server_opt=ServerSGD(cfg.server_lr))
    if name == "scaffold":
        return Scaffold(num_clients, weighting=cfg.weighting, server_opt=ServerSGD(cfg.server_lr))
    if name in _SERVER_OPTS:
        return FedAvg(weighting=cfg.weighting, server_opt=_SERVER_OPTS[name](cfg), name=name)
    raise FedfmError(f"unknown algorithm {name!r}; valid names: {', '.join(ALGORITHMS)}")
