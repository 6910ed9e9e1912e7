"""Series state limits on a real server: idle expiry, the live-series cap, covariate models."""

import time

import grpc
import numpy as np
import pytest

from serving.proto import pb, pb_grpc
from tests.serving_support import (
    FREQ_MS,
    START_MS,
    OfflineModel,
    RunningServer,
    Stream,
    server_config,
    wait_for,
)


def obs(series_id, t, **kw):
    return {"series_id": series_id, "timestamp_ms": START_MS + t * FREQ_MS, "value": 3.0 + t % 4, **kw}


def test_idle_series_expire_and_start_afresh(tiny_model_dir):
    with (
        RunningServer(server_config(str(tiny_model_dir("lstm")), idle_timeout_s=0.4)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stream = Stream(pb_grpc.ForecasterStub(channel))
        assert [f.steps_seen for f in stream.send(obs("a", 0), obs("b", 0))] == [1, 1]
        assert server.metric("forecast_live_series") == 2
        for t in range(1, 6):  # "b" keeps stepping, "a" goes quiet
            (f,) = stream.send(obs("b", t))
            assert f.steps_seen == t + 1
            time.sleep(0.15)
        wait_for(lambda: server.metric("forecast_live_series") == 1)
        assert server.metric("forecast_series_expired_total") == 1
        (f,) = stream.send(obs("a", 9))  # "a" was freed: it starts again from zero state
        assert f.steps_seen == 1
        stream.close()
        wait_for(lambda: server.metric("forecast_live_series") == 0)  # stream closed: all freed


def test_live_series_cap_refuses_new_series_with_resource_exhausted(tiny_model_dir):
    with (
        RunningServer(server_config(str(tiny_model_dir("lstm")), max_series=3)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.ForecasterStub(channel)
        first = Stream(stub)
        first.send(obs("a", 0), obs("b", 0))
        with pytest.raises(grpc.RpcError) as err:
            Stream(stub).send(obs("c", 0), obs("d", 0))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "observation 0 (series 'c'): cannot start 2 new series: 2 series are live" in err.value.details()
        assert "--max-series" in err.value.details()
        first.send(obs("a", 1, end=True))  # ending a series makes room
        second = Stream(stub)
        assert [f.steps_seen for f in second.send(obs("c", 0), obs("d", 0))] == [1, 1]
        assert [f.steps_seen for f in first.send(obs("b", 1))] == [2]  # untouched throughout
        first.close()
        second.close()


def test_a_covariate_model_uses_them_and_checks_their_count(tiny_model_dir):
    model_dir = tiny_model_dir("lstm", covariates=("temperature", "workday"))
    offline = OfflineModel(model_dir)
    with (
        RunningServer(server_config(str(model_dir))) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.ForecasterStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert list(info.covariates) == ["temperature", "workday"]
        stream = Stream(stub)
        for t in range(3):
            covs = {"x": [20.0 + t, 1.0], "y": [-3.0, 0.0]}
            forecasts = stream.send(*(obs(s, t, covariates=c) for s, c in covs.items()))
            for f, (s, c) in zip(forecasts, covs.items()):
                expected = offline.step_one(s, START_MS + t * FREQ_MS, 3.0 + t % 4, c)
                np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, atol=1e-3)
        with pytest.raises(grpc.RpcError) as err:
            stream.send(obs("x", 5, covariates=[1.0]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1 covariates given, the model takes 2 (temperature, workday)" in err.value.details()

        ts = [START_MS + t * FREQ_MS for t in range(5)]
        values, cov = [3.0, 4.0, 5.0, 4.0, 3.0], [v for t in range(5) for v in (15.0 + t, float(t % 2))]
        (f,) = stub.Forecast(
            pb.ForecastRequest(
                series=[pb.SeriesHistory(series_id="h", timestamps_ms=ts, values=values, covariates=cov)]
            )
        ).forecasts
        expected = offline.run_sequence(ts, values, cov)
        np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, atol=1e-3)


def test_a_step_queued_for_series_freed_meanwhile_never_touches_their_rows(tiny_model_dir):
    # A stream that goes away leaves steps queued in the batcher; its rows may already belong to
    # new series by the time the batch runs. Those steps are dropped, the new owners untouched.
    import asyncio

    from serving.config import BatchConfig, RuntimeConfig, StateConfig
    from serving.errors import StatePreconditionFailed
    from serving.model_store import LoadedModel
    from serving.runtime import OrtModel
    from serving.stepper import StepChunk

    model_dir = tiny_model_dir()
    ort_model = OrtModel(model_dir / "model.onnx", model_dir / "sequence.onnx", RuntimeConfig(device="cpu"))
    loaded = LoadedModel("m", "1", ort_model, BatchConfig(), StateConfig())
    arena = loaded.arena

    def chunk(rows, t, ids):
        rows = np.asarray(rows, np.int64)
        n = len(rows)
        return StepChunk(
            index=np.arange(n), series_ids=ids, rows=rows, epochs=arena.epoch[rows].copy(),
            timestamps_ms=[START_MS + t * FREQ_MS] * n, values=[4.0] * n, covariates=[()] * n,
        )  # fmt: skip

    async def main():
        old = arena.alloc(["gone-a", "gone-b"], 0.0)
        await loaded.batcher.enqueue(chunk(old, 0, ["a", "b"]), 2)
        queued = chunk(old, 1, ["a", "b"])  # queued before its stream closed...
        arena.free(old)  # ...the stream closes...
        new = arena.alloc(["new-a", "new-b"], 0.0)  # ...and the rows go to new series
        assert sorted(new.tolist()) == sorted(old.tolist())
        with pytest.raises(StatePreconditionFailed, match="freed before this step ran"):
            await loaded.batcher.enqueue(queued, 2)
        state = arena.gather(new)[0]
        await loaded.close()
        return state, new

    state, new = asyncio.run(main())
    assert all(not s.any() for s in state)  # the new series still hold zero state
    assert arena.steps_seen[new].tolist() == [0, 0]


def test_bookkeeping_is_not_written_into_rows_handed_to_new_series_during_the_ort_call(tiny_model_dir):
    """A stream goes away while its batch is inside ONNX Runtime, and its rows go to new series
    before the call returns: the new series must start with no step counted and no previous
    timestamp (else their first observation could be refused as out of order). The step function
    blocks until the rows were freed and reallocated, so the race happens every time."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from serving.config import RuntimeConfig
    from serving.runtime import OrtModel
    from serving.state import StateArena
    from serving.stepper import INLINE_MAX_ROWS, StepChunk, StepProcessor

    model_dir = tiny_model_dir()
    ort_model = OrtModel(model_dir / "model.onnx", model_dir / "sequence.onnx", RuntimeConfig(device="cpu"))
    arena = StateArena(ort_model.state, initial_capacity=128)
    entered, release = threading.Event(), threading.Event()

    def blocking_step(rows, epochs, values, ts, cov):
        entered.set()
        assert release.wait(30), "the test never released the step"
        return ort_model.step(arena, rows, epochs, values, ts, cov)

    executor = ThreadPoolExecutor(1)
    process = StepProcessor(blocking_step, arena, ort_model.spec, "1", executor, max_batch_size=1024)
    n = INLINE_MAX_ROWS + 1  # a batch this large runs on the executor thread, off the event loop

    async def main():
        old = arena.alloc([("old", i) for i in range(n)], 0.0)
        chunk = StepChunk(
            index=np.arange(n), series_ids=[f"s{i}" for i in range(n)], rows=old.tolist(),
            epochs=arena.epoch[old].tolist(), timestamps_ms=[START_MS + 5 * FREQ_MS] * n, values=[4.0] * n,
            covariates=[()] * n,
        )  # fmt: skip
        running = asyncio.ensure_future(process([chunk]))
        assert await asyncio.to_thread(entered.wait, 30)  # the ORT call is in flight...
        arena.free(old)  # ...its stream goes away...
        new = arena.alloc([("new", i) for i in range(n)], 0.0)  # ...and new series take the rows
        assert sorted(new.tolist()) == sorted(old.tolist())
        release.set()
        await running
        return new

    new = asyncio.run(main())
    executor.shutdown()
    assert arena.steps_seen[new].tolist() == [0] * n
    assert (arena.last_ts[new] == np.iinfo(np.int64).min).all()  # so any first timestamp is accepted
    assert all(not s.any() for s in arena.gather(new)[0])  # and their state is still zero
