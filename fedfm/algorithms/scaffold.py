"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML), control-variate update option II.

Server keeps a control variate ``c`` (zeros at start), each client ``i`` its
own ``c_i`` (zeros at start, kept in the runtime's per-client ``client_state``,
never sent up except as a delta). One round:

* broadcast ``x`` and ``c``;
* client: local steps on the corrected gradient ``g(y_i) + c - c_i``; after
  ``K`` steps with lr ``η``: ``c_i⁺ = c_i - c + (x - y_i) / (K η)``; send
  ``Δy_i = y_i - x`` and ``Δc_i = c_i⁺ - c_i``;
* server: ``x ← x + η_g mean(Δy)`` (weighted as configured, or any FedOpt
  server optimizer) and ``c ← c + (|S| / N) mean_uniform(Δc)`` where ``|S|``
  is the number of updates folded this round and ``N`` the total number of
  clients.

The correction is written into ``param.grad`` before ``optimizer.step()``, so
it is exact for plain SGD (as in the paper); with other local optimizers
(AdamW, gradient clipping after the hook) it is the usual heuristic.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch

from fedfm.algorithms.base import Algorithm, Broadcast, ClientHook, RunningWeightedMean, Update
from fedfm.algorithms.fedavg import MeanDeltaFold, Weighting, compute_dtype
from fedfm.algorithms.fedopt import ServerOptimizer, ServerSGD
from fedfm.registry import ALGORITHMS, MERGEABLE

CONTROL = "control"  # broadcast extras key: the server control variate c
CONTROL_DELTA = "control_delta"  # update extras key: c_i⁺ - c_i
CLIENT_KEY = "scaffold.control"  # client_state key: c_i (float32/float64, on CPU)


class ScaffoldHook(ClientHook):
    """Adds ``c - c_i`` to every float gradient; computes ``c_i⁺`` at the end."""

    def __init__(
        self,
        broadcast: Broadcast,
        params: Mapping[str, torch.nn.Parameter],
        client_state: dict,
    ) -> None:
        super().__init__(broadcast, params, client_state)
        c = broadcast.extras.get(CONTROL)
        if c is None:
            raise ValueError(f"SCAFFOLD broadcast has no {CONTROL!r} extras (server control variate)")
        missing = [k for k, p in params.items() if p.is_floating_point() and k not in c]
        if missing:
            raise ValueError(f"SCAFFOLD control variate lacks trainable tensors {missing[:5]}")
        c_i = client_state.get(CLIENT_KEY, {})
        self.x: dict[str, torch.Tensor] = {}  # global values, as local training started from them
        self.c: dict[str, torch.Tensor] = {}
        self.correction: dict[str, torch.Tensor] = {}  # c - c_i in the parameter's dtype
        for k, p in params.items():
            if not p.is_floating_point():
                continue
            dt = compute_dtype(p.dtype)
            self.x[k] = broadcast.state[k].detach().to(device=p.device, dtype=p.dtype, copy=True)
            self.c[k] = c[k].detach().to(device=p.device, dtype=dt)
            ci = c_i[k].to(device=p.device, dtype=dt) if k in c_i else torch.zeros_like(self.c[k])
            self.correction[k] = (self.c[k] - ci).to(p.dtype)

    @torch.no_grad()
    def on_gradients(self) -> None:
        for k, corr in self.correction.items():
            p = self.params[k]
            if p.grad is None:
                p.grad = corr.clone()
            else:
                p.grad.add_(corr)

    @torch.no_grad()
    def finish(self, steps: int, lr: float) -> dict[str, dict[str, torch.Tensor]]:
        """Option II: ``c_i⁺ = c_i - c + (x - y_i) / (K η)``; returns ``{control_delta: c_i⁺ - c_i}``.

        With ``steps == 0`` nothing was learned: ``c_i`` is kept, the delta is zero.
        """
        old = self.client_state.get(CLIENT_KEY, {})
        new_ci, delta = OrderedDict(), OrderedDict()
        for k, c in self.c.items():
            ci = old[k].to(device=c.device, dtype=c.dtype) if k in old else torch.zeros_like(c)
            if steps > 0:
                if lr <= 0:
                    raise ValueError(f"SCAFFOLD needs the local lr > 0, got {lr}")
                y = self.params[k].detach().to(c.dtype)
                nci = ci - c + (self.x[k].to(c.dtype) - y) / (steps * lr)
            else:
                nci = ci
            new_ci[k] = nci.cpu()
            delta[k] = (nci - ci).cpu()
        self.client_state[CLIENT_KEY] = new_ci
        return {CONTROL_DELTA: delta}


