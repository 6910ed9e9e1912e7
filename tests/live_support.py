"""A plain-loop reference for live accuracy (serving.live): what the server must report."""

from __future__ import annotations

import numpy as np

from serving.live import horizon_buckets


def expected_buckets(runs, quantiles, point, season, horizon, freq_ms, origin_stride=1) -> list[dict]:
    """Per horizon bucket: every (forecast, actual) pair of every series, scored in plain loops
    (with an origin stride K: the pairs of the origins whose timestamp // freq_ms is a multiple of K).

    runs: [(timestamps_ms [T], values [T], forecasts [T, H, Q])]; the MASE scale at t is the mean
    of |y_s - y_{s - season}| over the series' observations s <= t that have one a season back.
    """
    pairs = {k: [] for k in range(1, horizon + 1)}  # lead -> [(y, forecast [Q], scale)]
    for ts, y, fc in runs:
        at = {int(t): j for j, t in enumerate(ts)}
        scale, total, count = np.full(len(ts), np.nan), 0.0, 0
        for j, t in enumerate(ts):
            back = at.get(int(t) - season * freq_ms)
            if back is not None:
                total, count = total + abs(float(y[j]) - float(y[back])), count + 1
            scale[j] = total / count if count else np.nan
        for i, t in enumerate(ts):
            if int(t) // freq_ms % origin_stride:
                continue
            for k in range(1, horizon + 1):
                j = at.get(int(t) + k * freq_ms)
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
