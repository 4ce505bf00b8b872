"""Update codecs and their byte accounting (fp16/bf16, stochastic int8/int4, top-k + error feedback).

Set per run with the ``compression`` config section; see
:mod:`fedfm.compression.compressor` for how the simulation uses it.
"""

from fedfm.compression.chain import CodecChain, build_codec, chain_problem, sound_download, value_codecs
from fedfm.compression.codecs import Cast, CodecError, StochasticQuant, TopK
from fedfm.compression.compressor import Compressor
from fedfm.compression.feedback import RESIDUAL_KEY
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
    if cfg.continual.enabled:
        raise FedfmError("compression cannot be combined with continual learning (continual.enabled) yet")


def make_compressor(cfg) -> "Compressor | None":
    """The run's Compressor, or None when no codec is configured (the plain wire)."""
    c = cfg.compression
    return Compressor(c, cfg.seed) if (c.upload or c.download) else None


__all__ = [
    "CODECS", "Cast", "CodecChain", "CodecError", "Compressor", "RESIDUAL_KEY",
    "StochasticQuant", "TopK", "build_codec", "chain_problem", "check_compression", "make_compressor",
    "sound_download", "value_codecs",
]
