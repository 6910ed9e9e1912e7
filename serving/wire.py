"""Fast protobuf wire encoding of SeriesForecast lists (StreamResponse / ForecastResponse bytes).

Building one protobuf message per forecast in Python costs ~10 µs per observation (256
forecasts with horizon 48 and 3 quantiles: ~2.5 ms), several times the ONNX Runtime step itself.
Here the float paths of a whole group of forecasts are laid out with a few numpy operations, the
forecast timestamps are encoded once per distinct observation time (series on a common clock
share them) and cached, and Python only joins a few byte strings per series. The result is
ordinary proto3 wire format that any client parses with the generated or a reflection-built
message class; tests check it against the protobuf runtime.

Field numbers must match protos/forecast/v1/forecast.proto:
  StreamResponse/ForecastResponse.forecasts = 1 (both have the same layout)
  SeriesForecast: series_id 1, timestamp_ms 2, forecast_timestamps_ms 3 (packed varint),
                  point 4 (packed float), quantiles 5, model_version 6, steps_seen 7
  QuantileForecast: quantile 1 (float), values 2 (packed float)
Fields may appear in any order on the wire (parsers must accept that); we write them as
series_id, timestamp_ms, forecast_timestamps_ms, point, quantiles, model_version, steps_seen.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from serving.bounded_cache import ByteBoundedCache
from serving.domain import ForecastGroup, StepBatch

_SHIFTS = (np.arange(10, dtype=np.uint64) * np.uint64(7))[None, :]  # a varint has <= 10 digits
_DIGIT = np.arange(10)[None, :]
_THRESHOLDS = np.array([1 << (7 * k) for k in range(1, 10)], np.uint64)  # 2^7 .. 2^63
# The encoder's caches are keyed by what clients send (series ids, observation times) and
# outlive the streams that filled them, so each is bounded by bytes (serving.bounded_cache), not
# by entries (65,536 entries of 256-byte ids held ~40 MB). Series-id fields: an entry is charged
# ~2 x the id's length + 150 bytes (188 for 20 characters, 661 for 256), so 8 MiB keeps the ids
# of ~44,000 series of 20 characters, ~12,000 of the longest; a miss only costs encoding the id
# again (under a microsecond). Timing fields: ~6 bytes per horizon step + 140 (427 for 48
# steps), so 8 MiB keeps ~19,000 distinct observation times, over a year of half-hourly steps.
HEADS_BUDGET_BYTES = 8 << 20
TIMING_BUDGET_BYTES = 8 << 20
PARTS_PER_ROW = 7


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of an int64 (negative numbers take 10 bytes)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [varint(i) for i in range(1 << 14)]  # lengths and step counts: one lookup, no loop


def varint_of(n: int) -> bytes:
    """varint(n), from a table for lengths and counts below 16,384."""
    return _SMALL[n] if 0 <= n < 16384 else varint(n)


def _width(n: int) -> int:
    """Bytes in the varint of a non-negative int."""
    return max(1, (n.bit_length() + 6) // 7)


def varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Varints of int64 values [n]: (their bytes concatenated uint8 [sum], byte count per value [n])."""
    v = np.ascontiguousarray(values, np.int64).ravel()
    if v.size and v.min() >= 0 and _width(int(v.min())) == _width(int(v.max())):
        # The usual case (e.g. timestamps of this century): every value has the same width, so
        # peel 7 bits per column in place, with no masks.
        width = _width(int(v.max()))
        digits = np.empty((v.size, width), np.uint8)
        rest = v.copy()
        for j in range(width):
            digits[:, j] = rest & 0x7F
            rest >>= 7
        digits[:, :-1] |= 0x80  # continuation bit on all but the last digit
        return digits.ravel(), np.full(v.size, width, np.int64)
    u = v.view(np.uint64)  # negative int64 are encoded as their two's complement, 10 bytes
    count = np.searchsorted(_THRESHOLDS, u, side="right") + 1
    digits = ((u[:, None] >> _SHIFTS) & np.uint64(0x7F)).astype(np.uint8)  # [n, 10]
    digits[(count[:, None] - 1) > _DIGIT] |= 0x80
    return digits[count[:, None] > _DIGIT], count


