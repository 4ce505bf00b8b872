"""The client side of a round, independent of the runtime that delivers its messages.

:class:`ClientApp` is what runs on a client device: given the broadcast
message (bytes) and the client's own data, it decodes the broadcast, runs the
hook-driven local training (the algorithm's client hook, local DP-SGD,
personalization, a smaller HetLoRA rank: whatever wrappers the trainer was
built with), and returns one encoded message (:mod:`fedfm.compression.wire`,
codecs and error feedback applied). Under secure aggregation it checks its
own update and uploads only its masked summand instead.

In a simulation one ClientApp serves every simulated client on the process's
one model; a deployment runs one per device. Attack simulation
(:class:`SimulatedAttack`) exists only in simulations: a malicious client
replaces its delta before encoding, as a real attacker would.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from fedfm.algorithms.base import Algorithm, Update
from fedfm.client.data import Client
from fedfm.client.peak_memory import PeakMemory
from fedfm.compression.wire import Wire
from fedfm.data.quality import quality_metrics, with_loss_drops
from fedfm.models.quantize import model_bytes
from fedfm.robustness.validate import update_problem
from fedfm.seeds import derive_seed

log = logging.getLogger("fedfm")


@dataclass
class Reply:
    """What a client sent back: its message, or nothing (it sat the round out or withheld its update).

    ``loss``, ``examples`` and ``steps`` are what it reports in the clear (also
    inside ``payload``): the driver keeps time and the round's training loss with them.
    ``memory_mb``: its measured peak memory while it trained (the model it holds plus
    the rise during training, :mod:`fedfm.client.peak_memory`); None when unknown.
    """

    payload: bytes | None
    loss: float = float("nan")
    examples: int = 0
    steps: int = 0
    masked: bool = False  # secure aggregation: its masked summand reached the server's session
    withheld: bool = False  # secure aggregation: it found its own update unfit and sent nothing
    memory_mb: float | None = None
    train_s: float | None = None  # wall seconds its local training took

    @property
    def step_s(self) -> float | None:
        """Wall seconds per local step, when it trained and timed it."""
        return self.train_s / self.steps if self.train_s is not None and self.steps else None

    @property
    def sat_out(self) -> bool:
        """It did not train this round (no data this stage, or its DP-SGD budget is spent)."""
        return self.payload is None and not self.masked and not self.withheld


class SimulatedAttack:
    """Model poisoning by the malicious clients of a simulation (:class:`fedfm.robustness.attacks.Attack`).

    Colluding attacks (ALIE, IPM) read the round's benign deltas, so the
    driver starts every round with :meth:`begin_round` and trains the honest
    clients first.
    """

    def __init__(self, attack, num_clients: int, seed: int) -> None:
        self.attack = attack
        self.seed = seed
        self.malicious = set(attack.malicious(num_clients))
        self.cohort_size, self.num_bad = 0, 0
        self._benign: list = []

    def begin_round(self, cohort_size: int, num_bad: int) -> None:
        """A new round of ``cohort_size`` clients, ``num_bad`` of them malicious: forget the benign deltas seen."""
        self.cohort_size, self.num_bad = cohort_size, num_bad
        self._benign = []

    def apply(self, update: Update, round_idx: int) -> None:
        """Replace a malicious client's delta in place; remember a benign one when attackers collude."""
        cid = update.client_id
        if cid in self.malicious:
            update.delta = self.attack.apply(
                update.delta, self._benign, num_clients=self.cohort_size, num_byzantine=self.num_bad,
                generator=torch.Generator().manual_seed(derive_seed(self.seed, round_idx, cid, 0xBAD)),
            )
        elif self.attack.colluding:
            self._benign.append(update.delta)


class ClientApp:
    """Decode the broadcast, train locally, encode the update: one client's side of a round."""

    def __init__(self, trainer, algorithm: Algorithm, wire: Wire | None = None, attack: SimulatedAttack | None = None):
        """``trainer``: a :class:`fedfm.client.trainer.LocalTrainer` (or a wrapper with its ``local_update``)."""
        self.trainer = trainer
        self.algorithm = algorithm
        self.wire = wire if wire is not None else Wire()
        self.attack = attack
        self._held: int | None = None  # bytes of the model the client holds (base + trainable state)

    def held_bytes(self) -> int:
        """Bytes of the model this client holds before it trains: the (maybe quantized) base and its state."""
        if self._held is None:
            fm = getattr(self.trainer, "fm", None)  # a stand-in trainer in tests holds no model
            self._held = 0 if fm is None else model_bytes(fm.model)
        return self._held

    def fit(self, client: Client, message: bytes, round_idx: int, secure=None) -> Reply:
        """Train ``client`` from the broadcast ``message``; ``secure``: the round's secure-aggregation session."""
        broadcast = self.wire.decode_broadcast(message)
        if client.quality is not None and len(client.train_idx) == 0:
            return Reply(None)  # its data-quality filters kept none of its rows: nothing to train on
        t0 = time.perf_counter()
        fm = getattr(self.trainer, "fm", None)
        with PeakMemory(fm.device if fm is not None else "cpu") as peak:
            update = self.trainer.local_update(self.algorithm, broadcast, client, round_idx)
        train_s = time.perf_counter() - t0
        if update is None:  # sat the round out (no data this stage, or its DP-SGD budget is spent)
            return Reply(None)
        memory_mb = None if peak.bytes is None else (self.held_bytes() + peak.bytes) / 2**20
        if client.quality is not None:  # only counts: rows, kept, dropped by reason (the loss filter's this round)
            update.metrics.update(quality_metrics(with_loss_drops(client.quality,
                                                                  client.quality.kept - update.num_examples)))
        if self.attack is not None:
            self.attack.apply(update, round_idx)
        facts = dict(loss=float(update.metrics["train_loss"]), examples=update.num_examples,
                     steps=int(update.metrics.get("steps", 0)), memory_mb=memory_mb, train_s=train_s)
        if secure is not None:
            masked = self._mask(secure, update, broadcast.state, round_idx)
            return Reply(None, masked=masked, withheld=not masked, **facts)
        return Reply(self.wire.encode_update(update, client.state, round_idx), **facts)

    @staticmethod
    def _mask(secure, update: Update, template, round_idx: int) -> bool:
        """The client checks its own update, then uploads only its masked summand."""
        reason = update_problem(update, template)
        if reason is None:
            try:
                secure.submit(update)
                return True
            except ValueError as err:  # e.g. a non-finite norm found while clipping
                reason = str(err)
        log.warning("round %d: client %d withheld its update: %s", round_idx, update.client_id, reason)
        secure.withheld(update.client_id, reason)
        return False
