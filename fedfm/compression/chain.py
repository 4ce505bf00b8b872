"""A codec chain: codecs applied one after another to each tensor.

``[topk, int8]`` keeps the top-k entries, then quantizes the kept values:
stage i codes the carrier (``"v"``) of stage i-1; every other part of every
stage travels. Only a ``LEADING`` codec (``topk``) yields a float32 carrier,
so it may only come first, and at most one ``VALUE`` codec (``fp16``,
``bf16``, ``int8``, ``int4``) follows it (capabilities of
:data:`fedfm.registry.CODECS`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fedfm.compression.codecs import Codec, CodecError
from fedfm.registry import CODECS, DOWNLOAD_SAFE, LEADING, VALUE


def value_codecs() -> list[str]:
    """Codecs that code every value to a narrower type (at most one per chain)."""
    return CODECS.names(VALUE)


def sound_download() -> list[str]:
    """Codecs deterministic enough for broadcasts: every client starts from the same state."""
    return CODECS.names(DOWNLOAD_SAFE)


def chain_problem(names: list[str]) -> str | None:
    """Why ``names`` is not a valid chain, or None."""
    unknown = [n for n in names if n not in CODECS]
    if unknown:
        return f"unknown codec {unknown[0]!r} (choose from {', '.join(CODECS.names())})"
    leading = [n for n in names[1:] if CODECS.supports(n, LEADING)]
    if leading:
        return f"{leading[0]} must come first in a codec chain"
    values = [n for n in names if CODECS.supports(n, VALUE)]
    if len(values) > 1:
        return f"at most one of {', '.join(value_codecs())} per chain, got {values}"
    return None


def build_codec(name: str, topk_fraction: float = 0.1, chunk: int | None = None) -> Codec:
    """The registered codec ``name`` with the compression section's shared options."""
    return CODECS.get(name).obj(SimpleNamespace(topk_fraction=topk_fraction, chunk_size=chunk))


class CodecChain:
    """Encodes/decodes one tensor of any shape through a list of codecs."""

    def __init__(self, codecs: list[Codec]) -> None:
        self.codecs = codecs
        self.names = [c.name for c in codecs]

    def encode(self, x: torch.Tensor, gen: torch.Generator | None) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """Parts named ``"<stage>.<part>"`` and one metadata dict per stage."""
        cur = x.detach().reshape(-1).to(torch.float32)
        out, metas = {}, []
        for i, codec in enumerate(self.codecs):
            parts, meta = codec.encode(cur, gen)
            if i < len(self.codecs) - 1:
                cur = parts.pop("v")
            out.update({f"{i}.{k}": v for k, v in parts.items()})
            metas.append(meta)
        return out, metas

    def decode(self, parts: dict[str, torch.Tensor], metas: list, shape: list[int]) -> torch.Tensor:
        """The float32 tensor of ``shape``; raises CodecError on anything malformed."""
        if not isinstance(metas, list) or len(metas) != len(self.codecs):
            raise CodecError(f"expected {len(self.codecs)} stage metadata entries")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CodecError(f"bad shape {shape!r}")
        cur = None
        for i in reversed(range(len(self.codecs))):
            stage = {k.partition(".")[2]: v for k, v in parts.items() if k.partition(".")[0] == str(i)}
            if cur is not None:
                stage["v"] = cur
            if not isinstance(metas[i], dict):
                raise CodecError(f"stage {i} metadata is not an object")
            cur = self.codecs[i].decode(stage, metas[i])
        numel = 1
        for d in shape:
            numel *= d
        if cur.numel() != numel:
            raise CodecError(f"decoded {cur.numel()} values for shape {shape}")
        return cur.reshape(shape)
