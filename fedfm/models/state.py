"""The trainable state: what travels between clients and server.

A state is an ordered mapping ``name -> tensor``. It is read from and written
to the live parameters of the one shared model in place (:func:`get_state`,
:func:`set_state_`), and stored or sent as safetensors -- never pickle
(:func:`save_state`, :func:`load_state`, :func:`state_to_bytes`,
:func:`state_from_bytes`). The key order survives every round trip: it is kept
in the safetensors metadata under :data:`ORDER_KEY`, which the readers strip.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save, save_file

from fedfm.errors import FedfmError

State = "OrderedDict[str, torch.Tensor]"
ORDER_KEY = "__fedfm_keys__"  # safetensors metadata entry holding the key order


def get_state(params: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Detached CPU copies of the live trainable tensors, in ``params`` order (wherever the model lives)."""
    with torch.no_grad():
        return OrderedDict((k, p.detach().to("cpu", copy=True)) for k, p in params.items())


def set_state_(params: Mapping[str, torch.nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the live parameters in place (dtype and device follow the parameter).

    Raises :class:`FedfmError` on missing or extra keys or a shape mismatch,
    before touching any parameter.
    """
    if state.keys() != params.keys():
        missing = [k for k in params if k not in state]
        extra = [k for k in state if k not in params]
        raise FedfmError(
            f"trainable state does not match the model: missing {_few(missing)}, extra {_few(extra)}"
        )
    for k, p in params.items():
        if tuple(state[k].shape) != tuple(p.shape):
            raise FedfmError(
                f"trainable state {k!r} has shape {tuple(state[k].shape)}, the model expects {tuple(p.shape)}"
            )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def check_start_state(state: Mapping[str, torch.Tensor], path) -> None:
    """Refuse starting weights (``model.init_state``) with a non-float or a NaN/Inf tensor, naming file and tensor.

    Such a state would be cast silently, or make every client's update invalid.
    """
    for k, t in state.items():
        if not t.is_floating_point():
            raise FedfmError(f"model.init_state {path}: tensor {k!r} is {t.dtype}, not floating point")
        if not bool(torch.isfinite(t).all()):
            raise FedfmError(f"model.init_state {path}: tensor {k!r} holds NaN or Inf values")


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data in ``state`` (no container overhead)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous, non-aliasing tensors as safetensors requires."""
    out, seen = {}, set()
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise FedfmError(f"trainable state {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _metadata(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise FedfmError(f"state metadata must map str to str, got {k!r}: {v!r}")
    if ORDER_KEY in meta:
        raise FedfmError(f"state metadata key {ORDER_KEY!r} is reserved")
    meta[ORDER_KEY] = json.dumps(list(state.keys()))
    return meta


def _ordered(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None):
    meta = dict(meta or {})
    order = json.loads(meta.pop(ORDER_KEY, "null")) or sorted(tensors)
    if set(order) != set(tensors):
        order = sorted(tensors)
    return OrderedDict((k, tensors[k]) for k in order), meta


def save_state(state: Mapping[str, torch.Tensor], path, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state`` to a safetensors file (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(state), str(path), metadata=_metadata(state, metadata))


def load_state(path) -> tuple["OrderedDict[str, torch.Tensor]", dict[str, str]]:
    """Read a safetensors state file: ``(state, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise FedfmError(f"trainable state file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FedfmError(f"cannot read trainable state {path}: {e}") from None
    return _ordered(tensors, meta)


def state_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize ``state`` to safetensors bytes: the wire format."""
    return save(_tensors(state), metadata=_metadata(state, None))


def state_from_bytes(data: bytes) -> "OrderedDict[str, torch.Tensor]":
    """Inverse of :func:`state_to_bytes`."""
    try:
        tensors = st_load(bytes(data))
        meta = _header_metadata(data)
    except (SafetensorError, ValueError) as e:
        raise FedfmError(f"invalid trainable-state bytes: {e}") from None
    return _ordered(tensors, meta)[0]


def _header_metadata(data: bytes) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors buffer (the header is 8-byte length + JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(bytes(data[8 : 8 + n])).get("__metadata__")

