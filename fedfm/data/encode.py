"""Tokenize a dataset once, then cut batches from the token tensors.

Simulation never re-tokenizes: every client's shard is an index array into
one :class:`Encoded` table, and a batch is trimmed to its longest row so that
short texts do not pay for the padding of long ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [N, L] int64, right-padded
    attention_mask: torch.Tensor  # [N, L] int64
    lengths: torch.Tensor  # [N] number of real tokens per row
    labels: torch.Tensor | None  # [N] class ids for classification, None for causal LM

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode(
    texts: Sequence[str],
    tokenizer,
    max_length: int,
    labels: np.ndarray | None = None,
) -> Encoded:
    """Tokenize every text once (truncated to ``max_length``, right padding)."""
    tokenizer.padding_side = "right"
    out = tokenizer(
        list(texts),
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    mask = out["attention_mask"].to(torch.int64)
    return Encoded(
        input_ids=out["input_ids"].to(torch.int64),
        attention_mask=mask,
        lengths=mask.sum(dim=1),
        labels=None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64),
    )


def concat(*parts: Encoded) -> Encoded:
    """The rows of ``parts`` stacked in order (every table is padded to the same ``max_length``).

    Used once at set-up to append rows that are not in the dataset (poisoned
    or triggered copies), so simulation still never re-tokenizes.
    """
    widths = {int(p.input_ids.shape[1]) for p in parts}
    if len(widths) != 1:
        raise ValueError(f"cannot stack encoded tables of widths {sorted(widths)}")
    has_labels = {p.labels is not None for p in parts}
    if len(has_labels) != 1:
        raise ValueError("cannot stack labelled and unlabelled encoded tables")
    return Encoded(
        input_ids=torch.cat([p.input_ids for p in parts]),
        attention_mask=torch.cat([p.attention_mask for p in parts]),
        lengths=torch.cat([p.lengths for p in parts]),
        labels=torch.cat([p.labels for p in parts]) if parts[0].labels is not None else None,
    )


def make_batch(enc: Encoded, idx: torch.Tensor, task: str, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The model inputs for rows ``idx``, trimmed to the longest row among them.

    The table stays on the CPU; with a non-CPU ``device`` the batch is copied there.
    """
    width = int(enc.lengths[idx].max())
    input_ids = enc.input_ids[idx, :width]
    attention_mask = enc.attention_mask[idx, :width]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if task == "causal_lm":
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        batch["labels"] = enc.labels[idx]
    if device is not None and device.type != "cpu":
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def batch_indices(
    indices: np.ndarray | torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless stream of shuffled mini-batches: reshuffle after each pass (epoch)."""
    rows = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    n = len(rows)
    if n == 0:
        raise ValueError("a client with no training examples cannot train")
    while True:
        order = rows[torch.randperm(n, generator=generator)]
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def steps_for(num_examples: int, batch_size: int, local_steps: int | None, local_epochs: float | None) -> int:
    """Local steps a client takes: fixed steps, or epochs over its shard (at least one step)."""
    if local_steps is not None:
        return local_steps
    return max(1, int(np.ceil(local_epochs * num_examples / batch_size)))
