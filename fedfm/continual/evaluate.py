"""Scoring a continual run: every seen task on its own held-out test rows.

A shared model scores all seen tasks in one pass; with per-task adapters each
task is scored with its own trainable state (the task id is known at test
time). The per-task score is accuracy for classification and per-token
accuracy for causal LM (plus loss, and perplexity for causal LM).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from fedfm.eval.evaluate import score_examples
from fedfm.models.state import set_state_


def _summarize(loss_sum: float, targets: float, correct: float, n: int, task: str) -> dict:
    loss = loss_sum / targets if targets else float("nan")
    out = {"accuracy": correct / targets if targets else float("nan"), "loss": loss, "n": n,
           "_loss_sum": loss_sum, "_targets": targets, "_correct": correct}
    if task == "causal_lm":
        out["perplexity"] = math.exp(min(loss, 50.0))
    return out


def evaluate_tasks(
    fm,
    enc,
    test_rows: Sequence[np.ndarray],
    states: Sequence[Mapping[str, torch.Tensor]],
    batch_size: int,
) -> list[dict]:
    """One metrics dict per task ``j``: ``test_rows[j]`` scored with ``states[j]``.

    Tasks that share a state object (a shared model) are scored in one pass.
    Leaves ``fm`` holding the last state used.
    """
    if len(states) != len(test_rows):
        raise ValueError(f"{len(states)} states for {len(test_rows)} tasks")
    out: list[dict | None] = [None] * len(test_rows)
    groups: dict[int, list[int]] = {}
    for j, s in enumerate(states):
        groups.setdefault(id(s), []).append(j)
    for tasks in groups.values():
        set_state_(fm.params, states[tasks[0]])
        rows = np.concatenate([np.asarray(test_rows[j], dtype=np.int64) for j in tasks])
        scores = score_examples(fm, enc, rows, batch_size)
        start = 0
        for j in tasks:
            sel = slice(start, start + len(test_rows[j]))
            start = sel.stop
            out[j] = _summarize(float(scores.loss_sum[sel].sum()), float(scores.targets[sel].sum()),
                                float(scores.correct[sel].sum()), len(test_rows[j]), fm.task)
    return out


def pooled(per_task: Sequence[dict], task: str) -> dict:
    """``test_*`` metrics over the union of the tasks' test rows (targets-weighted)."""
    loss_sum = sum(m["_loss_sum"] for m in per_task)
    targets = sum(m["_targets"] for m in per_task)
    correct = sum(m["_correct"] for m in per_task)
    m = _summarize(loss_sum, targets, correct, sum(m["n"] for m in per_task), task)
    return {f"test_{k}": v for k, v in m.items() if not k.startswith("_") and k != "n"}


def public(m: dict) -> dict:
    """A task's metrics without the raw sums."""
    return {k: v for k, v in m.items() if not k.startswith("_")}
