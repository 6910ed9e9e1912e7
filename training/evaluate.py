"""Rolling-origin backtest, point and quantile metrics, and the baselines a model must beat.

How the backtest matches streaming serving: the model is run ONCE over each whole series from a zero
state, one step at a time, exactly as a client streaming that series to the server from its first
observation would drive it. `forecast_fn(series)[t]` is the forecast the server would have answered
right after observation t. An origin o is the last observed step; its forecast is row o, which depends
only on steps 0..o (a recurrent model cannot look ahead), so the history before the origin is the
model's warm-up and nothing from the future leaks in. There is no refitting per origin: the weights were
trained on the part before the test region (`holdout_start`), as a deployed model would be.

Layout of one series of n steps (test_fraction 0.2, season s, horizon H):

    [ training part ............ | test region: last ceil(0.2 n) steps ]
                             o0 ^   o0+s ^   o0+2s ^  ...    (every origin has o + H <= n - 1)

Metrics are pooled over every (series, origin, step ahead) point. MASE divides each series' absolute
errors by that series' own in-sample seasonal-naive MAE (on its training part), so series on different
scales count alike. Baselines are scored on the same origins: naive (last value), seasonal naive
(lag = season), when every series has a week of history before its first origin, weekly seasonal
naive (lag = one week of the data's step: 336 for half-hours; none where the season already is a week,
as for daily data with a season of 7, or a week is not a whole number of steps), and the classical "mstl_ets" (MSTL + damped
trend ETS fitted on each series' training part, `training.classical`), unless the caller turns it off.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.classical import ClassicalFit, fit_mstl_ets
from training.seasonality import calendar_periods, covered_periods, weekly_lag

if TYPE_CHECKING:  # evaluate needs only numpy at run time; the dataset types are for annotations
    from training.data import Dataset, Series

log = logging.getLogger(__name__)

ForecastFn = Callable[["Series"], np.ndarray]  # series -> float [T, horizon, Q], row t made after step t


def holdout_start(n: int, test_fraction: float) -> int:
    """Index of the first test step: the test region is the last ceil(test_fraction * n) steps."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"eval.test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    # The small epsilon keeps float noise (0.1 * 30 = 3.0000000000000004) from adding a whole step.
    return n - math.ceil(test_fraction * n - 1e-9)


def backtest_origins(n: int, test_fraction: float, season: int, horizon: int) -> np.ndarray:
    """int64 [N] indices of the last observed step of each origin, one every `season` steps."""
    if season < 1 or horizon < 1:
        raise ValueError(f"season and horizon must be >= 1, got season={season}, horizon={horizon}")
    start = holdout_start(n, test_fraction)
    if start < 1 or n - start < horizon:
        raise ValueError(
            f"a series of {n} steps has a test region of {n - start} steps, which cannot hold one "
            f"forecast of horizon {horizon}; raise eval.test_fraction or use a longer series"
        )
    # First origin: the step just before the test region; the last one still has `horizon` actuals.
    return np.arange(start - 1, n - horizon, season, dtype=np.int64)


def classical_periods(dataset: Dataset, test_fraction: float) -> list[int]:
    """Seasons (steps) for the classical baseline: a day and a week, where the shortest training part holds
    three of them (hourly data: [24, 168]; daily data: [7]; four weeks of 5-minute data: [288, 2016])."""
    train_length = min(holdout_start(len(s), test_fraction) for s in dataset.series)
    return covered_periods(calendar_periods(dataset.freq_ms), train_length, min_cycles=3)


def _ahead(origins: np.ndarray, horizon: int) -> np.ndarray:
    """int64 [N, horizon] indices of the steps each origin forecasts: o+1 .. o+horizon."""
    return origins[:, None] + np.arange(1, horizon + 1)[None, :]


