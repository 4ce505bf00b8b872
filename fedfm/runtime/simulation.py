"""In-process simulation: the default runtime.

Each round samples a cohort, encodes one broadcast, runs every sampled
client's ``local_update`` on the single shared model, encodes each update as
it would travel, validates it, and folds it into the server aggregate. The
algorithm never learns that it is simulated.

With device profiles (fedfm.runtime.devices) the rounds run on a virtual
clock: a cohort is drawn from the clients online that round, a client may
drop out mid-round (the round goes on without it), a sync round lasts until
its slowest reporting client (or ``devices.deadline_s``), and clients of a
smaller LoRA rank upload only their rank (HetLoRA, fedfm.runtime.hetlora).
With ``asynchronous.enabled`` each ``run_round`` is one buffered server step
instead (fedfm.runtime.asynchronous).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from fedfm.algorithms.base import Algorithm
from fedfm.compression.codecs import CodecError
from fedfm.data.encode import steps_for
from fedfm.robustness.validate import update_problem
from fedfm.runtime import hetlora
from fedfm.runtime.checkpoint import pack_client_states, unpack_client_states
from fedfm.runtime.client import Client, LocalTrainer, derive_seed
from fedfm.runtime.devices import Fleet
from fedfm.runtime.ledger import ByteLedger
from fedfm.privacy.secagg_crypto import SecAggAbort
from fedfm.runtime.secure_round import SecureRound
from fedfm.runtime.wire import WireError, decode_broadcast, decode_update, encode_broadcast, encode_update

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
    """What one process saw of a round's clients (merged across workers in multi-process runs)."""

    rejected_from: int = 0  # len(sim.rejected) when the round began
    uploads_from: int = 0
    accepted: int = 0
    losses: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    times: list = field(default_factory=list)  # virtual arrival (or drop-out) times
    dropped: list = field(default_factory=list)
    late: list = field(default_factory=list)
    events: list = field(default_factory=list)  # byte-ledger entries [cid, direction, bytes, raw]

    def train_loss(self) -> float:
        return float(np.average(self.losses, weights=self.weights)) if self.losses else float("nan")

    def facts(self, rejected: list, uploads: int, scalars: list) -> dict:
        keys = ("accepted", "losses", "weights", "times", "dropped", "late", "events")
        return {**{k: getattr(self, k) for k in keys}, "rejected": rejected, "uploads": uploads, "scalars": scalars}

    def absorb(self, other: dict) -> None:
        self.accepted += other["accepted"]
        for k in ("losses", "weights", "times", "dropped", "late"):
            getattr(self, k).extend(other[k])


