"""On a machine where CUDA really runs: the server uses it, keeps state on the device between
steps (IOBinding), and still gives the CPU graph's forecasts. Skipped elsewhere."""

import glob
from dataclasses import replace

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from serving.config import RuntimeConfig
from serving.proto import pb, pb_grpc
from tests.serving_support import FREQ_MS, START_MS, OfflineModel, RunningServer, Stream, server_config


def cuda_really_active(model_dir) -> bool:
    """CUDA EP in this onnxruntime build, an NVIDIA device, and a session that really uses it."""
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not glob.glob("/dev/nvidia[0-9]*"):
        return False
    try:
        session = ort.InferenceSession(
            str(model_dir / "model.onnx"), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    except Exception:
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.cuda
def test_cuda_streams_match_the_cpu_graph(tiny_model_dir):
    if not glob.glob("/dev/nvidia[0-9]*"):
        pytest.skip("no NVIDIA device here")
    model_dir = tiny_model_dir("lstm")
    if not cuda_really_active(model_dir):
        pytest.skip("CUDAExecutionProvider is not really active here")
    config = replace(server_config(str(model_dir)), runtime=RuntimeConfig(device="cuda"))
    offline = OfflineModel(model_dir)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).execution_provider == "CUDAExecutionProvider"
        stream = Stream(stub)
        # Same series in the same order for a while (state stays on the device), then the batch
        # changes (state goes back to host rows), then the old order again.
        plans = [["a", "b"]] * 4 + [["b", "c", "a"]] * 2 + [["a", "b"]] * 2
        steps = {}
        for plan in plans:
            t = {s: steps.get(s, 0) for s in plan}
            forecasts = stream.send(
                *({"series_id": s, "timestamp_ms": START_MS + t[s] * FREQ_MS, "value": 5.0 + t[s]} for s in plan)
            )
            for s, f in zip(plan, forecasts):
                expected = offline.step_one(s, START_MS + t[s] * FREQ_MS, 5.0 + t[s])
                np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, atol=1e-3)
                steps[s] = t[s] + 1
        stream.close()
