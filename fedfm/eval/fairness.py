"""Fairness across clients: the mean hides the clients a global model serves badly.

Reported as in the federated fairness literature (e.g. q-FFL, Li et al. 2020;
Ditto, Li et al. 2021): mean, median, the mean over the worst 10% of clients,
standard deviation (spread), minimum and maximum.

A client with one or two local test rows has an accuracy of 0, 0.5 or 1 by
chance alone; natural (per-user) splits produce many of them, and they would
drag the worst-10% and min to 0. :func:`client_stats` therefore leaves out
clients with fewer than ``min_test`` local test rows (``eval.min_client_test_examples``)
and reports how many it left out.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np


def fairness_stats(values: np.ndarray, higher_is_better: bool = True) -> dict[str, float]:
    """Mean, median, worst-10% mean (at least one client), std, min and max of per-client values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no per-client values")
    k = max(1, math.ceil(0.1 * v.size))
    ordered = np.sort(v)
    worst = ordered[:k] if higher_is_better else ordered[-k:]
    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "worst10": float(worst.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def client_stats(values: Mapping, test_sizes: Mapping, min_test: int, higher_is_better: bool = True) -> dict:
    """:func:`fairness_stats` over the clients with at least ``min_test`` local test rows.

    ``values`` and ``test_sizes`` map a client id to its metric and its number
    of local test rows. Returns the statistics (none when no client qualifies)
    plus ``counted`` (clients in them) and ``too_small`` (clients with test
    rows, but fewer than ``min_test``).
    """
    kept = [values[c] for c in values if test_sizes[c] >= min_test]
    out: dict = fairness_stats(np.array(kept), higher_is_better) if kept else {}
    out["counted"] = len(kept)
    out["too_small"] = len(values) - len(kept)
    return out
