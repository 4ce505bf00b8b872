"""Secure aggregation: the server learns only the sum of the clients' vectors.

Implements the semi-honest (four-round) protocol of Bonawitz et al. 2017,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS'17, Fig. 4 without the signature/ConsistencyCheck round), with the
sparse neighbourhood graph of SecAgg+ from Bell et al. 2020, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS'20): masks
and secret shares are exchanged only between graph neighbours, so the work
per client is O(k) instead of O(n) with k = O(log n).

Client and server are in-process objects that exchange plain dicts of ints
and bytes, one method per round, so a network runtime can carry them later:

====  ==========================  =========================================
round client                      server
====  ==========================  =========================================
0     ``advertise_keys()``        ``on_keys(msgs) -> {u: msg}``
1     ``share_keys(msg)``         ``on_shares(msgs) -> {u: msg}``
2     ``masked_input(msg, x)``    ``on_masked(msgs) -> {u: msg}``
3     ``unmask(msg)``             ``on_unmask(msgs) -> SecAggResult``
====  ==========================  =========================================

0. AdvertiseKeys: each client u makes two X25519 key pairs, (c_u) to encrypt
   shares and (s_u) to derive pairwise masks, and sends both public keys.
1. ShareKeys: u draws a self-mask seed b_u, Shamir-shares b_u and s_u's
   secret key with threshold t among its neighbourhood N(u) + {u}, and
   encrypts the share for v with AES-GCM under HKDF(X25519(c_u, c_v)).
2. MaskedInput: u decrypts and checks the shares it holds (a tampered one
   aborts), quantizes its vector x_u (:mod:`fedfm.privacy.secagg_quant`) and
   sends ``y_u = q(x_u) + PRG(b_u) + sum_v sign(v - u) PRG(s_uv) mod 2^32``
   over the neighbours v that shared keys, s_uv = HKDF(X25519(s_u, s_v)).
3. Unmasking: the server names the survivors (clients whose y arrived). Each
   survivor reveals, per client v whose share it holds, the share of b_v if v
   survived, else the share of s_v -- never both. The server reconstructs b_v
   for survivors and s_v for dropped clients, strips the self masks and the
   dangling pairwise masks, and decodes the sum and the survivor count.

Security model and choices: honest-but-curious server, honest clients
(no signatures, so no protection against a server that impersonates
clients -- Bonawitz's active-security variant is not implemented). The
threshold must exceed half of every neighbourhood (``2t > k + 1``), so that
even a server that tells different clients different survivor lists cannot
collect t shares of both b_v and s_v. The public ``round_seed`` fixes only
the neighbour graph and domain-separates key derivations; every secret comes
from the OS CSPRNG.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from fedfm.privacy.secagg_crypto import (
    KEY_BYTES,
    SecAggAbort,
    ShareAuthenticationError,
    agree,
    decrypt,
    encrypt,
    generate_keypair,
    prg_uint32,
    public_key_of,
    shamir_combine,
    shamir_split,
)
from fedfm.privacy.secagg_quant import Quantizer

__all__ = [
    "SecAggAbort",
    "ShareAuthenticationError",
    "SecAggClient",
    "SecAggServer",
    "SecAggResult",
    "Quantizer",
    "neighbour_graph",
    "suggested_degree",
    "secure_sum",
]

_MAX_ID = 2**32  # ids travel as 4-byte ints; share point x = id + 1


# ------------------------------------------------------------------ neighbour graph


def suggested_degree(n: int) -> int:
    """A SecAgg+ neighbourhood size k = O(log n): 2 * ceil(log2 n), capped at n - 1."""
    return min(n - 1, 2 * math.ceil(math.log2(max(n, 2))))


def neighbour_graph(ids: Iterable[int], degree: int | None, round_seed: bytes) -> dict[int, frozenset[int]]:
    """Who shares masks and keys with whom (each client excludes itself).

    ``degree=None`` or ``degree >= n - 1``: the complete graph (Bonawitz et al.).
    Otherwise a Harary graph H(k, n) -- a ring in a random order fixed by the
    public ``round_seed``, each client joined to the ``ceil(k/2)`` next clients
    on either side (an odd k is rounded up to k + 1) -- as the sparse,
    k-connected communication graph of SecAgg+ (Bell et al. 2020). Every
    client computes the same graph from the public setup message.
    """
    ids = sorted(int(i) for i in ids)
    n = len(ids)
    half = None if degree is None else (int(degree) + 1) // 2
    if half is None or 2 * half >= n - 1:
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    if half < 1:
        raise ValueError(f"neighbour degree must be >= 1, got {degree}")
    digest = hashlib.sha256(b"fedfm-secagg/graph" + bytes(round_seed)).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    order = [ids[i] for i in rng.permutation(n)]
    nb: dict[int, set[int]] = {u: set() for u in ids}
    for i, u in enumerate(order):
        for j in range(1, half + 1):
            v = order[(i + j) % n]
            nb[u].add(v)
            nb[v].add(u)
    return {u: frozenset(s) for u, s in nb.items()}


# ------------------------------------------------------------------------ helpers


def _info(purpose: bytes, round_seed: bytes) -> bytes:
    return b"fedfm-secagg/" + purpose + b"/" + round_seed


def _aad(round_seed: bytes, sender: int, recipient: int) -> bytes:
    return b"fedfm-secagg/share/" + round_seed + struct.pack(">II", sender, recipient)


def _pairwise_mask(s_sk: bytes, peer_s_pk: bytes, round_seed: bytes, dim: int) -> np.ndarray:
    return prg_uint32(agree(s_sk, peer_s_pk, _info(b"mask", round_seed)), dim)


@dataclass(frozen=True)
class _Setup:
    round_seed: bytes
    clients: tuple[int, ...]
    threshold: int
    degree: int | None
    dim: int
    quantizer: Quantizer

    @classmethod
    def from_message(cls, msg: Mapping) -> "_Setup":
        return cls(
            round_seed=bytes(msg["round_seed"]),
            clients=tuple(int(c) for c in msg["clients"]),
            threshold=int(msg["threshold"]),
            degree=None if msg["degree"] is None else int(msg["degree"]),
            dim=int(msg["dim"]),
            quantizer=Quantizer(clip=float(msg["clip"]), bits=int(msg["bits"])),
        )

    def to_message(self) -> dict:
        return {
            "type": "setup",
            "round_seed": self.round_seed,
            "clients": list(self.clients),
            "threshold": self.threshold,
            "degree": self.degree,
            "dim": self.dim,
            "clip": self.quantizer.clip,
            "bits": self.quantizer.bits,
        }


# ------------------------------------------------------------------------- client


class SecAggClient:
    """One client's side of a single secure-aggregation round (one use only)."""

    def __init__(self, client_id: int, setup: Mapping) -> None:
        self.id = int(client_id)
        self.cfg = _Setup.from_message(setup)
        if self.id not in self.cfg.clients:
            raise ValueError(f"client {self.id} is not in the round's client list")
        self.neighbours = neighbour_graph(self.cfg.clients, self.cfg.degree, self.cfg.round_seed)[self.id]
        self._stage = 0
        self._held: dict[int, tuple[bytes, bytes]] = {}  # sender -> (share of b, share of s_sk)

    def _advance(self, stage: int, name: str) -> None:
        if self._stage != stage:
            raise SecAggAbort(f"client {self.id}: {name} called out of order (stage {self._stage})")
        self._stage = stage + 1

    def advertise_keys(self) -> dict:
        """Round 0: the two public keys."""
        self._advance(0, "advertise_keys")
        self._c_sk, self._c_pk = generate_keypair()
        self._s_sk, self._s_pk = generate_keypair()
        return {"type": "advertise_keys", "id": self.id, "c_pk": self._c_pk, "s_pk": self._s_pk}

    def share_keys(self, msg: Mapping) -> dict:
        """Round 1: encrypted Shamir shares of b_u and s_u's secret key, one per neighbour."""
        self._advance(1, "share_keys")
        t, seed = self.cfg.threshold, self.cfg.round_seed
        keys = {int(v): (bytes(k["c_pk"]), bytes(k["s_pk"])) for v, k in msg["keys"].items()}
        if keys.get(self.id) != (self._c_pk, self._s_pk):
            raise SecAggAbort(f"client {self.id}: server did not echo this client's own public keys")
        if not set(keys) <= self.neighbours | {self.id}:
            raise SecAggAbort(f"client {self.id}: received keys of clients outside its neighbourhood")
        flat = [pk for pair in keys.values() for pk in pair]
        if len(set(flat)) != len(flat):
            raise SecAggAbort(f"client {self.id}: duplicate public keys advertised")
        if len(keys) < t:
            raise SecAggAbort(f"client {self.id}: only {len(keys)} neighbours (incl. self) left, threshold {t}")
        self._peer_keys = keys
        self._b = os.urandom(KEY_BYTES)
        b_shares = shamir_split(self._b, t, [v + 1 for v in keys])
        s_shares = shamir_split(self._s_sk, t, [v + 1 for v in keys])
        out = {}
        for v, (c_pk, _) in keys.items():
            key = agree(self._c_sk, c_pk, _info(b"enc", seed))
            plaintext = struct.pack(">II", self.id, v) + b_shares[v + 1] + s_shares[v + 1]
            out[v] = encrypt(key, plaintext, _aad(seed, self.id, v))
        return {"type": "share_keys", "id": self.id, "shares": out}

    def masked_input(self, msg: Mapping, vector) -> dict:
        """Round 2: check the shares received, then send the masked, quantized vector."""
        self._advance(2, "masked_input")
        cfg = self.cfg
        cts = {int(u): bytes(ct) for u, ct in msg["shares"].items()}
        if not set(cts) <= set(self._peer_keys) or self.id not in cts:
            raise SecAggAbort(f"client {self.id}: share senders inconsistent with the advertised keys")
        if len(cts) < cfg.threshold:
            raise SecAggAbort(f"client {self.id}: only {len(cts)} clients shared keys, threshold {cfg.threshold}")
        for u, ct in cts.items():
            key = agree(self._c_sk, self._peer_keys[u][0], _info(b"enc", cfg.round_seed))
            try:
                plaintext = decrypt(key, ct, _aad(cfg.round_seed, u, self.id))
            except ShareAuthenticationError as exc:
                raise ShareAuthenticationError(f"client {self.id}: share from client {u}: {exc}") from exc
            if plaintext[:8] != struct.pack(">II", u, self.id) or (len(plaintext) - 8) % 2:
                raise SecAggAbort(f"client {self.id}: share from client {u} is misaddressed or malformed")
            half = (len(plaintext) - 8) // 2
            self._held[u] = (plaintext[8 : 8 + half], plaintext[8 + half :])
        x = np.asarray(vector, dtype=np.float64).reshape(-1)
        if x.size != cfg.dim:
            raise ValueError(f"client {self.id}: vector has {x.size} values, round expects {cfg.dim}")
        y = cfg.quantizer.quantize(x) + prg_uint32(self._b, cfg.dim)
        for v in cts:
            if v == self.id:
                continue
            mask = _pairwise_mask(self._s_sk, self._peer_keys[v][1], cfg.round_seed, cfg.dim)
            y = y + mask if self.id < v else y - mask  # uint32: wraps mod 2^32
        return {"type": "masked_input", "id": self.id, "y": y.astype("<u4").tobytes()}

    def unmask(self, msg: Mapping) -> dict:
        """Round 3: for each share held, reveal b's share (v survived) or s's share (v dropped)."""
        self._advance(3, "unmask")
        survivors = {int(u) for u in msg["survivors"]}
        if self.id not in survivors:
            raise SecAggAbort(f"client {self.id}: asked to unmask but not listed as a survivor")
        if len(survivors) < self.cfg.threshold:
            raise SecAggAbort(f"client {self.id}: only {len(survivors)} survivors, threshold {self.cfg.threshold}")
        b_out = {v: b for v, (b, _) in self._held.items() if v in survivors}
        s_out = {v: s for v, (_, s) in self._held.items() if v not in survivors}
        self._held.clear()
        self._b = self._s_sk = self._c_sk = None  # one round only
        return {"type": "unmask", "id": self.id, "b_shares": b_out, "s_shares": s_out}


