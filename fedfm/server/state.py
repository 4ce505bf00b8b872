"""The server's state as tensors (for safetensors) plus JSON: what a checkpoint holds of it.

Tensor groups: ``global`` (the newest version), ``ema`` (the released
average, when on), ``server_opt/<slot>/<name>`` (the server optimizer's
moments), ``scaffold_c`` (SCAFFOLD's control variate), ``server/base/<v>``
(versions that FedAsync clients in flight started from). JSON: version, the
fold's own counters (the DP fold's noise-stream index and clip norm), the
accountant, the byte ledger, the rejected updates, the upload count, the
update validation's history of accepted norms (its running median's input)
and the asynchronous bookkeeping (who holds which version, staleness seen).
"""

from __future__ import annotations

from typing import Mapping

import torch

from fedfm.errors import FedfmError
from fedfm.tensor_groups import get_group, put_group

LEDGER_TOTALS = ("total", "raw_total")  # cumulative byte counts (raw: before codecs)


def save(server, tensors: dict, orders: dict) -> dict:
    put_group(tensors, orders, "global", server.global_state)
    if server.ema.state is not None:
        put_group(tensors, orders, "ema", server.ema.state)
    for version, state in server.bases.items():
        put_group(tensors, orders, f"server/base/{version}", state)
    ledger = server.ledger
    return {
        "version": int(server.version),
        "ema_version": int(server.ema.version),
        "fold": _fold_state(server.algorithm.fold, tensors, orders),
        "accountant": None if server.privacy is None else server.privacy.accountant.state_dict(),
        "ledger": {
            **{key: dict(getattr(ledger, key)) for key in LEDGER_TOTALS},
            "per_client": {str(c): dict(v) for c, v in ledger.per_client.items()},
        },
        "uploads": int(server.uploads),
        "rejected": list(server.rejected),
        "norms": None if server.norms is None else server.norms.state_dict(),
        "holding": {str(c): v for c, v in server.holding.items()},
        "bases": list(server.bases),
        "staleness_seen": list(server.staleness_seen),
        "quality": {str(c): q for c, q in server.quality.items()},  # data.quality counts the clients reported
    }


def load(server, meta: dict, tensors: Mapping[str, torch.Tensor], orders: dict) -> None:
    server.global_state = get_group(tensors, orders, "global")
    server.version = int(meta["version"])
    server.ema.version = int(meta["ema_version"])
    server.ema.state = get_group(tensors, orders, "ema") if "ema" in orders else None
    _load_fold(server.algorithm.fold, meta["fold"], tensors, orders)
    if (meta["accountant"] is None) != (server.privacy is None):
        raise FedfmError("checkpoint and config disagree on privacy.client_dp")
    if server.privacy is not None:
        server.privacy.accountant.load_state_dict(meta["accountant"])
    ledger = server.ledger
    for key in LEDGER_TOTALS:
        setattr(ledger, key, {k: int(v) for k, v in meta["ledger"][key].items()})
    ledger.per_client.clear()
    for c, v in meta["ledger"]["per_client"].items():
        ledger.per_client[int(c)] = {k: int(n) for k, n in v.items()}
    server.uploads = int(meta["uploads"])
    server.rejected = list(meta["rejected"])
    if server.norms is not None:  # a checkpoint from before update validation kept no norms
        server.norms.load_state_dict(meta.get("norms") or [])
    server.holding = {int(c): int(v) for c, v in meta["holding"].items()}
    server.bases = {int(v): get_group(tensors, orders, f"server/base/{v}") for v in meta["bases"]}
    server.staleness_seen = [int(t) for t in meta["staleness_seen"]]
    server.quality = {int(c): q for c, q in (meta.get("quality") or {}).items()}


def _fold_state(fold, tensors: dict, orders: dict) -> dict:
    """The fold's own cross-round state (:meth:`ServerFold.state_dict`), then that of the fold it wraps."""
    meta: dict = {"fold": type(fold).__name__, "state": fold.state_dict(tensors, orders)}
    if fold.inner is not None:
        meta["inner"] = _fold_state(fold.inner, tensors, orders)
    return meta


def _load_fold(fold, meta: dict, tensors, orders) -> None:
    if meta["fold"] != type(fold).__name__:
        raise FedfmError(f"checkpoint was written by a {meta['fold']} fold, this run builds a {type(fold).__name__}")
    try:
        fold.load_state_dict(meta["state"], tensors, orders)
    except (KeyError, ValueError) as err:
        raise FedfmError(f"checkpoint does not fit this run's {type(fold).__name__}: {err}") from None
    if "inner" in meta:
        _load_fold(fold.inner, meta["inner"], tensors, orders)
