"""In-process simulation of synchronous rounds: the default driver.

A driver only drives. Each round it samples a cohort, moves the server's
broadcast to every sampled client's :class:`~fedfm.client.client.ClientApp`
(one per process, on the one shared model) and each reply back to the
:class:`~fedfm.server.server.Server`, and keeps time; the server decodes,
validates, aggregates, adds noise and versions, the client trains and encodes.

With device profiles (:mod:`fedfm.drivers.devices`) rounds run on a virtual
clock: a cohort is drawn from the clients online that round, a client may drop
out mid-round (the round goes on without it), a sync round lasts until its
slowest reporting client (or ``devices.deadline_s``: later updates arrive too
late to count). With multi-process workers (:mod:`fedfm.drivers.workers`)
every process drives its share of the cohort against its own copy of the
server, and the partial folds are summed before the round closes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from fedfm.client.client import ClientApp
from fedfm.client.data import Client
from fedfm.data.encode import steps_for
from fedfm.drivers.devices import Fleet, smaller_rank
from fedfm.seeds import derive_seed
from fedfm.client.state import pack_client_states, unpack_client_states
from fedfm.server.server import Server

log = logging.getLogger("fedfm")


def sample_cohort(num_clients: int, cohort_size: int, seed: int, round_idx: int) -> list[int]:
    """Uniform sampling without replacement, reproducible from (seed, round)."""
    rng = np.random.default_rng(derive_seed(seed, round_idx, 0x5A3))
    return sorted(int(c) for c in rng.choice(num_clients, size=cohort_size, replace=False))


def sample_from(eligible: np.ndarray, cohort_size: int, seed: int, round_idx: int) -> list[int]:
    """Uniform sampling without replacement among ``eligible`` ids (all of them when fewer)."""
    if len(eligible) <= cohort_size:
        return sorted(int(c) for c in eligible)
    rng = np.random.default_rng(derive_seed(seed, round_idx, 0x5A3))
    return sorted(int(c) for c in rng.choice(eligible, size=cohort_size, replace=False))


@dataclass
class RoundTally:
    """What one process saw of a round's replies (merged across workers in multi-process runs)."""

    accepted: int = 0
    losses: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    times: list = field(default_factory=list)  # virtual arrival (or drop-out) times
    dropped: list = field(default_factory=list)
    late: list = field(default_factory=list)
    memory: list = field(default_factory=list)  # each client's measured peak memory while training (MB)
    step_s: list = field(default_factory=list)  # each client's wall seconds per local step

    def train_loss(self) -> float:
        return float(np.average(self.losses, weights=self.weights)) if self.losses else float("nan")

    def memory_record(self) -> dict:
        """The cohort's measured client memory (mean and max, MB) and seconds per local step (mean)."""
        return memory_record(self.memory, self.step_s)

    LISTS = ("losses", "weights", "times", "dropped", "late", "memory", "step_s")

    def facts(self) -> dict:
        return {"accepted": self.accepted, **{k: getattr(self, k) for k in self.LISTS}}

    def absorb(self, other: dict) -> None:
        self.accepted += other["accepted"]
        for k in self.LISTS:
            getattr(self, k).extend(other[k])


MAX_REPORTED_MB = 1e7  # 10 TB: a node claiming more is not believed


def reported_memory(header: dict) -> float | None:
    """A deployed node's reported peak memory (MB) when it is plausible (a finite number in [0, 10 TB]), else None."""
    value = header.get("memory_mb")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if 0 <= value <= MAX_REPORTED_MB else None  # NaN fails both comparisons


def memory_record(memory: list, step_s: list = ()) -> dict:
    """``client_memory_mb_mean`` / ``_max`` of the measured peaks in ``memory`` (MB) and ``client_step_s``,
    the mean of ``step_s`` (seconds per local step); a key is left out when nothing was measured."""
    values = [float(m) for m in memory if m is not None]
    steps = [float(s) for s in step_s if s is not None]
    out = {}
    if values:
        out.update(client_memory_mb_mean=float(np.mean(values)), client_memory_mb_max=float(max(values)))
    if steps:
        out["client_step_s"] = float(np.mean(steps))
    return out


