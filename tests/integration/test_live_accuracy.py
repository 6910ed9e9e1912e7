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
from tests.live_support import expected_buckets
from tests.serving_support import OfflineModel, RunningServer, Stream, server_config


@pytest.mark.parametrize("stride", [1, 4])
def test_live_scores_equal_an_offline_recomputation(model_dir, stride):
    """Two series streamed together (one with a gap of three missing steps): MAE, pinball,
    coverage and MASE per horizon bucket equal the recomputation from the step graph offline
    (stride 4: --monitor-origin-stride 4, the pairs of every fourth origin)."""
    offline = OfflineModel(model_dir)
    meta = offline.step.get_modelmeta().custom_metadata_map
    horizon, season = int(meta["horizon"]), int(meta["season"])
    n = 260
    a = synthetic_series(n, series_id="a", seed=1)
    b = synthetic_series(n, series_id="b", level=20.0, seed=2)
    b_steps = [t for t in range(n) if not 120 <= t < 123]  # a gap: the next forecasts' leads shift
    config = replace(server_config(str(model_dir)), monitor=MonitorConfig(window_observations=64, origin_stride=stride))
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
    want = expected_buckets(runs, offline.quantiles, offline.point_index, season, horizon, int(meta["freq_ms"]), stride)

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
