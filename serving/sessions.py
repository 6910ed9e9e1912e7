"""One stream's series: stepping them in order, and freeing them.

A stream owns its series: `series_id -> (model version, state row)`. A request is applied in
waves -- a series sent twice in one request steps twice, the second time after the first's state
is written -- and each wave goes to the micro-batcher of each model version it touches as one
chunk (usually: one wave, one version, one chunk). Per observation this costs a dict lookup;
the numpy work (checks, state gather/scatter, ORT) happens once per batch, for all streams.

`submit` queues a request's chunks at once, without waiting for earlier requests of the stream:
the batcher keeps a stream's chunks in order and never puts two of them in one batch, so each
step sees the state the previous one wrote, while the next request's batch is ready the moment
the current ORT call ends. The bookkeeping is done at submission, in request order: a series
that ends (or is reset) leaves the stream's table at once, so a later request starting it again
gets a fresh row; its old row is freed only when the request that retired it is answered (the
steps queued before it still use that row).

A session knows only what it needs: the model store (the current version, and to hand back a
version whose series are gone) and admission (request limits, room for new series). It is the
owner of its rows in the state arena: idle expiry tells it to forget a series (`forget`).
A chunk whose series were freed while it waited (its stream went away) is dropped unprocessed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from serving import validation
from serving.domain import ForecastGroup, Observations
from serving.stepper import StepChunk

if TYPE_CHECKING:
    from serving.admission import Admission
    from serving.model_store import LoadedModel, ModelStore

SeriesRef = tuple["LoadedModel", int]  # (version the series runs on, its row in that arena)
# Request positions 0..n-1 for the usual one-wave request: a read-only view instead of an arange.
_POSITIONS = np.arange(4096, dtype=np.int64)
_POSITIONS.flags.writeable = False


class StreamSession:
    def __init__(self, models: ModelStore, admission: Admission) -> None:
        self._models = models
        self._admission = admission
        self._series: dict[str, SeriesRef] = {}
        self._retiring: dict[int, list[SeriesRef]] = {}  # request number -> rows freed when it is answered
        self._requests = 0

    @property
    def live(self) -> int:
        return len(self._series)

    def submit(self, obs: Observations, model_name: str = "", version: str = "") -> asyncio.Future[list[ForecastGroup]]:
        """Queue one step of each observed series now; the future gets the forecast groups, which
        cover every request position once (or the first error of the request).

        Requests are applied in the order they are submitted, each after the previous one.
        Raises right away for problems found before anything is queued (unknown model, bad
        series id, request and series limits).
        """
        self._models.get(model_name, version)  # unknown model or version, or none loaded yet: refuse up front
        self._admission.check_request(len(obs), obs.series_ids)  # request limits, empty series ids
        retired: list[SeriesRef] = []  # rows to free once this request is answered
        if len(obs.series_ids) == 1:  # one observation per message: its own, shorter path
            try:
                future = self._submit_one(obs, retired)
            except BaseException:
                self._retire_later(retired)
                raise
            return self._gather([future], self._retire_later(retired)) if retired else future
        waves = validation.occurrence_waves(obs.series_ids)
        futures: list[asyncio.Future] = []
        try:
            for positions in waves or (None,):
                futures += self._submit_wave(obs, positions, retired)
        except BaseException:
            for f in futures:
                f.cancel()  # not started yet: the batcher drops them
            self._retire_later(retired)  # earlier requests may still use these rows: freed at close
            raise
        if len(futures) == 1 and not retired:  # the usual case: the chunk's future is the answer
            return futures[0]
        if not futures:  # an empty request: an empty answer
            done = asyncio.get_running_loop().create_future()
            done.set_result([])
            return done
        return self._gather(futures, self._retire_later(retired))

    def _retire_later(self, refs: list[SeriesRef]) -> int:
        """Keep refs to free later (by key, or at close); returns the key."""
        self._requests += 1
        if refs:
            self._retiring[self._requests] = refs
        return self._requests

    def _gather(self, futures: list[asyncio.Future], key: int) -> asyncio.Future:
        """One future for the request's chunk futures; retired rows are freed once all are done."""
        return gather(futures, lambda: self._release(self._retiring.pop(key, [])))

    def _submit_wave(
        self, obs: Observations, positions: list[int] | None, retired: list[SeriesRef]
    ) -> list[asyncio.Future]:
        """Queue the observations at `positions` (None: all of them), whose series are distinct."""
        if positions is None:  # the usual case: one wave of the whole request, no copies
            ids, values, ts, cov = obs.series_ids, obs.values, obs.timestamps_ms, obs.covariates
            resets, ends = obs.reset, obs.end
            index = _POSITIONS[: len(ids)] if len(ids) <= len(_POSITIONS) else np.arange(len(ids))
        else:
            ids, values, ts, cov, resets, ends = (
                [column[i] for i in positions]
                for column in (obs.series_ids, obs.values, obs.timestamps_ms, obs.covariates, obs.reset, obs.end)
            )
            index = np.array(positions, np.int64)
        get = self._series.get
        refs: list[SeriesRef | None] = [get(s) for s in ids]
        if any(resets):
            fresh = [k for k, (ref, reset) in enumerate(zip(refs, resets)) if ref is None or reset]
            retired += [self._series.pop(ids[k]) for k in fresh if refs[k] is not None]  # a reset starts afresh
        elif None in refs:
            fresh = [k for k, ref in enumerate(refs) if ref is None]
        else:
            fresh = []
        now = time.monotonic()
        if fresh:
            current = self._models.get()
            new_ids = [ids[k] for k in fresh]
            self._admission.check_new_series(new_ids, index[fresh], self.live)
            rows = current.arena.alloc([(self, sid) for sid in new_ids], now)
            for k, sid, row in zip(fresh, new_ids, rows.tolist()):
                refs[k] = self._series[sid] = (current, row)

        model = refs[0][0] if refs else None
        if all(ref[0] is model for ref in refs):  # the usual case: every series of the wave on one version
            parts: dict[LoadedModel, list[int] | None] = {model: None} if refs else {}
        else:
            parts = {}
            for k, ref in enumerate(refs):
                parts.setdefault(ref[0], []).append(k)
        futures = []
        for model, ks in parts.items():
            chunk_refs, chunk_ids, chunk_ts, chunk_values, chunk_cov = columns = (refs, ids, ts, values, cov)
            chunk_index = index
            if ks is not None:
                chunk_refs, chunk_ids, chunk_ts, chunk_values, chunk_cov = ([c[k] for k in ks] for c in columns)
                chunk_index = index[ks]
            rows = [ref[1] for ref in chunk_refs]
            arena = model.arena
            if len(rows) == 1:  # scalar indexing: a fraction of the cost of numpy's fancy indexing
                row = rows[0]
                arena.last_used[row] = now  # in use: the idle sweeper must not take this row
                epochs = [int(arena.epoch[row])]
            else:
                arena.last_used[rows] = now
                epochs = arena.epoch[rows].tolist()
            chunk = StepChunk(
                index=chunk_index, series_ids=chunk_ids, rows=rows, epochs=epochs,
                timestamps_ms=chunk_ts, values=chunk_values, covariates=chunk_cov,
            )  # fmt: skip
            futures.append(model.batcher.enqueue(chunk, len(rows), self))

        if any(ends):  # answered, then freed: later requests start these series afresh
            retired += [self._series.pop(sid) for sid, end in zip(ids, ends) if end and sid in self._series]
        return futures

    def _submit_one(self, obs: Observations, retired: list[SeriesRef]) -> asyncio.Future:
        """_submit_wave for a request of one observation, in scalars: same rules, a few µs less
        per message, which is what many one-observation streams pay for."""
        sid = obs.series_ids[0]
        ref = self._series.get(sid)
        if ref is not None and obs.reset[0]:  # a reset starts afresh
            retired.append(self._series.pop(sid))
            ref = None
        now = time.monotonic()
        if ref is None:
            current = self._models.get()
            self._admission.check_new_series(obs.series_ids, _POSITIONS[:1], self.live)
            ref = self._series[sid] = (current, int(current.arena.alloc([(self, sid)], now)[0]))
        model, row = ref
        arena = model.arena
        arena.last_used[row] = now  # in use: the idle sweeper must not take this row
        chunk = StepChunk(
            index=_POSITIONS[:1], series_ids=obs.series_ids, rows=[row], epochs=[int(arena.epoch[row])],
            timestamps_ms=obs.timestamps_ms, values=obs.values, covariates=obs.covariates,
        )  # fmt: skip
        future = model.batcher.enqueue(chunk, 1, self)
        if obs.end[0]:  # answered, then freed: a later request starts the series afresh
            retired.append(self._series.pop(sid))
        return future

    def forget(self, series_id: str, model: LoadedModel, row: int) -> bool:
        """Drop a series whose row idle expiry is freeing; True if it was still ours."""
        ref = self._series.get(series_id)
        if ref is not None and ref[0] is model and ref[1] == row:
            del self._series[series_id]
            return True
        return False

    def close(self) -> None:
        """Free every series of the stream (stream ended, failed or was cancelled), including
        rows retired by requests still in flight: their chunks are then dropped unprocessed."""
        refs, self._series = list(self._series.values()), {}
        for retired in self._retiring.values():
            refs += retired
        self._retiring.clear()
        self._release(refs)

    def _release(self, refs: list[SeriesRef]) -> None:
        release(self._models, refs)


