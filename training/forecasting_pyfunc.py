"""The forecasting pyfunc: a version's sequence graph as a DataFrame-in, DataFrame-out forecaster
for MLflow's own tools (``mlflow.pyfunc.load_model``, ``mlflow models serve``, Spark).

``training.registry`` logs it beside every registered version, in the same run, with this file as
its only code: MLflow puts the file on ``sys.path`` as the top-level module ``forecasting_pyfunc``
and calls ``_load_pyfunc(data_path)``. So it must import nothing of this project and no torch:
numpy, pandas, onnxruntime and mlflow only.

What ``predict`` answers is what the server's ``Forecast`` RPC answers
(``serving.dataplane.DataPlane.forecast``): each series' whole history runs through the sequence
graph from zero state (the start of a series), histories of equal length batched together, and
the forecast after its last row comes back.

Input, long format, one row per series and step, in any row order (sorted here by timestamp
within each series); the column names are the training config's (metadata ``fit_config``:
``data.series_col``, ``data.timestamp_col``; ``target``; ``covariates``):
    series id (string; default column ``series_id``), timestamp (datetime, UTC; default
    ``timestamp``), the target (number), one column per covariate (number).
Output, ``horizon`` rows per series in order of first appearance:
    series_id, origin (the series' last timestamp), step (1..horizon), timestamp
    (origin + step x freq), point (the metadata ``point_quantile``'s path), then one column per
    quantile: ``q10`` for 0.1, ``q97_5`` for 0.975 (percent; no dots, which Spark and SQL read as
    field access).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

SEQUENCE_FILE = "sequence.onnx"
OUTPUT_COLUMNS = ("series_id", "origin", "step", "timestamp", "point")
# Observations (B x T) per ORT call: a 2-layer LSTM keeps [T, B, H] float32 per layer, so 2**18
# observations at H = 320 is ~335 MB; longer histories run in smaller batches, one series at least.
MAX_OBSERVATIONS_PER_CALL = 1 << 18
_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}


class ForecastInputError(MlflowException):
    """The input frame cannot be forecast; the message names the column, series and row.

    An MlflowException, so ``mlflow models serve`` answers HTTP 400 with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def quantile_column(q: float) -> str:
    """0.1 -> 'q10', 0.5 -> 'q50', 0.975 -> 'q97_5'."""
    return "q" + f"{round(q * 100, 6):g}".replace(".", "_")


@dataclass(frozen=True)
class Columns:
    """The input's column names: the training config's, else series_id / timestamp / the target."""

    series: str
    timestamp: str
    value: str
    covariates: tuple[str, ...]

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> Columns:
        data = json.loads(meta["fit_config"]).get("data", {}) if meta.get("fit_config") else {}
        return cls(
            series=data.get("series_col") or "series_id",
            timestamp=data.get("timestamp_col") or "timestamp",
            value=meta.get("target") or data.get("target_col") or "value",
            covariates=tuple(_split(meta.get("covariates", ""))),
        )

    @property
    def all(self) -> tuple[str, ...]:
        return (self.series, self.timestamp, self.value, *self.covariates)


