"""The fit config: a YAML file of sections (data, model, train, eval, mlflow, gate), typed and
validated into frozen dataclasses, with ``--set section.key=value`` overrides on top."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from training.data import DataConfig
from training.model import ModelConfig
from training.train import TrainConfig

# Keys of ModelConfig a user sets; the rest (covariates, freq_ms, scaling) come from the data.
MODEL_KEYS = (
    "cell",
    "hidden_size",
    "num_layers",
    "members",
    "dropout",
    "horizon",
    "quantiles",
    "daily_harmonics",
    "holidays",
    "lags",
)


class ConfigError(ValueError):
    """The config file or an override is wrong; the message says what to write instead."""


@dataclass(frozen=True)
class EvalConfig:
    season: int = 48  # steps per season, for seasonal naive and MASE
    test_fraction: float = 0.2  # last share of each series held out for the backtest

    def __post_init__(self) -> None:
        if int(self.season) < 1:
            raise ValueError(f"eval.season must be a positive integer, got {self.season!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"eval.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "forecaster"
    registered_model: str = "forecaster"

    def __post_init__(self) -> None:
        if not self.experiment or not self.registered_model:
            raise ValueError("mlflow.experiment and mlflow.registered_model must not be empty")


@dataclass(frozen=True)
class GateConfig:
    # The promotion gate: a version's backtest MASE must be below (1 - margin) x the best
    # baseline's (and below production's on the same data) before it becomes 'production'.
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"gate.margin must be in [0, 1) (a share of the best baseline's MASE), got {self.margin}")


@dataclass(frozen=True)
class FitConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # lags None: chosen from the data by the pipeline (training.pipeline.resolve)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lags=None))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for f in fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            if f.name == "model":
                section = {k: section[k] for k in MODEL_KEYS}
            out[f.name] = section
        return out

    def flat(self) -> dict[str, str]:
        """``section.key -> value`` strings, for MLflow params."""
        return {
            f"{sec}.{key}": json.dumps(val) if isinstance(val, list | tuple | dict) else str(val)
            for sec, values in self.to_dict().items()
            for key, val in values.items()
        }


SECTIONS: dict[str, tuple[type, tuple[str, ...]]] = {
    "data": (DataConfig, tuple(f.name for f in fields(DataConfig))),
    "model": (ModelConfig, MODEL_KEYS),
    "train": (TrainConfig, tuple(f.name for f in fields(TrainConfig))),
    "eval": (EvalConfig, tuple(f.name for f in fields(EvalConfig))),
    "mlflow": (MlflowConfig, tuple(f.name for f in fields(MlflowConfig))),
    "gate": (GateConfig, tuple(f.name for f in fields(GateConfig))),
}


def apply_override(raw: dict[str, dict[str, Any]], assignment: str) -> None:
    """Apply one ``section.key=value`` (value parsed as YAML: numbers, lists, null) to ``raw``."""
    path, sep, value = assignment.partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"--set expects section.key=value, e.g. train.lr=0.001; got {assignment!r}")
    raw.setdefault(section, {})[key] = yaml.safe_load(value)


def build_config(raw: dict[str, Any]) -> FitConfig:
    """Validate a dict of sections into a FitConfig, naming any unknown section or key."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping of sections: data, model, train, eval, mlflow, gate")
    built = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join(SECTIONS)}")
        cls, keys = SECTIONS[section]
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of keys")
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise ConfigError(f"unknown key(s) {section}.{', '.join(unknown)}; known in {section!r}: {', '.join(keys)}")
        if section == "model":
            values = {"lags": None, **values}  # unset: chosen from the data (see ModelConfig.lags)
        try:
            built[section] = cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config section {section!r}: {exc}") from exc
    return FitConfig(**built)


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> FitConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (try configs/elecdemand.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    for assignment in overrides:
        apply_override(raw, assignment)
    return build_config(raw)
