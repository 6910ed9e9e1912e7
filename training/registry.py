"""The MLflow model registry: log both graphs as one model version, tag it, gate promotion.

One registered version holds both graphs (``model.onnx`` as the ONNX flavor's model,
``sequence.onnx`` as an extra file), so one alias always names a matching pair; its signature is
the step graph's own tensors, each with its batch axis (-1). Every new version gets alias
``candidate``; ``production`` moves only through :func:`promote`.

The same run also logs the forecasting pyfunc (``training/forecasting_pyfunc.py``, artifact
``forecasting``): the sequence graph behind a DataFrame-in, DataFrame-out ``predict`` for
MLflow's tools. A model has one pyfunc and one signature, so it cannot be both the tensor-level
graph (what the server, MLServer and tensor clients take) and the forecaster; it is a second
model of the run, named on the version by the tag ``forecasting_model_uri``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from training import forecasting_pyfunc
from training.export import SEQUENCE_FILE, STEP_FILE

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
PRODUCTION = "production"
# What the serving side needs to run the graphs; the ONNX flavor would otherwise guess.
SERVING_REQUIREMENTS = ["onnxruntime-gpu==1.31.1", "numpy>=2.0,<3"]
# ...and the forecasting pyfunc, which takes and returns DataFrames.
FORECASTING_REQUIREMENTS = [*SERVING_REQUIREMENTS, "pandas>=2.2"]
FORECASTING_ARTIFACT = "forecasting"
FORECASTING_TAG = "forecasting_model_uri"


class RegistryError(RuntimeError):
    """A registry operation cannot be done as asked (unknown version, missing tags...)."""


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    version: str
    reason: str


def graph_signature(graph: onnx.ModelProto) -> ModelSignature:
    """The graph's inputs and outputs as MLflow tensor specs, each dynamic dim -1.

    Read from the graph, not inferred from an example: an example fixes its batch size, and the
    batch is not the first axis of every tensor (``h``, ``c`` are [L, B, H]; ``values`` [B],
    ``covariates`` [B, C], ``lags`` [B, S], ``forecast`` [B, horizon, Q]).
    """
    from onnx import helper

    def specs(nodes) -> Schema:
        out = []
        for node in nodes:
            tensor = node.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
            out.append(TensorSpec(np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), shape, node.name))
        return Schema(out)

    return ModelSignature(specs(graph.graph.input), specs(graph.graph.output))


def log_forecasting_model(model_dir: Path) -> str:
    """Log the forecasting pyfunc for ``model_dir``'s sequence graph in the active run; returns its
    ``runs:/RUN_ID/forecasting`` URI. It carries its own copy of the graph and its code, so loading
    it needs no project code and no torch."""
    meta = {p.key: p.value for p in onnx.load(str(Path(model_dir) / SEQUENCE_FILE)).metadata_props}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "graph"  # -> the model's data/graph/sequence.onnx
        data.mkdir()
        shutil.copy(Path(model_dir) / SEQUENCE_FILE, data / SEQUENCE_FILE)
        mlflow.pyfunc.log_model(
            name=FORECASTING_ARTIFACT,
            loader_module=forecasting_pyfunc.__name__.rsplit(".", 1)[-1],
            data_path=str(data),
            code_paths=[forecasting_pyfunc.__file__],
            signature=forecasting_pyfunc.signature(meta),
            input_example=forecasting_pyfunc.input_example(meta),
            pip_requirements=FORECASTING_REQUIREMENTS,
        )
    return f"runs:/{mlflow.active_run().info.run_id}/{FORECASTING_ARTIFACT}"


def log_and_register(
    model_dir: Path,
    registered_model: str,
    tags: dict[str, str],
    input_example: dict[str, np.ndarray],
) -> ModelVersion:
    """Log ``model_dir``'s graphs as an ONNX model in the active run and register a new version;
    log the forecasting pyfunc beside it (tag ``forecasting_model_uri`` on the version).

    ``tags`` go on the version (run id, cell, horizon, backtest MASE, data fingerprint...);
    the version gets alias ``candidate``. ``input_example`` feeds the step graph (batch >= 1).
    """
    model_dir = Path(model_dir)
    step = onnx.load(str(model_dir / STEP_FILE))
    # MLflow's check of an input example (both models log one) patches os.environ process-wide to
    # record the variables it reads, and fails with "Set changed size during iteration" when
    # another thread (a server's alias watcher, in the tests) reads one meanwhile. The record only
    # serves Databricks' endpoints; set the variable to true to have it anyway.
    os.environ.setdefault("MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING", "false")
    forecasting_uri = log_forecasting_model(model_dir)
    info = mlflow.onnx.log_model(
        step,
        name="model",
        extra_files=[str(model_dir / SEQUENCE_FILE)],
        signature=graph_signature(step),
        input_example=input_example,
        pip_requirements=SERVING_REQUIREMENTS,
        save_as_external_data=False,
        registered_model_name=registered_model,
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in {**tags, FORECASTING_TAG: forecasting_uri}.items():
        client.set_model_version_tag(registered_model, version, key, str(value))
    client.set_registered_model_alias(registered_model, CANDIDATE, version)
    log.info(
        "registered %s version %s (alias %s); forecasting pyfunc %s",
        registered_model,
        version,
        CANDIDATE,
        forecasting_uri,
    )
    return client.get_model_version(registered_model, version)


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:  # no such alias (or model) yet
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _mase(version: ModelVersion) -> float:
    try:
        return float(version.tags["backtest_mase"])
    except (KeyError, ValueError) as exc:
        raise RegistryError(f"version {version.version} has no numeric 'backtest_mase' tag") from exc


def best_baseline(baselines: dict[str, dict[str, float]]) -> tuple[str, float]:
    """The baseline with the lowest backtest MASE: (name, MASE)."""
    name = min(baselines, key=lambda k: baselines[k]["mase"])
    return name, float(baselines[name]["mase"])


def promote(name: str, version: str | None = None, force: bool = False, margin: float | None = None) -> Promotion:
    """The promotion gate: move ``production`` to ``version`` (default: the ``candidate``).

    It moves only when the version's backtest MASE is below (1 - margin) x the best baseline's
    (tags ``best_baseline``, ``best_baseline_mase``; ``margin`` defaults to the version's
    ``gate_margin`` tag, the fit's ``gate.margin``), even for the first version, and below
    production's on the same data fingerprint when there is a production version. ``force``
    skips both checks.
    """
    client = MlflowClient()
    if version is None:
        cand = alias_version(client, name, CANDIDATE)
        if cand is None:
            raise RegistryError(f"registered model {name!r} has no {CANDIDATE!r} alias; pass --version N")
    else:
        try:
            cand = client.get_model_version(name, str(version))
        except MlflowException as exc:
            raise RegistryError(f"registered model {name!r} has no version {version}") from exc
    prod = alias_version(client, name, PRODUCTION)
    v = str(cand.version)
    if prod is not None and str(prod.version) == v:
        return Promotion(False, v, f"version {v} already holds {PRODUCTION!r}")
    if force:
        reason = f"forced: version {v} is now {PRODUCTION!r}"
    else:
        new = _mase(cand)
        margin = float(cand.tags.get("gate_margin", 0.0)) if margin is None else margin
        baseline, baseline_mase = cand.tags.get("best_baseline"), cand.tags.get("best_baseline_mase")
        if baseline_mase is None:
            versus = "no baseline recorded"
        else:
            limit = float(baseline_mase) * (1.0 - margin)
            if not new < limit:
                return Promotion(
                    False,
                    v,
                    f"version {v} MASE {new:.4f} does not beat the best baseline ({baseline}, MASE "
                    f"{float(baseline_mase):.4f}) by gate.margin {margin:g} (needs < {limit:.4f}); it stays "
                    f"{CANDIDATE!r} (use --force to promote anyway)",
                )
            versus = f"best baseline {baseline} {float(baseline_mase):.4f}"
        if prod is None:
            reason = f"no {PRODUCTION!r} version yet; version {v} (MASE {new:.4f}; {versus}) becomes it"
        else:
            old = _mase(prod)
            same_data = cand.tags.get("data_fingerprint") == prod.tags.get("data_fingerprint")
            if not same_data:
                return Promotion(
                    False,
                    v,
                    f"version {v} was backtested on other data than production version {prod.version} "
                    f"(fingerprints differ), so their MASE cannot be compared; use --force to promote anyway",
                )
            if not new < old:
                return Promotion(
                    False,
                    v,
                    f"version {v} MASE {new:.4f} does not beat production version {prod.version} MASE {old:.4f}",
                )
            reason = f"version {v} MASE {new:.4f} beats production version {prod.version} MASE {old:.4f} ({versus})"
    client.set_registered_model_alias(name, PRODUCTION, v)
    log.info("promoted %s version %s: %s", name, v, reason)
    return Promotion(True, v, reason)
