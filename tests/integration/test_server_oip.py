"""The Open Inference Protocol on a real server, with tritonclient's own client classes: health,
metadata and config; stateless inference equals one run of the sequence graph; sequences on a
stream, interleaved, with an int and a string id, equal the step graph at every step and live on
across streams and unary calls; errors inside a stream leave it open; the REST binding."""

import json
import queue
import urllib.error
import urllib.request
from dataclasses import replace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.config import BatchConfig, SecurityConfig
from serving.proto import pb_grpc
from serving.security import UNAUTHENTICATED_MESSAGE
from tests.serving_support import (
    FREQ_MS,
    SERVING,
    START_MS,
    OfflineModel,
    RunningServer,
    Stream,
    health_status,
    server_config,
    wait_for,
)

MODEL = "forecaster"


@pytest.fixture(scope="module")
def oip_server(model_dir):
    with RunningServer(replace(server_config(str(model_dir), idle_timeout_s=600), http_port=0)) as s:
        yield s


@pytest.fixture(scope="module")
def client(oip_server):
    with triton.InferenceServerClient(oip_server.target) as c:
        yield c


def level(t: int, base: float = 10.0) -> float:
    return base * (1 + 0.3 * np.sin(2 * np.pi * t / 48))


def inputs(values: np.ndarray, stamps: np.ndarray) -> list:
    """values float32 [B, T] and timestamps_ms int64 [B, T] as tritonclient inputs."""
    v = triton.InferInput("values", list(values.shape), "FP32")
    v.set_data_from_numpy(values.astype(np.float32))
    ts = triton.InferInput("timestamps_ms", list(stamps.shape), "INT64")
    ts.set_data_from_numpy(stamps.astype(np.int64))
    return [v, ts]


def one_step(t: int, base: float) -> list:
    return inputs(np.array([[level(t, base)]]), np.array([[START_MS + t * FREQ_MS]]))


def test_health_metadata_and_config(client, oip_server, model_dir):
    offline = OfflineModel(model_dir)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    version = client.get_model_metadata(MODEL).versions[0]
    assert version.startswith("local-") and client.is_model_ready(MODEL, version)
    assert not client.is_model_ready(MODEL, "7") and not client.is_model_ready("another")
    with grpc.insecure_channel(oip_server.target) as channel:
        assert health_status(channel, "inference.GRPCInferenceService") == SERVING
        # Reflection describes the service under its canonical file name (from its own pool).
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        asks = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        ]
        listed, found = reflection.ServerReflectionInfo(iter(asks), timeout=10)
        assert {"inference.GRPCInferenceService", "forecast.v1.Forecaster"} <= {
            s.name for s in listed.list_services_response.service
        }
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(f)
            for f in found.file_descriptor_response.file_descriptor_proto
        ]
        assert "inference/grpc_service.proto" in {f.name for f in files}

    meta = client.get_model_metadata(MODEL)
    assert (meta.name, meta.platform) == (MODEL, "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("values", "FP32", [-1, -1]),
        ("timestamps_ms", "INT64", [-1, -1]),
    ]
    horizon, q = offline.step.get_outputs()[0].shape[1], len(offline.quantiles)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("forecast", "FP32", [-1, horizon, q])]

    config = client.get_model_config(MODEL).config
    assert (config.platform, config.max_batch_size) == ("onnxruntime_onnx", 1024)
    assert [(i.name, list(i.dims)) for i in config.input] == [("values", [-1]), ("timestamps_ms", [-1])]
    assert list(config.output[0].dims) == [horizon, q]
    assert config.sequence_batching.max_sequence_idle_microseconds == 600_000_000
    assert [s.input_name for s in config.sequence_batching.state] == offline.state_names
    assert "sequence" in client.get_server_metadata().extensions

    with pytest.raises(InferenceServerException) as err:
        client.get_inference_statistics(MODEL)
    assert err.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "ModelStatistics is not implemented by this server; it serves ServerLive" in err.value.message()


