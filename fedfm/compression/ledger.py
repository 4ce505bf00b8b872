"""The byte ledger: every payload that crosses the client/server boundary, counted.

Counts are the lengths of the encoded payloads (safetensors bytes), per
round, per client and cumulative, in each direction. With codecs
(fedfm.compression) the ledger also keeps the *raw* counts -- the lengths
the same payloads have uncoded -- and reports them as ``*_raw`` keys.
"""

from __future__ import annotations

from collections import defaultdict


class ByteLedger:
    def __init__(self, report_raw: bool = False) -> None:
        self.total = {"down": 0, "up": 0}
        self.round = {"down": 0, "up": 0}
        self.raw_total = {"down": 0, "up": 0}  # uncoded lengths (== total without codecs)
        self.raw_round = {"down": 0, "up": 0}
        self.report_raw = report_raw  # snapshot() adds the raw keys (set when codecs are on)
        self.per_client: dict[int, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})

    def start_round(self) -> None:
        self.round = {"down": 0, "up": 0}
        self.raw_round = {"down": 0, "up": 0}

    def record(self, client_id: int, direction: str, nbytes: int, raw: int | None = None) -> None:
        """Count ``nbytes`` sent; ``raw``: the payload's uncoded length (default ``nbytes``)."""
        if direction not in self.total:
            raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
        self.total[direction] += nbytes
        self.round[direction] += nbytes
        self.raw_total[direction] += nbytes if raw is None else raw
        self.raw_round[direction] += nbytes if raw is None else raw
        self.per_client[client_id][direction] += nbytes

    def snapshot(self) -> dict[str, int]:
        snap = {
            "bytes_down": self.round["down"],
            "bytes_up": self.round["up"],
            "bytes_down_total": self.total["down"],
            "bytes_up_total": self.total["up"],
        }
        if self.report_raw:
            snap.update({
                "bytes_down_raw": self.raw_round["down"],
                "bytes_up_raw": self.raw_round["up"],
                "bytes_down_raw_total": self.raw_total["down"],
                "bytes_up_raw_total": self.raw_total["up"],
            })
        return snap
