"""Fairness across clients: the mean hides the clients a global model serves badly.

Reported as in the federated fairness literature (e.g. q-FFL, Li et al. 2020;
Ditto, Li et al. 2021): mean, the mean over the worst 10% of clients,
standard deviation (spread), minimum and maximum.
"""

from __future__ import annotations

import math

import numpy as np


def fairness_stats(values: np.ndarray, higher_is_better: bool = True) -> dict[str, float]:
    """Mean, worst-10% mean (at least one client), std, min and max of per-client values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no per-client values")
    k = max(1, math.ceil(0.1 * v.size))
    ordered = np.sort(v)
    worst = ordered[:k] if higher_is_better else ordered[-k:]
    return {
        "mean": float(v.mean()),
        "worst10": float(worst.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
    }
