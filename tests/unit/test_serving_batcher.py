"""MicroBatcher: concurrent steps become one call, results go back to the right caller in order."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.batcher import MicroBatcher


class Recorder:
    """A stand-in step function: forecast = value * 10 + row; records each call's rows."""

    def __init__(self, delay_s: float = 0.0):
        self.calls: list[list[int]] = []
        self.delay_s = delay_s

    def __call__(self, rows, values, ts, cov):
        import time

        self.calls.append(rows.tolist())
        time.sleep(self.delay_s)
        out = (values * 10 + rows)[:, None, None]  # [B, horizon=1, Q=1]
        return out.astype(np.float32)


def step_args(rows, values):
    rows = np.array(rows, np.int64)
    return (
        rows,
        np.array(values, np.float32),
        np.zeros(len(rows), np.int64),
        np.zeros((len(rows), 0), np.float32),
    )


def run(coro):
    return asyncio.run(coro)


def test_steps_submitted_together_run_as_one_call_and_keep_their_order():
    rec = Recorder(delay_s=0.05)

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(rec, ex, max_batch_size=64)
            first = asyncio.ensure_future(b.step(*step_args([0], [1.0])))  # runs alone...
            await asyncio.sleep(0.01)
            # ...while it runs, three streams queue up; they go together in the next call
            rest = await asyncio.gather(*(b.step(*step_args([r, r + 10], [r, r])) for r in (1, 2, 3)))
            await first
            await b.close()
            return first.result(), rest

    first, rest = run(main())
    assert rec.calls == [[0], [1, 11, 2, 12, 3, 13]]
    assert first[:, 0, 0].tolist() == [10.0]
    for r, out in zip((1, 2, 3), rest):
        assert out[:, 0, 0].tolist() == [r * 10 + r, r * 10 + r + 10]


def test_max_batch_size_splits_large_requests_and_bounds_calls():
    rec = Recorder()

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(rec, ex, max_batch_size=4)
            out = await b.step(*step_args(range(10), [1.0] * 10))
            await b.close()
            return out

    out = run(main())
    assert max(len(c) for c in rec.calls) <= 4
    assert sorted(r for c in rec.calls for r in c) == list(range(10))
    assert out[:, 0, 0].tolist() == [10.0 + r for r in range(10)]  # in the caller's order


def test_delay_gathers_steps_arriving_within_it():
    rec = Recorder()

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(rec, ex, max_batch_size=64, max_batch_delay_s=0.05)
            a = asyncio.ensure_future(b.step(*step_args([0], [1.0])))
            await asyncio.sleep(0.01)  # arrives within the delay of the first
            c = asyncio.ensure_future(b.step(*step_args([1], [1.0])))
            await asyncio.gather(a, c)
            await b.close()

    run(main())
    assert rec.calls == [[0, 1]]


def test_a_failing_call_fails_its_callers_and_the_batcher_carries_on():
    calls = []

    def flaky(rows, values, ts, cov):
        calls.append(rows.tolist())
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.zeros((len(rows), 1, 1), np.float32)

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(flaky, ex, max_batch_size=8)
            with pytest.raises(RuntimeError, match="boom"):
                await b.step(*step_args([0], [1.0]))
            out = await b.step(*step_args([1], [1.0]))
            await b.close()
            return out

    assert run(main()).shape == (1, 1, 1)
