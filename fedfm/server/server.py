"""The server side of federated training, independent of any runtime.

One object owns everything the server does in a round, in this order:

1. :meth:`Server.open_round` starts the fold on the current global version
   (and, under secure aggregation, the round's key-agreement session);
2. :meth:`Server.broadcast` encodes the version a client downloads;
3. :meth:`Server.receive` takes one encoded update from whatever channel
   delivered it: decode it once (codecs included), check it once, before any
   fold (the sender is who it claims to be, belongs to the round and reports
   once; a plausible example count and data-quality counts; names, shapes, dtypes, NaN/Inf; the norm
   bounds: :mod:`fedfm.robustness.validate`), zero-pad a smaller HetLoRA rank,
   weight it by staleness in asynchronous training, and fold it;
4. :meth:`Server.close_round` unmasks the secure sum, finishes the fold (the
   algorithm's server optimizer step), publishes version ``v + 1``, folds it
   into the EMA, steps the privacy accountant, and returns the round's record
   (with ``rejected`` and ``rejected_by_reason`` when it left updates out).

The fold is the algorithm's own fold wrapped by whatever the config asks for
(a robust rule, client-level DP; :mod:`fedfm.server.compose` builds it), so
no algorithm carries a special case for them. The whole state round-trips
through :meth:`state_dict` / :meth:`load_state_dict` (tensors for
safetensors, the rest JSON), which is all a checkpoint holds of the server.

The server knows nothing of processes, networks or simulated time: the
drivers (:mod:`fedfm.drivers`) sample clients, move the messages and keep time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Mapping

import numpy as np
import torch

from fedfm.algorithms.base import Algorithm, Update
from fedfm.algorithms.staleness import staleness_weight
from fedfm.compression.ledger import ByteLedger
from fedfm.compression.wire import Wire, WireError
from fedfm.models.lora_rank import pad
from fedfm.privacy.secagg_crypto import SecAggAbort
from fedfm.config.schema import ValidationConfig
from fedfm.data.quality import ROWS, report_from_metrics, report_problem
from fedfm.robustness.validate import NormBound, examples_problem, l2_norm, tensors_problem
from fedfm.seeds import derive_seed
from fedfm.server import state as server_state
from fedfm.server.ema import Ema
from fedfm.server.secure import SecureRound

log = logging.getLogger("fedfm")

Tensors = "OrderedDict[str, torch.Tensor]"


def clone(state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, v.detach().clone()) for k, v in state.items())


class Server:
    """The global model, its fold and everything wrapped around it (see the module docstring).

    Args:
        algorithm: the algorithm whose ``fold`` (possibly wrapped) aggregates and whose
            ``broadcast`` builds what travels down.
        initial_state: the global trainable state of version 0.
        wire: the run's codecs (None: the plain format).
        privacy: a :class:`fedfm.server.compose.Privacy` (client-level DP accountant and budget) or None.
        ema_decay: ``algorithm.ema_decay`` (0: the released model is the newest version).
        secure: ``privacy.secure_aggregation`` when enabled, else None.
        asynchronous: ``asynchronous`` when enabled (staleness weights, FedAsync mixing), else None.
        rank_of: a client's HetLoRA rank when below the global one, else None.
        seed: the public run seed (secure aggregation's per-round graph seed).
        validation: the ``validation`` section (None: its defaults); its norm bounds are off
            under secure aggregation (updates arrive masked) and client-level DP (it clips).
    """

    def __init__(self, algorithm: Algorithm, initial_state, *, wire: Wire | None = None, privacy=None,
                 ema_decay: float = 0.0, secure=None, asynchronous=None,
                 rank_of: Callable[[int], int | None] | None = None, seed: int = 0,
                 validation: ValidationConfig | None = None) -> None:
        self.algorithm = algorithm
        self.global_state = clone(initial_state)
        self.version = 0
        self.wire = wire if wire is not None else Wire()
        self.ledger = ByteLedger(report_raw=self.wire.coded)
        self.privacy = privacy
        self.ema = Ema(ema_decay)
        self.secure = secure
        self.asynchronous = asynchronous
        self.rank_of = rank_of
        self.seed = seed
        self.rejected: list[dict] = []
        self.uploads = 0  # update payloads received (the compression factor's denominator)
        self.round_idx = 0
        self.session: SecureRound | None = None  # this round's secure-aggregation session
        self._aborted: str | None = None
        self._events: list[list] = []  # this round's ledger entries (handed to other simulation workers)
        self._from = (0, 0)  # len(rejected), uploads when the round opened
        self._down: tuple[int, bytes, int | None] | None = None  # (version, its broadcast, uncoded length)
        self.holding: dict[int, int] = {}  # asynchronous: client -> the version it downloaded and still trains on
        self.bases: dict[int, Tensors] = {}  # FedAsync: the versions clients in flight started from
        self.staleness_seen: list[int] = []
        self._taus: list[int] = []
        self._stale = 0
        # a client's most plausible example count (a deployed node's row count), or None: unbounded
        self.example_cap: Callable[[int], int | None] | None = None
        bounded = secure is None and privacy is None  # masked updates cannot be measured; the DP fold clips
        self.norms = NormBound.from_config(validation or ValidationConfig()) if bounded else None
        self.cohort: set[int] | None = None  # the sync round's cohort (None: not told, or asynchronous)
        self._reported: set[int] = set()  # clients whose update reached this round (one each)
        self.secure_transport = None  # how secure-aggregation messages reach clients (None: in this process)
        self.quality: dict[int, dict] = {}  # client -> its latest accepted data-quality counts (data.quality)

    # -- what clients are told -----------------------------------------------------------
    @property
    def released_state(self) -> Tensors:
        """The model the server evaluates and releases: the EMA of the versions when on, else the newest."""
        return self.ema.state if self.ema.state is not None else self.global_state

    def broadcast(self, cid: int) -> bytes:
        """The current version, encoded for client ``cid`` (counted in the byte ledger)."""
        if self._down is None or self._down[0] != self.version:  # encoded once per version
            message = self.algorithm.broadcast(self.global_state, self.version)
            raw = Wire.raw_size(message) if self.wire.coded else None
            self._down = (self.version, self.wire.encode_broadcast(message), raw)
        _, payload, raw = self._down
        self._count(cid, "down", len(payload), raw)
        if self.asynchronous is not None:
            self.holding[cid] = self.version
            if self.asynchronous.method == "fedasync" and self.version not in self.bases:
                self.bases[self.version] = clone(self.global_state)
        return payload

    # -- a round ---------------------------------------------------------------------------
    def open_round(self, round_idx: int, cohort: list[int] | None = None) -> None:
        """Start the fold on the current version; with secure aggregation, the cohort's key agreement."""
        self.round_idx = round_idx
        self.ledger.start_round()
        self._events, self._from = [], (len(self.rejected), self.uploads)
        self._aborted, self.session, self._taus, self._stale = None, None, [], 0
        self.cohort = None if cohort is None or self.asynchronous is not None else set(cohort)
        self._reported = set()
        if self.norms is not None:
            self.norms.open_round(self.global_state)
        self.algorithm.start(self.global_state, self.version)
        if self.secure is not None:
            try:
                self.session = self._secure_session(cohort or [], round_idx)
            except SecAggAbort as err:
                self._aborted = str(err)

    @property
    def aborted(self) -> bool:
        """True when this round's secure aggregation failed: nothing is released."""
        return self._aborted is not None

    def abort_round(self, reason: str) -> None:
        """Release nothing this round (e.g. too few replies before a deployment's deadline)."""
        if self._aborted is None:
            self._aborted = reason

    def receive(self, payload: bytes, sender: int) -> bool:
        """Decode, check and fold one update from ``sender``; a bad one is logged and left out."""
        self.uploads += 1
        try:
            update = self.wire.decode_update(payload, self.global_state)
        except WireError as err:
            self._count(sender, "up", len(payload), len(payload) if self.wire.coded else None)
            return self.reject(sender, str(err), "malformed")
        self._count(sender, "up", len(payload), Wire.raw_size(update) if self.wire.coded else None)
        problem = self._problem(update, sender)
        norm = l2_norm(update.delta) if problem is None and self.norms is not None else None
        if norm is not None:
            reason = self.norms.problem(norm)
            problem = None if reason is None else ("norm", reason)
        if problem is None and self.asynchronous is not None:
            problem = self._weigh_by_staleness(update)
        if problem is not None:
            return self.reject(sender, problem[1], problem[0])
        try:
            self.algorithm.add(update)
        except ValueError as err:  # the fold cannot take it (e.g. FedNova without a valid step count)
            return self.reject(sender, str(err), "fold")
        if norm is not None:
            self.norms.accept(norm)
        if ROWS in update.metrics:  # checked in _problem: counts only, never a row
            self.quality[sender] = report_from_metrics(update.metrics)
        return True

    def discard(self, payload: bytes, sender: int, reason: str) -> bool:
        """An update that reached the server too late to count: its bytes are counted, it is not folded."""
        self.uploads += 1
        self._count(sender, "up", len(payload), None)
        return self.reject(sender, reason, "late")

    def forget(self, cid: int) -> None:
        """Client ``cid`` will not report (it dropped out or sat out): it no longer holds a version."""
        self.holding.pop(cid, None)

    def charge(self, cid: int, direction: str, nbytes: int) -> None:
        """Count a message outside the round's protocol (e.g. a continual regularizer's anchor download)."""
        self._count(cid, direction, nbytes, None)

    def start_task(self, algorithm: Algorithm, privacy, state) -> None:
        """A new task with its own trainable state and a fresh fold (per-task adapters of continual learning).

        ``algorithm`` and ``privacy`` as :func:`fedfm.server.compose.build_algorithm_fold` makes them;
        version numbers keep increasing across tasks.
        """
        self.algorithm, self.privacy = algorithm, privacy
        self.global_state = clone(state)
        self._down = None

    def reject(self, cid: int, reason: str, kind: str | None = None) -> bool:
        """Log and keep a rejection; returns False (nothing was folded).

        ``kind`` is the short reason the round's record counts it under (``rejected_by_reason``);
        None: the reason's leading ``word:`` (``late: ...``, ``withheld: ...``), else ``other``.
        """
        self.holding.pop(cid, None)
        log.warning("round %d: rejected update from client %d: %s", self.round_idx, cid, reason)
        self.rejected.append({"round": self.round_idx, "client": cid, "reason": reason,
                              "kind": kind or reason_kind(reason)})
        return False

    def close_round(self) -> dict:
        """Finish the fold into the next version; the round's record (without evaluation)."""
        if self._aborted is None and self.session is not None:
            self.uploads += self.session.submitted
            try:
                secure_stats = self.session.finish()
            except SecAggAbort as err:
                self._aborted = str(err)
        if self._aborted is not None:  # nothing is released, the global model stays
            log.warning("round %d aborted: %s", self.round_idx, self._aborted)
            record = {"version": self.version, "aborted": self._aborted}
        else:
            self.global_state = self.algorithm.finish()
            self.version += 1
            self.ema.update(self.global_state, self.version)
            record = {"version": self.version, **(secure_stats if self.session is not None else {})}
            if self.privacy is not None:
                self.privacy.step()
            if self.asynchronous is not None:
                record.update(self._staleness_record())
        if self.privacy is not None:
            record.update(self.privacy.record())
        for fold in folds(self.algorithm.fold):  # the DP fold's clipping, FLTrust's trust scores ...
            record.update(fold.round_stats())
        if self.norms is not None:
            self.norms.close_round()
        return {**record, **self._rejection_record(), **self.ledger.snapshot()}

    def _rejection_record(self) -> dict:
        """``rejected`` (count) and ``rejected_by_reason`` (kind -> count) of this round; {} when none."""
        mine = self.rejected[self._from[0]:]
        if not mine:
            return {}
        by_reason: dict[str, int] = {}
        for r in mine:
            kind = r.get("kind") or reason_kind(r["reason"])
            by_reason[kind] = by_reason.get(kind, 0) + 1
        return {"rejected": len(mine), "rejected_by_reason": dict(sorted(by_reason.items()))}

    # -- checks and transforms of one update --------------------------------------------
    def _problem(self, update: Update, sender: int) -> tuple[str, str] | None:
        """``(kind, reason)`` why ``update`` from ``sender`` must be left out, or None (HetLoRA is padded here)."""
        who = self._sender_problem(update, sender)
        if who is not None:
            return who
        cap = self.example_cap(sender) if self.example_cap is not None else None
        reason = examples_problem(update.num_examples, cap)
        if reason is not None:
            return "examples", reason
        reason = report_problem(update.metrics, update.num_examples)  # data.quality counts, when reported
        if reason is not None:
            return "quality", reason
        rank = self.rank_of(sender) if self.rank_of is not None else None
        if rank is not None:
            try:
                update.delta = pad(update.delta, self.global_state, rank)
            except ValueError as err:
                return "invalid", str(err)
        reason = tensors_problem(update, self.global_state)
        return None if reason is None else ("invalid", reason)

    def _sender_problem(self, update: Update, sender: int) -> tuple[str, str] | None:
        """The sender is who it claims, belongs to the round and reports for the first time (or why not)."""
        if update.client_id != sender:
            return "identity", f"claims to be client {update.client_id}"
        if self.asynchronous is not None:
            if sender not in self.holding:
                return "unknown_client", f"client {sender} holds no version it was sent (unknown, or already reported)"
            return None
        if self.cohort is not None and sender not in self.cohort:
            return "unknown_client", f"client {sender} is not in round {self.round_idx}'s cohort"
        if sender in self._reported:
            return "duplicate", f"client {sender} already sent an update in round {self.round_idx}"
        self._reported.add(sender)
        return None

    def _weigh_by_staleness(self, update: Update) -> tuple[str, str] | None:
        """FedBuff scales a stale delta by ``s(tau)``; FedAsync mixes it into the current version.

        FedBuff (Nguyen et al. 2022): ``delta * s(tau)``. FedAsync (Xie et al. 2019):
        ``x + a s(tau) (x_base + delta - x)``, i.e. the delta rebased on the current version.
        """
        cfg = self.asynchronous
        held = self.holding.pop(update.client_id, None)
        if held is None or held != update.base_version:
            return "base_version", f"reports base version {update.base_version}, but it downloaded {held}"
        tau = self.version - update.base_version
        if cfg.max_staleness is not None and tau > cfg.max_staleness:
            self._stale += 1
            return "stale", f"stale: staleness {tau} > max_staleness {cfg.max_staleness}"
        s = staleness_weight(tau, cfg.staleness, cfg.staleness_exponent, cfg.hinge_a, cfg.hinge_b)
        if cfg.method == "fedasync":
            base, g = self.bases[update.base_version], self.global_state
            update.delta = OrderedDict((k, (base[k] + d - g[k]) * (cfg.mixing * s)) for k, d in update.delta.items())
        else:
            update.delta = OrderedDict((k, d * s) for k, d in update.delta.items())
        self._taus.append(tau)
        return None

    def _staleness_record(self) -> dict:
        taus = self._taus
        self.staleness_seen.extend(taus)
        live = set(self.holding.values())
        self.bases = {v: s for v, s in self.bases.items() if v in live}
        return {"stale": self._stale, "staleness_mean": float(np.mean(taus)) if taus else 0.0,
                "staleness_max": int(max(taus, default=0))}

    # -- secure aggregation ------------------------------------------------------------------
    def _secure_session(self, cohort: list[int], round_idx: int) -> SecureRound:
        cfg = self.secure
        return SecureRound(
            cohort, self.algorithm.fold, self.global_state, self.ledger,
            threshold=cfg.threshold, neighbours=cfg.neighbours, bits=cfg.bits, clip_range=cfg.clip_range,
            max_weight=cfg.max_weight, round_seed=derive_seed(self.seed, round_idx, 0x5EC).to_bytes(8, "little"),
            on_withheld=self.reject, transport=self.secure_transport,
        )

    # -- the byte ledger, and the other simulation workers' share of a round -----------------
    def _count(self, cid: int, direction: str, nbytes: int, raw: int | None) -> None:
        self.ledger.record(cid, direction, nbytes, raw=raw)
        self._events.append([cid, direction, nbytes, raw])

    def round_facts(self) -> dict:
        """What this process's server saw of the round so far (ledger entries, rejections, uploads, accepted norms)."""
        return {"events": self._events, "rejected": self.rejected[self._from[0]:], "uploads": self.uploads - self._from[1],
                "norms": [] if self.norms is None else list(self.norms.round_norms),
                **({"quality": {str(c): q for c, q in self.quality.items()}} if self.quality else {})}

    def absorb(self, facts: dict) -> None:
        """Take in what another simulation worker's server saw of the round (see :meth:`round_facts`)."""
        for cid, direction, nbytes, raw in facts["events"]:
            self.ledger.record(cid, direction, nbytes, raw=raw)
        self.rejected.extend(facts["rejected"])
        self.uploads += facts["uploads"]
        if self.norms is not None:
            self.norms.round_norms.extend(facts.get("norms", []))
        self.quality.update((int(c), q) for c, q in facts.get("quality", {}).items())

    def partial(self):
        """The fold's running sums and scalars (summed across simulation workers, then :meth:`merge`)."""
        return self.algorithm.fold.partial()

    def merge(self, sums, scalars: list) -> None:
        self.algorithm.fold.merge(sums, scalars)

    # -- privacy budget -------------------------------------------------------------------------
    def budget_allows_next_round(self) -> bool:
        return self.privacy is None or self.privacy.allows_next_round()

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self, tensors: dict, orders: dict) -> dict:
        """Everything the next round depends on: tensors into ``tensors``, the rest returned as JSON."""
        return server_state.save(self, tensors, orders)

    def load_state_dict(self, meta: dict, tensors: Mapping[str, torch.Tensor], orders: dict) -> None:
        server_state.load(self, meta, tensors, orders)


def reason_kind(reason: str) -> str:
    """The short kind of a rejection reason written as ``word: detail`` (``late``, ``withheld``), else ``other``."""
    head = reason.split(":", 1)[0]
    return head if head != reason and head.isidentifier() and head.islower() else "other"


def folds(fold):
    """The fold and every fold it wraps, outermost first."""
    while fold is not None:
        yield fold
        fold = fold.inner
