"""Bad input gets a clear gRPC status naming what and where; the stream beside it goes on, and
afterwards the server is still SERVING and still right."""

import queue
import re

import grpc
import numpy as np
import pytest

from tests.serving_support import (
    FREQ_MS,
    SERVING,
    START_MS,
    OfflineModel,
    ReflectionClient,
    health_status,
)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def client(channel):
    return ReflectionClient(channel)


class Bystander:
    """A healthy stream kept open next to the bad ones; each step is checked against ORT offline."""

    def __init__(self, client: ReflectionClient, model_dir) -> None:
        self.client, self.offline, self.t = client, OfflineModel(model_dir), 0
        self.requests: queue.Queue = queue.Queue()
        self.responses = client.calls["StreamForecast"](iter(self.requests.get, None), timeout=120)

    def step(self) -> None:
        ts, value = START_MS + self.t * FREQ_MS, 10.0 + self.t % 7
        self.requests.put(self.client.request([{"series_id": "calm", "timestamp_ms": ts, "value": value}]))
        (forecast,) = next(self.responses).forecasts
        self.t += 1
        assert forecast.steps_seen == self.t
        expected = self.offline.step_one("calm", ts, value)
        np.testing.assert_allclose([q.values for q in forecast.quantiles], expected.T, atol=1e-3)

    def close(self) -> None:
        self.requests.put(None)
        assert list(self.responses) == []


def obs(series_id="bad", t=0, value=1.0, **kw):
    return {"series_id": series_id, "timestamp_ms": START_MS + t * FREQ_MS, "value": value, **kw}


CASES = {
    "nan": (
        [[obs("ok"), obs(value=float("nan"))]],
        "INVALID_ARGUMENT",
        r"observation 1 \(series 'bad'\): value is nan",
    ),
    "inf": (
        [[obs(value=float("-inf"))]],
        "INVALID_ARGUMENT",
        r"observation 0 \(series 'bad'\): value is -inf",
    ),
    "empty id": ([[obs("ok"), obs("ok2"), obs("")]], "INVALID_ARGUMENT", "observation 2: series_id is empty"),
    "time goes back": (
        [[obs(t=5)], [obs("ok", t=0), obs(t=3)]],
        "INVALID_ARGUMENT",
        r"observation 1 \(series 'bad'\): timestamp_ms \d+ is not after the series' previous observation",
    ),
    "covariates the model lacks": (
        [[obs(covariates=[20.5])]],
        "INVALID_ARGUMENT",
        r"observation 0 \(series 'bad'\): 1 covariates given, the model takes none",
    ),
    "a value the model overflows on": (
        [[obs("ok"), obs(value=1e20)]],
        "INVALID_ARGUMENT",
        r"observation 1 \(series 'bad'\): the model's forecast is not finite",
    ),
    "a timestamp whose forecast times leave int64": (
        [[obs(timestamp_ms=2**63 - 1)]],
        "INVALID_ARGUMENT",
        r"observation 0 \(series 'bad'\): timestamp_ms 9223372036854775807 is out of range",
    ),
    "unknown model": (
        [[obs()]],
        "NOT_FOUND",
        "unknown model 'nope': this server serves 'forecaster'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_the_stream_beside_it_goes_on(case, client, model_dir, channel):
    messages, code, message = CASES[case]
    bystander = Bystander(client, model_dir)
    bystander.step()
    requests = [client.request(m) for m in messages]
    if case == "unknown model":
        requests[0].model = "nope"
    with pytest.raises(grpc.RpcError) as err:
        list(client.calls["StreamForecast"](iter(requests), timeout=30))
    assert err.value.code().name == code
    assert re.search(message, err.value.details()), err.value.details()
    assert "Traceback" not in err.value.details()
    bystander.step()
    bystander.step()
    bystander.close()
    assert health_status(channel) == SERVING


def test_oversized_message_gets_resource_exhausted(client, model_dir, channel):
    bystander = Bystander(client, model_dir)
    bystander.step()
    huge = client.request([obs("x" * (20 << 20))])  # a 20 MB message; the limit is 4 MB
    with pytest.raises(grpc.RpcError) as err:
        list(client.calls["StreamForecast"](iter([huge]), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()
    bystander.step()
    bystander.close()
    assert health_status(channel) == SERVING


def test_unary_errors_name_the_history(client):
    history = client.messages["SeriesHistory"]
    bad = [
        history(series_id="fine", timestamps_ms=[START_MS], values=[1.0]),
        history(series_id="h", timestamps_ms=[START_MS, START_MS], values=[1.0, 2.0]),
    ]
    with pytest.raises(grpc.RpcError) as err:
        client.calls["Forecast"](client.messages["ForecastRequest"](series=bad), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "series 1 (series 'h'): timestamps_ms[1]" in err.value.details()


def test_after_all_that_the_server_is_serving_and_correct(client, model_dir, channel):
    assert health_status(channel) == SERVING
    assert health_status(channel, "") == SERVING
    bystander = Bystander(client, model_dir)
    for _ in range(3):
        bystander.step()
    bystander.close()


@pytest.mark.parametrize("method", ["StreamForecast", "Forecast", "GetModelInfo"])
def test_bytes_that_are_not_a_request_get_invalid_argument(method, client, model_dir, channel):
    # A truncated field, then a series id that is not UTF-8: grpcio itself answers UNKNOWN (unary)
    # or hands the handler a DecodeError (streams) for these.
    bystander = Bystander(client, model_dir)
    bystander.step()
    path = f"/forecast.v1.Forecaster/{method}"
    for data in (b"\x0a\x05abc", b"\x0a\x03\x0a\x01\xff"):
        with pytest.raises(grpc.RpcError) as err:
            if method == "StreamForecast":
                list(channel.stream_stream(path, lambda b: b, lambda b: b)(iter([data]), timeout=30))
            else:
                channel.unary_unary(path, lambda b: b, lambda b: b)(data, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("cannot parse the request as forecast.v1.")
    bystander.step()
    bystander.close()
    assert health_status(channel) == SERVING
