"""Live accuracy against a real registry (sqlite MLflow store in a temp dir): the drift ratio,
and champion/challenger: a candidate run in shadow, promoted on live evidence with
`python -m training promote --live`, refused when the roles are reversed."""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest
from mlflow import MlflowClient

from serving.config import MonitorConfig
from serving.proto import pb, pb_grpc
from tests.conftest import register_model_dir, synthetic_series, train_tiny
from tests.serving_support import RunningServer, Stream, metric, server_config, wait_for

SHIFTED = 100.0  # the level after the shift (before: 10); offline, the after-shift model's MAE is 10% lower


@pytest.fixture(scope="module")
def after_shift_dir(tmp_path_factory):
    """The tiny model trained on the series after its level rose tenfold: the challenger. (The tiny
    model of model_dir was trained before the shift: production.)"""
    from training.export import export_model

    out = tmp_path_factory.mktemp("after_shift")
    export_model(train_tiny(level=SHIFTED), out, metadata={"target": "demand", "mlflow_run_id": "none"})
    return out


@pytest.fixture(scope="module")
def network_alone_dir(tmp_path_factory):
    """The tiny model without the reference blend: the network alone, whose forecasts stay wrong
    after a level shift (blended with the seasonal naive of a day, a forecast follows a new level
    within a day, and the live MASE rises less)."""
    from training.export import export_model

    out = tmp_path_factory.mktemp("network_alone")
    export_model(train_tiny(blend=0.0), out, metadata={"target": "demand", "mlflow_run_id": "none"})
    return out


def live(stub) -> pb.LiveAccuracy:
    return stub.GetLiveAccuracy(pb.GetLiveAccuracyRequest(), timeout=30)


def stream_series(stub, ids: list[str], values: np.ndarray, timestamps: np.ndarray) -> None:
    """One stream, every series stepped through values [T] together (one message per step)."""
    stream = Stream(stub)
    for t, v in zip(timestamps.tolist(), values.tolist()):
        stream.send(*({"series_id": s, "timestamp_ms": t, "value": v} for s in ids))
    stream.close()


def recent_mase(report: pb.LiveAccuracy) -> float:
    (served,) = [v for v in report.versions if v.role == "served"]
    n = sum(b.mase_scored for b in served.recent)
    return sum(b.mase * b.mase_scored for b in served.recent) / n


def test_level_shift_raises_recent_mase_and_the_drift_ratio(mlflow_store, network_alone_dir):
    """A series whose level triples halfway: the recent window's live MASE rises above its value
    before the shift, and forecast_live_drift_ratio (recent MASE / backtest MASE 0.5) with it."""
    register_model_dir(mlflow_store, network_alone_dir, alias="production", mase=0.5)
    series = synthetic_series(360, seed=3)
    values = series.values.copy()
    values[240:] *= 3.0
    config = replace(
        server_config("models:/forecaster@production", mlflow_store), monitor=MonitorConfig(window_observations=96)
    )
    with RunningServer(config) as s, grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        stream_series(stub, ["shifting"], values[:240], series.timestamps_ms[:240])
        before, report = recent_mase(live(stub)), live(stub)
        (served,) = report.versions
        assert served.backtest_mase == 0.5
        assert served.drift == pytest.approx(before / 0.5)
        drift_before = metric(s.metrics_url, "forecast_live_drift_ratio", version="1")
        stream_series(stub, ["shifting"], values[240:], series.timestamps_ms[240:])
        after = recent_mase(live(stub))
        drift_after = metric(s.metrics_url, "forecast_live_drift_ratio", version="1")
    assert after > 1.5 * before, (before, after)
    assert drift_after == pytest.approx(after / 0.5, rel=1e-6)
    assert drift_after > drift_before


def shadow_beside(stub, shadow: str, served: str) -> bool:
    versions = live(stub).versions
    return any(v.role == "served" and v.model_version == served and v.shadow_version == shadow for v in versions)


def promote_live(target: str, capsys) -> tuple[int, str]:
    from training.__main__ import main

    code = main(["promote", "--live", target, "--min-observations", "300", "--margin", "0.02"])
    return code, capsys.readouterr().out


def test_candidate_in_shadow_promoted_on_live_evidence_and_refused_reversed(
    mlflow_store, model_dir, after_shift_dir, capsys
):
    """Production trained before a level shift, the candidate after it, the live data after it."""
    bad = register_model_dir(mlflow_store, model_dir, alias="production")  # "1": trained before the shift
    good = register_model_dir(mlflow_store, after_shift_dir)  # "2", alias candidate: trained after it
    config = replace(
        server_config("models:/forecaster@production", mlflow_store, watch_interval_s=0.3),
        monitor=MonitorConfig(shadow_alias="candidate"),
    )
    series = synthetic_series(200, seed=4, level=SHIFTED)  # the live data: after the shift
    client = MlflowClient()
    with RunningServer(config) as s, grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        wait_for(lambda: shadow_beside(stub, good, bad), timeout=60)
        stream_series(stub, ["p0", "p1"], series.values, series.timestamps_ms)
        report = live(stub)
        (shadow,) = [v for v in report.versions if v.role == "shadow"]
        assert shadow.model_version == good and shadow.monitored_series == 2
        assert sum(b.scored for b in shadow.since_load) > 0

        code, out = promote_live(s.target, capsys)
        assert code == 0, out
        assert "beats production version 1" in out
        assert str(client.get_model_version_by_alias("forecaster", "production").version) == good
        wait_for(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).version == good, timeout=60)
        run = client.get_run(client.get_model_version("forecaster", good).run_id)
        assert run.data.tags["live_promotion"] == "promoted" and run.data.metrics["live_pairs"] >= 300

        # Roles reversed: the old production version is the candidate now, in shadow beside the new one.
        client.set_registered_model_alias("forecaster", "candidate", bad)
        wait_for(lambda: shadow_beside(stub, bad, good), timeout=60)
        stream_series(stub, ["q0", "q1"], series.values, series.timestamps_ms)
        code, out = promote_live(s.target, capsys)
        assert code == 3, out
        assert "does not beat production version 2" in out
        assert str(client.get_model_version_by_alias("forecaster", "production").version) == good
        run = client.get_run(client.get_model_version("forecaster", bad).run_id)
        assert run.data.tags["live_promotion"] == "refused"
