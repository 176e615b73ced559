"""Restart back-off: doubling, cap, reset after a stable run, crash-loop stop."""

from __future__ import annotations

from watchdog.backoff import RestartPolicy
from watchdog.config import ActionsConfig


def crash(policy: RestartPolicy, now: float, ran_s: float = 0.5) -> float:
    """Start at `now`, exit `ran_s` later; return the exit time."""
    policy.record_start(now)
    policy.record_exit(now + ran_s)
    return now + ran_s


def test_first_start_is_immediate():
    p = RestartPolicy(1, 60, 5, 300)
    assert p.next_start_at(100.0) == 100.0
    assert p.delay() == 0.0


def test_delays_double_up_to_the_cap():
    p = RestartPolicy(initial_s=1, max_s=10, crash_loop_restarts=100, crash_loop_window_s=300)
    delays, t = [], 0.0
    for _ in range(6):
        exited = crash(p, t)
        start = p.next_start_at(exited)
        delays.append(start - exited)
        t = start
    assert delays == [1, 2, 4, 8, 10, 10]
    assert p.restarts == 5


def test_next_start_at_is_never_in_the_past():
    p = RestartPolicy(2, 60, 5, 300)
    crash(p, 0.0, ran_s=1.0)  # exit at 1.0, may start at 3.0
    assert p.next_start_at(1.5) == 3.0
    assert p.next_start_at(10.0) == 10.0


def test_stable_run_resets_the_delay():
    p = RestartPolicy(1, 60, 100, 300, stable_s=30)
    t = 0.0
    for _ in range(4):
        t = p.next_start_at(crash(p, t))
    assert p.delay() == 8
    exited = crash(p, t, ran_s=29.9)  # still quick
    assert p.delay() == 16
    t = p.next_start_at(exited)
    exited = crash(p, t, ran_s=30.0)  # a stable run
    assert p.delay() == 1
    assert p.next_start_at(exited) == exited + 1


def test_stable_defaults_to_max():
    p = RestartPolicy(1, 60, 100, 300)
    crash(p, 0, ran_s=1)
    crash(p, 10, ran_s=1)
    assert p.delay() == 2
    crash(p, 100, ran_s=60)
    assert p.delay() == 1


def test_crash_loop_after_more_than_n_exits_in_window():
    p = RestartPolicy(1, 1, crash_loop_restarts=3, crash_loop_window_s=100)
    for t in (0, 10, 20):
        crash(p, t)
    assert not p.crash_looping(21)
    crash(p, 30)  # the 4th exit within 100 s
    assert p.crash_looping(31)
    # Once the early exits leave the window it is no longer a loop.
    assert not p.crash_looping(100.6)


def test_slow_crashes_are_not_a_loop():
    p = RestartPolicy(1, 1, crash_loop_restarts=3, crash_loop_window_s=100)
    for t in range(0, 1000, 60):
        crash(p, t)
        assert not p.crash_looping(t + 1), t


def test_reset_forgets_history():
    p = RestartPolicy(1, 60, 2, 100)
    for t in (0, 1, 2):
        crash(p, t)
    assert p.crash_looping(3) and p.delay() == 4
    p.reset()
    assert not p.crash_looping(3)
    assert p.next_start_at(3) == 3


def test_from_config():
    p = RestartPolicy.from_config(ActionsConfig(backoff_initial_s=0.5, backoff_max_s=4, crash_loop_restarts=2, crash_loop_window_s=9))
    assert (p.initial_s, p.max_s, p.crash_loop_restarts, p.crash_loop_window_s, p.stable_s) == (0.5, 4, 2, 9, 4)
