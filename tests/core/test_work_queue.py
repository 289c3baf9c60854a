"""The queue behind predict's actor pool: which unit goes next, and when lost work fails a run."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from raytorch.core.errors import PoolError
from raytorch.core.work_queue import MAX_ATTEMPTS, WorkQueue


@dataclass(frozen=True)
class U:
    id: str


def _units(n: int) -> list[U]:
    return [U(f"u{i}") for i in range(n)]


def test_units_go_out_in_order_and_the_queue_ends_when_all_commit():
    queue = WorkQueue(_units(3), pool_size=2)
    taken = [queue.take(), queue.take(), queue.take()]
    assert [u.id for u in taken if u] == ["u0", "u1", "u2"] and queue.take() is None
    assert queue  # out with actors, not committed
    for unit in taken:
        assert unit is not None
        queue.done(unit)
    assert not queue


def test_a_lost_actor_s_units_go_back_to_the_front_in_order():
    queue = WorkQueue(_units(5), pool_size=2)
    a, b, c = queue.take(), queue.take(), queue.take()
    assert a and b and c
    queue.lost([b, a], "node lost")
    assert [queue.take() for _ in range(4)] == [b, a, U("u3"), U("u4")]


@pytest.mark.parametrize("lost_times", [1, MAX_ATTEMPTS - 1])
def test_a_unit_may_be_lost_a_few_times(lost_times):
    queue = WorkQueue(_units(1), pool_size=4)
    for _ in range(lost_times):
        unit = queue.take()
        assert unit is not None
        queue.lost([unit], "node lost")
    assert queue.take() == U("u0")


def test_a_unit_lost_every_time_fails_the_run_naming_it():
    queue = WorkQueue(_units(2), pool_size=4)
    for _ in range(MAX_ATTEMPTS - 1):
        unit = queue.take()
        assert unit == U("u0")
        queue.lost([unit], "out of memory")
    unit = queue.take()
    assert unit == U("u0")
    with pytest.raises(PoolError, match=rf"unit u0 .* lost {MAX_ATTEMPTS} times.*out of memory"):
        queue.lost([unit], "out of memory")


def test_actors_lost_in_a_row_with_nothing_committed_fail_the_run():
    queue = WorkQueue(_units(4), pool_size=2)
    for _ in range(5):  # 2 * pool_size + 1 idle losses are tolerated
        queue.lost([], "exited")
    with pytest.raises(PoolError, match=r"6 inference actors were lost in a row.*exited"):
        queue.lost([], "exited")


def test_a_commit_between_losses_resets_the_count():
    queue = WorkQueue(_units(10), pool_size=1)
    for _ in range(4):
        for _ in range(3):
            queue.lost([], "preempted")
        unit = queue.take()
        assert unit is not None
        queue.done(unit)
    assert queue.waiting == 6
