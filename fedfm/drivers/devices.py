"""Heterogeneous clients: device profiles, availability, drop-outs and the virtual clock.

Each client gets one :class:`~fedfm.config.schema.DeviceProfile` (a seeded
assignment by the profiles' shares). The profile says how long the client's
work takes on the simulation's *virtual* clock (local steps at its relative
speed plus its payloads over its link), whether it is online when a cohort is
drawn, whether it drops out mid-round, how much memory it has, and (HetLoRA)
which LoRA rank it trains. Everything is drawn from ``(seed, round, client)``,
so a run is reproducible whatever order clients are computed in.

Straggler-aware simulation on a virtual clock follows the set-up of FedBuff
(Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
Aggregation", AISTATS), where client durations are drawn per device.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from fedfm.config.schema import DeviceProfile, DevicesConfig
from fedfm.registry import (ALGORITHMS, ASYNC_SAFE, ATTACKS, COLLUDING, DELTA_ONLY, METHODS, RANKED,
                            SGD_SERVER_STEP)
from fedfm.seeds import derive_seed

log = logging.getLogger("fedfm")

REFERENCE = DeviceProfile(name="reference", share=1.0)


def assign_profiles(shares: list[float], num_clients: int, seed: int) -> np.ndarray:
    """Profile index of every client: counts by largest remainder of the shares, placed by a seeded shuffle."""
    w = np.asarray(shares, dtype=np.float64)
    w = w / w.sum()
    exact = w * num_clients
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_clients - int(counts.sum())]:
        counts[i] += 1
    of = np.repeat(np.arange(len(w)), counts)
    return np.random.default_rng(derive_seed(seed, 0xDE5)).permutation(of)


class Fleet:
    """The clients' devices. Without profiles every client is the reference device and nothing is drawn."""

    def __init__(self, cfg: DevicesConfig, num_clients: int, seed: int, footprint_mb: float | None = None) -> None:
        self.cfg = cfg
        self.seed = seed
        self.enabled = bool(cfg.profiles)
        self.profiles = list(cfg.profiles) or [REFERENCE]
        self.of = assign_profiles([p.share for p in self.profiles], num_clients, seed)
        self.footprint_mb = footprint_mb
        self.capable = np.array([self._fits(self.profiles[i]) for i in self.of], dtype=bool)
        for p in self.profiles:
            if not self._fits(p):
                n = int(np.sum(self.of == self.profiles.index(p)))
                log.warning("devices: %d clients of profile %r (memory %.0f MB) cannot hold the training "
                            "footprint of %.0f MB; they never train", n, p.name, p.memory_mb, footprint_mb)

    def _fits(self, p: DeviceProfile) -> bool:
        return p.memory_mb is None or self.footprint_mb is None or p.memory_mb >= self.footprint_mb

    def profile(self, cid: int) -> DeviceProfile:
        return self.profiles[int(self.of[cid])]

    def rank(self, cid: int) -> int | None:
        """The client's LoRA rank (HetLoRA), or None for the model's own rank."""
        return self.profile(cid).lora_rank

    # -- who can be drawn ---------------------------------------------------------
    def eligible(self, round_idx: int) -> np.ndarray:
        """Ids of the clients that are online this round and can hold the model."""
        avail = np.array([p.availability for p in self.profiles])[self.of]
        online = np.random.default_rng(derive_seed(self.seed, round_idx, 0x0A1)).random(len(self.of)) < avail
        return np.flatnonzero(online & self.capable)

    def online_now(self, cid: int, rng: np.random.Generator) -> bool:
        """Asynchronous runs: is the client online when a slot frees up (one draw per try)?"""
        return bool(self.capable[cid]) and rng.random() < self.profile(cid).availability

    def drop_point(self, cid: int, round_idx: int, salt: int = 0) -> float | None:
        """The fraction of its work after which the client drops out, or None when it reports."""
        p = self.profile(cid).dropout
        if p <= 0:
            return None
        u = np.random.default_rng(derive_seed(self.seed, round_idx, cid, salt, 0xD06)).random(2)
        return float(u[1]) if u[0] < p else None

    # -- how long things take -------------------------------------------------------
    def compute_s(self, cid: int, steps: int) -> float:
        return steps * self.cfg.step_seconds / self.profile(cid).speed

    def transfer_s(self, cid: int, nbytes: int) -> float:
        mbps = self.profile(cid).link_mbps
        return 0.0 if mbps is None else nbytes * 8 / (mbps * 1e6)

    def duration(self, cid: int, steps: int, down_bytes: int, up_bytes: int) -> float:
        """Virtual seconds from the broadcast's start to the update's arrival."""
        return self.transfer_s(cid, down_bytes) + self.compute_s(cid, steps) + self.transfer_s(cid, up_bytes)

    def summary(self, steps_of: Callable[[int], int] | None = None) -> dict:
        """Per profile: how many clients got it and what it is (written to summary.json)."""
        out = {}
        for i, p in enumerate(self.profiles):
            ids = np.flatnonzero(self.of == i)
            row = {"clients": int(len(ids)), **p.model_dump(exclude={"name"}), "can_train": bool(self._fits(p))}
            if steps_of is not None and len(ids):
                row["mean_compute_s"] = float(np.mean([self.compute_s(int(c), steps_of(int(c))) for c in ids]))
            out[p.name] = row
        return out


