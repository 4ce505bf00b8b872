"""Continual-learning metrics on the accuracy matrix ``R``.

``R[i][j]`` is the accuracy on task ``j``'s held-out test data after training
stage ``i`` (``j <= i``; entries for unseen tasks are ``None``). With ``i`` the
latest stage:

* average accuracy ``A_i = mean_{j<=i} R[i][j]``;
* forgetting (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning:
  Understanding Forgetting and Intransigence", ECCV):
  ``F_i = mean_{j<i} ( max_{l<i} R[l][j] - R[i][j] )`` -- the best accuracy a
  task ever had before now, minus its accuracy now; **positive = forgotten**;
* backward transfer (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for
  Continual Learning", NeurIPS): ``BWT_i = mean_{j<i} ( R[i][j] - R[j][j] )``
  -- **negative = forgotten**, positive = later stages helped old tasks.

Both are undefined (``None``) after the first stage. Higher ``R`` must be
better: for causal LM the matrix holds per-token accuracy (perplexity is
reported beside it), so the signs above hold for every task type.
"""

from __future__ import annotations

from typing import Sequence

Matrix = Sequence[Sequence[float | None]]


def _row(R: Matrix, i: int) -> list[float]:
    row = [R[i][j] for j in range(i + 1)]
    if any(v is None for v in row):
        raise ValueError(f"accuracy matrix row {i} misses a seen task: {row}")
    return [float(v) for v in row]


def average_accuracy(R: Matrix, i: int | None = None) -> float:
    """Mean accuracy over the tasks seen up to stage ``i`` (default: the last row)."""
    i = len(R) - 1 if i is None else i
    row = _row(R, i)
    return sum(row) / len(row)


def forgetting(R: Matrix, i: int | None = None) -> float | None:
    """Chaudhry et al. 2018: mean over old tasks of (best earlier accuracy - accuracy after stage ``i``)."""
    i = len(R) - 1 if i is None else i
    if i < 1:
        return None
    now = _row(R, i)
    drops = [max(float(R[l][j]) for l in range(j, i)) - now[j] for j in range(i)]
    return sum(drops) / len(drops)


def backward_transfer(R: Matrix, i: int | None = None) -> float | None:
    """Lopez-Paz & Ranzato 2017: mean over old tasks of (accuracy after stage ``i`` - accuracy just after learning it)."""
    i = len(R) - 1 if i is None else i
    if i < 1:
        return None
    now = _row(R, i)
    return sum(now[j] - float(R[j][j]) for j in range(i)) / i


def stage_metrics(R: Matrix) -> dict:
    """The metrics after the latest stage (the last row of ``R``)."""
    i = len(R) - 1
    return {
        "average_accuracy": average_accuracy(R, i),
        "forgetting": forgetting(R, i),
        "backward_transfer": backward_transfer(R, i),
        "current_task_accuracy": float(R[i][i]),
    }
