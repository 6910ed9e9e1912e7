"""The protocol-free data plane: streams, sequences, stateless forecasts, model info, limits.

Transports (the forecast.v1 servicer, the Open Inference Protocol's gRPC servicer and HTTP
routes) call only this, and only convert their messages to and from the domain types
(serving.domain). What the plane is made of, each with only the collaborators it needs:

- `models` (serving.model_store): the served version, retired versions, their batchers and arenas;
- `admission` (serving.admission): request and stream limits, the live-series cap, idle expiry;
- `streams` (serving.streams): open streams, their flow control, ordering and draining;
- `sequences` (serving.sequences): the server-wide sequences, kept across requests and streams;
- a stream's own series (serving.sessions), made per stream.

Everything here runs on the event loop; ORT calls run on each model version's executor thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from serving import validation
from serving.admission import Admission
from serving.config import LimitsConfig, StateConfig
from serving.contract import ModelSpec
from serving.domain import ForecastGroup, History, ModelDescription, SequenceSteps, StepBatch
from serving.errors import ModelNotReady, UnknownModel
from serving.metrics import Metrics
from serving.model_store import ModelStore
from serving.sequences import SequenceTable
from serving.sessions import StreamSession
from serving.streams import Stream, StreamRegistry


class DataPlane:
    def __init__(
        self, models: ModelStore, state: StateConfig, metrics: Metrics | None = None, limits: LimitsConfig | None = None
    ) -> None:
        self.models = models
        self.limits = limits or LimitsConfig()
        self.admission = Admission(models, self.limits, state, on_expired=metrics.expired.inc if metrics else None)
        self.streams = StreamRegistry(self.admission)
        self.sequences = SequenceTable(models, self.admission)
        if metrics is not None:
            metrics.track(
                lambda: self.admission.live_series,
                lambda: self.admission.state_bytes,
                lambda: self.streams.open,
                lambda: len(self.models.loaded()),
                lambda: self.sequences.live,
            )

    @property
    def live_series(self) -> int:
        return self.admission.live_series

    @property
    def draining(self) -> bool:
        return self.streams.draining

    @property
    def spec(self) -> ModelSpec | None:
        """The served version's spec (None before a model is loaded), for transports' messages."""
        current = self.models.current
        return current.spec if current is not None else None

    # -- streams and sequences ------------------------------------------------------------------

    def open_stream(self) -> Stream:
        """A new stream (close it when done), or LimitExceeded past --max-streams."""
        self.streams.opened()
        return Stream(self.streams, StreamSession(self.models, self.admission), self.sequences, self.forecast)

    def step_sequence(self, steps: SequenceSteps, model_name: str = "", version: str = "") -> asyncio.Future:
        """Queue a sequence's steps outside any stream; the future gets [the last step's group]."""
        return self.sequences.submit(steps, model_name, version)

    def drain(self) -> None:
        """Server shutdown: streams end after the request they are answering, idle ones at once."""
        self.streams.drain()

    async def run_sweeper(self) -> None:
        """Expire idle series and sequences forever (cancel the task to stop)."""
        await self.admission.run_sweeper()

    # -- stateless forecasts ----------------------------------------------------------------------

    async def forecast(
        self, histories: Sequence[History], model_name: str = "", version: str = ""
    ) -> list[ForecastGroup]:
        """Run each whole history from zero state through the sequence graph.

        Histories of equal length are stacked and run together ([B, T] per ORT call, B up to the
        batch size); the groups returned cover every request position once.
        """
        model = self.models.get(model_name, version)
        spec = model.spec
        c = spec.num_covariates
        self.admission.check_histories(sum(len(h.values) for h in histories), len(histories))
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

    def describe(self, model_name: str = "", version: str = "") -> ModelDescription:
        return self.models.get(model_name, version).describe()

    def ready(self, model_name: str = "", version: str = "") -> bool:
        """True when that model (and version) is loaded and the server is not draining."""
        try:
            self.models.get(model_name, version)
        except (ModelNotReady, UnknownModel):
            return False
        return not self.draining
