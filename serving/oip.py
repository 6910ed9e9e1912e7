"""The Open Inference Protocol's view of the served model, shared by its gRPC and HTTP bindings.

Both bindings parse their wire format into `Tensor`s and plain parameter values; this module
checks them against CONTRACT §7 and turns them into the data plane's work, and describes the
model (metadata, config) in the protocol's terms. It knows nothing of protobuf or JSON.

Inputs: `values` FP32 [B, T], `timestamps_ms` INT64 [B, T], `covariates` FP32 [B, T, C] (only
for a model with covariates). Output: `forecast` FP32 [B, horizon, Q], Q the model's quantiles in
ascending order. Without a `sequence_id` parameter a request is stateless: B histories of T steps
from zero state (the same batched path as forecast.v1 Forecast). With one (an int or a string;
0 and "" mean none, as in Triton), B = 1 and the T steps continue that server-wide sequence;
`sequence_start` starts it afresh, `sequence_end` frees it once answered.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.contract import ModelSpec
from serving.domain import ForecastGroup, History, SequenceSteps, Work
from serving.errors import InvalidInput, Unsupported

VALUES, TIMESTAMPS, COVARIATES, FORECAST = "values", "timestamps_ms", "covariates", "forecast"
INPUT_TYPES = {VALUES: "FP32", TIMESTAMPS: "INT64", COVARIATES: "FP32"}
# Element types as numpy reads them from raw little-endian contents.
NUMPY_TYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}
PLATFORM, BACKEND = "onnxruntime_onnx", "onnxruntime"  # what Triton reports for an ONNX model
# Open Inference Protocol extensions served: model configuration, sequences (sequence_id and its
# flags) and request parameters. Not: classification, shared memory, binary tensor data,
# statistics, repository, trace, logging.
EXTENSIONS = ("model_configuration", "sequence", "parameters")
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
_ONE_STEP = [1, 1]  # the shape of one step of one sequence
_FP32, _INT64 = struct.Struct("<f"), struct.Struct("<q")
_NO_COVARIATES = ((),)


@dataclass
class Tensor:
    """An input tensor as a binding parsed it: its data flat in row-major order, either raw
    little-endian bytes or a sequence of numbers (typed contents, JSON)."""

    name: str
    datatype: str
    shape: Sequence[int]
    data: bytes | Sequence[Any]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: variable; the first dimension is the batch


def inputs_of(spec: ModelSpec) -> list[TensorInfo]:
    inputs = [TensorInfo(VALUES, "FP32", (-1, -1)), TensorInfo(TIMESTAMPS, "INT64", (-1, -1))]
    if spec.num_covariates:
        inputs.append(TensorInfo(COVARIATES, "FP32", (-1, -1, spec.num_covariates)))
    return inputs


def outputs_of(spec: ModelSpec) -> list[TensorInfo]:
    return [TensorInfo(FORECAST, "FP32", (-1, spec.horizon, len(spec.quantiles)))]


def _describe_inputs(spec: ModelSpec | None) -> str:
    if spec is None:
        return ", ".join(INPUT_TYPES)
    return ", ".join(f"{i.name} ({i.datatype} {_dims(i.shape)})" for i in inputs_of(spec))


def _dims(shape: Sequence[int]) -> str:
    names = iter("BTC")
    return "[" + ", ".join(next(names) if d == -1 else str(d) for d in shape) + "]"


def sequence_parameters(sequence_id: Any, start: Any, end: Any) -> tuple[int | str | None, bool, bool]:
    """The sequence parameters' values as (the sequence table's key or None, start, end)."""
    for name, flag in (("sequence_start", start), ("sequence_end", end)):
        if flag is not None and not isinstance(flag, bool):
            raise InvalidInput(f"parameter {name} is {flag!r}; it must be a boolean")
    start, end = bool(start), bool(end)
    if sequence_id is None or sequence_id == 0 or sequence_id == "":  # none, as in Triton
        if start or end:
            raise InvalidInput("parameters sequence_start and sequence_end need a sequence_id")
        return None, False, False
    if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str):
        raise InvalidInput(f"parameter sequence_id is {sequence_id!r}; it must be an integer or a string")
    return sequence_id, start, end


def _array(t: Tensor, count: int) -> np.ndarray:
    """The tensor's data as a flat array of its type, checked against its shape."""
    dtype = NUMPY_TYPES[t.datatype]
    if isinstance(t.data, bytes | bytearray | memoryview):
        if len(t.data) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {t.name!r}: {len(t.data)} bytes of raw contents; shape {list(t.shape)} of {t.datatype} "
                f"takes {count * dtype.itemsize}"
            )
        return np.frombuffer(t.data, dtype)
    try:
        data = np.asarray(t.data, dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"input {t.name!r}: its contents are not {t.datatype} numbers ({exc})") from None
    if data.ndim != 1 or data.size != count:
        raise InvalidInput(
            f"input {t.name!r}: {data.size} elements for shape {list(t.shape)} ({count}); send them flat, row-major"
        )
    return data


