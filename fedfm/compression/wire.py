"""The one wire format: broadcasts and updates as safetensors bytes, never pickle.

Every message between the server and a client is one safetensors blob:

* an uncoded tensor travels as ``<main>/<name>`` (``main`` is ``state`` in a
  broadcast, ``delta`` in an update); algorithm extras (SCAFFOLD's control
  variates, ...) always travel uncoded as ``extras/<extra>/<name>``;
* the ``j``-th tensor, when the codec chain (:mod:`fedfm.compression.chain`)
  codes it, travels as its parts ``c<j>/<part>`` (short keys: on small
  adapters the header is a real share of the bytes);
* the metadata (``__metadata__["fedfm"]``, JSON) holds the message kind, its
  scalar fields (version; client id, example count, metrics, base version),
  ``order`` (every tensor's key in its original order) and, only when a chain
  codes something, ``chain`` and per coded tensor (by position) its shape,
  dtype and codec metadata.

A message without codecs is therefore exactly the plain format. Decoding
checks everything a sender could get wrong or forge (kind, chain, every
listed tensor present and no stray one, a coded tensor's declared shape
against the receiver's template *before* decoding it) and raises
:class:`WireError` with a one-line reason.

:class:`Wire` is a run's pair of codec chains (upload, download) with
error feedback on the client side (:mod:`fedfm.compression.feedback`);
stochastic rounding draws from ``(run seed, round, client)``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedfm.algorithms.base import Broadcast, Update
from fedfm.compression.chain import CodecChain, build_codec, chain_problem
from fedfm.compression.codecs import CodecError
from fedfm.compression.feedback import keep_residual, with_residual
from fedfm.seeds import derive_seed

WireError = CodecError  # a message that cannot be decoded (truncated, forged, wrong chain ...)
SALT = 0xC0DEC
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
NO_CHAIN = CodecChain([])


def codes(t: torch.Tensor, chain: CodecChain) -> bool:
    """Whether ``chain`` codes ``t`` (floating tensors, non-empty chain)."""
    return bool(chain.codecs) and t.is_floating_point() and str(t.dtype).removeprefix("torch.") in DTYPES


# -- packing ----------------------------------------------------------------------
def pack(main: str, tensors: Mapping[str, torch.Tensor], extras: Mapping[str, Mapping[str, torch.Tensor]],
         fields: dict, chain: CodecChain = NO_CHAIN, coded: Mapping[str, tuple[dict, list]] | None = None) -> bytes:
    """One message; ``coded[name] = (parts, metas)`` for each tensor of ``tensors`` the chain coded."""
    coded = coded or {}
    # Bytes are written from CPU memory: a tensor on a GPU is copied to the host here.
    flat: OrderedDict[str, torch.Tensor] = OrderedDict()
    order, described = [], {}
    for j, (name, t) in enumerate(tensors.items()):
        order.append(f"{main}/{name}")
        if name in coded:
            parts, metas = coded[name]
            described[str(j)] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "codec": metas}
            for part, v in parts.items():
                flat[f"c{j}/{part}"] = v.cpu().contiguous()
        else:
            flat[f"{main}/{name}"] = t.detach().cpu().contiguous()
    for ename, group in extras.items():
        for k, v in group.items():
            flat[f"extras/{ename}/{k}"] = v.detach().cpu().contiguous()
            order.append(f"extras/{ename}/{k}")
    meta = {**fields, "order": order}
    if described:
        meta.update(chain=chain.names, coded=described)
    return st_save(flat, metadata={"fedfm": json.dumps(meta)})


def unpack(payload: bytes, kind: str, main: str, chain_names=(), template: Mapping[str, torch.Tensor] | None = None):
    """``(tensors, extras, metadata)`` of a message of ``kind``; raises WireError.

    ``chain_names``: the receiver's configured chain (a payload coded otherwise is refused);
    ``template``: the receiver's state, whose shapes bound what a coded tensor may decode to.
    """
    try:
        flat = st_load(payload)
        header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
        meta = json.loads(header.get("__metadata__", {}).get("fedfm", "{}"))
    except Exception as err:  # noqa: BLE001 - any decoding failure is a malformed payload
        raise WireError(f"malformed payload: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise WireError(f"payload is not a{'n' if kind[0] in 'aeiou' else ''} {kind}")
    coded = meta.get("coded") or {}
    chain = None
    if coded:
        if meta.get("chain") != list(chain_names):
            raise WireError(f"payload codec chain {meta.get('chain')!r} is not the configured {list(chain_names)!r}")
        problem = chain_problem(list(chain_names))
        if problem:
            raise WireError(f"bad codec chain: {problem}")
        chain = CodecChain([build_codec(n) for n in chain_names])
    try:
        tensors, extras, used = _tensors(flat, meta["order"], main, coded, chain, template)
    except WireError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise WireError(f"malformed payload: {type(err).__name__}: {err}") from None
    stray = sorted(set(flat) - used)
    if stray:
        raise WireError(f"unexpected tensor {stray[0]!r} in payload")
    return tensors, extras, meta


def _tensors(flat, order, main: str, coded: dict, chain: CodecChain | None, template):
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    extras: dict[str, OrderedDict[str, torch.Tensor]] = {}
    used: set[str] = set()
    for j, key in enumerate(order):
        head, _, rest = key.partition("/")
        if head == main and str(j) in coded:
            entry = coded[str(j)]
            shape, dtype = entry["shape"], DTYPES.get(entry["dtype"])
            if template is not None and (rest not in template or list(template[rest].shape) != shape):
                raise WireError(f"{rest}: declared shape {shape} does not match the global state")
            if dtype is None:
                raise WireError(f"{rest}: cannot code dtype {entry['dtype']!r}")
            prefix = f"c{j}/"
            parts = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            used.update(prefix + k for k in parts)
            tensors[rest] = chain.decode(parts, entry["codec"], shape).to(dtype)
            continue
        if key not in flat:
            raise WireError(f"payload lists tensor {key!r} but does not hold it")
        used.add(key)
        if head == main:
            tensors[rest] = flat[key]
        elif head == "extras":
            name, _, k = rest.partition("/")
            extras.setdefault(name, OrderedDict())[k] = flat[key]
        else:
            raise WireError(f"unexpected tensor {key!r} in payload")
    return tensors, extras, used


# -- the messages ------------------------------------------------------------------
def encode_broadcast(b: Broadcast, chain: CodecChain = NO_CHAIN) -> bytes:
    """A broadcast; ``chain`` (deterministic download codecs only) codes the state's float tensors."""
    coded = {n: chain.encode(t, None) for n, t in b.state.items() if codes(t, chain)}
    return pack("state", b.state, b.extras, {"kind": "broadcast", "version": int(b.version)}, chain, coded)


