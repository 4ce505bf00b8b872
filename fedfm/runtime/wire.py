"""The wire format: broadcasts and updates as safetensors bytes, never pickle.

Tensors are namespaced inside one safetensors blob (``state/<name>``,
``delta/<name>``, ``extras/<extra>/<name>``); scalars travel as JSON in the
safetensors metadata. The simulation really encodes and decodes every
payload, so the byte counts it reports are the bytes a deployment would send.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedfm.algorithms.base import Broadcast, Update


class WireError(ValueError):
    """A payload that cannot be decoded (truncated, wrong format, missing fields)."""


def _flatten(main_key: str, main: Mapping[str, torch.Tensor], extras: Mapping[str, Mapping[str, torch.Tensor]]):
    # Bytes are written from CPU memory: a tensor on a GPU is copied to the host here
    # (explicitly, rather than relying on safetensors doing it); a CPU tensor is not copied.
    flat = OrderedDict((f"{main_key}/{k}", v.cpu().contiguous()) for k, v in main.items())
    for name, tensors in extras.items():
        for k, v in tensors.items():
            flat[f"extras/{name}/{k}"] = v.cpu().contiguous()
    return flat


def _unflatten(main_key: str, flat: Mapping[str, torch.Tensor], order: list[str]):
    main: OrderedDict[str, torch.Tensor] = OrderedDict()
    extras: dict[str, OrderedDict[str, torch.Tensor]] = {}
    for key in order:
        if key not in flat:
            raise WireError(f"payload lists tensor {key!r} but does not hold it")
        head, _, rest = key.partition("/")
        if head == main_key:
            main[rest] = flat[key]
        elif head == "extras":
            name, _, k = rest.partition("/")
            extras.setdefault(name, OrderedDict())[k] = flat[key]
        else:
            raise WireError(f"unexpected tensor {key!r} in payload")
    return main, extras


def _decode(payload: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        flat = st_load(payload)
        # safetensors keeps metadata in the JSON header: read it back.
        header_len = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("fedfm", "{}"))
    except Exception as err:  # noqa: BLE001 - any decoding failure is a malformed payload
        raise WireError(f"malformed payload: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return flat, meta


def encode_broadcast(b: Broadcast) -> bytes:
    flat = _flatten("state", b.state, b.extras)
    meta = {"kind": "broadcast", "version": b.version, "order": list(flat)}
    return st_save(flat, metadata={"fedfm": json.dumps(meta)})


def decode_broadcast(payload: bytes) -> Broadcast:
    flat, meta = _decode(payload)
    if meta.get("kind") != "broadcast":
        raise WireError("payload is not a broadcast")
    state, extras = _unflatten("state", flat, meta["order"])
    return Broadcast(state=state, version=int(meta["version"]), extras=extras)


def encode_update(u: Update) -> bytes:
    flat = _flatten("delta", u.delta, u.extras)
    meta = {
        "kind": "update",
        "client_id": int(u.client_id),
        "num_examples": int(u.num_examples),
        "metrics": {k: float(v) for k, v in u.metrics.items()},
        "base_version": int(u.base_version),
        "order": list(flat),
    }
    return st_save(flat, metadata={"fedfm": json.dumps(meta)})


def decode_update(payload: bytes) -> Update:
    flat, meta = _decode(payload)
    if meta.get("kind") != "update":
        raise WireError("payload is not an update")
    try:
        delta, extras = _unflatten("delta", flat, meta["order"])
        return Update(
            client_id=int(meta["client_id"]),
            delta=delta,
            num_examples=int(meta["num_examples"]),
            metrics=dict(meta.get("metrics", {})),
            extras=extras,
            base_version=int(meta.get("base_version", 0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise WireError(f"malformed update metadata: {err}") from None