def release(models: ModelStore, refs: list[SeriesRef]) -> None:
    """Free the rows; a retired version left without series is unloaded."""
    by_model: dict[LoadedModel, list[int]] = {}
    for model, row in refs:
        by_model.setdefault(model, []).append(row)
    for model, rows in by_model.items():
        model.arena.free(np.array(rows, np.int64))
        models.release(model)


def gather(
    futures: list[asyncio.Future], on_done: Callable[[], object], last_only: bool = False
) -> asyncio.Future[list[ForecastGroup]]:
    """One future for a request's chunk futures: the groups of all of them in order (only the
    last one's with last_only), or the first error among them. on_done runs once every chunk is
    done, cancelled ones included. Cancelling the result cancels the chunks not yet run."""
    result = asyncio.get_running_loop().create_future()
    remaining = len(futures)

    def chunk_done(_: asyncio.Future) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining:
            return
        on_done()
        if result.done():  # cancelled by the stream
            return
        for f in futures:
            if f.cancelled():
                result.cancel()
                return
            if f.exception() is not None:
                result.set_exception(f.exception())
                return
        result.set_result(futures[-1].result() if last_only else [g for f in futures for g in f.result()])

    def result_done(r: asyncio.Future) -> None:
        if r.cancelled():
            for f in futures:
                f.cancel()

    for f in futures:
        f.add_done_callback(chunk_done)
    result.add_done_callback(result_done)
    return result
