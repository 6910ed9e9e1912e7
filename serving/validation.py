"""Input checks of the data plane; every error says what was wrong and where.

"Where" is the observation's index in its request and its series id (the history's index for
unary requests), so a client sending 256 series per message can find the bad one. Stream checks
run once per ORT batch over all the requests in it (`check_batch`), each problem attributed to
the request it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from serving.domain import History
from serving.errors import InvalidInput, SeriesIdTooLong

SHOWN_ID_CHARS = 40  # a series id quoted in a message is cut to this many characters
# The earliest timestamp_ms accepted: int64 min itself marks "no previous observation" in the state.
MIN_TIMESTAMP_MS = int(np.iinfo(np.int64).min) + 1


def max_timestamp_ms(horizon: int, freq_ms: int) -> int:
    """The latest timestamp_ms whose forecast times (t + k * freq_ms, k = 1..horizon) fit in int64."""
    return int(np.iinfo(np.int64).max) - horizon * freq_ms


def _timestamp_range(max_ts: int) -> str:
    return f"timestamps must be in [{MIN_TIMESTAMP_MS}, {max_ts}] ms, so that the forecast times fit in int64"


# How a chunk's kind (serving.stepper.StepChunk.kind) names its positions and ids in messages.
_NAMES = {"stream": ("observation", "series"), "sequence": ("step", "sequence")}


def shown(series_id: str | int) -> str:
    """A series id for a message: quoted (a sequence's int id as is), and cut short (with its
    size) when it is long."""
    if not isinstance(series_id, str) or len(series_id) <= SHOWN_ID_CHARS:
        return repr(series_id)
    return f"{series_id[:SHOWN_ID_CHARS]!r}... ({len(series_id.encode('utf-8', 'surrogatepass'))} bytes)"


def where(index: int, series_id: str | int, what: str = "observation", noun: str = "series") -> str:
    return f"{what} {index} ({noun} {shown(series_id)})"


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _utf8_bytes(series_id: str) -> int:
    return len(series_id.encode("utf-8", "surrogatepass"))


def check_series_ids(series_ids: Sequence[str]) -> None:
    if "" in series_ids:
        raise InvalidInput(f"observation {list(series_ids).index('')}: series_id is empty")


def check_series_id_lengths(series_ids: Sequence[str], max_bytes: int, positions: Sequence[int]) -> None:
    """Every id at most max_bytes long in UTF-8 (--max-series-id-bytes); positions [n] are the
    ids' indices in their request, for the message."""
    # A character takes 1-4 bytes in UTF-8, so the lengths in characters (one C-level pass)
    # settle the usual case without encoding anything.
    if max(map(len, series_ids), default=0) * 4 <= max_bytes:
        return
    for i, sid in zip(positions, series_ids):
        check_series_id(sid, max_bytes, where(int(i), sid))


def check_series_id(series_id: str, max_bytes: int, at: str) -> None:
    if len(series_id) * 4 <= max_bytes or (series_id.isascii() and len(series_id) <= max_bytes):
        return  # no need to encode it
    size = _utf8_bytes(series_id)
    if size > max_bytes:
        raise SeriesIdTooLong(
            f"{at}: series_id is {size} bytes long (UTF-8); the limit is {max_bytes} bytes (--max-series-id-bytes)"
        )


def check_batch(
    chunks: Sequence[Any],
    sizes: Sequence[int],
    values: np.ndarray,
    timestamps_ms: np.ndarray,
    last_ts: np.ndarray,
    counts: np.ndarray,
    flat_cov: np.ndarray,
    num_covariates: int,
    covariate_names: Sequence[str],
    max_ts: int,
) -> list[InvalidInput | None]:
    """Check B observations from several requests ("chunks", each with .index, .series_ids, .kind).

    values float32 [B], timestamps_ms int64 [B], last_ts int64 [B] (each series' previous
    timestamp, int64 min for new series), counts int64 [B] covariates per observation, flat_cov
    float32 [sum(counts)], max_ts the latest timestamp accepted (`max_timestamp_ms`). Returns,
    per chunk, None or the error for its first problem.
    """
    errors: list[InvalidInput | None] = [None] * len(chunks)
    blame = _blamer(chunks, sizes, errors)
    wanted = f"{num_covariates} ({', '.join(covariate_names)})" if num_covariates else "none"
    blame(counts != num_covariates, lambda r, _: f"{counts[r]} covariates given, the model takes {wanted}")
    blame(~np.isfinite(values), lambda r, _: f"value is {values[r]}; values must be finite numbers")
    bad_cov = ~np.isfinite(flat_cov)
    if bad_cov.any():
        cov_rows = np.repeat(np.arange(len(values)), counts)  # flat covariate -> its observation
        bad_rows = np.zeros(len(values), bool)
        bad_rows[cov_rows[bad_cov]] = True
        blame(bad_rows, lambda r, _: "covariates must be finite numbers")
    blame(
        (timestamps_ms < MIN_TIMESTAMP_MS) | (timestamps_ms > max_ts),
        lambda r, _: f"timestamp_ms {timestamps_ms[r]} is out of range; {_timestamp_range(max_ts)}",
    )
    blame(
        timestamps_ms <= last_ts,
        lambda r, _: (
            f"timestamp_ms {timestamps_ms[r]} is not after the series' previous observation at "
            f"{last_ts[r]}; timestamps must increase within a series (send reset=true to restart it)"
        ),
    )
    return errors