class Simulation:
    """Runs synchronous rounds of ``algorithm`` over ``clients`` on one model."""

    def __init__(
        self,
        trainer: LocalTrainer,
        algorithm: Algorithm,
        clients: Sequence[Client],
        clients_per_round: int,
        seed: int,
        initial_state: "OrderedDict[str, torch.Tensor]",
        attack=None,
        secure=None,
        compressor=None,
        fleet: Fleet | None = None,
        full_rank: int | None = None,
        asynchronous=None,
    ) -> None:
        self.trainer = trainer
        self.algorithm = algorithm
        self.clients = list(clients)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.global_state = OrderedDict((k, v.detach().clone()) for k, v in initial_state.items())
        self.version = 0
        # Codecs on the wire (fedfm.compression.Compressor) or None: the plain wire format.
        self.compressor = compressor
        self.ledger = ByteLedger(report_raw=compressor is not None)
        self.uploads = 0  # update payloads sent (the compression factor's denominator counts them)
        self.rejected: list[dict] = []
        # Simulated attackers (fedfm.robustness.attacks.Attack): the same clients every round.
        self.attack = attack if attack is not None and attack.name != "none" else None
        self.malicious = set(attack.malicious(len(self.clients))) if self.attack else set()
        # Secure aggregation (fedfm.config.schema.SecureAggregationConfig): the fold sees only sums.
        self.secure = secure if secure is not None and secure.enabled else None
        # Device profiles and the virtual clock (fedfm.runtime.devices); a disabled fleet changes nothing.
        self.fleet = fleet
        self.clock = 0.0  # virtual seconds since the start of the run
        # HetLoRA: the global LoRA rank, when some clients train a smaller one (fedfm.runtime.hetlora).
        self.full_rank = full_rank
        # Buffered asynchronous training (fedfm.runtime.asynchronous.AsyncEngine) or None: sync rounds.
        self.asynchronous = asynchronous
        # Multi-process simulation (fedfm.runtime.workers.WorkerGroup) or None: this process trains every client.
        self.group = None
        # Exponential moving average of the global versions (algorithm.ema_decay), or None.
        self.ema_decay = 0.0
        self.ema_state: "OrderedDict[str, torch.Tensor] | None" = None
        self.ema_version = 0

    @property
    def released_state(self) -> "OrderedDict[str, torch.Tensor]":
        """The model the server evaluates and releases: the EMA of the versions when on, else the newest."""
        return self.ema_state if self.ema_state is not None else self.global_state

    def update_ema(self) -> None:
        """Fold the newest global version into the EMA (once per version).

        ``decay_t = min(decay, (1 + t) / (10 + t))`` for the t-th version, the
        warm-up of TensorFlow's ExponentialMovingAverage, so the average does not
        cling to the initial model; averaging released DP models is
        post-processing and costs no privacy (De et al. 2022, "Unlocking
        High-Accuracy Differentially Private Image Classification through Scale").
        """
        if self.ema_decay <= 0 or self.version == self.ema_version:
            return
        self.ema_version = self.version
        if self.ema_state is None:
            self.ema_state = OrderedDict((k, v.detach().clone()) for k, v in self.global_state.items())
            return
        d = min(self.ema_decay, (1 + self.version) / (10 + self.version))
        self.ema_state = OrderedDict(
            (k, (e * d + self.global_state[k] * (1 - d)).to(e.dtype) if e.is_floating_point() else self.global_state[k].clone())
            for k, e in self.ema_state.items()
        )

    @property
    def virtual(self) -> bool:
        """True when rounds run on the virtual clock of device profiles."""
        return self.fleet is not None and self.fleet.enabled

    def steps_of(self, cid: int) -> int:
        """Local steps the client runs in a round (what its compute time is made of)."""
        cfg = self.trainer.cfg
        return steps_for(len(self.clients[cid].train_idx), cfg.batch_size, cfg.local_steps, cfg.local_epochs)

    def rank_of(self, cid: int) -> int | None:
        """The client's LoRA rank when it trains fewer components than the global adapter (HetLoRA)."""
        if self.full_rank is None or self.fleet is None:
            return None
        rank = self.fleet.rank(cid)
        return rank if rank is not None and rank < self.full_rank else None

    def run_round(self, round_idx: int, on_client: Callable[[int], None] | None = None) -> dict:
        """One synchronous round (or asynchronous server step); returns its record (without evaluation)."""
        if self.asynchronous is not None:
            return self.asynchronous.step(round_idx, on_client)
        t0 = time.perf_counter()
        self.ledger.start_round()
        if self.virtual:  # drawn among the clients online this round
            cohort = sample_from(self.fleet.eligible(round_idx), self.clients_per_round, self.seed, round_idx)
        else:
            cohort = sample_cohort(len(self.clients), self.clients_per_round, self.seed, round_idx)
        algo = self.algorithm
        algo.start(self.global_state, self.version)
        down, down_raw = self._encode_down(algo.broadcast(self.global_state, self.version))
        tally = RoundTally(rejected_from=len(self.rejected), uploads_from=self.uploads)
        bad = [c for c in cohort if c in self.malicious]
        benign_deltas = []  # kept only for colluding attacks (ALIE, IPM)
        secure, vanished = None, set()
        if self.secure is not None:
            try:
                secure = self._secure_round(cohort, round_idx)
            except SecAggAbort as err:
                return self._aborted(round_idx, cohort, err, t0)
            vanished = self._vanishing(cohort, round_idx)
        deadline = self.fleet.cfg.deadline_s if self.virtual else None
        order = [c for c in cohort if c not in self.malicious] + bad  # honest clients first
        mine = order if self.group is None else self.group.share(order, self.steps_of)  # this worker's clients
        drops = {c: self.fleet.drop_point(c, round_idx) if self.virtual else None for c in mine}  # mid-round
        if hasattr(self.trainer, "schedule"):  # batched local training: the clients that will train, in order
            self.trainer.schedule([self.clients[c] for c in mine if c not in vanished and drops[c] is None])
        for cid in mine:
            client = self.clients[cid]
            self._record(tally, cid, "down", len(down), down_raw)
            drop = drops[cid]
            if drop is not None:  # drops out mid-round: the round goes on without it
                tally.times.append(self.fleet.transfer_s(cid, len(down)) + drop * self.fleet.compute_s(cid, self.steps_of(cid)))
                tally.dropped.append(cid)
                log.info("round %d: client %d dropped out after %.0f%% of its work", round_idx, cid, 100 * drop)
                if secure is None:
                    continue
                vanished = vanished | {cid}  # after sharing keys: its masks are recovered
            if cid in vanished:  # drops out after sharing keys: its masks are recovered
                continue
            update = self.trainer.local_update(algo, self._decode_down(down), client, round_idx)
            if update is None:  # the client sat the round out (its local DP-SGD budget is spent)
                continue
            if cid in self.malicious:
                update.delta = self.attack.apply(
                    update.delta,
                    benign_deltas,
                    num_clients=len(cohort),
                    num_byzantine=len(bad),
                    generator=torch.Generator().manual_seed(derive_seed(self.seed, round_idx, cid, 0xBAD)),
                )
            elif self.attack is not None and self.attack.colluding:
                benign_deltas.append(update.delta)
            if secure is not None:
                ok = self._submit_secure(secure, update, round_idx)
                self.uploads += int(ok)
            else:
                up, up_raw = self._encode_up(update, client, round_idx)
                self._record(tally, cid, "up", len(up), up_raw)
                self.uploads += 1
                if self.virtual:
                    t = self.fleet.duration(cid, int(update.metrics.get("steps", self.steps_of(cid))), len(down), len(up))
                    tally.times.append(t if deadline is None else min(t, deadline))
                    if deadline is not None and t > deadline:  # the round closed before it arrived
                        tally.late.append(cid)
                        self._reject(round_idx, cid, f"late: arrived at {t:.1f}s, after the {deadline:g}s deadline")
                        continue
                ok = self._receive(up, round_idx)
            if ok:
                tally.accepted += 1
                tally.losses.append(update.metrics["train_loss"])
                tally.weights.append(update.num_examples)
            if on_client is not None:
                on_client(cid)
        if self.group is not None:  # all-reduce the partial folds, gather what the others saw
            log.debug("round %d: worker %d trained %d clients in %.2f s", round_idx, self.group.rank, len(mine),
                      time.perf_counter() - t0)
            self._merge_workers(tally, mine)
        round_stats = {}
        if secure is not None:
            try:
                round_stats = secure.finish()
            except SecAggAbort as err:
                return self._aborted(round_idx, cohort, err, t0)
        self.global_state = algo.finish()
        self.version += 1
        if self.virtual:  # the round lasts until its last arrival (or drop-out, or the deadline)
            round_virtual = max(tally.times, default=0.0)
            self.clock += round_virtual
            round_stats.update(virtual_s=self.clock, round_virtual_s=round_virtual, dropped=len(tally.dropped),
                                late=len(tally.late))
        record = {
            "round": round_idx,
            "version": self.version,
            "cohort": cohort,
            "accepted": tally.accepted,
            "malicious": len(bad),
            "train_loss": tally.train_loss(),
            **round_stats,
            **self.ledger.snapshot(),
            "round_s": time.perf_counter() - t0,
        }
        return record

    # -- multi-process simulation (fedfm.runtime.workers) ----------------------------------
    def _record(self, tally: "RoundTally", cid: int, direction: str, nbytes: int, raw: int | None) -> None:
        self.ledger.record(cid, direction, nbytes, raw=raw)
        tally.events.append([cid, direction, nbytes, raw])

    def _merge_workers(self, tally: "RoundTally", mine: list[int]) -> None:
        """Sum the workers' partial folds; take in the other workers' ledger entries, facts and client states."""
        group, fold = self.group, self.algorithm.fold
        sums, scalars = fold.partial()
        total = group.sum_tensors(sums)
        facts = tally.facts(self.rejected[tally.rejected_from:], self.uploads - tally.uploads_from, scalars)
        everyone = group.gather_json(facts)
        fold.merge(total, [f["scalars"] for f in everyone])
        blobs = group.gather_bytes(pack_client_states([self.clients[c] for c in mine]))
        for rank, (f, blob) in enumerate(zip(everyone, blobs)):
            if rank == group.rank:
                continue
            unpack_client_states(self.clients, blob)
            for cid, direction, nbytes, raw in f["events"]:
                self.ledger.record(cid, direction, nbytes, raw=raw)
            self.rejected.extend(f["rejected"])
            self.uploads += f["uploads"]
            tally.absorb(f)

    def _pad_rank(self, update) -> str | None:
        """HetLoRA: zero-pad a smaller-rank update in place; the reason when its shapes are wrong."""
        rank = self.rank_of(update.client_id) if 0 <= update.client_id < len(self.clients) else None
        if rank is None:
            return None
        try:
            update.delta = hetlora.pad(update.delta, self.global_state, rank)
        except ValueError as err:
            return str(err)
        return None

    # -- secure aggregation ------------------------------------------------------
    def _secure_round(self, cohort: list[int], round_idx: int) -> SecureRound:
        cfg = self.secure
        return SecureRound(
            cohort,
            self.algorithm.fold,
            self.global_state,
            self.ledger,
            threshold=cfg.threshold,
            neighbours=cfg.neighbours,
            bits=cfg.bits,
            clip_range=cfg.clip_range,
            max_weight=cfg.max_weight,
            round_seed=derive_seed(self.seed, round_idx, 0x5EC).to_bytes(8, "little"),
        )

    def _vanishing(self, cohort: list[int], round_idx: int) -> set[int]:
        """Clients that drop out after key sharing this round (simulated, reproducible)."""
        if self.secure.dropout <= 0:
            return set()
        rng = np.random.default_rng(derive_seed(self.seed, round_idx, 0xD20))
        return {c for c in cohort if rng.random() < self.secure.dropout}

    def _submit_secure(self, secure: SecureRound, update, round_idx: int) -> bool:
        """The client checks its own update, then uploads only its masked summand."""
        reason = update_problem(update, self.global_state)
        if reason is None:
            try:
                secure.submit(update)
                return True
            except ValueError as err:  # e.g. a non-finite norm found while clipping
                reason = str(err)
        log.warning("round %d: client %d withheld its update: %s", round_idx, update.client_id, reason)
        self.rejected.append({"round": round_idx, "client": update.client_id, "reason": f"withheld: {reason}"})
        return False

    def _aborted(self, round_idx: int, cohort: list[int], err: Exception, t0: float) -> dict:
        """A secure round that could not finish: nothing is released, the global model stays."""
        log.warning("round %d: secure aggregation aborted: %s", round_idx, err)
        return {
            "round": round_idx,
            "version": self.version,
            "cohort": cohort,
            "accepted": 0,
            "aborted": str(err),
            "train_loss": float("nan"),
            **self.ledger.snapshot(),
            "round_s": time.perf_counter() - t0,
        }

    # -- the wire, with or without codecs (fedfm.compression) --------------------------
    def _codes_up(self) -> bool:
        return self.compressor is not None and self.compressor.codes_upload

    def _encode_up(self, update, client: Client, round_idx: int) -> tuple[bytes, int | None]:
        """(payload, its uncoded length or None when it is not coded); EF state stays in client.state."""
        if not self._codes_up():
            return encode_update(update), None
        return self.compressor.encode_update(update, client.state, round_idx)

    def _encode_down(self, broadcast) -> tuple[bytes, int | None]:
        if self.compressor is None or not self.compressor.down.codecs:
            return encode_broadcast(broadcast), None
        return self.compressor.encode_broadcast(broadcast)

    def _decode_down(self, payload: bytes):
        if self.compressor is None or not self.compressor.down.codecs:
            return decode_broadcast(payload)
        return self.compressor.decode_broadcast(payload)

    def _receive(self, payload: bytes, round_idx: int, transform=None) -> bool:
        """Decode, validate and fold one update; a bad one is logged and left out.

        A smaller-rank client's update is zero-padded to the global shapes first
        (HetLoRA); ``transform(update)`` (asynchronous staleness weighting) runs
        after validation, just before the fold.
        """
        try:
            if self._codes_up():  # decoded to a dense update before validation and folding
                update = self.compressor.decode_update(payload, self.global_state)
            else:
                update = decode_update(payload)
        except (WireError, CodecError) as err:
            reason, cid = str(err), -1
        else:
            cid = update.client_id
            reason = self._pad_rank(update)
            reason = reason or update_problem(update, self.global_state)
            if reason is None:
                self.algorithm.add(update if transform is None else transform(update))
                return True
        self._reject(round_idx, cid, reason)
        return False

    def _reject(self, round_idx: int, cid: int, reason: str) -> None:
        log.warning("round %d: rejected update from client %d: %s", round_idx, cid, reason)
        self.rejected.append({"round": round_idx, "client": cid, "reason": reason})
