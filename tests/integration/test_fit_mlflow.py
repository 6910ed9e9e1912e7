"""One fit, in process, into a real sqlite MLflow store: the run holds what CONTRACT §3 and the
training issue promise (params, per-epoch metrics, backtest metrics, plot, config, data
fingerprint, state dict), and the state dict rebuilds the model without pickled code."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Run

from tests.e2e.test_fit_cli import write_config, write_hourly_csv
from training.config import FitConfig, load_config
from training.pipeline import FitOutcome, fit, load_state


def fit_two_sites(tmp_path: Path, overrides: list[str]) -> tuple[FitConfig, FitOutcome, Run]:
    """Fit the two-site hourly CSV of the CLI tests into the test's MLflow store."""
    csv = write_hourly_csv(tmp_path / "loads.csv", days=45)
    cfg_path = write_config(tmp_path / "loads.yaml", csv)
    cfg = load_config(cfg_path, overrides)
    outcome = fit(cfg, cfg_path, progress=False)
    return cfg, outcome, MlflowClient().get_run(outcome.run_id)


def test_a_fit_logs_everything_to_one_run(mlflow_store, tmp_path):
    _, outcome, run = fit_two_sites(tmp_path, ["train.max_epochs=2", "model.cell=lstm", "train.clip_value=0.5"])
    client = MlflowClient()
    params, metrics = run.data.params, run.data.metrics
    assert params["train.clip_norm"] == "1.0" and params["train.clip_value"] == "0.5"
    assert params["model.cell"] == "lstm" and params["data.series_col"] == "site"
    assert params["data_fingerprint.series"] == "2" and len(params["data_fingerprint.sha256"]) == 64
    assert "scaling.value_unit" in params
    for key in ("train_loss", "val_loss", "grad_norm_mean", "grad_norm_max", "clipped_share", "lr"):
        history = client.get_metric_history(outcome.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    for key in ("finetune_loss", "finetune_grad_norm_max", "finetune_clipped_share"):  # numbered on
        assert [m.step for m in client.get_metric_history(outcome.run_id, key)] == [3, 4, 5], key
    assert params["train.finetune_passes"] == "3"
    for key in ("mae", "rmse", "mape", "smape", "mase", "pinball", "coverage"):
        assert np.isfinite(metrics[f"backtest_{key}"])
    for base in ("naive", "seasonal_naive", "weekly_seasonal_naive", "mstl_ets"):
        assert np.isfinite(metrics[f"{base}_mase"])
    assert metrics["mstl_ets_fit_seconds"] > 0
    # 36 training days of hourly data hold three days and three weeks: both seasons are decomposed.
    assert [f.periods for f in outcome.backtest.classical] == [(24, 168)] * 2
    assert metrics["parity_step_x_T_vs_sequence"] < 1e-4
    # The reference blend: which reference the forecast leans towards, and each candidate's validation error.
    assert run.data.tags["reference_blend"].startswith("0.5 towards ")
    assert {"network", "latest_value", "lag_24", "lag_168"} <= {
        k.removeprefix("val_scaled_mae.") for k in metrics if k.startswith("val_scaled_mae.")
    }

    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"backtest.png", "data.json", "resolved_config.yaml", "config", "pytorch"} <= artifacts
    local = Path(mlflow.artifacts.download_artifacts(run_id=outcome.run_id, artifact_path=""))
    assert (local / "backtest.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((local / "data.json").read_text())["dataset"]["rows"] == 2 * 45 * 24

    rebuilt = load_state(local / "pytorch")
    assert rebuilt.config.covariates == ("temp_c",) and rebuilt.config.freq_ms == 3_600_000
    assert sum(rebuilt.config.blend) == 0.5  # the reference blend comes back with the config
    for key, value in rebuilt.state_dict().items():
        assert torch.isfinite(value).all(), key

    version = client.get_model_version("loadcast", outcome.version)
    assert version.tags["run_id"] == outcome.run_id and version.tags["cell"] == "lstm"
    assert version.tags["horizon"] == "12" and float(version.tags["backtest_mase"]) == outcome.backtest.metrics["mase"]
    assert version.tags["data_fingerprint"] == params["data_fingerprint.sha256"]
    # The gate: the version carries the best baseline it had to beat, and was promoted exactly when it did.
    best = min(outcome.backtest.baselines, key=lambda k: outcome.backtest.baselines[k]["mase"])
    assert version.tags["best_baseline"] == best and version.tags["gate_margin"] == "0.0"
    beats = outcome.backtest.metrics["mase"] < float(version.tags["best_baseline_mase"])
    assert run.data.tags["promoted"] == str(beats) and outcome.promotion.promoted == beats
    # What the config left unset was chosen from the data and logged: a day and a week of hours.
    assert params["model.lags"] == "[24, 168]" and params["train.window"] == "96"
    assert run.data.tags["stop_reason"] == version.tags["stop_reason"] == "max_epochs"


def test_a_fit_of_members_logs_each_member_and_rebuilds_the_packed_model(mlflow_store, tmp_path):
    cfg, outcome, run = fit_two_sites(tmp_path, ["train.max_epochs=1", "model.hidden_size=16", "model.members=2"])
    client = MlflowClient()
    assert run.data.params["model.members"] == "2"
    for member in (0, 1):
        for key in ("train_loss", "val_loss", "grad_norm_mean", "clipped_share", "lr"):
            assert [m.step for m in client.get_metric_history(outcome.run_id, f"member{member}.{key}")] == [1]
        assert run.data.metrics[f"member{member}.best_epoch"] == 1
    training = outcome.summary()["training"]
    seed = cfg.train.seed
    assert training["epochs"] == 2 and [m["seed"] for m in training["members"]] == [seed, seed + 1000]

    local = Path(mlflow.artifacts.download_artifacts(run_id=outcome.run_id, artifact_path="pytorch"))
    rebuilt = load_state(local)
    assert rebuilt.config.members == 2 and rebuilt.config.hidden_size == 16
    assert outcome.parity["step_x_T_vs_sequence"] < 1e-4
