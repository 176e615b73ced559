"""The per-unit supervisor, driven through a dummy unit in milliseconds (no process, no clock).

`Dummy` plays a unit that obeys the actions the way a real one does, a tick later: TERM makes a
healthy unit exit by the next step; a hung one ignores TERM and only KILL ends it.
"""

from __future__ import annotations

import pytest

from watchdog.backoff import RestartPolicy
from watchdog.supervisor import (BACKOFF, COLLECT, CRASH_LOOP, KILL, OUT_OF_SERVICE, RUNNING, START, STARTING,
                                 STOPPING, TERM, Observation, Supervisor)


class Dummy:
    """A unit: `hung` ignores TERM; `refuses` gives a reason not to serve; starts are counted."""

    def __init__(self, hung: bool = False):
        self.running, self.hung, self.ready, self.starts = True, hung, False, 0
        self.log: list[str] = []

    def observe(self, faults=(), refuses=None) -> Observation:
        return Observation(ready=self.running and self.ready, gone=not self.running, faults=tuple(faults), refuses=refuses)

    def apply(self, actions) -> None:
        for a in actions:
            self.log.append(a.kind)
            if a.kind == TERM and not self.hung:
                self.running = False
            elif a.kind == KILL:
                self.running = False
            elif a.kind == START:
                self.running, self.hung, self.ready = True, False, False
                self.starts += 1


def supervisor(restarts: int = 3, window: float = 100.0, grace: float = 5.0, backoff: float = 1.0) -> Supervisor:
    sup = Supervisor("replica-0", RestartPolicy(backoff, backoff * 8, restarts, window), term_grace_s=grace)
    sup.started(0.0)
    return sup


def run(sup: Supervisor, unit: Dummy, now: float, faults=(), refuses=None) -> list[str]:
    actions = sup.step(unit.observe(faults, refuses), now)
    unit.apply(actions)
    return [a.kind for a in actions]


def test_starting_becomes_running_when_ready():
    sup, unit = supervisor(), Dummy()
    assert run(sup, unit, 1.0) == [] and sup.state == STARTING
    unit.ready = True
    assert run(sup, unit, 2.0) == [] and sup.state == RUNNING and sup.serving


def test_fault_terms_then_collects_then_starts_after_backoff():
    sup, unit = supervisor(backoff=1.0), Dummy()
    unit.ready = True
    run(sup, unit, 1.0)
    assert run(sup, unit, 10.0, faults=["worker_dead"]) == [TERM] and sup.state == STOPPING
    # gone on the next step: collected; the first quick exit waits backoff_initial_s
    assert run(sup, unit, 10.5) == [COLLECT] and sup.state == BACKOFF
    assert "restarting in 0.5 s" in sup.describe(10.5)
    assert run(sup, unit, 10.9) == []
    assert run(sup, unit, 11.0) == [START] and sup.state == STARTING and unit.starts == 1
    assert sup.policy.restarts == 1


def test_hung_unit_gets_kill_only_after_the_grace_and_never_blocks():
    sup, unit = supervisor(grace=5.0), Dummy(hung=True)
    unit.ready = True
    run(sup, unit, 1.0)
    assert run(sup, unit, 10.0, faults=["worker_hung"]) == [TERM]
    assert run(sup, unit, 12.0) == [] and sup.state == STOPPING  # TERM ignored, grace not over
    assert run(sup, unit, 15.0) == [KILL]
    # the back-off (1 s) counts from the exit at 10 s: over by now, so it starts at once
    assert run(sup, unit, 15.5) == [COLLECT, START]
    assert sup.state == STARTING


def test_faults_while_stopping_or_in_backoff_are_not_counted_twice():
    sup, unit = supervisor(backoff=10.0), Dummy(hung=True)
    unit.ready = True
    run(sup, unit, 1.0)
    run(sup, unit, 100.0, faults=["worker_hung"])
    assert run(sup, unit, 101.0, faults=["worker_hung", "stage_stalled"]) == []
    assert len(sup.policy._exits) == 1


@pytest.mark.parametrize("reason", ["worker_dead", "worker_hung", "stage_stalled", "zombies"])
def test_every_reason_spends_the_one_budget(reason):
    """Restarts of any reason count toward one crash loop (the external service restarted 13
    times in 70 s for its zombies with crash_loop_restarts = 3 never reached it)."""
    sup, unit = supervisor(restarts=3, window=100.0, backoff=0.1), Dummy()
    now = 0.0
    for _ in range(4):
        now += 1.0
        unit.ready = True
        run(sup, unit, now)
        assert run(sup, unit, now + 0.1, faults=[reason]) == [TERM]
        run(sup, unit, now + 0.2)
        now += 1.0
        run(sup, unit, now)  # backoff over: started again (or crash loop)
    assert sup.state == CRASH_LOOP
    assert unit.starts == 3
    assert "crash loop" in sup.describe(now)
    assert run(sup, unit, now + 1000.0, faults=[reason]) == []  # stays stopped until a person acts


def test_reset_restarts_a_crash_looped_unit_with_a_fresh_budget():
    sup, unit = supervisor(restarts=1, backoff=0.1), Dummy()
    for t in (1.0, 3.0):
        unit.ready = True
        run(sup, unit, t)
        run(sup, unit, t + 0.1, faults=["worker_dead"])
        run(sup, unit, t + 0.2)
        run(sup, unit, t + 1.0)
    assert sup.state == CRASH_LOOP
    actions = sup.reset(10.0)
    unit.apply(actions)
    assert [a.kind for a in actions] == [START] and sup.state == STARTING
    assert not sup.policy.crash_looping(10.0)


def test_reset_of_a_running_unit_restarts_it_without_spending_budget():
    sup, unit = supervisor(restarts=1), Dummy()
    unit.ready = True
    run(sup, unit, 1.0)
    actions = sup.reset(2.0)
    unit.apply(actions)
    assert [a.kind for a in actions] == [TERM]
    assert run(sup, unit, 2.5) == [COLLECT, START]  # not a crash: no back-off
    assert sup.policy._exits == type(sup.policy._exits)()


def test_a_unit_that_refuses_goes_out_of_service_and_stays():
    sup, unit = supervisor(), Dummy()
    why = 'sessions not on the requested provider and fallback = "fail"'
    assert run(sup, unit, 1.0, refuses=why) == [TERM]
    assert run(sup, unit, 1.5) == [COLLECT] and sup.state == OUT_OF_SERVICE
    assert run(sup, unit, 100.0, faults=["worker_dead"]) == []
    assert sup.describe(100.0) == f"out of service: {why}"


def test_many_units_heal_in_parallel_in_the_time_of_one():
    """Eight units hung at once: each gets TERM in the same step, KILL once the grace is over,
    and all are started again by the same step: no unit waits for another."""
    sups = [supervisor(grace=5.0, backoff=1.0) for _ in range(8)]
    units = [Dummy(hung=True) for _ in range(8)]
    for sup, unit in zip(sups, units):
        unit.ready = True
        run(sup, unit, 1.0)
    timeline = {}
    for now in (10.0, 12.0, 15.0, 16.0, 17.0):
        timeline[now] = {tuple(run(sup, unit, now, faults=["worker_hung"] if now == 10.0 else ()))
                         for sup, unit in zip(sups, units)}
    assert timeline == {10.0: {(TERM,)}, 12.0: {()}, 15.0: {(KILL,)}, 16.0: {(COLLECT, START)}, 17.0: {()}}
    assert all(sup.state == STARTING for sup in sups)
