"""``fit``: load and validate data, train, backtest against baselines, export, log, register,
gate — one MLflow run from start to end, readable top to bottom."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import torch

from training.config import FitConfig
from training.data import Dataset, Series, load_dataset
from training.distributed import Workers
from training.evaluate import BacktestResult, backtest, classical_periods, holdout_start, plot_backtest
from training.export import example_inputs, export_model
from training.model import Forecaster, ModelConfig
from training.registry import FORECASTING_TAG, Promotion, best_baseline, log_and_register, promote
from training.seasonality import calendar_periods, covered_periods
from training.train import (
    TrainingError,
    TrainResult,
    describe_blend,
    forecast_series,
    scaled_config,
    train_forecaster,
)

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_WINDOW = 336  # steps per training window when the config leaves it unset and the data allows
MIN_WINDOW = 48  # the shortest window chosen for short series
DEFAULT_STRIDE = 12  # steps between training windows when the config leaves it unset and the data allows
TARGET_WINDOWS = 256  # per series, at least, when the stride is chosen for short series


@dataclass
class FitOutcome:
    run_id: str
    registered_model: str
    version: str
    model_uri: str
    forecasting_model_uri: str  # the forecasting pyfunc logged beside the version (runs:/RUN_ID/forecasting)
    backtest: BacktestResult
    training: TrainResult
    promotion: Promotion
    parity: dict[str, float]

    def summary(self) -> dict:
        """The ``--summary`` JSON of CONTRACT §3."""
        return {
            "run_id": self.run_id,
            "registered_model": self.registered_model,
            "version": self.version,
            "model_uri": self.model_uri,
            "forecasting_model_uri": self.forecasting_model_uri,
            "metrics": self.backtest.metrics,
            "baselines": self.backtest.baselines,
            "promotion": {"promoted": self.promotion.promoted, "reason": self.promotion.reason},
            "training": self.training.summary(),
            "parity": self.parity,
        }


def training_parts(dataset: Dataset, test_fraction: float) -> list[Series]:
    """Each series cut before its backtest region: training never sees the test steps."""
    parts = []
    for s in dataset.series:
        cut = holdout_start(len(s.values), test_fraction)
        parts.append(Series(s.series_id, s.timestamps_ms[:cut], s.values[:cut], s.covariates[:cut]))
    return parts


def save_state(model: Forecaster, out_dir: Path) -> None:
    """State dict plus its config as JSON: rebuild with ``Forecaster(ModelConfig(**config))`` and
    ``load_state_dict(torch.load(path, weights_only=True))``, no pickled code involved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "state_dict.pt")
    (out_dir / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))


def load_state(state_dir: Path) -> Forecaster:
    config = ModelConfig(**json.loads((Path(state_dir) / "model_config.json").read_text()))
    model = Forecaster(config)
    model.load_state_dict(torch.load(Path(state_dir) / "state_dict.pt", weights_only=True))
    return model.eval()


def prepare(cfg: FitConfig) -> tuple[Dataset, list[Series], ModelConfig, FitConfig]:
    """Load and validate the data, cut the training parts, resolve what the config left to the
    data (``resolve``), fit the model's scaling to the training parts. Returns the data set, the
    training parts, the model config to build and the resolved fit config."""
    # Each series needs a training window (or room for the shortest one) plus a horizon before its
    # backtest region.
    window = cfg.train.window or MIN_WINDOW
    min_length = window + cfg.model.horizon
    dataset = load_dataset(cfg.data, min_length=int(min_length / (1 - cfg.eval.test_fraction)) + 1)
    fp = dataset.fingerprint
    log.info(
        "data: %d series, %d rows, %s .. %s, sha256 %s",
        fp["series"],
        fp["rows"],
        fp["start"],
        fp["end"],
        fp["sha256"][:12],
    )
    train_parts = training_parts(dataset, cfg.eval.test_fraction)
    cfg = resolve(cfg, dataset, train_parts)
    model_cfg = replace(cfg.model, covariates=dataset.covariate_names, freq_ms=dataset.freq_ms)
    return dataset, train_parts, scaled_config(model_cfg, train_parts), cfg


