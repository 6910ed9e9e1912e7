"""The device-resident state path (serving.cuda_state: IOBinding, state kept as OrtValues between
steps) run on CPU OrtValues, so everything but the CUDA execution provider itself is tested on
machines without a GPU. The same plan as tests/integration/test_server_cuda.py."""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np

from serving.config import RuntimeConfig
from serving.proto import pb_grpc
from tests.serving_support import FREQ_MS, START_MS, OfflineModel, RunningServer, Stream, server_config


def test_state_kept_as_ortvalues_gives_the_offline_graphs_forecasts(tiny_model_dir):
    model_dir = tiny_model_dir("lstm")
    config = replace(server_config(str(model_dir)), runtime=RuntimeConfig(device="cpu", resident_state="on"))
    offline = OfflineModel(model_dir)
    with RunningServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        stream = Stream(stub)
        # The same series in the same order for a while (state stays resident), then the batch
        # changes (resident state goes back to the host rows first), then the old order again, and a
        # series that ends and starts afresh (its row's epoch changes under the resident state).
        plans = [["a", "b"]] * 4 + [["b", "c", "a"]] * 2 + [["a", "b"]] * 3
        steps: dict[str, int] = {}
        for k, plan in enumerate(plans):
            t = {s: steps.get(s, 0) for s in plan}
            end = k == 6  # "b" ends after this message, so it restarts from zero state next time
            forecasts = stream.send(
                *(
                    {
                        "series_id": s,
                        "timestamp_ms": START_MS + t[s] * FREQ_MS,
                        "value": 5.0 + t[s],
                        "end": end and s == "b",
                    }
                    for s in plan
                )
            )
            for s, f in zip(plan, forecasts):
                expected = offline.step_one(s, START_MS + t[s] * FREQ_MS, 5.0 + t[s])
                np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, rtol=1e-5, atol=1e-5)
                assert f.steps_seen == t[s] + 1
                steps[s] = t[s] + 1
            if end:
                steps["b"] = 0
                offline.states.pop("b")
        stream.close()
        stepper = server.server.models.current.ort._device
        assert stepper is not None and stepper.reused >= 4  # the resident path really ran, and was reused
