"""Recurrent state of every live series of one model version, in preallocated rows.

One array per state tensor of the graph (serving.contract.StateTensor: h and c [L, B, H], a lag
buffer [B, S], whatever the metadata lists), shaped like the graph's state input with `capacity`
rows on its batch axis, so a batch's state is one gather along that axis (-> the graph's input
shape for B series) and its update one scatter. Nothing here knows what a tensor means.
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

from serving.contract import StateTensor
from serving.errors import CapacityExceeded


def _at(axis: int, rows: np.ndarray) -> tuple:
    """Index of `rows` along `axis`: a[_at(1, rows)] is a[:, rows]."""
    return (slice(None),) * axis + (rows,)


class StateArena:
    def __init__(
        self,
        tensors: Sequence[StateTensor],
        initial_capacity: int = 1024,
        max_capacity: int = 1_000_000,
    ) -> None:
        if not tensors:
            raise ValueError("a state arena needs at least one state tensor")
        if initial_capacity < 1:
            raise ValueError("initial_capacity must be >= 1")
        self.tensors = tuple(tensors)
        self._axes = [t.batch_axis for t in self.tensors]
        self.max_capacity = max_capacity
        self.lock = threading.Lock()
        cap = min(initial_capacity, max_capacity)
        self.states: list[np.ndarray] = [np.zeros(t.shape_for(cap), t.dtype) for t in self.tensors]
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
    def bytes_per_series(self) -> int:
        """State plus bookkeeping per row: what each live (or preallocated) series costs here."""
        return sum(t.bytes_per_series() for t in self.tensors) + 8 + 8 + 8 + 8 + 1 + 8  # + row arrays, owner ref

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
            for s, axis in zip(self.states, self._axes):
                s[_at(axis, rows)] = 0
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
        """Copies of the rows' states, each in its graph input shape for B = len(rows) (contiguous,
        ready for ORT), and their epochs [B]."""
        with self.lock:
            return [np.take(s, rows, axis=axis) for s, axis in zip(self.states, self._axes)], self.epoch[rows]

    def scatter(self, rows: np.ndarray, epochs: np.ndarray, states: Sequence[np.ndarray]) -> None:
        """Write new states (graph output shapes for B = len(rows)) into rows still owned by the
        series that was gathered."""
        with self.lock:
            keep = self.epoch[rows] == epochs
            if not keep.all():
                rows = rows[keep]
                states = [np.compress(keep, s, axis=axis) for s, axis in zip(states, self._axes)]
            for dst, src, axis in zip(self.states, states, self._axes):
                dst[_at(axis, rows)] = src

    def read(self, rows: np.ndarray, epochs: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Copies of the rows' states (graph shapes for B = len(rows)) and keep [B]: whether each row
        still holds the epoch it was asked for (False: freed or handed on; its values are not its)."""
        with self.lock:
            states = [np.take(s, rows, axis=axis) for s, axis in zip(self.states, self._axes)]
            return states, self.epoch[rows] == epochs

    def restore(self, row: int, tensors: Sequence[np.ndarray], steps_seen: int, last_ts: int) -> None:
        """Put a snapshot's state (each tensor shaped for one series) into a freshly allocated row,
        before its first step gathers it."""
        with self.lock:
            for dst, src, axis in zip(self.states, tensors, self._axes):
                dst[_at(axis, np.array([row]))] = src
        self.steps_seen[row] = steps_seen
        self.last_ts[row] = last_ts

    def record_steps(self, rows: np.ndarray, epochs: np.ndarray, timestamps_ms: np.ndarray, now: float) -> np.ndarray:
        """Advance the bookkeeping of the rows still owned by the series that stepped (epoch
        unchanged, as in `scatter`: a row freed, or freed and handed to a new series, while the step
        ran is left alone); returns steps_seen [B] after it (0 for the rows left alone)."""
        keep = self.epoch[rows] == epochs
        if keep.all():
            self.steps_seen[rows] += 1
            self.last_ts[rows] = timestamps_ms
            self.last_used[rows] = now
            return self.steps_seen[rows]
        live = rows[keep]
        self.steps_seen[live] += 1
        self.last_ts[live] = timestamps_ms[keep]
        self.last_used[live] = now
        return np.where(keep, self.steps_seen[rows], 0)

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
            self.states = [grown(s, axis) for s, axis in zip(self.states, self._axes)]
            self.epoch = grown(self.epoch)
        self.steps_seen = grown(self.steps_seen)
        self.last_ts = grown(self.last_ts)
        self.last_used = grown(self.last_used)
        self.live = grown(self.live)
        self.owners.extend([None] * (new - old))
        self._free[:0] = range(new - 1, old - 1, -1)  # new rows under the existing free ones
