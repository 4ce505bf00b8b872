"""The byte ledger: every payload that crosses the client/server boundary, counted.

Counts are the lengths of the encoded payloads (safetensors bytes), per
round, per client and cumulative, in each direction.
"""

from __future__ import annotations

from collections import defaultdict


class ByteLedger:
    def __init__(self) -> None:
        self.total = {"down": 0, "up": 0}
        self.round = {"down": 0, "up": 0}
        self.per_client: dict[int, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})

    def start_round(self) -> None:
        self.round = {"down": 0, "up": 0}

    def record(self, client_id: int, direction: str, nbytes: int) -> None:
        if direction not in self.total:
            raise ValueError(f"direction must be 'down' or 'up', not {direction!r}")
        self.total[direction] += nbytes
        self.round[direction] += nbytes
        self.per_client[client_id][direction] += nbytes

    def snapshot(self) -> dict[str, int]:
        return {
            "bytes_down": self.round["down"],
            "bytes_up": self.round["up"],
            "bytes_down_total": self.total["down"],
            "bytes_up_total": self.total["up"],
        }
