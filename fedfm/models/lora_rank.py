"""Heterogeneous LoRA ranks across clients, aggregated by zero-padding (HetLoRA).

Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models" (EMNLP): the server keeps a global adapter of the largest
rank ``r``; a client of rank ``r_i <= r`` trains the first ``r_i`` components
(rows of ``lora_A``, columns of ``lora_B``) and uploads only those; the server
zero-pads every update back to rank ``r`` before the usual fold, so a
component is moved only by the clients that hold it.

This module holds the tensor arithmetic (slice, zero, pad); the client's
training is :mod:`fedfm.client.hetlora`, the padding happens in the server.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch


def rank_axis(name: str) -> int | None:
    """The rank dimension of a LoRA tensor (0 for ``lora_A``, 1 for ``lora_B``), None for other tensors."""
    if ".lora_A." in name or name.endswith("lora_A.weight"):
        return 0
    if ".lora_B." in name or name.endswith("lora_B.weight"):
        return 1
    return None


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> "OrderedDict[str, torch.Tensor]":
    """The rank-``rank`` slices of every LoRA tensor (other tensors as they are); what a client uploads."""
    out = OrderedDict()
    for k, v in state.items():
        axis = rank_axis(k)
        out[k] = v if axis is None else v.narrow(axis, 0, rank).contiguous()
    return out


def zero_beyond(state: Mapping[str, torch.Tensor], rank: int) -> "OrderedDict[str, torch.Tensor]":
    """``state`` with the LoRA components past ``rank`` set to zero (a copy; the input is untouched)."""
    out = OrderedDict()
    for k, v in state.items():
        axis = rank_axis(k)
        if axis is None:
            out[k] = v
        else:
            t = v.clone()
            t.narrow(axis, rank, v.shape[axis] - rank).zero_()
            out[k] = t
    return out


def pad(delta: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor], rank: int) -> "OrderedDict[str, torch.Tensor]":
    """Zero-pad a rank-``rank`` update to the global shapes (HetLoRA); raises ValueError on a wrong shape."""
    out = OrderedDict()
    for k, v in delta.items():
        axis, ref = rank_axis(k), template.get(k)
        if axis is None or ref is None:
            out[k] = v
            continue
        want = list(ref.shape)
        want[axis] = rank
        if list(v.shape) != want:
            raise ValueError(f"{k}: shape {tuple(v.shape)} != {tuple(want)} for a client of LoRA rank {rank}")
        full = torch.zeros(ref.shape, dtype=v.dtype)
        full.narrow(axis, 0, rank).copy_(v)
        out[k] = full
    return out
