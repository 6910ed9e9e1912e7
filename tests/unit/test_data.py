"""Loading and validating series: each kind of bad data is refused with a message that says where."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data import DataConfig, DataError, load_dataset

HOUR_MS = 3_600_000


def hourly_rows(n: int = 4) -> list[dict]:
    """Two interleaved hourly series 'a' and 'b' from 2021-03-28 00:00 UTC; data row r is list index r-1."""
    rows = []
    for i in range(n):
        t = f"2021-03-28T{i:02d}:00:00Z"
        rows.append({"time": t, "site": "a", "load": 1.0 + i, "temp": 5.0 + 0.5 * i})
        rows.append({"time": t, "site": "b", "load": 10.0 + i, "temp": 6.0 + 0.5 * i})
    return rows


def write_csv(tmp_path: Path, rows: list[dict], name: str = "load.csv") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def config(path: Path, **overrides) -> DataConfig:
    kwargs = dict(
        source=str(path),
        timestamp_col="time",
        target_col="load",
        series_col="site",
        covariate_cols=["temp"],
        freq="1h",
    )
    return DataConfig(**(kwargs | overrides))


def refused(cfg: DataConfig, min_length: int = 0) -> str:
    with pytest.raises(DataError) as err:
        load_dataset(cfg, min_length=min_length)
    return str(err.value)


def test_loads_two_series_with_covariates(tmp_path):
    ds = load_dataset(config(write_csv(tmp_path, hourly_rows())))
    assert [s.series_id for s in ds.series] == ["a", "b"]
    assert ds.target == "load" and ds.covariate_names == ("temp",) and ds.freq_ms == HOUR_MS
    a = ds.series[0]
    assert a.timestamps_ms.dtype == np.int64 and a.values.dtype == np.float32
    assert a.covariates.shape == (4, 1) and a.covariates.dtype == np.float32
    assert a.timestamps_ms[0] == pd.Timestamp("2021-03-28T00:00Z").value // 1_000_000
    assert np.all(np.diff(a.timestamps_ms) == HOUR_MS)
    np.testing.assert_array_equal(a.values, [1, 2, 3, 4])
    np.testing.assert_array_equal(ds.series[1].covariates[:, 0], [6.0, 6.5, 7.0, 7.5])
    assert ds.fingerprint["rows"] == 8 and ds.fingerprint["series"] == 2
    assert ds.fingerprint["start"].startswith("2021-03-28T00:00:00")
    assert ds.fingerprint["end"].startswith("2021-03-28T03:00:00")


def test_without_covariates_the_covariate_array_has_zero_columns(tmp_path):
    ds = load_dataset(config(write_csv(tmp_path, hourly_rows()), covariate_cols=[]))
    assert ds.series[0].covariates.shape == (4, 0)


def test_timezone_aware_timestamps_become_utc_and_naive_ones_are_utc(tmp_path):
    rows = [r for r in hourly_rows() if r["site"] == "a"]
    aware = [dict(r, time=pd.Timestamp(r["time"]).tz_convert("Europe/Berlin").isoformat()) for r in rows]
    naive = [dict(r, time=r["time"].rstrip("Z")) for r in rows]
    expected = load_dataset(config(write_csv(tmp_path, rows, "utc.csv"))).series[0].timestamps_ms
    for variant, name in ((aware, "aware.csv"), (naive, "naive.csv")):
        got = load_dataset(config(write_csv(tmp_path, variant, name))).series[0].timestamps_ms
        np.testing.assert_array_equal(got, expected)


def test_unknown_column_lists_the_available_ones(tmp_path):
    msg = refused(config(write_csv(tmp_path, hourly_rows()), target_col="Load"))
    assert "'Load'" in msg and "available columns" in msg
    assert all(f"'{c}'" in msg for c in ("time", "site", "load", "temp"))


@pytest.mark.parametrize(
    ("column", "bad", "expected"),
    [
        ("load", None, "target 'load' is missing"),
        ("load", "abc", "target 'load' is 'abc', not a finite number"),
        ("temp", None, "covariate 'temp' is missing"),
        ("temp", "warm", "covariate 'temp' is 'warm', not a finite number"),
    ],
)
def test_missing_or_non_numeric_values_name_series_row_and_time(tmp_path, column, bad, expected):
    rows = hourly_rows()
    rows[3][column] = bad  # data row 4: series 'b' at 01:00
    msg = refused(config(write_csv(tmp_path, rows)))
    assert "series 'b', row 4, timestamp 2021-03-28 01:00" in msg
    assert expected in msg


def test_duplicate_timestamp(tmp_path):
    rows = hourly_rows()
    rows[4]["time"] = rows[2]["time"]  # row 5 ('a') repeats row 3's 01:00
    msg = refused(config(write_csv(tmp_path, rows)))
    assert "series 'a', row 5, timestamp 2021-03-28 01:00: duplicate timestamp (same as row 3)" in msg


def test_timestamps_going_backwards_are_refused_not_sorted(tmp_path):
    rows = hourly_rows()
    rows[3]["time"], rows[5]["time"] = rows[5]["time"], rows[3]["time"]  # 'b' at 02:00 then 01:00
    msg = refused(config(write_csv(tmp_path, rows)))
    assert "series 'b', row 6, timestamp 2021-03-28 01:00: timestamps go backwards" in msg
    assert "row 4 is 2021-03-28 02:00" in msg


def test_timestamp_off_the_grid(tmp_path):
    rows = hourly_rows()
    rows[5]["time"] = "2021-03-28T02:30:00Z"
    msg = refused(config(write_csv(tmp_path, rows)))
    assert "series 'b', row 6, timestamp 2021-03-28 02:30: not on the 1h grid" in msg


def test_one_hour_hole_from_a_clock_change_is_refused_with_its_time(tmp_path):
    # Local wall-clock times written as naive strings: Europe skipped 02:00 on 2021-03-28.
    rows = [
        {"time": f"2021-03-28 {h}:00", "site": "b", "load": float(i), "temp": 1.0}
        for i, h in enumerate(["00", "01", "03", "04"])
    ]
    msg = refused(config(write_csv(tmp_path, rows)))
    assert "series 'b': 1 missing step between 2021-03-28 01:00 (row 2) and 2021-03-28 03:00 (row 3)" in msg
    assert "first missing at 2021-03-28 02:00" in msg
    assert "fill_gaps" in msg


def half_hourly_with_hole(missing: int) -> list[dict]:
    times = pd.date_range("2021-01-01", periods=6 + missing, freq="30min", tz="UTC")
    keep = [0, 1, 2, *range(3 + missing, 6 + missing)]  # steps 3 .. 2+missing absent
    return [{"time": times[i].isoformat(), "load": float(i), "temp": 100.0 - 2 * i} for i in keep]


def test_fill_gaps_interpolates_a_short_hole(tmp_path):
    path = write_csv(tmp_path, half_hourly_with_hole(2))
    ds = load_dataset(config(path, series_col=None, freq="30min", fill_gaps=2))
    (s,) = ds.series
    assert s.series_id == "load"  # a single-series file is named after the file
    assert len(s) == 8 and np.all(np.diff(s.timestamps_ms) == 1_800_000)
    # Values were i at step i and the covariate 100 - 2i, both linear, so interpolation restores them.
    np.testing.assert_allclose(s.values, np.arange(8))
    np.testing.assert_allclose(s.covariates[:, 0], 100.0 - 2 * np.arange(8))
    assert ds.fingerprint["filled"] == 2 and ds.fingerprint["rows"] == 8


def test_fill_gaps_still_refuses_a_longer_hole(tmp_path):
    path = write_csv(tmp_path, half_hourly_with_hole(3))
    msg = refused(config(path, series_col=None, freq="30min", fill_gaps=2))
    assert "3 missing steps between 2021-01-01 01:00 (row 3) and 2021-01-01 03:00 (row 4)" in msg
    assert "first missing at 2021-01-01 01:30" in msg and "fill_gaps >= 3" in msg


def test_series_shorter_than_min_length(tmp_path):
    msg = refused(config(write_csv(tmp_path, hourly_rows())), min_length=10)
    assert "series 'a'" in msg and "has 4 steps; at least 10 are needed" in msg


@pytest.mark.parametrize("content", ["", "time,site,load,temp\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    assert "no data rows" in refused(config(path))


def test_missing_series_id_and_unparseable_timestamp(tmp_path):
    rows = hourly_rows()
    rows[2]["site"] = None
    assert "row 3: series id (column 'site') is missing" in refused(config(write_csv(tmp_path, rows)))
    rows = hourly_rows()
    rows[6]["time"] = "yesterday"
    msg = refused(config(write_csv(tmp_path, rows)))
    assert "series 'a', row 7: timestamp 'yesterday' is not an ISO 8601 date-time" in msg


def test_parquet_loads_the_same_content_as_csv(tmp_path):
    csv_ds = load_dataset(config(write_csv(tmp_path, hourly_rows())))
    # Grouped by series instead of interleaved: the loaded content does not depend on row order.
    frame = pd.DataFrame(hourly_rows()).sort_values(["site", "time"])
    frame["time"] = pd.to_datetime(frame["time"], utc=True)  # a real datetime column
    frame.to_parquet(tmp_path / "load.parquet", index=False)
    pq_ds = load_dataset(config(tmp_path / "load.parquet"))
    assert pq_ds.fingerprint == csv_ds.fingerprint
    np.testing.assert_array_equal(pq_ds.series[1].values, csv_ds.series[1].values)


def test_fingerprint_is_stable_and_content_sensitive(tmp_path):
    first = load_dataset(config(write_csv(tmp_path, hourly_rows(), "one.csv"))).fingerprint
    assert load_dataset(config(write_csv(tmp_path, hourly_rows(), "two.csv"))).fingerprint == first
    rows = hourly_rows()
    rows[7]["load"] += 0.001
    changed = load_dataset(config(write_csv(tmp_path, rows, "three.csv"))).fingerprint
    assert changed["sha256"] != first["sha256"] and changed["rows"] == first["rows"]


def test_elecdemand_is_the_bundled_half_hourly_2014_series():
    ds = load_dataset(DataConfig(covariate_cols=["Temperature", "WorkDay"]))
    (s,) = ds.series
    assert s.series_id == "elecdemand" and ds.target == "Demand"
    assert len(s) == 17_520 and ds.freq_ms == 30 * 60 * 1000
    assert np.all(np.diff(s.timestamps_ms) == ds.freq_ms)
    assert s.timestamps_ms[0] == pd.Timestamp("2014-01-01T00:00Z").value // 1_000_000
    assert ds.fingerprint["start"].startswith("2014-01-01T00:00:00")
    assert ds.fingerprint["end"].startswith("2014-12-31T23:30:00")
    assert s.covariates.shape == (17_520, 2) and set(np.unique(s.covariates[:, 1])) == {0.0, 1.0}
    assert np.isfinite(s.values).all() and 2.0 < float(s.values.mean()) < 7.0  # GW


def test_elecdemand_refuses_another_freq():
    with pytest.raises(DataError, match=r"set data\.freq to .30min."):
        load_dataset(DataConfig(freq="1h"))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"freq": "MS"}, "not a fixed step"),
        ({"freq": "fortnightly"}, "not a pandas offset alias"),
        ({"fill_gaps": -1}, "fill_gaps must be an integer >= 0"),
        ({"source": "data.txt"}, "neither 'elecdemand' nor a .csv/.parquet path"),
        ({"covariate_cols": "Temperature"}, "write ['Temperature']"),
        ({"covariate_cols": ["Demand"]}, "remove it from covariate_cols"),
    ],
)
def test_config_errors_say_what_to_write(kwargs, expected):
    with pytest.raises(ValueError) as err:
        DataConfig(**kwargs)
    assert expected in str(err.value)


def test_config_accepts_lists_and_daily_freq():
    cfg = DataConfig(covariate_cols=["Temperature"], freq="D")
    assert cfg.covariate_cols == ("Temperature",) and cfg.freq_ms == 86_400_000
    assert hash(cfg) == hash(DataConfig(covariate_cols=("Temperature",), freq="D"))
