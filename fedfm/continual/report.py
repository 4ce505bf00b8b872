"""The continual run's plot: the accuracy matrix, each task's accuracy over stages, and the training loss."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence


def plot_continual(records: list[dict], R: Sequence[Sequence[float | None]], names: list[str], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    T = len(R)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    grid = np.full((T, len(names)), np.nan)
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            if v is not None:
                grid[i, j] = v
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for i in range(T):
        for j in range(len(names)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(T), [f"after {i}" for i in range(T)], fontsize=8)
    ax.set_title(f"R[stage][task] ({metric})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[1]
    for j, name in enumerate(names[: len(R[-1])] if R else []):
        xs = [i for i in range(j, T)]
        ax.plot(xs, [R[i][j] for i in xs], "o-", label=name)
    ax.set_xticks(range(T))
    ax.set_xlabel("after stage")
    ax.set_ylabel(metric)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{metric} per task")
    ax.legend(fontsize=8)
    ax = axes[2]
    train = [r for r in records if r.get("train_loss") is not None and not math.isnan(r["train_loss"])]  # null: none
    ax.plot([r["round"] for r in train], [r["train_loss"] for r in train], ".-", label="train loss (cohort)")
    for r in records:
        if r.get("stage_end"):
            ax.axvline(r["round"] + 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("round (dotted: end of a stage)")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