def test_stateless_infer_equals_one_run_of_the_sequence_graph(client, model_dir, oip_server):
    offline = OfflineModel(model_dir)
    t = np.arange(40)
    values = np.stack([level(t), level(t, 25.0)])  # [2, 40]
    stamps = np.stack([START_MS + t * FREQ_MS] * 2)
    result = client.infer(
        MODEL, inputs(values, stamps), request_id="r-1", outputs=[triton.InferRequestedOutput("forecast")]
    )
    forecast = result.as_numpy("forecast")
    assert result.get_response().id == "r-1"
    assert forecast.shape == (2, *offline.run_sequence(list(stamps[0]), list(values[0])).shape)
    for b in range(2):
        np.testing.assert_allclose(forecast[b], offline.run_sequence(list(stamps[b]), list(values[b])), atol=1e-4)

    # Typed contents instead of raw bytes, through tritonclient's generated stub: the same answer.
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed")
    for name, datatype, data in (("values", "FP32", values), ("timestamps_ms", "INT64", stamps)):
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(data.shape))
        field = tensor.contents.fp32_contents if datatype == "FP32" else tensor.contents.int64_contents
        field.extend(data.ravel().tolist())
    with grpc.insecure_channel(oip_server.target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    typed = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(forecast.shape)
    np.testing.assert_allclose(typed, forecast, atol=1e-6)


def test_one_stream_two_interleaved_sequences_match_the_step_graph(client, model_dir):
    """An int id and a string id on one stream, one step per request, interleaved; then a stray
    request for an unknown sequence is answered with an error and the stream goes on."""
    offline = OfflineModel(model_dir)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        plan = [(7, "int-7", 10.0), ("meter-b", "str-b", 25.0)]
        steps = 6
        for t in range(steps):
            for sequence_id, key, base in plan:
                client.async_stream_infer(
                    MODEL, one_step(t, base), request_id=f"{key}-{t}", sequence_id=sequence_id,
                    sequence_start=t == 0, sequence_end=t == steps - 1,
                )  # fmt: skip
        for t in range(steps):
            for _, key, base in plan:
                result, error = answers.get(timeout=30)
                assert error is None, error
                assert result.get_response().id == f"{key}-{t}"
                expected = offline.step_one(key, START_MS + t * FREQ_MS, level(t, base))
                np.testing.assert_allclose(result.as_numpy("forecast")[0], expected, atol=1e-3)

        client.async_stream_infer(MODEL, one_step(9, 10.0), request_id="stray", sequence_id=7)  # 7 has ended
        result, error = answers.get(timeout=30)
        assert result is None
        assert "request 'stray': sequence 7 is not live" in error.message()
        assert "sequence_start" in error.message()
        client.async_stream_infer(MODEL, one_step(0, 5.0), request_id="after", sequence_id=8, sequence_start=True)
        result, error = answers.get(timeout=30)
        assert error is None and result.get_response().id == "after"
        np.testing.assert_allclose(
            result.as_numpy("forecast")[0], OfflineModel(model_dir).step_one("x", START_MS, level(0, 5.0)), atol=1e-3
        )
    finally:
        client.stop_stream()


def test_a_sequence_outlives_its_stream_and_unary_calls_continue_it(client, model_dir, oip_server):
    offline = OfflineModel(model_dir)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer(MODEL, one_step(0, 4.0), sequence_id="long-lived", sequence_start=True)
    assert answers.get(timeout=30)[1] is None
    client.stop_stream()
    offline.step_one("s", START_MS, level(0, 4.0))
    # Three steps in one request (B = 1, T = 3), unary: they continue the sequence in order.
    t = np.arange(1, 4)
    values, stamps = np.array([level(t, 4.0)]), np.array([START_MS + t * FREQ_MS])
    result = client.infer(MODEL, inputs(values, stamps), sequence_id="long-lived")
    for k in t:
        expected = offline.step_one("s", START_MS + int(k) * FREQ_MS, level(int(k), 4.0))
    np.testing.assert_allclose(result.as_numpy("forecast")[0], expected, atol=1e-3)
    assert oip_server.metric("forecast_live_sequences") >= 1

    result = client.infer(MODEL, one_step(4, 4.0), sequence_id="long-lived", sequence_end=True)
    np.testing.assert_allclose(
        result.as_numpy("forecast")[0], offline.step_one("s", START_MS + 4 * FREQ_MS, level(4, 4.0)), atol=1e-3
    )
    with pytest.raises(InferenceServerException) as err:  # ended: unknown without sequence_start
        client.infer(MODEL, one_step(5, 4.0), sequence_id="long-lived")
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "sequence 'long-lived' is not live" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, one_step(0, 4.0), model_version="41")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "has no version '41' served here" in err.value.message()
    with pytest.raises(InferenceServerException) as err:  # B = 2 with a sequence
        client.infer(MODEL, inputs(np.ones((2, 1)), np.full((2, 1), START_MS)), sequence_id=3, sequence_start=True)
    assert "one row (B = 1)" in err.value.message()
    counted = oip_server.metric("forecast_observations_total", rpc="ModelStreamInfer", protocol="oip-grpc")
    assert counted >= 1


