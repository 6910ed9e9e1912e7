"""Resumable series (CONTRACT §8) on real in-process servers: a series streamed with return_state
on one server resumes on another with the same model version and secret, and then forecasts
exactly what an uninterrupted run would; snapshots that are altered, signed with another secret,
from another model version, or sent where the series is live, are refused with a status that says
which. (tests/e2e/test_resume_cli.py does the same across server processes killed with SIGKILL.)"""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest

from serving.client import ForecastClient, observation
from serving.config import BatchConfig, RuntimeConfig, SecurityConfig
from tests.integration.test_server_cuda import cuda_really_active
from tests.serving_support import FREQ_MS, START_MS, OfflineModel, RunningServer, server_config

SECRET = b"integration-test-state-secret"


def config(model_dir, secret: bytes | None = SECRET, resident: str = "off"):
    """resident: "off" (host state arena), "on" (state kept as CPU OrtValues, the CUDA code path
    without a GPU) or "cuda" (the real thing)."""
    runtime = (
        RuntimeConfig(device="cuda") if resident == "cuda" else RuntimeConfig(device="cpu", resident_state=resident)
    )
    return replace(server_config(str(model_dir)), security=SecurityConfig(state_secret=secret), runtime=runtime)


def obs(series: str, t: int, **kw):
    return observation(series, START_MS + t * FREQ_MS, 5.0 + np.sin(t / 3.0) * 2 + (series == "b"), **kw)


def refusal(server: RunningServer, *observations) -> grpc.RpcError:
    with ForecastClient(server.target) as client, pytest.raises(grpc.RpcError) as err:
        list(client.stream([list(observations)]))
    return err.value


@pytest.fixture(scope="module")
def lstm(tiny_model_dir):
    return tiny_model_dir("lstm")


@pytest.mark.parametrize("resident", ["off", "on", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_series_resumes_on_another_server_as_if_never_interrupted(lstm, resident):
    if resident == "cuda" and not cuda_really_active(lstm):
        pytest.skip("CUDAExecutionProvider is not really active here")
    offline = OfflineModel(lstm)
    snapshots: dict[str, bytes] = {}
    with RunningServer(config(lstm, resident=resident)) as first, ForecastClient(first.target) as client:
        # Two series, one message each step; then one alone (the resident path's batch changes).
        batches = [[obs("a", t), obs("b", t)] for t in range(6)] + [[obs("a", 6)]]
        for forecasts in client.stream(batches, return_state=True):
            for f in forecasts:
                assert f.state  # every forecast carries its series' snapshot
                snapshots[f.series_id] = f.state
        assert first.metric("forecast_snapshots_returned_total") == 13
    for t in range(7):
        offline.step_one("a", START_MS + t * FREQ_MS, obs("a", t).value)
    for t in range(6):
        offline.step_one("b", START_MS + t * FREQ_MS, obs("b", t).value)

    with RunningServer(config(lstm, resident=resident)) as second, ForecastClient(second.target) as client:
        batches = [[obs("a", 7, resume_state=snapshots["a"]), obs("b", 6, resume_state=snapshots["b"])]]
        batches += [[obs("a", t), obs("b", t - 1)] for t in range(8, 12)]
        for forecasts in client.stream(batches):
            for f in forecasts:
                t = (f.timestamp_ms - START_MS) // FREQ_MS
                expected = offline.step_one(f.series_id, f.timestamp_ms, obs(f.series_id, t).value)
                np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, atol=1e-5, rtol=0)
                assert f.steps_seen == t + 1  # counted on from the snapshot
                assert not f.state  # not asked for
        assert second.metric("forecast_series_resumed_total") == 2


def test_refused_snapshots_say_why(lstm, tiny_model_dir):
    with RunningServer(config(lstm)) as server, ForecastClient(server.target) as client:
        (good,) = next(client.stream([[obs("a", 0)]], return_state=True))
        good = good.state

        altered = good[:40] + bytes([good[40] ^ 0xFF]) + good[41:]
        err = refusal(server, obs("a", 1, resume_state=altered))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "observation 0 (series 'a')" in err.details() and "bad signature" in err.details()

        err = refusal(server, obs("a", 1), obs("x", 1, resume_state=b"not a snapshot at all, just text here....."))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "observation 1 (series 'x')" in err.details() and "not a state snapshot" in err.details()

        err = refusal(server, obs("a", 1, resume_state=good[:10]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in err.details()

        # Live in this stream already: resume only where the series starts (first observation, or reset).
        err = refusal(server, obs("a", 1), obs("a", 2, resume_state=good))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "already live" in err.details()
        (restarted,) = next(client.stream([[obs("a", 1, resume_state=good, reset=True)]]))
        assert restarted.steps_seen == 2

        # The snapshot's last timestamp is restored too: going back is refused as ever.
        err = refusal(server, obs("a", 0, resume_state=good))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "increas" in err.details()

        assert server.metric("forecast_snapshot_refusals_total", reason="signature") == 1
        assert server.metric("forecast_snapshot_refusals_total", reason="garbage") == 1
        assert server.metric("forecast_snapshot_refusals_total", reason="series_live") == 1

    gru = tiny_model_dir("gru")
    with RunningServer(config(gru)) as other, ForecastClient(other.target) as client:
        version = client.info().version
        err = refusal(other, obs("a", 1, resume_state=good))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"version '{restarted.model_version}'" in err.details() and f"version '{version}'" in err.details()

    with RunningServer(config(lstm, secret=b"another-replicas-secret!")) as other:
        err = refusal(other, obs("a", 1, resume_state=good))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "another state secret" in err.details()


def test_without_a_secret_snapshots_are_refused_with_how_to_configure_one(lstm):
    with RunningServer(config(lstm, secret=None)) as server, ForecastClient(server.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            list(client.stream([[obs("a", 0)]], return_state=True))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--state-secret-file" in err.value.details() and "FORECAST_STATE_SECRET" in err.value.details()
        err = refusal(server, obs("a", 0, resume_state=b"anything"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert server.metric("forecast_snapshot_refusals_total", reason="no_secret") == 2
        (plain,) = next(client.stream([[obs("a", 0)]]))  # streaming without snapshots is unaffected
        assert plain.steps_seen == 1 and not plain.state


def test_snapshots_of_a_large_batch_split_into_several_ort_calls_on_the_executor(lstm):
    # 70 series in one message: past the rows run on the event loop (64), and in 9 ORT calls of at
    # most 8 rows, each call's state read before the next one runs.
    ids = [f"s{k:02d}" for k in range(70)]

    def message(t: int, snapshots: dict[str, bytes] | None = None):
        return [
            observation(s, START_MS + t * FREQ_MS, float(k) + t, resume_state=(snapshots or {}).get(s, b""))
            for k, s in enumerate(ids)
        ]

    small_batches = replace(config(lstm), batch=BatchConfig(max_batch_size=8))
    with RunningServer(small_batches) as first, ForecastClient(first.target) as client:
        snapshots = {f.series_id: f.state for fs in client.stream([message(0), message(1)], True) for f in fs}
    with RunningServer(config(lstm)) as second, ForecastClient(second.target) as client:
        (resumed,) = list(client.stream([message(2, snapshots)]))
    offline = OfflineModel(lstm)
    for k, (s, f) in enumerate(zip(ids, resumed)):
        for t in range(3):
            expected = offline.step_one(s, START_MS + t * FREQ_MS, float(k) + t)
        assert f.series_id == s and f.steps_seen == 3
        # rtol too: batches of 8 and of 1 round differently in float32 (a few ulps at values ~30).
        np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, atol=1e-5, rtol=1e-5)
