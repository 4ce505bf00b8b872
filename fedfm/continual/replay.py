"""A bounded local replay buffer: reservoir sampling (Vitter 1985, "Random Sampling with a Reservoir", Algorithm R).

Each client keeps at most ``capacity`` of the examples it has seen; after
``n`` examples were offered, each of them is in the buffer with probability
``min(1, capacity / n)``, whatever the order they came in. The buffer holds
row indices into the client's own (already tokenized) data and lives in the
client's private state, so it never leaves the client. As in experience
replay for continual learning (Chaudhry et al. 2019, "On Tiny Episodic
Memories in Continual Learning"), a client trains on its new examples plus
its buffer.
"""

from __future__ import annotations

import numpy as np


class ReservoirBuffer:
    """At most ``capacity`` items, a uniform sample of everything offered so far."""

    def __init__(self, capacity: int, seed: int) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.seen = 0  # items offered so far
        self._items = np.zeros(0, dtype=np.int64)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> np.ndarray:
        """A copy of the buffered items (row indices), in slot order."""
        return self._items.copy()

    def offer(self, items: np.ndarray) -> None:
        """Offer items one at a time: the ``n``-th replaces a random slot with probability ``capacity / n``."""
        buf = list(self._items)
        for x in np.asarray(items, dtype=np.int64):
            self.seen += 1
            if len(buf) < self.capacity:
                buf.append(int(x))
            else:
                slot = int(self._rng.integers(self.seen))  # uniform in [0, seen)
                if slot < self.capacity:
                    buf[slot] = int(x)
        self._items = np.asarray(buf, dtype=np.int64)

    def state_dict(self) -> dict:
        """JSON: the items, the count offered and the random stream (for checkpoints)."""
        return {"items": self._items.tolist(), "seen": self.seen, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._items = np.asarray(state["items"], dtype=np.int64)
        self.seen = int(state["seen"])
        self._rng.bit_generator.state = state["rng"]

    def training_rows(self, new_rows: np.ndarray) -> np.ndarray:
        """What the client trains on in a stage: its new rows plus the buffer (each row once, sorted)."""
        return np.union1d(np.asarray(new_rows, dtype=np.int64), self._items)


def client_buffer(replay, seed: int, cid: int) -> ReservoirBuffer | None:
    """Client ``cid``'s buffer for ``continual.replay`` (None when off), seeded alike in a simulation and on a node."""
    from fedfm.seeds import derive_seed

    return ReservoirBuffer(replay.capacity, seed=derive_seed(seed, cid, 0x4E9)) if replay.enabled else None


def reveal(new_rows: np.ndarray, buffer: ReservoirBuffer | None) -> np.ndarray:
    """A new stage for one client: what it trains on (its new rows plus its buffer); then the new rows are offered."""
    if buffer is None:
        return new_rows
    rows = buffer.training_rows(new_rows)
    buffer.offer(new_rows)
    return rows
