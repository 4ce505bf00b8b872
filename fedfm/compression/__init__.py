"""Update codecs and their byte accounting (fp16/bf16, stochastic int8/int4, top-k + error feedback).

Set per run with the ``compression`` config section; :mod:`fedfm.compression.wire`
is the one wire format every message uses, with or without codecs.
"""

from fedfm.compression.chain import CodecChain, build_codec, chain_problem, sound_download, value_codecs
from fedfm.compression.codecs import Cast, CodecError, StochasticQuant, TopK
from fedfm.compression.feedback import RESIDUAL_KEY
from fedfm.compression.wire import Wire, WireError
from fedfm.errors import FedfmError
from fedfm.registry import CODECS


def check_compression(cfg) -> None:
    """One-line errors for combinations codecs cannot serve (``cfg`` is a RunConfig)."""
    c = getattr(cfg, "compression", None)
    if c is None or not (c.upload or c.download):
        return
    if c.upload and cfg.privacy.secure_aggregation.enabled:
        raise FedfmError("compression.upload cannot be combined with secure aggregation, "
                         "which quantizes and masks the uploads itself (leave compression.upload empty)")


__all__ = [
    "CODECS", "Cast", "CodecChain", "CodecError", "RESIDUAL_KEY", "StochasticQuant", "TopK", "Wire", "WireError",
    "build_codec", "chain_problem", "check_compression", "sound_download", "value_codecs",
]
