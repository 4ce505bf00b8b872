"""Client-side training with personal parts: FedPer, FedRep, Ditto and local-only training.

:class:`PersonalTrainer` wraps the one :class:`~fedfm.client.trainer.LocalTrainer`
(same model, same optimizer, same data) and has its ``local_update``
signature, so the simulation, FLTrust's server update and every fold work
unchanged. It loads the broadcast's shared tensors and the client's own
personal tensors into the shared model in place, trains, keeps the personal
tensors in ``Client.state`` and returns a delta over the shared tensors only.

* **FedPer** (Arivazhagan et al. 2019, "Federated Learning with
  Personalization Layers"): the base layers are shared and aggregated, the
  personalization layers (here the task head by default) stay on the client;
  local training updates both jointly.
* **FedRep** (Collins et al. 2021, "Exploiting Shared Representations for
  Personalized Federated Learning", ICML): each round the client first trains
  its personal head for ``head_steps`` steps with the body frozen, then the
  shared body for the usual local steps with the head frozen; only the body
  is uploaded.
* **Ditto** (Li et al. 2021, "Ditto: Fair and Robust Federated Learning
  Through Personalization", ICML): the client trains the global model exactly
  as the algorithm asks (its update goes to the server), and also its private
  model ``v_k`` on ``F_k(v) + (λ/2)‖v − w^t‖²``, where ``w^t`` is the global
  model it received; ``v_k`` never leaves the client.
* **local**: every tensor is personal; each client trains alone and the
  server aggregates nothing (the baseline personalization must beat).

The algorithm's client hook (FedProx's proximal term, SCAFFOLD's correction)
sees only the shared tensors and runs only in the steps that train them.
Phases are seeded from ``(run seed, round, client)`` like the plain trainer's
(the main phase uses exactly its seed), with a tag for FedRep's head phase
(:data:`HEAD_TAG`) and Ditto's personal phase (:data:`DITTO_TAG`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch

from fedfm.algorithms.base import Algorithm, Broadcast, ClientHook, Update
from fedfm.algorithms.fedprox import FedProxHook
from fedfm.data.encode import batch_indices, make_batch, steps_for
from fedfm.models.state import get_state, set_state_
from fedfm.personalization.plan import PERSONAL_STATE, PersonalPlan
from fedfm.client.data import Client
from fedfm.client.trainer import LocalTrainer, moved
from fedfm.seeds import derive_seed

HEAD_TAG = 0x4EAD  # seeds FedRep's head phase
DITTO_TAG = 0xD170  # seeds Ditto's personal phase


class PersonalTrainer:
    """``local_update`` with personal tensors; see the module docstring for the methods."""

    def __init__(self, trainer: LocalTrainer, plan: PersonalPlan) -> None:
        if trainer.dp_sgd is not None:
            raise ValueError("personalization does not support local DP-SGD")
        self.trainer = trainer
        self.plan = plan
        self.fm = trainer.fm
        self.cfg = trainer.cfg  # the local training config (the runtime reads steps from it)

    def local_update(self, algo: Algorithm, broadcast: Broadcast, client: Client, round_idx: int) -> Update:
        t, plan, fm = self.trainer, self.plan, self.fm
        device = t.device
        if device.type != "cpu":
            extras = {name: moved(x, device) for name, x in broadcast.extras.items()}
            broadcast = Broadcast(state=moved(broadcast.state, device), version=broadcast.version, extras=extras)
        mine = plan.personal_of(client) if plan.method != "ditto" else None
        set_state_(fm.params, plan.full_state(broadcast.state, mine if mine is not None else plan.initial_personal))
        t.optimizer.state.clear()
        shared = OrderedDict((k, fm.params[k]) for k in plan.shared_keys)
        personal = OrderedDict((k, fm.params[k]) for k in plan.personal_keys)
        seed = derive_seed(t.seed, round_idx, client.cid)
        steps = steps_for(len(client.train_idx), t.cfg.batch_size, t.cfg.local_steps, t.cfg.local_epochs)
        metrics: dict[str, float] = {}
        if plan.method == "fedrep":  # the head first, body frozen, no algorithm hook (nothing shared moves)
            metrics["head_loss"] = self.train_steps(client, personal, plan.head_steps, derive_seed(seed, HEAD_TAG))
            t.optimizer.state.clear()
        hook = algo.client_hook(broadcast, shared, client.state)
        trained = shared if plan.method == "fedrep" else fm.params  # fedrep: the body, head frozen
        metrics["train_loss"] = self.train_steps(client, trained, steps, seed, hook)
        metrics["steps"] = float(steps)
        cpu = torch.device("cpu")
        extras = {name: moved(x, cpu) for name, x in hook.finish(steps, t.cfg.lr).items()}
        with torch.no_grad():
            delta = OrderedDict((k, (p.detach() - broadcast.state[k]).to(cpu)) for k, p in shared.items())
        if plan.method == "ditto":
            metrics["personal_loss"] = self.ditto_step(client, broadcast, steps, derive_seed(seed, DITTO_TAG))
        else:
            client.state[PERSONAL_STATE] = get_state(personal)
        return Update(
            client_id=client.cid,
            delta=delta,
            num_examples=len(client.train_idx),
            metrics=metrics,
            extras=extras,
            base_version=broadcast.version,
        )

    def ditto_step(self, client: Client, broadcast: Broadcast, steps: int, seed: int) -> float:
        """Train the client's private ``v_k`` toward ``F_k(v) + (λ/2)‖v − w‖²`` (w: the broadcast); store it."""
        t, fm = self.trainer, self.fm
        v = self.plan.personal_of(client)
        set_state_(fm.params, v if v is not None else broadcast.state)  # v_k starts from the first global it sees
        t.optimizer.state.clear()
        prox = FedProxHook(broadcast, fm.params, {}, mu=self.plan.ditto_lambda)  # adds λ(v − w) to each gradient
        loss = self.train_steps(client, fm.params, steps, seed, prox)
        client.state[PERSONAL_STATE] = get_state(fm.params)
        return loss

    def train_steps(
        self,
        client: Client,
        train: Mapping[str, torch.nn.Parameter],
        steps: int,
        seed: int,
        hook: ClientHook | None = None,
    ) -> float:
        """``steps`` optimizer steps on the client's data updating only ``train`` (the rest frozen); mean loss.

        Frozen tensors get no gradient (``requires_grad`` is off for the phase),
        so the optimizer skips them: no step, no weight decay, no moments.
        """
        t, fm = self.trainer, self.fm
        torch.manual_seed(seed)  # dropout masks
        batches = batch_indices(client.train_idx, t.cfg.batch_size, torch.Generator().manual_seed(seed))
        keep = set(map(id, train.values()))
        frozen = [p for p in fm.params.values() if id(p) not in keep and p.requires_grad]
        params = list(train.values())
        fm.model.train()
        loss_sum = torch.zeros((), device=t.device)
        try:
            for p in frozen:
                p.requires_grad_(False)
            for _ in range(steps):
                batch = make_batch(t.enc, next(batches), fm.task, t.device)
                loss = fm.model(**batch).loss
                t.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if hook is not None:
                    hook.on_gradients()
                if t.cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, t.cfg.max_grad_norm)
                t.optimizer.step()
                loss_sum += loss.detach()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return float(loss_sum) / steps
