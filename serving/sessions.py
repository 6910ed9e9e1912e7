"""One StreamForecast call's series: stepping them in order, and freeing them.

A stream owns its series: `series_id -> (model version, state row)`. A request is applied in
waves -- a series sent twice in one request steps twice, the second time after the first's state
is written -- and each wave goes to the micro-batcher of each model version it touches as one
chunk (usually: one wave, one version, one chunk). Per observation this costs a dict lookup;
the numpy work (checks, state gather/scatter, ORT) happens once per batch, for all streams.

Errors end the stream (gRPC status), which frees its series; other streams never see them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from serving import validation
from serving.domain import ForecastGroup, Observations
from serving.stepper import StepChunk

if TYPE_CHECKING:
    from serving.dataplane import DataPlane
    from serving.model_store import LoadedModel

SeriesRef = tuple["LoadedModel", int]  # (version the series runs on, its row in that arena)


class StreamSession:
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._series: dict[str, SeriesRef] = {}
        self._order = asyncio.Lock()  # one request at a time: a series' steps stay in order

    @property
    def live(self) -> int:
        return len(self._series)

    async def step(self, obs: Observations, model_name: str = "") -> list[ForecastGroup]:
        """Advance each observed series one step; the groups cover every request position once.

        Requests of a stream may be handed in before the previous one is answered; they are
        applied one after the other, in the order given.
        """
        self._plane.models.get(model_name)  # unknown model or none loaded yet: refuse up front
        validation.check_series_ids(obs.series_ids)
        waves = validation.occurrence_waves(obs.series_ids)
        async with self._order:
            if waves is None:
                return await self._step_wave(obs, None)
            groups: list[ForecastGroup] = []
            for positions in waves:
                groups.extend(await self._step_wave(obs, positions))
            return groups

    async def _step_wave(self, obs: Observations, positions: list[int] | None) -> list[ForecastGroup]:
        """Step the observations at `positions` (None: all of them), whose series are distinct."""

        def pick(column: Sequence) -> Sequence:
            return column if positions is None else [column[i] for i in positions]

        ids = pick(obs.series_ids)
        index = np.arange(len(ids)) if positions is None else np.array(positions, np.int64)
        refs: list[SeriesRef | None] = [self._series.get(s) for s in ids]
        resets = pick(obs.reset)
        if any(resets):
            fresh = [k for k, (ref, reset) in enumerate(zip(refs, resets)) if ref is None or reset]
            self._drop([ids[k] for k in fresh if refs[k] is not None])  # a reset starts afresh
        else:
            fresh = [k for k, ref in enumerate(refs) if ref is None]
        now = time.monotonic()
        if fresh:
            current = self._plane.models.get()
            at = validation.where(int(index[fresh[0]]), ids[fresh[0]])
            self._plane.reserve(len(fresh), at)
            new_ids = [ids[k] for k in fresh]
            rows = current.arena.alloc([(self, sid) for sid in new_ids], now)
            for k, sid, row in zip(fresh, new_ids, rows.tolist()):
                refs[k] = self._series[sid] = (current, row)

        models = {ref[0] for ref in refs}
        if len(models) == 1:  # the usual case: every series of the wave on one version
            parts = {models.pop(): None}
        else:
            lists: dict[LoadedModel, list[int]] = {}
            for k, ref in enumerate(refs):
                lists.setdefault(ref[0], []).append(k)
            parts = lists
        values, ts, cov = pick(obs.values), pick(obs.timestamps_ms), pick(obs.covariates)
        submits = []
        for model, ks in parts.items():

            def sub(column: Sequence, ks: list[int] | None = ks) -> Sequence:
                return column if ks is None else [column[k] for k in ks]

            rows = [ref[1] for ref in sub(refs)]
            model.arena.last_used[rows] = now  # in use: the idle sweeper must not take these rows
            chunk = StepChunk(
                index=index if ks is None else index[ks],
                series_ids=sub(ids), rows=rows, timestamps_ms=sub(ts), values=sub(values), covariates=sub(cov),
            )  # fmt: skip
            submits.append(model.batcher.submit(chunk, len(rows)))
        groups = [await submits[0]] if len(submits) == 1 else list(await asyncio.gather(*submits))

        ends = pick(obs.end)
        if any(ends):
            self._drop([sid for sid, end in zip(ids, ends) if end])
        return groups

    def forget(self, series_id: str, model: LoadedModel, row: int) -> bool:
        """Drop a series whose row the idle sweeper is freeing; True if it was still ours."""
        ref = self._series.get(series_id)
        if ref is not None and ref[0] is model and ref[1] == row:
            del self._series[series_id]
            return True
        return False

    def close(self) -> None:
        """Free every series of the stream (stream ended, failed or was cancelled)."""
        refs, self._series = list(self._series.values()), {}
        self._release(refs)

    def _drop(self, series_ids: list[str]) -> None:
        self._release([self._series.pop(sid) for sid in series_ids])

    def _release(self, refs: list[SeriesRef]) -> None:
        by_model: dict[LoadedModel, list[int]] = {}
        for model, row in refs:
            by_model.setdefault(model, []).append(row)
        for model, rows in by_model.items():
            model.arena.free(np.array(rows, np.int64))
            self._plane.models.release(model)
