"""The compression block of ``summary.json``: upload bytes and compression factors.

Factors compare the bytes actually uploaded (``bytes_up_total``, coded
payloads including their safetensors headers) with what uploading the same
number of updates would cost uncoded:

* ``factor_vs_full_model``: every parameter of the model in float32 per
  upload (``total_params x 4 x uploads``) -- the cost of plain federated
  full fine-tuning;
* ``factor_vs_trainable_state``: the trainable state that travels, in float32
  (``trainable_state_bytes x uploads``) -- what the codecs alone save;
* ``factor_vs_raw_payload``: the uncoded wire payloads of the same updates
  (``bytes_up_raw_total``, headers included).
"""

from __future__ import annotations


def compression_summary(cfg, server, total_params: int, trainable_state_bytes: int) -> dict:
    """The summary block (``cfg.compression`` describes the chains; ``server`` the run's Server)."""
    c = getattr(cfg, "compression", None)
    ledger = server.ledger
    uploads = int(server.uploads)
    coded = ledger.total["up"]
    full = 4 * total_params * uploads
    trainable = trainable_state_bytes * uploads
    ratio = lambda num, den: (num / den) if den else None  # noqa: E731
    return {
        "upload": list(c.upload) if c is not None else [],
        "download": list(c.download) if c is not None else [],
        "error_feedback": bool(c.error_feedback) if c is not None else False,
        "uploads": uploads,
        "bytes_up_total": coded,
        "bytes_up_raw_total": ledger.raw_total["up"],
        "bytes_down_total": ledger.total["down"],
        "bytes_down_raw_total": ledger.raw_total["down"],
        "full_model_bytes_per_upload": 4 * total_params,
        "trainable_state_bytes_per_upload": trainable_state_bytes,
        "factor_vs_full_model": ratio(full, coded),
        "factor_vs_trainable_state": ratio(trainable, coded),
        "factor_vs_raw_payload": ratio(ledger.raw_total["up"], coded),
    }
