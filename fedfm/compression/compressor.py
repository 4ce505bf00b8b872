"""The run's codecs: what the simulation calls to put updates and broadcasts on the wire.

Uploads go through ``compression.upload`` (with optional error feedback on
the client), broadcasts through ``compression.download`` (fp16 / bf16 only:
every client must start from the same state). Stochastic rounding draws from
a generator seeded by (run seed, round, client), so a run is reproducible.
Each ``encode_*`` returns ``(coded payload, raw payload length)``: the raw
length is that of the uncoded wire payload (:mod:`fedfm.runtime.wire`), so
the byte ledger can count both exactly.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fedfm.algorithms.base import Broadcast, Update
from fedfm.compression.chain import CodecChain, build_codec
from fedfm.compression.feedback import keep_residual, with_residual
from fedfm.compression.payload import codes, pack, unpack
from fedfm.runtime.client import derive_seed
from fedfm.runtime.wire import encode_broadcast, encode_update

SALT = 0xC0DEC


class Compressor:
    """Encodes/decodes updates and broadcasts with the configured codec chains."""

    def __init__(self, cfg, seed: int) -> None:
        """``cfg``: :class:`fedfm.config.schema.CompressionConfig`."""
        self.cfg, self.seed = cfg, seed
        def make(names):
            return CodecChain([build_codec(n, cfg.topk_fraction, cfg.chunk_size) for n in names])

        self.up, self.down = make(cfg.upload), make(cfg.download)
        self.error_feedback = cfg.error_feedback

    @property
    def codes_upload(self) -> bool:
        return bool(self.up.codecs)

    def generator(self, round_idx: int, client_id: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, round_idx, client_id, SALT))

    # -- uploads (client side, then server side) ------------------------------------
    def encode_update(self, u: Update, client_state: dict, round_idx: int) -> tuple[bytes, int]:
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
        fields = {
            "client_id": int(u.client_id),
            "num_examples": int(u.num_examples),
            "metrics": {k: float(v) for k, v in u.metrics.items()},
            "base_version": int(u.base_version),
        }
        payload = pack("update", self.up, u.delta, coded, u.extras, fields)
        return payload, len(encode_update(u))

    def decode_update(self, payload: bytes, template=None) -> Update:
        """The dense update; raises CodecError (a ValueError) for a malformed payload.

        ``template``: the global state, whose shapes bound what a payload may ask to decode.
        """
        delta, extras, meta = unpack(payload, "update", self.up.names, template)
        try:
            return Update(
                client_id=int(meta["client_id"]),
                delta=delta,
                num_examples=int(meta["num_examples"]),
                metrics={k: float(v) for k, v in dict(meta.get("metrics", {})).items()},
                extras=extras,
                base_version=int(meta.get("base_version", 0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            from fedfm.compression.codecs import CodecError

            raise CodecError(f"malformed update metadata: {err}") from None

    # -- broadcasts (server side, then client side) ------------------------------------
    def encode_broadcast(self, b: Broadcast) -> tuple[bytes, int]:
        coded = {n: self.down.encode(t, None) for n, t in b.state.items() if codes(t, self.down)}
        payload = pack("broadcast", self.down, b.state, coded, b.extras, {"version": int(b.version)})
        return payload, len(encode_broadcast(b))

    def decode_broadcast(self, payload: bytes) -> Broadcast:
        state, extras, meta = unpack(payload, "broadcast", self.down.names)
        return Broadcast(state=OrderedDict(state), version=int(meta.get("version", 0)), extras=extras)
