"""`python -m serving` as a user runs it: start, say where it listens, serve the client CLI,
drain and exit 0 on SIGTERM, and refuse bad start-ups with a clear message."""

import csv
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import onnxruntime as ort
import pytest

from serving.client import ForecastClient, observation
from tests.serving_support import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
START_MS, FREQ_MS = 1_388_534_400_000, 1_800_000


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir("lstm")


def test_serve_stream_and_sigterm(model_dir, tmp_path):
    server = ServerProcess("--model-uri", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                           "--metrics-port", "0", "--device", "auto", "--grace-s", "20")  # fmt: skip
    try:
        host, port = server.wait_for_line(r"listening on (127\.0\.0\.1):(\d+)").groups()
        target = f"{host}:{port}"
        assert any("provider=CPUExecutionProvider" in line for line in server.lines)

        # The client CLI replays a CSV of two series (3 observations per message).
        path = tmp_path / "two.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["series", "timestamp", "value"])
            for t in range(4):
                stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime((START_MS + t * FREQ_MS) / 1000))
                w.writerows([["north", stamp, 10 + t], ["south", stamp, 20 - t]])
        out = subprocess.run(
            [sys.executable, "-m", "serving.client", "stream", "--target", target, "--csv", str(path),
             "--series-col", "series", "--batch", "3"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        assert len(lines) == 8
        assert lines[0].startswith("north @ 2014-01-01T00:00Z steps=1")
        assert lines[-1].startswith("south @ 2014-01-01T01:30Z steps=4")

        # A stream left open when SIGTERM comes is told to go away; the server exits 0 promptly.
        with ForecastClient(target) as client:
            requests: queue.Queue = queue.Queue()
            answers = client.stream(iter(requests.get, None))
            requests.put([observation("open", START_MS, 1.0)])
            assert next(answers)[0].steps_seen == 1
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(15) == 0
            assert time.monotonic() - started < 10  # drained without waiting out the 20 s grace
            with pytest.raises(grpc.RpcError) as err:
                next(answers)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
        server.wait_for_line("event=stopped")
    finally:
        server.stop()


def cuda_active() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return os.path.exists("/dev/nvidia0")


@pytest.mark.skipif(cuda_active(), reason="this machine has a GPU; the refusal is tested where there is none")
def test_device_cuda_fails_clearly_without_cuda(model_dir):
    server = ServerProcess("--model-uri", str(model_dir), "--port", "0", "--metrics-port", "-1", "--device", "cuda")
    try:
        assert server.proc.wait(60) == 1
        server.wait_for_line(r"event=startup_failed .*--device cuda: CUDAExecutionProvider is not active")
    finally:
        server.stop()


def test_a_directory_without_graphs_fails_clearly(tmp_path):
    server = ServerProcess("--model-uri", str(tmp_path), "--port", "0", "--metrics-port", "-1")
    try:
        assert server.proc.wait(60) == 1
        server.wait_for_line(r"event=startup_failed .*needs model\.onnx with sequence\.onnx")
    finally:
        server.stop()


def test_the_start_up_line_says_the_security_mode(model_dir, tmp_path):
    from tests.tls_support import make_pki

    pki = make_pki(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-1\n")
    server = ServerProcess("--model-uri", str(model_dir), "--port", "0", "--metrics-port", "-1",
                           "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                           "--tls-client-ca", str(pki.ca), "--auth-token-file", str(tokens))  # fmt: skip
    try:
        server.wait_for_line(r"listening on 127\.0\.0\.1:\d+\" security=mtls tokens=on metrics=off")
        server.wait_for_line(r"python -m serving\.client stream .* --tls-ca SERVER_CA\.pem --tls-cert CLIENT\.pem")
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("flags", "status", "message"),
    [
        (
            ["--auth-token-file", "{tmp}/empty"],
            1,
            r"event=startup_failed .*--auth-token-file .*empty: no token in it",
        ),
        (["--tls-cert", "{tmp}/cert.pem"], 2, r"give both --tls-cert and --tls-key, or neither"),
    ],
)
def test_unusable_security_settings_stop_the_start_clearly(model_dir, tmp_path, flags, status, message):
    (tmp_path / "empty").write_text("# no tokens yet\n")
    args = [f.format(tmp=tmp_path) for f in flags]
    server = ServerProcess("--model-uri", str(model_dir), "--port", "0", "--metrics-port", "-1", *args)
    try:
        assert server.proc.wait(60) == status
        server.wait_for_line(message)
    finally:
        server.stop()
