"""The batching policy alone: plain numbers in, a plain plan out."""

import pytest

from server.engine.scheduler import REGROW_AFTER_STEPS, Scheduler, SchedulePlan, fill_fifo


def test_continuous_fills_free_slots_fifo_and_splits_only_the_last_request():
    plan = Scheduler("continuous", max_batch=8).schedule(waiting=[3, 4, 5, 2], running=0)
    assert plan == SchedulePlan(admit=(3, 4, 1), run=8)


def test_continuous_tops_up_a_running_batch():
    plan = Scheduler("continuous", max_batch=8).schedule(waiting=[2, 3], running=5)
    assert plan == SchedulePlan(admit=(2, 1), run=8)


def test_continuous_admits_nothing_into_a_full_batch():
    plan = Scheduler("continuous", max_batch=4).schedule(waiting=[1], running=4)
    assert plan == SchedulePlan(admit=(), run=4)


def test_nothing_waiting_or_running_runs_nothing():
    for policy in ("continuous", "static", "sequential"):
        assert Scheduler(policy, max_batch=4).schedule(waiting=[], running=0) == SchedulePlan((), 0)


def test_static_waits_for_the_batch_to_finish_then_fills_it():
    scheduler = Scheduler("static", max_batch=8)
    assert scheduler.schedule(waiting=[2, 2], running=3) == SchedulePlan(admit=(), run=3)
    assert scheduler.schedule(waiting=[2, 9], running=0) == SchedulePlan(admit=(2, 6), run=8)


def test_sequential_runs_one_request_at_a_time_in_chunks_of_the_cap():
    scheduler = Scheduler("sequential", max_batch=4)
    assert scheduler.schedule(waiting=[2, 2], running=1) == SchedulePlan(admit=(), run=1)
    assert scheduler.schedule(waiting=[2, 2], running=0) == SchedulePlan(admit=(2,), run=2)
    assert scheduler.schedule(waiting=[10, 2], running=0) == SchedulePlan(admit=(4,), run=4)


def test_after_halving_the_cap_only_the_oldest_lanes_run():
    scheduler = Scheduler("continuous", max_batch=8)
    assert scheduler.halve_batch_cap()
    assert scheduler.schedule(waiting=[3], running=8) == SchedulePlan(admit=(), run=4)


def test_halving_stops_at_one():
    scheduler = Scheduler("static", max_batch=5)
    halvings = 0
    while scheduler.halve_batch_cap():
        halvings += 1
    assert (halvings, scheduler.batch_cap) == (2, 1)


def test_a_halved_cap_grows_back_after_good_steps_and_waits_longer_each_time_it_fails_again():
    scheduler = Scheduler("continuous", max_batch=8)

    def good_steps_until_it_grows() -> int:
        cap, steps = scheduler.batch_cap, 0
        while scheduler.batch_cap == cap:
            scheduler.step_succeeded()
            steps += 1
        return steps

    scheduler.halve_batch_cap()
    assert good_steps_until_it_grows() == REGROW_AFTER_STEPS and scheduler.batch_cap == 8
    scheduler.halve_batch_cap()  # the regrown batch failed again
    assert good_steps_until_it_grows() == 2 * REGROW_AFTER_STEPS and scheduler.batch_cap == 8


def test_the_cap_never_grows_past_max_batch():
    scheduler = Scheduler("static", max_batch=5)
    scheduler.lower_batch_cap(3)
    for _ in range(10 * REGROW_AFTER_STEPS):
        scheduler.step_succeeded()
    assert scheduler.batch_cap == 5
    scheduler.lower_batch_cap(0)  # nothing fitted: one lane at a time is still tried
    assert scheduler.batch_cap == 1


def test_fill_fifo_reads_no_further_than_it_needs():
    def waiting():
        yield 3
        yield 2
        raise AssertionError("read past the requests that fill the batch")

    assert fill_fifo(waiting(), free=5) == (3, 2)


@pytest.mark.parametrize("policy, max_batch, message", [("greedy", 4, "unknown policy"), ("static", 0, "max_batch")])
def test_bad_settings_are_refused(policy, max_batch, message):
    with pytest.raises(ValueError, match=message):
        Scheduler(policy, max_batch)