# ------------------------------------------------------------------------- server


@dataclass
class SecAggResult:
    """Outcome of a round: the decoded sum over ``survivors`` (``count`` of them)."""

    sum: np.ndarray  # float64, shape (dim,)
    count: int
    survivors: list[int]
    dropped: list[int]  # clients that shared keys but whose masked input never arrived


class SecAggServer:
    """The server's side of one round; sees masked vectors and the final sum only."""

    def __init__(
        self,
        client_ids: Sequence[int],
        threshold: int,
        dim: int,
        degree: int | None = None,
        quantizer: Quantizer | None = None,
        round_seed: bytes | None = None,
    ) -> None:
        ids = [int(c) for c in client_ids]
        if len(set(ids)) != len(ids) or any(not 0 <= c < _MAX_ID - 1 for c in ids):
            raise ValueError("client ids must be distinct ints in [0, 2^32 - 1)")
        if dim < 1:
            raise ValueError("dim must be >= 1")
        quantizer = quantizer or Quantizer.for_clients(len(ids))
        if len(ids) > quantizer.max_clients:
            raise ValueError(
                f"{len(ids)} clients overflow {quantizer.bits}-bit values mod 2^32 "
                f"(capacity {quantizer.max_clients}); use Quantizer.for_clients"
            )
        seed = os.urandom(16) if round_seed is None else bytes(round_seed)
        self.graph = neighbour_graph(ids, degree, seed)
        smallest = min(len(nb) + 1 for nb in self.graph.values())
        if not (2 * threshold > smallest and threshold <= smallest):
            raise ValueError(
                f"threshold {threshold} must satisfy (k+1)/2 < t <= k+1 for the smallest "
                f"neighbourhood size k+1 = {smallest}"
            )
        self.cfg = _Setup(seed, tuple(sorted(ids)), int(threshold), degree, int(dim), quantizer)
        self._stage = 0

    def _advance(self, stage: int, name: str) -> None:
        if self._stage != stage:
            raise SecAggAbort(f"server: {name} called out of order (stage {self._stage})")
        self._stage = stage + 1

    def _need(self, alive: Iterable[int], what: str) -> None:
        alive = list(alive)
        if len(alive) < self.cfg.threshold:
            raise SecAggAbort(f"only {len(alive)} clients {what}, threshold is {self.cfg.threshold}")

    @staticmethod
    def _by_sender(msgs: Iterable[Mapping], kind: str, allowed: set[int]) -> dict[int, Mapping]:
        out: dict[int, Mapping] = {}
        for m in msgs:
            u = int(m["id"])
            if m.get("type") != kind or u not in allowed or u in out:
                raise SecAggAbort(f"unexpected or duplicate {kind} message from client {u}")
            out[u] = m
        return out

    def setup_message(self) -> dict:
        """The public parameters every client is created with."""
        return self.cfg.to_message()

    def on_keys(self, msgs: Iterable[Mapping]) -> dict[int, dict]:
        """Round 0 -> 1: forward each client its neighbours' public keys."""
        self._advance(0, "on_keys")
        got = self._by_sender(msgs, "advertise_keys", set(self.cfg.clients))
        self._need(got, "advertised keys")
        self._keys = {u: (bytes(m["c_pk"]), bytes(m["s_pk"])) for u, m in got.items()}
        self._u1 = set(got)
        out = {}
        for u in self._u1:
            group = (self.graph[u] | {u}) & self._u1
            out[u] = {"type": "keys", "keys": {v: {"c_pk": self._keys[v][0], "s_pk": self._keys[v][1]} for v in group}}
        return out

    def on_shares(self, msgs: Iterable[Mapping]) -> dict[int, dict]:
        """Round 1 -> 2: route each encrypted share to its recipient."""
        self._advance(1, "on_shares")
        got = self._by_sender(msgs, "share_keys", self._u1)
        self._need(got, "shared keys")
        self._u2 = set(got)
        inbox: dict[int, dict[int, bytes]] = {v: {} for v in self._u2}
        for u, m in got.items():
            recipients = {int(v) for v in m["shares"]}
            if recipients != (self.graph[u] | {u}) & self._u1:
                raise SecAggAbort(f"client {u} did not share with exactly its neighbourhood")
            for v, ct in m["shares"].items():
                if int(v) in inbox:  # recipients that dropped out get nothing
                    inbox[int(v)][u] = bytes(ct)
        self._forwarded = {v: set(box) for v, box in inbox.items()}
        return {v: {"type": "shares", "shares": box} for v, box in inbox.items()}

    def on_masked(self, msgs: Iterable[Mapping]) -> dict[int, dict]:
        """Round 2 -> 3: collect masked inputs; tell the survivors who survived."""
        self._advance(2, "on_masked")
        got = self._by_sender(msgs, "masked_input", self._u2)
        self._need(got, "sent masked inputs")
        dim = self.cfg.dim
        self._y = {}
        for u, m in got.items():
            y = bytes(m["y"])
            if len(y) != 4 * dim:
                raise SecAggAbort(f"masked input of client {u} has the wrong length")
            self._y[u] = np.frombuffer(y, dtype="<u4").astype(np.uint32)
        self._u3 = set(got)
        survivors = sorted(self._u3)
        return {u: {"type": "survivors", "survivors": survivors} for u in self._u3}

    def on_unmask(self, msgs: Iterable[Mapping]) -> SecAggResult:
        """Round 3: reconstruct the needed secrets, remove all masks, decode the sum."""
        self._advance(3, "on_unmask")
        cfg, u3 = self.cfg, self._u3
        got = self._by_sender(msgs, "unmask", u3)
        self._need(got, "answered the unmasking round")
        dropped = self._u2 - u3
        b_shares: dict[int, dict[int, bytes]] = {v: {} for v in u3}
        s_shares: dict[int, dict[int, bytes]] = {v: {} for v in dropped}
        for w, m in got.items():
            b, s = {int(v): bytes(x) for v, x in m["b_shares"].items()}, {int(v): bytes(x) for v, x in m["s_shares"].items()}
            if set(b) | set(s) != self._forwarded[w] or not set(b) <= u3 or not set(s) <= dropped:
                raise SecAggAbort(f"client {w} revealed shares inconsistent with the survivor list")
            for v, share in b.items():
                b_shares[v][w + 1] = share
            for v, share in s.items():
                s_shares[v][w + 1] = share

        total = np.zeros(cfg.dim, dtype=np.uint32)
        for u in u3:
            total += self._y[u]
        for v in sorted(u3):  # strip self masks: needs b_v, never s_v
            try:
                b = shamir_combine(b_shares[v], cfg.threshold)
            except SecAggAbort as exc:
                raise SecAggAbort(f"cannot recover the self mask of client {v}: {exc}") from exc
            total -= prg_uint32(b, cfg.dim)
        for v in sorted(dropped):  # strip dangling pairwise masks: needs s_v, never b_v
            partners = [u for u in u3 if v in self._forwarded[u]]
            if not partners:
                continue
            try:
                s_sk = shamir_combine(s_shares[v], cfg.threshold)
            except SecAggAbort as exc:
                raise SecAggAbort(f"cannot recover the mask key of dropped client {v}: {exc}") from exc
            if public_key_of(s_sk) != self._keys[v][1]:
                raise SecAggAbort(f"reconstructed mask key of client {v} does not match its public key")
            for u in partners:
                mask = _pairwise_mask(s_sk, self._keys[u][1], cfg.round_seed, cfg.dim)
                # u added +mask if u < v, else -mask: undo it
                total = total - mask if u < v else total + mask
        survivors = sorted(u3)
        return SecAggResult(
            sum=cfg.quantizer.dequantize_sum(total, len(survivors)),
            count=len(survivors),
            survivors=survivors,
            dropped=sorted(dropped),
        )