@lru_cache(maxsize=64)
def _paths_layout(horizon: int, quantiles: tuple[float, ...]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Template of the point and quantile fields of one row, and where each float path goes.

    Row = [point tag, len][point floats] then per quantile
          [quantiles tag, len, quantile tag, quantile float, values tag, len][values floats].
    Returns (template uint8 [W] with the headers filled in, [(start, end)] byte span of the
    point path followed by each quantile's path).
    """
    floats = 4 * horizon
    packed = varint(floats)
    pieces: list[bytes] = [b"\x22" + packed]
    spans, offset = [], len(pieces[0])
    spans.append((offset, offset + floats))
    offset += floats
    pieces.append(bytes(floats))
    for q in quantiles:
        inner = b"\x0d" + np.float32(q).astype("<f4").tobytes() + b"\x12" + packed
        header = b"\x2a" + varint(len(inner) + floats) + inner
        pieces += [header, bytes(floats)]
        offset += len(header)
        spans.append((offset, offset + floats))
        offset += floats
    return np.frombuffer(b"".join(pieces), np.uint8), spans


def _series_id_field(series_id: str) -> bytes:
    """SeriesForecast.series_id (field 1): tag, length, UTF-8 bytes."""
    sid_b = series_id.encode()
    return b"\x0a" + varint_of(len(sid_b)) + sid_b


class _Prepared(NamedTuple):
    """A batch's shared encoding: row i's float paths are raw[i * width : (i + 1) * width]."""

    raw: memoryview
    width: int
    timing: list[bytes]  # per row: the timestamp_ms and forecast_timestamps_ms fields
    tail: bytes  # model_version field and the steps_seen tag
    steps_seen: list[int]


class ForecastEncoder:
    """Encodes forecasts to wire bytes; remembers the encoded timestamps of recent steps."""

    def __init__(
        self, heads_budget_bytes: int = HEADS_BUDGET_BYTES, timing_budget_bytes: int = TIMING_BUDGET_BYTES
    ) -> None:
        # One timing cache per (freq_ms, horizon): those come from the model versions loaded, not
        # from clients, so there are only ever a few.
        self._timing: dict[tuple[int, int], ByteBoundedCache[int, bytes]] = {}
        self._timing_budget = timing_budget_bytes
        self._heads: ByteBoundedCache[str, bytes] = ByteBoundedCache(heads_budget_bytes)
        # Per batch, while it lives: its shared encoding (see _row_parts). Weak keys: a batch's entry
        # goes with the batch, once every request it answered has been written out.
        self._batches: weakref.WeakKeyDictionary[StepBatch, _Prepared] = weakref.WeakKeyDictionary()

    @property
    def cache_bytes(self) -> int:
        """Bytes charged to the encoder's caches now (series-id fields and timing fields)."""
        return self._heads.nbytes + sum(c.nbytes for c in self._timing.values())

    def _timing_fields(self, ts: list[int], freq_ms: int, horizon: int) -> list[bytes]:
        """Per row: the encoded timestamp_ms and forecast_timestamps_ms fields."""
        cache = self._timing.get((freq_ms, horizon))
        if cache is None:
            cache = self._timing[(freq_ms, horizon)] = ByteBoundedCache(self._timing_budget)
        recent = cache.recent
        found = [recent.get(t) for t in ts]
        if None in found:
            missing = sorted({t for t, f in zip(ts, found) if f is None})
            ahead = np.array(missing, np.int64)[:, None] + np.int64(freq_ms) * np.arange(1, horizon + 1)
            data, count = varints(ahead.ravel())  # [k * horizon] values
            ends = np.cumsum(count.reshape(len(missing), horizon).sum(axis=1)).tolist()
            raw = data.tobytes()
            fields = {
                t: b"".join((b"\x10", varint(t), b"\x1a", varint_of(end - start), raw[start:end]))
                for t, start, end in zip(missing, [0, *ends[:-1]], ends)
            }
            for t in missing:  # through the cache's own path: it may move entries between generations
                cache.get_or_make(t, fields.__getitem__)
            found = [f if f is not None else fields[t] for t, f in zip(ts, found)]
        return found

    def encode(
        self,
        series_ids: Sequence[str],
        timestamps_ms: np.ndarray,
        forecast: np.ndarray,
        steps_seen: np.ndarray,
        model_version: str,
        freq_ms: int,
        quantiles: Sequence[float],
        point_index: int,
    ) -> list[bytes | memoryview]:
        """The encoded `forecasts` entries (tag, length, SeriesForecast), PARTS_PER_ROW parts per
        row: b"".join of rows i..j's parts is a valid StreamResponse holding those forecasts.

        timestamps_ms int64 [n], forecast float32 [n, horizon, Q] in raw units, steps_seen int64 [n];
        the forecast timestamps are timestamps_ms + k * freq_ms for k = 1..horizon.
        """
        batch = StepBatch(
            list(series_ids), timestamps_ms, forecast, steps_seen, model_version, freq_ms, tuple(quantiles), point_index
        )
        return self._row_parts(batch, 0, len(batch))

    def _prepare(self, batch: StepBatch) -> _Prepared:
        """What every row of a batch shares, encoded once: the float paths as bytes, the timing
        fields, the model_version field."""
        n, horizon, q_count = batch.forecast.shape
        ts = np.asarray(batch.timestamps_ms, np.int64)
        if n == 0:
            timing: list[bytes] = []
        elif ts[0] == ts[-1] and (ts == ts[0]).all():  # series on a common clock: one timing field
            timing = self._timing_fields([int(ts[0])], batch.freq_ms, horizon) * n
        else:
            timing = self._timing_fields(ts.tolist(), batch.freq_ms, horizon)
        template, spans = _paths_layout(horizon, tuple(batch.quantiles))
        width = template.size
        rows = np.empty((n, width), np.uint8)
        rows[:] = template
        # Each path [n, horizon] is copied straight into its byte span, seen as little-endian floats.
        for q, (start, end) in zip([batch.point_index, *range(q_count)], spans):
            rows[:, start:end].view("<f4")[:] = batch.forecast[:, :, q]
        version = batch.model_version.encode()
        tail = b"\x32" + varint_of(len(version)) + version + b"\x38"  # model_version, steps_seen tag
        return _Prepared(memoryview(rows.tobytes()), width, timing, tail, batch.steps_seen.tolist())

    def _row_parts(self, batch: StepBatch, start: int, stop: int) -> list[bytes | memoryview]:
        """PARTS_PER_ROW encoded parts for each of the batch's rows start..stop-1.

        The numpy work is done once per batch (a batch shared by 64 streams is laid out once, not
        64 times) and kept while the batch lives; the per-row parts only for the rows asked for,
        so rows of other transports' requests in the same batch cost nothing here.
        """
        prepared = self._batches.get(batch)
        if prepared is None:
            prepared = self._batches[batch] = self._prepare(batch)
        raw, width, timing, tail, steps_seen = prepared
        base = width + len(tail)
        v, cache, out = varint_of, self._heads, []
        heads = cache.recent
        for i in range(start, stop):
            sid = batch.series_ids[i]
            head = heads.get(sid)  # series_id field; a stream sends the same ids again and again
            if head is None:
                head = cache.get_or_make(sid, _series_id_field)
                heads = cache.recent  # a new generation may have started
            time_fields, steps_b = timing[i], v(steps_seen[i])
            size = base + len(head) + len(time_fields) + len(steps_b)
            out += (b"\x0a", v(size), head, time_fields, raw[i * width : (i + 1) * width], tail, steps_b)
        return out

    def encode_groups(self, groups: Sequence[ForecastGroup], n: int) -> bytes:
        """A StreamResponse/ForecastResponse with n forecasts, placed by each group's request index."""
        if len(groups) == 1 and len(groups[0].index) == n:  # the usual case: one group, in order
            g = groups[0]
            return b"".join(self._row_parts(g.batch, g.start, g.start + n))
        k = PARTS_PER_ROW
        ordered: list[list] = [[]] * n
        for g in groups:
            parts = self._row_parts(g.batch, g.start, g.start + len(g.index))
            for j, position in enumerate(g.index.tolist()):
                ordered[position] = parts[k * j : k * (j + 1)]
        return b"".join(p for row in ordered for p in row)
