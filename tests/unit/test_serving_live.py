"""serving.live's scorer against a plain-loop reference: random forecasts, series that start at
different times, gaps, off-grid steps and batches of changing composition (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.contract import ModelSpec, StateTensor
from serving.live import LiveScorer, bytes_per_series, horizon_buckets, origin_stride_for, pooled
from serving.state import StateArena
from tests.live_support import expected_buckets

FREQ = 60_000


def spec(horizon: int, season: int) -> ModelSpec:
    return ModelSpec("lstm", 1, 4, horizon, (0.1, 0.5, 0.9), FREQ, (), "y", "r", ("h",), 0.5, season)


def test_horizon_buckets_follow_the_horizon():
    assert horizon_buckets(48) == [(1, 1), (2, 6), (7, 24), (25, 48)]
    assert horizon_buckets(6) == [(1, 1), (2, 6)]
    assert horizon_buckets(1) == [(1, 1)]
    assert horizon_buckets(100) == [(1, 1), (2, 6), (7, 24), (25, 48), (49, 96), (97, 100)]
    assert bytes_per_series(48, 3, 48) == 28_864
    assert bytes_per_series(48, 3, 48, origin_stride=8) == 4_336  # 6 kept origins of 48


def test_the_default_origin_stride_is_the_smallest_that_fits_the_budget():
    budget = 448 << 20  # the defaults: 100,000 series in 448 MiB
    assert origin_stride_for(48, 3, 48, 100_000, budget) == 8  # the default model: 6 origins kept
    assert origin_stride_for(6, 3, 48, 100_000, budget) == 1  # small models: every forecast
    assert origin_stride_for(48, 3, 48, 12_000, budget) == 1
    assert origin_stride_for(48, 3, 48, 10**9, budget) == 48  # nothing fits: one origin kept


@pytest.mark.parametrize(
    "horizon, season, apart, stride",
    [(6, 3, False, 1), (8, 12, False, 1), (6, 3, True, 1), (8, 12, False, 3), (6, 3, True, 4), (7, 3, False, 7)],
)
def test_scores_equal_a_plain_loop_reference(horizon, season, apart, stride):
    """apart: each series' step in a batch of its own (the scalar path of one-row batches);
    stride: score the forecasts of every stride-th origin only (by timestamp)."""
    rng = np.random.default_rng(horizon)
    arena = StateArena([StateTensor("h", (None, 1))], 8)
    scorer = LiveScorer("1", "served", spec(horizon, season), 16, 1000, 1.0, arena, origin_stride=stride)
    # Each series: its own start, level and timestamps; one with a gap, one with an off-grid step.
    plans = {}
    for k in range(5):
        steps = np.arange(k * 3, 80)
        if k == 1:
            steps = steps[(steps < 30) | (steps > 33)]  # a gap of four steps
        ts = steps * FREQ + (FREQ // 2 if k == 2 else 0)
        ts = np.where(steps >= 50, ts + 7 if k == 2 else ts, ts)  # k = 2: off the grid from step 50 on
        values = (10 + k + np.sin(steps / 3) + rng.normal(0, 0.3, len(steps))).astype(np.float32)
        plans[f"s{k}"] = {
            "steps": steps.tolist(),
            "ts": ts,
            "y": values,
            "fc": [],
            "row": int(arena.alloc([None], 0.0)[0]),
        }
    for t in range(0, 80):  # one step batch per time step, of the series that have one then
        batch = [(sid, p, p["steps"].index(t)) for sid, p in plans.items() if t in p["steps"]]
        if not batch:
            continue
        rows = np.array([p["row"] for _, p, _ in batch])
        fc = np.sort(rng.normal(10, 2, (len(batch), horizon, 3)), axis=2).astype(np.float32)
        for (_, p, _), f in zip(batch, fc):
            p["fc"].append(f)
        groups = [[i] for i in range(len(batch))] if apart else [list(range(len(batch)))]
        for g in groups:
            scorer.observe(
                rows[g], arena.epoch[rows[g]], [batch[i][0] for i in g],
                np.array([batch[i][1]["y"][batch[i][2]] for i in g], np.float32),
                np.array([batch[i][1]["ts"][batch[i][2]] for i in g]), fc[g], np.zeros((len(g), 0), np.float32),
            )  # fmt: skip
    runs = [(p["ts"], p["y"], np.stack(p["fc"])) for p in plans.values()]
    want = expected_buckets(runs, (0.1, 0.5, 0.9), 1, season, horizon, FREQ, stride)
    got = pooled(scorer.acc.total, 3, scorer.buckets)
    assert sum(w["scored"] for w in want) > 100  # enough pairs to mean something
    for g, w in zip(got, want):
        assert (g.scored, g.mase_scored) == (w["scored"], w["mase_scored"])
        for name in ("mae", "pinball", "coverage", "mase"):
            assert getattr(g, name) == pytest.approx(w[name], rel=1e-6), name


def test_a_batch_with_no_rows_left_is_nothing_to_score():
    """A step batch whose every chunk overflowed reaches the scorer empty (found by the fuzz test)."""
    arena = StateArena([StateTensor("h", (None, 1))], 4)
    scorer = LiveScorer("1", "served", spec(6, 3), 4, 100, 1.0, arena)
    none = np.zeros(0, np.int64)
    scorer.observe(none, none, [], np.zeros(0, np.float32), none, np.zeros((0, 6, 3), np.float32), np.zeros((0, 0)))
    assert scorer.acc.total.sum() == 0 and scorer.monitored == 0
