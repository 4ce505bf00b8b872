"""Several clients' local training in one batched forward/backward over the shared frozen base.

``train.batch_clients: G`` trains the clients of a round G at a time. Their
trainable states are stacked along a new leading axis and one
``torch.func.vmap(grad(loss))`` call computes every client's gradient from
its own mini-batch: the frozen weights are shared, so each layer runs as one
large matrix product over the G clients' rows instead of G small ones (the
multi-tenant idea of S-LoRA / Punica, Sheng et al. 2023, Chen et al. 2023,
applied to training). AdamW is element-wise, so one optimizer over the stacked
tensors is exactly G independent optimizers; gradient clipping is per client.

Each client keeps its own seeded batch order (the same batches as
:class:`~fedfm.client.trainer.LocalTrainer`); with dropout off the deltas equal
the one-client-at-a-time trainer's to float tolerance. With dropout on, the
masks are drawn per client from one seeded stream (``randomness="different"``),
so they differ from the sequential run's, as two seeds would.

Only the plain client side is batched (FedAvg and its server-optimizer
variants, DiLoCo): FedProx and SCAFFOLD change each client's gradients
through a hook on live parameters, which has no stacked form here.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.func import functional_call, grad_and_value, vmap

from fedfm.algorithms.base import Algorithm, Broadcast, ClientHook, Update
from fedfm.data.encode import batch_indices, make_batch, steps_for
from fedfm.errors import FedfmError
from fedfm.client.data import Client
from fedfm.client.trainer import LocalTrainer, make_optimizer, moved
from fedfm.registry import ALGORITHMS, METHODS, PLAIN_CLIENT, VIRTUAL_TOKENS
from fedfm.seeds import derive_seed


def additive_mask(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """A 4-D additive attention mask ``[B, 1, T, T]`` (0 = attend, float min = not), causal when asked.

    Passing the mask in 4-D keeps transformers from building it with
    data-dependent branches, which ``vmap`` cannot trace.
    """
    B, T = mask.shape
    keep = mask[:, None, None, :].bool().expand(B, 1, T, T)
    if causal:
        keep = keep & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()[None, None]
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    return torch.where(keep, zero, torch.finfo(torch.float32).min)


def stack_batches(batches: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """G batches padded to a common ``[G, B, T]`` (padding rows and positions carry label -100)."""
    B = max(b["input_ids"].shape[0] for b in batches)
    T = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100)):
        rows = []
        for b in batches:
            t = b[key]
            shape = (B, T) if t.dim() == 2 else (B,)
            full = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            if t.dim() == 2:
                full[: t.shape[0], : t.shape[1]] = t
            else:
                full[: t.shape[0]] = t
            rows.append(full)
        out[key] = torch.stack(rows)
    return out


class BatchedTrainer:
    """Wraps a :class:`LocalTrainer`: ``schedule`` a round's clients, then ``local_update`` serves them G at a time."""

    def __init__(self, inner: LocalTrainer, group_size: int) -> None:
        if inner.dp_sgd is not None:
            raise FedfmError("train.batch_clients cannot be combined with local DP-SGD")
        self.inner = inner
        self.group_size = group_size
        self._queue: list[Client] = []
        self._cache: dict[int, Update | None] = {}
        fm = inner.fm
        names = {id(p): n for n, p in fm.model.named_parameters()}
        self._full = OrderedDict((k, names[id(p)]) for k, p in fm.params.items())  # short -> module path
        trainable = set(self._full.values())
        self._frozen = {n: p.detach() for n, p in fm.model.named_parameters() if n not in trainable}
        self._buffers = dict(fm.model.named_buffers())

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def schedule(self, clients: list[Client]) -> None:
        """The clients this process will train this round, in order (groups are cut from it)."""
        self._queue = list(clients)
        self._cache.clear()

    def local_update(self, algo: Algorithm, broadcast: Broadcast, client: Client, round_idx: int) -> Update | None:
        if algo.hook_class is not ClientHook:
            raise FedfmError(f"train.batch_clients batches only the plain client side, not {algo.name!r}")
        if client.cid not in self._cache:
            ids = [c.cid for c in self._queue]
            start = ids.index(client.cid) if client.cid in ids else None
            group = [client] if start is None else self._queue[start : start + self.group_size]
            self._cache.update(self.train_group(broadcast, group, round_idx))
        return self._cache.pop(client.cid)

    # -- one group -------------------------------------------------------------------------
    def train_group(self, broadcast: Broadcast, group: list[Client], round_idx: int) -> dict[int, Update]:
        inner, cfg = self.inner, self.inner.cfg
        fm, device, G = inner.fm, inner.device, len(group)
        state = moved(broadcast.state, device)
        steps = [steps_for(len(c.train_idx), cfg.batch_size, cfg.local_steps, cfg.local_epochs) for c in group]
        if len(set(steps)) > 1:  # different local step counts: train the group in equal-step parts
            out = {}
            for n in sorted(set(steps)):
                out.update(self.train_group(broadcast, [c for c, s in zip(group, steps) if s == n], round_idx))
            return out
        stacked = OrderedDict((k, state[k].detach().unsqueeze(0).repeat(G, *[1] * state[k].dim()).clone())
                              for k in self._full)
        opt = make_optimizer(stacked.values(), cfg)
        seeds = [derive_seed(inner.seed, round_idx, c.cid) for c in group]
        streams = [batch_indices(c.train_idx, cfg.batch_size, torch.Generator().manual_seed(s))
                   for c, s in zip(group, seeds)]
        torch.manual_seed(derive_seed(inner.seed, round_idx, group[0].cid, 0xB47))  # the group's dropout masks
        model, causal = fm.model, fm.task == "causal_lm"
        frozen, buffers, full = self._frozen, self._buffers, self._full

        def loss(params, input_ids, attention_mask, labels):
            named = {full[k]: v for k, v in params.items()}
            out = functional_call(model, ({**frozen, **named}, buffers), args=(), kwargs=dict(
                input_ids=input_ids, attention_mask=additive_mask(attention_mask, causal), labels=labels))
            return out.loss

        step_fn = vmap(grad_and_value(loss), randomness="different")
        model.train()
        loss_sum = torch.zeros(G, device=device)
        for _ in range(steps[0]):
            batch = stack_batches([make_batch(inner.enc, next(s), fm.task, device) for s in streams])
            grads, losses = step_fn(dict(stacked), batch["input_ids"], batch["attention_mask"], batch["labels"])
            if cfg.max_grad_norm is not None:  # per client, as torch.nn.utils.clip_grad_norm_ would
                norms = torch.sqrt(sum(g.reshape(G, -1).pow(2).sum(1) for g in grads.values()))
                coef = (cfg.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
                grads = {k: g * coef.view(G, *[1] * (g.dim() - 1)) for k, g in grads.items()}
            for k, t in stacked.items():
                t.grad = grads[k]
            opt.step()
            loss_sum += losses.detach()
        cpu = torch.device("cpu")
        out = {}
        with torch.no_grad():
            for i, c in enumerate(group):
                delta = OrderedDict((k, (stacked[k][i] - state[k]).to(cpu)) for k in stacked)
                out[c.cid] = Update(client_id=c.cid, delta=delta, num_examples=len(c.train_idx),
                                    metrics={"train_loss": float(loss_sum[i]) / steps[0], "steps": float(steps[0])},
                                    base_version=broadcast.version)
        return out


def check_batching(cfg) -> None:
    """One-line errors for what ``train.batch_clients > 1`` cannot serve (``cfg`` is a RunConfig)."""
    if cfg.train.batch_clients <= 1:
        return
    problems = {
        "algorithm.name=" + cfg.algorithm.name: not ALGORITHMS.supports(cfg.algorithm.name, PLAIN_CLIENT),
        "model.method=" + cfg.model.method: METHODS.supports(cfg.model.method, VIRTUAL_TOKENS),
        "privacy.dp_sgd": cfg.privacy.dp_sgd.enabled,
        "personalization": cfg.personalization.method != "none",
        "heterogeneous LoRA ranks": any(p.lora_rank is not None for p in cfg.devices.profiles),
        "continual learning": cfg.continual.enabled,
        # torch.func's vmap does not trace torchao's quantized weights
        "model.quantize=" + cfg.model.quantize: cfg.model.quantize != "none",
    }
    for what, bad in problems.items():
        if bad:
            raise FedfmError(f"train.batch_clients={cfg.train.batch_clients} cannot be combined with {what}")
