"""Signed snapshots of one series' state (CONTRACT §8): what `return_state` hands out and
`resume_state` restores, on this replica or any other with the same model version and secret.

Layout, format version 1 (integers little-endian; sizes for the default 2x64 LSTM below):

    magic      4 bytes  b"FCSS"
    format     1 byte   1 (a later release keeps reading 1; an unknown one is refused by number)
    name       u16 length + UTF-8     the registered model name
    version    u16 length + UTF-8     the model version the state belongs to
    steps_seen i64                    steps the state has absorbed
    last_ts    i64                    Unix ms of the last observation applied
    tensors    u8 count, then per state tensor, in the graph's metadata `state` order:
                 u8 length + UTF-8 name, u8 dtype (1 float32, 2 float64, 3 int64),
                 u8 rank, u32 per dim (the batch dim is 1), then the values (C order)
    mac        32 bytes HMAC-SHA256(secret, every byte above)

So a snapshot costs 4 + 1 + 2 + len(name) + 2 + len(version) + 16 + 1 + 32 bytes plus, per
tensor, 3 + len(tensor name) + 4 x rank + its values. The default model (configs/elecdemand.yaml:
a 2-layer, 64-unit LSTM, h and c of 512 bytes each, a 336-step lag buffer of 1,344 bytes and
`lags_seen`) is 2,508 bytes per snapshot as `forecaster` version "3"; without lags, 1,125.

Reading checks, in this order, so each refusal says what was wrong: long enough to hold a
header and a MAC, the magic, the format version, the MAC (constant-time; a changed byte, a
truncation or another server's secret all fail here), then the model name and version (another
one is FAILED_PRECONDITION naming both), then the tensors against the served graph's.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.contract import StateTensor
from serving.errors import SnapshotOfOtherModel, SnapshotRefused

MAGIC = b"FCSS"
FORMAT_VERSION = 1
MAC_BYTES = 32
MIN_SECRET_BYTES = 16
_HEAD = struct.Struct("<4sB")  # magic, format version
_COUNTS = struct.Struct("<qqB")  # steps_seen, last_ts, tensor count
_DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int64): 3}
_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


@dataclass(frozen=True)
class Snapshot:
    """One series' state as restored: a [shape with batch 1] array per state tensor."""

    tensors: list[np.ndarray]
    steps_seen: int
    last_ts: int


def _str16(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<H", len(data)) + data


class SnapshotCodec:
    """Writes and reads the snapshots of one model version under one secret."""

    def __init__(self, secret: bytes, name: str, version: str, tensors: Sequence[StateTensor]) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a state secret needs at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
        self._secret = secret
        self.name, self.version = name, version
        self.tensors = tuple(tensors)
        self._prefix = _HEAD.pack(MAGIC, FORMAT_VERSION) + _str16(name) + _str16(version)
        # Per tensor: its header (name, dtype, rank, dims for one series) and its values' byte count.
        self._headers = []
        # Per tensor: (little-endian dtype, shape for one series, values, bytes).
        self._layout = [
            (np.dtype(t.dtype).newbyteorder("<"), t.shape_for(1), int(np.prod(t.shape_for(1))), t.bytes_per_series())
            for t in self.tensors
        ]
        for t in self.tensors:
            shape = t.shape_for(1)
            name_b = t.name.encode()
            header = struct.pack(f"<B{len(name_b)}sBB{len(shape)}I", len(name_b), name_b,
                                 _DTYPE_CODES[np.dtype(t.dtype)], len(shape), *shape)  # fmt: skip
            self._headers.append(header)
        self.size = (
            len(self._prefix) + _COUNTS.size + sum(map(len, self._headers))
            + sum(t.bytes_per_series() for t in self.tensors) + MAC_BYTES
        )  # fmt: skip

    def encode(self, tensors: Sequence[np.ndarray], steps_seen: int, last_ts: int) -> bytes:
        """A signed snapshot of one series: tensors in the graph's state order, each shaped for one
        series (batch 1) or squeezable to it."""
        parts = [self._prefix, _COUNTS.pack(steps_seen, last_ts, len(self.tensors))]
        for header, (dtype, *_), values in zip(self._headers, self._layout, tensors):
            parts += [header, np.ascontiguousarray(values, dtype).tobytes()]
        body = b"".join(parts)
        return body + hmac.digest(self._secret, body, hashlib.sha256)

    def decode(self, data: bytes, where: str) -> Snapshot:
        """The snapshot in `data`, or SnapshotRefused / SnapshotOfOtherModel saying what is wrong
        (`where` names the observation, e.g. "observation 3 (series 'a')")."""
        data = bytes(data)
        if len(data) < _HEAD.size + MAC_BYTES:
            raise SnapshotRefused(
                "truncated", f"{where}: resume_state is truncated ({len(data)} bytes; a snapshot has {self.size})"
            )
        magic, fmt = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise SnapshotRefused("garbage", f"{where}: resume_state is not a state snapshot (no {MAGIC!r} header)")
        if fmt != FORMAT_VERSION:
            raise SnapshotRefused(
                "format_version",
                f"{where}: resume_state has snapshot format version {fmt}; this server reads version {FORMAT_VERSION}",
            )
        body, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
        if not hmac.compare_digest(mac, hmac.digest(self._secret, body, hashlib.sha256)):
            raise SnapshotRefused(
                "signature",
                f"{where}: resume_state has a bad signature: it was altered or truncated, or signed with "
                "another state secret than this server's",
            )
        try:
            return self._parse(body, where)
        except (struct.error, UnicodeDecodeError, ValueError) as exc:  # signed by us, yet unreadable
            raise SnapshotRefused("garbage", f"{where}: resume_state is signed but unreadable ({exc})") from None

    def _parse(self, body: bytes, where: str) -> Snapshot:
        at = _HEAD.size
        strings = []
        for _ in range(2):
            (n,) = struct.unpack_from("<H", body, at)
            strings.append(body[at + 2 : at + 2 + n].decode())
            at += 2 + n
        name, version = strings
        if (name, version) != (self.name, self.version):
            raise SnapshotOfOtherModel(
                f"{where}: resume_state is a snapshot of model {name!r} version {version!r}; this server serves "
                f"{self.name!r} version {self.version!r}: start the series afresh (reset) or resume on a "
                "server of that version"
            )
        steps_seen, last_ts, count = _COUNTS.unpack_from(body, at)
        at += _COUNTS.size
        if count != len(self.tensors):
            raise ValueError(f"{count} state tensors, the model has {len(self.tensors)}")
        out = []
        for header, (dtype, shape, values, size), t in zip(self._headers, self._layout, self.tensors):
            # Same model version, so the same tensor headers byte for byte (name, dtype, shape).
            if body[at : at + len(header)] != header:
                raise ValueError(f"the header of state tensor {t.name!r} is not the model's {t}")
            at += len(header)
            if at + size > len(body):
                raise ValueError(f"state tensor {t.name!r} is cut short")
            out.append(np.frombuffer(body, dtype, values, at).reshape(shape))
            at += size
        if at != len(body):
            raise ValueError(f"{len(body) - at} bytes after the last tensor")
        return Snapshot(out, steps_seen, last_ts)
