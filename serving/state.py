"""Recurrent state of every live series of one model version, in preallocated rows.

One array per state tensor, shaped like the graph's state input [L, capacity, H] float32, so a
batch's state is one fancy-index gather `h[:, rows, :]` -> [L, B, H] and its update one scatter.
Capacity starts at `initial_capacity` rows and doubles up to `max_capacity`; freed rows go on a
free list and are zeroed when handed out again (zero state = start of series, CONTRACT §4).

Per row we also keep steps_seen, the last timestamp (for the "timestamps increase" check), the
last time it was stepped (for idle expiry), an epoch that changes on every allocation, and the
row's owner (who to tell when it expires).

Threading: rows are allocated, freed and grown on the event-loop thread; the ORT executor
thread gathers and scatters. `lock` guards the state arrays, whose identity changes on growth.
A scatter writes only rows whose epoch is unchanged since the gather, so a series freed while its
step was in flight never has that result written into the row's next owner.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from serving.errors import CapacityExceeded


class StateArena:
    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_tensors: int,
        initial_capacity: int = 1024,
        max_capacity: int = 1_000_000,
    ) -> None:
        if num_tensors not in (1, 2):
            raise ValueError(f"num_tensors must be 1 (GRU: h) or 2 (LSTM: h, c), got {num_tensors}")
        if initial_capacity < 1:
            raise ValueError("initial_capacity must be >= 1")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.max_capacity = max_capacity
        self.lock = threading.Lock()
        cap = min(initial_capacity, max_capacity)
        self.states: list[np.ndarray] = [
            np.zeros((num_layers, cap, hidden_size), np.float32) for _ in range(num_tensors)
        ]
        self.steps_seen = np.zeros(cap, np.int64)
        self.last_ts = np.zeros(cap, np.int64)  # Unix ms of the last observation applied
        self.last_used = np.zeros(cap, np.float64)  # monotonic seconds of the last step
        self.epoch = np.zeros(cap, np.int64)
        self.live = np.zeros(cap, bool)
        self.owners: list[Any] = [None] * cap
        self._free: list[int] = list(range(cap - 1, -1, -1))  # a stack: low rows first
        self._next_epoch = 1

    @property
    def capacity(self) -> int:
        return self.steps_seen.shape[0]

    @property
    def live_count(self) -> int:
        return self.capacity - len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors and per-row bookkeeping arrays (allocated, not live)."""
        arrays = [*self.states, self.steps_seen, self.last_ts, self.last_used, self.epoch, self.live]
        return sum(a.nbytes for a in arrays)

    def alloc(self, owners: Sequence[Any], now: float) -> np.ndarray:
        """Rows for len(owners) new series, zeroed; raises CapacityExceeded past max_capacity."""
        n = len(owners)
        if n > len(self._free):
            self._grow(self.capacity - len(self._free) + n)
        rows = np.array(self._free[-n:][::-1], np.int64) if n else np.zeros(0, np.int64)
        del self._free[len(self._free) - n :]
        epochs = np.arange(self._next_epoch, self._next_epoch + n, dtype=np.int64)
        self._next_epoch += n
        with self.lock:
            for s in self.states:
                s[:, rows, :] = 0.0
            self.epoch[rows] = epochs
        self.steps_seen[rows] = 0
        self.last_ts[rows] = np.iinfo(np.int64).min
        self.last_used[rows] = now
        self.live[rows] = True
        for row, owner in zip(rows.tolist(), owners):
            self.owners[row] = owner
        return rows

    def free(self, rows: np.ndarray) -> None:
        """Give rows back. Their epoch changes so an in-flight scatter into them is dropped."""
        rows = np.unique(rows[self.live[rows]])  # freeing twice must not put a row on the list twice
        if len(rows) == 0:
            return
        with self.lock:
            self.epoch[rows] = 0
        self.live[rows] = False
        for row in rows.tolist():
            self.owners[row] = None
            self._free.append(row)

    def gather(self, rows: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Copies of the rows' states, each [L, B, H], and their epochs [B]."""
        with self.lock:
            return [s[:, rows, :] for s in self.states], self.epoch[rows]

    def scatter(self, rows: np.ndarray, epochs: np.ndarray, states: Sequence[np.ndarray]) -> None:
        """Write new states [L, B, H] into rows still owned by the series that was gathered."""
        with self.lock:
            keep = self.epoch[rows] == epochs
            if not keep.all():
                rows = rows[keep]
                states = [s[:, keep, :] for s in states]
            for dst, src in zip(self.states, states):
                dst[:, rows, :] = src

    def record_steps(self, rows: np.ndarray, timestamps_ms: np.ndarray, now: float) -> np.ndarray:
        """Advance the rows' bookkeeping after a step; returns steps_seen [B] after it."""
        self.steps_seen[rows] += 1
        self.last_ts[rows] = timestamps_ms
        self.last_used[rows] = now
        return self.steps_seen[rows]

    def idle_rows(self, now: float, idle_timeout_s: float) -> np.ndarray:
        """Live rows not stepped for idle_timeout_s seconds."""
        return np.flatnonzero(self.live & (self.last_used < now - idle_timeout_s))

    def _grow(self, needed: int) -> None:
        if needed > self.max_capacity:
            raise CapacityExceeded(
                f"state store full: {needed} rows needed, at most {self.max_capacity} per model version"
            )
        old = self.capacity
        new = old
        while new < needed:
            new *= 2
        new = min(new, self.max_capacity)

        def grown(a: np.ndarray, axis: int = 0) -> np.ndarray:
            shape = list(a.shape)
            shape[axis] = new - old
            return np.concatenate([a, np.zeros(shape, a.dtype)], axis=axis)

        with self.lock:
            self.states = [grown(s, axis=1) for s in self.states]
            self.epoch = grown(self.epoch)
        self.steps_seen = grown(self.steps_seen)
        self.last_ts = grown(self.last_ts)
        self.last_used = grown(self.last_used)
        self.live = grown(self.live)
        self.owners.extend([None] * (new - old))
        self._free[:0] = range(new - 1, old - 1, -1)  # new rows under the existing free ones