class Simulation:
    """Synchronous rounds of ``server`` over ``clients``, whose side ``app`` runs on this process's model.

    ``fleet``: device profiles and the virtual clock (None or disabled: all alike, no clock);
    ``secure_dropout``: the chance a client vanishes after sharing its secure-aggregation keys;
    ``group``: this process's :class:`~fedfm.drivers.workers.WorkerGroup` (None: it drives every client).
    """

    def __init__(self, server: Server, app: ClientApp, clients: Sequence[Client], clients_per_round: int, seed: int,
                 *, fleet: Fleet | None = None, secure_dropout: float = 0.0, group=None) -> None:
        self.server = server
        self.app = app
        self.clients = list(clients)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.fleet = fleet
        self.secure_dropout = secure_dropout
        self.group = group
        self.clock = 0.0  # virtual seconds since the start of the run

    @property
    def virtual(self) -> bool:
        """True when rounds run on the virtual clock of device profiles."""
        return self.fleet is not None and self.fleet.enabled

    @property
    def malicious(self) -> set[int]:
        return self.app.attack.malicious if self.app.attack is not None else set()

    def steps_of(self, cid: int) -> int:
        """Local steps the client runs in a round (what its compute time is made of)."""
        cfg = self.app.trainer.cfg
        return steps_for(len(self.clients[cid].train_idx), cfg.batch_size, cfg.local_steps, cfg.local_epochs)

    def cohort(self, round_idx: int) -> list[int]:
        if self.virtual:  # drawn among the clients online this round
            return sample_from(self.fleet.eligible(round_idx), self.clients_per_round, self.seed, round_idx)
        return sample_cohort(len(self.clients), self.clients_per_round, self.seed, round_idx)

    def run_round(self, round_idx: int, on_client: Callable[[int], None] | None = None) -> dict:
        """One synchronous round; returns its record (without evaluation)."""
        t0 = time.perf_counter()
        server, cohort = self.server, self.cohort(round_idx)
        server.open_round(round_idx, cohort)
        tally = RoundTally()
        bad = [c for c in cohort if c in self.malicious]
        if not server.aborted:
            if self.app.attack is not None:
                self.app.attack.begin_round(len(cohort), len(bad))
            order = [c for c in cohort if c not in self.malicious] + bad  # honest clients first (colluding attacks)
            mine = order if self.group is None else self.group.share(order, self.steps_of)  # this worker's clients
            self._drive(mine, round_idx, tally, self._vanishing(cohort, round_idx), on_client)
            if self.group is not None:  # all-reduce the partial folds, gather what the others saw
                self._merge_workers(tally, mine)
        record = server.close_round()
        if "aborted" in record:  # nothing is released, the global model stays
            return {"round": round_idx, "cohort": cohort, "accepted": 0, "train_loss": float("nan"), **record,
                    "round_s": time.perf_counter() - t0}
        if self.virtual:  # the round lasts until its last arrival (or the deadline)
            round_virtual = max(tally.times, default=0.0)
            self.clock += round_virtual
            record.update(virtual_s=self.clock, round_virtual_s=round_virtual, dropped=len(tally.dropped),
                          late=len(tally.late))
        return {"round": round_idx, "cohort": cohort, "accepted": tally.accepted, "malicious": len(bad),
                "train_loss": tally.train_loss(), **record, **tally.memory_record(),
                "round_s": time.perf_counter() - t0}

    def _drive(self, mine: list[int], round_idx: int, tally: RoundTally, vanished: set[int], on_client) -> None:
        """Move the broadcast to each of this process's clients and its reply back to the server."""
        server, fleet = self.server, self.fleet
        secure = server.session
        drops = {c: fleet.drop_point(c, round_idx) if self.virtual else None for c in mine}  # mid-round
        if hasattr(self.app.trainer, "schedule"):  # batched local training: the clients that will train, in order
            self.app.trainer.schedule([self.clients[c] for c in mine if c not in vanished and drops[c] is None])
        for cid in mine:
            down = server.broadcast(cid)
            if drops[cid] is not None:  # drops out mid-round: the round goes on without it
                tally.times.append(fleet.transfer_s(cid, len(down)) + drops[cid] * fleet.compute_s(cid, self.steps_of(cid)))
                tally.dropped.append(cid)
                log.info("round %d: client %d dropped out after %.0f%% of its work", round_idx, cid, 100 * drops[cid])
                if secure is None:
                    continue
                vanished = vanished | {cid}  # after sharing keys: its masks are recovered
            if cid in vanished:  # drops out after sharing keys: its masks are recovered
                continue
            reply = self.app.fit(self.clients[cid], down, round_idx, secure=secure)
            if reply.sat_out:
                continue
            tally.memory.append(reply.memory_mb)
            tally.step_s.append(reply.step_s)
            ok = reply.masked or (reply.payload is not None and self._deliver(reply, cid, len(down), tally))
            if ok is None:  # arrived after the deadline
                continue
            if ok:
                tally.accepted += 1
                tally.losses.append(reply.loss)
                tally.weights.append(reply.examples)
            if on_client is not None:
                on_client(cid)

    def _deliver(self, reply, cid: int, down_bytes: int, tally: RoundTally) -> bool | None:
        """Hand one upload to the server: whether it was folded (None: it arrived after the round's deadline)."""
        if self.virtual:
            t = self.fleet.duration(cid, reply.steps or self.steps_of(cid), down_bytes, len(reply.payload))
            deadline = self.fleet.cfg.deadline_s
            tally.times.append(t if deadline is None else min(t, deadline))
            if deadline is not None and t > deadline:  # the round closed before it arrived
                tally.late.append(cid)
                self.server.discard(reply.payload, cid, f"late: arrived at {t:.1f}s, after the {deadline:g}s deadline")
                return None
        return self.server.receive(reply.payload, cid)

    def _vanishing(self, cohort: list[int], round_idx: int) -> set[int]:
        """Clients that drop out after secure-aggregation key sharing this round (simulated, reproducible)."""
        if self.server.session is None or self.secure_dropout <= 0:
            return set()
        rng = np.random.default_rng(derive_seed(self.seed, round_idx, 0xD20))
        return {c for c in cohort if rng.random() < self.secure_dropout}

    def _merge_workers(self, tally: RoundTally, mine: list[int]) -> None:
        """Sum the workers' partial folds; take in the other workers' facts and client states."""
        group, server = self.group, self.server
        sums, scalars = server.partial()
        total = group.sum_tensors(sums)
        everyone = group.gather_json({"tally": tally.facts(), "server": server.round_facts(), "scalars": scalars})
        server.merge(total, [f["scalars"] for f in everyone])
        blobs = group.gather_bytes(pack_client_states([self.clients[c] for c in mine]))
        for rank, (f, blob) in enumerate(zip(everyone, blobs)):
            if rank == group.rank:
                continue
            unpack_client_states(self.clients, blob)
            server.absorb(f["server"])
            tally.absorb(f["tally"])

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self, tensors: dict, orders: dict) -> dict:
        """The driver's own state: the virtual clock (the clients' states are their own section)."""
        return {"clock": self.clock}

    def load_state_dict(self, meta: dict, tensors, orders: dict) -> None:
        self.clock = float(meta["clock"])


def simulation(trainer, algorithm, clients: Sequence[Client], clients_per_round: int, seed: int, initial_state, *,
               fleet: Fleet | None = None, full_rank: int | None = None, wire=None, asynchronous=None) -> Simulation:
    """A plain simulation (no privacy, no attack) of ``algorithm`` from parts: for tests, benchmarks, notebooks.

    ``full_rank``: the global LoRA rank when the fleet's clients train smaller ones (HetLoRA);
    ``asynchronous``: an enabled ``AsyncConfig`` for the server's staleness weighting (drive it
    with :class:`~fedfm.drivers.asynchronous.AsyncEngine`).
    """
    rank_of = smaller_rank(fleet, full_rank) if full_rank is not None and fleet is not None else None
    server = Server(algorithm, initial_state, wire=wire, rank_of=rank_of, seed=seed, asynchronous=asynchronous)
    return Simulation(server, ClientApp(trainer, algorithm, server.wire), clients, clients_per_round, seed, fleet=fleet)
