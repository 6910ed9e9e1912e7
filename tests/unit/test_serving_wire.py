"""The hand-rolled response encoding parses, with the protobuf runtime, to the intended messages."""

import numpy as np
import pytest

from serving.domain import ForecastGroup, StepBatch
from serving.proto import pb
from serving.wire import ForecastEncoder, varint, varints


def group(index, ts, horizon=5, quantiles=(0.1, 0.5, 0.9), seed=0, version="3"):
    """A batch of len(index) forecasts, all of them for the request positions `index`."""
    rng = np.random.default_rng(seed)
    n = len(index)
    batch = StepBatch(
        series_ids=[f"série-{i}" * (1 + i % 3) for i in index],
        timestamps_ms=np.array(ts, np.int64),
        forecast=rng.standard_normal((n, horizon, len(quantiles))).astype(np.float32),
        steps_seen=np.array([1, 200, 70_000][:n] + [5] * max(0, n - 3), np.int64),
        model_version=version,
        freq_ms=1_800_000,
        quantiles=tuple(quantiles),
        point_index=1,
    )
    return ForecastGroup(np.array(index, np.int64), batch)


def check(message: pb.SeriesForecast, g: ForecastGroup, k: int) -> None:
    b = g.batch
    assert message.series_id == b.series_ids[k]
    assert message.timestamp_ms == b.timestamps_ms[k]
    horizon = b.forecast.shape[1]
    assert list(message.forecast_timestamps_ms) == [
        int(b.timestamps_ms[k]) + j * b.freq_ms for j in range(1, horizon + 1)
    ]
    np.testing.assert_array_equal(np.array(message.point, np.float32), b.forecast[k, :, b.point_index])
    assert [q.quantile for q in message.quantiles] == pytest.approx(b.quantiles)
    for j, q in enumerate(message.quantiles):
        np.testing.assert_array_equal(np.array(q.values, np.float32), b.forecast[k, :, j])
    assert message.model_version == b.model_version
    assert message.steps_seen == b.steps_seen[k]


@pytest.mark.parametrize(
    "ts",
    [
        [1_388_534_400_000, 1_388_536_200_000, 1_400_000_000_000],  # same varint width: the fast path
        [0, 100, 1_388_534_400_000],  # mixed widths
        [-1_000, 5, 2**40],  # negative (10-byte varint) and a width boundary
    ],
)
def test_encoded_response_parses_to_the_forecasts(ts):
    g = group([0, 1, 2], ts)
    response = pb.StreamResponse.FromString(ForecastEncoder().encode_groups([g], 3))
    assert len(response.forecasts) == 3
    for k in range(3):
        check(response.forecasts[k], g, k)


def test_a_batch_shared_by_requests_is_encoded_once_and_sliced():
    g = group([0, 1, 2], [10, 20, 30])
    encoder = ForecastEncoder()
    first = ForecastGroup(np.array([0, 1]), g.batch, start=0)  # request 1 had rows 0-1
    second = ForecastGroup(np.array([0]), g.batch, start=2)  # request 2 had row 2
    one = pb.StreamResponse.FromString(encoder.encode_groups([first], 2))
    two = pb.StreamResponse.FromString(encoder.encode_groups([second], 1))
    assert [f.series_id for f in one.forecasts] == g.batch.series_ids[:2]
    check(two.forecasts[0], g, 2)
    assert len(g.batch.encoded) == 1


def test_groups_are_placed_in_request_order():
    a = group([0, 3], [10, 20], seed=1, version="1")
    b = group([1, 2], [30, 40], seed=2, version="2", horizon=3, quantiles=(0.25, 0.5, 0.75))
    response = pb.ForecastResponse.FromString(ForecastEncoder().encode_groups([a, b], 4))
    for pos, (g, k) in enumerate([(a, 0), (b, 0), (b, 1), (a, 1)]):
        check(response.forecasts[pos], g, k)


def test_varints_match_the_scalar_encoder():
    values = np.array([0, 1, 127, 128, 16_383, 16_384, 2**35, 2**63 - 1, -1, -(2**63)], np.int64)
    data, count = varints(values)
    assert data.tobytes() == b"".join(varint(int(v)) for v in values)
    assert count.tolist() == [len(varint(int(v))) for v in values]
