"""The client side of heterogeneous LoRA ranks (HetLoRA, Cho et al. 2024, EMNLP).

A client of rank ``r_i`` below the global rank ``r`` trains on the one shared
model of rank ``r``: the components it does not hold are zeroed in its copy of
the broadcast and their gradients are masked, so it trains exactly the
rank-``r_i`` adapter ``B[:, :r_i] A[:r_i]`` (peft's scaling ``alpha / r`` is the
same for all), and it uploads only its rank (:mod:`fedfm.models.lora_rank`);
the server pads it back.
"""

from __future__ import annotations

from typing import Callable

import torch

from fedfm.algorithms.base import Broadcast, Update
from fedfm.models.lora_rank import rank_axis, truncate, zero_beyond


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
