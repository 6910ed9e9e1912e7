"""The snapshot codec (serving.snapshots): a round trip restores every state tensor exactly, and
each way a snapshot can be wrong is refused with its own reason and message."""

import hashlib
import hmac

import numpy as np
import pytest

from serving.contract import StateTensor
from serving.errors import SnapshotOfOtherModel, SnapshotRefused
from serving.snapshots import FORMAT_VERSION, MAC_BYTES, MAGIC, SnapshotCodec

SECRET = b"0123456789abcdef-secret"
# A 2-layer LSTM of 8 units with a lag buffer and its fill count: every kind of state tensor.
TENSORS = (
    StateTensor("h", (2, None, 8)),
    StateTensor("c", (2, None, 8)),
    StateTensor("lags", (None, 48)),
    StateTensor("lags_seen", (None, 1), np.int64),
)


def codec(secret=SECRET, name="forecaster", version="7", tensors=TENSORS) -> SnapshotCodec:
    return SnapshotCodec(secret, name, version, tensors)


def state(seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal(t.shape_for(1)).astype(t.dtype) if t.dtype != np.int64 else np.array([[37]], np.int64)
        for t in TENSORS
    ]


def test_round_trip_restores_every_tensor_and_the_bookkeeping():
    c = codec()
    tensors = state()
    data = c.encode(tensors, steps_seen=1234, last_ts=1_388_534_400_000)
    assert len(data) == c.size
    assert data[:4] == MAGIC and data[4] == FORMAT_VERSION
    snap = codec().decode(data, "observation 0")  # another instance: another replica, same secret
    assert snap.steps_seen == 1234 and snap.last_ts == 1_388_534_400_000
    for got, want, t in zip(snap.tensors, tensors, TENSORS):
        assert got.dtype == t.dtype and got.shape == t.shape_for(1)
        np.testing.assert_array_equal(got, want)


def test_size_is_what_the_docs_say():
    # header 4 + 1, name 2 + 10, version 2 + 1, counts 8 + 8 + 1, MAC 32; per tensor 3 + name + 4 x rank + values
    per_tensor = (3 + 1 + 12 + 64) * 2 + (3 + 4 + 8 + 192) + (3 + 9 + 8 + 8)
    assert codec().size == 5 + 12 + 3 + 17 + 32 + per_tensor


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize("at", [5, 20, 60, 200, -MAC_BYTES - 1, -1])
def test_any_flipped_byte_after_the_header_is_a_bad_signature(at):
    data = codec().encode(state(), 5, 10)
    with pytest.raises(SnapshotRefused, match=r"observation 3.*bad signature") as err:
        codec().decode(flip(data, at), "observation 3")
    assert err.value.snapshot_refusal == "signature"


def test_another_secret_is_a_bad_signature():
    data = codec(secret=b"another-secret-of-this-server").encode(state(), 5, 10)
    with pytest.raises(SnapshotRefused, match="another state secret") as err:
        codec().decode(data, "here")
    assert err.value.snapshot_refusal == "signature"


@pytest.mark.parametrize("keep", [0, 3, 36, 100])
def test_a_truncated_snapshot_is_refused(keep):
    data = codec().encode(state(), 5, 10)
    with pytest.raises(SnapshotRefused, match=r"truncated|bad signature") as err:
        codec().decode(data[:keep], "here")
    assert err.value.snapshot_refusal in ("truncated", "signature")


def test_garbage_and_a_foreign_header_are_not_snapshots():
    with pytest.raises(SnapshotRefused, match="not a state snapshot") as err:
        codec().decode(b"x" * 200, "here")
    assert err.value.snapshot_refusal == "garbage"


def test_an_unknown_format_version_is_refused_by_number():
    data = bytearray(codec().encode(state(), 5, 10))
    data[4] = 9
    with pytest.raises(SnapshotRefused, match="format version 9; this server reads version 1") as err:
        codec().decode(bytes(data), "here")
    assert err.value.snapshot_refusal == "format_version"


@pytest.mark.parametrize(("name", "version"), [("forecaster", "8"), ("other", "7")])
def test_a_snapshot_of_another_model_version_names_both(name, version):
    data = codec(name=name, version=version).encode(state(), 5, 10)
    with pytest.raises(SnapshotOfOtherModel, match=rf"'{name}' version '{version}'.*'forecaster' version '7'"):
        codec().decode(data, "here")


def test_signed_but_malformed_content_is_refused_not_crashed():
    # A body this server would sign yet cannot read (only a bug or a leaked secret gets here).
    c = codec()
    good = c.encode(state(), 5, 10)[:-MAC_BYTES]
    body = good + b"extra"
    with pytest.raises(SnapshotRefused, match=r"signed but unreadable.*bytes after"):
        c.decode(body + hmac.digest(SECRET, body, hashlib.sha256), "here")
    other = SnapshotCodec(SECRET, "forecaster", "7", TENSORS[:2])  # same version, other tensors
    with pytest.raises(SnapshotRefused, match="signed but unreadable"):
        other.decode(c.encode(state(), 5, 10), "here")


def test_a_short_secret_is_refused():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        codec(secret=b"short")
