"""One round of secure aggregation: the server folds only the cohort's sum.

The protocol is :mod:`fedfm.privacy.secagg` (Bonawitz et al. 2017, with the
SecAgg+ neighbourhoods of Bell et al. 2020). Here it is driven message by
message as a deployment would: every message is packed to bytes
(:mod:`fedfm.privacy.secagg_wire`, safetensors), counted in the byte ledger
in its direction, and unpacked on the other side.

What a client uploads is its fold's *summand* (``ServerFold.summand``), not its
update: ``(r·Δ, r)`` for the FedAvg family (capped example weights) or
``(clip_C(Δ), 1, [‖Δ‖ ≤ C])`` under client-level DP. The summand is flattened,
divided by its public value range (``clip_range`` R, or the clip norm C under DP,
where it is lossless since every coordinate of a clipped vector is within C),
quantized to fixed point and masked. The server unmasks only the sum over the
survivors and hands it to ``ServerFold.absorb_sum``; with client-level DP the
fold then adds the Gaussian noise, so no unnoised individual update is ever
visible to it.

Clients that vanish after sharing keys (``dropout``) are recovered from the
Shamir shares; when fewer than the threshold remain the round aborts with
:class:`~fedfm.privacy.secagg_crypto.SecAggAbort` and the global model stays.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Mapping

import numpy as np
import torch

from fedfm.algorithms.base import ServerFold, Update
from fedfm.privacy.secagg import SecAggClient, SecAggServer, neighbour_graph
from fedfm.privacy.secagg_quant import Quantizer
from fedfm.privacy.secagg_wire import pack, unpack
from fedfm.compression.ledger import ByteLedger

log = logging.getLogger("fedfm")


def default_threshold(cohort: list[int], degree: int | None, round_seed: bytes) -> int:
    """The smallest valid Shamir threshold: a strict majority of the smallest neighbourhood.

    ``2t > k + 1`` keeps a server that lies about survivors from learning both
    secrets of a client; the smallest such t tolerates the most dropouts
    (``k + 1 - t`` per neighbourhood of size ``k + 1``).
    """
    smallest = min(len(nb) + 1 for nb in neighbour_graph(cohort, degree, round_seed).values())
    return smallest // 2 + 1


class SummandLayout:
    """How a client's summand becomes the flat vector the protocol masks (computed on the client).

    The trainable state's float tensors in the global state's order, then the
    fold's scalars; tensors divided by their public range so every coordinate
    of an unclipped summand lies in [-1, 1].
    """

    def __init__(self, fold: ServerFold, global_state: Mapping[str, torch.Tensor], clip_range: float,
                 max_weight: float) -> None:
        self.fold, self.max_weight = fold, max_weight
        self.keys = [k for k, v in global_state.items() if v.is_floating_point()]
        self.shapes = {k: global_state[k].shape for k in self.keys}
        self.scale, n_scalars = fold.summand_layout(clip_range)
        self.dim = sum(math.prod(s) for s in self.shapes.values()) + n_scalars

    def vector(self, update: Update) -> tuple[np.ndarray, int]:
        """``(the flattened, range-scaled summand (float64), how many coordinates fall outside [-1, 1])``."""
        tensors, scalars = self.fold.summand(update, self.max_weight)
        parts = [tensors[k].reshape(-1).cpu().numpy() / self.scale for k in self.keys]
        vec = np.concatenate(parts + [np.asarray(scalars, dtype=np.float64)])
        return vec, int(np.count_nonzero(np.abs(vec) > 1.0))

    def tensors(self, flat: np.ndarray) -> tuple["OrderedDict[str, torch.Tensor]", list[float]]:
        """The inverse of :meth:`vector` for the unmasked sum: ``(tensors, scalars)``."""
        tensors, offset = OrderedDict(), 0
        for k in self.keys:
            size = math.prod(self.shapes[k])
            tensors[k] = torch.from_numpy(flat[offset : offset + size] * self.scale).reshape(self.shapes[k])
            offset += size
        return tensors, [float(x) for x in flat[offset:]]


class InProcessClients:
    """The cohort's side of the protocol in this process (a simulation): one SecAggClient per client.

    A deployment replaces it with a transport over the network
    (:class:`fedfm.deploy.secure.FlowerSecAgg`) with the same ``exchange``.
    """

    def __init__(self) -> None:
        self.clients: dict[int, SecAggClient] = {}

    def exchange(self, stage: str, msgs: Mapping[int, dict]) -> dict[int, dict]:
        """Deliver one stage's message to each client; their replies (``keys``, ``shares`` or ``unmask``)."""
        if stage == "keys":
            self.clients = {c: SecAggClient(c, m) for c, m in msgs.items()}
            return {c: cl.advertise_keys() for c, cl in self.clients.items()}
        step = {"shares": SecAggClient.share_keys, "unmask": SecAggClient.unmask}[stage]
        return {c: step(self.clients[c], m) for c, m in msgs.items()}

    def mask(self, cid: int, msg: dict, vector: np.ndarray) -> dict:
        return self.clients[cid].masked_input(msg, vector)


