"""Shared fixtures: real tiny models, trained for seconds on synthetic seasonal series, exported
to the real ONNX graphs, and a real MLflow registry (sqlite in a temp dir).

Tests build models through the same code paths users run (``train_forecaster`` -> ``export_model``
-> ``log_and_register``), just smaller.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FREQ_MS = 1_800_000  # 30 min
START_MS = 1_388_534_400_000  # 2014-01-01 00:00 UTC


def synthetic_series(n: int = 48 * 40, series_id: str = "s0", level: float = 10.0, covariates: int = 0, seed: int = 0):
    """A half-hourly series with a daily cycle, a weekend dip and noise; covariates drive it too."""
    from training.data import Series

    rng = np.random.default_rng(seed)
    t = np.arange(n)
    cov = rng.standard_normal((n, covariates)).astype(np.float32)
    weekday = (t // 48 + 2) % 7  # 2014-01-01 was a Wednesday (Monday = 0)
    values = level * (1.0 + 0.3 * np.sin(2 * np.pi * t / 48) - 0.15 * (weekday >= 5))
    values += 0.02 * level * rng.standard_normal(n)
    if covariates:
        values += 0.1 * level * cov[:, 0]
    return Series(
        series_id=series_id,
        timestamps_ms=(START_MS + t * FREQ_MS).astype(np.int64),
        values=values.astype(np.float32),
        covariates=cov,
    )


def train_tiny(
    cell: str = "lstm",
    covariates: tuple[str, ...] = (),
    seed: int = 0,
    epochs: int = 2,
    horizon: int = 6,
    members: int = 1,
    lags: tuple[int, ...] = (12, 48),
    level: float = 10.0,
    blend: float = 0.5,
):
    """A real Forecaster trained for a couple of seconds (with a lag buffer of 48 steps by default)
    on one synthetic series (``level``: its mean); ``blend``: train.blend (0: the network alone)."""
    from training.model import ModelConfig
    from training.train import TrainConfig, scaled_config, train_forecaster

    series = [synthetic_series(covariates=len(covariates), seed=seed, series_id=f"s{seed}", level=level)]
    cfg = ModelConfig(
        cell=cell, hidden_size=16, num_layers=2, horizon=horizon, covariates=covariates, members=members, lags=lags
    )
    train = TrainConfig(
        window=96, stride=12, batch_size=32, max_epochs=epochs, seed=seed, min_epoch_steps=1, blend=blend
    )
    model, _ = train_forecaster(scaled_config(cfg, series), series, train, progress=False)
    return model


def zero_state_feeds(session, batch: int) -> dict[str, np.ndarray]:
    """Zero state (the start of a series) for every state input of an ONNX Runtime session, named by
    its metadata ``state``: each shape with its one dynamic (batch) axis set to ``batch``."""
    names = session.get_modelmeta().custom_metadata_map["state"].split(",")
    inputs = {i.name: i for i in session.get_inputs()}
    return {n: np.zeros([d if isinstance(d, int) else batch for d in inputs[n].shape], np.float32) for n in names}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``tiny_model_dir(cell="lstm", covariates=(), seed=0)`` -> a directory holding
    ``model.onnx`` and ``sequence.onnx`` of a tiny trained model (cached per arguments)."""
    from training.export import export_model

    cache: dict[tuple, Path] = {}

    def make(cell: str = "lstm", covariates: tuple[str, ...] = (), seed: int = 0) -> Path:
        key = (cell, tuple(covariates), seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"model_{cell}_{len(covariates)}_{seed}")
            model = train_tiny(cell, tuple(covariates), seed)
            export_model(model, out, metadata={"target": "demand", "mlflow_run_id": "none"})
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory) -> Path:
    """An sqlite tracking store with MLflow's schema, made once a session: creating one runs
    MLflow's migrations (seconds each time); each test gets a copy (see mlflow_store)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, _empty_mlflow_db) -> Iterator[str]:
    """A fresh sqlite tracking store and artifact root in a temp dir; yields the tracking URI."""
    import shutil
    import sqlite3

    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_db, db)
    with sqlite3.connect(db) as conn:  # the Default experiment's artifacts go under this test's dir
        conn.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (str(tmp_path / "mlruns" / "0"),)
        )
    conn.close()
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the sqlite store's default artifact root is ./mlruns
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def register_model_dir(
    tracking_uri: str,
    model_dir: Path,
    name: str = "forecaster",
    alias: str | None = None,
    mase: float = 1.0,
    baseline_mase: float | None = None,
) -> str:
    """Register ``model_dir``'s graphs as a new version of ``name`` (alias ``candidate``, and
    ``alias`` too if given) in the store at ``tracking_uri``; returns the version number."""
    import mlflow
    from mlflow import MlflowClient

    from training.export import example_inputs
    from training.model import Forecaster
    from training.registry import log_and_register

    meta = _metadata(model_dir)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("tests")
    example = example_inputs(Forecaster(_config_from(meta)), 2, None, np.random.default_rng(0), state="zero")
    with mlflow.start_run():
        tags = {"backtest_mase": str(mase), "data_fingerprint": "test"}
        if baseline_mase is not None:
            tags |= {"best_baseline": "seasonal_naive", "best_baseline_mase": str(baseline_mase), "gate_margin": "0.0"}
        version = log_and_register(model_dir, name, tags, example)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def _metadata(model_dir: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(Path(model_dir) / "model.onnx")).metadata_props}


def _config_from(meta: dict[str, str]):
    import json

    from training.model import ModelConfig

    return ModelConfig(**json.loads(meta["model_config"]))


@pytest.fixture(autouse=True, scope="session")
def _quiet_env() -> None:
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # mlflow probes git otherwise
