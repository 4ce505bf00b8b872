"""Where the randomness of every DP mechanism comes from: OS entropy, unless a run asks for reproducible noise.

A DP guarantee assumes the adversary does not know the noise. A generator
seeded from the run seed breaks that for anyone who has the config (the seed
is in ``config.yaml``, in every checkpoint and in the run folder): they can
regenerate the noise and subtract it. So by default each mechanism draws from
a fresh ``torch.Generator`` seeded with 63 bits from :mod:`secrets` (the
operating system's CSPRNG), reseeded for every batch of draws (client-level
DP: every round; DP-SGD: every client participation). The seed lives only in
memory: no checkpoint, log or metric holds anything that reconstructs past
noise, and a resumed run draws fresh noise.

Workers of a multi-process simulation must all finish a round with the same
noise (each computes the new global state itself): each contributes
:func:`seed_shares` from its own OS entropy to the round's gathered scalars
and all derive the same :func:`joint_seed` from every worker's shares.

``privacy.reproducible_noise: true`` derives those seeds from the run seed
instead (bit-identical reruns and resumes, for research); the run logs a
warning that its noise is then no secret to anyone with the config.

Either way the noise *distribution* is the same, so the accountants'
guarantees are unchanged; they rest on the noise being unknown, which only
the default delivers. Residual caveats even then: torch's CPU generator is a
Mersenne Twister (fast, not cryptographic: its outputs are never released
directly here, only noised sums, but it is not a vetted secure sampler), and
floating-point Gaussian sampling leaks through its low-order bits (Mironov
2012). A deployment facing a strong adversary should use a vetted discrete
Gaussian sampler.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Iterable

import torch

SEED_BITS = 63  # torch.Generator.manual_seed takes a 64-bit seed; keep it non-negative
SHARE_BITS = 48  # a seed share travels as a float64: exact below 2**53


def entropy_seed() -> int:
    """A fresh seed from the operating system's CSPRNG (:mod:`secrets`)."""
    return secrets.randbits(SEED_BITS)


def noise_generator(reproducible_seed: int | None) -> torch.Generator:
    """A fresh CPU generator: seeded with ``reproducible_seed``, or from OS entropy when it is None."""
    seed = entropy_seed() if reproducible_seed is None else int(reproducible_seed)
    return torch.Generator().manual_seed(seed)


def seed_shares(count: int = 2) -> list[float]:
    """``count`` fresh ``SHARE_BITS``-bit integers from OS entropy, as (exact) floats: one worker's share."""
    return [float(secrets.randbits(SHARE_BITS)) for _ in range(count)]


def joint_seed(shares: Iterable[float]) -> int:
    """A ``SEED_BITS``-bit seed from every worker's shares (in worker order): the same on every worker."""
    text = ",".join(str(int(s)) for s in shares)
    digest = hashlib.sha256(f"fedfm.noise:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << SEED_BITS) - 1)