class SecureRound:
    """Key set-up for a cohort, then masked summands, then the unmasked sum.

    Args:
        cohort: client ids of this round (at least 2).
        fold: the started server fold (provides ``summand_layout``, ``summand`` and ``absorb_sum``).
        global_state: the round's global state (sets the vector layout).
        ledger: where every message's bytes are recorded.
        threshold, neighbours, bits, clip_range, max_weight: see
            :class:`fedfm.config.schema.SecureAggregationConfig`.
        round_seed: public per-round seed (fixes the SecAgg+ graph).
        transport: how messages reach the clients (None: :class:`InProcessClients`).
    """

    def __init__(
        self,
        cohort: list[int],
        fold: ServerFold,
        global_state: Mapping[str, torch.Tensor],
        ledger: ByteLedger,
        *,
        threshold: int | None,
        neighbours: int | None,
        bits: int | None,
        clip_range: float,
        max_weight: float,
        round_seed: bytes,
        on_withheld=None,
        transport=None,
    ) -> None:
        self.on_withheld = on_withheld  # (cid, reason): a client that checked its update and kept it back
        self.submitted = 0  # masked summands received
        self.fold = fold
        self.ledger = ledger
        self.layout = SummandLayout(fold, global_state, clip_range, max_weight)
        n = len(cohort)
        degree = None if neighbours is None or neighbours >= n - 1 else neighbours
        t = threshold if threshold is not None else default_threshold(cohort, degree, round_seed)
        quantizer = Quantizer.for_clients(n, 1.0) if bits is None else Quantizer(clip=1.0, bits=bits)
        self.server = SecAggServer(cohort, t, self.layout.dim, degree, quantizer, round_seed)
        self.threshold = t
        self.quantizer = quantizer
        self.transport = transport if transport is not None else InProcessClients()
        setup = self.server.setup_message()
        keys = self._exchange("keys", {c: setup for c in cohort})
        self._share_msgs = self.server.on_shares(self._exchange("shares", self.server.on_keys(keys)))
        self._masked: list[dict] = []
        self.clipped = 0  # summand coordinates outside the public range [-R, R], clipped before masking

    # -- messages -------------------------------------------------------------
    def _exchange(self, stage: str, msgs: Mapping[int, dict]) -> list[dict]:
        """One stage: each message down, the replies up (both counted in the ledger)."""
        replies = self.transport.exchange(stage, {c: self._down(c, m) for c, m in msgs.items()})
        return [self._up(c, m) for c, m in replies.items()]

    def _up(self, cid: int, msg: dict) -> dict:
        payload = pack(msg)
        self.ledger.record(cid, "up", len(payload))
        return unpack(payload)

    def _down(self, cid: int, msg: dict) -> dict:
        payload = pack(msg)
        self.ledger.record(cid, "down", len(payload))
        return unpack(payload)

    # -- client side ------------------------------------------------------------
    @property
    def expected(self) -> list[int]:
        """The clients whose keys and shares went through: those asked for a masked summand."""
        return sorted(self._share_msgs)

    def share_message(self, cid: int) -> dict:
        """The shares ``cid`` needs for its masked input (counted as sent; a deployment ships it with the broadcast)."""
        return self._down(cid, self._share_msgs[cid])

    def submit(self, update: Update) -> None:
        """Client ``update.client_id`` masks and uploads its summand (in this process)."""
        cid = update.client_id
        vector, clipped = self.layout.vector(update)
        self.clipped += clipped  # counted on the client; a diagnostic
        self.add_masked(cid, self.transport.mask(cid, self.share_message(cid), vector))

    def add_masked(self, cid: int, msg: dict, clipped: int = 0) -> None:
        """Take client ``cid``'s masked summand (from :meth:`submit` or from the network)."""
        self._masked.append(self._up(cid, msg))
        self.clipped += clipped
        self.submitted += 1

    def withheld(self, cid: int, reason: str) -> None:
        """Client ``cid`` found its own update unfit and sent nothing (it counts as a drop-out)."""
        if self.on_withheld is not None:
            self.on_withheld(cid, f"withheld: {reason}")

    # -- server side --------------------------------------------------------------
    def finish(self) -> dict:
        """Unmask the survivors' sum and hand it to the fold; returns the round's secagg stats."""
        result = self.server.on_unmask(self._exchange("unmask", self.server.on_masked(self._masked)))
        tensors, scalars = self.layout.tensors(result.sum)
        self.fold.absorb_sum(tensors, scalars, result.count)
        if self.clipped:
            log.warning("secure aggregation: %d summand coordinates were outside the range R and clipped "
                        "(raise privacy.secure_aggregation.clip_range)", self.clipped)
        return {
            "secagg_clipped": self.clipped,
            "secagg_survivors": result.count,
            "secagg_dropped": len(result.dropped),
            "secagg_threshold": self.threshold,
            "secagg_bits": self.quantizer.bits,
        }


__all__ = ["InProcessClients", "SecureRound", "SummandLayout", "default_threshold"]
