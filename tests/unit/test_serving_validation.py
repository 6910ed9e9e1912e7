"""Request checks: each error says what was wrong and where (request index, series id), and in a
batch shared by several requests only the request at fault is refused."""

from types import SimpleNamespace

import numpy as np
import pytest

from serving import validation
from serving.domain import History
from serving.errors import InvalidInput, SeriesIdTooLong


def chunk(ids, positions=None):
    return SimpleNamespace(series_ids=ids, index=np.array(positions or range(len(ids))), kind="stream")


I64 = np.iinfo(np.int64)
MAX_TS = validation.max_timestamp_ms(horizon=48, freq_ms=1_800_000)


def check(chunks, values, ts, last_ts, covariates, c=0, names=()):
    sizes = [len(ch.series_ids) for ch in chunks]
    counts = np.array([len(r) for r in covariates], np.int64)
    flat = np.array([v for r in covariates for v in r], np.float32)
    errors = validation.check_batch(
        chunks, sizes, np.array(values, np.float32), np.array(ts, np.int64), np.array(last_ts, np.int64),
        counts, flat, c, names, MAX_TS,
    )  # fmt: skip
    return [None if e is None else str(e) for e in errors]


def test_each_problem_is_blamed_on_its_own_request():
    chunks = [chunk(["a", "b"]), chunk(["c"]), chunk(["d", "e"], [3, 7]), chunk(["f"])]
    errors = check(
        chunks,
        values=[1, np.nan, 2, 3, 4, 5],
        ts=[10, 10, 10, 10, 5, 10],
        last_ts=[0, 0, 0, 0, 5, 0],
        covariates=[[], [], [], [], [], [1.0]],
    )
    assert errors[0] == "observation 1 (series 'b'): value is nan; values must be finite numbers"
    assert errors[1] is None
    assert errors[2].startswith("observation 7 (series 'e'): timestamp_ms 5 is not after the series' previous")
    assert errors[3] == "observation 0 (series 'f'): 1 covariates given, the model takes none"


def test_covariates_count_and_finiteness():
    chunks = [chunk(["a", "b"]), chunk(["c"])]
    errors = check(chunks, [1, 1, 1], [1, 1, 1], [0, 0, 0], [[1, 2], [1, np.inf], [1]], c=2, names=("t", "w"))
    assert errors == [
        "observation 1 (series 'b'): covariates must be finite numbers",
        "observation 0 (series 'c'): 1 covariates given, the model takes 2 (t, w)",
    ]


def test_timestamps_whose_forecast_times_leave_int64_are_refused():
    # A new series' previous timestamp is int64 min: that value itself is out of range, not "not after" it.
    chunks = [chunk(["a"]), chunk(["b"]), chunk(["c"])]
    errors = check(chunks, [1, 1, 1], [I64.min, MAX_TS + 1, MAX_TS], [I64.min] * 3, [[], [], []])
    assert errors[0] == (
        f"observation 0 (series 'a'): timestamp_ms {I64.min} is out of range; timestamps must be in "
        f"[{I64.min + 1}, {MAX_TS}] ms, so that the forecast times fit in int64"
    )
    assert errors[1].startswith(f"observation 0 (series 'b'): timestamp_ms {MAX_TS + 1} is out of range")
    assert errors[2] is None
    assert I64.max == MAX_TS + 48 * 1_800_000


def test_a_non_finite_forecast_refuses_its_request_only():
    chunks = [chunk(["a", "b"]), chunk(["c"]), chunk(["d"], [4])]
    forecast = np.ones((4, 6, 3), np.float32)
    assert validation.check_forecasts(chunks, [2, 1, 1], forecast) == [None, None, None]
    forecast[1, 5, 2], forecast[3, 0, 0] = np.inf, np.nan
    errors = validation.check_forecasts(chunks, [2, 1, 1], forecast)
    assert str(errors[0]).startswith("observation 1 (series 'b'): the model's forecast is not finite")
    assert errors[1] is None
    assert str(errors[2]).startswith("observation 4 (series 'd'): the model's forecast is not finite")


