"""`mlflow models serve` on a registered version's forecasting pyfunc, as a user runs it: MLflow's
real scoring server in its own process, the local environment, no project code on its path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from tests.conftest import register_model_dir
from tests.forecasting_support import assert_same_forecasts, long_histories, rpc_forecasts
from tests.serving_support import RunningServer, server_config

COVARIATES = ("temperature", "workday")


def free_port() -> int:
    # `mlflow models serve -p 0` does not bind port 0: MLflow drops a falsy port and uvicorn falls
    # back to 8000. So take a free port here; another process could take it first, which the
    # readiness wait below would report.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class ScoringServer:
    """`mlflow models serve -m URI --env-manager local` in a subprocess, until the with-block ends."""

    def __init__(self, model_uri: str, tracking_uri: str, cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
        env.pop("PYTHONPATH", None)  # no project code: the model's own code and the registry only
        # MLflow starts `uvicorn` by name: the venv's bin must be on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.log = open(cwd / "scoring_server.log", "w+")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(self.port), "-w", "1"],
            cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def __enter__(self) -> ScoringServer:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the scoring server exited {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"the scoring server did not answer /ping in time:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def test_mlflow_models_serve_answers_as_the_forecast_rpc(mlflow_store, tiny_model_dir, tmp_path):
    version = register_model_dir(mlflow_store, tiny_model_dir("lstm", covariates=COVARIATES), alias="production")
    forecasting_uri = MlflowClient().get_model_version("forecaster", version).tags["forecasting_model_uri"]
    # Five series of four lengths, their rows interleaved, as a client would post them.
    histories = long_histories([3, 17, 17, 40, 90], COVARIATES, seed=11)
    body = json.loads(histories.to_json(orient="split", date_format="iso", date_unit="ms", index=False))

    with ScoringServer(forecasting_uri, mlflow_store, tmp_path) as scoring:
        status, answer = post(f"{scoring.url}/invocations", {"dataframe_split": body})
        assert status == 200, answer
        got = pd.DataFrame(answer["predictions"])

        # A series with a repeated timestamp: HTTP 400 with what and where, and the server lives on.
        bad = pd.concat([histories, histories[histories["series_id"] == "series-2"].head(1)])
        bad_body = json.loads(bad.to_json(orient="split", date_format="iso", date_unit="ms", index=False))
        status, answer = post(f"{scoring.url}/invocations", {"dataframe_split": bad_body})
        assert status == 400 and "series 'series-2': two rows have the timestamp" in answer["message"]
        # The same histories as records with ISO 8601 strings: the same forecasts.
        records = histories.assign(timestamp=histories["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
        status, answer = post(f"{scoring.url}/invocations", {"dataframe_records": records.to_dict("records")})
        assert status == 200, answer
        assert_same_forecasts(pd.DataFrame(answer["predictions"]), got, tolerance=0.0)

    with RunningServer(server_config("models:/forecaster@production", tracking_uri=mlflow_store)) as server:
        want = rpc_forecasts(server.target, histories, "demand", COVARIATES)
    assert_same_forecasts(got, want)
    assert_same_forecasts(got, mlflow.pyfunc.load_model(forecasting_uri).predict(histories))
