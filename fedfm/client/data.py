"""A client's own data and private state: what never leaves it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedfm.data.quality import QualityReport


@dataclass
class Client:
    """One client: its shard (indices into the encoded table) and its private state.

    ``state`` persists across rounds and is never sent (SCAFFOLD's ``c_i``,
    error-feedback residuals, personal tensors, DP-SGD bookkeeping).
    ``quality`` holds the counts of the client's own data-quality filters
    (``data.quality``; ``train_idx`` is then what they kept), None when off:
    only these counts are reported, in every update's metrics.
    """

    cid: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    state: dict = field(default_factory=dict)
    quality: QualityReport | None = None