def _blamer(chunks: Sequence[Any], sizes: Sequence[int], errors: list[InvalidInput | None]) -> Callable:
    """blame(bad [B] bool, message(row, j)): each chunk's first bad observation becomes its error."""
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)

    def blame(bad: np.ndarray, message: Callable[[int, int], str]) -> None:
        if not bad.any():
            return
        for row in np.flatnonzero(bad).tolist():
            k = int(np.searchsorted(ends, row, side="right"))
            if errors[k] is None:
                j = row - int(starts[k])
                chunk = chunks[k]
                at = where(int(chunk.index[j]), chunk.series_ids[j], *_NAMES[chunk.kind])
                errors[k] = InvalidInput(f"{at}: {message(row, j)}")

    return blame


NOT_FINITE_FORECAST = (
    "the model's forecast is not finite: the values are far outside the range the model "
    "forecasts from (its lags reach back to earlier values too)"
)


def check_forecasts(chunks: Sequence[Any], sizes: Sequence[int], forecast: np.ndarray) -> list[InvalidInput | None]:
    """Per chunk, None or an error for its first step whose forecast [horizon, Q] has a non-finite
    number: finite but huge inputs (1e20, say) can overflow float32 inside the graph, and the
    server never answers with NaN or inf."""
    errors: list[InvalidInput | None] = [None] * len(chunks)
    if np.isfinite(forecast).all():  # the usual case: one pass over the batch
        return errors
    bad = ~np.isfinite(forecast.reshape(len(forecast), -1)).all(axis=1)
    _blamer(chunks, sizes, errors)(bad, lambda r, _: NOT_FINITE_FORECAST)
    return errors


def check_sequence_forecasts(forecast: np.ndarray, positions: Sequence[int], histories: Sequence[History]) -> None:
    """Unary forecasts [B, horizon, Q] of the histories at these request positions: an error
    naming the first whose forecast is not finite (see check_forecasts)."""
    if np.isfinite(forecast).all():
        return
    k = _first(~np.isfinite(forecast.reshape(len(forecast), -1)).all(axis=1))
    i = int(positions[k])
    raise InvalidInput(f"{where(i, histories[i].series_id, 'series')}: {NOT_FINITE_FORECAST}")


def check_history(h: History, index: int, num_covariates: int, max_id_bytes: int, max_ts: int) -> None:
    """One unary history: a series id of at most max_id_bytes, non-empty, aligned lengths,
    finite, increasing timestamps within [MIN_TIMESTAMP_MS, max_ts]."""
    at = where(index, h.series_id, "series")
    if not h.series_id:
        raise InvalidInput(f"series {index}: series_id is empty")
    check_series_id(h.series_id, max_id_bytes, at)
    t = len(h.values)
    if t == 0:
        raise InvalidInput(f"{at}: no values; a history needs at least one observation")
    if len(h.timestamps_ms) != t:
        raise InvalidInput(f"{at}: {len(h.timestamps_ms)} timestamps_ms for {t} values; they must match")
    if len(h.covariates) != t * num_covariates:
        raise InvalidInput(
            f"{at}: {len(h.covariates)} covariates for {t} steps; the model takes {num_covariates} per step "
            f"(row-major [T, C], {t * num_covariates} in all)"
        )
    if not np.isfinite(h.values).all():
        k = _first(~np.isfinite(h.values))
        raise InvalidInput(f"{at}: values[{k}] is {h.values[k]}; values must be finite numbers")
    if not np.isfinite(h.covariates).all():
        raise InvalidInput(f"{at}: covariates contain non-finite numbers")
    ts = h.timestamps_ms
    out_of_range = (ts < MIN_TIMESTAMP_MS) | (ts > max_ts)
    if out_of_range.any():
        k = _first(out_of_range)
        raise InvalidInput(f"{at}: timestamps_ms[{k}] = {ts[k]} is out of range; {_timestamp_range(max_ts)}")
    not_after = ts[1:] <= ts[:-1]  # not np.diff: a difference of two int64 timestamps can overflow
    if not_after.any():
        k = _first(not_after) + 1
        raise InvalidInput(
            f"{at}: timestamps_ms[{k}] = {ts[k]} is not after timestamps_ms[{k - 1}] = {ts[k - 1]}; "
            "timestamps must increase"
        )


def occurrence_waves(series_ids: Sequence[str]) -> list[list[int]] | None:
    """Split request positions so each series appears at most once per wave, in request order.

    A series sent twice in one request steps twice: its second observation must run after the
    first one's state is written, so it goes into the next wave. None when every id is distinct
    (the usual case: one wave of everything).
    """
    if len(set(series_ids)) == len(series_ids):
        return None
    seen: dict[str, int] = {}
    waves: list[list[int]] = []
    for i, sid in enumerate(series_ids):
        rank = seen.get(sid, 0)
        seen[sid] = rank + 1
        if rank == len(waves):
            waves.append([])
        waves[rank].append(i)
    return waves
