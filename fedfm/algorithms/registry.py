"""Build the algorithm named by ``algorithm.name`` from the algorithm registry.

Every algorithm registers its own factory ``(cfg, num_clients) -> Algorithm``
next to its implementation (``@ALGORITHMS.register`` in its module, see
:mod:`fedfm.registry`); a new file in this package registers itself. FedAvgM/
FedAdam/FedYogi/FedAdagrad/DiLoCo are FedAvg with another server optimizer
(:mod:`fedfm.algorithms.fedavg`), not separate classes.
"""

from __future__ import annotations

from fedfm.algorithms.base import Algorithm
from fedfm.registry import ALGORITHMS, Entry

__all__ = ["ALGORITHMS", "algorithm_entry", "build_algorithm"]


def algorithm_entry(name: str) -> Entry:
    """The registry entry of algorithm ``name`` (its options class and capabilities); FedfmError if unknown."""
    return ALGORITHMS.get(name)


def build_algorithm(cfg, num_clients: int) -> Algorithm:
    """The algorithm named by ``cfg.name`` (an ``AlgorithmConfig``); ``num_clients`` is N (SCAFFOLD).

    The algorithm carries its entry's capabilities (``algorithm.supports(SECURE_SUM)``).
    """
    entry = ALGORITHMS.get(cfg.name)
    algorithm = entry.obj(cfg, num_clients)
    algorithm.capabilities = entry.capabilities
    return algorithm
