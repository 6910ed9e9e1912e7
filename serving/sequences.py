"""Server-wide sequences: series kept across requests and streams under their client's id.

A sequence (the Open Inference Protocol's stateful requests: `sequence_id`, `sequence_start`,
`sequence_end`) is a series whose state outlives the request and the stream that brought it: any
later request naming its id continues it, from any stream or unary call, until a request ends
it or it stays idle past the idle timeout. Ids are keys of this table alone, kept as sent (an int
or a str: 7 and "7" are two sequences), so a sequence never meets a stream's series of the same
name. A request must start its sequence (`start`) unless the sequence is live; an unknown or
expired id without it is refused, and says so.

Steps go through the same micro-batcher, state arena and ORT calls as the streams' series. Each
is queued with its sequence as the batcher's owner, so one sequence's steps are applied in the
order they were submitted and never two in one batch, while different sequences (and streams'
series) share batches. A request of T steps queues T one-row chunks, each after the first
gated on the previous one (serving.stepper: a step after a refused one is refused too), and is
answered with the forecast after its last step. As for streams, the bookkeeping is done at
submission: an ended or restarted sequence leaves the table at once and its row is freed when
the request that retired it is answered.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np

from serving import validation
from serving.domain import ForecastGroup, SequenceSteps
from serving.errors import InvalidInput, UnknownSequence
from serving.sessions import SeriesRef, gather, release
from serving.stepper import StepChunk

if TYPE_CHECKING:
    from serving.admission import Admission
    from serving.model_store import LoadedModel, ModelStore

_FIRST = np.zeros(1, np.int64)  # the request position of a one-step request
_FIRST.flags.writeable = False


class SequenceTable:
    def __init__(self, models: ModelStore, admission: Admission) -> None:
        self._models = models
        self._admission = admission
        self._live: dict[int | str, SeriesRef] = {}

    @property
    def live(self) -> int:
        return len(self._live)

    def submit(
        self, steps: SequenceSteps, model_name: str = "", version: str = ""
    ) -> asyncio.Future[list[ForecastGroup]]:
        """Queue the request's steps now; the future gets [the group of the last step's forecast]
        (or the first error). Raises right away for what is found before anything is queued:
        unknown model or version, an unknown sequence not started, limits, steps out of order."""
        self._models.get(model_name, version)
        n = len(steps)
        self._admission.check_request(n)
        key = steps.sequence_id
        at = f"sequence {validation.shown(key)}"
        if n == 0:
            raise InvalidInput(f"{at}: no steps; a request needs at least one observation")
        if n > 1:
            _check_order(steps.timestamps_ms, at)
        ref = self._live.get(key)
        retired: list[SeriesRef] = []  # rows freed once this request is answered
        if steps.start and ref is not None:  # starting a live sequence afresh
            retired.append(self._live.pop(key))
            ref = None
        elif ref is None and not steps.start:
            raise UnknownSequence(
                f"{at} is not live (never started, ended, or freed after {self._admission.idle_timeout_s:g} s "
                "without a request); a sequence's first request must start it (sequence_start)"
            )
        now = time.monotonic()
        if ref is None:
            try:
                current = self._models.get()
                if isinstance(key, str):
                    validation.check_series_id(key, self._admission.limits.max_series_id_bytes, at)
                self._admission.reserve(1, at)
            except BaseException:
                release(self._models, retired)  # nothing of this request was queued: nothing still uses them
                raise
            ref = self._live[key] = (current, int(current.arena.alloc([(self, key)], now)[0]))
        model, row = ref
        arena = model.arena
        arena.last_used[row] = now  # in use: idle expiry must not take this row
        epochs = [int(arena.epoch[row])]
        owner = (self, key)  # the batcher keeps one sequence's steps in order, one per batch
        if n == 1:
            chunk = StepChunk(
                index=_FIRST, series_ids=(key,), rows=[row], epochs=epochs, timestamps_ms=steps.timestamps_ms,
                values=steps.values, covariates=steps.covariates, kind="sequence",
            )  # fmt: skip
            futures = [model.batcher.enqueue(chunk, 1, owner)]
        else:
            futures, previous = [], None
            for t in range(n):
                chunk = StepChunk(
                    index=np.array([t], np.int64), series_ids=(key,), rows=[row], epochs=epochs,
                    timestamps_ms=steps.timestamps_ms[t : t + 1], values=steps.values[t : t + 1],
                    covariates=steps.covariates[t : t + 1], kind="sequence", after=previous,
                )  # fmt: skip
                previous = model.batcher.enqueue(chunk, 1, owner)
                futures.append(previous)
        if steps.end:  # answered, then freed: a later request must start the sequence again
            retired.append(self._live.pop(key))
        if len(futures) == 1 and not retired:  # the usual case: the step's future is the answer
            return futures[0]
        return gather(futures, lambda: release(self._models, retired), last_only=True)

    def forget(self, key: int | str, model: LoadedModel, row: int) -> bool:
        """Drop a sequence whose row idle expiry is freeing; True if it was still live."""
        ref = self._live.get(key)
        if ref is not None and ref[0] is model and ref[1] == row:
            del self._live[key]
            return True
        return False


def _check_order(timestamps_ms, at: str) -> None:
    """Steps of one request must go forward in time (checked up front: the steps after a refused
    one would be refused anyway, and the message can name the step)."""
    ts = np.asarray(timestamps_ms, np.int64)
    back = np.flatnonzero(np.diff(ts) <= 0)
    if len(back):
        k = int(back[0]) + 1
        raise InvalidInput(
            f"{at}: step {k} has timestamp_ms {ts[k]}, not after step {k - 1}'s {ts[k - 1]}; "
            "timestamps must increase within a sequence"
        )
