"""The classical baseline (MSTL + damped-trend ETS): accuracy, causality, agreement with statsmodels' own
forecast, and refusals that say why."""

from __future__ import annotations

import numpy as np
import pytest

from training.classical import _fit_ets, fit_mstl_ets
from training.data import Dataset, Series
from training.evaluate import backtest, backtest_origins, holdout_start

HOUR_MS = 3_600_000
DAY, WEEK = 24, 168  # hourly steps
HORIZON = 24


def hourly_series(weeks: int = 8, seed: int = 0) -> np.ndarray:
    """float64 [weeks * 168]: level 50, trend +0.02 per hour, a daily cycle, a weekday/weekend profile, noise sd 1."""
    rng = np.random.default_rng(seed)
    t = np.arange(weeks * WEEK)
    daily = 5.0 * np.sin(2 * np.pi * t / DAY) + 2.0 * np.cos(4 * np.pi * t / DAY)
    weekly = 3.0 * np.sin(2 * np.pi * t / WEEK) - 4.0 * ((t // DAY) % 7 >= 5)
    return 50.0 + 0.02 * t + daily + weekly + rng.normal(0.0, 1.0, len(t))


def dataset(*series_values: np.ndarray) -> Dataset:
    series = tuple(
        Series(f"s{i}", 1_600_000_000_000 + HOUR_MS * np.arange(len(v)), v, np.zeros((len(v), 0)))
        for i, v in enumerate(series_values)
    )
    return Dataset(series=series, target="y", covariate_names=(), freq_ms=HOUR_MS, fingerprint={})


def naive_model(series: Series) -> np.ndarray:
    """The forecaster under test does not matter here: last value for every step and quantile. [T, H, 3]"""
    return np.repeat(np.asarray(series.values, np.float64)[:, None, None], HORIZON, axis=1).repeat(3, axis=2)


def test_mstl_ets_beats_the_seasonal_naives_on_daily_and_weekly_seasons():
    data = dataset(hourly_series(seed=0), 2.0 * hourly_series(seed=1))
    result = backtest(
        data,
        naive_model,
        quantiles=(0.1, 0.5, 0.9),
        horizon=HORIZON,
        season=DAY,
        test_fraction=0.2,
        seasonal_periods=(DAY, WEEK),
    )
    assert set(result.baselines) == {"naive", "seasonal_naive", "weekly_seasonal_naive", "mstl_ets"}
    assert set(result.baselines["mstl_ets"]) == {"mae", "rmse", "mape", "smape", "mase"}
    mase = {name: m["mase"] for name, m in result.baselines.items()}
    # The seasonal naives copy noise and miss the trend (the daily one also the weekly profile).
    assert mase["mstl_ets"] < 0.85 * min(mase["seasonal_naive"], mase["weekly_seasonal_naive"])
    assert [f.method for f in result.classical] == ["MSTL[24, 168] + ETS(A,Ad,N)"] * 2
    assert [f.train_length for f in result.classical] == [holdout_start(8 * WEEK, 0.2)] * 2


def test_classical_false_fits_nothing():
    result = backtest(
        dataset(hourly_series()),
        naive_model,
        quantiles=(0.1, 0.5, 0.9),
        horizon=HORIZON,
        season=DAY,
        test_fraction=0.2,
        seasonal_periods=(DAY, WEEK),
        classical=False,
    )
    assert "mstl_ets" not in result.baselines and result.classical == ()


def test_a_forecast_does_not_change_when_values_after_its_origin_do():
    y = hourly_series()
    start = holdout_start(len(y), 0.2)
    origins = backtest_origins(len(y), 0.2, DAY, HORIZON)  # [N] every 24 h from start - 1
    fit = fit_mstl_ets(y[:start], (DAY, WEEK))
    before = fit.forecast(y, origins, HORIZON)  # [N, H]
    assert before.shape == (len(origins), HORIZON)

    k = len(origins) // 2
    changed = y.copy()
    changed[origins[k] + 1 :] += np.random.default_rng(5).normal(0.0, 10.0, len(y) - origins[k] - 1)
    after = fit.forecast(changed, origins, HORIZON)
    np.testing.assert_array_equal(after[: k + 1], before[: k + 1])  # origins up to o_k saw nothing new
    assert np.abs(after[k + 1 :] - before[k + 1 :]).min() > 0  # later ones did: the check can fail


def test_the_forecast_from_the_last_training_step_is_statsmodels_own():
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    y = hourly_series()
    start = holdout_start(len(y), 0.2)
    fit = fit_mstl_ets(y[:start], (DAY, WEEK))
    ours = fit.forecast(y, np.array([start - 1]), 2 * WEEK)[0]  # [2 weeks], the closed-form damped trend

    # statsmodels' own forecast of the adjusted training series, with the fitted parameters ...
    z = (y[:start] - fit.fitted_seasonal - fit.center) / fit.scale
    ets = ETSModel(z, error="add", trend="add", damped_trend=True).smooth(fit.params).forecast(2 * WEEK)
    # ... plus each component's last fitted cycle, repeated.
    j = np.arange(2 * WEEK)  # steps after the training part
    seasonal = sum(profile[j % p] for p, profile in zip(fit.periods, fit.profiles))
    np.testing.assert_allclose(ours, fit.center + fit.scale * np.asarray(ets) + seasonal, rtol=1e-10, atol=1e-9)
    # Each profile is its component's last cycle: over the last day of training, both are there and sum up.
    day_profile, week_profile = fit.profiles
    np.testing.assert_allclose(fit.fitted_seasonal[-DAY:], day_profile + week_profile[-DAY:], rtol=1e-12)


def test_periods_are_sorted_deduplicated_and_too_long_ones_dropped():
    y = hourly_series()
    assert fit_mstl_ets(y[:600], (WEEK, DAY, DAY)).periods == (DAY, WEEK)
    # 2 x 168 >= 300: STL cannot estimate a weekly component from under two weeks.
    short = fit_mstl_ets(y[:300], (DAY, WEEK))
    assert short.periods == (DAY,) and short.method == "MSTL[24] + ETS(A,Ad,N)"
    plain = fit_mstl_ets(y[:300], ())
    assert plain.periods == () and plain.method == "ETS(A,Ad,N)" and not plain.fitted_seasonal.any()


@pytest.mark.parametrize(
    ("train", "periods", "expected"),
    [
        (np.full(200, 3.0), (DAY,), "the training part is constant (3)"),
        (np.arange(9.0), (), "at least 10 training steps"),
        (np.r_[np.arange(50.0), np.nan], (), "NaN or infinite"),
        (np.tile(np.arange(DAY, dtype=float), 10), (DAY,), "explain the training part exactly"),
        (np.arange(100.0), (1,), "whole numbers of steps >= 2"),
    ],
)
def test_degenerate_training_parts_are_refused_with_a_reason(train, periods, expected):
    with pytest.raises(ValueError) as err:
        fit_mstl_ets(train, periods)
    assert expected in str(err.value)


def test_the_backtest_names_the_series_a_classical_fit_refused():
    # Repeats exactly every 24 steps, but not every 7 (the season), so MASE is defined and only MSTL objects.
    y = np.tile(np.arange(DAY, dtype=float), 20)
    with pytest.raises(ValueError, match=r"series 's0': the seasonal components \[24\] explain"):
        backtest(
            dataset(y),
            naive_model,
            quantiles=(0.1, 0.5, 0.9),
            horizon=HORIZON,
            season=7,
            test_fraction=0.2,
            seasonal_periods=(DAY,),
        )


def test_origins_inside_the_training_part_are_refused():
    y = hourly_series()
    fit = fit_mstl_ets(y[:500], (DAY,))
    with pytest.raises(ValueError, match="origins must lie in"):
        fit.forecast(y, np.array([498, 499]), HORIZON)  # 498 is before the last training step


def test_a_non_finite_ets_fit_counts_as_failed():
    # What sends the baseline to its ETS(A,N,N) fallback: statsmodels itself returns a NaN likelihood here.
    z = np.random.default_rng(0).normal(size=100)
    z[50] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        _fit_ets(z, trend=True)
