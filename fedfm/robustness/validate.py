"""Validation of every incoming update before it reaches a fold.

An update is rejected (and the round goes on without it) when its tensor
names, shapes or dtypes differ from the global trainable state, when it holds
NaN or Inf, or when it claims a negative example count.
"""

from __future__ import annotations

from typing import Mapping

import torch

from fedfm.algorithms.base import Update


def update_problem(update: Update, template: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``update`` must be rejected, or None when it is well-formed."""
    if update.num_examples < 0:
        return f"negative example count {update.num_examples}"
    keys, expected = set(update.delta), set(template)
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        return f"tensor names differ from the global state (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref in template.items():
        t = update.delta[name]
        if t.shape != ref.shape:
            return f"{name}: shape {tuple(t.shape)} != {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{name}: dtype {t.dtype} != {ref.dtype}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name}: holds NaN or Inf"
    for extra_name, tensors in update.extras.items():
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"extras/{extra_name}/{name}: holds NaN or Inf"
    return None
