"""Per-client limits on a real server: each refusal has a clear status naming the limit, its
flag and where it was hit, is counted in forecast_limit_refusals_total, and leaves other
streams alone. Series ids are capped in length, and memory stays bounded however many distinct
ids clients send."""

import queue
import threading
import tracemalloc
from dataclasses import replace

import grpc
import pytest

from serving.config import LimitsConfig
from serving.proto import pb, pb_grpc
from serving.wire import HEADS_BUDGET_BYTES
from tests.serving_support import FREQ_MS, START_MS, RunningServer, Stream, server_config

LIMITS = LimitsConfig(max_series_per_stream=3, max_streams=3, max_observations_per_request=5)


def obs(series_id, t=0, **kw):
    return {"series_id": series_id, "timestamp_ms": START_MS + t * FREQ_MS, "value": 3.0 + t % 4, **kw}


@pytest.fixture(scope="module")
def limited(model_dir):
    with RunningServer(replace(server_config(str(model_dir)), limits=LIMITS)) as s:
        yield s


@pytest.fixture
def stub(limited):
    with grpc.insecure_channel(limited.target) as channel:
        yield pb_grpc.ForecasterStub(channel)


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert "Traceback" not in err.value.details()
    return err.value


def test_series_id_length_is_capped_by_default_at_256_bytes(server):
    """The module's default server: ids of 256 bytes are served, one byte more is refused
    (INVALID_ARGUMENT naming the limit, the flag and where), counted in UTF-8 bytes, not
    characters; the message shows the id cut short."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        longest = "a" * 256
        ok = Stream(stub)
        assert [f.series_id for f in ok.send(obs(longest), obs("é" * 128))] == [longest, "é" * 128]
        ok.close()
        for too_long, size in (("b" * 257, 257), ("€" * 86, 258)):  # "€" is 3 bytes in UTF-8
            err = refusal(lambda too_long=too_long: Stream(stub).send(obs("fine"), obs(too_long)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"series_id is {size} bytes long (UTF-8); the limit is 256 bytes (--max-series-id-bytes)" in (
                err.details()
            )
            assert f"observation 1 (series {too_long[:40]!r}... ({size} bytes))" in err.details()
            assert len(err.details()) < 300  # the id is not echoed whole
        history = pb.SeriesHistory(series_id="c" * 300, timestamps_ms=[START_MS], values=[1.0])
        err = refusal(lambda: stub.Forecast(pb.ForecastRequest(series=[history]), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "series 0 (series 'cccc" in err.details() and "(--max-series-id-bytes)" in err.details()
        assert server.metric("forecast_limit_refusals_total", limit="max_series_id_bytes") == 3  # this module's server


def test_observations_per_request(limited, stub):
    before = limited.metric("forecast_limit_refusals_total", limit="max_observations_per_request")
    stream = Stream(stub)
    assert len(stream.send(*(obs(s) for s in "abc"), obs("a", 1), obs("b", 1))) == 5  # at the limit: served
    err = refusal(lambda: stream.send(*(obs(s, 2) for s in "abc"), obs("a", 3), obs("b", 3), obs("c", 3)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the request has 6 observations and the limit is 5 (--max-observations-per-request)" in err.details()
    histories = [pb.SeriesHistory(series_id=s, timestamps_ms=[START_MS, START_MS + 1], values=[1, 2]) for s in "xyz"]
    err = refusal(lambda: stub.Forecast(pb.ForecastRequest(series=histories), timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "6 observations in 3 histories and the limit is 5 (--max-observations-per-request)" in err.details()
    assert limited.metric("forecast_limit_refusals_total", limit="max_observations_per_request") == before + 2


def test_series_per_stream(limited, stub):
    before = limited.metric("forecast_limit_refusals_total", limit="max_series_per_stream")
    stream = Stream(stub)
    stream.send(obs("a"), obs("b"), obs("c"))
    stream.send(obs("a", 1, end=True))  # ending a series makes room in the stream
    assert [f.steps_seen for f in stream.send(obs("d"), obs("b", 1))] == [1, 2]
    other = Stream(stub)  # the limit is per stream: another one has its own room
    assert len(other.send(obs("a"), obs("b"), obs("c"))) == 3
    err = refusal(lambda: stream.send(obs("c", 1), obs("e")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        "observation 1 (series 'e'): cannot start 1 new series in this stream: it has 3 live series and the limit "
        "is 3 (--max-series-per-stream)" in err.details()
    )
    assert [f.steps_seen for f in other.send(obs("a", 1))] == [2]  # unaffected
    other.close()
    assert limited.metric("forecast_limit_refusals_total", limit="max_series_per_stream") == before + 1


def test_concurrent_streams(limited, stub):
    before = limited.metric("forecast_limit_refusals_total", limit="max_streams")
    streams = [Stream(stub) for _ in range(3)]
    for i, stream in enumerate(streams):
        stream.send(obs(f"open-{i}"))  # answered: the server has the stream open
    err = refusal(lambda: Stream(stub).send(obs("one too many")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cannot open another stream: 3 streams are open and the limit is 3 (--max-streams)" in err.details()
    assert [f.steps_seen for f in streams[0].send(obs("open-0", 1))] == [2]  # the open ones go on
    streams.pop().close()
    fresh = Stream(stub)  # room again
    assert len(fresh.send(obs("late"))) == 1
    for stream in [*streams, fresh]:
        stream.close()
    assert limited.metric("forecast_limit_refusals_total", limit="max_streams") == before + 1
    assert limited.metric("forecast_requests_total", rpc="StreamForecast", code="RESOURCE_EXHAUSTED") >= 1


# -- memory under many distinct ids -------------------------------------------------------------

IDS_PER_MESSAGE, MESSAGES_PER_STREAM, STREAMS = 1000, 5, 20  # 100,000 distinct ids in all
ID_BYTES = 256  # the longest allowed by default


def id_requests(stream: int):
    for m in range(MESSAGES_PER_STREAM):
        first = (stream * MESSAGES_PER_STREAM + m) * IDS_PER_MESSAGE
        yield pb.StreamRequest(
            observations=[
                pb.Observation(series_id=f"{first + k:09d}".ljust(ID_BYTES, "x"), timestamp_ms=START_MS, value=1.0)
                for k in range(IDS_PER_MESSAGE)
            ]
        )


def test_memory_stays_bounded_under_100k_distinct_ids_of_the_longest_length(server):
    """100,000 distinct 256-byte ids through short-lived streams: what the server keeps
    afterwards (measured as the serving package's live allocations, sampled between streams)
    stays under the id cache's byte budget plus the state rows the streams needed at once,
    however many ids went through. (An entry-count bound alone kept up to 65,536 ids: ~40 MB.)"""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        Stream(stub).send(obs("warm-up"))  # lazily built server objects exist before measuring
        tracemalloc.start()
        try:
            retained = []
            for s in range(STREAMS):
                answers = stub.StreamForecast(id_requests(s), timeout=60)
                assert sum(len(r.forecasts) for r in answers) == IDS_PER_MESSAGE * MESSAGES_PER_STREAM
                if s % 5 == 4:  # a snapshot takes ~1 s: sample every 5 streams (25,000 ids)
                    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/serving/*")])
                    retained.append(sum(stat.size for stat in snapshot.statistics("filename")))
        finally:
            tracemalloc.stop()
        state_bytes = server.metric("forecast_state_bytes")  # rows grown for 5,000 live series at once
    assert server.metric("forecast_live_series") == 0
    bound = HEADS_BUDGET_BYTES + state_bytes + (2 << 20)  # 2 MiB: timing fields, tables, small objects
    assert max(retained) <= bound, [f"{r / 2**20:.1f} MiB" for r in retained]


def test_a_stream_refused_for_its_limits_leaves_the_others_alone(limited, stub):
    """While refusals happen around it, a stream keeps its series and its forecasts."""
    steady = Stream(stub)
    steps = [f.steps_seen for f in steady.send(obs("k"), obs("l"))]
    errors: queue.Queue = queue.Queue()

    def misbehave():
        try:
            Stream(stub).send(*(obs(f"m{i}") for i in range(6)))
        except grpc.RpcError as exc:
            errors.put(exc.code())

    threads = [threading.Thread(target=misbehave) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [errors.get_nowait() for _ in range(2)] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert [f.steps_seen for f in steady.send(obs("k", 1), obs("l", 1))] == [s + 1 for s in steps]
    steady.close()
