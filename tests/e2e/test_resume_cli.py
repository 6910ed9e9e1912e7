"""Resumable series across server processes (CONTRACT §8), as a user runs them: a series streamed
to one `python -m serving` process that is then killed with SIGKILL resumes on a second process
(same model version, same state secret -- once from --state-secret-file, once from
FORECAST_STATE_SECRET) from its last snapshot, and every later forecast equals an uninterrupted
run's. The client CLI does the same with --state-file."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from serving.client import ForecastClient, observation
from tests.serving_support import ServerProcess

from .test_serve_cli import FREQ_MS, ROOT, START_MS

SECRET = "e2e-state-secret-0123456789abcdef"
STEPS, CUT = 14, 8  # steps of each series, of which the first server answers CUT


def start(model_dir, *flags: str, env: dict[str, str] | None = None) -> tuple[ServerProcess, str]:
    server = ServerProcess("--model-uri", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                           "--metrics-port", "-1", "--device", "cpu", *flags, env=env)  # fmt: skip
    host, port = server.wait_for_line(r"listening on (127\.0\.0\.1):(\d+)").groups()
    return server, f"{host}:{port}"


def value(series: str, t: int) -> float:
    return 10.0 + 3.0 * np.sin(t / 4.0) + (2.0 if series == "b" else 0.0)


def observations(series: str, t: int, prefix: str = "", **kw):
    return observation(prefix + series, START_MS + t * FREQ_MS, value(series, t), **kw)


@pytest.fixture(params=["lstm", "gru"])
def model_dir(request, tiny_model_dir):
    return tiny_model_dir(request.param)  # trained once per test session, shared with other tests


def test_a_series_resumes_on_a_second_process_after_the_first_is_killed(model_dir, tmp_path):
    secret_file = tmp_path / "state-secret"
    secret_file.write_text(SECRET + "\n")
    first, target = start(model_dir, "--state-secret-file", str(secret_file))
    try:
        snapshots: dict[str, bytes] = {}
        with ForecastClient(target) as client:
            for forecasts in client.stream(
                ([observations("a", t), observations("b", t)] for t in range(CUT)), return_state=True
            ):
                snapshots.update((f.series_id, f.state) for f in forecasts)
        first.proc.send_signal(signal.SIGKILL)  # no draining, nothing written anywhere
        assert first.proc.wait(10) == -signal.SIGKILL
    finally:
        first.stop()

    second, target = start(model_dir, env={**os.environ, "FORECAST_STATE_SECRET": SECRET})
    try:
        with ForecastClient(target) as client:
            resumed = [[observations(s, CUT, resume_state=snapshots[s]) for s in "ab"]]
            resumed += [[observations("a", t), observations("b", t)] for t in range(CUT + 1, STEPS)]
            after = [f for forecasts in client.stream(resumed) for f in forecasts]
            # The uninterrupted run, on the same server: the same data from the start, other ids.
            whole = [[observations(s, t, prefix="whole-") for s in "ab"] for t in range(STEPS)]
            uninterrupted = [f for forecasts in client.stream(whole) for f in forecasts][2 * CUT :]
        assert len(after) == len(uninterrupted) == 2 * (STEPS - CUT)
        for got, want in zip(after, uninterrupted):
            assert want.series_id == f"whole-{got.series_id}" and got.timestamp_ms == want.timestamp_ms
            assert got.steps_seen == want.steps_seen
            np.testing.assert_allclose(got.point, want.point, atol=1e-5, rtol=0)
            for q, r in zip(got.quantiles, want.quantiles):
                np.testing.assert_allclose(q.values, r.values, atol=1e-5, rtol=0)
    finally:
        second.stop()


def test_the_client_cli_carries_on_from_its_state_file_on_another_server(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("lstm")  # the first test trained it
    env = {**os.environ, "FORECAST_STATE_SECRET": SECRET}
    data, state = tmp_path / "two.csv", tmp_path / "state.json"

    def write_csv(steps: int) -> None:
        with data.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["series", "timestamp", "value"])
            for t in range(steps):
                stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime((START_MS + t * FREQ_MS) / 1000))
                w.writerows([[s, stamp, value(s, t)] for s in "ab"])

    def client(target: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "serving.client", "stream", "--target", target, "--csv", str(data),
             "--series-col", "series", "--batch", "2", "--state-file", str(state)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()

    server, target = start(model_dir, env=env)
    try:
        write_csv(CUT)
        lines = client(target)
        assert len(lines) == 2 * CUT and " steps=8 " in lines[-1]
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    finally:
        server.stop()
    server, target = start(model_dir, env=env)
    try:
        write_csv(STEPS)  # the same file, grown: the rows already answered are skipped
        lines = client(target)
        assert len(lines) == 2 * (STEPS - CUT)
        assert lines[0].startswith("a @ 2014-01-01T04:00Z steps=9 ")  # resumed: counted on, not from 1
        assert " steps=14 " in lines[-1]
    finally:
        server.stop()
