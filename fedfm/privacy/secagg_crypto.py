"""Cryptographic building blocks of secure aggregation.

Everything the protocol in :mod:`fedfm.privacy.secagg` needs, as small pure
functions over ``bytes`` (so that messages can later travel over a network):

* key agreement: X25519 key pairs and ``agree`` = HKDF-SHA256(X25519(sk, pk)),
  as in Bonawitz et al. 2017, "Practical Secure Aggregation for
  Privacy-Preserving Machine Learning" (CCS'17), section 4 (KA.gen / KA.agree);
* authenticated encryption of the secret shares: AES-256-GCM with a fresh
  random 96-bit nonce (the paper's AE.enc / AE.dec); a tampered ciphertext
  raises :class:`ShareAuthenticationError`;
* a pseudo-random generator for the masks: AES-256-CTR keystream read as
  little-endian ``uint32`` words (the paper's PRG);
* t-out-of-n Shamir secret sharing over the prime field GF(2^127 - 1); a
  secret of any length is cut into 15-byte chunks, each shared with its own
  random polynomial of degree t - 1.

Randomness for keys, seeds and polynomials always comes from the operating
system's CSPRNG (``os.urandom`` / ``secrets``), never from a user seed.
"""

from __future__ import annotations

import os
import secrets
import struct
from typing import Iterable, Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfm.errors import FedfmError

PRIME = 2**127 - 1  # Mersenne prime: the Shamir field
CHUNK_BYTES = 15  # 120-bit chunks, < 127 bits, so every chunk is a field element
FIELD_BYTES = 16  # one field element on the wire
KEY_BYTES = 32  # X25519 keys, AES-256 keys, self-mask seeds
NONCE_BYTES = 12  # AES-GCM nonce
TAG_BYTES = 16  # AES-GCM tag


class SecAggAbort(FedfmError):
    """The secure-aggregation round cannot finish safely and was aborted.

    Raised when fewer than ``threshold`` clients (or shares) remain, when a
    message is inconsistent with what was sent earlier, or when a share fails
    authentication. The round produces no output; nothing secret leaks.
    """


class ShareAuthenticationError(SecAggAbort):
    """An encrypted share failed AES-GCM authentication (tampered or misrouted)."""


# ----------------------------------------------------------------- key agreement


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as ``(secret_key, public_key)``, 32 raw bytes each."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def public_key_of(secret_key: bytes) -> bytes:
    """The X25519 public key that belongs to ``secret_key``."""
    return X25519PrivateKey.from_private_bytes(secret_key).public_key().public_bytes_raw()


def agree(secret_key: bytes, peer_public_key: bytes, info: bytes) -> bytes:
    """32-byte shared key: HKDF-SHA256(X25519(secret_key, peer_public_key), info).

    Symmetric: ``agree(sk_u, pk_v, i) == agree(sk_v, pk_u, i)``. ``info`` binds the
    key to a purpose and a round, so encryption and mask keys never coincide.
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(secret_key).exchange(
            X25519PublicKey.from_public_bytes(peer_public_key)
        )
    except ValueError as exc:  # malformed or low-order public key
        raise SecAggAbort(f"key agreement failed: {exc}") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


# ------------------------------------------------------- authenticated encryption


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM: ``nonce || ciphertext || tag`` with a fresh random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt`; raises :class:`ShareAuthenticationError` on any tampering."""
    blob = bytes(blob)
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ShareAuthenticationError("encrypted share is truncated")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise ShareAuthenticationError(
            "encrypted share failed authentication (tampered, misrouted or wrong key)"
        ) from exc


# --------------------------------------------------------------------------- PRG


def prg_uint32(key: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random ``uint32`` words: the AES-256-CTR keystream of ``key``.

    Each key is used for exactly one mask (keys are fresh per round and per
    purpose), so the all-zero counter block is safe.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"PRG key must be {KEY_BYTES} bytes, got {len(key)}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


# ------------------------------------------------------------ Shamir secret sharing


def _poly_eval(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def _lagrange_at(points: list[tuple[int, int]], x: int) -> int:
    """Value at ``x`` of the unique polynomial of degree < len(points) through ``points``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def shamir_split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Split ``secret`` into one share per evaluation point ``x`` (distinct, 0 < x < p).

    Any ``threshold`` shares reconstruct the secret; fewer reveal nothing about it
    (Shamir 1979). A share is ``len(secret)`` (2 bytes) then one 16-byte field
    element per 15-byte chunk of the secret.
    """
    xs = [int(x) for x in xs]
    if threshold < 1:
        raise ValueError("threshold must be >= 1")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and in (0, p)")
    if len(xs) < threshold:
        raise ValueError(f"{len(xs)} share holders cannot meet threshold {threshold}")
    if len(secret) >= 2**16:
        raise ValueError("secret too long")
    chunks = [int.from_bytes(secret[i : i + CHUNK_BYTES], "big") for i in range(0, len(secret), CHUNK_BYTES)]
    polys = [[c] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)] for c in chunks]
    header = struct.pack(">H", len(secret))
    return {
        x: header + b"".join(_poly_eval(p, x).to_bytes(FIELD_BYTES, "big") for p in polys) for x in xs
    }


def _parse_share(share: bytes) -> tuple[int, list[int]]:
    share = bytes(share)
    if len(share) < 2:
        raise SecAggAbort("malformed share")
    (length,) = struct.unpack(">H", share[:2])
    n_chunks = -(-length // CHUNK_BYTES)
    if len(share) != 2 + FIELD_BYTES * n_chunks:
        raise SecAggAbort("malformed share")
    body = share[2:]
    ys = [int.from_bytes(body[i * FIELD_BYTES : (i + 1) * FIELD_BYTES], "big") for i in range(n_chunks)]
    if any(y >= PRIME for y in ys):
        raise SecAggAbort("malformed share")
    return length, ys


def shamir_combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Reconstruct the secret from ``{x: share}`` by Lagrange interpolation at 0.

    Raises :class:`SecAggAbort` when fewer than ``threshold`` shares are given,
    or when shares beyond the first ``threshold`` do not lie on the same
    polynomial (a corrupted share).
    """
    if len(shares) < threshold:
        raise SecAggAbort(f"only {len(shares)} shares available, threshold is {threshold}")
    parsed = sorted((int(x), _parse_share(s)) for x, s in shares.items())
    lengths = {length for _, (length, _) in parsed}
    if len(lengths) != 1:
        raise SecAggAbort("shares disagree on the secret length")
    (length,) = lengths
    out = bytearray()
    for c in range(-(-length // CHUNK_BYTES)):
        points = [(x, ys[c]) for x, (_, ys) in parsed]
        base, extra = points[:threshold], points[threshold:]
        for x, y in extra:
            if _lagrange_at(base, x) != y:
                raise SecAggAbort("inconsistent shares: reconstruction would be corrupt")
        value = _lagrange_at(base, 0)
        size = min(CHUNK_BYTES, length - c * CHUNK_BYTES)
        if value >= 256**size:
            raise SecAggAbort("reconstructed chunk out of range: corrupt shares")
        out += value.to_bytes(size, "big")
    return bytes(out)
