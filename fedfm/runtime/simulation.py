"""In-process simulation: the default runtime.

Each round samples a cohort, encodes one broadcast, runs every sampled
client's ``local_update`` on the single shared model, encodes each update as
it would travel, validates it, and folds it into the server aggregate. The
algorithm never learns that it is simulated.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch

from fedfm.algorithms.base import Algorithm
from fedfm.robustness.validate import update_problem
from fedfm.runtime.client import Client, LocalTrainer, derive_seed
from fedfm.runtime.ledger import ByteLedger
from fedfm.runtime.wire import WireError, decode_broadcast, decode_update, encode_broadcast, encode_update

log = logging.getLogger("fedfm")


def sample_cohort(num_clients: int, cohort_size: int, seed: int, round_idx: int) -> list[int]:
    """Uniform sampling without replacement, reproducible from (seed, round)."""
    rng = np.random.default_rng(derive_seed(seed, round_idx, 0x5A3))
    return sorted(int(c) for c in rng.choice(num_clients, size=cohort_size, replace=False))


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
    ) -> None:
        self.trainer = trainer
        self.algorithm = algorithm
        self.clients = list(clients)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.global_state = OrderedDict((k, v.detach().clone()) for k, v in initial_state.items())
        self.version = 0
        self.ledger = ByteLedger()
        self.rejected: list[dict] = []
        # Simulated attackers (fedfm.robustness.attacks.Attack): the same clients every round.
        self.attack = attack if attack is not None and attack.name != "none" else None
        self.malicious = set(attack.malicious(len(self.clients))) if self.attack else set()

    def run_round(self, round_idx: int, on_client: Callable[[int], None] | None = None) -> dict:
        """One synchronous round; returns the round's record (without evaluation)."""
        t0 = time.perf_counter()
        self.ledger.start_round()
        cohort = sample_cohort(len(self.clients), self.clients_per_round, self.seed, round_idx)
        algo = self.algorithm
        algo.start(self.global_state, self.version)
        down = encode_broadcast(algo.broadcast(self.global_state, self.version))
        losses, weights, accepted = [], [], 0
        bad = [c for c in cohort if c in self.malicious]
        benign_deltas = []  # kept only for colluding attacks (ALIE, IPM)
        for cid in [c for c in cohort if c not in self.malicious] + bad:  # honest clients first
            client = self.clients[cid]
            self.ledger.record(cid, "down", len(down))
            update = self.trainer.local_update(algo, decode_broadcast(down), client, round_idx)
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
            up = encode_update(update)
            self.ledger.record(cid, "up", len(up))
            if self._receive(up, round_idx):
                accepted += 1
                losses.append(update.metrics["train_loss"])
                weights.append(update.num_examples)
            if on_client is not None:
                on_client(cid)
        self.global_state = algo.finish()
        self.version += 1
        record = {
            "round": round_idx,
            "version": self.version,
            "cohort": cohort,
            "accepted": accepted,
            "malicious": len(bad),
            "train_loss": float(np.average(losses, weights=weights)) if losses else float("nan"),
            **self.ledger.snapshot(),
            "round_s": time.perf_counter() - t0,
        }
        return record

    def _receive(self, payload: bytes, round_idx: int) -> bool:
        """Decode, validate and fold one update; a bad one is logged and left out."""
        try:
            update = decode_update(payload)
        except WireError as err:
            reason, cid = str(err), -1
        else:
            cid = update.client_id
            reason = update_problem(update, self.global_state)
            if reason is None:
                self.algorithm.add(update)
                return True
        log.warning("round %d: rejected update from client %d: %s", round_idx, cid, reason)
        self.rejected.append({"round": round_idx, "client": cid, "reason": reason})
        return False
