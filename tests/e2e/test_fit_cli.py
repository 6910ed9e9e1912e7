"""The training CLI as a user runs it: a CSV it has never seen, end to end into the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def write_hourly_csv(path: Path, days: int = 50, hole_at: int | None = None) -> Path:
    """Two hourly series ('north', 'south') in long format with other column names than
    elecdemand: a daily load curve, a weekend dip, a temperature-like covariate, noise."""
    rng = np.random.default_rng(7)
    frames = []
    for sid, level in (("north", 120.0), ("south", 40.0)):
        stamps = pd.date_range("2021-01-04", periods=24 * days, freq="h")
        hours = np.arange(len(stamps))
        temp = 15 + 8 * np.sin(2 * np.pi * (hours - 8) / 24) + rng.normal(0, 1.5, len(stamps))
        load = level * (1 + 0.35 * np.sin(2 * np.pi * (hours - 6) / 24) - 0.2 * (stamps.dayofweek >= 5))
        load = load + 0.01 * level * temp + rng.normal(0, 0.03 * level, len(stamps))
        frames.append(
            pd.DataFrame({"site": sid, "when": stamps.strftime("%Y-%m-%d %H:%M"), "load_kw": load, "temp_c": temp})
        )
    df = pd.concat(frames, ignore_index=True)
    if hole_at is not None:
        df = df.drop(index=hole_at)
    df.to_csv(path, index=False)
    return path


def write_config(path: Path, csv: Path) -> Path:
    path.write_text(
        f"""
data: {{source: "{csv}", timestamp_col: when, target_col: load_kw, series_col: site, covariate_cols: [temp_c], freq: 1h}}
model: {{cell: gru, hidden_size: 32, num_layers: 1, horizon: 12, quantiles: [0.1, 0.5, 0.9]}}
train: {{window: 96, stride: 2, batch_size: 32, max_epochs: 12, max_minutes: 30, lr: 0.005, clip_norm: 1.0, patience: 3,
        seed: 1}}
eval: {{season: 24, test_fraction: 0.2}}
mlflow: {{experiment: e2e, registered_model: loadcast}}
"""
    )
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_fit_on_unseen_csv_beats_seasonal_naive_and_registers(tmp_path):
    csv = write_hourly_csv(tmp_path / "loads.csv")
    cfg = write_config(tmp_path / "loads.yaml", csv)
    # Five epochs: this checks the pipeline end to end; whether the default training beats every
    # baseline (mstl_ets here needs about 12 epochs) is bench.accuracy's to measure, so --force.
    proc = run_cli(
        "fit",
        "--config",
        str(cfg),
        "--set",
        "train.max_epochs=5",
        "--force",
        "--summary",
        str(tmp_path / "summary.json"),
        "--no-progress",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["registered_model"] == "loadcast" and summary["version"] == "1"
    assert summary["model_uri"] == "models:/loadcast/1"
    for key in ("mae", "rmse", "mape", "smape", "mase", "coverage", "pinball"):
        assert np.isfinite(summary["metrics"][key]), key
    assert {"naive", "seasonal_naive", "weekly_seasonal_naive", "mstl_ets"} <= set(summary["baselines"])
    naive = min(summary["baselines"][k]["mase"] for k in ("naive", "seasonal_naive"))
    assert summary["metrics"]["mase"] < naive  # it learned the week, which the day-back naive misses
    assert summary["promotion"]["promoted"] is True  # forced: the first version becomes production
    assert summary["training"]["stop_reason"] in ("patience", "max_epochs", "budget")

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("loadcast", "production").version) == "1"
    assert str(client.get_model_version_by_alias("loadcast", "candidate").version) == "1"

    # The forecasting pyfunc logged beside the version reads the training config's column names.
    assert summary["forecasting_model_uri"] == client.get_model_version("loadcast", "1").tags["forecasting_model_uri"]
    pyfunc = mlflow.pyfunc.load_model(summary["forecasting_model_uri"])
    assert pyfunc.metadata.get_input_schema().input_names() == ["site", "when", "load_kw", "temp_c"]
    frame = pd.read_csv(csv).assign(when=lambda d: pd.to_datetime(d["when"]))
    forecasts = pyfunc.predict(frame)
    assert forecasts["series_id"].tolist() == ["north"] * 12 + ["south"] * 12  # horizon 12 each
    assert (forecasts["origin"] == frame["when"].max()).all()
    assert (forecasts["timestamp"] - forecasts["origin"] == pd.to_timedelta(forecasts["step"], unit="h")).all()

    # `make run`'s first step finds the production version and trains nothing.
    proc = run_cli("ensure-production", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0 and "loadcast@production is version 1; nothing to train" in proc.stdout

    # A --set override reaches the run's params; the same data, trained worse, is not promoted.
    proc = run_cli(
        "fit", "--config", str(cfg), "--set", "train.max_epochs=1", "--set", "train.lr=0.0001",
        "--summary", str(tmp_path / "worse.json"), "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]  # the gate said no, as `promote` would
    worse = json.loads((tmp_path / "worse.json").read_text())
    assert worse["version"] == "2" and worse["promotion"]["promoted"] is False
    assert "does not beat" in worse["promotion"]["reason"]
    assert client.get_run(worse["run_id"]).data.params["train.max_epochs"] == "1"
    assert str(client.get_model_version_by_alias("loadcast", "production").version) == "1"


def test_a_model_that_does_not_beat_the_baselines_by_the_margin_is_never_promoted(tmp_path):
    csv = write_hourly_csv(tmp_path / "loads.csv", days=40)
    cfg = write_config(tmp_path / "loads.yaml", csv)
    # No model beats the best baseline's MASE by 99%. `make run`'s first step (ensure-production:
    # no production yet, so it runs `fit`) trains, the gate refuses even this first version, and it
    # stops with fit's one line and exit 3.
    proc = run_cli("ensure-production", "--config", str(cfg), "--set", "gate.margin=0.99",
                   "--set", "train.max_epochs=1", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert "does not beat the best baseline" in line and "stays 'candidate'" in line

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "production" not in mlflow.MlflowClient().get_registered_model("loadcast").aliases


def test_a_one_hour_hole_is_refused_with_its_time(tmp_path):
    csv = write_hourly_csv(tmp_path / "holes.csv", days=40, hole_at=24 * 10 + 5)  # north, 2021-01-14 05:00
    cfg = write_config(tmp_path / "holes.yaml", csv)
    proc = run_cli("fit", "--config", str(cfg), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "2021-01-14 05:00" in proc.stderr and "north" in proc.stderr


@pytest.mark.parametrize("override, message", [("train.lrr=1", "unknown key"), ("model.cell=rnn", "model.cell")])
def test_config_mistakes_are_named(tmp_path, override, message):
    cfg = write_config(tmp_path / "c.yaml", write_hourly_csv(tmp_path / "d.csv", days=30))
    proc = run_cli("fit", "--config", str(cfg), "--set", override, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