# ------------------------------------------------------------------------- driver


def _to_numpy(v) -> np.ndarray:
    if type(v).__module__.startswith("torch"):
        v = v.detach().cpu().double().numpy()
    return np.asarray(v, dtype=np.float64)


def _seed_bytes(seed) -> bytes | None:
    if seed is None or isinstance(seed, (bytes, bytearray)):
        return None if seed is None else bytes(seed)
    return hashlib.sha256(b"fedfm-secagg/seed/" + repr(seed).encode()).digest()[:16]


def secure_sum(
    vectors: Sequence,
    threshold: int,
    neighbours: int | None = None,
    drop_after_share: Iterable[int] = (),
    seed=None,
    *,
    clip: float = 1.0,
    bits: int | None = None,
    drop_before_unmask: Iterable[int] = (),
    transcript: list | None = None,
):
    """Run the whole protocol in-process over clients ``0 .. n-1``; return ``(sum, survivors)``.

    ``vectors``: one array or tensor per client, all of the same shape.
    ``threshold``: Shamir threshold t, with (k+1)/2 < t <= k+1 (k = n - 1 for
    the complete graph). ``neighbours``: SecAgg+ degree k (None: complete
    graph, Bonawitz et al.). ``drop_after_share``: clients that vanish after
    ShareKeys (their input is left out of the sum); ``drop_before_unmask``:
    clients whose masked input counts but who vanish before unmasking.
    ``seed``: public round seed (fixes the neighbour graph only). ``clip`` and
    ``bits``: the :class:`Quantizer` (bits default: the finest that n clients
    can sum); each coordinate of the sum is within
    ``Quantizer.error_bound(len(survivors))`` of the true sum of the survivors'
    clipped vectors. ``transcript``: if a list, every message is appended to it.

    The sum has the shape of the inputs: a float64 array, or a tensor of the
    first input's dtype if the inputs are tensors. Raises :class:`SecAggAbort`
    when too few clients remain.
    """
    arrays, shape = _same_shaped(vectors)
    n, dim = len(arrays), int(np.prod(shape, dtype=np.int64))
    quantizer = Quantizer.for_clients(n, clip) if bits is None else Quantizer(clip=clip, bits=bits)
    server = SecAggServer(range(n), threshold, dim, neighbours, quantizer, _seed_bytes(seed))
    setup = server.setup_message()
    clients = {u: SecAggClient(u, setup) for u in range(n)}
    gone_share, gone_unmask = set(drop_after_share), set(drop_before_unmask)
    log = transcript.append if transcript is not None else (lambda m: None)

    def exchange(outgoing: list[dict]) -> list[dict]:
        for m in outgoing:
            log(m)
        return outgoing

    to_clients = server.on_keys(exchange([c.advertise_keys() for c in clients.values()]))
    to_clients = server.on_shares(exchange([clients[u].share_keys(m) for u, m in to_clients.items()]))
    to_clients = server.on_masked(
        exchange([clients[u].masked_input(m, arrays[u]) for u, m in to_clients.items() if u not in gone_share])
    )
    result = server.on_unmask(
        exchange([clients[u].unmask(m) for u, m in to_clients.items() if u not in gone_unmask])
    )
    return _like(result.sum.reshape(shape), vectors[0]), result.survivors


def _same_shaped(vectors: Sequence) -> tuple[list[np.ndarray], tuple]:
    """The vectors as float64 arrays, all of one shape (else ValueError), and that shape."""
    if not vectors:
        raise ValueError("secure_sum needs at least one vector")
    arrays = [_to_numpy(v) for v in vectors]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError("all vectors must have the same shape")
    return arrays, shape


def _like(total: np.ndarray, first):
    """``total`` as a tensor of ``first``'s dtype when the inputs were tensors, else the float64 array."""
    if type(first).__module__.startswith("torch"):
        import torch

        return torch.from_numpy(total).to(first.dtype)
    return total