def test_empty_series_id():
    validation.check_series_ids(["a", "b"])
    with pytest.raises(InvalidInput, match="observation 1: series_id is empty"):
        validation.check_series_ids(["a", "", "c"])


@pytest.mark.parametrize("ids", [["a" * 256], ["é" * 128], ["€" * 85, "b"], ["𝄞" * 64]])  # 256, 256, 255, 256 bytes
def test_series_ids_up_to_the_limit_in_utf8_bytes_pass(ids):
    validation.check_series_id_lengths(ids, 256, range(len(ids)))


@pytest.mark.parametrize(
    ("ids", "index", "size"),
    [
        (["a", "b" * 257], 1, 257),
        (["é" * 129], 0, 258),  # 129 characters, 258 bytes
        (["x", "y", "𝄞" * 65], 2, 260),  # 65 characters of 4 bytes
        (["c" * 5000, "d" * 300], 0, 5000),  # the first one named
    ],
)
def test_series_ids_over_the_limit_are_refused_naming_it(ids, index, size):
    with pytest.raises(SeriesIdTooLong) as err:
        validation.check_series_id_lengths(ids, 256, [10 + i for i in range(len(ids))])  # positions in the request
    message = str(err.value)
    assert message.startswith(f"observation {10 + index} (series {ids[index][:40]!r}... ({size} bytes)): ")
    assert message.endswith(f"series_id is {size} bytes long (UTF-8); the limit is 256 bytes (--max-series-id-bytes)")
    assert isinstance(err.value, InvalidInput) and err.value.limit == "max_series_id_bytes"


def test_a_history_with_a_long_series_id_is_refused():
    h = History("s" * 300, np.array([1], np.int64), np.array([1.0], np.float32), np.array([], np.float32))
    with pytest.raises(SeriesIdTooLong, match=r"series 4 \(series 'sss.*\(300 bytes\)\): series_id is 300 bytes"):
        validation.check_history(h, 4, 0, 256, MAX_TS)


def test_occurrence_waves_keep_request_order_per_series():
    assert validation.occurrence_waves(["a", "b", "c"]) is None
    assert validation.occurrence_waves(["a", "b", "a", "a", "c", "b"]) == [[0, 1, 4], [2, 5], [3]]


def history(values, ts=None, cov=()):
    n = len(values)
    return History(
        "s",
        np.array(ts if ts is not None else range(n), np.int64),
        np.array(values, np.float32),
        np.array(cov, np.float32),
    )


@pytest.mark.parametrize(
    ("h", "c", "message"),
    [
        (history([]), 0, "no values"),
        (history([1, 2], ts=[1]), 0, "1 timestamps_ms for 2 values"),
        (history([1, 2], cov=[1.0]), 1, "1 covariates for 2 steps"),
        (history([1, np.nan]), 0, r"values\[1\] is nan"),
        (history([1, 2, 3], ts=[1, 5, 5]), 0, r"timestamps_ms\[2\] = 5 is not after timestamps_ms\[1\] = 5"),
        # Going back by more than int64 holds: np.diff would wrap around to a positive step.
        (history([1, 2], ts=[5 * 10**18, -5 * 10**18]), 0, r"timestamps_ms\[1\] = -5000000000000000000 is not after"),
        (history([1, 2], ts=[0, MAX_TS + 1]), 0, rf"timestamps_ms\[1\] = {MAX_TS + 1} is out of range"),
        (history([1], ts=[I64.min]), 0, rf"timestamps_ms\[0\] = {I64.min} is out of range"),
    ],
)
def test_bad_histories_are_named(h, c, message):
    with pytest.raises(InvalidInput, match=message):
        validation.check_history(h, 3, c, 256, MAX_TS)


def test_a_history_ending_at_the_latest_timestamp_passes():
    validation.check_history(history([1, 2], ts=[I64.min + 1, MAX_TS]), 0, 0, 256, MAX_TS)
