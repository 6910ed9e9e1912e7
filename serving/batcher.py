"""Micro-batching: work submitted by many streams is processed together, in arrival order.

Each stream submits its request's steps for one model version as one item of some size (rows),
tagged with an owner (the stream). One dispatcher task per model version takes what is pending --
items in arrival order, up to `max_batch_size` rows (an item larger than that goes alone), and
never two items of one owner, so a stream's later request sees the state its earlier one wrote --
and hands the list to `process`, which returns one result or exception per item; each waiting
stream gets its own. A stream may therefore queue its next requests while one is being stepped:
the next batch is ready the moment the ORT call ends. Items whose future was cancelled (their
stream went away) are dropped unprocessed.

Batching is opportunistic: while a batch is processed, new items pile up and go together in the
next one, so batches grow with load without adding latency when idle. Before it takes a batch of
fewer than `turn_below_rows` rows, the dispatcher lets the event loop turn once more, so the
requests whose reads completed in the same turn join it (bench/stream.py's 64 one-observation
streams: 14 rows per ORT call on average without that turn, 24 with it, and 7% less server CPU
per message). Not for larger batches: their ORT call runs on a thread while the loop encodes
answers, and a turn would let that encoding run first and delay the call. `max_batch_delay_s` > 0
adds a wait for more rows when the dispatcher is idle (asyncio timers round sub-millisecond
waits up to ~1 ms on Linux).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

# process(items) -> one result (or exception instance) per item, in the same order
Process = Callable[[list[Any]], Awaitable[Sequence[Any]]]


class MicroBatcher:
    def __init__(
        self, process: Process, max_batch_size: int, max_batch_delay_s: float = 0.0, turn_below_rows: int = 0
    ) -> None:
        self._process = process
        self._max = max_batch_size
        self._delay = max_batch_delay_s
        self._turn_below = turn_below_rows
        self._pending: deque[tuple[Any, int, asyncio.Future, float, object]] = deque()
        self._pending_rows = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def enqueue(self, item: Any, size: int, owner: object = None) -> asyncio.Future:
        """Queue an item of `size` rows now; the future gets its result (or its exception).

        Items are processed in the order they were queued. Items of the same (non-None) owner
        never share a batch. Cancelling the future before its batch starts drops the item.
        """
        if self._closed:
            raise RuntimeError("batcher is closed")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._dispatch(), name="micro-batcher")
        future = loop.create_future()
        self._pending.append((item, size, future, time.monotonic(), owner))
        self._pending_rows += size
        self._wake.set()
        return future

    async def close(self) -> None:
        """Stop the dispatcher after the pending items are processed."""
        self._closed = True
        if self._task is not None:
            self._wake.set()
            await self._task

    def _take(self) -> list[tuple[Any, int, asyncio.Future, float, object]]:
        taken, rows, owners = [], 0, set()
        pending = self._pending
        while pending:
            _, size, future, _, owner = entry = pending[0]
            if future.done():  # cancelled: nobody waits for it
                pending.popleft()
                self._pending_rows -= size
                continue
            if taken and (rows + size > self._max or (owner is not None and owner in owners)):
                break
            pending.popleft()
            self._pending_rows -= size
            rows += size
            owners.add(owner)
            taken.append(entry)
        return taken

    async def _wait_for_more(self) -> None:
        remaining = self._pending[0][3] + self._delay - time.monotonic()
        while remaining > 0 and self._pending_rows < self._max:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return
            remaining = self._pending[0][3] + self._delay - time.monotonic()

    async def _dispatch(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._delay > 0 and self._pending_rows < self._max:
                await self._wait_for_more()
            elif self._pending_rows < self._turn_below:
                # One more turn of the event loop (see the module docstring): requests read in
                # this turn queue their steps first and join this batch.
                await asyncio.sleep(0)
            taken = self._take()
            if not taken:
                continue
            try:
                results = await self._process([entry[0] for entry in taken])
            except Exception as exc:  # a failed batch fails its items; the dispatcher carries on
                results = [exc] * len(taken)
            for (_, _, future, _, _), result in zip(taken, results):
                if future.done():  # a cancelled stream no longer waits
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
