"""Run outputs: metrics.jsonl (one line per round), summary.json and a PNG plot.

Both files are strict JSON: a non-finite float (a round that folded nothing
has a NaN training loss) is written as ``null``, never as the bare ``NaN`` or
``Infinity`` that strict readers reject. Readers take ``null`` for "no value".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (also in dicts, lists and numpy scalars) replaced by None."""
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _number(value: Any) -> float | None:
    """``json.dumps``'s fallback for other numbers (tensors, decimals): a finite float or None."""
    x = float(value)
    return x if math.isfinite(x) else None


def dumps(data: Any, **kwargs) -> str:
    """Strict JSON text of ``data`` (non-finite floats as ``null``)."""
    return json.dumps(strict(data), allow_nan=False, default=_number, **kwargs)


def value_or_nan(record: dict, key: str) -> float:
    """``record[key]`` as a float: NaN when missing or ``null``."""
    value = record.get(key)
    return math.nan if value is None else float(value)


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl`` (flushed each line).

    ``kept``: the records a resumed run keeps (written first, not tracked again);
    ``tracker``: an optional experiment tracker (:mod:`fedfm.eval.tracking`) that
    gets every record written after them, and is closed with the log.
    """

    def __init__(self, path: Path | None, kept=(), tracker=None) -> None:
        self.path = path
        self.records: list[dict] = []
        # a run folder holds one run; None keeps the records in memory only (a simulation worker)
        self._fh = open(path, "w", encoding="utf-8") if path is not None else None
        for record in kept:  # metrics.jsonl truncated to the checkpoint's round
            self._append(record)
        self.tracker = tracker

    def _append(self, record: dict) -> None:
        self.records.append(record)
        if self._fh is not None:
            self._fh.write(dumps(record) + "\n")
            self._fh.flush()

    def write(self, record: dict) -> None:
        self._append(record)
        if self.tracker is not None:
            self.tracker.log_round(strict(record))  # the numbers metrics.jsonl holds (non-finite: none)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self.tracker is not None:
            self.tracker.close()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(data, indent=2) + "\n")
    tmp.replace(path)


def plot_metrics(records: list[dict], path: Path, task: str) -> None:
    """Quality per round (global and client fairness band) and cumulative bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "perplexity" if task == "causal_lm" else "accuracy"
    evals = [r for r in records if f"test_{key}" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if evals:
        rounds = [r["round"] for r in evals]
        ax.plot(rounds, [value_or_nan(r, f"test_{key}") for r in evals], "o-", label=f"global test {key}")
        if f"client_{key}_mean" in evals[0]:
            ax.plot(rounds, [value_or_nan(r, f"client_{key}_mean") for r in evals], "s--", label="client mean")
            ax.plot(rounds, [value_or_nan(r, f"client_{key}_worst10") for r in evals], "v:", label="client worst 10%")
        if f"client_{key}_median" in evals[0]:
            ax.plot(rounds, [value_or_nan(r, f"client_{key}_median") for r in evals], "d-.", label="client median")
        if "test_prior_accuracy" in evals[-1]:  # always the most frequent training label (fedfm.eval.baseline)
            ax.axhline(evals[-1]["test_prior_accuracy"], color="grey", linestyle="--", linewidth=1,
                       label=f"majority-class baseline ({evals[-1]['test_prior_accuracy']:.3f})")
        if key == "perplexity":
            ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel(key)
    ax.set_title(key)
    ax.legend(fontsize=8)
    ax = axes[1]
    train = [r for r in records if r.get("round", 0) > 0 and not math.isnan(value_or_nan(r, "train_loss"))]
    ax.plot([r["round"] for r in train], [r["train_loss"] for r in train], ".-", label="train loss (cohort)")
    if evals:
        ax.plot([r["round"] for r in evals], [value_or_nan(r, "test_loss") for r in evals], "o-", label="test loss")
    ax.set_xlabel("round")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot([r["round"] for r in records], [(r.get("bytes_up_total") or 0) / 1e6 for r in records], label="up (MB)")
    ax.plot([r["round"] for r in records], [(r.get("bytes_down_total") or 0) / 1e6 for r in records], label="down (MB)")
    ax.set_xlabel("round")
    ax.set_title("cumulative bytes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
