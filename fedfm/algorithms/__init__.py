"""Federated algorithms: client hooks and server folds (see base.py for the seam)."""

from fedfm.algorithms.base import (
    Algorithm,
    Broadcast,
    ClientHook,
    RunningWeightedMean,
    ServerFold,
    Update,
)
from fedfm.algorithms.fedavg import FedAvg, MeanDeltaFold
from fedfm.algorithms.fedopt import (
    ServerAdagrad,
    ServerAdam,
    ServerAvgM,
    ServerOptimizer,
    ServerSGD,
    ServerYogi,
)
from fedfm.algorithms.fedprox import FedProx, FedProxHook
from fedfm.algorithms.registry import ALGORITHMS, build_algorithm
from fedfm.algorithms.scaffold import Scaffold, ScaffoldFold, ScaffoldHook

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Broadcast",
    "ClientHook",
    "FedAvg",
    "FedProx",
    "FedProxHook",
    "MeanDeltaFold",
    "RunningWeightedMean",
    "Scaffold",
    "ScaffoldFold",
    "ScaffoldHook",
    "ServerAdagrad",
    "ServerAdam",
    "ServerAvgM",
    "ServerFold",
    "ServerOptimizer",
    "ServerSGD",
    "ServerYogi",
    "Update",
    "build_algorithm",
]
