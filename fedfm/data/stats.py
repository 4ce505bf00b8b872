"""How a partition looks: client sizes and label skew (JSON-friendly)."""

from __future__ import annotations

import numpy as np


def partition_stats(parts: list[np.ndarray], labels: np.ndarray | None, num_classes: int | None,
                    groups: list[list[str]] | None = None) -> dict:
    """Sizes of every client and, given labels, their label histograms and skew.

    ``groups``: a natural partition's group values (user ids, role names) of
    every client; kept as ``client_groups`` (client index as a string -> its
    sorted group values), so results per client can be read per user.

    ``label_skew_tv`` is the mean over non-empty clients of the total-variation
    distance ``0.5 * sum_c |p_client(c) - p_global(c)|`` between a client's
    label distribution and the distribution over all partitioned examples:
    0 for a perfectly iid split, close to 1 when each client holds a single
    class of many.
    """
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    stats: dict = {
        "num_clients": len(parts),
        "num_examples": int(sizes.sum()),
        "sizes": sizes.tolist(),
        "size_min": int(sizes.min()) if len(sizes) else 0,
        "size_mean": float(sizes.mean()) if len(sizes) else 0.0,
        "size_max": int(sizes.max()) if len(sizes) else 0,
        "size_std": float(sizes.std()) if len(sizes) else 0.0,
    }
    if groups is not None:
        stats["client_groups"] = {str(c): sorted(str(g) for g in gs) for c, gs in enumerate(groups)}
    if labels is None:
        return stats
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    hist = np.array(
        [np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts],
        dtype=np.int64,
    ).reshape(len(parts), num_classes)
    total = hist.sum(axis=0)
    nonempty = sizes > 0
    if nonempty.any():
        global_dist = total / total.sum()
        client_dist = hist[nonempty] / sizes[nonempty, None]
        tv = 0.5 * np.abs(client_dist - global_dist).sum(axis=1)
        skew, classes = float(tv.mean()), float((hist[nonempty] > 0).sum(axis=1).mean())
    else:
        skew, classes = 0.0, 0.0
    stats.update(
        num_classes=int(num_classes),
        label_hist=hist.tolist(),
        label_skew_tv=skew,
        classes_per_client=classes,
    )
    return stats


def format_partition_stats(stats: dict) -> str:
    """A few human-readable lines summarising :func:`partition_stats`."""
    lines = [
        f"{stats['num_clients']} clients, {stats['num_examples']} examples",
        f"client sizes: min {stats['size_min']}, mean {stats['size_mean']:.1f}, "
        f"max {stats['size_max']}, std {stats['size_std']:.1f}",
    ]
    if "label_skew_tv" in stats:
        lines.append(
            f"label skew (mean TV distance to global): {stats['label_skew_tv']:.3f}; "
            f"classes per client: {stats['classes_per_client']:.1f} of {stats['num_classes']}"
        )
    return "\n".join(lines)
