"""Fixed-point encoding of float vectors for secure aggregation.

Masks in secure aggregation (Bonawitz et al. 2017, section 3) live in the
group Z_M; here M = 2^32 and vectors are ``numpy.uint32`` arrays, whose
addition and subtraction wrap modulo 2^32 exactly as the protocol needs.

Encoding of one value x with clipping range R and ``bits`` bits per value::

    levels = 2^bits - 1
    step   = 2R / levels
    q(x)   = round((clip(x, -R, R) + R) / step)         in {0, ..., levels}

(the offset +R makes every encoded value non-negative). The sum of n encoded
values is at most n * levels, so it is recovered exactly from its residue
mod 2^32 as long as ``n * levels <= 2^32 - 1``: that is the *sum capacity*,
``Quantizer.max_clients = (2^32 - 1) // levels``. The decoded sum is
``q_sum * step - n * R``.

Error bound: for inputs inside [-R, R], rounding moves each value by at most
``step / 2 = R / levels``, so every coordinate of the decoded sum of n vectors
is within ``n * R / (2^bits - 1)`` of the true sum (plus float64 rounding,
~1e-15 relative). Values outside [-R, R] are clipped first, which adds
``|x| - R`` of error: pick R to cover the update. After client-level DP
clipping to L2 norm C, R = C is lossless because |x_i| <= ||x||_2 <= C.

:meth:`Quantizer.for_clients` picks the most bits that n clients can sum
without overflow (28 bits for 12 clients, 16 bits for up to 65537 clients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 32
MODULUS = 2**MODULUS_BITS


@dataclass(frozen=True)
class Quantizer:
    """Clip to ``[-clip, clip]`` and round to ``bits``-bit unsigned integers (see module doc)."""

    clip: float = 1.0  # R
    bits: int = 16

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int) and 1 <= self.bits <= MODULUS_BITS):
            raise ValueError(f"bits must be an int in [1, {MODULUS_BITS}], got {self.bits!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip range R must be a positive finite number, got {self.clip!r}")

    @classmethod
    def for_clients(cls, n: int, clip: float = 1.0) -> "Quantizer":
        """The finest quantizer whose sum capacity holds ``n`` clients."""
        if not 1 <= n <= MODULUS - 1:
            raise ValueError(f"cannot aggregate {n} clients in 32 bits")
        bits = ((MODULUS - 1) // n + 1).bit_length() - 1
        return cls(clip=clip, bits=min(bits, MODULUS_BITS))

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def step(self) -> float:
        return 2.0 * self.clip / self.levels

    @property
    def max_clients(self) -> int:
        """How many encoded vectors can be summed mod 2^32 without overflow."""
        return (MODULUS - 1) // self.levels

    def error_bound(self, n: int) -> float:
        """Max abs error per coordinate of a decoded sum of ``n`` in-range vectors."""
        return n * self.clip / self.levels

    def quantize(self, x) -> np.ndarray:
        """Encode a float array as ``uint32`` (clipping to [-R, R]); NaN/inf are rejected."""
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("cannot quantize NaN or infinite values")
        q = np.rint((np.clip(x, -self.clip, self.clip) + self.clip) / self.step)
        return np.clip(q, 0, self.levels).astype(np.uint32)

    def dequantize_sum(self, q_sum: np.ndarray, n: int) -> np.ndarray:
        """Decode the (unmasked, mod 2^32) sum of ``n`` encoded vectors to float64."""
        if not 0 <= n <= self.max_clients:
            raise ValueError(f"{n} clients exceed the sum capacity {self.max_clients} of {self.bits}-bit values")
        return np.asarray(q_sum, dtype=np.uint32).astype(np.float64) * self.step - n * self.clip
