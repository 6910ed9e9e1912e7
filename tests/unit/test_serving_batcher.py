"""MicroBatcher: work submitted together is processed as one batch; each caller gets its own
result (or its own error), in arrival order."""

import asyncio

import pytest

from serving.batcher import MicroBatcher


class Recorder:
    """A stand-in `process`: records each batch; item "bad" fails alone; result = item * 10."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list] = []
        self.delay_s = delay_s

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(self.delay_s)
        return [ValueError(f"{i} is bad") if i == "bad" else i * 10 for i in items]


def test_items_arriving_while_a_batch_runs_go_together_in_the_next_one():
    rec = Recorder(delay_s=0.05)

    async def main():
        b = MicroBatcher(rec, max_batch_size=64)
        first = b.enqueue(1, 1)  # runs alone...
        await asyncio.sleep(0.01)
        rest = await asyncio.gather(*(b.enqueue(i, 2) for i in (2, 3, 4)))  # ...these queue meanwhile
        await b.close()
        return await first, rest

    first, rest = asyncio.run(main())
    assert rec.batches == [[1], [2, 3, 4]]
    assert (first, rest) == (10, [20, 30, 40])


def test_max_batch_size_bounds_a_batch_but_an_oversized_item_goes_alone():
    rec = Recorder(delay_s=0.02)

    async def main():
        b = MicroBatcher(rec, max_batch_size=4)
        blocker = b.enqueue(0, 1)
        await asyncio.sleep(0.005)
        out = await asyncio.gather(*(b.enqueue(i, size) for i, size in ((1, 3), (2, 2), (3, 9), (4, 1))))
        await blocker
        await b.close()
        return out

    assert asyncio.run(main()) == [10, 20, 30, 40]
    assert rec.batches == [[0], [1], [2], [3], [4]]  # 3+2 > 4; 9 alone; arrival order kept


def test_delay_gathers_items_arriving_within_it():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_size=64, max_batch_delay_s=0.05)
        a = b.enqueue(1, 1)
        await asyncio.sleep(0.01)  # within the delay of the first
        c = b.enqueue(2, 1)
        await asyncio.gather(a, c)
        await b.close()

    asyncio.run(main())
    assert rec.batches == [[1, 2]]


def test_a_bad_item_fails_alone_and_a_failing_batch_does_not_stop_the_batcher():
    calls = []

    async def process(items):
        calls.append(items)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return [ValueError("bad") if i == "bad" else i for i in items]

    async def main():
        b = MicroBatcher(process, max_batch_size=8)
        ok, bad = await asyncio.gather(b.enqueue("ok", 1), b.enqueue("bad", 1), return_exceptions=True)
        with pytest.raises(RuntimeError, match="boom"):
            await b.enqueue("x", 1)
        after = await b.enqueue("after", 1)
        await b.close()
        return ok, bad, after

    ok, bad, after = asyncio.run(main())
    assert ok == "ok" and isinstance(bad, ValueError) and after == "after"


def test_items_of_one_owner_never_share_a_batch_and_keep_their_order():
    rec = Recorder(delay_s=0.02)

    async def main():
        b = MicroBatcher(rec, max_batch_size=64)
        blocker = b.enqueue(0, 1)
        await asyncio.sleep(0.005)
        # queued while the blocker runs: stream A's second request must wait for the next batch,
        # and nothing queued after it may jump ahead of it
        futures = [b.enqueue(1, 1, "A"), b.enqueue(2, 1, "B"), b.enqueue(3, 1, "A"), b.enqueue(4, 1, "C")]
        out = await asyncio.gather(blocker, *futures)
        await b.close()
        return out

    assert asyncio.run(main()) == [0, 10, 20, 30, 40]
    assert rec.batches == [[0], [1, 2], [3, 4]]


def test_a_cancelled_item_is_dropped_before_its_batch():
    rec = Recorder(delay_s=0.02)

    async def main():
        b = MicroBatcher(rec, max_batch_size=64)
        blocker = b.enqueue(0, 1)
        await asyncio.sleep(0.005)
        gone, kept = b.enqueue(1, 5), b.enqueue(2, 1)
        gone.cancel()  # its stream went away while it waited
        out = await asyncio.gather(blocker, kept)
        rows = b.pending_rows
        await b.close()
        return out, rows

    assert asyncio.run(main()) == ([0, 20], 0)
    assert rec.batches == [[0], [2]]


@pytest.mark.parametrize("turn_below_rows, batches", [(0, [[1], [2], [3]]), (64, [[1, 2], [3]]), (2, [[1], [2, 3]])])
def test_a_small_batch_waits_one_loop_turn_for_more(turn_below_rows, batches):
    """Work queued in the loop turn after the dispatcher woke joins its batch when the batch is
    below turn_below_rows; a later turn's work does not. With the limit 2, item 1 (2 rows) goes
    at once, and item 2 (1 row) waits a turn, in which item 3 arrives."""
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_size=64, turn_below_rows=turn_below_rows)
        loop = asyncio.get_running_loop()
        futures = [b.enqueue(1, 2 if turn_below_rows == 2 else 1)]
        loop.call_soon(lambda: futures.append(b.enqueue(2, 1)))  # the next turn (a read completing)
        loop.call_soon(lambda: loop.call_soon(lambda: futures.append(b.enqueue(3, 1))))  # the one after
        await asyncio.sleep(0.01)
        await b.close()
        return await asyncio.gather(*futures)

    assert asyncio.run(main()) == [10, 20, 30]
    assert rec.batches == batches
