"""Ordered maps of named tensors stored flat under a prefix (``group/name``), with their key order in JSON.

How checkpoints and state blobs keep several tensor maps in one safetensors file.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch

from fedfm.errors import FedfmError


def put_group(tensors: dict, orders: dict, group: str, state: Mapping[str, torch.Tensor]) -> None:
    """Store the ordered tensor map ``state`` under ``group`` (its key order in ``orders``)."""
    orders[group] = list(state.keys())
    for k, t in state.items():
        tensors[f"{group}/{k}"] = t.detach().to("cpu").contiguous().clone()


def get_group(tensors: Mapping[str, torch.Tensor], orders: dict, group: str) -> "OrderedDict[str, torch.Tensor]":
    try:
        return OrderedDict((k, tensors[f"{group}/{k}"]) for k in orders[group])
    except KeyError as err:
        raise FedfmError(f"checkpoint is missing tensor group {group!r} ({err})") from None
