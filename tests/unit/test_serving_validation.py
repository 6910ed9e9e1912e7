"""Request checks: each error says what was wrong and where (index, series id)."""

import numpy as np
import pytest

from serving import validation
from serving.domain import History, Observations
from serving.errors import InvalidInput


def obs(ids, values=None, counts=None, cov=None):
    n = len(ids)
    return Observations(
        series_ids=list(ids),
        timestamps_ms=np.arange(n, dtype=np.int64),
        values=np.array(values if values is not None else [1.0] * n, np.float32),
        covariates=np.array(cov or [], np.float32),
        covariate_counts=np.array(counts or [0] * n, np.int64),
        reset=np.zeros(n, bool),
        end=np.zeros(n, bool),
    )


@pytest.mark.parametrize(
    ("request_obs", "message"),
    [
        (obs(["a", "b", "c"], values=[1, np.nan, 2]), r"observation 1 \(series 'b'\): value is nan"),
        (obs(["a", "b"], values=[np.inf, 1]), r"observation 0 \(series 'a'\): value is inf"),
        (obs(["a", ""]), "observation 1: series_id is empty"),
        (
            obs(["a", "b"], counts=[1, 1], cov=[0.0, np.nan]),
            r"observation 1 \(series 'b'\): covariates contain nan",
        ),
    ],
)
def test_bad_observations_are_named(request_obs, message):
    with pytest.raises(InvalidInput, match=message):
        validation.check_observations(request_obs)


def test_covariate_count_must_match_the_model():
    o = obs(["a", "b"], counts=[2, 1], cov=[1, 2, 3])
    validation.check_covariate_counts(o.covariate_counts, np.array([0]), o.series_ids, 2, ("t", "w"))
    with pytest.raises(
        InvalidInput, match=r"observation 1 \(series 'b'\): 1 covariates given, the model takes 2"
    ):
        validation.check_covariate_counts(o.covariate_counts, np.array([0, 1]), o.series_ids, 2, ("t", "w"))
    with pytest.raises(InvalidInput, match="the model has no covariates"):
        validation.check_covariate_counts(o.covariate_counts, np.array([0]), o.series_ids, 0, ())


def test_timestamps_must_increase_within_a_series():
    ts = np.array([10, 20, 30], np.int64)
    validation.check_increasing(ts, np.array([5, 19]), np.array([0, 1]), ["a", "b", "c"])
    with pytest.raises(
        InvalidInput, match=r"observation 2 \(series 'c'\): timestamp_ms 30 is not after .* 30"
    ):
        validation.check_increasing(ts, np.array([5, 30]), np.array([0, 2]), ["a", "b", "c"])


def test_occurrence_waves_keep_request_order_per_series():
    assert [w.tolist() for w in validation.occurrence_waves(["a", "b", "c"])] == [[0, 1, 2]]
    waves = validation.occurrence_waves(["a", "b", "a", "a", "c", "b"])
    assert [w.tolist() for w in waves] == [[0, 1, 4], [2, 5], [3]]


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