def decode_broadcast(payload: bytes, chain_names=()) -> Broadcast:
    state, extras, meta = unpack(payload, "broadcast", "state", chain_names)
    try:
        return Broadcast(state=state, version=int(meta["version"]), extras=extras)
    except (KeyError, TypeError, ValueError) as err:
        raise WireError(f"malformed broadcast metadata: {err}") from None


def update_fields(u: Update) -> dict:
    return {
        "kind": "update",
        "client_id": int(u.client_id),
        "num_examples": int(u.num_examples),
        "metrics": {k: float(v) for k, v in u.metrics.items()},
        "base_version": int(u.base_version),
    }


def encode_update(u: Update, chain: CodecChain = NO_CHAIN, coded: Mapping[str, tuple[dict, list]] | None = None) -> bytes:
    """An update; ``coded`` holds the chain's parts of the delta tensors it coded (see :class:`Wire`)."""
    return pack("delta", u.delta, u.extras, update_fields(u), chain, coded)


def decode_update(payload: bytes, chain_names=(), template: Mapping[str, torch.Tensor] | None = None) -> Update:
    delta, extras, meta = unpack(payload, "update", "delta", chain_names, template)
    try:
        return Update(
            client_id=_integer(meta["client_id"], "client_id"),
            delta=delta,
            num_examples=_integer(meta["num_examples"], "num_examples"),
            metrics={k: float(v) for k, v in dict(meta.get("metrics", {})).items()},
            extras=extras,
            base_version=_integer(meta.get("base_version", 0), "base_version"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise WireError(f"malformed update metadata: {err}") from None


def _integer(value, name: str) -> int:
    """``value`` when it is a JSON integer; a client's 2.5, ``true`` or ``"7"`` is refused, not rounded."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


class Wire:
    """A run's codec chains on the wire: ``upload`` for updates, ``download`` for broadcasts.

    ``encode_update`` runs on the client (error feedback keeps its residual in
    the client's private state); ``decode_update`` on the server. With no
    codec configured every message is the plain format.
    """

    def __init__(self, cfg=None, seed: int = 0) -> None:
        """``cfg``: :class:`fedfm.config.schema.CompressionConfig` (None: no codecs)."""
        self.cfg, self.seed = cfg, seed

        def make(names):
            return CodecChain([build_codec(n, cfg.topk_fraction, cfg.chunk_size) for n in names])

        self.up = make(cfg.upload) if cfg is not None else NO_CHAIN
        self.down = make(cfg.download) if cfg is not None else NO_CHAIN
        self.error_feedback = bool(cfg is not None and cfg.error_feedback)
        for chain in (self.up, self.down):
            problem = chain_problem(chain.names)
            if problem:
                raise ValueError(f"bad codec chain: {problem}")

    @property
    def coded(self) -> bool:
        """Whether any codec is on (the ledger then also reports uncoded lengths)."""
        return bool(self.up.codecs or self.down.codecs)

    def generator(self, round_idx: int, client_id: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, round_idx, client_id, SALT))

    def encode_update(self, u: Update, client_state: dict, round_idx: int) -> bytes:
        if not self.up.codecs:
            return encode_update(u)
        gen = self.generator(round_idx, u.client_id)
        coded = {}
        for name, d in u.delta.items():
            if not codes(d, self.up):
                continue
            x = with_residual(name, d, client_state) if self.error_feedback else d
            parts, metas = self.up.encode(x, gen)
            coded[name] = (parts, metas)
            if self.error_feedback:
                decoded = self.up.decode(parts, metas, list(d.shape))
                keep_residual(name, x.reshape(d.shape).to(torch.float32), decoded, client_state)
        return encode_update(u, self.up, coded)

    def decode_update(self, payload: bytes, template: Mapping[str, torch.Tensor] | None = None) -> Update:
        """The dense update; ``template`` (the global state) bounds the shapes a payload may decode to."""
        return decode_update(payload, self.up.names, template)

    def encode_broadcast(self, b: Broadcast) -> bytes:
        return encode_broadcast(b, self.down)

    def decode_broadcast(self, payload: bytes) -> Broadcast:
        return decode_broadcast(payload, self.down.names)

    @staticmethod
    def raw_size(message: Broadcast | Update) -> int:
        """The length the message has uncoded (what the ledger's ``*_raw`` counts compare against)."""
        return len(encode_broadcast(message) if isinstance(message, Broadcast) else encode_update(message))
