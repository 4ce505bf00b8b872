"""The client side: ``local_update(broadcast, client) -> Update``.

One :class:`LocalTrainer` per process owns the single model instance and one
optimizer. For every client it copies the broadcast state into the trainable
parameters in place, clears the optimizer's state (a fresh optimizer, without
re-allocating one), runs the local steps with the algorithm's hook, and
returns the delta. The frozen base is never copied.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from fedfm.algorithms.base import Algorithm, Broadcast, Update
from fedfm.config.schema import TrainConfig
from fedfm.data.encode import Encoded, batch_indices, make_batch, steps_for
from fedfm.models.state import set_state_


@dataclass
class Client:
    """A simulated client: its shard (indices into the encoded table) and private state."""

    cid: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    state: dict = field(default_factory=dict)  # persists across rounds, never sent


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (run seed, round, client)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class LocalTrainer:
    """Runs local training for any client on the one shared model."""

    def __init__(self, fm, enc: Encoded, cfg: TrainConfig, seed: int) -> None:
        self.fm = fm
        self.enc = enc
        self.cfg = cfg
        self.seed = seed
        self.optimizer = make_optimizer(fm.params.values(), cfg)

    def local_update(self, algo: Algorithm, broadcast: Broadcast, client: Client, round_idx: int) -> Update:
        fm, cfg = self.fm, self.cfg
        set_state_(fm.params, broadcast.state)
        self.optimizer.state.clear()
        hook = algo.client_hook(broadcast, fm.params, client.state)
        seed = derive_seed(self.seed, round_idx, client.cid)
        torch.manual_seed(seed)  # dropout masks
        batches = batch_indices(client.train_idx, cfg.batch_size, torch.Generator().manual_seed(seed))
        steps = steps_for(len(client.train_idx), cfg.batch_size, cfg.local_steps, cfg.local_epochs)
        params = list(fm.params.values())
        fm.model.train()
        loss_sum = torch.zeros(())
        for _ in range(steps):
            batch = make_batch(self.enc, next(batches), fm.task)
            loss = fm.model(**batch).loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hook.on_gradients()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            self.optimizer.step()
            loss_sum += loss.detach()
        extras = hook.finish(steps, cfg.lr)
        with torch.no_grad():
            delta = OrderedDict((k, p.detach() - broadcast.state[k]) for k, p in fm.params.items())
        return Update(
            client_id=client.cid,
            delta=delta,
            num_examples=len(client.train_idx),
            metrics={"train_loss": float(loss_sum) / steps, "steps": float(steps)},
            extras=extras,
            base_version=broadcast.version,
        )
