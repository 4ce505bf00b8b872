"""The majority-class (prior) baseline: what accuracy means on this data.

A classifier that ignores its input and always answers the most frequent
training label scores the share of that label in a test set. On skewed data
(a chat corpus where most messages carry one label) this can be high, so an
accuracy is only read against it -- the "ZeroR" / majority-class baseline of
the classification literature (e.g. Witten & Frank, *Data Mining*, ch. 4.1).
"""

from __future__ import annotations

import numpy as np


def majority_label(labels: np.ndarray, train_rows: np.ndarray) -> int | None:
    """The most frequent label among ``train_rows`` (ties: the smallest id); None without rows."""
    rows = np.asarray(train_rows, dtype=np.int64)
    if rows.size == 0:
        return None
    return int(np.argmax(np.bincount(np.asarray(labels, dtype=np.int64)[rows])))


def prior_accuracy(labels: np.ndarray, test_rows: np.ndarray, label: int) -> float | None:
    """Accuracy of always predicting ``label`` on ``test_rows`` (None when there are none)."""
    rows = np.asarray(test_rows, dtype=np.int64)
    if rows.size == 0:
        return None
    return float(np.mean(np.asarray(labels, dtype=np.int64)[rows] == label))
