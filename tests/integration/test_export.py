"""The exported graphs against PyTorch and against each other, in real ONNX Runtime."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.conftest import train_tiny, zero_state_feeds
from training.export import PARITY_TOLERANCE, check_parity, export_model

VARIANTS = [
    ("lstm", (), ()),
    ("lstm", ("temp", "workday"), (12, 48)),
    ("gru", (), (12, 48)),
    ("gru", ("temp",), ()),
]


@pytest.mark.parametrize("cell, covariates, lags", VARIANTS)
def test_graphs_follow_the_contract_and_agree(tmp_path, cell, covariates, lags):
    model = train_tiny(cell, covariates, epochs=1, lags=lags)
    assert sum(model.config.blend) == 0.5  # the reference blend is in the graphs the parity checks compare
    report = export_model(model, tmp_path, metadata={"target": "load", "mlflow_run_id": "r1"})
    assert report.worst < PARITY_TOLERANCE
    assert set(report.parity) == {
        "step_ort_vs_torch",
        "sequence_ort_vs_torch",
        "step_x_T_vs_sequence",
        "alone_vs_batched",
    }

    cfg, c = model.config, len(covariates)
    state_in = (["h", "c"] if cell == "lstm" else ["h"]) + (["lags", "lags_seen"] if lags else [])
    for name, time_axis in (("model.onnx", False), ("sequence.onnx", True)):
        proto = onnx.load(str(tmp_path / name))
        onnx.checker.check_model(proto, full_check=True)
        inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        outputs = [o.name for o in proto.graph.output]
        expected = ["values", "timestamps_ms"] + (["covariates"] if c else []) + state_in
        assert list(inputs) == expected
        assert len(inputs["values"]) == (2 if time_axis else 1)
        assert inputs["h"][0] == cfg.num_layers and inputs["h"][2] == cfg.hidden_size
        if lags:  # the lag buffer [B, S] and its count [B, 1]: batch first
            assert inputs["lags"][1] == max(lags) and inputs["lags_seen"][1] == 1
            assert isinstance(inputs["lags"][0], str) and isinstance(inputs["h"][1], str)  # dynamic batch axes
        assert outputs == ["forecast"] + [f"{s}_out" for s in state_in]
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["cell"] == cell and meta["horizon"] == str(cfg.horizon)
        assert meta["quantiles"] == "0.1,0.5,0.9" and meta["covariates"] == ",".join(covariates)
        assert meta["freq_ms"] == "1800000" and meta["target"] == "load" and meta["mlflow_run_id"] == "r1"
        assert json.loads(meta["model_config"])["hidden_size"] == cfg.hidden_size
        assert meta["state"] == ",".join(state_in) and meta["lags"] == ",".join(map(str, lags))
        assert meta["point_quantile"] == "0.5" and meta["season"] == "48"
        ops = {n.op_type for n in proto.graph.node}
        assert ("LSTM" if cell == "lstm" else "GRU") in ops  # native recurrent ops, not unrolled


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_model_of_members_exports_as_one_plain_recurrent_graph(tmp_path, cell):
    model = train_tiny(cell, epochs=1, members=2)
    report = export_model(model, tmp_path, metadata={"target": "load", "mlflow_run_id": "r1"})
    assert report.worst < PARITY_TOLERANCE
    proto = onnx.load(str(tmp_path / "model.onnx"))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert inputs["h"][2] == 16  # the state holds both members: H = hidden_size
    assert ("LSTM" if cell == "lstm" else "GRU") in {n.op_type for n in proto.graph.node}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["hidden_size"] == "16" and json.loads(meta["model_config"])["members"] == 2


def test_a_wrong_gru_export_is_caught(tmp_path):
    """The historical exporter bug: GRU with the wrong linear_before_reset gives silently wrong
    numbers. Parity must catch exactly that."""
    model = train_tiny("gru", (), epochs=1)
    export_model(model, tmp_path)
    proto = onnx.load(str(tmp_path / "model.onnx"))
    for node in proto.graph.node:
        if node.op_type == "GRU":
            for attr in node.attribute:
                if attr.name == "linear_before_reset":
                    attr.i = 1 - attr.i
    onnx.save(proto, str(tmp_path / "model.onnx"))
    worst = check_parity(model, tmp_path / "model.onnx", tmp_path / "sequence.onnx")
    assert worst["step_ort_vs_torch"] > PARITY_TOLERANCE
    assert worst["step_x_T_vs_sequence"] > PARITY_TOLERANCE


def test_forecasts_are_in_data_units(tmp_path, tiny_model_dir):
    from tests.conftest import synthetic_series

    d = tiny_model_dir("lstm")
    s = synthetic_series(n=48 * 5, seed=0)
    seq = ort.InferenceSession(str(d / "sequence.onnx"), providers=["CPUExecutionProvider"])
    forecast = seq.run(
        None, {"values": s.values[None], "timestamps_ms": s.timestamps_ms[None], **zero_state_feeds(seq, 1)}
    )[0]
    # The synthetic series lives around 10 (0.55 .. 1.3 of level 10): so must its forecasts.
    assert 4.0 < float(np.median(forecast)) < 16.0
    assert (np.diff(forecast, axis=-1) >= 0).all()


def test_holiday_calendar_is_inside_the_graphs(tmp_path):
    """Holiday and weekday flags are computed in the graphs from int64 ms, exactly at midnight
    too (an exporter's float32 division once put the day boundary minutes off)."""
    import torch

    from training.export import _torch_run
    from training.model import Forecaster

    torch.manual_seed(0)
    model = Forecaster(replace(train_tiny("lstm", (), epochs=1).config, holidays=("2014-04-25",))).eval()
    export_model(model, tmp_path)  # includes the calendar-edge parity checks
    step = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    midnight = 1_398_470_400_000  # 2014-04-26 00:00 UTC, the day after the holiday
    ts = np.array([midnight - 1_800_000, midnight, midnight + 1, midnight - 7 * 86_400_000], np.int64)
    feeds = {"values": np.full(4, 10.0, np.float32), "timestamps_ms": ts, **zero_state_feeds(step, 4)}
    got = step.run(None, feeds)[0]
    np.testing.assert_allclose(got, _torch_run(model, feeds, step=True)[0], rtol=1e-5, atol=1e-5)
    flags = model.features(torch.full((4, 1), 10.0), torch.from_numpy(ts)[:, None], None)[:, 0, -2:]
    assert flags.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]  # holiday only until midnight
    assert not np.allclose(got[0], got[1])
