"""Local training on the client: ``local_update(algorithm, broadcast, client, round) -> Update``.

One :class:`LocalTrainer` per process owns the single model instance and one
optimizer. For every client it copies the broadcast state into the trainable
parameters in place, clears the optimizer's state (a fresh optimizer, without
re-allocating one), runs the local steps with the algorithm's hook, and
returns the delta. The frozen base is never copied.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import torch

from fedfm.algorithms.base import Algorithm, Broadcast, Update
from fedfm.client.data import Client
from fedfm.config.schema import TrainConfig
from fedfm.data.encode import Encoded, batch_indices, make_batch, steps_for
from fedfm.data.quality import loss_outliers
from fedfm.eval.evaluate import score_examples
from fedfm.models.state import set_state_
from fedfm.seeds import derive_seed


def moved(tensors, device: torch.device) -> "OrderedDict[str, torch.Tensor]":
    """``tensors`` on ``device`` (a tensor already there is kept, not copied)."""
    return OrderedDict((k, v.to(device)) for k, v in tensors.items())


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class LocalTrainer:
    """Runs local training for any client on the one shared model.

    Training runs where the model lives (``fm.device``): the broadcast is moved
    there once per client, so algorithm hooks and the delta work on-device, and
    the update's tensors come back to the CPU, where the wire and the server are.
    """

    def __init__(self, fm, enc: Encoded, cfg: TrainConfig, seed: int, dp_sgd=None) -> None:
        self.fm = fm
        self.device = fm.device
        self.enc = enc
        self.cfg = cfg
        self.seed = seed
        self.optimizer = make_optimizer(fm.params.values(), cfg)
        self.dp_sgd = dp_sgd  # fedfm.privacy.dp_sgd.LocalDPSGD (local sample-level DP-SGD) or None

    def local_update(self, algo: Algorithm, broadcast: Broadcast, client: Client, round_idx: int) -> Update | None:
        """The client's update, or None when it sits the round out (its DP-SGD budget is spent)."""
        fm, cfg, device = self.fm, self.cfg, self.device
        if device.type != "cpu":
            extras = {name: moved(t, device) for name, t in broadcast.extras.items()}
            broadcast = Broadcast(state=moved(broadcast.state, device), version=broadcast.version, extras=extras)
        set_state_(fm.params, broadcast.state)
        self.optimizer.state.clear()
        hook = algo.client_hook(broadcast, fm.params, client.state)
        seed = derive_seed(self.seed, round_idx, client.cid)
        torch.manual_seed(seed)  # dropout masks
        batches = batch_indices(client.train_idx, cfg.batch_size, torch.Generator().manual_seed(seed))
        steps = steps_for(len(client.train_idx), cfg.batch_size, cfg.local_steps, cfg.local_epochs)
        dp = None if self.dp_sgd is None else self.dp_sgd.session(client.cid, client.train_idx, steps, seed, round_idx)
        if self.dp_sgd is not None and dp is None:
            return None  # one more participation would exceed the client's target epsilon (logged)
        params = list(fm.params.values())
        fm.model.train()
        loss_sum = torch.zeros((), device=device)
        for _ in range(steps):
            if dp is not None:  # Poisson batch, per-example clipping, Gaussian noise: sets .grad
                self.optimizer.zero_grad(set_to_none=True)
                loss = dp.step()
            else:
                batch = make_batch(self.enc, next(batches), fm.task, device)
                loss = fm.model(**batch).loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            hook.on_gradients()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            self.optimizer.step()
            loss_sum += loss.detach()
        cpu = torch.device("cpu")
        extras = {name: moved(t, cpu) for name, t in hook.finish(steps, cfg.lr).items()}
        with torch.no_grad():
            delta = OrderedDict((k, (p.detach() - broadcast.state[k]).to(cpu)) for k, p in fm.params.items())
        return Update(
            client_id=client.cid,
            delta=delta,
            num_examples=len(client.train_idx),
            metrics={"train_loss": float(loss_sum) / steps, "steps": float(steps)},
            extras=extras,
            base_version=broadcast.version,
        )


class LossFilterTrainer:
    """Wraps a local trainer: the client leaves out its loss outliers before it trains (``data.quality.loss_filter``).

    At every participation whose broadcast is global version ``loss_start_version``
    or later, the client scores its (statically filtered) training rows under the
    broadcast model, in eval mode and without gradients, and trains this round on
    the rows whose loss is at most ``median + loss_k * MAD`` and ``loss_max``
    (:func:`fedfm.data.quality.loss_outliers`). Nothing persists: the next
    participation scores again under the newer global model. The update's
    ``num_examples`` is the rows it trained on, so the counts the
    :class:`~fedfm.client.client.ClientApp` reports carry the drops.
    Attributes other than ``local_update`` are the wrapped trainer's.
    """

    def __init__(self, inner, fm, enc: Encoded, opts, batch_size: int) -> None:
        self.inner = inner
        self.fm = fm
        self.enc = enc
        self.opts = opts  # a data.quality section (QualityConfig)
        self.batch_size = batch_size

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def kept_rows(self, broadcast: Broadcast, rows: np.ndarray) -> np.ndarray:
        """``rows`` without the loss outliers under the broadcast model (all of them before loss_start_version)."""
        if broadcast.version < self.opts.loss_start_version or len(rows) < 3:
            return rows
        set_state_(self.fm.params, broadcast.state)
        scores = score_examples(self.fm, self.enc, rows, self.batch_size)
        losses = scores.loss_sum / np.maximum(scores.targets, 1)
        return rows[~loss_outliers(losses, self.opts.loss_k, self.opts.loss_max)]

    def local_update(self, algo: Algorithm, broadcast: Broadcast, client: Client, round_idx: int) -> Update | None:
        if client.quality is None:  # e.g. FLTrust's root data on the server
            return self.inner.local_update(algo, broadcast, client, round_idx)
        kept = self.kept_rows(broadcast, client.train_idx)
        return self.inner.local_update(algo, broadcast, replace(client, train_idx=kept), round_idx)
