"""Heterogeneous LoRA ranks across clients, aggregated by zero-padding (HetLoRA).

Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models" (EMNLP): the server keeps a global adapter of the largest
rank ``r``; a client of rank ``r_i <= r`` trains the first ``r_i`` components
(rows of ``lora_A``, columns of ``lora_B``) and uploads only those; the server
zero-pads every update back to rank ``r`` before the usual fold, so a
component is moved only by the clients that hold it.

The client side runs on the one shared model of rank ``r``: the components a
client does not hold are zeroed in its copy of the broadcast and their
gradients are masked, so it trains exactly the rank-``r_i`` adapter
``B[:, :r_i] A[:r_i]`` (peft's scaling ``alpha / r`` is the same for all).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping

import torch

from fedfm.algorithms.base import Broadcast, Update


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


class HetRankTrainer:
    """Wraps a local trainer so that every client trains only its own LoRA rank.

    ``rank_of(cid)`` gives a client's rank (None or the full rank: untouched).
    Attributes other than ``local_update`` are the wrapped trainer's.
    """

    def __init__(self, inner, rank_of: Callable[[int], int | None], full_rank: int) -> None:
        self.inner = inner
        self.rank_of = rank_of
        self.full_rank = full_rank

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def local_update(self, algo, broadcast: Broadcast, client, round_idx: int) -> Update | None:
        rank = self.rank_of(client.cid)
        if rank is None or rank >= self.full_rank:
            return self.inner.local_update(algo, broadcast, client, round_idx)
        mine = Broadcast(state=zero_beyond(broadcast.state, rank), version=broadcast.version, extras=broadcast.extras)
        handles = []
        for name, p in self.inner.fm.params.items():
            axis = rank_axis(name)
            if axis is not None:
                mask = torch.zeros_like(p)
                mask.narrow(axis, 0, rank).fill_(1)
                handles.append(p.register_hook(lambda g, m=mask: g * m))
        try:
            update = self.inner.local_update(algo, mine, client, round_idx)
        finally:
            for h in handles:
                h.remove()
        if update is not None:
            update.delta = truncate(update.delta, rank)
        return update
