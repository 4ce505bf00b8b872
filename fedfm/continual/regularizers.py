"""Regularizers toward the previous stage's global model, as client hooks.

With ``theta_prev`` the global model at the end of the previous stage, each
client adds to its local loss

* **L2**: ``(lambda/2) ||theta - theta_prev||^2``  (gradient ``lambda (theta - theta_prev)``);
* **EWC** (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
  neural networks", PNAS): ``(lambda/2) sum_i F_i (theta_i - theta_prev_i)^2``
  (gradient ``lambda F (theta - theta_prev)``), where ``F`` is the diagonal
  empirical Fisher information (mean squared per-example gradient of the loss
  at the true labels) that **the client itself** estimates on its own data at
  the end of every stage it had data in, at that stage's final global model,
  and keeps in its private state. Fishers of successive stages are summed and
  the penalty is anchored at the latest stage's model: "online EWC" with
  decay 1 (Schwarz et al. 2018, "Progress & Compress"), so memory stays one
  Fisher per client however many stages pass.

The penalty's gradient is added after each backward pass by a
:class:`~fedfm.algorithms.base.ClientHook`; :class:`RegularizedAlgorithm`
composes it with the algorithm's own hook (FedProx, SCAFFOLD, ...) and
delegates everything else to the algorithm, so the server side is unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np
import torch

from fedfm.algorithms.base import Algorithm, Broadcast, ClientHook
from fedfm.data.encode import make_batch

FISHER_KEY = "ewc_fisher"  # where a client keeps its summed diagonal Fisher (private, never sent)


class PullToAnchorHook(ClientHook):
    """Adds ``strength * F * (theta - anchor)`` to every float parameter's gradient (``F = 1``: L2)."""

    def __init__(
        self,
        broadcast: Broadcast,
        params: Mapping[str, torch.nn.Parameter],
        client_state: dict,
        anchor: Mapping[str, torch.Tensor],
        strength: float,
        fisher: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(broadcast, params, client_state)
        self.strength = float(strength)
        self.anchor = {
            k: anchor[k].detach().to(device=p.device, dtype=p.dtype, copy=True)
            for k, p in params.items()
            if p.is_floating_point()
        }
        self.fisher = None
        if fisher is not None:
            self.fisher = {k: fisher[k].detach().to(device=p.device, dtype=p.dtype) for k, p in params.items() if k in self.anchor}

    def penalty(self) -> torch.Tensor:
        """The penalty's value at the current parameters (for checks and logging)."""
        total = torch.zeros((), dtype=torch.float64)
        for k, a in self.anchor.items():
            d = (self.params[k].detach() - a).double()
            w = d * d if self.fisher is None else self.fisher[k].double() * d * d
            total += w.sum().cpu()
        return 0.5 * self.strength * total

    @torch.no_grad()
    def on_gradients(self) -> None:
        if self.strength == 0:
            return
        for k, a in self.anchor.items():
            p = self.params[k]
            pull = (p.detach() - a).mul_(self.strength)
            if self.fisher is not None:
                pull.mul_(self.fisher[k])
            if p.grad is None:
                p.grad = pull
            else:
                p.grad.add_(pull)


class ComposedHook(ClientHook):
    """The algorithm's hook first, then extra hooks; the update's extras are the algorithm's."""

    def __init__(self, inner: ClientHook, *extra: ClientHook) -> None:
        super().__init__(inner.broadcast, inner.params, inner.client_state)
        self.inner = inner
        self.extra = extra

    def on_gradients(self) -> None:
        self.inner.on_gradients()
        for h in self.extra:
            h.on_gradients()

    def finish(self, steps: int, lr: float) -> dict[str, dict[str, torch.Tensor]]:
        out = self.inner.finish(steps, lr)
        for h in self.extra:
            h.finish(steps, lr)
        return out


class AnchorRegularizer:
    """L2 or EWC toward the previous stage's global model; no pull before the first stage ends."""

    def __init__(self, kind: str, strength: float, fisher_examples: int = 64, seed: int = 0) -> None:
        if kind not in ("l2", "ewc"):
            raise ValueError(f"regularizer must be 'l2' or 'ewc', got {kind!r}")
        self.kind = kind
        self.strength = float(strength)
        self.fisher_examples = int(fisher_examples)
        self.seed = seed
        self.anchor: "OrderedDict[str, torch.Tensor] | None" = None  # theta_prev (CPU)

    def hook(self, broadcast: Broadcast, params, client_state: dict) -> ClientHook | None:
        if self.anchor is None:
            return None
        fisher = None
        if self.kind == "ewc":
            fisher = client_state.get(FISHER_KEY)
            if fisher is None:  # the client had no data in any finished stage: nothing to protect
                return None
        return PullToAnchorHook(broadcast, params, client_state, self.anchor, self.strength, fisher)

    def end_stage(self, global_state: Mapping[str, torch.Tensor], fm, enc, clients, rows_by_client, stage: int) -> None:
        """The stage is over: ``global_state`` becomes the anchor; EWC clients add this stage's Fisher.

        ``rows_by_client[c]`` are the rows client ``c`` trained on in the stage (it
        estimates its Fisher on at most ``fisher_examples`` of them, drawn with
        the run seed, at ``global_state``, which ``fm`` must hold).
        """
        self.anchor = OrderedDict((k, v.detach().clone()) for k, v in global_state.items())
        if self.kind != "ewc":
            return
        for client, rows in zip(clients, rows_by_client):
            if len(rows) == 0:
                continue
            rng = np.random.default_rng([self.seed, stage, client.cid, 0xF15])
            pick = np.sort(rng.choice(rows, min(self.fisher_examples, len(rows)), replace=False))
            f = diagonal_fisher(fm, enc, pick)
            old = client.state.get(FISHER_KEY)
            client.state[FISHER_KEY] = f if old is None else OrderedDict((k, old[k] + f[k]) for k in f)


def diagonal_fisher(fm, enc, rows: np.ndarray) -> "OrderedDict[str, torch.Tensor]":
    """Empirical diagonal Fisher ``mean_n (d loss_n / d theta)^2`` over ``rows``, one example at a time (CPU tensors).

    ``loss_n`` is example ``n``'s loss at its true label (classification) or its
    mean next-token loss (causal LM); the model is in eval mode (no dropout).
    """
    params = fm.params
    acc = OrderedDict((k, torch.zeros_like(p, dtype=torch.float32)) for k, p in params.items())
    was_training = fm.model.training
    fm.model.eval()
    try:
        for r in rows:
            batch = make_batch(enc, torch.as_tensor([int(r)]), fm.task, fm.device)
            loss = fm.model(**batch).loss
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (k, _), g in zip(params.items(), grads):
                if g is not None:
                    acc[k] += g.detach().float() ** 2
    finally:
        fm.model.train(was_training)
    n = max(len(rows), 1)
    return OrderedDict((k, (v / n).cpu()) for k, v in acc.items())


class RegularizedAlgorithm(Algorithm):
    """``algorithm`` with the regularizer's hook composed into every client hook; all else delegated."""

    def __init__(self, algorithm: Algorithm, regularizer: AnchorRegularizer) -> None:
        self.inner = algorithm
        self.regularizer = regularizer
        self.name = algorithm.name

    def __getattr__(self, name):  # fold, optimizer state, ... of the wrapped algorithm
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def fold(self):
        return self.inner.fold

    @fold.setter
    def fold(self, value):
        self.inner.fold = value

    def broadcast(self, global_state, version):
        return self.inner.broadcast(global_state, version)

    def client_hook(self, broadcast, params, client_state) -> ClientHook:
        hook = self.inner.client_hook(broadcast, params, client_state)
        pull = self.regularizer.hook(broadcast, params, client_state)
        return hook if pull is None else ComposedHook(hook, pull)

    def start(self, global_state, version: int = 0) -> None:
        self.inner.start(global_state, version)

    def add(self, update) -> None:
        self.inner.add(update)

    def finish(self):
        return self.inner.finish()
