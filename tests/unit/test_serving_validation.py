"""Request checks: each error says what was wrong and where (request index, series id), and in a
batch shared by several requests only the request at fault is refused."""

from types import SimpleNamespace

import numpy as np
import pytest

from serving import validation
from serving.domain import History
from serving.errors import InvalidInput


def chunk(ids, positions=None):
    return SimpleNamespace(series_ids=ids, index=np.array(positions or range(len(ids))))


def check(chunks, values, ts, last_ts, covariates, c=0, names=()):
    sizes = [len(ch.series_ids) for ch in chunks]
    counts = np.array([len(r) for r in covariates], np.int64)
    flat = np.array([v for r in covariates for v in r], np.float32)
    errors = validation.check_batch(
        chunks, sizes, np.array(values, np.float32), np.array(ts, np.int64), np.array(last_ts, np.int64),
        counts, flat, c, names,
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


def test_empty_series_id():
    validation.check_series_ids(["a", "b"])
    with pytest.raises(InvalidInput, match="observation 1: series_id is empty"):
        validation.check_series_ids(["a", "", "c"])


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
    ],
)
def test_bad_histories_are_named(h, c, message):
    with pytest.raises(InvalidInput, match=message):
        validation.check_history(h, 3, c)
