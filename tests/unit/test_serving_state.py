"""StateArena: preallocated rows, growth by doubling, zero state for new series, safe frees."""

import numpy as np
import pytest

from serving.contract import StateTensor
from serving.errors import CapacityExceeded
from serving.state import StateArena

H, C, LAGS = StateTensor("h", (2, None, 3)), StateTensor("c", (2, None, 3)), StateTensor("lags", (None, 4))


def arena(initial: int = 2, cap: int = 16, tensors: tuple[StateTensor, ...] = (H, C, LAGS)) -> StateArena:
    return StateArena(tensors, initial_capacity=initial, max_capacity=cap)


def test_new_rows_start_from_zero_state_even_when_reused():
    a = arena()
    rows = a.alloc(["a", "b"], now=0.0)
    states, epochs = a.gather(rows)
    a.scatter(rows, epochs, [np.ones_like(s) for s in states])
    a.free(rows[:1])
    again = a.alloc(["c"], now=0.0)
    assert again.tolist() == rows[:1].tolist()  # the freed row is handed out again...
    assert all((s == 0).all() for s in a.gather(again)[0])  # ...zeroed
    assert all((s == 1).all() for s in a.gather(rows[1:])[0])  # the other series keeps its state


def test_grows_by_doubling_up_to_the_cap_and_keeps_state():
    a = arena(initial=2, cap=5)
    first = a.alloc(["a", "b"], now=0.0)
    states, epochs = a.gather(first)
    a.scatter(first, epochs, [np.full_like(s, 7.0) for s in states])
    a.alloc(["c"], now=0.0)
    assert a.capacity == 4
    a.alloc(["d", "e"], now=0.0)
    assert a.capacity == 5  # doubling stops at the cap
    assert all((s == 7).all() for s in a.gather(first)[0])
    assert a.states[0].shape == (2, 5, 3)  # [L, capacity, H]: the batch axis of h holds the rows
    assert a.states[2].shape == (5, 4)  # [capacity, S]: and so does the lag buffer's
    with pytest.raises(CapacityExceeded, match="at most 5"):
        a.alloc(["f"], now=0.0)


def test_scatter_skips_rows_freed_while_their_step_was_in_flight():
    a = arena()
    rows = a.alloc(["a", "b"], now=0.0)
    states, epochs = a.gather(rows)  # a step starts...
    a.free(rows[:1])  # ...the stream closes meanwhile...
    reused = a.alloc(["new"], now=0.0)  # ...and another series takes the row
    a.scatter(rows, epochs, [np.ones_like(s) for s in states])  # the late result lands
    assert all((s == 0).all() for s in a.gather(reused)[0])  # not in the new series
    assert all((s == 1).all() for s in a.gather(rows[1:])[0])


def test_double_free_does_not_duplicate_rows():
    a = arena(initial=4, cap=4)
    rows = a.alloc(["a"], now=0.0)
    a.free(rows)
    a.free(rows)
    assert a.live_count == 0
    assert len(set(a.alloc(["w", "x", "y", "z"], now=0.0).tolist())) == 4


def test_rows_gather_and_scatter_along_each_tensors_batch_axis():
    a = arena(initial=4, cap=4)
    rows = a.alloc(["a", "b", "c"], now=0.0)
    states, epochs = a.gather(rows[[2, 0]])
    assert [s.shape for s in states] == [(2, 2, 3), (2, 2, 3), (2, 4)]  # the graph's input shapes for B = 2
    assert all(s.flags["C_CONTIGUOUS"] for s in states)  # ORT takes them as they are
    a.scatter(rows[[2, 0]], epochs, [np.full_like(s, k + 1.0) for k, s in enumerate(states)])
    h, c, lags = a.gather(rows)[0]
    assert h[:, 0].max() == 1 and h[:, 1].max() == 0 and h[:, 2].min() == 1  # series a and c, not b
    assert (c[:, [0, 2]] == 2).all() and (lags[[0, 2]] == 3).all() and (lags[1] == 0).all()


def test_idle_rows_and_bookkeeping():
    a = arena(tensors=(H,))
    rows = a.alloc(["a", "b"], now=100.0)
    steps = a.record_steps(rows[1:], a.epoch[rows[1:]], np.array([5_000], np.int64), now=200.0)
    assert steps.tolist() == [1]
    assert a.idle_rows(now=250.0, idle_timeout_s=100.0).tolist() == [rows[0]]
    assert a.last_ts[rows[1]] == 5_000
    assert a.owners[rows[0]] == "a"
    assert a.nbytes >= 2 * 2 * 3 * 4  # at least the [L, capacity, H] float32 state


def test_a_restored_row_holds_the_snapshot_and_a_read_says_which_rows_changed_hands():
    a = arena()
    rows = a.alloc(["a", "b"], now=0.0)
    h, c, lags = (np.full(t.shape_for(1), k + 1.0, np.float32) for k, t in enumerate((H, C, LAGS)))
    a.restore(int(rows[1]), [h, c, lags], steps_seen=41, last_ts=1_000)
    assert a.steps_seen[rows[1]] == 41 and a.last_ts[rows[1]] == 1_000
    states, epochs = a.gather(rows)
    np.testing.assert_array_equal(states[0][:, 1:2], h)
    np.testing.assert_array_equal(states[2][1:2], lags)
    assert (states[0][:, 0] == 0).all()  # the other row untouched

    read, keep = a.read(rows, epochs)
    assert keep.tolist() == [True, True]
    np.testing.assert_array_equal(read[1][:, 1:2], c)
    a.free(rows[1:])
    a.alloc(["c"], now=0.0)  # the row goes to another series while a step was in flight
    _, keep = a.read(rows, epochs)
    assert keep.tolist() == [True, False]  # no snapshot of someone else's state
