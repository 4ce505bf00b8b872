"""Coded payloads: safetensors tensors plus JSON metadata naming the codec chain.

Layout (never pickle): tensor ``j`` of the main state travels as
``t<j>/<stage>.<part>`` (the codec chain's parts) or ``t<j>/raw`` (a tensor
the chain does not code: non-float, or a chain of none); algorithm extras
(SCAFFOLD's control variates, ...) travel uncoded as ``extras/<extra>/<k>``.
The metadata (``__metadata__["fedfm"]``, JSON) holds the kind, the chain, and
per tensor its name, shape, dtype and per-stage codec metadata. Anything
that does not decode raises :class:`~fedfm.compression.codecs.CodecError`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedfm.compression.chain import CodecChain, build_codec, chain_problem
from fedfm.compression.codecs import CodecError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def codes(t: torch.Tensor, chain: CodecChain) -> bool:
    """Whether ``chain`` codes ``t`` (floating tensors, non-empty chain)."""
    return bool(chain.codecs) and t.is_floating_point() and str(t.dtype).removeprefix("torch.") in DTYPES


def pack(
    kind: str,
    chain: CodecChain,
    tensors: Mapping[str, torch.Tensor],
    coded: Mapping[str, tuple[dict, list]],
    extras: Mapping[str, Mapping[str, torch.Tensor]],
    fields: dict,
) -> bytes:
    """The payload bytes; ``coded[name] = (parts, metas)`` for each tensor the chain codes."""
    flat: OrderedDict[str, torch.Tensor] = OrderedDict()
    entries = []
    for j, (name, t) in enumerate(tensors.items()):
        entry = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if name in coded:
            parts, metas = coded[name]
            entry["codec"] = metas
            for k, v in parts.items():
                flat[f"t{j}/{k}"] = v.contiguous()
        else:
            flat[f"t{j}/raw"] = t.detach().cpu().contiguous()
        entries.append(entry)
    extra_keys = []
    for ename, group in extras.items():
        for k, v in group.items():
            flat[f"extras/{ename}/{k}"] = v.detach().cpu().contiguous()
            extra_keys.append([ename, k])
    meta = {"kind": kind, "chain": chain.names, "tensors": entries, "extras": extra_keys, **fields}
    return st_save(flat, metadata={"fedfm": json.dumps(meta)})


def unpack(payload: bytes, kind: str, expected_chain: list[str], template: Mapping[str, torch.Tensor] | None = None):
    """``(tensors, extras, metadata)`` decoded from ``payload``; raises CodecError.

    ``template`` (the server's global state): a coded tensor whose declared shape differs from
    the template's is refused *before* decoding, so a forged size cannot make the server allocate.
    """
    try:
        flat = st_load(payload)
        header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
        meta = json.loads(header["__metadata__"]["fedfm"])
    except Exception as err:  # noqa: BLE001 - any decoding failure is a malformed payload
        raise CodecError(f"malformed payload: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise CodecError(f"payload is not a coded {kind}")
    names = meta.get("chain")
    if names != list(expected_chain):
        raise CodecError(f"payload codec chain {names!r} is not the configured {list(expected_chain)!r}")
    problem = chain_problem(names)
    if problem:
        raise CodecError(f"bad codec chain: {problem}")
    chain = CodecChain([build_codec(n) for n in names])
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    used = set()
    try:
        for j, entry in enumerate(meta["tensors"]):
            name, shape, dtype = entry["name"], entry["shape"], DTYPES.get(entry["dtype"])
            if "codec" in entry:
                if template is not None and (name not in template or list(template[name].shape) != shape):
                    raise CodecError(f"{name}: declared shape {shape} does not match the global state")
                if dtype is None:
                    raise CodecError(f"{name}: cannot code dtype {entry['dtype']!r}")
                prefix = f"t{j}/"
                parts = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
                used.update(prefix + k for k in parts)
                tensors[name] = chain.decode(parts, entry["codec"], shape).to(dtype)
            else:
                key = f"t{j}/raw"
                if key not in flat:
                    raise CodecError(f"payload lists tensor {name!r} but does not hold it")
                used.add(key)
                tensors[name] = flat[key]
        extras: dict[str, OrderedDict[str, torch.Tensor]] = {}
        for ename, k in meta["extras"]:
            key = f"extras/{ename}/{k}"
            if key not in flat:
                raise CodecError(f"payload lists tensor {key!r} but does not hold it")
            used.add(key)
            extras.setdefault(ename, OrderedDict())[k] = flat[key]
    except CodecError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise CodecError(f"malformed coded payload: {type(err).__name__}: {err}") from None
    stray = sorted(set(flat) - used)
    if stray:
        raise CodecError(f"unexpected tensor {stray[0]!r} in payload")
    return tensors, extras, meta
