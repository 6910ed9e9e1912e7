"""Model lifecycle against a real MLflow registry (sqlite in a temp dir): the alias moves while a
stream runs, running series stay on their version, a broken version is refused, health follows."""

import shutil
import threading

import grpc
import numpy as np
import onnx
import pytest

from serving.errors import ModelContractError
from serving.proto import pb, pb_grpc
from tests.conftest import register_model_dir
from tests.serving_support import (
    FREQ_MS,
    NOT_SERVING,
    SERVING,
    START_MS,
    OfflineModel,
    RunningServer,
    Stream,
    health_status,
    server_config,
    wait_for,
)


def broken_copy(model_dir, tmp_path):
    """The same graphs without the `horizon` metadata the contract requires."""
    out = tmp_path / "broken"
    shutil.copytree(model_dir, out)
    for name in ("model.onnx", "sequence.onnx"):
        m = onnx.load(str(out / name))
        keep = [p for p in m.metadata_props if p.key != "horizon"]
        del m.metadata_props[:]
        m.metadata_props.extend(keep)
        onnx.save(m, str(out / name))
    return out


def obs(series_id, t, **kw):
    return {"series_id": series_id, "timestamp_ms": START_MS + t * FREQ_MS, "value": 10.0 + t % 5, **kw}


def check(forecast, offline, series_id, t):
    expected = offline.step_one(series_id, START_MS + t * FREQ_MS, 10.0 + t % 5)
    np.testing.assert_allclose([q.values for q in forecast.quantiles], expected.T, atol=1e-3)


def test_alias_moves_mid_stream(tiny_model_dir, mlflow_store, tmp_path):
    lstm, gru = tiny_model_dir("lstm"), tiny_model_dir("gru")
    v1 = register_model_dir(mlflow_store, lstm, "forecaster", alias="production")
    config = server_config("models:/forecaster@production", tracking_uri=mlflow_store, watch_interval_s=0.2)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).version == v1
        old, new = OfflineModel(lstm), OfflineModel(gru)
        stream = Stream(stub)
        for t in range(3):
            (f,) = stream.send(obs("old", t))
            assert f.model_version == v1
            check(f, old, "old", t)

        v2 = register_model_dir(mlflow_store, gru, "forecaster", alias="production")  # a GRU: other state
        wait_for(lambda: stub.GetModelInfo(pb.GetModelInfoRequest()).version == v2)
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).cell == "gru"

        # The running series stays on v1 (state never crosses versions); a new one starts on v2.
        f_old, f_new = stream.send(obs("old", 3), obs("new", 3))
        assert (f_old.model_version, f_old.steps_seen) == (v1, 4)
        assert (f_new.model_version, f_new.steps_seen) == (v2, 1)
        check(f_old, old, "old", 3)
        check(f_new, new, "new", 3)
        assert server.metric("forecast_loaded_versions") == 2

        # A reset moves the series to v2; v1 has no series left and is unloaded.
        (f,) = stream.send(obs("old", 4, reset=True))
        assert (f.model_version, f.steps_seen) == (v2, 1)
        check(f, new, "old-again", 4)
        wait_for(lambda: server.metric("forecast_loaded_versions") == 1)
        assert server.metric("forecast_model_swaps_total") == 1

        # A version that breaks the contract is refused; v2 keeps serving.
        register_model_dir(mlflow_store, broken_copy(lstm, tmp_path), "forecaster", alias="production")
        wait_for(lambda: server.metric("forecast_model_refused_total") == 1)
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).version == v2
        assert health_status(channel) == SERVING
        (f,) = stream.send(obs("new", 4))
        assert (f.model_version, f.steps_seen) == (v2, 2)
        check(f, new, "new", 4)
        stream.close()


def test_health_is_not_serving_until_a_model_loads(tiny_model_dir, tmp_path):
    config = server_config(str(broken_copy(tiny_model_dir("lstm"), tmp_path)))
    with RunningServer(config, wait_ready=False) as server, grpc.insecure_channel(server.target) as channel:
        with pytest.raises(ModelContractError, match="metadata_props lacks horizon"):
            server.call(server.server.ready)
        assert health_status(channel) == NOT_SERVING
        assert health_status(channel, "") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ForecasterStub(channel).GetModelInfo(pb.GetModelInfoRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no model is loaded yet" in err.value.details()


def test_health_goes_not_serving_when_draining(tiny_model_dir):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with RunningServer(server_config(str(tiny_model_dir("lstm")))) as server:
        channel = grpc.insecure_channel(server.target)
        assert health_status(channel) == SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="forecast.v1.Forecaster")
        )
        seen = []
        reader = threading.Thread(target=lambda: seen.extend(r.status for r in _until_error(watch)))
        reader.start()
        wait_for(lambda: seen == [SERVING])
    reader.join(10)
    assert seen[:2] == [SERVING, NOT_SERVING]
    channel.close()


def _until_error(responses):
    try:
        yield from responses
    except grpc.RpcError:
        return
