"""One supervisor per supervised unit (a pipeline replica, or the external command).

The incident is a whole host failing at once: eight replicas hung by one driver, a service whose
every incarnation leaves zombies. A daemon that heals one unit at a time, waiting inside its tick
for each to stop, falls behind the fault and stops answering systemd. So each unit gets its own
state machine, as supervisor's `process.py` gives each program one, and its `step()` only
*decides*: it returns actions that signal or spawn and return at once (TERM now, KILL on a later
step once the grace has passed, collect when the processes are gone, start), and a later step
observes what they did. N broken units then heal in parallel, in the time one takes.

    STARTING --ready--> RUNNING --fault--> STOPPING --gone--> BACKOFF --delay over--> STARTING
        |                  |                  |                 (crash loop: CRASH_LOOP)
        +------fault-------+     refuses -> STOPPING --gone--> OUT_OF_SERVICE

Every restart, whatever its reason (dead, hung, stalled, a zombie-keeping parent), is one exit
recorded on the unit's one `RestartPolicy`: one back-off, one crash-loop budget. CRASH_LOOP and
OUT_OF_SERVICE end in a person's hands: `reset()` (SIGHUP, `heygem-ops restart`) clears the budget
and starts the unit again.

Pure: fed an `Observation` and `now`; no clock, no process. Tested with a dummy unit in
milliseconds (tests/test_supervisor.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from watchdog.backoff import RestartPolicy

STARTING, RUNNING, STOPPING, BACKOFF, CRASH_LOOP, OUT_OF_SERVICE = (
    "starting", "running", "stopping", "backoff", "crash_loop", "out_of_service")
STATES = (STARTING, RUNNING, STOPPING, BACKOFF, CRASH_LOOP, OUT_OF_SERVICE)

# Actions, each carried out by the daemon without waiting: signal or spawn, then return.
START, TERM, KILL, COLLECT = "start", "term", "kill", "collect"


@dataclass(frozen=True)
class Observation:
    """What the daemon saw of one unit this tick.

    `gone`: no process of the unit is left (it may be collected). `faults`: the firing alerts
    that call for a restart (worker_dead, worker_hung, stage_stalled, zombies). `refuses`: why the
    unit must not serve at all (its sessions fell back to CPU with fallback = "fail").
    """

    ready: bool = False
    gone: bool = False
    faults: tuple[str, ...] = ()
    refuses: Optional[str] = None


class Action(NamedTuple):
    kind: str  # START | TERM | KILL | COLLECT
    why: str


class Supervisor:
    """The state of one unit and its restart policy."""

    def __init__(self, name: str, policy: RestartPolicy, term_grace_s: float):
        self.name = name
        self.policy = policy
        self.term_grace_s = term_grace_s
        self.state = STARTING
        self.since = 0.0  # when the current state began
        self.why = ""  # why the unit left RUNNING (or is out of service)
        self.start_at = 0.0  # BACKOFF: when to start again
        self.killed = False  # STOPPING: KILL sent
        self._refusing: Optional[str] = None

    def started(self, now: float) -> None:
        """The daemon started the unit outside `step` (at daemon start)."""
        self.policy.record_start(now)
        self._enter(STARTING, now)

    # ---- the one decision ----------------------------------------------------------------------
    def step(self, obs: Observation, now: float) -> list[Action]:
        if self.state in (STARTING, RUNNING):
            if obs.refuses:
                self._refusing = obs.refuses
                return self._stop(now, obs.refuses, count=False)
            if obs.faults:
                return self._stop(now, ", ".join(obs.faults), count=True)
            if self.state == STARTING and obs.ready:
                self._enter(RUNNING, now)
            return []
        if self.state == STOPPING:
            if obs.gone:
                return [Action(COLLECT, self.why), *self._after_stop(now)]
            if not self.killed and now - self.since >= self.term_grace_s:
                self.killed = True
                return [Action(KILL, f"still running {now - self.since:.1f} s after TERM")]
            return []
        if self.state == BACKOFF and now >= self.start_at:
            return self._start(now)
        return []

    def reset(self, now: float) -> list[Action]:
        """An operator's restart: forget the budget; start again at once, or restart a unit that
        runs (its stop is not counted against the new budget)."""
        self.policy.reset()
        self._refusing = None
        if self.state in (CRASH_LOOP, OUT_OF_SERVICE, BACKOFF):
            return self._start(now)
        if self.state in (STARTING, RUNNING):
            return self._stop(now, "operator restart", count=False)
        return []  # STOPPING: it starts once gone, with the fresh budget

    # ---- views -----------------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self.state == RUNNING

    def describe(self, now: float) -> str:
        """One line for /readyz, monitor and the snapshot."""
        if self.state == BACKOFF:
            return f"restarting in {max(0.0, self.start_at - now):.1f} s (back-off; {self.why})"
        if self.state == STOPPING:
            return f"stopping ({self.why})"
        if self.state == CRASH_LOOP:
            return (f"crash loop: {self.policy.crash_loop_restarts}+ restarts within "
                    f"{self.policy.crash_loop_window_s:g} s; restarts stopped (last: {self.why})")
        if self.state == OUT_OF_SERVICE:
            return f"out of service: {self.why}"
        return self.state

    # ---- transitions -----------------------------------------------------------------------------
    def _enter(self, state: str, now: float) -> None:
        self.state, self.since = state, now

    def _stop(self, now: float, why: str, count: bool) -> list[Action]:
        if count:
            self.policy.record_exit(now)
        else:
            self.policy.record_stop()
        self.why = why
        self.killed = False
        self._enter(STOPPING, now)
        return [Action(TERM, why)]

    def _after_stop(self, now: float) -> list[Action]:
        if self._refusing:
            self.why = self._refusing
            self._enter(OUT_OF_SERVICE, now)
            return []
        if self.policy.crash_looping(now):
            self._enter(CRASH_LOOP, now)
            return []
        self.start_at = self.policy.next_start_at(now)
        self._enter(BACKOFF, now)
        return self._start(now) if now >= self.start_at else []

    def _start(self, now: float) -> list[Action]:
        self.policy.record_start(now)
        self._enter(STARTING, now)
        return [Action(START, self.why or "start")]
