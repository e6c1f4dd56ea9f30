"""The compute scheduler: slots, fair share between groups, yielding at steps, abandonment."""

import threading
import time

import pytest

from app.scheduling import ComputeScheduler, PassAbandoned, checkpoint


def run_steps(scheduler, group, steps, step_s, log, wanted=None):
    with scheduler.computing(group, wanted):
        for i in range(steps):
            log.append((group, i))
            time.sleep(step_s)
            checkpoint(wanted)


def hold_the_slot(scheduler, group):
    """A thread that takes `group`'s turn and keeps it until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def hold():
        with scheduler.computing(group):
            started.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert started.wait(10)
    return holder, release


def test_a_newcomer_runs_at_the_next_step_of_a_heavy_pass_not_after_it():
    # One slot: a heavy pass of 40 steps runs; a light pass of 1 step arrives. Without the scheduler
    # (or first come, first served) it would wait for all 40 steps; here it runs within a step or two.
    scheduler, log = ComputeScheduler(1), []
    heavy = threading.Thread(target=run_steps, args=(scheduler, "heavy", 40, 0.005, log))
    heavy.start()
    while len(log) < 5:
        time.sleep(0.001)
    light = threading.Thread(target=run_steps, args=(scheduler, "light", 1, 0.0, log))
    light.start()
    light.join(10)
    heavy.join(10)
    at = log.index(("light", 0))
    assert at < 10 and log.count(("light", 0)) == 1 and len(log) == 41, log[:12]


def test_busy_groups_share_the_slot_by_compute_time_and_only_one_computes_at_once():
    scheduler, log, inside, most = ComputeScheduler(1), [], [0], [0]
    lock = threading.Lock()

    def work(group):
        with scheduler.computing(group):
            for i in range(30):
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                log.append(group)
                time.sleep(0.003)
                with lock:
                    inside[0] -= 1
                checkpoint()

    threads = [threading.Thread(target=work, args=(g,)) for g in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert most[0] == 1 and len(log) == 60
    first_half = log[:30]  # both got turns early: neither waited for the other's whole pass
    assert 8 <= first_half.count("a") <= 22, log
    times = scheduler.virtual_times()
    assert abs(times["a"] - times["b"]) < 0.05


def test_a_pass_whose_requests_went_away_stops_waiting():
    scheduler = ComputeScheduler(1)
    holder, release = hold_the_slot(scheduler, "holder")
    wanted = [True]
    outcome = []

    def wait_for_turn():
        try:
            with scheduler.computing("waiter", lambda: wanted[0]):
                outcome.append("ran")
        except PassAbandoned:
            outcome.append("abandoned")

    waiter = threading.Thread(target=wait_for_turn)
    waiter.start()
    time.sleep(0.1)
    wanted[0] = False
    waiter.join(5)
    release.set()
    holder.join(5)
    assert outcome == ["abandoned"]
    with scheduler.computing("after"):  # the slot is free again
        pass


def test_outside_a_pass_checkpoint_does_nothing_and_none_schedules_nothing():
    checkpoint()
    with ComputeScheduler(None).computing("x"):
        checkpoint()
    with pytest.raises(ValueError, match="slots must be at least 1"):
        ComputeScheduler(0)


def test_a_pass_expected_to_be_short_runs_at_once_beside_the_slots():
    scheduler = ComputeScheduler(1)
    holder, release = hold_the_slot(scheduler, "heavy")
    ran = []

    def short():
        with scheduler.computing("light", expected_s=0.0002):
            ran.append(1)

    quick = threading.Thread(target=short)
    quick.start()
    quick.join(2)
    assert ran == [1]  # did not wait for the held slot
    slow_ran = []

    def slow():
        with scheduler.computing("light", expected_s=0.01):
            slow_ran.append(1)

    waiting = threading.Thread(target=slow)
    waiting.start()
    waiting.join(0.2)
    assert slow_ran == []  # a pass expected to take longer waits for its turn
    release.set()
    holder.join(5)
    waiting.join(5)
    assert slow_ran == [1]


def test_a_group_that_ran_alone_carries_no_debt_when_others_arrive():
    # "a" computes alone for 0.3 s and goes idle; "b" starts a long stepped pass. A new pass of "a"
    # must get in at one of b's next steps, not wait until b has caught up a's 0.3 s.
    scheduler, log = ComputeScheduler(1), []
    run_steps(scheduler, "a", 30, 0.01, [])
    heavy = threading.Thread(target=run_steps, args=(scheduler, "b", 40, 0.01, log))
    heavy.start()
    while len(log) < 3:
        time.sleep(0.001)
    light = threading.Thread(target=run_steps, args=(scheduler, "a", 1, 0.0, log))
    light.start()
    light.join(10)
    heavy.join(10)
    assert log.index(("a", 0)) < 10, log[:12]


# --- lone passes: every slot for a pass that computes alone ---------------------------------------


def test_a_lone_pass_takes_every_slot_until_it_ends():
    scheduler, order = ComputeScheduler(2), []
    computing, release = threading.Event(), threading.Event()

    def lone_pass():
        with scheduler.computing("lone", lone=True) as alone:
            order.append(("lone", alone))
            computing.set()
            assert release.wait(10)
        order.append(("lone", "done"))

    first = threading.Thread(target=lone_pass)
    first.start()
    assert computing.wait(10)
    other = threading.Thread(target=lambda: order.append(("other", scheduler.computing("other").__enter__())))
    other.start()
    time.sleep(0.1)
    assert order == [("lone", True)]  # the second slot is the lone pass's too: the other waits
    release.set()
    first.join(10)
    other.join(10)
    assert order == [("lone", True), ("lone", "done"), ("other", False)]


def test_a_pass_that_finds_another_computing_does_not_go_alone():
    scheduler = ComputeScheduler(2)
    holder, release = hold_the_slot(scheduler, "busy")
    with scheduler.computing("second", lone=True) as alone:
        assert alone is False  # one slot was taken: the pass has the other
    release.set()
    holder.join(10)
    with scheduler.computing("third") as alone:
        assert alone is False  # it did not ask
    with scheduler.computing("fourth", lone=True) as alone:
        assert alone is True
    with ComputeScheduler(1).computing("one", lone=True) as alone:
        assert alone is False  # one slot: nothing more to take
    with ComputeScheduler(None).computing("none", lone=True) as alone:
        assert alone is False  # no scheduling