def test_the_rest_binding_answers_curl_style_json(oip_server, model_dir):
    offline = OfflineModel(model_dir)
    base = f"http://127.0.0.1:{oip_server.server.http_port}"

    def call(path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert call("/v2/health/live") == (200, {"live": True})
    assert call("/v2/health/ready") == (200, {"ready": True})
    assert call(f"/v2/models/{MODEL}/ready") == (200, {"name": MODEL, "ready": True})
    status, meta = call(f"/v2/models/{MODEL}")
    assert status == 200 and [i["name"] for i in meta["inputs"]] == ["values", "timestamps_ms"]

    t = list(range(12))
    stamps, values = [START_MS + k * FREQ_MS for k in t], [round(float(level(k)), 3) for k in t]
    body = {
        "id": "curl-1",
        "inputs": [
            {"name": "values", "shape": [1, 12], "datatype": "FP32", "data": values},
            {"name": "timestamps_ms", "shape": [1, 12], "datatype": "INT64", "data": [stamps]},  # nested is fine
        ],
    }
    status, answer = call(f"/v2/models/{MODEL}/infer", body)
    assert status == 200, answer
    (output,) = answer["outputs"]
    assert (answer["id"], answer["model_name"], output["name"], output["datatype"]) == (
        "curl-1", MODEL, "forecast", "FP32",
    )  # fmt: skip
    expected = offline.run_sequence(stamps, values)
    assert output["shape"] == [1, *expected.shape]
    np.testing.assert_allclose(np.array(output["data"], np.float32).reshape(expected.shape), expected, atol=1e-4)

    status, error = call("/v2/models/other/infer", body)
    assert status == 404 and "unknown model 'other'" in error["error"]
    body["inputs"][0]["datatype"] = "FP64"
    status, error = call(f"/v2/models/{MODEL}/infer", body)
    assert status == 400 and error == {"error": "input 'values' has datatype FP64; the model takes FP32"}
    status, error = call(f"/v2/models/{MODEL}/infer", {"inputs": "nope"})
    assert status == 400 and "inputs" in error["error"]
    assert oip_server.metric("forecast_requests_total", rpc="ModelInfer", code="OK", protocol="oip-http") >= 1


def test_a_forecast_v1_stream_and_an_oip_sequence_share_ort_calls(model_dir):
    """With a batching window, a forecast.v1 step and a sequence step sent together go into one
    ONNX Runtime call (forecast_step_batches_total{held="both"}), and each gets its own forecast."""
    offline = OfflineModel(model_dir)
    config = replace(server_config(str(model_dir)), batch=BatchConfig(max_batch_delay_us=30_000))
    with (
        RunningServer(config) as server,
        grpc.insecure_channel(server.target) as channel,
        triton.InferenceServerClient(server.target) as client,
    ):
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        stream = Stream(pb_grpc.ForecasterStub(channel))
        for t in range(3):
            ts = START_MS + t * FREQ_MS
            client.async_stream_infer(MODEL, one_step(t, 10.0), sequence_id=1, sequence_start=t == 0)
            (f,) = stream.send({"series_id": "v1", "timestamp_ms": ts, "value": level(t, 25.0)})
            result, error = answers.get(timeout=30)
            assert error is None, error
            np.testing.assert_allclose(result.as_numpy("forecast")[0], offline.step_one("seq", ts, level(t)), atol=1e-3)
            expected = offline.step_one("v1", ts, level(t, 25.0))
            np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, atol=1e-3)
        stream.close()
        client.stop_stream()
        assert server.metric("forecast_step_batches_total", held="both") >= 1


def test_draining_ends_an_open_model_stream_infer_with_unavailable(model_dir):
    answers: queue.Queue = queue.Queue()
    with RunningServer(server_config(str(model_dir))) as server:
        client = triton.InferenceServerClient(server.target)
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(MODEL, one_step(0, 3.0), sequence_id="d", sequence_start=True)
        assert answers.get(timeout=30)[1] is None
    result, error = answers.get(timeout=30)  # the server stopped while the stream was open and idle
    assert result is None and error.status() == "StatusCode.UNAVAILABLE"
    assert "shutting down" in error.message()
    client.stop_stream()
    client.close()


def test_tokens_guard_both_bindings_but_health(model_dir, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-oip\n")
    config = replace(server_config(str(model_dir)), http_port=0, security=SecurityConfig(auth_token_file=tokens))
    with RunningServer(config) as server, triton.InferenceServerClient(server.target) as client:
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata(MODEL)
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.get_model_metadata(MODEL, headers={"authorization": "Bearer tok-oip"}).name == MODEL
        base = f"http://127.0.0.1:{server.server.http_port}"
        with urllib.request.urlopen(base + "/v2/health/ready", timeout=10) as r:
            assert r.status == 200
        for path in (f"/v2/models/{MODEL}", "/v2/no/such/route"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path, timeout=10)
            assert refused.value.code == 401
            assert json.loads(refused.value.read()) == {"error": UNAUTHENTICATED_MESSAGE}
        good = urllib.request.Request(base + f"/v2/models/{MODEL}", headers={"Authorization": "Bearer tok-oip"})
        with urllib.request.urlopen(good, timeout=10) as r:
            assert json.loads(r.read())["name"] == MODEL


def test_an_idle_sequence_expires_and_must_be_started_again(model_dir):
    with (
        RunningServer(server_config(str(model_dir), idle_timeout_s=0.3)) as server,
        triton.InferenceServerClient(server.target) as client,
    ):
        client.infer(MODEL, one_step(0, 3.0), sequence_id=11, sequence_start=True)
        assert server.metric("forecast_live_sequences") == 1
        wait_for(lambda: server.metric("forecast_live_sequences") == 0)
        assert server.metric("forecast_series_expired_total") == 1
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, one_step(1, 3.0), sequence_id=11)
        assert "sequence 11 is not live (never started, ended, or freed after 0.3 s without a request)" in (
            err.value.message()
        )
        client.infer(MODEL, one_step(1, 3.0), sequence_id=11, sequence_start=True)  # started afresh: served