def naive_forecast(values: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
    """[N, horizon]: the value at each origin, repeated."""
    return np.repeat(np.asarray(values, np.float64)[origins][:, None], horizon, axis=1)


def seasonal_naive_forecast(values: np.ndarray, origins: np.ndarray, horizon: int, lag: int) -> np.ndarray:
    """[N, horizon]: step o+k copies y[o + k - lag * ceil(k / lag)], the last observed value one or more
    whole seasons back, so horizons longer than the lag repeat the last observed season."""
    k = np.arange(1, horizon + 1)
    back = lag * -(-k // lag)  # [H] lag * ceil(k / lag), in integers
    idx = origins[:, None] + (k - back)[None, :]
    if idx.size and idx.min() < 0:
        raise ValueError(f"seasonal naive with lag {lag} needs {lag} steps of history before the first origin")
    return np.asarray(values, np.float64)[idx]


def insample_scale(values: np.ndarray, test_start: int, season: int) -> float:
    """MASE denominator: mean |y_t - y_{t-season}| over the training part values[:test_start]."""
    train = np.asarray(values, np.float64)[:test_start]
    if len(train) <= season:
        raise ValueError(f"the training part has {len(train)} steps; MASE needs more than one season ({season}) of it")
    scale = float(np.mean(np.abs(train[season:] - train[:-season])))
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(
            f"in-sample seasonal naive MAE is {scale} (the training part repeats exactly every {season} "
            "steps), so MASE is undefined; check the data or eval.season"
        )
    return scale


def point_metrics(actual: np.ndarray, pred: np.ndarray, scale: float | np.ndarray) -> dict[str, float]:
    """mae, rmse, mape (%, zero actuals skipped), smape (%, 0..200), mase, over all [N, H] points.

    `scale` is the MASE denominator: one float, or one per row ([N] or [N, 1]) when the rows come from
    series with different in-sample scales.
    """
    actual, pred = np.asarray(actual, np.float64), np.asarray(pred, np.float64)
    scale = np.asarray(scale, np.float64)
    if scale.ndim == 1:
        scale = scale[:, None]  # [N, 1] one scale per row
    err = np.abs(actual - pred)  # [N, H]
    nonzero = actual != 0
    denom = np.abs(actual) + np.abs(pred)
    # sMAPE of a point where both actual and forecast are 0 is a perfect 0, not 0/0.
    smape = np.divide(200.0 * err, denom, out=np.zeros_like(err), where=denom > 0)
    return {
        "mae": float(err.mean()),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mape": float(100.0 * np.mean(err[nonzero] / np.abs(actual[nonzero]))) if nonzero.any() else math.nan,
        "smape": float(smape.mean()),
        "mase": float(np.mean(err / scale)),
    }


def pinball_loss(actual: np.ndarray, qpred: np.ndarray, quantiles: Sequence[float]) -> float:
    """Mean quantile loss over all [N, H] points and Q quantiles; qpred is [N, H, Q]."""
    q = np.asarray(quantiles, np.float64)  # [Q]
    diff = np.asarray(actual, np.float64)[..., None] - np.asarray(qpred, np.float64)  # [N, H, Q]
    return float(np.mean(np.maximum(q * diff, (q - 1.0) * diff)))


def coverage(actual: np.ndarray, qpred: np.ndarray) -> float:
    """Share of actuals [N, H] inside [lowest, highest] quantile forecast (qpred [N, H, Q], ascending)."""
    actual, qpred = np.asarray(actual), np.asarray(qpred)
    return float(np.mean((actual >= qpred[..., 0]) & (actual <= qpred[..., -1])))


@dataclass(frozen=True, eq=False)
class SeriesBacktest:
    """One series' origins and forecasts, kept for plots and per-series inspection."""

    series_id: str
    timestamps_ms: np.ndarray  # int64 [T] the whole series' timestamps
    values: np.ndarray  # float [T] the whole series, for the history before each origin
    origins: np.ndarray  # int64 [N] last observed step of each forecast
    actual: np.ndarray  # float [N, H] values at origins + 1..H
    forecast: np.ndarray  # float [N, H, Q] the model's quantile forecasts at those origins
    scale: float  # in-sample seasonal naive MAE, the MASE denominator


@dataclass(frozen=True)
class BacktestResult:
    metrics: dict[str, float]  # the model: mae, rmse, mape, smape, mase, pinball, coverage
    # "naive", "seasonal_naive"[, "weekly_seasonal_naive"][, "mstl_ets"] -> metrics
    baselines: dict[str, dict[str, float]]
    details: tuple[SeriesBacktest, ...]
    quantiles: tuple[float, ...]
    horizon: int
    season: int
    target: str
    classical: tuple[ClassicalFit, ...] = ()  # the mstl_ets fit of each series, in `details` order; () if off


def point_quantile(quantiles: Sequence[float]) -> float:
    """The one rule for the point forecast: the quantile nearest 0.5 (the higher one on a tie).

    Export records it as metadata ``point_quantile``; the backtest, the promotion gate (through the
    backtest's MASE) and the server all use that quantile's path as the point forecast.
    """
    return min(quantiles, key=lambda q: (abs(q - 0.5), -q))


def point_index(quantiles: Sequence[float]) -> int:
    """Index of ``point_quantile(quantiles)`` in ``quantiles``."""
    return list(quantiles).index(point_quantile(quantiles))


def backtest(
    dataset: Dataset,
    forecast_fn: ForecastFn,
    *,
    quantiles: Sequence[float],
    horizon: int,
    season: int,
    test_fraction: float,
    seasonal_periods: Sequence[int] = (),
    classical: bool = True,
) -> BacktestResult:
    """Score `forecast_fn` and the baselines on rolling origins in each series' test region.

    `seasonal_periods` (steps) are the seasons the classical baseline decomposes, e.g. (48, 336) for a day and
    a week of half-hourly data; `classical=False` skips that baseline (its fit takes seconds per long series).
    """
    quantiles = tuple(float(q) for q in quantiles)
    if not quantiles or any(not 0 < q < 1 for q in quantiles) or list(quantiles) != sorted(set(quantiles)):
        raise ValueError(f"quantiles must be strictly increasing values in (0, 1), got {list(quantiles)}")
    mid = point_index(quantiles)
    weekly = weekly_lag(dataset.freq_ms, season)
    details, fits = [], []
    baseline_preds = {"naive": [], "seasonal_naive": [], "weekly_seasonal_naive": [], "mstl_ets": []}
    for s in dataset.series:
        n = len(s.values)
        origins = backtest_origins(n, test_fraction, season, horizon)
        start = holdout_start(n, test_fraction)
        scale = insample_scale(s.values, start, season)
        fc = np.asarray(forecast_fn(s))
        if fc.shape != (n, horizon, len(quantiles)):
            raise ValueError(
                f"forecast_fn gave shape {fc.shape} for series {s.series_id!r}; "
                f"expected (T, horizon, Q) = {(n, horizon, len(quantiles))}"
            )
        fc = fc[origins].astype(np.float64)  # [N, H, Q]
        if not np.isfinite(fc).all():
            raise ValueError(f"forecast_fn gave non-finite forecasts for series {s.series_id!r}")
        actual = np.asarray(s.values, np.float64)[_ahead(origins, horizon)]  # [N, H]
        details.append(SeriesBacktest(s.series_id, s.timestamps_ms, s.values, origins, actual, fc, scale))
        baseline_preds["naive"].append(naive_forecast(s.values, origins, horizon))
        baseline_preds["seasonal_naive"].append(seasonal_naive_forecast(s.values, origins, horizon, season))
        if weekly is not None and origins[0] >= weekly - 1:
            baseline_preds["weekly_seasonal_naive"].append(seasonal_naive_forecast(s.values, origins, horizon, weekly))
        if classical:
            started = time.perf_counter()
            try:
                fit = fit_mstl_ets(s.values[:start], seasonal_periods)
            except ValueError as exc:
                raise ValueError(f"series {s.series_id!r}: {exc}") from exc
            baseline_preds["mstl_ets"].append(fit.forecast(s.values, origins, horizon))
            fits.append(fit)
            log.info(
                "mstl_ets: series %r, %s on %d training steps: fit %.2fs, fit and score %.2fs",
                s.series_id,
                fit.method,
                start,
                fit.seconds,
                time.perf_counter() - started,
            )

    # Pool all series: rows are (series, origin), each row carries its series' MASE scale.
    actual = np.concatenate([d.actual for d in details])  # [N_all, H]
    qpred = np.concatenate([d.forecast for d in details])  # [N_all, H, Q]
    scales = np.concatenate([np.full(len(d.origins), d.scale) for d in details])  # [N_all]
    metrics = point_metrics(actual, qpred[..., mid], scales)
    metrics["pinball"] = pinball_loss(actual, qpred, quantiles)
    metrics["coverage"] = coverage(actual, qpred)
    baselines = {
        # A weekly baseline scored on only some series would not be comparable, so all or nothing.
        name: point_metrics(actual, np.concatenate(preds), scales)
        for name, preds in baseline_preds.items()
        if len(preds) == len(details)
    }
    return BacktestResult(
        metrics=metrics,
        baselines=baselines,
        details=tuple(details),
        quantiles=quantiles,
        horizon=horizon,
        season=season,
        target=dataset.target,
        classical=tuple(fits),
    )


def plot_backtest(result: BacktestResult, path: Path, max_origins: int = 4) -> Path:
    """PNG of up to `max_origins` forecasts (history tail, actuals, median, outer quantile band)."""
    # The object-oriented API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Spread the panels evenly over the first series' origins, then the next series' if it has too few.
    picks: list[tuple[SeriesBacktest, int]] = []
    for d in result.details:
        take = min(max_origins - len(picks), len(d.origins))
        picks += [(d, int(i)) for i in np.unique(np.linspace(0, len(d.origins) - 1, take).round().astype(int))]
        if len(picks) >= max_origins:
            break
    if not picks:
        raise ValueError("nothing to plot: the backtest has no origins")

    h, mid = result.horizon, point_index(result.quantiles)
    history = max(2 * h, result.season)  # steps shown before each origin
    fig = Figure(figsize=(10, 2.8 * len(picks)), layout="constrained")
    FigureCanvasAgg(fig)
    for row, (d, i) in enumerate(picks):
        ax = fig.add_subplot(len(picks), 1, row + 1)
        o = int(d.origins[i])
        times = d.timestamps_ms.astype("datetime64[ms]")  # [T]
        past, future = slice(max(0, o - history + 1), o + 1), slice(o + 1, o + h + 1)
        ax.plot(times[past], d.values[past], color="0.3", label="history")
        ax.plot(times[future], d.actual[i], color="black", marker=".", label="actual")
        ax.plot(times[future], d.forecast[i, :, mid], color="tab:blue", label=f"q{result.quantiles[mid]:g}")
        if len(result.quantiles) > 1:
            lo, hi = result.quantiles[0], result.quantiles[-1]
            band = d.forecast[i, :, 0], d.forecast[i, :, -1]
            ax.fill_between(times[future], *band, color="tab:blue", alpha=0.25, label=f"q{lo:g}..q{hi:g}")
        ax.axvline(times[o], color="0.6", linestyle="--", linewidth=1)
        ax.set_title(f"series {d.series_id!r}: forecast after {np.datetime_as_string(times[o], unit='m')}")
        ax.set_xlabel("time (UTC)")
        ax.set_ylabel(result.target)
        ax.legend(loc="upper left", fontsize="small")
    m = result.metrics
    fig.suptitle(f"Backtest: MAE {m['mae']:.4g}, MASE {m['mase']:.3f}, coverage {m['coverage']:.1%}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
