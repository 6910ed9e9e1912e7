"""A dict-like cache bounded by the bytes its entries hold, for caches keyed by client data.

Caches keyed by series ids or timestamps grow with whatever clients send, and outlive the
streams that filled them; a bound on the entry count alone lets long keys pin arbitrary memory.
`ByteBoundedCache` charges each entry its keys' and values' object sizes plus a dict slot, and
keeps two generations: lookups go to `recent`; once `recent` has been charged half the budget it
becomes `older` (the previous `older` is dropped at once) and a new `recent` starts, and a hit in
`older` moves the entry back to `recent`. So an entry used again within the last half-budget of
insertions survives (an approximate LRU), the whole holds at most about `budget_bytes`, and a
hit costs the hot path one dict lookup, with no bookkeeping.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Per entry, beyond the key and value objects: a dict's entry (hash, key, value: 24 bytes) and
# index slot, with the table up to a third empty and doubled on growth.
ENTRY_OVERHEAD_BYTES = 64


def entry_bytes(key: object, value: object) -> int:
    return sys.getsizeof(key) + sys.getsizeof(value) + ENTRY_OVERHEAD_BYTES


class ByteBoundedCache(Generic[K, V]):
    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 2 * 1024:
            raise ValueError("budget_bytes must be >= 2048")
        self.budget_bytes = budget_bytes
        self.recent: dict[K, V] = {}  # read this directly on hot paths; call get_or_make on a miss
        self._older: dict[K, V] = {}
        self._recent_bytes = 0
        self._older_bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes charged to the entries held now (both generations)."""
        return self._recent_bytes + self._older_bytes

    def __len__(self) -> int:
        return len(self.recent) + len(self._older)

    def get_or_make(self, key: K, make: Callable[[K], V]) -> V:
        """The cached value for key, or make(key), cached. May start a new generation, so
        a caller holding `recent` must read it again afterwards."""
        value = self.recent.get(key)
        if value is not None:
            return value
        value = self._older.pop(key, None)
        if value is None:
            value = make(key)
        else:
            self._older_bytes -= entry_bytes(key, value)
        self._put(key, value)
        return value

    def _put(self, key: K, value: V) -> None:
        size = entry_bytes(key, value)
        if self._recent_bytes + size > self.budget_bytes // 2 and self.recent:
            self._older, self._older_bytes = self.recent, self._recent_bytes
            self.recent, self._recent_bytes = {}, 0
        self.recent[key] = value
        self._recent_bytes += size

    def clear(self) -> None:
        self.recent, self._older = {}, {}
        self._recent_bytes = self._older_bytes = 0
