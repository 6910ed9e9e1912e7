"""Live accuracy (issue #17): a real server scores its own forecasts as the actuals arrive.

The figures it reports (GetLiveAccuracy, /metrics) are checked against a plain numpy
recomputation from the offline step graph's forecasts on the same data.
"""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest

from serving.config import MonitorConfig
from serving.live import horizon_buckets
from serving.proto import pb, pb_grpc
from tests.conftest import synthetic_series
from tests.serving_support import FREQ_MS, OfflineModel, RunningServer, Stream, server_config


def expected_buckets(runs, quantiles, point, season, horizon) -> list[dict]:
    """Per horizon bucket: every (forecast, actual) pair of every series, scored in plain loops.

    runs: [(timestamps_ms [T], values [T], forecasts [T, H, Q])]; the MASE scale at t is the mean
    of |y_s - y_{s - season}| over the series' observations s <= t that have one a season back.
    """
    pairs = {k: [] for k in range(1, horizon + 1)}  # lead -> [(y, forecast [Q], scale)]
    for ts, y, fc in runs:
        at = {int(t): j for j, t in enumerate(ts)}
        scale, total, count = np.full(len(ts), np.nan), 0.0, 0
        for j, t in enumerate(ts):
            back = at.get(int(t) - season * FREQ_MS)
            if back is not None:
                total, count = total + abs(float(y[j]) - float(y[back])), count + 1
            scale[j] = total / count if count else np.nan
        for i, t in enumerate(ts):
            for k in range(1, horizon + 1):
                j = at.get(int(t) + k * FREQ_MS)
                if j is not None:
                    pairs[k].append((float(y[j]), fc[i, k - 1].astype(np.float64), scale[j]))
    q = np.array(quantiles)
    out = []
    for lo, hi in horizon_buckets(horizon):
        ps = [p for k in range(lo, hi + 1) for p in pairs[k]]
        err = [abs(y - f[point]) for y, f, _ in ps]
        pin = [np.mean(np.maximum(q * (y - f), (q - 1) * (y - f))) for y, f, _ in ps]
        cover = [f[0] <= y <= f[-1] for y, f, _ in ps]
        scaled = [abs(y - f[point]) / s for y, f, s in ps if s > 0]
        out.append(
            {"scored": len(ps), "mae": np.mean(err), "pinball": np.mean(pin), "coverage": np.mean(cover),
             "mase": np.mean(scaled), "mase_scored": len(scaled)}
        )  # fmt: skip
    return out


def test_live_scores_equal_an_offline_recomputation(model_dir):
    """Two series streamed together (one with a gap of three missing steps): MAE, pinball,
    coverage and MASE per horizon bucket equal the recomputation from the step graph offline."""
    offline = OfflineModel(model_dir)
    meta = offline.step.get_modelmeta().custom_metadata_map
    horizon, season = int(meta["horizon"]), int(meta["season"])
    n = 260
    a = synthetic_series(n, series_id="a", seed=1)
    b = synthetic_series(n, series_id="b", level=20.0, seed=2)
    b_steps = [t for t in range(n) if not 120 <= t < 123]  # a gap: the next forecasts' leads shift
    config = replace(server_config(str(model_dir)), monitor=MonitorConfig(window_observations=64))
    with RunningServer(config) as s, grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        stream = Stream(stub)
        for t in range(n):
            obs = [{"series_id": "a", "timestamp_ms": int(a.timestamps_ms[t]), "value": float(a.values[t])}]
            if t in b_steps:
                obs.append({"series_id": "b", "timestamp_ms": int(b.timestamps_ms[t]), "value": float(b.values[t])})
            stream.send(*obs)
        stream.close()
        report = stub.GetLiveAccuracy(pb.GetLiveAccuracyRequest(), timeout=30)
        scrape = s.metrics_text()

    runs = []
    for series, steps in ((a, range(n)), (b, b_steps)):
        ts, y = series.timestamps_ms[list(steps)], series.values[list(steps)]
        fc = np.stack([offline.step_one(series.series_id, int(t), float(v)) for t, v in zip(ts, y)])
        runs.append((ts, y, fc))
    want = expected_buckets(runs, offline.quantiles, offline.point_index, season, horizon)

    (served,) = [v for v in report.versions if v.role == "served"]
    assert served.monitored_series == 2
    got = served.since_load
    assert [(h.from_step, h.to_step) for h in got] == horizon_buckets(horizon)
    for h, w in zip(got, want):
        assert h.scored == w["scored"] > 0
        assert h.mase_scored == w["mase_scored"] > 0
        for name in ("mae", "pinball", "coverage", "mase"):
            assert getattr(h, name) == pytest.approx(w[name], rel=1e-6), (name, h.from_step)
    # Prometheus shows the same figures.
    first = got[0]
    line = f'forecast_live_mae{{horizon="1",role="served",version="{served.model_version}",window="since_load"}}'
    assert any(row.startswith(line) and float(row.split()[-1]) == pytest.approx(first.mae, rel=1e-9)
               for row in scrape.splitlines())  # fmt: skip
