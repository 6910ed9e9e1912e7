"""`torchrun --nproc_per_node=2 -m training fit` trains the model one process would: two processes
(gloo, CPU) and one, same global batch, same seed, give the same losses and the same forecasts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.e2e.test_fit_cli import ROOT, write_hourly_csv

# Float sums of the gradients run in another order across processes: a last-bit difference per
# step, which after the few dozen steps of this run stays far below this.
TOLERANCE = 1e-4


def fit(tmp_path: Path, name: str, processes: int) -> tuple[dict, dict[str, list[float]]]:
    csv = write_hourly_csv(tmp_path / "loads.csv", days=30)
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"""
data: {{source: "{csv}", timestamp_col: when, target_col: load_kw, series_col: site, covariate_cols: [temp_c], freq: 1h}}
model: {{cell: lstm, hidden_size: 16, num_layers: 1, horizon: 6}}
train: {{window: 48, stride: 6, batch_size: 32, max_epochs: 2, max_minutes: 30, patience: 5, seed: 3,
        min_epoch_steps: 1, finetune_passes: 1}}
eval: {{season: 24, test_fraction: 0.2}}
mlflow: {{experiment: {name}, registered_model: {name}}}
"""
    )
    store = tmp_path / f"{name}.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    summary = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [*launcher, "-m", "training", "fit", "--config", str(cfg), "--summary", str(summary), "--no-progress", "--force"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(summary.read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    history = {
        key: [m.value for m in sorted(client.get_metric_history(out["run_id"], key), key=lambda m: m.step)]
        for key in ("train_loss", "val_loss", "finetune_loss")
    }
    params = client.get_run(out["run_id"]).data.params
    return {**out, "params": params}, history


@pytest.mark.timeout(900)
def test_two_processes_train_what_one_would(tmp_path):
    one, one_history = fit(tmp_path, "single", processes=1)
    two, two_history = fit(tmp_path, "pair", processes=2)
    assert two["params"]["train.processes"] == "2" and "train.processes" not in one["params"]
    for key, values in one_history.items():
        assert len(values) == len(two_history[key]) > 0, key
        for a, b in zip(values, two_history[key]):
            assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), (key, values, two_history[key])
    for key in ("mase", "mae", "pinball", "coverage"):
        a, b = one["metrics"][key], two["metrics"][key]
        assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), (key, a, b)
    # Only rank 0 logged and registered: one run and one version in the store.
    assert two["version"] == "1"