def work_from(
    tensors: Sequence[Tensor],
    sequence: tuple[int | str | None, bool, bool] = (None, False, False),
    outputs: Sequence[str] = (),
    spec: ModelSpec | None = None,
) -> Work:
    """The data plane's work for one inference request: SequenceSteps for a sequence (key,
    start, end from `sequence_parameters`), else the B histories. Raises InvalidInput (or
    Unsupported) naming the input or parameter; `spec` only makes the messages more precise."""
    for name in outputs:
        if name != FORECAST:
            raise InvalidInput(f"unknown output {name!r}: the model has one output, {FORECAST!r}")
    by_name: dict[str, Tensor] = {}
    for t in tensors:
        wanted = INPUT_TYPES.get(t.name)
        if wanted is None:
            raise InvalidInput(f"unknown input {t.name!r}: the model takes {_describe_inputs(spec)}")
        if t.datatype != wanted:
            raise InvalidInput(f"input {t.name!r} has datatype {t.datatype}; the model takes {wanted}")
        if t.name in by_name:
            raise InvalidInput(f"input {t.name!r} is given twice")
        by_name[t.name] = t
    values, stamps, cov = by_name.get(VALUES), by_name.get(TIMESTAMPS), by_name.get(COVARIATES)
    if values is None or stamps is None:
        missing = VALUES if values is None else TIMESTAMPS
        raise InvalidInput(f"input {missing!r} is missing; the model takes {_describe_inputs(spec)}")
    key, start, end = sequence
    shape = list(values.shape)
    if shape == _ONE_STEP and cov is None and key is not None:
        v, ts = values.data, stamps.data
        if (
            isinstance(v, bytes)
            and isinstance(ts, bytes)
            and len(v) == 4
            and len(ts) == 8
            and list(stamps.shape) == _ONE_STEP
        ):
            # One step of one sequence in raw contents, a stream's usual request: no numpy.
            return SequenceSteps(key, _INT64.unpack(ts), _FP32.unpack(v), _NO_COVARIATES, start, end)
    if len(shape) != 2 or min(shape) < 1:
        raise InvalidInput(f"input 'values' has shape {shape}; it must be [B, T] with B, T >= 1")
    if list(stamps.shape) != shape:
        raise InvalidInput(f"input 'timestamps_ms' has shape {list(stamps.shape)}; it must match values' {shape}")
    b, t = shape
    if cov is not None and (len(cov.shape) != 3 or list(cov.shape[:2]) != shape or cov.shape[2] < 0):
        raise InvalidInput(f"input 'covariates' has shape {list(cov.shape)}; it must be [{b}, {t}, C]")
    v = _array(values, b * t)
    ts = _array(stamps, b * t)
    c = int(cov.shape[2]) if cov is not None else 0
    covariates = _array(cov, b * t * c) if cov is not None else np.zeros(0, np.float32)
    if key is None:
        v, ts, covariates = v.reshape(b, t), ts.reshape(b, t), covariates.reshape(b, t * c)
        return [History(f"row {i}", ts[i], v[i], covariates[i]) for i in range(b)]
    if b != 1:
        raise InvalidInput(f"a sequence request carries one row (B = 1); input 'values' has shape {shape}")
    rows = covariates.reshape(t, c).tolist() if c else [()] * t
    return SequenceSteps(key, ts.tolist(), v.tolist(), rows, start=start, end=end)


def refuse_output_parameters(name: str, parameters: Mapping[str, Any]) -> None:
    """Tensor parameters that ask for features not served here (classification, shared memory)."""
    for key in parameters:
        if key == "classification" or key.startswith("shared_memory"):
            raise Unsupported(f"output {name!r}: parameter {key!r} is not supported by this server")


def forecast_of(groups: Sequence[ForecastGroup]) -> tuple[str, np.ndarray]:
    """(model version, forecast float32 [B, horizon, Q] in request order) of an answer."""
    if len(groups) == 1 and len(groups[0].index) == 1:  # the usual: one row (a sequence step)
        g = groups[0]
        return g.batch.model_version, g.batch.forecast[g.start : g.start + 1]
    n = sum(len(g.index) for g in groups)
    first = groups[0].batch.forecast
    out = np.empty((n, *first.shape[1:]), np.float32)
    for g in groups:
        out[g.index] = g.batch.forecast[g.rows()]
    return groups[0].batch.model_version, out


def idle_microseconds(idle_timeout_s: float) -> int:
    return math.ceil(idle_timeout_s * 1e6)
