"""bench/peers.py's verdicts: the same-forecast check, the table rows and the targets. What a reader
of the table relies on: a system whose forecasts differ, or that did not run, can never pass."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import peers


def _cell(obs_per_s: float, p50_ms: float, cpu_s_per_1k_obs: float) -> dict:
    return {"obs_per_s": obs_per_s, "p50_ms": p50_ms, "p99_ms": 2 * p50_ms, "cpu_s_per_1k_obs": cpu_s_per_1k_obs,
            "rss_mib": 100.0, "observations": 1000}  # fmt: skip


def test_agreement_is_relative_for_large_values_absolute_near_zero_and_fails_on_shape():
    reference = np.array([[[0.0, 4.0, 1000.0]]], np.float32)  # [C=1, horizon=1, Q=3]
    answers = {
        "close": reference + np.array([[[5e-4, 4e-3, 0.5]]], np.float32),  # within 1e-3 of (1 + |b|)
        "off": reference + np.array([[[2e-3, 0.0, 0.0]]], np.float32),  # 2e-3 away from 0
        "wrong shape": reference[:, :, :2],
        "nan": np.full_like(reference, np.nan),  # a system that could not be checked
    }
    checks = peers.agreement(answers, reference)
    assert checks["close"]["agrees"] and checks["close"]["max_error"] < 1e-3
    assert not checks["off"]["agrees"]
    assert not checks["wrong shape"]["agrees"] and math.isinf(checks["wrong shape"]["max_error"])
    assert not checks["nan"]["agrees"]


def test_rows_say_which_systems_did_not_run_crashed_or_failed_rounds_and_why():
    cells = {
        peers.THIS: {1: _cell(500, 1.5, 1.2), 64: {"error": "UNAVAILABLE: the server exited"}},
        peers.TRITON: {64: {**_cell(900, 60.0, 0.5), "failed_rounds": ["AioRpcError: Stream removed"]}},
    }
    checks = {peers.THIS: {"max_error": 4e-7, "agrees": True}, peers.TRITON: {"max_error": 2e-3, "agrees": False}}
    crashes = {peers.TRITON: ["tritonserver exited with -11 (Signal (11) received.)"]}
    rows = peers.build_rows(cells, {peers.MLFLOW: "no uvicorn on PATH"}, checks, crashes)
    assert rows[0]["K"] == 1 and rows[0]["same forecasts"].startswith("yes")
    assert rows[1]["K"] == 64 and rows[1]["note"] == "failed: UNAVAILABLE: the server exited"
    assert rows[2]["same forecasts"].startswith("NO")
    assert "crashed 1x during the run, restarted: tritonserver exited with -11" in rows[2]["note"]
    assert "1 round(s) failed" in rows[2]["note"]
    assert rows[3] == {"system": peers.MLFLOW, "note": "could not run here: no uvicorn on PATH"}


def test_targets_are_ratios_at_64_series_and_unmeasurable_when_a_peer_is_missing():
    cells = {
        peers.THIS: {64: _cell(2000, 30.0, 0.30)},
        peers.MLFLOW: {64: _cell(25, 2400.0, 24.0)},
        peers.TRITON: {64: _cell(1600, 35.0, 0.40)},
        peers.ECHO: {64: _cell(3000, 18.0, 0.15)},
    }
    floors = {"batched": {"server_cpu_us_per_obs": 30.0, "ort_cpu_us_per_obs": 20.0}}
    got = {t["target"]: t for t in peers.targets(cells, floors)}
    mlflow = got[f"K=64: obs/s vs {peers.MLFLOW}"]
    assert mlflow["measured"] == pytest.approx(80) and mlflow["met"] is True
    assert got[f"K=64: p50 latency vs {peers.MLFLOW}"]["met"] is True  # 30 / 2400 <= 1/10
    mlserver = got[f"K=64: obs/s vs {peers.MLSERVER}"]
    assert mlserver["measured"] is None and mlserver["met"] is None  # not run: never "met"
    assert (
        got["K=64: obs/s vs Triton"]["measured"] == pytest.approx(1.25) and got["K=64: obs/s vs Triton"]["met"] is False
    )
    assert (
        got["K=64: CPU per obs vs Triton"]["measured"] == pytest.approx(0.75)
        and got["K=64: CPU per obs vs Triton"]["met"] is False
    )
    batched = got["CPU per obs, 256 series per message, vs ONNX Runtime alone at batch 256"]
    assert batched["measured"] == pytest.approx(1.5) and batched["met"] is True
    echo = got["K=64: CPU per obs, one observation per message, vs the echo server"]
    assert echo["measured"] == pytest.approx(2.0) and echo["met"] is False


def test_median_round_keeps_the_middle_round_and_every_rounds_figure():
    rounds = [_cell(300, 1, 1), _cell(100, 1, 1), _cell(200, 1, 1)]
    best = peers.median_round(rounds)
    assert best["obs_per_s"] == 200 and best["round_obs_per_s"] == [300, 100, 200]
