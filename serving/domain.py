"""Protocol-free request and result types of the data plane."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from serving.contract import ModelSpec, StateTensor


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
class SequenceSteps:
    """T steps of one sequence: a series kept server-wide, across requests and streams, under
    the id its client chose (an int or a str: 7 and "7" are different sequences). The steps are
    applied in order; the answer is the forecast after the last."""

    sequence_id: int | str
    timestamps_ms: Sequence[int]  # [T], Unix epoch ms
    values: Sequence[float]  # [T]
    covariates: Sequence[Sequence[float]]  # [T] rows of the model's C
    start: bool = False  # start afresh; a live sequence of this id is dropped first
    end: bool = False  # free the sequence once this request is answered

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class History:
    """One series' whole history for a stateless forecast."""

    series_id: str
    timestamps_ms: np.ndarray  # int64 [T]
    values: np.ndarray  # float32 [T]
    covariates: np.ndarray  # float32 [T * C], row-major [T, C]


@dataclass(eq=False)  # compared and hashed by identity: transports may cache their encoding of a batch
class StepBatch:
    """The forecasts of one ORT call (B rows), shared by every request that had rows in it."""

    series_ids: list[Any]  # [B]: stream series ids (str), sequence ids (int or str), history ids
    timestamps_ms: np.ndarray  # int64 [B], the observation each forecast follows
    forecast: np.ndarray  # float32 [B, horizon, Q], raw units
    steps_seen: np.ndarray  # int64 [B]
    model_version: str
    freq_ms: int
    quantiles: tuple[float, ...]
    point_index: int  # which quantile is the point forecast

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
    """What model-info calls report: the served version, its graphs' spec and state tensors."""

    name: str
    version: str
    execution_provider: str
    spec: ModelSpec
    state_bytes_per_series: int  # the state tensors' bytes for one series
    state: tuple[StateTensor, ...] = ()  # the recurrent state the server keeps per series
    max_batch_size: int = 0  # rows per ORT call


# What a stream request asks for: steps of the stream's own series, steps of one server-wide
# sequence, whole histories from zero state, or the error that refused it while the transport
# converted it (answered in its place, in order).
Work = Observations | SequenceSteps | Sequence[History] | Exception


class Request(NamedTuple):
    """One request of a stream, as a transport hands it to the data plane."""

    work: Work
    model: str = ""  # "" or the served model's name
    version: str = ""  # "" or the served version
    tag: Any = None  # the transport's own (e.g. the request id), handed back with the answer


class Answer:
    """The answer to one stream request: its forecast groups, or the error that refused it."""

    __slots__ = ("error", "groups", "size", "started", "tag")

    def __init__(self, groups: list[ForecastGroup], error: Exception | None, size: int, started: float, tag: Any):
        self.groups = groups  # cover every position of the request once ([] when refused)
        self.error = error
        self.size = size  # observations in the request
        self.started = started  # time.perf_counter() when the request was read
        self.tag = tag
