"""Backdoor success rate of the global model (Bagdasaryan et al. 2020).

The triggered test rows are built once at set-up
(:func:`fedfm.robustness.poison.prepare_poisoning`): every global test example
whose true label is not the target, with the trigger inserted and the
*target* as its label. The success rate — the fraction of them the model
classifies as the target — is then just the accuracy on those rows, scored in
the same length-sorted batches as any evaluation.
"""

from __future__ import annotations

import numpy as np

from fedfm.data.encode import Encoded
from fedfm.eval.evaluate import score_examples


def backdoor_success(fm, enc: Encoded, backdoor_rows: np.ndarray, batch_size: int) -> float:
    """Fraction of ``backdoor_rows`` (triggered, labelled with the target) predicted as the target.

    NaN when there are no such rows (every test example already has the target label).
    """
    rows = np.asarray(backdoor_rows, dtype=np.int64)
    if len(rows) == 0:
        return float("nan")
    return float(score_examples(fm, enc, rows, batch_size).correct.mean())