def signature(meta: Mapping[str, str]):
    """The model signature: typed columns in (names from the metadata) and out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    cols = Columns.from_metadata(meta)
    # double, not float: MLflow refuses to narrow a float64 column to float32; values are cast to
    # float32 here, as the server's protobuf floats are.
    inputs = [ColSpec("string", cols.series), ColSpec("datetime", cols.timestamp), ColSpec("double", cols.value)]
    inputs += [ColSpec("double", c) for c in cols.covariates]
    outputs = [ColSpec("string", "series_id"), ColSpec("datetime", "origin"), ColSpec("long", "step")]
    outputs += [ColSpec("datetime", "timestamp"), ColSpec("float", "point")]
    outputs += [ColSpec("float", quantile_column(float(q))) for q in _split(meta["quantiles"])]
    return ModelSignature(Schema(inputs), Schema(outputs))


def input_example(meta: Mapping[str, str], steps: int = 3) -> pd.DataFrame:
    """A request of two short series in the model's columns (MLflow stores it with the model as
    the example request of ``mlflow models serve``)."""
    cols, freq_ms = Columns.from_metadata(meta), int(float(meta["freq_ms"]))
    start = np.datetime64("2024-01-01T00:00", "ms")
    frame = {
        cols.series: ["a"] * steps + ["b"] * steps,
        cols.timestamp: [start + np.timedelta64(k * freq_ms, "ms") for k in [*range(steps), *range(steps)]],
        cols.value: [1.0] * steps + [2.0] * steps,
    }
    return pd.DataFrame(frame | {c: [0.0] * (2 * steps) for c in cols.covariates})


@dataclass
class Histories:
    """Validated input, rows sorted by series (first appearance) then time; N rows, S series."""

    series_ids: np.ndarray  # object [S]
    starts: np.ndarray  # int64 [S], each series' first row
    lengths: np.ndarray  # int64 [S]
    timestamps_ms: np.ndarray  # int64 [N]
    values: np.ndarray  # float32 [N]
    covariates: np.ndarray  # float32 [N, C]


class SequenceForecaster:
    """The sequence graph on ONNX Runtime (CPU), fed whole histories from zero state."""

    def __init__(self, sequence_path: str | Path) -> None:
        opts = ort.SessionOptions()
        # One thread: Spark runs a Python worker per core and a scoring server may run several workers.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(sequence_path), opts, providers=["CPUExecutionProvider"])
        self.meta = meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.columns = Columns.from_metadata(meta)
        self.horizon = int(meta["horizon"])
        self.freq_ms = int(float(meta["freq_ms"]))
        self.quantiles = [float(q) for q in _split(meta["quantiles"])]
        self.point_index = self.quantiles.index(float(meta["point_quantile"]))
        inputs = {i.name: i for i in self.session.get_inputs()}
        # Each state tensor's shape with its one dynamic (batch) axis as None, and its dtype: h, c
        # [L, B, H], lags [B, S], lags_seen [B, 1] (CONTRACT §4; the metadata lists them in order).
        self.state = {
            name: ([d if isinstance(d, int) else None for d in inputs[name].shape], _DTYPES[inputs[name].type])
            for name in _split(meta["state"])
        }
        # A model without covariates may still declare a covariates input of width 0.
        self.takes_covariates = "covariates" in inputs

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        h = self.histories(model_input)
        forecast = np.empty((len(h.series_ids), self.horizon, len(self.quantiles)), np.float32)  # [S, horizon, Q]
        for length in np.unique(h.lengths).tolist():
            members = np.flatnonzero(h.lengths == length)
            per_call = max(1, MAX_OBSERVATIONS_PER_CALL // length)
            for first in range(0, len(members), per_call):
                part = members[first : first + per_call]
                rows = h.starts[part, None] + np.arange(length)  # [B, T] row indices
                forecast[part] = self.run(h.values[rows], h.timestamps_ms[rows], h.covariates[rows])
        return self.frame(h, forecast)

    def run(self, values: np.ndarray, timestamps_ms: np.ndarray, covariates: np.ndarray) -> np.ndarray:
        """values float32 [B, T], timestamps_ms int64 [B, T], covariates float32 [B, T, C] ->
        forecast float32 [B, horizon, Q] after each row's last step, from zero state."""
        batch = values.shape[0]
        feeds = {"values": values, "timestamps_ms": timestamps_ms}
        if self.takes_covariates:
            feeds["covariates"] = covariates
        for name, (shape, dtype) in self.state.items():  # zero state: the start of every series
            feeds[name] = np.zeros([batch if d is None else d for d in shape], dtype)
        return self.session.run(["forecast"], feeds)[0]

    def frame(self, h: Histories, forecast: np.ndarray) -> pd.DataFrame:
        """forecast [S, horizon, Q] -> S x horizon rows, series by series."""
        s, steps = len(h.series_ids), np.arange(1, self.horizon + 1, dtype=np.int64)
        origin = h.timestamps_ms[h.starts + h.lengths - 1]  # [S] epoch ms
        when = origin[:, None] + steps * self.freq_ms  # [S, horizon] epoch ms
        out = {
            "series_id": np.repeat(h.series_ids, self.horizon),
            "origin": np.repeat(origin, self.horizon).astype("datetime64[ms]"),
            "step": np.tile(steps, s),
            "timestamp": when.ravel().astype("datetime64[ms]"),
            "point": forecast[:, :, self.point_index].ravel(),
        }
        out |= {quantile_column(q): forecast[:, :, j].ravel() for j, q in enumerate(self.quantiles)}
        return pd.DataFrame(out)

    def histories(self, df: pd.DataFrame) -> Histories:
        """Check the frame and sort it into whole series; errors name the column, series and row."""
        if not isinstance(df, pd.DataFrame):
            raise ForecastInputError(f"expected a pandas DataFrame, got {type(df).__name__}")
        cols = self.columns
        missing = [c for c in cols.all if c not in df.columns]
        if missing:
            raise ForecastInputError(
                f"the input lacks column(s) {', '.join(map(repr, missing))}; it needs {', '.join(map(repr, cols.all))} "
                f"(series id, timestamp, target, covariates), one row per series and step"
            )
        if len(df) == 0:
            raise ForecastInputError("the input has no rows; send at least one observation per series")
        raw_ids = df[cols.series]
        bad = np.flatnonzero(raw_ids.isna().to_numpy() | (raw_ids.astype(str) == "").to_numpy())
        if bad.size:
            raise ForecastInputError(f"row {bad[0]}: the series id (column {cols.series!r}) is missing or empty")
        codes, series_ids = pd.factorize(raw_ids.astype(str))  # codes [N] in order of first appearance
        ids = np.asarray(series_ids, dtype=object)

        ts = _epoch_ms(df[cols.timestamp], cols.timestamp, ids, codes)  # int64 [N]
        values = _finite(df[cols.value], cols.value, ids, codes, ts)  # float64 [N]
        cov = (
            np.stack([_finite(df[c], c, ids, codes, ts) for c in cols.covariates], axis=1) if cols.covariates else None
        )

        order = np.lexsort((ts, codes))  # by series, then time; stable
        codes, ts = codes[order], ts[order]
        lengths = np.bincount(codes, minlength=len(ids)).astype(np.int64)  # [S]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        same = np.flatnonzero((np.diff(codes) == 0) & (np.diff(ts) <= 0))
        if same.size:
            k = same[0] + 1
            raise ForecastInputError(
                f"series {ids[codes[k]]!r}: two rows have the timestamp {_fmt(ts[k])}; each series needs "
                "one row per timestamp"
            )
        values = values[order].astype(np.float32)
        cov = (cov[order] if cov is not None else np.zeros((len(order), 0))).astype(np.float32)
        return Histories(ids, starts, lengths, ts, values, cov)


