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

from collections.abc import Sequence
from functools import lru_cache

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
_CACHE_KEY = "forecast.v1"  # our entry in StepBatch.encoded
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


def _varint_of(n: int) -> bytes:
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
    return b"\x0a" + _varint_of(len(sid_b)) + sid_b


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
                t: b"".join((b"\x10", varint(t), b"\x1a", _varint_of(end - start), raw[start:end]))
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
        n, horizon, q_count = forecast.shape
        if n == 0:
            return []
        ts = np.asarray(timestamps_ms, np.int64)
        if ts[0] == ts[-1] and (ts == ts[0]).all():  # series on a common clock: one timing field
            timing = self._timing_fields([int(ts[0])], freq_ms, horizon) * n
        else:
            timing = self._timing_fields(ts.tolist(), freq_ms, horizon)
        template, spans = _paths_layout(horizon, tuple(quantiles))
        width = template.size
        rows = np.empty((n, width), np.uint8)
        rows[:] = template
        # Each path [n, horizon] is copied straight into its byte span, seen as little-endian floats.
        for q, (start, end) in zip([point_index, *range(q_count)], spans):
            rows[:, start:end].view("<f4")[:] = forecast[:, :, q]
        raw = memoryview(rows.tobytes())

        version = model_version.encode()
        tail = b"\x32" + _varint_of(len(version)) + version + b"\x38"  # model_version, steps_seen tag
        base = width + len(tail)
        v, cache, out = _varint_of, self._heads, []
        heads = cache.recent
        for i, (sid, time_fields, steps) in enumerate(zip(series_ids, timing, steps_seen.tolist())):
            head = heads.get(sid)  # series_id field; a stream sends the same ids again and again
            if head is None:
                head = cache.get_or_make(sid, _series_id_field)
                heads = cache.recent  # a new generation may have started
            steps_b = v(steps)
            size = base + len(head) + len(time_fields) + len(steps_b)
            out += (b"\x0a", v(size), head, time_fields, raw[i * width : (i + 1) * width], tail, steps_b)
        return out

    def batch_parts(self, batch: StepBatch) -> list[bytes | memoryview]:
        """Every row of a batch encoded; done once per batch and kept on it for its other requests."""
        parts = batch.encoded.get(_CACHE_KEY)
        if parts is None:
            parts = batch.encoded[_CACHE_KEY] = self.encode(
                batch.series_ids, batch.timestamps_ms, batch.forecast, batch.steps_seen,
                batch.model_version, batch.freq_ms, batch.quantiles, batch.point_index,
            )  # fmt: skip
        return parts

    def encode_groups(self, groups: Sequence[ForecastGroup], n: int) -> bytes:
        """A StreamResponse/ForecastResponse with n forecasts, placed by each group's request index."""
        k = PARTS_PER_ROW
        if len(groups) == 1 and len(groups[0].index) == n:  # the usual case: one group, in order
            g = groups[0]
            return b"".join(self.batch_parts(g.batch)[k * g.start : k * (g.start + n)])
        ordered: list[list] = [[]] * n
        for g in groups:
            parts = self.batch_parts(g.batch)
            for j, position in enumerate(g.index.tolist()):
                row = g.start + j
                ordered[position] = parts[k * row : k * (row + 1)]
        return b"".join(p for row in ordered for p in row)
