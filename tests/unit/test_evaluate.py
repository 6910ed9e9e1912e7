"""Backtest and metrics against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.data import Dataset, Series
from training.evaluate import (
    backtest,
    backtest_origins,
    classical_periods,
    coverage,
    insample_scale,
    pinball_loss,
    plot_backtest,
    point_metrics,
    seasonal_naive_forecast,
)
from training.seasonality import weekly_lag

QUANTILES = (0.1, 0.5, 0.9)
HOUR_MS = 3_600_000


def dataset(*series_values: np.ndarray) -> Dataset:
    series = tuple(
        Series(
            series_id=f"s{i}",
            timestamps_ms=1_600_000_000_000 + HOUR_MS * np.arange(len(v)),
            values=v,
            covariates=np.zeros((len(v), 0)),
        )
        for i, v in enumerate(series_values)
    )
    return Dataset(series=series, target="y", covariate_names=(), freq_ms=HOUR_MS, fingerprint={})


def trend_forecast(series: Series) -> np.ndarray:
    """After step t: median y_t + 1 for both steps ahead, band +-0.5. -> [T, 2, 3]"""
    median = series.values.astype(np.float64)[:, None] + 1.0  # [T, 1]
    median = np.repeat(median, 2, axis=1)  # [T, H=2]
    return np.stack([median - 0.5, median, median + 0.5], axis=-1)


def oracle(horizon: int):
    """Forecasts equal to what actually happened next (clipped at the end of the series)."""

    def forecast(series: Series) -> np.ndarray:
        t = len(series.values)
        ahead = np.minimum(np.arange(t)[:, None] + np.arange(1, horizon + 1), t - 1)  # [T, H]
        return np.repeat(series.values[ahead][..., None], len(QUANTILES), axis=-1)  # [T, H, Q]

    return forecast


def test_origins_start_before_the_test_region_and_step_by_season():
    # 20 steps, half of them test: the test region starts at 10, so origins 9, 13, 17 (17 + 2 = 19 = n - 1).
    np.testing.assert_array_equal(backtest_origins(20, 0.5, season=4, horizon=2), [9, 13, 17])
    np.testing.assert_array_equal(backtest_origins(20, 0.2, season=4, horizon=2), [15])
    # 0.1 * 30 is 3.0000000000000004 in floats; the test region is still 3 steps.
    np.testing.assert_array_equal(backtest_origins(30, 0.1, season=1, horizon=1), [26, 27, 28])
    # elecdemand with the default eval: 3,504 test steps, a daily origin, the last one ends the year.
    origins = backtest_origins(17_520, 0.2, season=48, horizon=48)
    assert origins[0] == 14_015 and origins[-1] == 17_471 and len(origins) == 73
    assert origins.dtype == np.int64


def test_origins_refuse_a_test_region_shorter_than_the_horizon():
    with pytest.raises(ValueError, match="cannot hold one forecast of horizon 3"):
        backtest_origins(20, 0.1, season=4, horizon=3)


def test_classical_periods_are_a_day_and_a_week_that_every_training_part_holds_three_times():
    # Hourly: a day is 24 steps, a week 168. Four weeks leave 538 training steps (>= 3 weeks), three only 404.
    assert classical_periods(dataset(np.ones(4 * 168)), test_fraction=0.2) == [24, 168]
    assert classical_periods(dataset(np.ones(4 * 168), np.ones(3 * 168)), test_fraction=0.2) == [24]


def test_seasonal_naive_repeats_the_last_season_beyond_the_lag():
    values = np.arange(20.0)
    pred = seasonal_naive_forecast(values, np.array([10]), horizon=7, lag=3)
    # k = 1..7 copy steps 10+k-3*ceil(k/3): 8, 9, 10, 8, 9, 10, 8.
    np.testing.assert_array_equal(pred, [[8, 9, 10, 8, 9, 10, 8]])
    with pytest.raises(ValueError, match="needs 3 steps of history"):
        seasonal_naive_forecast(values, np.array([1]), horizon=2, lag=3)


def test_point_metrics_skip_zero_actuals_in_mape():
    actual = np.array([[0.0, 2.0], [4.0, 0.0]])
    pred = np.array([[1.0, 1.0], [5.0, 0.0]])
    m = point_metrics(actual, pred, scale=0.5)
    assert m["mae"] == pytest.approx(0.75)  # errors 1, 1, 1, 0
    assert m["rmse"] == pytest.approx(math.sqrt(3 / 4))
    assert m["mape"] == pytest.approx(100 * (1 / 2 + 1 / 4) / 2)  # only the actuals 2 and 4 count
    assert m["smape"] == pytest.approx((200 / 1 + 200 / 3 + 200 / 9 + 0) / 4)  # 0 vs 0 is a perfect 0
    assert m["mase"] == pytest.approx(1.5)
    assert math.isnan(point_metrics(np.zeros((1, 2)), np.ones((1, 2)), 1.0)["mape"])


def test_pinball_and_coverage_by_hand():
    actual = np.array([[1.0, 5.0]])  # [N=1, H=2]
    qpred = np.array([[[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]]])  # [1, 2, Q=3]
    # actual 1: 0.1*1 + 0 + 0.1*1 = 0.2; actual 5: 0.1*4 + 0.5*3 + 0.9*2 = 3.7; mean of 6 = 3.9 / 6.
    assert pinball_loss(actual, qpred, QUANTILES) == pytest.approx(0.65)
    assert coverage(actual, qpred) == 0.5  # 1 is inside [0, 2], 5 is outside [1, 3]


def test_insample_scale_uses_only_the_training_part():
    values = np.concatenate([10.0 + np.arange(10), np.full(10, 100.0)])
    assert insample_scale(values, test_start=10, season=4) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="MASE is undefined"):
        insample_scale(np.tile([1.0, 2.0], 10), test_start=10, season=2)


def test_backtest_metrics_on_a_toy_series():
    # y_t = 10 + t, 20 steps, season 4, horizon 2, half for testing: origins 9, 13, 17 forecast
    # steps (10, 11), (14, 15), (18, 19) whose actuals are (20, 21), (24, 25), (28, 29).
    # In-sample scale: |y_t - y_{t-4}| = 4 everywhere.
    result = backtest(
        dataset(10.0 + np.arange(20)),
        trend_forecast,
        quantiles=QUANTILES,
        horizon=2,
        season=4,
        test_fraction=0.5,
        classical=False,  # tested in test_classical.py; these numbers are worked out for the naives
    )
    np.testing.assert_array_equal(result.details[0].origins, [9, 13, 17])
    np.testing.assert_array_equal(result.details[0].actual, [[20, 21], [24, 25], [28, 29]])

    # Model: median y_o + 1 -> errors 0 (one ahead) and 1 (two ahead); forecasts 20, 24, 28 two ahead.
    m = result.metrics
    assert m["mae"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))
    assert m["mape"] == pytest.approx(100 * (1 / 21 + 1 / 25 + 1 / 29) / 6)
    assert m["smape"] == pytest.approx((200 / 41 + 200 / 49 + 200 / 57) / 6)
    assert m["mase"] == pytest.approx(0.5 / 4)
    # Band median +-0.5: one ahead the actual is the median (inside), two ahead it is median + 1 (outside).
    assert m["coverage"] == pytest.approx(0.5)
    # Per origin: one ahead 0.1*0.5 + 0 + 0.1*0.5, two ahead 0.1*1.5 + 0.5*1 + 0.9*0.5 -> 1.2 / 6.
    assert m["pinball"] == pytest.approx(0.2)

    # Naive: y_o -> errors 1 and 2; forecasts 19, 23, 27.
    naive = result.baselines["naive"]
    assert naive["mae"] == pytest.approx(1.5)
    assert naive["rmse"] == pytest.approx(math.sqrt(2.5))
    assert naive["mape"] == pytest.approx(100 * (1 / 20 + 2 / 21 + 1 / 24 + 2 / 25 + 1 / 28 + 2 / 29) / 6)
    assert naive["smape"] == pytest.approx((200 / 39 + 400 / 40 + 200 / 47 + 400 / 48 + 200 / 55 + 400 / 56) / 6)
    assert naive["mase"] == pytest.approx(1.5 / 4)
    # Seasonal naive (lag 4): always 4 behind.
    seasonal = result.baselines["seasonal_naive"]
    assert (seasonal["mae"], seasonal["rmse"], seasonal["mase"]) == pytest.approx((4.0, 4.0, 1.0))
    # A week (168 hourly steps) of history does not exist before the origins, so no weekly baseline.
    assert set(result.baselines) == {"naive", "seasonal_naive"}


def test_mase_scales_each_series_by_its_own_in_sample_error():
    a = 10.0 + np.arange(20)  # scale 4; naive errors 1, 2 at every origin
    b = np.concatenate([10.0 + 3 * np.arange(10), np.full(10, 40.0)])  # scale 12; naive errors 3, 3, then 0
    result = backtest(
        dataset(a, b), trend_forecast, quantiles=QUANTILES, horizon=2, season=4, test_fraction=0.5, classical=False
    )
    naive = result.baselines["naive"]
    assert naive["mae"] == pytest.approx((9 + 6) / 12)
    # a: (1 + 2) / 4 per origin; b: (3 + 3) / 12 at its first origin. Pooled over 12 points = 1/6,
    # not MAE / mean scale (1.25 / 8).
    assert naive["mase"] == pytest.approx((3 * 3 / 4 + 6 / 12) / 12)


def test_a_perfect_forecast_scores_zero_and_the_baselines_do_not():
    t = np.arange(400)
    rng = np.random.default_rng(0)
    data = dataset(*(5 + np.sin(2 * np.pi * t / 4 + p) + 0.01 * t + rng.normal(0, 0.1, 400) for p in (0, 1)))
    result = backtest(
        data, oracle(6), quantiles=QUANTILES, horizon=6, season=4, test_fraction=0.2, seasonal_periods=(4,)
    )
    assert result.metrics["mae"] == 0 and result.metrics["mase"] == 0
    assert result.metrics["pinball"] == 0 and result.metrics["coverage"] == 1
    assert set(result.baselines) == {"naive", "seasonal_naive", "weekly_seasonal_naive", "mstl_ets"}
    assert all(b["mae"] > 0.05 for b in result.baselines.values())


def test_the_weekly_naive_looks_one_week_back_in_the_data_s_step():
    hour, day = 3_600_000, 86_400_000
    assert weekly_lag(hour, 24) == 168 and weekly_lag(1_800_000, 48) == 336 and weekly_lag(300_000, 288) == 2016
    # Daily data with a season of a week: the seasonal naive is the weekly one; no second, 7 weeks back.
    assert weekly_lag(day, 7) is None and weekly_lag(day, 1) == 7
    assert weekly_lag(hour, 168) is None and weekly_lag(7 * 3_600_000 + 1, 1) is None  # not whole steps
    # Hourly data with a season of 4: the weekly naive is 168 steps back, not 7 seasons (28).
    t = np.arange(400)
    values = 5 + np.sin(2 * np.pi * t / 4) + (t % 168 == 10)  # a spike once a week
    result = backtest(
        dataset(values), oracle(6), quantiles=QUANTILES, horizon=6, season=4, test_fraction=0.2, classical=False
    )
    assert result.baselines["weekly_seasonal_naive"]["mae"] == 0  # the weekly spike, exactly a week back
    assert result.baselines["seasonal_naive"]["mae"] > 0


def test_backtest_refuses_a_forecast_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"expected \(T, horizon, Q\) = \(20, 2, 3\)"):
        backtest(
            dataset(10.0 + np.arange(20)),
            lambda s: np.zeros((len(s.values), 2, 2)),
            quantiles=QUANTILES,
            horizon=2,
            season=4,
            test_fraction=0.5,
        )


def test_plot_writes_a_png(tmp_path):
    result = backtest(
        dataset(10.0 + np.arange(20), 5.0 + np.arange(20)),
        trend_forecast,
        quantiles=QUANTILES,
        horizon=2,
        season=4,
        test_fraction=0.5,
        classical=False,
    )
    path = plot_backtest(result, tmp_path / "plots" / "backtest.png", max_origins=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
