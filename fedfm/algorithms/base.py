"""The seam every federated algorithm plugs into.

A federated algorithm is two small pieces (see DESIGN.md):

* a **client hook** that the local training loop calls (``on_gradients`` after
  each backward pass, ``finish`` once local training is over) so that the
  algorithm can correct gradients (FedProx, SCAFFOLD) and attach extra tensors
  to its update (SCAFFOLD's control-variate delta);
* a **server fold**: ``start(global_state)``, ``add(update)`` for each client
  update as it arrives, ``finish() -> new global state``. A fold keeps running
  sums, so server memory is O(model) however many clients report.

Neither piece knows whether it runs in a simulation or a deployment: the
runtime moves :class:`Broadcast` objects down and :class:`Update` objects up.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

import torch
from pydantic import BaseModel, ConfigDict

State = "OrderedDict[str, torch.Tensor]"  # ordered mapping of named tensors: what travels


@dataclass
class Broadcast:
    """What the server sends to every client of a round."""

    state: Mapping[str, torch.Tensor]  # the global trainable state
    version: int = 0  # number of the global model version
    extras: dict[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)  # e.g. SCAFFOLD's c


@dataclass
class Update:
    """What one client sends back after local training."""

    client_id: int
    delta: Mapping[str, torch.Tensor]  # local trainable state minus the broadcast state
    num_examples: int  # examples the client holds for training (FedAvg weight)
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    base_version: int = 0  # the global version the client started from


class AlgorithmOptions(BaseModel):
    """Base of an algorithm's own options, declared next to it and registered as its config class.

    The ``algorithm:`` config section validates the keys the chosen
    algorithm's class declares (and fills their defaults), so a new algorithm
    brings new options without a schema edit (see :mod:`fedfm.config.schema`).
    """

    model_config = ConfigDict(extra="forbid")


class ClientHook:
    """Per-client, per-round algorithm logic inside the local training loop.

    ``params`` maps the trainable-state names to the live ``nn.Parameter``
    objects of the shared model; ``client_state`` is a mutable dict that
    persists for this client across rounds (kept by the runtime, never sent).
    The default hook does nothing: plain local SGD as in FedAvg.
    """

    def __init__(
        self,
        broadcast: Broadcast,
        params: Mapping[str, torch.nn.Parameter],
        client_state: dict,
    ) -> None:
        self.broadcast = broadcast
        self.params = params
        self.client_state = client_state

    def on_gradients(self) -> None:
        """Called after ``loss.backward()`` and before ``optimizer.step()``."""

    def finish(self, steps: int, lr: float) -> dict[str, dict[str, torch.Tensor]]:
        """Called after the last local step; returns extra tensors for the update."""
        return {}


class ServerFold:
    """Streaming server aggregation: ``start``, ``add`` per update, ``finish``.

    The whole surface a runtime may use, in groups; a fold implements the
    first group and whichever of the others its capabilities
    (:mod:`fedfm.registry`) promise:

    * the fold: :meth:`start`, :meth:`add` (raises ``ValueError`` for an update it
      cannot take: the server rejects it and the round goes on), :meth:`finish`;
    * its state across rounds, for checkpoints: :meth:`state_dict` /
      :meth:`load_state_dict` (optimizer moments, control variates, counters);
      :meth:`round_stats`, the last round's statistics for the metrics log;
    * ``MERGEABLE`` (shares of a cohort folded in several worker processes):
      ``partial() -> (float64 sums, scalars)`` and ``merge(summed sums, every worker's scalars)``;
    * ``SECURE_SUM`` (the fold sees only the cohort's masked sum):
      ``summand(update, max_weight)``, ``summand_layout(clip_range)``,
      ``absorb_sum(tensors, scalars, count)``.

    A fold that wraps another (a robust rule, client-level DP) keeps it in
    ``inner`` and hands it its aggregate as one update, so the algorithm's own
    server step runs unchanged.
    """

    inner: "ServerFold | None" = None

    def start(self, global_state: Mapping[str, torch.Tensor], version: int = 0) -> None:
        raise NotImplementedError

    def add(self, update: Update) -> None:
        raise NotImplementedError

    def finish(self) -> "OrderedDict[str, torch.Tensor]":
        raise NotImplementedError

    def state_dict(self, tensors: dict, orders: dict) -> dict:
        """Cross-round state: tensors into ``tensors`` (group key orders into ``orders``), the rest as JSON."""
        return {}

    def load_state_dict(self, meta: dict, tensors: Mapping[str, torch.Tensor], orders: dict) -> None:
        """Inverse of :meth:`state_dict`."""

    def round_stats(self) -> dict:
        """The last finished round's statistics, as metrics-log entries (e.g. clipping, trust scores)."""
        return {}


class Algorithm:
    """A named pairing of a client hook class and a server fold.

    ``broadcast(global_state, version)`` builds what travels down; subclasses
    add extras (SCAFFOLD sends its server control variate). The object keeps
    server-side state (optimizer moments, control variates) between rounds.
    """

    name = "base"
    hook_class: type[ClientHook] = ClientHook
    # What this algorithm supports (capability names of fedfm.registry, e.g. SECURE_SUM);
    # build_algorithm sets them from the registry entry the algorithm was built from.
    capabilities: frozenset[str] = frozenset()

    def __init__(self, fold: ServerFold) -> None:
        self.fold = fold

    def supports(self, *capabilities: str) -> bool:
        """True when the algorithm has every one of ``capabilities`` (see :mod:`fedfm.registry`)."""
        return all(c in self.capabilities for c in capabilities)

    def broadcast(self, global_state: Mapping[str, torch.Tensor], version: int) -> Broadcast:
        return Broadcast(state=global_state, version=version)

    def client_hook(
        self,
        broadcast: Broadcast,
        params: Mapping[str, torch.nn.Parameter],
        client_state: dict,
    ) -> ClientHook:
        return self.hook_class(broadcast, params, client_state)

    # The server side simply delegates to the fold.
    def start(self, global_state: Mapping[str, torch.Tensor], version: int = 0) -> None:
        self.fold.start(global_state, version)

    def add(self, update: Update) -> None:
        self.fold.add(update)

    def finish(self) -> "OrderedDict[str, torch.Tensor]":
        return self.fold.finish()


class RunningWeightedMean:
    """A weighted mean of named tensors folded one contribution at a time.

    Accumulates in float64 so the result does not depend on arrival order
    beyond float64 rounding. Memory: one copy of the tensors.
    """

    def __init__(self) -> None:
        self.sums: OrderedDict[str, torch.Tensor] | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight < 0:
            raise ValueError("weights must be non-negative")
        if self.sums is None:
            self.sums = OrderedDict(
                (k, torch.zeros_like(v, dtype=torch.float64)) for k, v in tensors.items()
            )
        for k, acc in self.sums.items():
            acc.add_(tensors[k].to(torch.float64), alpha=float(weight))
        self.total_weight += float(weight)
        self.count += 1

    def mean(self, like: Mapping[str, torch.Tensor] | None = None) -> "OrderedDict[str, torch.Tensor]":
        if self.sums is None or self.total_weight <= 0:
            raise ValueError("no contributions with positive weight were added")
        out = OrderedDict()
        for k, acc in self.sums.items():
            dtype = like[k].dtype if like is not None else torch.float32
            out[k] = (acc / self.total_weight).to(dtype)
        return out
