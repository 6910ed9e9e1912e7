"""`python -m serving.healthcheck` (the image's HEALTHCHECK) against real servers: healthy only
once the model is warmed up, unhealthy with a one-line reason otherwise, and fast either way."""

import socket
import subprocess
import sys
import time
from pathlib import Path

from serving.healthcheck import check
from tests.serving_support import RunningServer, server_config

ROOT = Path(__file__).resolve().parents[2]


def healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.healthcheck", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_ready_server_is_healthy_for_both_service_names(server):
    out = healthcheck("--target", server.target)
    assert out.returncode == 0, out.stderr
    assert "'forecast.v1.Forecaster' is SERVING" in out.stdout
    assert check(server.target, service="") is None


def test_unknown_service_name_is_unhealthy_and_says_so(server):
    out = healthcheck("--target", server.target, "--service", "forecast.v9.Nothing")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"unhealthy: {server.target}: the health service knows no service 'forecast.v9.Nothing'"
    ]


def test_server_whose_model_never_loads_stays_unhealthy(tmp_path):
    # A directory without graphs: the port is open and health answers, but loading fails.
    with RunningServer(server_config(str(tmp_path)), wait_ready=False) as s:
        time.sleep(0.5)  # give the load time to fail; health must still not say SERVING
        assert check(s.target) == f"{s.target}: service 'forecast.v1.Forecaster' is NOT_SERVING"
        assert check(s.target, service="") == f"{s.target}: service '' is NOT_SERVING"


def test_draining_server_is_unhealthy(model_dir):
    with RunningServer(server_config(str(model_dir))) as s:
        assert check(s.target) is None
        s.call(s.server.health.enter_graceful_shutdown)  # what SIGTERM does first
        assert "is NOT_SERVING" in check(s.target)


def test_nothing_listening_fails_fast_with_the_reason():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    out = healthcheck("--target", target, "--timeout", "20")
    assert out.returncode == 1
    assert time.monotonic() - started < 15  # a refused connection does not wait out the timeout
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"unhealthy: {target}: health check failed: UNAVAILABLE")


def test_bad_timeout_is_refused():
    out = healthcheck("--timeout", "0")
    assert out.returncode == 2
    assert "--timeout must be > 0 seconds" in out.stderr
