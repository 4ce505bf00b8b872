"""Buffered asynchronous training over Flower nodes: FedBuff and FedAsync through the Grid, in real time.

Flower's strategies are synchronous. Its Grid is not: messages are pushed
and pulled independently, so the server can keep ``asynchronous.concurrency``
nodes busy, fold each reply the moment it is pulled (weighted by its
staleness by the :class:`~fedfm.server.server.Server`, exactly as in the
simulated engine, :mod:`fedfm.drivers.asynchronous`) and take a server step
every ``buffer_size`` folded updates (FedBuff, Nguyen et al. 2022; FedAsync,
Xie et al. 2019: a buffer of one, mixed in). A node that replies, fails or
misses ``deploy.round_timeout_s`` frees its slot and an idle node, drawn
uniformly, starts at once from the newest version.

Replies pulled beyond a full buffer wait for the next server step, as in
FedBuff. ``federation.rounds`` counts server steps. A resumed server starts
with no node in flight (the in-flight work of the killed server is lost).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from fedfm.deploy.driver import POLL_S, Deployment
from fedfm.deploy.messages import payload_size
from fedfm.drivers.asynchronous import async_summary
from fedfm.drivers.simulation import memory_record, reported_memory
from fedfm.seeds import derive_seed

log = logging.getLogger("fedfm")


@dataclass
class Job:
    """One node between its download and its reply."""

    cid: int
    seq: int  # start number: takes the round's place in the client's seeds
    started: float  # time.monotonic()


class AsyncDeployment:
    """Server steps of ``deployment``'s server over its nodes (see the module docstring)."""

    def __init__(self, deployment: Deployment, cfg) -> None:
        self.d = deployment
        self.cfg = cfg
        self.buffer_size = 1 if cfg.method == "fedasync" else cfg.buffer_size
        self.rng = np.random.default_rng(derive_seed(deployment.seed, 0xA5C))
        self.jobs: dict[str, Job] = {}  # Flower message id -> job
        self.ready: deque = deque()  # (job, reply) pulled but not folded yet
        self.started = 0

    def _fill(self) -> None:
        """Start idle live nodes from the newest version until ``concurrency`` are busy."""
        d, server = self.d, self.d.server
        busy = {j.cid for j in self.jobs.values()} | {j.cid for j, _ in self.ready}
        idle = [c for c in d.live() if c not in busy]
        while idle and len(self.jobs) + len(self.ready) < self.cfg.concurrency:
            cid = idle.pop(int(self.rng.integers(len(idle))))
            seq, self.started = self.started, self.started + 1
            message = d.message(d.header("train", round=seq, cid=cid), server.broadcast(cid), d.node_of[cid],
                                 "train", d.cfg.deploy.round_timeout_s)
            d.wire["down"] += payload_size(message)
            for mid in d.grid.push_messages([message]):
                self.jobs[mid] = Job(cid, seq, time.monotonic())

    def _pull(self) -> None:
        for reply in self.d.grid.pull_messages(list(self.jobs)):
            job = self.jobs.pop(reply.metadata.reply_to_message_id, None)
            if job is not None:
                self.ready.append((job, reply))
        timeout = self.d.cfg.deploy.round_timeout_s
        for mid, job in list(self.jobs.items()):
            if time.monotonic() - job.started > timeout:
                del self.jobs[mid]
                self.ready.append((job, None))

    def step(self, round_idx: int, on_client=None) -> dict:
        """Fold replies as they arrive until ``buffer_size`` are in; then the server steps."""
        d, server, t0 = self.d, self.d.server, time.perf_counter()
        d.register(timeout_s=min(30.0, d.cfg.deploy.round_timeout_s))
        server.open_round(round_idx)
        folded, dropped, failed, losses, weights, memory = 0, 0, 0, [], [], []
        while folded < self.buffer_size:
            self._fill()
            if not self.ready:
                self._pull()
                if not self.ready:
                    time.sleep(POLL_S)
                    continue
            job, reply = self.ready.popleft()
            if reply is None:
                dropped += 1
                server.forget(job.cid)
                log.warning("async step %d: client %d did not reply in time: dropped", round_idx, job.cid)
                continue
            outcome, header = d.deliver(job.cid, reply, f"async step {round_idx}")
            failed += outcome == "failed"
            dropped += outcome == "dropped"
            if outcome == "folded":
                folded += 1
                losses.append(float(header.get("loss", float("nan"))))
                weights.append(max(int(header.get("examples", 0)), 0))
                memory.append(reported_memory(header))
            if on_client is not None:
                on_client(job.cid)
        record = server.close_round()
        loss = float(np.average(losses, weights=weights)) if losses and sum(weights) > 0 else float("nan")
        return {"round": round_idx, "accepted": folded, "dropped": dropped, "failed": failed, "train_loss": loss,
                **record, **memory_record(memory),
                "flower_payload_up": d.wire["up"], "flower_payload_down": d.wire["down"],
                "round_s": time.perf_counter() - t0}

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self, tensors: dict, orders: dict) -> dict:
        return {"rng": self.rng.bit_generator.state, "started": self.started}

    def load_state_dict(self, meta: dict, tensors, orders: dict) -> None:
        self.rng.bit_generator.state = meta["rng"]
        self.started = int(meta["started"])

    def summary(self) -> dict:
        return async_summary(self.cfg, self.buffer_size, self.d.server, self.started)