class ScaffoldFold(MeanDeltaFold):
    """FedAvg's fold for ``Δy`` plus the server control variate update.

    ``c ← c + (|S| / N) · mean_uniform(Δc)``; an update skipped by the weighting
    (0 examples under ``"examples"``) is skipped for both and not in ``|S|``.
    ``c`` is replaced (never updated in place), so an earlier broadcast keeps
    the values it was sent with.
    """

    def __init__(
        self, num_clients: int, optimizer: ServerOptimizer | None = None, weighting: Weighting = "examples"
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        super().__init__(optimizer, weighting)
        self.num_clients = int(num_clients)
        self.control: OrderedDict[str, torch.Tensor] | None = None
        self._dc = RunningWeightedMean()

    def ensure_control(self, global_state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        """``c`` for the float tensors of ``global_state`` (zeros for new or reshaped names)."""
        old = self.control or {}
        ctrl = OrderedDict()
        for k, v in global_state.items():
            if not v.is_floating_point():
                continue
            have = old.get(k)
            ctrl[k] = have if have is not None and have.shape == v.shape else torch.zeros(
                v.shape, dtype=compute_dtype(v.dtype), device=v.device
            )
        self.control = ctrl  # a new dict: earlier broadcasts keep theirs
        return ctrl

    def start(self, global_state: Mapping[str, torch.Tensor], version: int = 0) -> None:
        super().start(global_state, version)
        self.ensure_control(global_state)

    def state_dict(self, tensors: dict, orders: dict) -> dict:
        """The server optimizer's moments and the server control variate ``c`` (group ``scaffold_c``)."""
        meta = super().state_dict(tensors, orders)
        if self.control is not None:
            orders["scaffold_c"] = list(self.control)
            for k, t in self.control.items():
                tensors[f"scaffold_c/{k}"] = t.detach().to("cpu").contiguous().clone()
        return meta

    def load_state_dict(self, meta: dict, tensors: Mapping[str, torch.Tensor], orders: dict) -> None:
        super().load_state_dict(meta, tensors, orders)
        if "scaffold_c" in orders:
            self.control = OrderedDict((k, tensors[f"scaffold_c/{k}"]) for k in orders["scaffold_c"])
        self._dc = RunningWeightedMean()

    def add(self, update: Update) -> bool:
        g = self._require_started()
        if self.weight(update) == 0:
            return False
        dc = update.extras.get(CONTROL_DELTA)
        if dc is None:
            raise ValueError(f"client {update.client_id}: SCAFFOLD update has no {CONTROL_DELTA!r} extras")
        dc = self._float_part(dc, g, f"client {update.client_id} control delta")
        super().add(update)
        self._dc.add(dc, 1.0)
        return True

    def partial(self) -> tuple["OrderedDict[str, torch.Tensor]", list[float]]:
        sums, scalars = super().partial()
        dc = self._dc.sums or {}
        for k in self._float_keys:
            sums[f"control/{k}"] = dc[k] if k in dc else torch.zeros(sums[k].shape, dtype=torch.float64)
        return sums, scalars + [self._dc.total_weight, float(self._dc.count)]

    def merge(self, sums: "OrderedDict[str, torch.Tensor]", scalars: list[list[float]]) -> None:
        super().merge(sums, [s[:2] for s in scalars])
        self._dc = RunningWeightedMean()
        self._dc.sums = OrderedDict((k, sums[f"control/{k}"]) for k in self._float_keys)
        self._dc.total_weight = float(sum(s[2] for s in scalars))
        self._dc.count = int(sum(s[3] for s in scalars))

    def finish(self) -> "OrderedDict[str, torch.Tensor]":
        self._require_started()
        s = self._dc.count
        if s > 0:
            self.control = OrderedDict(
                (k, c + (s / self.num_clients) * (self._dc.sums[k] / s).to(device=c.device, dtype=c.dtype))
                for k, c in self.control.items()
            )
        self._dc = RunningWeightedMean()
        return super().finish()


class Scaffold(Algorithm):
    """SCAFFOLD: control-variate client hook + :class:`ScaffoldFold`. Needs ``num_clients`` (N)."""

    name = "scaffold"
    hook_class = ScaffoldHook

    def __init__(
        self,
        num_clients: int,
        server_lr: float = 1.0,
        weighting: Weighting = "examples",
        server_opt: ServerOptimizer | None = None,
    ) -> None:
        super().__init__(ScaffoldFold(num_clients, server_opt or ServerSGD(server_lr), weighting))

    def broadcast(self, global_state: Mapping[str, torch.Tensor], version: int) -> Broadcast:
        return Broadcast(state=global_state, version=version, extras={CONTROL: self.fold.ensure_control(global_state)})


# Control variates travel as update extras (no DELTA_ONLY) and must be summed with the deltas (no
# SECURE_SUM, no MEAN_DELTA); stale control variates break the correction (no ASYNC_SAFE).
@ALGORITHMS.register("scaffold", capabilities={MERGEABLE},
                     summary="SCAFFOLD (Karimireddy et al. 2020): control variates, option II")
def _scaffold(cfg, num_clients: int) -> Scaffold:
    return Scaffold(num_clients, weighting=cfg.weighting, server_opt=ServerSGD(cfg.server_lr))