def _fmt(ms: int) -> str:
    """Epoch ms -> '2014-02-07T05:00:00' (UTC)."""
    return pd.Timestamp(int(ms), unit="ms").isoformat()


def _epoch_ms(col: pd.Series, name: str, ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """A datetime column (naive = UTC, or tz-aware) -> int64 epoch ms [N]."""
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        col = col.dt.tz_convert("UTC").dt.tz_localize(None)
    if not pd.api.types.is_datetime64_dtype(col):
        raise ForecastInputError(
            f"column {name!r} holds {col.dtype}, not datetimes; send UTC datetimes "
            "(from epoch milliseconds: pd.to_datetime(ms, unit='ms'))"
        )
    bad = np.flatnonzero(col.isna().to_numpy())
    if bad.size:
        raise ForecastInputError(
            f"series {ids[codes[bad[0]]]!r}, row {bad[0]}: the timestamp (column {name!r}) is missing"
        )
    # Through datetime64[ms]: pandas 3 may hold s, ms, us or ns units.
    return col.to_numpy().astype("datetime64[ms]").astype(np.int64)


def _finite(col: pd.Series, name: str, ids: np.ndarray, codes: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """A numeric column -> float64 [N]; every value must be a finite number."""
    as_num = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(~np.isfinite(as_num))
    if bad.size:
        i = bad[0]
        raw = col.iloc[i]
        if pd.isna(raw):
            what = "is missing"
        elif np.isnan(as_num[i]):
            what = f"is {raw!r}, not a number"
        else:
            what = f"is {as_num[i]}; values must be finite numbers"
        raise ForecastInputError(f"series {ids[codes[i]]!r}, row {i}, timestamp {_fmt(ts[i])}: {name!r} {what}")
    return as_num


def _load_pyfunc(data_path: str) -> SequenceForecaster:
    """MLflow's entry point: ``data_path`` is the logged data directory, holding sequence.onnx."""
    path = Path(data_path)
    return SequenceForecaster(path / SEQUENCE_FILE if path.is_dir() else path)
