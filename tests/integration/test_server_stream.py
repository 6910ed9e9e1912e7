"""A real server on port 0 with a real tiny model: streamed and unary forecasts equal what the
exported graphs give offline, for a client that knows the API only from server reflection."""

import math

import grpc
import numpy as np
import pytest

from tests.serving_support import (
    FREQ_MS,
    START_MS,
    OfflineModel,
    ReflectionClient,
)


@pytest.fixture
def client(server):
    with grpc.insecure_channel(server.target) as channel:
        yield ReflectionClient(channel)


def level(series: str, t: int) -> float:
    base = {"a": 10.0, "b": 25.0}.get(series, 5.0)
    return base * (1 + 0.3 * math.sin(2 * math.pi * t / 48))


def assert_forecast(message, expected: np.ndarray, quantiles, ts: int) -> None:
    horizon = expected.shape[0]
    assert list(message.forecast_timestamps_ms) == [ts + k * FREQ_MS for k in range(1, horizon + 1)]
    median = quantiles.index(0.5)
    np.testing.assert_allclose(message.point, expected[:, median], atol=1e-3, rtol=1e-5)
    assert [round(q.quantile, 6) for q in message.quantiles] == quantiles
    for j, q in enumerate(message.quantiles):
        np.testing.assert_allclose(q.values, expected[:, j], atol=1e-3, rtol=1e-5)


def test_two_interleaved_series_match_the_offline_step_graph(client, model_dir):
    offline = OfflineModel(model_dir)
    # Messages carry both series; one message carries each of them twice (second steps must
    # follow the first's state), so request order = the order a series' steps are applied.
    plan = [[("a", 0), ("b", 0)], [("b", 1), ("a", 1)], [("a", 2), ("b", 2), ("a", 3), ("b", 3)], [("a", 4)]]
    requests = [
        client.request([{"series_id": s, "timestamp_ms": START_MS + t * FREQ_MS, "value": level(s, t)} for s, t in msg])
        for msg in plan
    ]
    responses = list(client.calls["StreamForecast"](iter(requests), timeout=30))
    assert len(responses) == len(plan)
    seen = {"a": 0, "b": 0}
    for msg, response in zip(plan, responses):
        assert [f.series_id for f in response.forecasts] == [s for s, _ in msg]
        for (s, t), f in zip(msg, response.forecasts):
            ts = START_MS + t * FREQ_MS
            seen[s] += 1
            assert f.timestamp_ms == ts and f.steps_seen == seen[s]
            assert f.model_version.startswith("local-")
            assert_forecast(f, offline.step_one(s, ts, level(s, t)), offline.quantiles, ts)


def test_reset_and_end_start_a_series_afresh(client, model_dir):
    offline = OfflineModel(model_dir)

    def obs(t, **kw):
        return {
            "series_id": "r",
            "timestamp_ms": START_MS + t * FREQ_MS,
            "value": level("r", t),
            **kw,
        }

    requests = [
        client.request([obs(0), obs(1)]),
        client.request([obs(0, reset=True)]),  # back in time is fine with reset: a new series
        client.request([obs(1, end=True), obs(0)]),  # after end, the same id is a new series
    ]
    responses = list(client.calls["StreamForecast"](iter(requests), timeout=30))
    steps = [[f.steps_seen for f in r.forecasts] for r in responses]
    assert steps == [[1, 2], [1], [2, 1]]
    offline.step_one("fresh", START_MS, level("r", 0))
    expected = offline.step_one("fresh", START_MS + FREQ_MS, level("r", 1))
    assert_forecast(responses[2].forecasts[0], expected, offline.quantiles, START_MS + FREQ_MS)
    first = OfflineModel(model_dir).step_one("x", START_MS, level("r", 0))
    assert_forecast(responses[2].forecasts[1], first, offline.quantiles, START_MS)


def test_one_observation_requests_follow_the_same_rules(client, model_dir):
    """Requests of one observation take their own path in the server (serving.sessions)."""
    offline = OfflineModel(model_dir)

    def obs(t, **kw):
        return {"series_id": "one", "timestamp_ms": START_MS + t * FREQ_MS, "value": level("one", t), **kw}

    requests = [
        client.request([obs(0)]),
        client.request([obs(1)]),
        client.request([obs(0, reset=True)]),
        client.request([obs(1, end=True)]),
        client.request([obs(0)]),  # after end: a new series, so going back in time is fine
        client.request([obs(0)]),  # but not within a series
    ]
    call = client.calls["StreamForecast"](iter(requests), timeout=30)
    responses = []
    with pytest.raises(grpc.RpcError) as refused:
        for response in call:
            responses.append(response)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "observation 0 (series 'one')" in refused.value.details()
    assert [[f.steps_seen for f in r.forecasts] for r in responses] == [[1], [2], [1], [2], [1]]
    for t, r in zip([0, 1], responses):
        assert_forecast(
            r.forecasts[0],
            offline.step_one("a", START_MS + t * FREQ_MS, level("one", t)),
            offline.quantiles,
            START_MS + t * FREQ_MS,
        )
    first = OfflineModel(model_dir).step_one("b", START_MS, level("one", 0))
    for r in (responses[2], responses[4]):
        assert_forecast(r.forecasts[0], first, offline.quantiles, START_MS)


