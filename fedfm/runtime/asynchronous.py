"""Buffered asynchronous training on the virtual clock: FedBuff and FedAsync.

FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS): ``concurrency`` clients train at once, each from the
global version current when it started; the server folds every update as it
arrives, weighted by its staleness ``s(tau)``, and after ``buffer_size`` of
them finishes the fold (the algorithm's server step) into a new version. A
client that reports, drops out or is rejected frees its slot, and a new
client starts at once from the newest version.

FedAsync (Xie et al. 2019, "Asynchronous Federated Optimization"): every
arrival is mixed in at once, ``x_t <- (1 - a_tau) x_t + a_tau x_client`` with
``a_tau = mixing * s(tau)``; that is the same fold with a buffer of one and
the update rebased on the current version, ``delta' = x_base + delta - x_t``.

Arrival times come from the device profiles (fedfm.runtime.devices), so slow
devices really are stragglers. The simulation computes a client's update
when it starts (it sees exactly the version it would have downloaded) and
delivers it at its virtual arrival time; the one shared model and the
server fold are reused as in synchronous rounds.

Checkpoints (``fedfm run --resume``) hold the clients in flight: their
encoded uploads, base versions and arrival times, the base models FedAsync
still needs, the start counter and the engine's random stream
(:meth:`AsyncEngine.state_dict`).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from fedfm.algorithms.staleness import staleness_weight
from fedfm.config.schema import AsyncConfig
from fedfm.errors import FedfmError
from fedfm.runtime.checkpoint import get_group, put_group
from fedfm.runtime.client import derive_seed

log = logging.getLogger("fedfm")


@dataclass(order=True)
class InFlight:
    """A client between its download and its upload (ordered by arrival time, then start order)."""

    arrival: float
    seq: int
    cid: int = field(compare=False)
    base_version: int = field(compare=False)
    payload: bytes | None = field(compare=False, default=None)  # None: it drops out at ``arrival``
    loss: float = field(compare=False, default=float("nan"))
    examples: int = field(compare=False, default=0)


class AsyncEngine:
    """Drives a :class:`~fedfm.runtime.simulation.Simulation` one asynchronous server step at a time."""

    def __init__(self, sim, cfg: AsyncConfig) -> None:
        if cfg.concurrency > len(sim.clients):
            raise FedfmError(f"asynchronous.concurrency={cfg.concurrency} exceeds the {len(sim.clients)} clients")
        self.sim = sim
        self.cfg = cfg
        self.buffer_size = 1 if cfg.method == "fedasync" else cfg.buffer_size
        self.rng = np.random.default_rng(derive_seed(sim.seed, 0xA5C))
        self.heap: list[InFlight] = []
        self.busy: set[int] = set()
        self.started = 0
        self.bases: dict[int, "OrderedDict"] = {}  # fedasync: the versions in-flight clients started from
        self.staleness_seen: list[int] = []

    # -- starting clients --------------------------------------------------------------
    def _pick(self) -> int | None:
        """A uniformly drawn idle client that is online now, or None when no try finds one."""
        sim = self.sim
        idle = [c for c in range(len(sim.clients)) if c not in self.busy]
        for _ in range(100):
            if not idle:
                return None
            cid = int(idle[self.rng.integers(len(idle))])
            if sim.fleet.online_now(cid, self.rng):
                return cid
        return None

    def _start(self, cid: int) -> None:
        """The client downloads the newest version now; its update (or drop-out) is scheduled."""
        sim, seq = self.sim, self.started
        self.started += 1
        self.busy.add(cid)
        algo, fleet = sim.algorithm, sim.fleet
        down, down_raw = sim._encode_down(algo.broadcast(sim.global_state, sim.version))
        sim.ledger.record(cid, "down", len(down), raw=down_raw)
        drop = fleet.drop_point(cid, seq, salt=0xA5)
        if drop is not None:
            t = fleet.transfer_s(cid, len(down)) + drop * fleet.compute_s(cid, sim.steps_of(cid))
            heapq.heappush(self.heap, InFlight(sim.clock + t, seq, cid, sim.version))
            return
        client = sim.clients[cid]
        # ``seq`` (the start number) takes the round's place in the client's seeds: unique per start.
        update = sim.trainer.local_update(algo, sim._decode_down(down), client, seq)
        if update is None:  # sat out (budget spent): it frees its slot at once
            heapq.heappush(self.heap, InFlight(sim.clock, seq, cid, sim.version))
            return
        if cid in sim.malicious:
            gen = torch.Generator().manual_seed(derive_seed(sim.seed, seq, cid, 0xBAD))
            update.delta = sim.attack.apply(update.delta, [], num_clients=self.buffer_size,
                                            num_byzantine=len(sim.malicious), generator=gen)
        up, up_raw = sim._encode_up(update, client, seq)
        sim.ledger.record(cid, "up", len(up), raw=up_raw)
        sim.uploads += 1
        t = fleet.duration(cid, int(update.metrics.get("steps", sim.steps_of(cid))), len(down), len(up))
        if self.cfg.method == "fedasync" and sim.version not in self.bases:
            self.bases[sim.version] = OrderedDict((k, v.clone()) for k, v in sim.global_state.items())
        heapq.heappush(self.heap, InFlight(sim.clock + t, seq, cid, sim.version, up,
                                           float(update.metrics["train_loss"]), update.num_examples))

    def _fill(self) -> None:
        while len(self.heap) < self.cfg.concurrency:
            cid = self._pick()
            if cid is None:
                break
            self._start(cid)
        if not self.heap:
            raise FedfmError("asynchronous: no client is online and able to train")

    # -- one server step -------------------------------------------------------------
    def _transform(self, tau: int, base_version: int):
        cfg, sim = self.cfg, self.sim
        s = staleness_weight(tau, cfg.staleness, cfg.staleness_exponent, cfg.hinge_a, cfg.hinge_b)

        def apply(update):
            if cfg.method == "fedasync":  # x + a s(tau) (x_base + delta - x)
                base, g = self.bases[base_version], sim.global_state
                update.delta = OrderedDict((k, (base[k] + d - g[k]) * (cfg.mixing * s)) for k, d in update.delta.items())
            else:
                update.delta = OrderedDict((k, d * s) for k, d in update.delta.items())
            return update

        return apply

    def step(self, round_idx: int, on_client=None) -> dict:
        """Run the clock until ``buffer_size`` updates are folded into the next global version."""
        sim, t0 = self.sim, time.perf_counter()
        sim.ledger.start_round()
        sim.algorithm.start(sim.global_state, sim.version)
        folded, dropped, stale, losses, weights, taus = 0, 0, 0, [], [], []
        while folded < self.buffer_size:
            self._fill()
            job = heapq.heappop(self.heap)
            self.busy.discard(job.cid)
            sim.clock = max(sim.clock, job.arrival)
            if job.payload is None:
                dropped += 1
                log.info("async step %d: client %d dropped out", round_idx, job.cid)
                continue
            tau = sim.version - job.base_version
            if self.cfg.max_staleness is not None and tau > self.cfg.max_staleness:
                stale += 1
                sim._reject(round_idx, job.cid, f"stale: staleness {tau} > max_staleness {self.cfg.max_staleness}")
                continue
            if sim._receive(job.payload, round_idx, transform=self._transform(tau, job.base_version)):
                folded += 1
                taus.append(tau)
                losses.append(job.loss)
                weights.append(job.examples)
            if on_client is not None:
                on_client(job.cid)
        sim.global_state = sim.algorithm.finish()
        sim.version += 1
        self.staleness_seen.extend(taus)
        live = {j.base_version for j in self.heap}
        self.bases = {v: s for v, s in self.bases.items() if v in live}
        return {
            "round": round_idx,
            "version": sim.version,
            "accepted": folded,
            "dropped": dropped,
            "stale": stale,
            "staleness_mean": float(np.mean(taus)) if taus else 0.0,
            "staleness_max": int(max(taus, default=0)),
            "train_loss": float(np.average(losses, weights=weights)) if losses and sum(weights) > 0 else float("nan"),
            "virtual_s": sim.clock,
            **sim.ledger.snapshot(),
            "round_s": time.perf_counter() - t0,
        }

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self, tensors: dict, orders: dict) -> dict:
        """JSON state; the in-flight uploads and FedAsync's base models go into ``tensors`` (``async/...``).

        A checkpoint section (fedfm.runtime.checkpoint.Checkpointer's ``sections``).
        """
        inflight = []
        for job in sorted(self.heap):
            if job.payload is not None:
                tensors[f"async/payload/{job.seq}"] = torch.frombuffer(bytearray(job.payload), dtype=torch.uint8)
            inflight.append({"arrival": job.arrival, "seq": job.seq, "cid": job.cid, "base_version": job.base_version,
                             "payload": job.payload is not None, "loss": job.loss, "examples": job.examples})
        for version, state in self.bases.items():
            put_group(tensors, orders, f"async/base/{version}", state)
        return {"rng": self.rng.bit_generator.state, "started": self.started, "inflight": inflight,
                "bases": list(self.bases), "staleness_seen": list(self.staleness_seen)}

    def load_state_dict(self, meta: dict, tensors, orders: dict) -> None:
        """Put the clients in flight, the counters and the random stream back (inverse of :meth:`state_dict`)."""
        self.rng.bit_generator.state = meta["rng"]
        self.started = int(meta["started"])
        self.heap = []
        for j in meta["inflight"]:
            payload = tensors[f"async/payload/{j['seq']}"].numpy().tobytes() if j["payload"] else None
            self.heap.append(InFlight(float(j["arrival"]), int(j["seq"]), int(j["cid"]), int(j["base_version"]),
                                      payload, float(j["loss"]), int(j["examples"])))
        heapq.heapify(self.heap)
        self.busy = {j.cid for j in self.heap}
        self.bases = {int(v): get_group(tensors, orders, f"async/base/{v}") for v in meta["bases"]}
        self.staleness_seen = [int(t) for t in meta["staleness_seen"]]

    def summary(self) -> dict:
        taus = self.staleness_seen
        return {
            "method": self.cfg.method,
            "buffer_size": self.buffer_size,
            "concurrency": self.cfg.concurrency,
            "staleness": self.cfg.staleness,
            "staleness_mean": float(np.mean(taus)) if taus else 0.0,
            "staleness_max": int(max(taus, default=0)),
            "clients_started": self.started,
        }
