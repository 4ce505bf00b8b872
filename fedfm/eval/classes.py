"""Per-class precision, recall, F1 and support of a classifier's predictions.

The standard definitions (e.g. Manning, Raghavan & Schütze 2008, ch. 8): for
class c, precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their
harmonic mean, support the number of true rows of c. A ratio whose
denominator is 0 is reported as 0 (as scikit-learn's ``zero_division=0``).
The macro average is the unweighted mean over the classes that occur in the
data or the predictions.
"""

from __future__ import annotations

import numpy as np


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def per_class(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    """``{"classes": [{label, precision, recall, f1, support}, ...], "macro": {precision, recall, f1}}``.

    ``y_true`` and ``y_pred`` hold class ids into ``names``; every class is
    listed, in id order.
    """
    k = len(names)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(float)
    support = confusion.sum(axis=1).astype(float)
    predicted = confusion.sum(axis=0).astype(float)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    classes = [
        {"label": names[c], "precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
         "support": int(support[c])}
        for c in range(k)
    ]
    seen = (support + predicted) > 0
    macro = {m: float(v[seen].mean()) if seen.any() else 0.0
             for m, v in (("precision", precision), ("recall", recall), ("f1", f1))}
    return {"classes": classes, "macro": macro}
