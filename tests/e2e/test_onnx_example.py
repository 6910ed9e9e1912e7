"""examples/onnx_inference.py, as a user runs it against a registry, with no project code."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import register_model_dir, synthetic_series

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_streams_a_csv_through_the_production_model(mlflow_store, tiny_model_dir, tmp_path):
    register_model_dir(mlflow_store, tiny_model_dir("lstm"), alias="production")
    s = synthetic_series(n=100)
    lines = ["when,load"] + [
        f"{dt.datetime.fromtimestamp(t / 1000, dt.UTC):%Y-%m-%dT%H:%M},{v}" for t, v in zip(s.timestamps_ms, s.values)
    ]
    (tmp_path / "series.csv").write_text("\n".join(lines))
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    env.pop("PYTHONPATH", None)  # no project code on the path: only the registry and the graphs
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "onnx_inference.py"), "--csv", "series.csv", "--timestamp-col", "when", "--value-col", "load"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "after 100 observations" in proc.stdout and "point" in proc.stdout
    last = dt.datetime.fromtimestamp((s.timestamps_ms[-1] + 1_800_000) / 1000, dt.UTC)
    assert f"{last:%Y-%m-%d %H:%M}  point" in proc.stdout  # the first forecast step is one freq ahead
