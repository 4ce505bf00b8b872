"""Reproducible seeds derived from the public run seed (simulation only).

Client sampling, local-training batch orders, codec rounding and simulated
faults all draw from generators seeded by :func:`derive_seed`, so the same
config gives the same run. Privacy noise must never come from here in a
deployment: the public seed would let anyone subtract it.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (run seed, round, client)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)