def resolve(cfg: FitConfig, dataset: Dataset, train_parts: list[Series]) -> FitConfig:
    """The config with what it left unset chosen from the data, logged:
    - ``model.lags``: one day and one week in steps of the data's frequency, those the shortest
      training series covers three times over (training.seasonality);
    - ``train.window``: 336 steps, or half of what the shortest training series leaves after its
      validation share and one horizon, when that is less (at least MIN_WINDOW);
    - ``train.stride``: 12 steps, or less on short series, so that each has about TARGET_WINDOWS
      training windows (at least 1)."""
    shortest = min(len(s.values) for s in train_parts)
    model, train = cfg.model, cfg.train
    if model.lags is None:
        lags = covered_periods(calendar_periods(dataset.freq_ms), shortest, min_cycles=3)
        model = replace(model, lags=tuple(lags))
        log.info("model.lags unset: %s (one day / one week of %d ms steps, where covered)", list(lags), dataset.freq_ms)
    if train.window is None:
        room = shortest - math.ceil(train.val_fraction * shortest) - model.horizon
        window = max(MIN_WINDOW, min(DEFAULT_WINDOW, room // 2))
        train = replace(train, window=window)
        log.info("train.window unset: %d steps", window)
    if train.stride is None:
        room = shortest - math.ceil(train.val_fraction * shortest) - model.horizon - train.window
        stride = min(DEFAULT_STRIDE, max(1, room // TARGET_WINDOWS))
        train = replace(train, stride=stride)
        log.info("train.stride unset: %d steps", stride)
    if train.burn_in >= train.window:
        raise TrainingError(f"train.burn_in ({train.burn_in}) must be shorter than train.window ({train.window})")
    return replace(cfg, model=model, train=train)


def run_backtest(model: Forecaster, dataset: Dataset, cfg: FitConfig) -> BacktestResult:
    return backtest(
        dataset,
        lambda s: forecast_series(model, s),
        quantiles=model.config.quantiles,
        horizon=model.config.horizon,
        season=cfg.eval.season,
        test_fraction=cfg.eval.test_fraction,
        seasonal_periods=classical_periods(dataset, cfg.eval.test_fraction),
    )


def train_only(cfg: FitConfig, workers: Workers) -> None:
    """A data-parallel rank other than 0: the same data and the same training as rank 0 (which logs,
    backtests, exports and registers), and nothing else."""
    _, train_parts, model_cfg, cfg = prepare(cfg)
    train_forecaster(model_cfg, train_parts, cfg.train, progress=False, workers=workers)


def fit(
    cfg: FitConfig,
    config_path: Path | None = None,
    progress: bool = True,
    force: bool = False,
    workers: Workers | None = None,
) -> FitOutcome:
    """Train, backtest, export, log and register ``cfg``'s model, then run the promotion gate
    (``force``: promote without it). The outcome says whether the new version was promoted.
    Under torchrun this is rank 0's part (``workers``); the other ranks run ``train_only``."""
    # Data first: a bad file fails before any run is opened.
    dataset, train_parts, model_cfg, cfg = prepare(cfg)
    fp = dataset.fingerprint

    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        log.info("mlflow run %s in experiment %r", run_id, cfg.mlflow.experiment)
        mlflow.log_params(cfg.flat())
        mlflow.log_params({f"data_fingerprint.{k}": v for k, v in fp.items()})
        mlflow.log_params(
            {f"scaling.{k}": v for k, v in model_cfg.to_dict().items() if k.startswith(("value_", "cov"))}
        )
        mlflow.log_dict(
            {"dataset": fp, "target": dataset.target, "covariates": list(dataset.covariate_names)}, "data.json"
        )
        mlflow.log_dict(cfg.to_dict(), "resolved_config.yaml")
        if config_path is not None:
            mlflow.log_artifact(str(config_path), "config")

        model, result = train_forecaster(
            model_cfg, train_parts, cfg.train, on_epoch=lambda e, m: mlflow.log_metrics(m, step=e), progress=progress,
            workers=workers,
        )  # fmt: skip
        if workers is not None and workers.distributed:
            mlflow.log_param("train.processes", workers.world)
        if result.members:
            mlflow.log_metrics({f"member{i}.best_epoch": r.best_epoch for i, r in enumerate(result.members)})
            best = ", ".join(str(r.best_epoch) for r in result.members)
        else:
            mlflow.log_metric("best_epoch", result.best_epoch)
            best = str(result.best_epoch)
        mlflow.log_metric("train_seconds", result.seconds)
        mlflow.set_tag("stop_reason", result.stop_reason)  # patience, budget or max_epochs (per member, joined)
        mlflow.set_tag("reference_blend", describe_blend(model.config))
        for i, r in enumerate(result.members or [result]):  # each network's validation error, each reference's
            prefix = f"member{i}." if result.members else ""
            mlflow.log_metrics({f"{prefix}val_scaled_mae.{k}": v for k, v in r.blend_errors.items()})
        log.info(
            "trained %d epochs in %.1fs (best epoch %s, stopped by %s); reference blend: %s",
            result.epochs,
            result.seconds,
            best,
            result.stop_reason,
            describe_blend(model.config),
        )

        bt = run_backtest(model, dataset, cfg)
        baseline, baseline_mase = best_baseline(bt.baselines)
        mlflow.log_metrics({f"backtest_{k}": v for k, v in bt.metrics.items()})
        for name, metrics in bt.baselines.items():
            mlflow.log_metrics({f"{name}_{k}": v for k, v in metrics.items()})
        if bt.classical:  # decomposition + ETS fit over all series, seconds
            mlflow.log_metric("mstl_ets_fit_seconds", sum(f.seconds for f in bt.classical))
        log.info(
            "backtest MASE %.4f; %s",
            bt.metrics["mase"],
            ", ".join(f"{k} {v['mase']:.4f}" for k, v in bt.baselines.items()),
        )

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            mlflow.log_artifact(str(plot_backtest(bt, tmp / "backtest.png")))
            save_state(model, tmp / "pytorch")
            mlflow.log_artifacts(str(tmp / "pytorch"), "pytorch")
            meta = {
                "target": dataset.target,
                "mlflow_run_id": run_id,
                "registered_model": cfg.mlflow.registered_model,
                "data_fingerprint": fp["sha256"],
                "fit_config": json.dumps(cfg.to_dict()),
                "season": str(cfg.eval.season),
            }
            report = export_model(model, tmp / "onnx", metadata=meta)
            mlflow.log_metrics({f"parity_{k}": v for k, v in report.parity.items()})
            example = example_inputs(model, 2, None, np.random.default_rng(0), state="zero")
            tags = {
                "run_id": run_id,
                "cell": model.config.cell,
                "horizon": str(model.config.horizon),
                "backtest_mase": repr(float(bt.metrics["mase"])),
                "best_baseline": baseline,
                "best_baseline_mase": repr(baseline_mase),
                "gate_margin": repr(cfg.gate.margin),
                "stop_reason": result.stop_reason,
                "data_fingerprint": fp["sha256"],
            }
            version = log_and_register(tmp / "onnx", cfg.mlflow.registered_model, tags, example)
        decision = promote(cfg.mlflow.registered_model, version.version, force=force)
        mlflow.set_tags({"promoted": str(decision.promoted), "promotion_reason": decision.reason})
        log.info("promotion gate: %s", decision.reason)

    return FitOutcome(
        run_id=run_id,
        registered_model=cfg.mlflow.registered_model,
        version=str(version.version),
        model_uri=f"models:/{cfg.mlflow.registered_model}/{version.version}",
        forecasting_model_uri=version.tags[FORECASTING_TAG],
        backtest=bt,
        training=result,
        promotion=decision,
        parity=report.parity,
    )