def training_footprint_mb(model, trainable_numel: int) -> float:
    """A lower bound on training memory: every weight as stored (a quantized base at its quantized size),
    plus gradient and two AdamW moments per trainable value.

    Activations are not counted (they depend on batch and sequence length); the
    measured peak (``client_memory_mb_*`` in metrics.jsonl) counts everything.
    """
    from fedfm.models.quantize import model_bytes

    return (model_bytes(model) + 3 * 4 * trainable_numel) / 2**20


def check_devices(cfg) -> None:
    """One-line errors for combinations that device profiles, HetLoRA or async training cannot serve."""
    from fedfm.errors import FedfmError

    d, a = cfg.devices, cfg.asynchronous
    secure = cfg.privacy.secure_aggregation.enabled
    dp = cfg.privacy.client_dp.enabled or cfg.privacy.dp_sgd.enabled
    if (d.profiles or a.enabled) and cfg.continual.enabled:
        raise FedfmError("devices.profiles and asynchronous training cannot be combined with continual learning yet")
    ranks = [p.lora_rank for p in d.profiles if p.lora_rank is not None]
    if ranks:
        if not METHODS.supports(cfg.model.method, RANKED):
            raise FedfmError(f"devices.profiles[].lora_rank needs a method with a rank "
                             f"({', '.join(METHODS.names(RANKED))}), not {cfg.model.method!r}")
        if max(ranks) > cfg.model.lora.r:
            raise FedfmError(f"devices.profiles[].lora_rank={max(ranks)} exceeds the global rank model.lora.r={cfg.model.lora.r}")
        for what, on in (("compression.upload", bool(cfg.compression.upload)), ("secure aggregation", secure),
                         (f"algorithm.name={cfg.algorithm.name} (its updates carry extra tensors)",
                          not ALGORITHMS.supports(cfg.algorithm.name, DELTA_ONLY)),
                         ("personalization", cfg.personalization.method != "none")):
            if on:
                raise FedfmError(f"heterogeneous LoRA ranks (devices.profiles[].lora_rank) cannot be combined with {what} yet")
    if cfg.privacy.client_dp.enabled and any(p.availability < 1 for p in d.profiles):
        raise FedfmError("client-level DP assumes uniform sampling of all clients: "
                         "set devices.profiles[].availability=1 (or disable privacy.client_dp)")
    if not a.enabled:
        return
    if dp or secure:
        raise FedfmError("asynchronous training cannot be combined with differential privacy or secure aggregation yet")
    if cfg.personalization.method != "none":
        raise FedfmError("asynchronous training cannot be combined with personalization yet")
    if not ALGORITHMS.supports(cfg.algorithm.name, ASYNC_SAFE):
        raise FedfmError(f"asynchronous training cannot serve algorithm.name={cfg.algorithm.name}: "
                         "stale updates would break its server state")
    if a.method == "fedasync" and not (ALGORITHMS.supports(cfg.algorithm.name, SGD_SERVER_STEP)
                                       and cfg.algorithm.server_lr == 1):
        raise FedfmError("asynchronous.method=fedasync mixes models itself: use an algorithm with FedAvg's server "
                         f"step ({', '.join(ALGORITHMS.names(SGD_SERVER_STEP))}) and server_lr=1")
    if ATTACKS.supports(cfg.attack.name, COLLUDING):
        raise FedfmError(f"attack {cfg.attack.name!r} colludes within a round; asynchronous training has no rounds")
    if a.concurrency > cfg.federation.num_clients:
        raise FedfmError(f"asynchronous.concurrency={a.concurrency} exceeds federation.num_clients={cfg.federation.num_clients}")


def smaller_rank(fleet: Fleet, full_rank: int):
    """``rank_of(cid)``: a client's HetLoRA rank when below ``full_rank`` (the server pads it back), else None."""
    def rank_of(cid: int) -> int | None:
        rank = fleet.rank(cid) if 0 <= cid < len(fleet.of) else None
        return rank if rank is not None and rank < full_rank else None

    return rank_of
