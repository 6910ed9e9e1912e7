"""The registry round trip and the promotion gate, through a real sqlite MLflow store."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
from mlflow import MlflowClient

from tests.conftest import register_model_dir, synthetic_series, zero_state_feeds
from training.registry import RegistryError, promote


def alias_of(alias: str, name: str = "forecaster") -> str:
    return str(MlflowClient().get_model_version_by_alias(name, alias).version)


def find(root: str, name: str) -> str:
    for folder, _, files in os.walk(root):
        if name in files:
            return os.path.join(folder, name)
    raise AssertionError(f"{name} not in {root}")


def test_a_registered_version_runs_in_plain_onnxruntime(mlflow_store, tiny_model_dir):
    version = register_model_dir(mlflow_store, tiny_model_dir("lstm"), alias="production")
    client = MlflowClient()
    mv = client.get_model_version("forecaster", version)
    assert mv.tags["backtest_mase"] == "1.0" and alias_of("candidate") == version

    for alias in ("candidate", "production"):
        root = mlflow.artifacts.download_artifacts(f"models:/forecaster@{alias}")
        step = ort.InferenceSession(find(root, "model.onnx"), providers=["CPUExecutionProvider"])
        seq = ort.InferenceSession(find(root, "sequence.onnx"), providers=["CPUExecutionProvider"])
        meta = step.get_modelmeta().custom_metadata_map
        horizon, names = int(meta["horizon"]), meta["state"].split(",")

        # Three series streamed step by step == one run of the sequence graph == each alone.
        series = [synthetic_series(n=60, seed=k, series_id=f"s{k}", level=10.0 * (k + 1)) for k in range(3)]
        values = np.stack([s.values for s in series])
        ts = np.stack([s.timestamps_ms for s in series])
        state = zero_state_feeds(step, 3)  # h, c and the lag buffer, from the graph's metadata
        for t in range(values.shape[1]):
            forecast, *outs = step.run(None, {"values": values[:, t], "timestamps_ms": ts[:, t], **state})
            state = dict(zip(names, outs))
        whole = seq.run(None, {"values": values, "timestamps_ms": ts, **zero_state_feeds(seq, 3)})[0]
        np.testing.assert_allclose(forecast, whole, rtol=1e-4, atol=1e-4)
        assert forecast.shape == (3, horizon, 3) and (np.diff(forecast, axis=-1) >= 0).all()
        alone = seq.run(None, {"values": values[2:], "timestamps_ms": ts[2:], **zero_state_feeds(seq, 1)})[0]
        np.testing.assert_allclose(alone, whole[2:], rtol=1e-5, atol=1e-5)


def test_the_gate_promotes_a_better_model_and_keeps_a_worse_one_out(mlflow_store, tiny_model_dir):
    d = tiny_model_dir("gru")
    v1 = register_model_dir(mlflow_store, d, mase=0.9)
    first = promote("forecaster")
    assert first.promoted and "no 'production'" in first.reason
    v2 = register_model_dir(mlflow_store, d, mase=0.95)
    worse = promote("forecaster")
    assert not worse.promoted and "does not beat" in worse.reason
    assert alias_of("production") == v1
    assert alias_of("candidate") == v2
    v3 = register_model_dir(mlflow_store, d, mase=0.7)
    better = promote("forecaster")
    assert better.promoted and alias_of("production") == v3
    forced = promote("forecaster", version=v2, force=True)
    assert forced.promoted and alias_of("production") == v2
    with pytest.raises(RegistryError, match="no version 99"):
        promote("forecaster", version="99")


def test_no_version_is_promoted_unless_it_beats_the_best_baseline(mlflow_store, tiny_model_dir):
    d = tiny_model_dir("lstm")
    register_model_dir(mlflow_store, d, mase=0.9, baseline_mase=0.85)
    first = promote("forecaster")  # the first version too: a loser never becomes production
    assert not first.promoted and "does not beat the best baseline (seasonal_naive, MASE 0.8500)" in first.reason
    assert MlflowClient().get_registered_model("forecaster").aliases.get("production") is None
    v2 = register_model_dir(mlflow_store, d, mase=0.84, baseline_mase=0.85)
    assert not promote("forecaster", margin=0.05).promoted  # 0.84 is not below 0.95 x 0.85
    assert promote("forecaster").promoted and alias_of("production") == v2


def test_mlflow_pyfunc_runs_the_registered_step_graph_at_any_batch_size(mlflow_store, tiny_model_dir):
    """The version's signature is the graph's: each tensor's batch axis is -1 wherever the graph has
    it (h, c [L, -1, H]; lags [-1, S]), so MLflow's own loader takes batch 1, 3 and 64."""
    model_dir = tiny_model_dir("lstm", covariates=("temperature", "workday"))
    register_model_dir(mlflow_store, model_dir, alias="production")
    model = mlflow.pyfunc.load_model("models:/forecaster@production")
    step = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    graph = {node.name: node.shape for node in [*step.get_inputs(), *step.get_outputs()]}
    sig = model.metadata.signature
    specs = {s.name: s.shape for s in [*sig.inputs.inputs, *sig.outputs.inputs]}
    assert specs == {name: tuple(d if isinstance(d, int) else -1 for d in shape) for name, shape in graph.items()}
    assert specs["h"] == (2, -1, 16) and specs["lags"] == (-1, 48) and specs["covariates"] == (-1, 2)

    rng = np.random.default_rng(3)
    for batch in (1, 3, 64):
        series = [synthetic_series(n=1, seed=k, covariates=2) for k in range(batch)]
        later = rng.integers(0, 100, batch) * 1_800_000  # each series at its own time of day
        feeds = {
            "values": np.concatenate([s.values for s in series]),
            "timestamps_ms": np.concatenate([s.timestamps_ms for s in series]) + later,
            "covariates": np.concatenate([s.covariates for s in series]),
            **zero_state_feeds(step, batch),
        }
        got = model.predict(feeds)
        want = dict(zip([o.name for o in step.get_outputs()], step.run(None, feeds)))
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
        assert got["forecast"].shape == (batch, 6, 3) and got["h_out"].shape == (2, batch, 16)
