"""The wire format of secure-aggregation messages: safetensors, never pickle.

The protocol objects in :mod:`fedfm.privacy.secagg` exchange plain dicts of
ints, strings, lists and ``bytes`` (keys, encrypted shares, masked vectors).
:func:`pack` turns one such message into a safetensors file: every ``bytes``
value becomes a ``uint8`` tensor (the masked vector ``y`` is most of a
round's bytes) and the shape of the message -- nested dicts (int or str keys),
lists and scalars, with each ``bytes`` value replaced by the name of its
tensor -- travels as JSON in the header metadata. :func:`unpack` inverts it
exactly. The length of the packed bytes is what the byte ledger counts.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

_META_KEY = "fedfm.secagg"


class MessageFormatError(ValueError):
    """A secure-aggregation message that does not decode."""


def pack(msg: dict) -> bytes:
    """Encode one protocol message (see the module docstring)."""
    tensors: dict[str, np.ndarray] = {}

    def enc(v: Any):
        if isinstance(v, (bytes, bytearray)):
            name = f"b{len(tensors)}"
            tensors[name] = np.frombuffer(bytes(v), dtype=np.uint8).copy()
            return {"$b": name}
        if isinstance(v, dict):
            return {"$d": [[k if isinstance(k, str) else int(k), enc(x)] for k, x in v.items()]}
        if isinstance(v, (list, tuple)):
            return {"$l": [enc(x) for x in v]}
        if v is None or isinstance(v, (bool, str, float)):
            return v
        if isinstance(v, (int, np.integer)):
            return int(v)
        raise TypeError(f"cannot pack a {type(v).__name__} in a secure-aggregation message")

    shape = json.dumps(enc(msg), separators=(",", ":"))
    return save(tensors, metadata={_META_KEY: shape})


def unpack(payload: bytes) -> dict:
    """Decode bytes made by :func:`pack`; raises :class:`MessageFormatError` on anything else."""
    try:
        payload = bytes(payload)
        tensors = load(payload)
        header_len = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + header_len])
        shape = json.loads(header["__metadata__"][_META_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise MessageFormatError(f"malformed secure-aggregation message: {err}") from None

    def dec(v: Any):
        if isinstance(v, dict):
            if "$b" in v:
                t = tensors.get(v["$b"])
                if t is None or t.dtype != np.uint8:
                    raise MessageFormatError(f"message refers to a missing byte tensor {v['$b']!r}")
                return t.tobytes()
            if "$d" in v:
                return {k: dec(x) for k, x in v["$d"]}
            if "$l" in v:
                return [dec(x) for x in v["$l"]]
            raise MessageFormatError("unknown node in a secure-aggregation message")
        return v

    out = dec(shape)
    if not isinstance(out, dict):
        raise MessageFormatError("a secure-aggregation message must be a dict")
    return out
