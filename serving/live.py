"""Live accuracy: the server scores its own forecasts as the actuals arrive.

Every observation of a monitored series is the actual that the series' earlier forecasts aimed
at. `LiveScorer` (one per model version, and one for a shadow version) keeps, per monitored
series, the forecasts of its last `horizon` origins (float32 [H origins, H steps, Q], a ring
indexed by origin) and their timestamps; when the observation at time t arrives it scores every
kept forecast that targeted t (lead k = (t - origin) / freq_ms, 1 <= k <= H). With an origin
stride K > 1 (`--monitor-origin-stride`) it keeps only the forecasts of origins whose step
(timestamp // freq_ms) is a multiple of K, ceil(H / K) of them per series: a sample of the pairs,
the same origins for every version, at 1/K of the memory and of the pairs to score.
Scoring covers:

- point error |y - point| (point: the metadata's point_quantile path),
- pinball loss per quantile (summed over quantiles; reported as the mean over pairs and quantiles),
- whether y lies inside [lowest quantile, highest quantile],
- |y - point| / scale, where scale is the series' own seasonal-naive MAE so far (the mean of
  |y_t - y_{t - season}| over its observations up to and including t; `season` from the graph
  metadata), the MASE numerator term; pairs of a series without a scale yet are left out of MASE.

Sums are kept per lead (1..H), since load and over a recent window (8 chunks of
window_observations / 8 observations each; the window spans between 7/8 and all of it), and are
pooled into horizon buckets when read. All of it is numpy over the step batch: a few dozen numpy
calls per ORT call, whatever its size. It runs on the event loop thread, right after the step.

Which series are monitored: a deterministic hash of the series id against `fraction`, and at
most `max_series` at once per version (a series first seen when all slots are taken is not
monitored; slots of series that ended are reclaimed lazily). Series are known by their state
row and its epoch (serving.state): a new epoch in a row is a new series.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.contract import ModelSpec

if TYPE_CHECKING:
    from serving.state import StateArena

_NEVER = np.iinfo(np.int64).min // 2  # an origin timestamp no target is ever k steps after
_OPEN = np.iinfo(np.int64).max  # shadow_since of a slot the shadow does not run (yet)
CHUNKS = 8  # the recent window is this many chunks of observations
# The per-lead sums, axis 0 of every accumulator [FIELDS, H]
N, ABS, PINBALL, COVER, N_SCALED, SCALED = range(6)
FIELDS = 6
STEPS, LAST_TS, CHAIN = range(3)  # columns of LiveScorer._slot_ints


def horizon_buckets(horizon: int) -> list[tuple[int, int]]:
    """Lead ranges reported together: 1, 2-6, 7-24, 25-48, then doubling, the last one cut at the
    horizon (horizon 48: [(1, 1), (2, 6), (7, 24), (25, 48)]; horizon 6: [(1, 1), (2, 6)])."""
    ends, edge = [1, 6, 24], 48
    while edge < horizon:
        ends.append(edge)
        edge *= 2
    ends = [e for e in ends if e < horizon] + [horizon]
    buckets, start = [], 1
    for end in ends:
        buckets.append((start, end))
        start = end + 1
    return buckets


def kept_origins(horizon: int, origin_stride: int) -> int:
    """R: the origins a monitored series keeps forecasts of, ceil(H / stride) (every origin whose
    forecasts can still be scored: any H consecutive steps hold at most that many multiples of
    the stride)."""
    return -(-horizon // origin_stride)


def bytes_per_series(horizon: int, quantiles: int, season: int, origin_stride: int = 1) -> int:
    """What one monitored series costs its scorer: the forecast ring (float32 [R, H, Q], R =
    kept_origins), the origins' timestamps (int64 [R]), the last season of (value, timestamp)
    (float64 [S, 2]), and per slot 3 int64 + 2 float64 + shadow_since + its row and epoch.
    (Default model, H = 48, Q = 3, S = 48: 28,864 bytes scoring every origin, 4,336 with origin
    stride 8.) Every live series, monitored or not, adds 16 bytes (its row's slot and epoch); a
    shadow doubles the scorer's share and adds its own state row."""
    r = kept_origins(horizon, origin_stride)
    return r * horizon * quantiles * 4 + r * 8 + season * 16 + 3 * 8 + 2 * 8 + 8 + 16


def origin_stride_for(horizon: int, quantiles: int, season: int, max_series: int, budget_bytes: int) -> int:
    """The smallest origin stride whose scorer fits the budget with every slot in use (H, one
    kept origin, when none does). Default model, 100,000 series, 448 MiB: 8 (413 MiB); a model
    of horizon 6: 1, every forecast scored."""
    for stride in range(1, horizon + 1):
        if bytes_per_series(horizon, quantiles, season, stride) * max_series <= budget_bytes:
            return stride
    return horizon


def selected(series_id: object, fraction: float) -> bool:
    """Whether a series id is monitored: crc32 of its UTF-8 text against the fraction (the same
    answer on every replica and restart)."""
    if fraction >= 1.0:
        return True
    return zlib.crc32(str(series_id).encode()) < fraction * 4294967296.0


@dataclass(frozen=True)
class BucketAccuracy:
    from_step: int
    to_step: int
    scored: int
    mae: float
    mase: float
    pinball: float
    coverage: float
    mase_scored: int


def pooled(sums: np.ndarray, quantiles: int, buckets: Sequence[tuple[int, int]]) -> list[BucketAccuracy]:
    """Per-lead sums [FIELDS, H] -> one BucketAccuracy per bucket (0 where nothing was scored)."""
    out = []
    for lo, hi in buckets:
        s = sums[:, lo - 1 : hi].sum(axis=1)
        n, ns = s[N], s[N_SCALED]
        out.append(
            BucketAccuracy(
                lo, hi, int(n),
                s[ABS] / n if n else 0.0,
                s[SCALED] / ns if ns else 0.0,
                s[PINBALL] / (n * quantiles) if n else 0.0,
                s[COVER] / n if n else 0.0,
                int(ns),
            )
        )  # fmt: skip
    return out


def overall_mase(sums: np.ndarray) -> float | None:
    """MASE over every lead (None before any pair had a scale)."""
    ns = sums[N_SCALED].sum()
    return float(sums[SCALED].sum() / ns) if ns else None


class Accumulator:
    """Per-lead sums since load and over the recent window (chunks of observations)."""

    def __init__(self, horizon: int, window_observations: int) -> None:
        self.total = np.zeros((FIELDS, horizon))
        self.chunks = np.zeros((CHUNKS, FIELDS, horizon))
        self._chunk, self._chunk_obs = 0, 0
        self._chunk_size = max(1, window_observations // CHUNKS)

    def add(self, sums: np.ndarray, observations: int) -> None:
        """Add per-lead sums [FIELDS, H] of `observations` more observations."""
        self.total += sums
        self.chunks[self._chunk] += sums
        self.observed(observations)

    def observed(self, observations: int) -> None:
        self._chunk_obs += observations
        if self._chunk_obs >= self._chunk_size:
            self._chunk = (self._chunk + 1) % CHUNKS
            self.chunks[self._chunk] = 0
            self._chunk_obs = 0

    @property
    def recent(self) -> np.ndarray:
        return self.chunks.sum(axis=0)


class LiveScorer:
    """One model version's live scores over its monitored series (see the module docstring).

    The served version's scorer admits series (`observe`); a shadow's scorer is handed the served
    scorer's slots (`score` with `reset` first), so a slot is the same series in both.
    """

    def __init__(
        self,
        version: str,
        role: str,
        spec: ModelSpec,
        max_series: int,
        window_observations: int,
        fraction: float = 1.0,
        arena: StateArena | None = None,
        origin_stride: int = 1,
    ) -> None:
        self.version, self.role, self.spec = version, role, spec
        self.horizon, self.q = spec.horizon, len(spec.quantiles)
        # Forecasts kept and scored: those of origins whose step (timestamp // freq_ms) is a
        # multiple of the stride, the same origins in every scorer (1: every origin).
        self.origin_stride = origin_stride
        self.kept = kept_origins(self.horizon, origin_stride)
        self.buckets = horizon_buckets(self.horizon)
        self.fraction, self.max_series, self.arena = fraction, max_series, arena
        self.season = spec.season or 0  # 0: no seasonal-naive scale, no MASE
        self.backtest_mase: float | None = None  # from the registry, when known
        self.cpu_seconds = 0.0  # thread CPU time spent scoring (what live accuracy costs)
        h, q, s, m = self.horizon, self.q, max(self.season, 1), max_series
        # Preallocated at the cap, all np.zeros: their pages are only resident once a slot has used
        # them. Initial values never matter: reset() sets a slot's before its first use. (Filling
        # them, e.g. timestamps with _NEVER, made ~85 MiB resident at load for 100,000 slots.)
        # Forecasts of the last R kept origins, [slot, origin, lead - 1, quantile]: a batch's
        # forecasts are written as whole [H, Q] blocks; a pair's Q values are read as one 12-byte row.
        self._ring = np.zeros((m, self.kept, h, q), np.float32)
        self._k1 = np.arange(1, h + 1)  # leads
        # _pattern[r]: for a series whose newest forecast goes to ring position r, the rows (in
        # its slot's [H origins x H leads] block) of the kept forecasts for leads 1..H, when its
        # origins are one step apart: lead k's is the origin k steps back, at (r - k) mod H.
        self._pattern = ((np.arange(h)[:, None] - self._k1) % h) * h + (self._k1 - 1)  # [H, H]
        self._origin_ts = np.zeros((m, self.kept), np.int64)
        # Per slot: steps stored since it started, the newest origin's timestamp, and how many of
        # the newest origins are one step apart (up to H): the ring's bookkeeping when every origin
        # is kept (stride 1; a stride finds its pairs by timestamp). One array: one gather, one scatter.
        self._slot_ints = np.zeros((m, 3), np.int64)
        # The last season of (value, timestamp) per slot, a ring by time (NaN: none), and the
        # running (sum of |y_t - y_{t - season}|, count).
        self._lag = np.zeros((m, s, 2))
        self._scale = np.zeros((m, 2))
        self._q = np.asarray(spec.quantiles, np.float64)
        self._q_list = [float(q) for q in spec.quantiles]
        self._p = spec.point_index
        self._season_ms = self.season * spec.freq_ms
        self.acc = Accumulator(h, window_observations)
        # Served scorers only: which arena row holds which slot (-1: not monitored), by epoch.
        self._row_slot = np.zeros(0, np.int64)
        self._row_epoch = np.zeros(0, np.int64)
        self._slot_row = np.full(m, -1, np.int64)  # the row and epoch a slot belongs to
        self._slot_epoch = np.zeros(m, np.int64)
        self._free = list(range(m - 1, -1, -1))
        # While a shadow runs: the first origin it has of each slot, and the served version's sums
        # over the pairs the shadow scores too (origins at or after that).
        self.shadow: ShadowFeed | None = None
        self.shadow_since = np.full(m, _OPEN, np.int64)
        self.versus: Accumulator | None = None

    @property
    def monitored(self) -> int:
        return self.max_series - len(self._free)

    def retire(self) -> None:
        """The version was unloaded: drop the per-series arrays, keep the figures."""
        if self._ring.size:
            self._ring = np.zeros((0, self.kept, self.horizon, self.q), np.float32)
            self._origin_ts = np.zeros((0, self.kept), np.int64)
            self._lag = np.zeros((0, 1, 2))
            self._free = list(range(self.max_series))

    # -- admission (served scorers) -------------------------------------------------------------

    def observe(self, *step: Any) -> None:
        """One ORT step's rows (stepped, in their arena, with their epochs then): score and keep,
        counting the thread CPU it takes. `step`: _observe's arguments."""
        started = time.thread_time()
        try:
            self._observe(*step)
        finally:
            self.cpu_seconds += time.thread_time() - started

    def _observe(
        self,
        rows: np.ndarray,
        epochs: np.ndarray,
        series_ids: Sequence[object],
        values: np.ndarray,
        timestamps_ms: np.ndarray,
        forecast: np.ndarray,
        covariates: np.ndarray,
    ) -> None:
        if not len(rows):
            return
        if len(self._row_epoch) < self.arena.capacity:
            self._grow_rows(self.arena.capacity)
        if len(rows) == 1 and self.shadow is None:  # one observation per step: its own, shorter path
            row = int(rows[0])
            if self._row_epoch[row] == epochs[0]:
                slot = int(self._row_slot[row])
                if slot >= 0:
                    self._score_one(slot, values, timestamps_ms, forecast)
                return
        known = self._row_epoch[rows] == epochs
        if not known.all():
            self._admit(rows, epochs, series_ids, np.flatnonzero(~known).tolist())
        slots = self._row_slot[rows]
        keep = slots >= 0
        if not keep.all():
            if not keep.any():
                return
            slots, values, timestamps_ms = slots[keep], values[keep], timestamps_ms[keep]
            forecast, covariates = forecast[keep], covariates[keep]
        scale = self.score(slots, values, timestamps_ms, forecast)
        if self.shadow is not None:
            self._feed_shadow(slots, values, timestamps_ms, covariates, scale)

    def _grow_rows(self, capacity: int) -> None:
        grow = capacity - len(self._row_epoch)
        self._row_slot = np.concatenate([self._row_slot, np.full(grow, -1, np.int64)])
        self._row_epoch = np.concatenate([self._row_epoch, np.zeros(grow, np.int64)])

    def _admit(self, rows: np.ndarray, epochs: np.ndarray, series_ids: Sequence[object], new: list[int]) -> None:
        """Rows holding a series not seen before: give the selected ones a slot, if one is free."""
        for i in new:
            row, epoch = int(rows[i]), int(epochs[i])
            old = int(self._row_slot[row])
            if old >= 0 and self._slot_row[old] == row:  # the row's previous series has ended
                self._release(old)
            self._row_epoch[row] = epoch
            slot = self._take() if selected(series_ids[i], self.fraction) else -1
            self._row_slot[row] = slot
            if slot >= 0:
                self._slot_row[slot], self._slot_epoch[slot] = row, epoch
                self.reset(np.array([slot]))

    def _take(self) -> int:
        if not self._free:  # reclaim the slots of series whose rows were freed or handed on
            used = np.flatnonzero(self._slot_row >= 0)
            gone = used[self.arena.epoch[self._slot_row[used]] != self._slot_epoch[used]]
            for slot in gone.tolist():
                self._release(slot)
        return self._free.pop() if self._free else -1

    def _release(self, slot: int) -> None:
        row = int(self._slot_row[slot])
        if self._row_slot[row] == slot:
            self._row_slot[row] = -1
        self._slot_row[slot] = -1
        self._free.append(slot)

    # -- scoring (served and shadow) -------------------------------------------------------------

    def reset(self, slots: np.ndarray) -> None:
        """Slots that start a new series: no forecasts, no seasonal history."""
        self._origin_ts[slots] = _NEVER
        self._slot_ints[slots] = (0, _NEVER, 0)
        self._lag[slots] = (0.0, np.nan)
        self._scale[slots] = 0.0
        self.shadow_since[slots] = _OPEN

    def score(
        self,
        slots: np.ndarray,
        values: np.ndarray,
        timestamps_ms: np.ndarray,
        forecast: np.ndarray,
        scale: np.ndarray | None = None,
    ) -> np.ndarray:
        """Score the observations (values [B] at timestamps_ms [B], slots distinct) against the
        slots' kept forecasts, then keep forecast [B, H, Q] as their newest origin (with an origin
        stride, only the rows whose step is a multiple of it). Returns the
        MASE scale used per row [B] (NaN: none yet); a shadow passes the served scorer's."""
        h, freq, ts = self.horizon, self.spec.freq_ms, timestamps_ms
        y = values.astype(np.float64)
        if scale is None:
            scale = self._update_scale(slots, y, ts)
        if self.origin_stride > 1:  # a few kept origins per series: pairs by timestamp
            self.acc.observed(len(slots))
            self._score_by_time(slots, y, ts, scale)
            grid = ts // freq
            keep = np.flatnonzero(grid % self.origin_stride == 0)
            r = grid[keep] // self.origin_stride % self.kept
            self._ring[slots[keep], r] = forecast[keep]
            self._origin_ts[slots[keep], r] = ts[keep]
            return scale
        ints = self._slot_ints[slots]  # [B, 3]
        n, chain = ints[:, STEPS], ints[:, CHAIN]
        step = ts - ints[:, LAST_TS] == freq  # one step after the last
        # The usual case: one step after the last, and every kept origin one step after the one
        # before: lead k's forecast is then the origin stored k steps ago, for k <= chain.
        leads = np.where(step & (chain >= np.minimum(n, h)), chain, 0)  # [B] leads scorable so
        r = n % h  # the ring position the newest forecast goes to
        if leads.any():
            base = self._pattern[r] + (slots * (h * h))[:, None]  # [B, H] the pairs' rows in the ring
            f = self._ring.reshape(-1, self.q).take(base, axis=0)  # [B, H, Q]
            valid = None if leads.min() == h else self._k1 <= leads[:, None]  # [B, H] (None: all)
            self.acc.add(self._dense_sums(f, y, scale, valid), len(slots))
            if self.versus is not None:  # the pairs the shadow has too: origins it stepped
                both = (ts - self.shadow_since[slots])[:, None] >= self._k1 * freq
                self.versus.add(self._dense_sums(f, y, scale, both if valid is None else both & valid), 0)
        else:
            self.acc.observed(len(slots))
        if leads.min() == 0:  # new series; or a gap, an off-grid step: leads from the origins' timestamps
            odd = np.flatnonzero((leads == 0) & (n > 0))
            if odd.size:
                self._score_by_time(slots[odd], y[odd], ts[odd], scale[odd])
        self._ring[slots, r] = forecast
        self._origin_ts[slots, r] = ts
        ints[:, CHAIN] = np.where(step, np.minimum(chain + 1, h), 1)
        ints[:, STEPS] += 1
        ints[:, LAST_TS] = ts
        self._slot_ints[slots] = ints
        return scale

    def _score_one(self, slot: int, values: np.ndarray, timestamps_ms: np.ndarray, forecast: np.ndarray) -> None:
        """score() for one row in Python scalars where numpy would only add call overhead (what
        one-observation streams pay per message); the rare cases go to score()."""
        h, freq, season = self.horizon, self.spec.freq_ms, self.season
        y, ts = float(values[0]), int(timestamps_ms[0])
        scale = float("nan")
        if season:  # as _update_scale
            k = ts // freq % season
            lag_y, lag_ts = self._lag[slot, k].tolist()
            total, count = self._scale[slot].tolist()
            if lag_ts == ts - self._season_ms:
                total, count = total + abs(y - lag_y), count + 1
                self._scale[slot] = (total, count)
            self._lag[slot, k] = (y, ts)
            scale = total / count if count else scale
        if self.origin_stride > 1:
            self._score_one_sampled(slot, y, ts, scale, forecast[0])
            return
        n, last, chain = self._slot_ints[slot].tolist()
        if ts - last != freq or chain != h:  # warming up, or after a gap: the general path
            self.score(np.array([slot]), values, timestamps_ms, forecast, np.array([scale]))
            return
        r = n % h
        f = self._ring[slot].reshape(h * h, self.q).take(self._pattern[r], axis=0)  # [H, Q]
        self.acc.add(self._dense_sums(f[None], np.array([y]), np.array([scale]), None), 1)
        self._ring[slot, r] = forecast[0]
        self._origin_ts[slot, r] = ts
        self._slot_ints[slot] = (n + 1, ts, h)

    def _score_one_sampled(self, slot: int, y: float, ts: int, scale: float, forecast: np.ndarray) -> None:
        """_score_one with an origin stride: the pairs of the few kept origins (found by timestamp,
        as _score_by_time does) in Python scalars, then keep the forecast if its origin is kept."""
        h, freq = self.horizon, self.spec.freq_ms
        sums = None
        for o, origin in enumerate(self._origin_ts[slot].tolist()):
            dt = ts - origin
            lead = dt // freq
            if 1 <= lead <= h and lead * freq == dt:
                d = [y - v for v in self._ring[slot, o, lead - 1].tolist()]
                err, has = abs(d[self._p]), scale > 0  # (NaN: False)
                pinball = sum(q * x - min(x, 0.0) for q, x in zip(self._q_list, d))
                if sums is None:
                    sums = np.zeros((FIELDS, h))
                sums[:, lead - 1] = (1.0, err, pinball, d[0] >= 0 and d[-1] <= 0, has, err / scale if has else 0.0)
        if sums is None:
            self.acc.observed(1)
        else:
            self.acc.add(sums, 1)
        grid = ts // freq
        if grid % self.origin_stride == 0:
            r = grid // self.origin_stride % self.kept
            self._ring[slot, r] = forecast
            self._origin_ts[slot, r] = ts

    def _dense_sums(self, f: np.ndarray, y: np.ndarray, scale: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        """Per-lead sums [FIELDS, H] of the pairs f [B, H, Q] (lead - 1 on axis 1) with actuals
        y [B] (float64); valid [B, H] marks the pairs that exist (None: all).

        Sums over rows only, no per-pair Python: pinball = sum_q (q d_q - min(d_q, 0)) with
        d = y - f, so its total needs only sum(d) and sum(min(d, 0)) per lead and quantile. All
        in float64 from the start: numpy's reductions that cast (float32 in, float64 sums) are
        10-50x slower than native ones, and a float32 sum over rows loses the 1e-6.
        """
        d = y[:, None, None] - f  # [B, H, Q] float64
        if valid is not None:
            d *= valid[:, :, None]  # pairs that do not exist add 0 to every sum...
        abs_err = np.abs(d[:, :, self._p])  # [B, H]
        cover = (d[:, :, 0] >= 0) & (d[:, :, -1] <= 0)
        has = scale > 0  # [B] (NaN compares False)
        inv = np.divide(1.0, scale, out=np.zeros(len(scale)), where=has)
        sums = np.empty((FIELDS, self.horizon))
        if valid is None:
            sums[N] = len(y)
            sums[N_SCALED] = np.count_nonzero(has)
        else:
            cover &= valid  # ...except to the band count: d = 0 is inside
            sums[N] = np.count_nonzero(valid, axis=0)
            sums[N_SCALED] = has.astype(np.float64) @ valid  # (bool @ bool would be a logical "any")
        sums[ABS] = abs_err.sum(axis=0)
        negative = np.minimum(d, 0.0).sum(axis=0).sum(axis=1)  # over rows first: the long, fast axis
        sums[PINBALL] = d.sum(axis=0) @ self._q - negative
        sums[COVER] = np.count_nonzero(cover, axis=0)
        sums[SCALED] = inv @ abs_err
        return sums

    def _score_by_time(self, slots: np.ndarray, y: np.ndarray, ts: np.ndarray, scale: np.ndarray) -> None:
        """Rows whose kept origins are not all one step apart: pairs found by timestamp."""
        h, freq = self.horizon, self.spec.freq_ms
        dt = ts[:, None] - self._origin_ts[slots]  # [b, R] ms since each kept origin
        lead = dt // freq
        b, o = np.nonzero((lead >= 1) & (lead <= h) & (lead * freq == dt))
        if not b.size:
            return
        li = lead[b, o] - 1  # [P] lead - 1 of each pair
        f = self._ring.reshape(-1, self.q).take((slots[b] * self.kept + o) * h + li, axis=0)  # [P, Q]
        d = y[b, None] - f
        abs_err = np.abs(d[:, self._p])
        s = scale[b]
        has = s > 0
        weights = [
            np.ones(len(b)), abs_err, d @ self._q - np.minimum(d, 0.0).sum(axis=1),
            (d[:, 0] >= 0) & (d[:, -1] <= 0), has, np.divide(abs_err, s, out=np.zeros(len(b)), where=has),
        ]  # fmt: skip
        sums = np.stack([np.bincount(li, w, h) for w in weights])
        self.acc.add(sums, 0)
        if self.versus is not None:
            both = self._origin_ts[slots[b], o] >= self.shadow_since[slots[b]]
            self.versus.add(np.stack([np.bincount(li, w * both, h) for w in weights]), 0)

    def _update_scale(self, slots: np.ndarray, y: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Add each row's seasonal-naive error (when its value one season back is known) and return
        the scale: mean seasonal-naive absolute error so far [B], NaN where there is none."""
        if not self.season:
            return np.full(len(slots), np.nan)
        k = ts // self.spec.freq_ms % self.season  # by time: t and t - season share a place
        lag = self._lag[slots, k]  # [B, 2] (value, timestamp) one season back, if kept
        hit = lag[:, 1] == ts - self._season_ms
        scale = self._scale[slots]  # [B, 2]
        scale[:, 0] += np.abs(y - lag[:, 0]) * hit
        scale[:, 1] += hit
        self._scale[slots] = scale
        lag[:, 0], lag[:, 1] = y, ts
        self._lag[slots, k] = lag
        return np.divide(scale[:, 0], scale[:, 1], out=np.full(len(slots), np.nan), where=scale[:, 1] > 0)

    # -- the shadow -----------------------------------------------------------------------------

    def start_shadow(self, feed: ShadowFeed) -> None:
        """Feed every monitored series' steps to a shadow from now on (each slot from its next
        step), and compare like for like from there."""
        self.shadow = feed
        self.shadow_since[:] = _OPEN
        self.versus = Accumulator(self.horizon, 8)

    def stop_shadow(self) -> None:
        self.shadow, self.versus = None, None
        self.shadow_since[:] = _OPEN

    def shadow_lost(self, slots: np.ndarray) -> None:
        """The shadow missed a step of these slots: they restart in it at their next step."""
        self.shadow_since[slots] = _OPEN

    def _feed_shadow(
        self, slots: np.ndarray, values: np.ndarray, ts: np.ndarray, covariates: np.ndarray, scale: np.ndarray
    ) -> None:
        since = self.shadow_since[slots]
        fresh = since == _OPEN
        if fresh.any():
            self.shadow_since[slots[fresh]] = ts[fresh]
        if not self.shadow(slots, fresh, values, ts, covariates, scale):
            self.shadow_lost(slots)


# shadow(slots [B], fresh [B] bool, values [B], timestamps_ms [B], covariates [B, C], scale [B])
#   -> False when it could not take the step (the slots then restart in it)
ShadowFeed = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], bool]
