"""The alias watch against a real MLflow tracking server over HTTP, artifacts proxied through it
(as in docker-compose.yml), and the server run as a user runs it (`python -m serving`).

The served version follows the alias; a version whose files the artifact store fails to serve
is retried, not refused, and served once they can be fetched; while the tracking server is down
the current version keeps serving, health stays SERVING and the failed checks are counted; when
it is back the server follows the alias again. One server process throughout: no restart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from mlflow import MlflowClient

from serving.proto import pb, pb_grpc
from tests.conftest import register_model_dir
from tests.serving_support import (
    FREQ_MS,
    ROOT,
    SERVING,
    START_MS,
    OfflineModel,
    ServerProcess,
    Stream,
    health_status,
    metric,
    wait_for,
)

FAILURES = "forecast_model_watch_failures_total"
REFUSED = "forecast_model_refused_total"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrackingServer:
    """`mlflow server` on one port with its store (sqlite) and proxied artifacts in `root`;
    killed and started again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 240) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = self.root / f"mlflow-{self.starts}.log"
        command = [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        # No job runner (a second process the alias watch has no use for); its own session, so
        # kill() takes the server and its uvicorn worker down together.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                command, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"mlflow server not up in {timeout} s:\n{log.read_text()[-3000:]}")

    def kill(self) -> None:
        """Gone at once, as in a crash: SIGKILL to the server and its worker."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    @contextlib.contextmanager
    def failing_files(self, name: str, version: str) -> Iterator[None]:
        """The artifact store answers HTTP 500 for this version's files while inside: its graph
        becomes a dangling link in the store's directory, so listing the files fails."""
        registry = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        source = registry.get_model_version_download_uri(name, version)
        graph = self.artifacts / source.removeprefix("mlflow-artifacts:/") / "model.onnx"
        kept = graph.with_name("model.onnx.kept")
        graph.rename(kept)
        graph.symlink_to(self.root / "nowhere")
        try:
            yield
        finally:
            graph.unlink()
            kept.rename(graph)


class Bystander:
    """A series stepped on a stream that stays open throughout, checked against ORT offline."""

    def __init__(self, stub, model_dir: Path) -> None:
        self.stream, self.offline, self.t = Stream(stub), OfflineModel(model_dir), 0

    def step(self) -> pb.SeriesForecast:
        ts, value = START_MS + self.t * FREQ_MS, 10.0 + self.t % 5
        (f,) = self.stream.send({"series_id": "calm", "timestamp_ms": ts, "value": value})
        self.t += 1
        assert f.steps_seen == self.t
        expected = self.offline.step_one("calm", ts, value)
        np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, atol=1e-3)
        return f


def test_the_alias_watch_rides_out_registry_failures(tiny_model_dir, tmp_path):
    lstm, gru = tiny_model_dir("lstm"), tiny_model_dir("gru")
    tracking = TrackingServer(tmp_path / "mlflow")
    tracking.start()
    server = None
    try:
        v1 = register_model_dir(tracking.uri, lstm, "forecaster", alias="production")
        registry = MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)
        # --tracking-uri alone, from a directory without a registry of its own: the version must
        # be downloaded from the registry the alias was read from.
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
        server = ServerProcess(
            "--model-uri", "models:/forecaster@production", "--tracking-uri", tracking.uri,
            "--watch-interval-s", "0.5", "--port", "0", "--metrics-port", "0", "--device", "cpu",
            cwd=tmp_path, env=env,
        )  # fmt: skip
        target = server.wait_for_line(r"listening on (127\.0\.0\.1:\d+)", timeout=180).group(1)
        metrics = server.wait_for_line(r"metrics=(http://\S+/metrics)").group(1)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ForecasterStub(channel)

            def served() -> str:
                return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).version

            def still_serving() -> None:
                assert health_status(channel) == SERVING
                assert calm.step().model_version == v1  # a running series stays on its version
                history = pb.SeriesHistory(series_id="h", timestamps_ms=[START_MS], values=[1.0])
                assert len(stub.Forecast(pb.ForecastRequest(series=[history]), timeout=10).forecasts) == 1

            assert served() == v1
            calm = Bystander(stub, lstm)
            calm.step()

            # 1. The alias moves to a version whose files the artifact store fails to serve:
            # retried with backoff, not refused; served as soon as its files can be fetched.
            v2 = register_model_dir(tracking.uri, gru, "forecaster")
            with tracking.failing_files("forecaster", v2):
                registry.set_registered_model_alias("forecaster", "production", v2)
                wait_for(lambda: metric(metrics, FAILURES) >= 2, timeout=60)
                assert served() == v1
                still_serving()
            wait_for(lambda: served() == v2, timeout=60)
            assert metric(metrics, REFUSED) == 0

            # 2. The tracking server dies: the current version keeps serving, health stays
            # SERVING, and the failed checks are counted (the log says so once per streak).
            failed = metric(metrics, FAILURES)
            tracking.kill()
            wait_for(lambda: metric(metrics, FAILURES) >= failed + 2, timeout=60)
            assert served() == v2
            still_serving()

            # 3. It comes back on the same port and store; the alias moves; the server follows.
            tracking.start()
            registry.set_registered_model_alias("forecaster", "production", v1)
            wait_for(lambda: served() == v1, timeout=60)
            (fresh,) = Stream(stub).send({"series_id": "fresh", "timestamp_ms": START_MS, "value": 3.0})
            np.testing.assert_allclose(
                [q.values for q in fresh.quantiles], OfflineModel(lstm).step_one("fresh", START_MS, 3.0).T, atol=1e-3
            )
            still_serving()
            assert metric(metrics, REFUSED) == 0
            assert metric(metrics, "forecast_model_swaps_total") == 2
            calm.stream.close()

        assert server.proc.poll() is None  # the same process throughout
        failing = [line for line in server.lines if "event=model_watch_failing" in line]
        recovered = [line for line in server.lines if "event=model_watch_recovered" in line]
        assert len(failing) == 2, failing  # one warning per streak, however many retries
        assert len(recovered) == 2, recovered
        assert "download failed" in failing[0] and "cannot resolve the alias" in failing[1]
    finally:
        if server is not None:
            server.stop()
        tracking.kill()
        import mlflow

        mlflow.set_tracking_uri(None)  # register_model_dir pointed this process at the dead server
