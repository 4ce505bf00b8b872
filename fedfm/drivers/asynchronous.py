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

This driver only schedules: arrival times come from the device profiles
(:mod:`fedfm.drivers.devices`), so slow devices really are stragglers. It
computes a client's update when the client starts (it sees exactly the
version it downloaded) and hands the encoded upload to the
:class:`~fedfm.server.server.Server` at its virtual arrival time; the server
weights it by its staleness (FedBuff) or mixes it in (FedAsync) and steps
every ``buffer_size`` arrivals.

Checkpoints (``fedfm run --resume``) hold the clients in flight: their
encoded uploads, base versions and arrival times, the start counter and the
engine's random stream (:meth:`AsyncEngine.state_dict`); the versions they
started from are the server's.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fedfm.config.schema import AsyncConfig
from fedfm.drivers.simulation import memory_record
from fedfm.errors import FedfmError
from fedfm.seeds import derive_seed

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
    """Drives a :class:`~fedfm.drivers.simulation.Simulation`'s server and clients one server step at a time."""

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
        self.memory: list = []  # the measured peak memory of clients started since the last server step
        self.step_s: list = []  # and their seconds per local step

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
        """The client downloads the newest version now; its upload (or drop-out) is scheduled."""
        sim, seq = self.sim, self.started
        self.started += 1
        self.busy.add(cid)
        server, fleet = sim.server, sim.fleet
        version = server.version
        down = server.broadcast(cid)
        drop = fleet.drop_point(cid, seq, salt=0xA5)
        if drop is not None:
            t = fleet.transfer_s(cid, len(down)) + drop * fleet.compute_s(cid, sim.steps_of(cid))
            heapq.heappush(self.heap, InFlight(sim.clock + t, seq, cid, version))
            return
        # ``seq`` (the start number) takes the round's place in the client's seeds: unique per start.
        if sim.app.attack is not None:  # an attacker's boost assumes a buffer's worth of peers
            sim.app.attack.begin_round(self.buffer_size, len(sim.app.attack.malicious))
        reply = sim.app.fit(sim.clients[cid], down, seq)
        self.memory.append(reply.memory_mb)  # measured now, reported with the next server step
        self.step_s.append(reply.step_s)
        if reply.payload is None:  # sat out (budget spent): it frees its slot at once
            heapq.heappush(self.heap, InFlight(sim.clock, seq, cid, version))
            return
        t = fleet.duration(cid, reply.steps or sim.steps_of(cid), len(down), len(reply.payload))
        heapq.heappush(self.heap, InFlight(sim.clock + t, seq, cid, version, reply.payload, reply.loss, reply.examples))

    def _fill(self) -> None:
        while len(self.heap) < self.cfg.concurrency:
            cid = self._pick()
            if cid is None:
                break
            self._start(cid)
        if not self.heap:
            raise FedfmError("asynchronous: no client is online and able to train")

    # -- one server step -------------------------------------------------------------
    def step(self, round_idx: int, on_client=None) -> dict:
        """Run the clock until ``buffer_size`` updates are folded into the next global version."""
        sim, server, t0 = self.sim, self.sim.server, time.perf_counter()
        server.open_round(round_idx)
        folded, dropped, losses, weights = 0, 0, [], []
        while folded < self.buffer_size:
            self._fill()
            job = heapq.heappop(self.heap)
            self.busy.discard(job.cid)
            sim.clock = max(sim.clock, job.arrival)
            if job.payload is None:
                dropped += 1
                server.forget(job.cid)
                log.info("async step %d: client %d dropped out", round_idx, job.cid)
                continue
            if server.receive(job.payload, job.cid):
                folded += 1
                losses.append(job.loss)
                weights.append(job.examples)
            if on_client is not None:
                on_client(job.cid)
        record = server.close_round()
        measured = memory_record(self.memory, self.step_s)
        self.memory, self.step_s = [], []
        return {
            "round": round_idx,
            "accepted": folded,
            "dropped": dropped,
            "train_loss": float(np.average(losses, weights=weights)) if losses and sum(weights) > 0 else float("nan"),
            "virtual_s": sim.clock,
            **record,
            **measured,
            "round_s": time.perf_counter() - t0,
        }

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self, tensors: dict, orders: dict) -> dict:
        """JSON state; the in-flight uploads go into ``tensors`` (``async/payload/<seq>``).

        A checkpoint section (:class:`fedfm.server.checkpoint.Checkpointer`'s ``sections``).
        """
        inflight = []
        for job in sorted(self.heap):
            if job.payload is not None:
                tensors[f"async/payload/{job.seq}"] = torch.frombuffer(bytearray(job.payload), dtype=torch.uint8)
            inflight.append({"arrival": job.arrival, "seq": job.seq, "cid": job.cid, "base_version": job.base_version,
                             "payload": job.payload is not None, "loss": job.loss, "examples": job.examples})
        return {"rng": self.rng.bit_generator.state, "started": self.started, "inflight": inflight}

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

    def summary(self) -> dict:
        return async_summary(self.cfg, self.buffer_size, self.sim.server, self.started)


def async_summary(cfg: AsyncConfig, buffer_size: int, server, started: int) -> dict:
    """What ``summary.json`` reports under ``asynchronous`` (simulated or deployed)."""
    taus = server.staleness_seen
    return {
        "method": cfg.method,
        "buffer_size": buffer_size,
        "concurrency": cfg.concurrency,
        "staleness": cfg.staleness,
        "staleness_mean": float(np.mean(taus)) if taus else 0.0,
        "staleness_max": int(max(taus, default=0)),
        "clients_started": started,
    }
