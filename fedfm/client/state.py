"""A client's private state (``Client.state``) as safetensors tensors plus JSON.

What persists on a client between rounds (SCAFFOLD's ``c_i``, error-feedback
residuals, personal tensors, DP-SGD bookkeeping) is checkpointed with the run
and, in multi-process simulations, handed between workers: tensors, maps of
tensors, or JSON scalars, never pickle.
"""

from __future__ import annotations

import json
from typing import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedfm.errors import FedfmError
from fedfm.tensor_groups import get_group, put_group


def client_states(clients, tensors: dict, orders: dict) -> dict:
    """Every client's private persistent state: tensors, maps of tensors, or JSON scalars."""
    out = {}
    for c in clients:
        if not c.state:
            continue
        entry = {}
        for key, value in c.state.items():
            group = f"client/{c.cid}/{key}"
            if isinstance(value, torch.Tensor):
                tensors[group] = value.detach().to("cpu").contiguous().clone()
                entry[key] = {"tensor": True}
            elif isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values()):
                put_group(tensors, orders, group, value)
                entry[key] = {"map": True}
            elif value is None or isinstance(value, (bool, int, float, str)):
                entry[key] = {"value": value}
            else:
                raise FedfmError(
                    f"cannot checkpoint client {c.cid}'s state {key!r} ({type(value).__name__}); "
                    "set checkpoint.every=0 to run without checkpoints"
                )
        out[str(c.cid)] = entry
    return out


def restore_clients(clients, meta: dict, tensors, orders) -> None:
    by_id = {c.cid: c for c in clients}
    for c in clients:
        c.state.clear()
    for cid, entry in meta.items():
        client = by_id.get(int(cid))
        if client is None:
            raise FedfmError(f"checkpoint holds state for client {cid}, which this run does not have")
        for key, how in entry.items():
            group = f"client/{cid}/{key}"
            if "tensor" in how:
                client.state[key] = tensors[group]
            elif "map" in how:
                client.state[key] = get_group(tensors, orders, group)
            else:
                client.state[key] = how["value"]


def clients_section(clients):
    """The checkpoint section (writer, loader) of the clients' private states."""
    def write(tensors: dict, orders: dict) -> dict:
        return client_states(clients, tensors, orders)

    def load(meta: dict, tensors, orders: dict) -> None:
        restore_clients(clients, meta, tensors, orders)

    return write, load


def pack_client_states(clients, metadata: dict[str, str] | None = None) -> bytes:
    """The private state of ``clients`` as one safetensors blob (multi-process simulation hands it on).

    ``metadata``: more string entries for the blob's header (read back with :func:`blob_metadata`).
    """
    tensors: dict[str, torch.Tensor] = {}
    orders: dict[str, list[str]] = {}
    meta = client_states(clients, tensors, orders)
    tensors.setdefault("_", torch.zeros(0))  # safetensors wants at least one tensor
    return st_save(tensors, metadata={**(metadata or {}), "clients": json.dumps(meta), "orders": json.dumps(orders)})


def blob_metadata(blob: bytes) -> dict[str, str]:
    """The header metadata of a safetensors blob (without reading its tensors)."""
    return json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")]).get("__metadata__", {})


def unpack_client_states(clients, blob: bytes) -> None:
    """Replace the state of every client named in ``blob`` (others are untouched)."""
    tensors = st_load(blob)
    info = blob_metadata(blob)
    meta, orders = json.loads(info["clients"]), json.loads(info["orders"])
    by_id = {c.cid: c for c in clients}
    for cid in meta:
        by_id[int(cid)].state.clear()
    restore_clients([by_id[int(cid)] for cid in meta], meta, tensors, orders)
