"""Helpers for the forecasting pyfunc tests: long-format histories, and the server's Forecast RPC
answer to the same histories laid out as the pyfunc's output frame, to compare the two."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
import pandas as pd

from training.forecasting_pyfunc import quantile_column

START_MS = 1_388_534_400_000  # 2014-01-01 00:00 UTC
FREQ_MS = 1_800_000  # 30 min, the tiny models' grid


def long_histories(
    lengths: Sequence[int], covariates: Sequence[str] = (), seed: int = 0, value_col: str = "demand"
) -> pd.DataFrame:
    """One row per series and step (series_id, timestamp, value_col, covariates...), series k of
    lengths[k] steps starting at its own time on the 30-min grid, rows shuffled."""
    rng = np.random.default_rng(seed)
    frames = []
    for k, n in enumerate(lengths):
        t = int(rng.integers(0, 48 * 300)) + np.arange(n)  # steps since START_MS
        level = 5.0 + 20.0 * rng.random()
        frame = {
            "series_id": f"series-{k}",
            "timestamp": pd.to_datetime(START_MS + t * FREQ_MS, unit="ms"),
            value_col: level * (1.0 + 0.3 * np.sin(2 * np.pi * t / 48)) + rng.normal(0, 0.05 * level, n),
        }
        for j, name in enumerate(covariates):  # a temperature-like number, then 0/1 flags
            frame[name] = rng.normal(15, 5, n) if j == 0 else rng.integers(0, 2, n).astype(np.float64)
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def rpc_forecasts(target: str, histories: pd.DataFrame, value_col: str, covariates: Sequence[str]) -> pd.DataFrame:
    """The server's Forecast RPC on each series' whole history, as the pyfunc's output frame
    (series in order of first appearance, horizon rows each)."""
    from serving.proto import pb, pb_grpc

    series = []
    for sid, rows in histories.groupby("series_id", sort=False):
        rows = rows.sort_values("timestamp")
        series.append(
            pb.SeriesHistory(
                series_id=str(sid),
                timestamps_ms=rows["timestamp"].to_numpy().astype("datetime64[ms]").astype(np.int64).tolist(),
                values=rows[value_col].to_numpy(np.float32).tolist(),
                covariates=rows[list(covariates)].to_numpy(np.float32).ravel().tolist(),
            )
        )
    with grpc.insecure_channel(target) as channel:
        response = pb_grpc.ForecasterStub(channel).Forecast(pb.ForecastRequest(series=series), timeout=60)
    frames = []
    for f in response.forecasts:
        h = len(f.point)
        frame = {
            "series_id": f.series_id,
            "origin": np.full(h, f.timestamp_ms).astype("datetime64[ms]"),
            "step": np.arange(1, h + 1),
            "timestamp": np.asarray(f.forecast_timestamps_ms).astype("datetime64[ms]"),
            "point": np.asarray(f.point, np.float32),
        }
        frame |= {quantile_column(q.quantile): np.asarray(q.values, np.float32) for q in f.quantiles}
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)


def utc_ms(col: pd.Series) -> np.ndarray:
    """Datetimes (naive = UTC, tz-aware, or ISO strings from JSON) -> datetime64[ms] [N], UTC."""
    col = pd.to_datetime(col)
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        col = col.dt.tz_convert("UTC").dt.tz_localize(None)
    return col.to_numpy().astype("datetime64[ms]")


def assert_same_forecasts(got: pd.DataFrame, want: pd.DataFrame, tolerance: float = 1e-5) -> None:
    """Same series, origins, steps and timestamps, in the same order; numbers within tolerance."""
    assert list(got.columns) == list(want.columns), (list(got.columns), list(want.columns))
    assert len(got) == len(want)
    assert got["series_id"].astype(str).tolist() == want["series_id"].astype(str).tolist()
    assert got["step"].astype(np.int64).tolist() == want["step"].astype(np.int64).tolist()
    for col in ("origin", "timestamp"):
        np.testing.assert_array_equal(utc_ms(got[col]), utc_ms(want[col]), err_msg=col)
    for col in got.columns[4:]:  # point and the quantiles
        np.testing.assert_allclose(
            got[col].to_numpy(np.float64), want[col].to_numpy(np.float64), rtol=tolerance, atol=tolerance, err_msg=col
        )
