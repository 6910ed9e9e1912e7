"""Protocol-free request and result types of the data plane."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.contract import ModelSpec


@dataclass
class Observations:
    """The observations of one stream request, in request order, as parsed (N = observations).

    Plain sequences: turning them into arrays is done once per ORT batch, not per request.
    """

    series_ids: Sequence[str]
    timestamps_ms: Sequence[int]  # Unix epoch ms
    values: Sequence[float]
    covariates: Sequence[Sequence[float]]  # one row per observation, each of the model's C
    reset: Sequence[bool]
    end: Sequence[bool]

    def __len__(self) -> int:
        return len(self.series_ids)


@dataclass
class History:
    """One series' whole history for a stateless forecast."""

    series_id: str
    timestamps_ms: np.ndarray  # int64 [T]
    values: np.ndarray  # float32 [T]
    covariates: np.ndarray  # float32 [T * C], row-major [T, C]


@dataclass
class StepBatch:
    """The forecasts of one ORT call (B rows), shared by every request that had rows in it."""

    series_ids: list[str]  # [B]
    timestamps_ms: np.ndarray  # int64 [B], the observation each forecast follows
    forecast: np.ndarray  # float32 [B, horizon, Q], raw units
    steps_seen: np.ndarray  # int64 [B]
    model_version: str
    freq_ms: int
    quantiles: tuple[float, ...]
    point_index: int  # which quantile is the point forecast
    # A transport may keep its encoding of the whole batch here, so a batch shared by 64 streams
    # is encoded once, not 64 times (see serving.wire).
    encoded: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.series_ids)


@dataclass
class ForecastGroup:
    """Forecasts for some positions of a request: rows start..start+len(index) of a batch."""

    index: np.ndarray  # int64 [n], positions in the request (ascending)
    batch: StepBatch
    start: int = 0

    def rows(self) -> slice:
        return slice(self.start, self.start + len(self.index))


@dataclass(frozen=True)
class ModelDescription:
    """What GetModelInfo reports: the served version and its graphs' spec."""

    name: str
    version: str
    execution_provider: str
    spec: ModelSpec
    state_bytes_per_series: int  # the state tensors' bytes for one series
