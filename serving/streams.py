"""A stream's flow control, for any transport: its requests queued in order, answered in order.

A transport opens a `Stream` (serving.dataplane), hands it its request iterator and a function
that converts one transport request into a domain `Request`, and writes out the `Answer`s that
`Stream.answers` yields, one per request, in request order; then it closes the stream. What a
request asks for decides where it goes: steps of the stream's own series (its `StreamSession`),
steps of a server-wide sequence (the `SequenceTable`), or whole histories from zero state (the
stateless forecast). A request refused before anything of it was queued (a limit, an unknown
sequence, bad tensors) is answered with its error in its place; whether that ends the stream is
the transport's choice (forecast.v1 ends it; the Open Inference Protocol answers and goes on).

Flow control: a stream starts serial -- read a request, queue its steps, answer, read the next --
which costs the least per message for small requests. From its first request of
PIPELINE_MIN_OBSERVATIONS or more, a reader task reads ahead instead: the next request is parsed
and its steps queued while the current one runs in ORT and the previous answer is written out
(the tables keep each series' steps in order), at most PIPELINE_DEPTH requests ahead.

Draining (server shutdown, `StreamRegistry.drain`): a stream ends after answering the request it
is on, by raising `Draining` (UNAVAILABLE, from the one error map); a stream waiting for its
client's next request is woken and ends at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from serving.domain import Answer, ForecastGroup, History, Observations, Request, SequenceSteps
from serving.errors import Draining, StatePreconditionFailed

if TYPE_CHECKING:
    from serving.admission import Admission
    from serving.sequences import SequenceTable
    from serving.sessions import StreamSession

# From a stream's first request this large on, its next requests are read ahead.
PIPELINE_MIN_OBSERVATIONS = 32
PIPELINE_DEPTH = 2  # requests of one stream queued behind the one being answered

T = TypeVar("T")
# forecast(histories, model, version) -> groups covering every history once
Forecast = Callable[[Sequence[History], str, str], Awaitable[list[ForecastGroup]]]
_Item = tuple[asyncio.Future, float, int, Any]  # (answer future, arrival time, observations, tag)


class StreamRegistry:
    """The open streams: their count (--max-streams), and draining."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.open = 0
        self.draining = False
        self.idle: set[asyncio.Task] = set()  # tasks of streams waiting for their client's next request

    def opened(self) -> None:
        """Count one more stream, or LimitExceeded past --max-streams."""
        self._admission.check_streams(self.open)
        self.open += 1

    def closed(self) -> None:
        self.open -= 1

    def drain(self) -> None:
        """Server shutdown: streams end after the request they are answering, idle ones now."""
        self.draining = True
        for task in list(self.idle):
            task.cancel()


class Stream:
    def __init__(
        self, registry: StreamRegistry, series: StreamSession, sequences: SequenceTable, forecast: Forecast
    ) -> None:
        self._registry = registry
        self._series = series
        self._sequences = sequences
        self._forecast = forecast
        self._inflight: asyncio.Queue[_Item | None] | None = None  # set once the stream reads ahead
        self._reader: asyncio.Task | None = None
        self._closed = False

    def submit(self, request: Request) -> asyncio.Future:
        """Queue a request's work now; the future gets its forecast groups (or its error).
        Never raises: a request refused up front gets a failed future, answered in its place."""
        work, model, version = request.work, request.model, request.version
        try:
            if isinstance(work, Observations):
                return self._series.submit(work, model, version)
            if isinstance(work, SequenceSteps):
                return self._sequences.submit(work, model, version)
            if isinstance(work, Exception):
                raise work
            return asyncio.ensure_future(self._forecast(work, model, version))
        except Exception as exc:
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    def _item(self, parse: Callable[[T], Request], raw: T) -> _Item:
        started = time.perf_counter()
        try:
            request = parse(raw)
        except Exception as exc:  # a transport's conversion that raises: refused in its place
            request = Request(exc)
        work = request.work
        size = 0 if isinstance(work, Exception) else len(work)  # observations, steps or histories
        return self.submit(request), started, size, request.tag

    async def answers(self, requests: AsyncIterator[T], parse: Callable[[T], Request]) -> AsyncIterator[Answer]:
        """One answer per request, in order, until the client ends its side.

        Raises Draining when the server shuts down (after the answer in flight), and what
        reading the requests raised.
        """
        registry = self._registry
        incoming = aiter(requests)
        task = asyncio.current_task()
        while True:
            if registry.draining:
                raise Draining()
            if self._inflight is None:
                registry.idle.add(task)  # nothing in flight: draining may end the stream here
                try:
                    raw = await anext(incoming)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    _stop_if_draining(registry, task)
                    raise
                finally:
                    registry.idle.discard(task)
                item = self._item(parse, raw)
                if item[2] >= PIPELINE_MIN_OBSERVATIONS:
                    self._inflight = asyncio.Queue(PIPELINE_DEPTH)
                    self._reader = asyncio.create_task(self._read(incoming, parse))
            else:
                if self._inflight.empty():
                    registry.idle.add(task)
                try:
                    next_item = await self._inflight.get()
                except asyncio.CancelledError:
                    _stop_if_draining(registry, task)
                    raise
                finally:
                    registry.idle.discard(task)
                if next_item is None:
                    return
                item = next_item
            step, started, size, tag = item
            try:
                answer = Answer(await step, None, size, started, tag)
            except asyncio.CancelledError:
                if not step.cancelled() or task is None or task.cancelling():
                    raise  # the call was cancelled: the client went away
                answer = Answer(
                    [], StatePreconditionFailed("the request was dropped before it ran"), size, started, tag
                )
            except Exception as exc:
                answer = Answer([], exc, size, started, tag)
            yield answer

    async def _read(self, requests: AsyncIterator[T], parse: Callable[[T], Request]) -> None:
        """Read ahead: parse requests and queue their steps as they arrive; None marks the end of
        the client's side. The next request's ORT call can then start the moment the current one
        ends, while the transport writes answers."""
        inflight = self._inflight
        assert inflight is not None
        try:
            async for raw in requests:
                await inflight.put(self._item(parse, raw))
        except Exception as exc:  # reading failed: hand the error over, in order
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            await inflight.put((failed, time.perf_counter(), 0, None))
            return
        await inflight.put(None)

    def close(self) -> None:
        """Stop reading ahead and drop the requests queued behind a failure or a drain; free the
        stream's own series. Server-wide sequences stay: they outlive the stream."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
        while self._inflight is not None and not self._inflight.empty():
            item = self._inflight.get_nowait()
            if item is None:
                continue
            step = item[0]
            if step.done():
                step.cancelled() or step.exception()  # retrieved: no "never retrieved" log
            else:
                step.cancel()
        self._series.close()
        self._registry.closed()


def _stop_if_draining(registry: StreamRegistry, task: asyncio.Task | None) -> None:
    """A stream woken by drain() (its task cancelled while idle) ends with Draining, not as a
    cancelled call."""
    if registry.draining and task is not None:
        task.uncancel()
        raise Draining() from None
