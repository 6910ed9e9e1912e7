"""One ORT step for a batch of stream requests of one model version.

The micro-batcher hands `StepProcessor` the chunks (one request's steps each) that arrived
together. It drops chunks whose series were freed while they waited (each chunk carries its
rows' epochs from when it was queued, and state is written back only into rows still holding
those epochs); checks the rest all at once -- with numpy over the whole batch, attributing each
problem to its chunk; runs the step graph once on the rows that passed (gather state rows ->
run -> scatter `h_out`/`c_out` back, on the event loop for small batches, else on the version's
executor thread); advances the series' bookkeeping; and gives every chunk its slice of one
shared StepBatch. A chunk with bad input gets its own exception and is left out; so does one
whose forecast came out non-finite; the other chunks in the batch are unaffected. Rows of chunks
that asked for return_state have their state read right after their ORT call and signed there,
on the thread that ran it (before a later call can overwrite it; on the resident path, from the
device values; a large batch's signing stays off the event loop), into the StepBatch
(serving.snapshots) with their new steps_seen and timestamp.

A chunk may follow another one (`after`: the previous step of the same sequence, queued by the
same request): it is refused, unprocessed, when that one was refused, so a request's steps are
applied as a prefix and never with a hole. The batcher never puts the two in one batch (same
owner), so the earlier one's outcome is known when the later one's batch is taken.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from serving import validation
from serving.contract import ModelSpec
from serving.domain import ForecastGroup, StepBatch
from serving.errors import ServingError, StatePreconditionFailed
from serving.snapshots import SnapshotCodec
from serving.state import StateArena

# step(rows [B], epochs [B], values [B], timestamps_ms [B], covariates [B, C]) -> forecast [B, horizon, Q]
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
# (rows in the ORT call, seconds it took, what the rows were: "stream", "sequence" or "both")
BatchObserver = Callable[[int, float, str], None]
# monitor(rows [B], epochs [B], series_ids [B], values [B], timestamps_ms [B], forecast [B, H, Q],
#   covariates [B, C]): the rows stepped, after the step (serving.live scores them)
StepMonitor = Callable[[np.ndarray, np.ndarray, list, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]
# read_state(rows [B], epochs [B]) right after their step, on the thread that ran it -> (each state
# tensor for the B rows in its graph shape, keep [B]: False where the row changed hands meanwhile)
ReadStateFn = Callable[[np.ndarray, np.ndarray], tuple[list[np.ndarray], np.ndarray]]

log = logging.getLogger(__name__)
_chain = itertools.chain.from_iterable
# Batches up to this many rows run on the event loop thread. Waking the executor thread and
# being woken back costs ~100 µs of wall time and CPU, plus GIL hand-offs, about what ORT needs
# for a small batch of a small recurrent cell (OrtModel.step of the default 2x64 LSTM on one
# core, state gather/scatter included: ~50 µs at 1 row, ~150 µs at 32, ~240 µs at 64).
# bench/stream.py at 64 one-observation streams: 76-81 µs of server CPU per message with 64
# here, 86-104 with 32. Larger batches (many series per message) go to the
# executor, where their ORT call overlaps parsing and encoding on the loop.
INLINE_MAX_ROWS = 64


@dataclass
class StepChunk:
    """The steps one request (one wave of it) asks of one model version; n observations."""

    index: np.ndarray  # int64 [n], positions in the request
    series_ids: Sequence[str]
    # Plain sequences, like the inputs: arrays are built once per batch, not per request.
    rows: Sequence[int]  # [n] state rows in the version's arena
    epochs: Sequence[int]  # [n] the rows' epochs when the chunk was queued
    timestamps_ms: Sequence[int]
    values: Sequence[float]
    covariates: Sequence[Sequence[float]]  # per observation
    kind: str = "stream"  # whose rows: a stream's series ("stream") or server-wide sequences ("sequence")
    after: asyncio.Future | None = None  # the chunk that must have succeeded before this one runs
    snapshot: bool = False  # answer each step with its series' signed state (return_state)


class StepProcessor:
    def __init__(
        self,
        step: StepFn,
        arena: StateArena,
        spec: ModelSpec,
        version: str,
        executor: Executor,
        max_batch_size: int,
        observe: BatchObserver | None = None,
        read_state: ReadStateFn | None = None,
        snapshots: SnapshotCodec | None = None,
    ) -> None:
        self._step, self._arena, self._spec, self._version = step, arena, spec, version
        self._executor, self._max, self._observe = executor, max_batch_size, observe
        self._read_state, self._snapshots = read_state, snapshots
        self._max_ts = validation.max_timestamp_ms(spec.horizon, spec.freq_ms)
        self.monitor: StepMonitor | None = None  # live accuracy of this version, when on

    async def __call__(self, chunks: list[StepChunk]) -> list[list[ForecastGroup] | ServingError]:
        arena = self._arena
        total = sum(len(c.rows) for c in chunks)
        rows = np.fromiter(_chain(c.rows for c in chunks), np.int64, total)
        epochs = np.fromiter(_chain(c.epochs for c in chunks), np.int64, total)
        fresh = (arena.epoch[rows] == epochs).all()  # the usual case: one comparison for the batch
        gated = [c.after for c in chunks if c.after is not None]
        if fresh and not (gated and any(map(_refused, gated))):
            return await self._process(chunks, rows, epochs)
        # Some series were freed while their chunk waited (the stream went away): nobody waits
        # for those chunks, and their rows may already belong to other series. Or a step of a
        # sequence follows one that was refused.
        gone = StatePreconditionFailed("the stream's series were freed before this step ran")
        behind = StatePreconditionFailed("an earlier step of this request was refused")

        def refusal(c: StepChunk) -> ServingError | None:
            if c.after is not None and _refused(c.after):
                return behind
            if not fresh and not (arena.epoch[np.asarray(c.rows, np.int64)] == np.asarray(c.epochs, np.int64)).all():
                return gone
            return None

        refusals = [refusal(c) for c in chunks]
        kept = [c for c, refusal in zip(chunks, refusals) if refusal is None]
        done = iter(
            await self._process(
                kept,
                np.fromiter(_chain(c.rows for c in kept), np.int64),
                np.fromiter(_chain(c.epochs for c in kept), np.int64),
            )
            if kept
            else ()
        )
        return [next(done) if refusal is None else refusal for refusal in refusals]

    async def _process(
        self, chunks: list[StepChunk], rows: np.ndarray, epochs: np.ndarray
    ) -> list[list[ForecastGroup] | ServingError]:
        """Check, step and answer live chunks; rows and epochs are theirs, concatenated."""
        spec, arena = self._spec, self._arena
        sizes = [len(c.series_ids) for c in chunks]
        total = sum(sizes)
        ts = np.fromiter(_chain(c.timestamps_ms for c in chunks), np.int64, total)
        values = np.fromiter(_chain(c.values for c in chunks), np.float32, total)
        counts = np.fromiter((len(r) for c in chunks for r in c.covariates), np.int64, total)
        flat_cov = np.fromiter(_chain(_chain(c.covariates for c in chunks)), np.float32, int(counts.sum()))

        errors = validation.check_batch(
            chunks, sizes, values, ts, arena.last_ts[rows], counts, flat_cov,
            spec.num_covariates, spec.covariates, self._max_ts,
        )  # fmt: skip
        results: list[list[ForecastGroup] | ServingError] = list(errors)
        if any(e is not None for e in errors):  # leave the refused chunks out of the ORT call
            keep_rows = np.repeat([e is None for e in errors], sizes)
            ts, values, rows, epochs = ts[keep_rows], values[keep_rows], rows[keep_rows], epochs[keep_rows]
            flat_cov = flat_cov[np.repeat(keep_rows, counts)] if flat_cov.size else flat_cov
            chunks = [c for c, e in zip(chunks, errors) if e is None]
            if not chunks:
                return results
        cov = flat_cov.reshape(len(rows), spec.num_covariates)
        # Rows whose request asked for return_state (None: none did, the usual case).
        want = (
            np.repeat([c.snapshot for c in chunks], [len(c.series_ids) for c in chunks])
            if any(c.snapshot for c in chunks)
            else None
        )

        started = time.perf_counter()
        if len(rows) <= INLINE_MAX_ROWS:  # a hand-off to the executor thread costs more than this call
            forecast, states = self._run(rows, epochs, values, ts, cov, want)
        else:  # ORT releases the GIL: the loop parses and queues the next requests meanwhile
            # (A wait, GIL released, until the thread had entered ORT was measured and dropped:
            # bench/stream.py (a) within noise, see docs/experiments.md, 2026-12-02.)
            loop = asyncio.get_running_loop()
            forecast, states = await loop.run_in_executor(
                self._executor, self._run, rows, epochs, values, ts, cov, want
            )
        if self._observe is not None:
            kinds = {c.kind for c in chunks}
            self._observe(len(rows), time.perf_counter() - started, kinds.pop() if len(kinds) == 1 else "both")
        steps = arena.record_steps(rows, epochs, ts, time.monotonic())
        batch = StepBatch(
            series_ids=list(_chain(c.series_ids for c in chunks)),
            timestamps_ms=ts,
            forecast=forecast,
            steps_seen=steps,
            model_version=self._version,
            freq_ms=spec.freq_ms,
            quantiles=spec.quantiles,
            point_index=spec.point_index,
            states=states,
        )
        # A chunk whose step overflowed is refused like bad input; its stream ends on the error and
        # frees its series, so the state the step wrote is never used.
        sizes = [len(c.series_ids) for c in chunks]
        overflowed = validation.check_forecasts(chunks, sizes, forecast)
        if self.monitor is not None:
            self._monitor(rows, epochs, batch, values, cov, sizes, overflowed)
        offset, done = 0, iter(zip(chunks, overflowed))
        for i, error in enumerate(errors):
            if error is None:
                chunk, failed = next(done)
                results[i] = failed if failed is not None else [ForecastGroup(chunk.index, batch, offset)]
                offset += len(chunk.series_ids)
        return results

    def _monitor(
        self,
        rows: np.ndarray,
        epochs: np.ndarray,
        batch: StepBatch,
        values: np.ndarray,
        cov: np.ndarray,
        sizes: list[int],
        overflowed: list,
    ) -> None:
        """Hand the stepped rows to the live-accuracy monitor (those of overflowed chunks left out)."""
        ids, ts, forecast = batch.series_ids, batch.timestamps_ms, batch.forecast
        if any(e is not None for e in overflowed):
            keep = np.repeat([e is None for e in overflowed], sizes)
            rows, epochs, values, ts, forecast, cov = (a[keep] for a in (rows, epochs, values, ts, forecast, cov))
            ids = [i for i, k in zip(ids, keep.tolist()) if k]
            if not len(rows):
                return
        try:
            self.monitor(rows, epochs, ids, values, ts, forecast, cov)
        except Exception:  # live accuracy observes the answers; a bug in it must not refuse them
            log.exception("event=live_scoring_failed version=%s rows=%d", self._version, len(rows))

    def _run(
        self,
        rows: np.ndarray,
        epochs: np.ndarray,
        values: np.ndarray,
        ts: np.ndarray,
        cov: np.ndarray,
        want: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[bytes | None] | None]:
        """On the executor thread (or the loop, for small batches): ORT calls of at most
        max_batch_size rows -> (forecast [B, horizon, Q], per row the signed snapshot where `want`
        [B] asks for one, else None; None when nothing is wanted)."""
        m, parts = self._max, []
        snapshots: list[bytes | None] | None = None if want is None else [None] * len(rows)
        for i in range(0, len(rows), m):
            part = slice(i, i + m)
            parts.append(self._step(rows[part], epochs[part], values[part], ts[part], cov[part]))
            if snapshots is not None and want[part].any():  # before the next call overwrites the state
                self._snapshot(np.flatnonzero(want[part]) + i, rows, epochs, ts, snapshots)
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), snapshots

    def _snapshot(
        self, picked: np.ndarray, rows: np.ndarray, epochs: np.ndarray, ts: np.ndarray, out: list[bytes | None]
    ) -> None:
        """Sign the state of the batch rows `picked` right after their step into out[picked]; rows
        that changed hands while the step ran (their stream is gone) get none."""
        codec = self._snapshots
        assert codec is not None and self._read_state is not None  # sessions refuse return_state without a secret
        tensors, keep = self._read_state(rows[picked], epochs[picked])
        # steps_seen after this step: the loop adds its 1 (record_steps) once this call is back, and
        # only the loop changes a live row's count.
        steps = self._arena.steps_seen[rows[picked]] + 1
        axes = [t.batch_axis for t in self._arena.tensors]
        for k, (j, kept) in enumerate(zip(picked.tolist(), keep.tolist())):
            if kept:
                one = [t[(slice(None),) * axis + (slice(k, k + 1),)] for t, axis in zip(tensors, axes)]
                out[j] = codec.encode(one, int(steps[k]), int(ts[j]))


def _refused(step: asyncio.Future) -> bool:
    """True unless the step ran and succeeded (a step still pending counts as refused: the batcher
    keeps one owner's steps in order, so it cannot be, and running after it would break order)."""
    return not step.done() or step.cancelled() or step.exception() is not None
