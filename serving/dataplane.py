"""The protocol-free data plane: streams, stateless forecasts, model info, series limits.

Transports (the forecast.v1 servicer today, the Open Inference Protocol later) call only this.
Everything here runs on the event loop; ORT calls run on each model version's executor thread.

Live-series cap (`StateConfig.max_series`), the policy: when a request would start new series
past the cap, series idle longer than the idle timeout are reclaimed first; if that is not
enough the request is refused with RESOURCE_EXHAUSTED. Running series are never evicted to
make room: a series silently restarted from zero state would give wrong forecasts, and the
client could not tell.

Per-client limits (`LimitsConfig`): concurrent streams, live series per stream, observations
per request, series id length. Each is checked before anything of the request is queued, and
refused with a message naming the limit, its flag and where in the request it was hit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import numpy as np

from serving import validation
from serving.config import LimitsConfig, StateConfig
from serving.domain import ForecastGroup, History, ModelDescription, Observations, StepBatch
from serving.errors import LimitExceeded
from serving.metrics import Metrics
from serving.model_store import ModelStore
from serving.sessions import StreamSession

log = logging.getLogger(__name__)


class DataPlane:
    def __init__(
        self, models: ModelStore, state: StateConfig, metrics: Metrics | None = None, limits: LimitsConfig | None = None
    ) -> None:
        self.models = models
        self._state = state
        self.limits = limits or LimitsConfig()
        self._metrics = metrics
        self._sessions: set[StreamSession] = set()
        if metrics is not None:
            metrics.track(
                lambda: self.live_series,
                lambda: self.state_bytes,
                lambda: len(self._sessions),
                lambda: len(self.models.loaded()),
            )

    @property
    def live_series(self) -> int:
        return sum(m.arena.live_count for m in self.models.loaded())

    @property
    def state_bytes(self) -> int:
        return sum(m.arena.nbytes for m in self.models.loaded())

    # -- streams --------------------------------------------------------------------------------

    def open_stream(self) -> StreamSession:
        """A new stream's session, or LimitExceeded past --max-streams."""
        cap = self.limits.max_streams
        if len(self._sessions) >= cap:
            raise LimitExceeded(
                "max_streams",
                f"cannot open another stream: {len(self._sessions)} streams are open and the limit is {cap} "
                "(--max-streams); send many series over one stream instead of a stream per series",
            )
        session = StreamSession(self)
        self._sessions.add(session)
        return session

    def close_stream(self, session: StreamSession) -> None:
        self._sessions.discard(session)
        session.close()

    def admit(self, obs: Observations) -> None:
        """Per-request checks of a stream request, before any of it is queued."""
        cap = self.limits.max_observations_per_request
        if len(obs) > cap:
            raise LimitExceeded(
                "max_observations_per_request",
                f"the request has {len(obs)} observations and the limit is {cap} "
                "(--max-observations-per-request); split it into several requests",
            )
        validation.check_series_ids(obs.series_ids)

    def admit_series(self, session: StreamSession, series_ids: Sequence[str], positions: Sequence[int]) -> None:
        """Before a stream starts new series (distinct ids at these request positions): ids within
        --max-series-id-bytes, and room for them. Only new series are checked: every other id of
        a request is one of the stream's live series, checked when it started."""
        validation.check_series_id_lengths(series_ids, self.limits.max_series_id_bytes, positions)
        self.reserve(len(series_ids), validation.where(int(positions[0]), series_ids[0]), session)

    def reserve(self, n: int, where: str, session: StreamSession | None = None) -> None:
        """Room for n new series (in session, if given), or LimitExceeded: past the stream's
        --max-series-per-stream, or past --max-series after reclaiming idle series."""
        if session is not None and session.live + n > self.limits.max_series_per_stream:
            raise LimitExceeded(
                "max_series_per_stream",
                f"{where}: cannot start {n} new series in this stream: it has {session.live} live series and "
                f"the limit is {self.limits.max_series_per_stream} (--max-series-per-stream); end finished "
                "series with end=true or spread them over more streams",
            )
        cap = self._state.max_series
        if self.live_series + n <= cap:
            return
        self.sweep_idle(time.monotonic())
        live = self.live_series
        if live + n > cap:
            raise LimitExceeded(
                "max_series",
                f"{where}: cannot start {n} new series: {live} series are live and the cap is {cap} "
                "(--max-series); end finished series with end=true or close idle streams",
            )

    def sweep_idle(self, now: float) -> int:
        """Free every series not stepped for idle_timeout_s; returns how many."""
        freed = 0
        for model in self.models.loaded():
            rows = model.arena.idle_rows(now, self._state.idle_timeout_s)
            if not len(rows):
                continue
            for row in rows.tolist():
                session, series_id = model.arena.owners[row]
                session.forget(series_id, model, row)
            model.arena.free(rows)
            freed += len(rows)
            self.models.release(model)
        if freed:
            log.info("event=series_expired count=%d idle_timeout_s=%s", freed, self._state.idle_timeout_s)
            if self._metrics is not None:
                self._metrics.expired.inc(freed)
        return freed

    async def run_sweeper(self) -> None:
        """Expire idle series forever (cancel the task to stop)."""
        while True:
            await asyncio.sleep(self._state.sweep_interval_s)
            self.sweep_idle(time.monotonic())

    # -- stateless forecasts ----------------------------------------------------------------------

    async def forecast(self, histories: Sequence[History], model_name: str = "") -> list[ForecastGroup]:
        """Run each whole history from zero state through the sequence graph.

        Histories of equal length are stacked and run together ([B, T] per ORT call, B up to the
        batch size); the groups returned cover every request position once.
        """
        model = self.models.get(model_name)
        spec = model.spec
        c = spec.num_covariates
        observations, cap = sum(len(h.values) for h in histories), self.limits.max_observations_per_request
        if observations > cap:
            raise LimitExceeded(
                "max_observations_per_request",
                f"the request has {observations} observations in {len(histories)} histories and the limit is "
                f"{cap} (--max-observations-per-request); split it into several requests",
            )
        by_length: dict[int, list[int]] = {}
        max_ts = validation.max_timestamp_ms(spec.horizon, spec.freq_ms)
        for i, h in enumerate(histories):
            validation.check_history(h, i, c, self.limits.max_series_id_bytes, max_ts)
            by_length.setdefault(len(h.values), []).append(i)

        groups = []
        model.inflight += 1  # keeps this version loaded even if the alias moves meanwhile
        try:
            for t, members in by_length.items():
                for start in range(0, len(members), model.max_batch_size):
                    part = members[start : start + model.max_batch_size]
                    hs = [histories[i] for i in part]
                    values = np.stack([h.values for h in hs]).astype(np.float32, copy=False)  # [B, T]
                    ts = np.stack([h.timestamps_ms for h in hs]).astype(np.int64, copy=False)  # [B, T]
                    cov = np.stack([h.covariates.reshape(t, c) for h in hs]).astype(np.float32, copy=False)
                    forecast = await model.sequence(values, ts, cov)
                    validation.check_sequence_forecasts(forecast, part, histories)
                    batch = StepBatch(
                        series_ids=[h.series_id for h in hs],
                        timestamps_ms=ts[:, -1],
                        forecast=forecast,
                        steps_seen=np.full(len(part), t, np.int64),
                        model_version=model.version,
                        freq_ms=spec.freq_ms,
                        quantiles=spec.quantiles,
                        point_index=spec.point_index,
                    )
                    groups.append(ForecastGroup(np.array(part, np.int64), batch))
        finally:
            model.inflight -= 1
            self.models.release(model)
        return groups

    def describe(self, model_name: str = "") -> ModelDescription:
        return self.models.get(model_name).describe()
