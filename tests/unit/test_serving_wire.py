"""The hand-rolled response encoding parses, with the protobuf runtime, to the intended messages."""

import sys
import tracemalloc

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
    assert list(encoder._batches) == [g.batch]  # one shared encoding, kept while the batch lives


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


def test_the_encoder_keeps_within_its_byte_budgets_whatever_ids_and_times_clients_send():
    """Series ids and observation times come from clients: 20,000 distinct 256-byte ids at 20,000
    distinct times leave the encoder holding no more than its budgets (measured as the live
    allocations of its caches, not only its own estimate), and it still encodes correctly."""
    budget = 256 << 10
    encoder = ForecastEncoder(heads_budget_bytes=budget, timing_budget_bytes=budget)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        for b in range(40):
            ids = [f"{b * 500 + i:09d}".ljust(256, "x") for i in range(500)]
            batch = StepBatch(
                series_ids=ids,
                timestamps_ms=1_388_534_400_000 + 1_800_000 * np.arange(b * 500, (b + 1) * 500, dtype=np.int64),
                forecast=rng.standard_normal((500, 48, 3)).astype(np.float32),
                steps_seen=np.ones(500, np.int64),
                model_version="1",
                freq_ms=1_800_000,
                quantiles=(0.1, 0.5, 0.9),
                point_index=1,
            )
            response = pb.StreamResponse.FromString(encoder.encode_groups([ForecastGroup(np.arange(500), batch)], 500))
            check(response.forecasts[499], ForecastGroup(np.arange(500), batch), 499)
            assert encoder.cache_bytes <= 2 * budget
        del batch, response  # the last batch keeps its own encoding
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = snapshot.filter_traces(
        [tracemalloc.Filter(True, "*/serving/wire.py"), tracemalloc.Filter(True, "*/serving/bounded_cache.py")]
    )
    # The ids' own str objects were made here, in the test: add what the cache keeps of them.
    ids_kept = sum(sys.getsizeof(k) for k in encoder._heads.recent) + sum(
        sys.getsizeof(k) for k in encoder._heads._older
    )
    assert sum(s.size for s in held.statistics("filename")) + ids_kept <= 2 * budget * 1.1
