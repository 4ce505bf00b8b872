"""What one Flower message between the fedfm server and a node carries.

A message's content is a Flower ``RecordDict`` with two records:

* ``"fedfm"`` (ConfigRecord): ``{"header": <JSON text>}`` — the round, the
  client id the server gave the node, a reply's training facts, an error;
* ``"payload"`` (ArrayRecord, only when there is one): fedfm's own encoded
  message (:mod:`fedfm.compression.wire`, safetensors bytes with the codecs
  applied) as one flat ``uint8`` array, so Flower chunks it like any array
  (no message-size limit) and the bytes that cross the network are exactly the
  bytes the server's ledger counts;
* ``"extra"`` (the same, optional): a second message that travels with it
  (the secure-aggregation shares a client needs to mask its update).

Nothing here trusts its input: a malformed record is a :class:`MessageError`
(one line), never an exception from deep inside numpy or json. Light on
purpose (numpy and flwr only): the ClientApp imports it once per message.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

HEADER, PAYLOAD, EXTRA = "fedfm", "payload", "extra"
MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes; refuse anything absurd


class MessageError(ValueError):
    """A Flower message that is not a well-formed fedfm message."""


def pack(header: dict, payload: bytes | None = None, extra: bytes | None = None) -> RecordDict:
    """``header`` (JSON-able) and optional payloads as a message's content."""
    records = {HEADER: ConfigRecord({"header": json.dumps(header)})}
    for name, data in ((PAYLOAD, payload), (EXTRA, extra)):
        if data is not None:
            records[name] = ArrayRecord({"bytes": Array(np.frombuffer(data, dtype=np.uint8).copy())})
    return RecordDict(records)


def unpack(content: RecordDict) -> tuple[dict, bytes | None]:
    """``(header, payload or None)`` of a message's content; :class:`MessageError` when malformed."""
    try:
        text = content.config_records[HEADER]["header"]
    except (KeyError, TypeError) as err:
        raise MessageError(f"no fedfm header in the message ({type(err).__name__}: {err})") from None
    if not isinstance(text, str) or len(text) > MAX_HEADER_BYTES:
        raise MessageError("the fedfm header is not a JSON text of reasonable size")
    try:
        header = json.loads(text)
    except ValueError as err:
        raise MessageError(f"the fedfm header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise MessageError("the fedfm header is not a JSON object")
    return header, _bytes(content, PAYLOAD)


def unpack_extra(content: RecordDict) -> bytes | None:
    """The second payload of a message's content, or None."""
    return _bytes(content, EXTRA)


def _bytes(content: RecordDict, name: str) -> bytes | None:
    if name not in content.array_records:
        return None
    record = content.array_records[name]
    if list(record.keys()) != ["bytes"]:
        raise MessageError(f"the {name} record holds {list(record.keys())}, expected one 'bytes' array")
    array = record["bytes"]
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise MessageError(f"the {name} is a {array.dtype} array of shape {array.shape}, expected flat uint8")
    return array.numpy().tobytes()


def header_int(header: dict, key: str) -> int:
    """``header[key]`` when it is a non-negative integer; a one-line :class:`MessageError` otherwise."""
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MessageError(f"request field {key!r} must be a non-negative integer, got {value!r}")
    return value


def payload_size(message) -> int:
    """Bytes of fedfm payload in a Flower message (0 without one, e.g. Flower's error reply for a dead node)."""
    if not message.has_content():
        return 0
    records = message.content.array_records
    return sum(int(np.prod(records[n]["bytes"].shape)) for n in (PAYLOAD, EXTRA) if n in records)