def test_unary_forecast_equals_the_offline_sequence_graph(client, model_dir):
    offline = OfflineModel(model_dir)
    lengths = {"long": 60, "short": 7, "same-a": 30, "same-b": 30}  # equal lengths run together
    history = client.messages["SeriesHistory"]
    series = [
        history(
            series_id=s,
            timestamps_ms=[START_MS + t * FREQ_MS for t in range(n)],
            values=[level(s, t) for t in range(n)],
        )
        for s, n in lengths.items()
    ]
    response = client.calls["Forecast"](client.messages["ForecastRequest"](series=series), timeout=30)
    assert [f.series_id for f in response.forecasts] == list(lengths)
    for h, f in zip(series, response.forecasts):
        expected = offline.run_sequence(list(h.timestamps_ms), list(h.values))
        assert f.steps_seen == len(h.values) and f.timestamp_ms == h.timestamps_ms[-1]
        assert_forecast(f, expected, offline.quantiles, h.timestamps_ms[-1])


def test_model_info_reports_the_model_and_the_real_provider(client, model_dir):
    info = client.calls["GetModelInfo"](client.messages["GetModelInfoRequest"](), timeout=10)
    offline = OfflineModel(model_dir)
    assert (info.name, info.cell, info.num_layers, info.hidden_size) == ("forecaster", "lstm", 2, 16)
    assert list(info.state) == offline.state_names == ["h", "c", "lags", "lags_seen"]
    assert list(info.lags) == [12, 48] and info.season == 48
    assert info.point_quantile == pytest.approx(0.5)
    # h and c [2, B, 16], the lag buffer [B, 48] and its count [B, 1], float32: what one series costs
    assert info.state_bytes_per_series == 4 * (2 * 2 * 16 + 48 + 1)
    assert info.freq_ms == FREQ_MS and list(info.covariates) == []
    assert [round(q, 6) for q in info.quantiles] == offline.quantiles
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.horizon == offline.step.get_outputs()[0].shape[1]


def test_metrics_count_what_was_served(server, client):
    requests = [client.request([{"series_id": "m", "timestamp_ms": START_MS, "value": 1.0, "end": True}])]
    list(client.calls["StreamForecast"](iter(requests), timeout=10))
    text = server.metrics_text()
    assert server.metric("forecast_observations_total", rpc="StreamForecast", protocol="forecast.v1") >= 1
    assert "forecast_batch_size_bucket" in text
    assert 'forecast_model_info{name="forecaster",provider="CPUExecutionProvider"' in text
    assert server.metric("forecast_state_bytes") > 0


def test_large_requests_sent_back_to_back_keep_each_series_in_order(client, model_dir):
    # 40 series per message (large enough to be pipelined: parsed and queued while the previous
    # message runs), all messages sent before any answer is read.
    offline = OfflineModel(model_dir)
    series = [f"p{i}" for i in range(40)]
    requests = [
        client.request(
            [
                {"series_id": s, "timestamp_ms": START_MS + t * FREQ_MS, "value": level(s, t) + i}
                for i, s in enumerate(series)
            ]
        )
        for t in range(6)
    ]
    responses = list(client.calls["StreamForecast"](iter(requests), timeout=60))
    for t, response in enumerate(responses):
        assert [f.steps_seen for f in response.forecasts] == [t + 1] * len(series)
        for i, (s, f) in enumerate(zip(series, response.forecasts)):
            expected = offline.step_one(s, START_MS + t * FREQ_MS, level(s, t) + i)
            np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, atol=1e-3)


def test_end_and_reset_between_requests_queued_back_to_back(client, model_dir):
    # Every request is queued before the previous one is answered (the session submits each
    # request's steps as soon as it is parsed): a series ended in one request must start afresh
    # in the next, a reset must not disturb the step queued before it, and neighbours carry on.
    offline, fresh = OfflineModel(model_dir), OfflineModel(model_dir)
    series = [f"q{i}" for i in range(40)]  # above the inline size: ORT runs on the executor thread

    def obs(s, t, **kw):
        return {"series_id": s, "timestamp_ms": START_MS + t * FREQ_MS, "value": level(s, t), **kw}

    plan = [
        [obs(s, 0) for s in series],
        [],  # an empty request gets an empty answer, in its place
        [obs(s, 1, end=s == "q0") for s in series],
        [obs(s, 2) if s != "q0" else obs(s, 0) for s in series],  # q0 again: a new series
        [obs(s, 3, reset=s == "q1") if s != "q0" else obs(s, 1) for s in series],  # q1 restarts at t=3
    ]
    responses = list(client.calls["StreamForecast"](iter(client.request(p) for p in plan), timeout=60))
    assert len(responses) == len(plan) and not responses.pop(1).forecasts
    steps = [{f.series_id: f.steps_seen for f in r.forecasts} for r in responses]
    assert [s["q0"] for s in steps] == [1, 2, 1, 2]
    assert [s["q1"] for s in steps] == [1, 2, 3, 1]
    assert [s["q2"] for s in steps] == [1, 2, 3, 4]
    for t in range(4):
        for f in responses[t].forecasts:
            s = f.series_id
            if s == "q0" and t >= 2:
                expected = fresh.step_one("q0-again", START_MS + (t - 2) * FREQ_MS, level(s, t - 2))
            elif s == "q1" and t == 3:
                expected = fresh.step_one("q1-again", START_MS + 3 * FREQ_MS, level(s, 3))
            else:
                expected = offline.step_one(s, START_MS + t * FREQ_MS, level(s, t))
            np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, atol=1e-3, err_msg=f"{s} t={t}")
