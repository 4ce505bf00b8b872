"""Codecs for one flat float32 tensor: casts, stochastic quantization, top-k.

Every codec maps a 1-D float32 tensor ``x`` to named *parts* (tensors that
travel) plus JSON-able metadata, and back. A part named ``"v"`` is the
codec's *carrier*: a float32 tensor a later codec of the chain may code
further (top-k's kept values). :mod:`fedfm.compression.chain` composes them.

* ``fp16`` / ``bf16``: round to nearest in half precision (deterministic).
* ``int8`` / ``int4``: unbiased stochastic quantization (QSGD, Alistarh et
  al. 2017, with the max-norm scale of TernGrad / Wen et al. 2017): per chunk
  of ``chunk`` values (or the whole tensor), ``s = max|x| / L`` with
  ``L = 2^(b-1) - 1`` levels each side, ``q = floor(x/s + u)``,
  ``u ~ U[0, 1)``, so ``E[q·s] = x`` and ``|q·s - x| < s``. int4 packs two
  values per byte (``q + 8`` in a nibble, low nibble first).
* ``topk``: keep the ``k = ceil(fraction · n)`` entries of largest magnitude
  (indices as int32, values as the carrier) -- biased, meant to run with
  error feedback (Stich et al. 2018; Karimireddy et al. 2019), see
  :mod:`fedfm.compression.feedback`.

Every codec registers a factory ``(opts) -> Codec`` in
:data:`fedfm.registry.CODECS` (bottom of this module), where ``opts`` has
the compression section's shared options ``topk_fraction`` and
``chunk_size``, with its capabilities: ``LEADING`` (top-k: only first in a
chain), ``VALUE`` (at most one per chain), ``DOWNLOAD_SAFE`` (deterministic:
may code broadcasts), ``STOCHASTIC``.
"""

from __future__ import annotations

import math

import torch

from fedfm.registry import CODECS, DOWNLOAD_SAFE, LEADING, STOCHASTIC, VALUE


class CodecError(ValueError):
    """Parts or metadata that cannot be decoded."""


def _need(parts: dict, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    t = parts.get(name)
    if t is None:
        raise CodecError(f"missing part {name!r}")
    if t.dtype != dtype or t.dim() != 1 or t.numel() != numel:
        raise CodecError(f"part {name!r}: expected {numel} x {dtype}, got {tuple(t.shape)} x {t.dtype}")
    return t


def _size(meta: dict, key: str = "n") -> int:
    n = meta.get(key)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise CodecError(f"metadata {key!r} must be a non-negative integer, not {n!r}")
    return n


class Codec:
    name = ""
    stochastic = False

    def encode(self, x: torch.Tensor, gen: torch.Generator | None) -> tuple[dict[str, torch.Tensor], dict]:
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
        raise NotImplementedError


class Cast(Codec):
    """Round to a 16-bit float type (``fp16``: IEEE half; ``bf16``: bfloat16)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]

    def encode(self, x, gen):
        return {"v": x.to(self.dtype)}, {"n": x.numel()}

    def decode(self, parts, meta):
        return _need(parts, "v", self.dtype, _size(meta)).float()


class StochasticQuant(Codec):
    """Unbiased stochastic b-bit quantization with a max-abs scale per chunk."""

    stochastic = True

    def __init__(self, bits: int, chunk: int | None = None) -> None:
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        self.bits, self.chunk = bits, chunk
        self.name = f"int{bits}"
        self.levels = 2 ** (bits - 1) - 1  # 127 or 7: symmetric, zero exact

    def _layout(self, n: int, chunk: int | None) -> tuple[int, int]:
        c = n if not chunk else min(chunk, n)
        c = max(c, 1)
        return c, math.ceil(n / c) if n else 0

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """``max|x| / L`` per chunk (float32), 0 for an all-zero chunk."""
        c, m = self._layout(x.numel(), self.chunk)
        padded = torch.zeros(m * c, dtype=torch.float32)
        padded[: x.numel()] = x
        return padded.view(m, c).abs().amax(dim=1) / self.levels

    def encode(self, x, gen):
        n = x.numel()
        c, m = self._layout(n, self.chunk)
        s = self.scales(x)
        per = s.repeat_interleave(c)[:n]
        safe = torch.where(per > 0, per, torch.ones_like(per))
        u = torch.rand(n, generator=gen, dtype=torch.float32)
        q = torch.floor(x / safe + u).clamp_(-self.levels, self.levels)
        if self.bits == 8:
            packed = q.to(torch.int8)
        else:
            nib = (q + 8).to(torch.uint8)  # 1..15
            if n % 2:
                nib = torch.cat([nib, torch.tensor([8], dtype=torch.uint8)])
            packed = nib[0::2] | (nib[1::2] << 4)
        return {"q": packed, "s": s}, {"n": n, "chunk": c}

    def decode(self, parts, meta):
        n, c = _size(meta), _size(meta, "chunk")
        if c < 1 or (n and c > n) or (not n and c != 1):
            raise CodecError(f"bad chunk {c} for {n} values")
        m = math.ceil(n / c) if n else 0
        s = _need(parts, "s", torch.float32, m)
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise CodecError("scales must be finite and non-negative")
        if self.bits == 8:
            q = _need(parts, "q", torch.int8, n).float()
        else:
            packed = _need(parts, "q", torch.uint8, (n + 1) // 2)
            q = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:n].float() - 8
        if bool((q.abs() > self.levels).any()):
            raise CodecError(f"{self.name} codes outside [-{self.levels}, {self.levels}]")
        return q * s.repeat_interleave(c)[:n]


class TopK(Codec):
    """Keep the ``ceil(fraction · n)`` largest-magnitude entries (indices + values)."""

    name = "topk"

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"topk fraction must be in (0, 1], not {fraction}")
        self.fraction = fraction

    def k_for(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.fraction * n))) if n else 0

    def encode(self, x, gen):
        n = x.numel()
        k = self.k_for(n)
        idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
        return {"v": x[idx].contiguous(), "i": idx.to(torch.int32)}, {"n": n, "k": k}

    def decode(self, parts, meta):
        n, k = _size(meta), _size(meta, "k")
        if k > n:
            raise CodecError(f"k={k} exceeds n={n}")
        v = _need(parts, "v", torch.float32, k)
        idx = _need(parts, "i", torch.int32, k).long()
        if k and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise CodecError("top-k index out of range")
        out = torch.zeros(n, dtype=torch.float32)
        out[idx] = v
        return out


# -- the registered codecs --------------------------------------------------------------
@CODECS.register("topk", capabilities={LEADING}, summary="keep the top-k entries by magnitude (with error feedback)")
def _topk(opts) -> Codec:
    return TopK(opts.topk_fraction)


@CODECS.register("fp16", capabilities={VALUE, DOWNLOAD_SAFE}, summary="IEEE half precision, round to nearest")
def _fp16(opts) -> Codec:
    return Cast("fp16")


@CODECS.register("bf16", capabilities={VALUE, DOWNLOAD_SAFE}, summary="bfloat16, round to nearest")
def _bf16(opts) -> Codec:
    return Cast("bf16")


@CODECS.register("int8", capabilities={VALUE, STOCHASTIC}, summary="unbiased stochastic 8-bit quantization (QSGD)")
def _int8(opts) -> Codec:
    return StochasticQuant(8, opts.chunk_size)


@CODECS.register("int4", capabilities={VALUE, STOCHASTIC}, summary="unbiased stochastic 4-bit quantization (QSGD)")
def _int4(opts) -> Codec:
    return StochasticQuant(4, opts.chunk_size)
