"""Alerts: pure rules over plain samples, and a book that turns their verdicts into events.

Each tick the daemon probes the system into small views (`GpuView`, `StageView`, `WorkerView`,
...), calls the rule functions below with those views, the thresholds of `[rules]` and `now`, and
feeds every returned `Condition` to one `AlertBook`. The book keeps Prometheus-style state per
alert instance -- pending while the condition has held for less than its `for` duration, then
firing, then resolved -- and emits one `AlertEvent` per state change, never one per tick, plus a
reminder every `repeat_s` while an alert keeps firing.

Nothing here reads a clock, a file or a process: rules and book are fed samples and `now`, so
every threshold and every transition is testable in microseconds. `now` and all timestamps in the
views must come from the same clock (the pipeline's board uses epoch seconds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

if TYPE_CHECKING:
    from watchdog.config import RulesConfig

ALERTS = (
    "cpu_fallback",
    "gpu_idle_busy_queue",
    "zombies",
    "orphans",
    "worker_dead",
    "worker_hung",
    "stage_stalled",
    "queue_full",
    "crash_loop",
    "job_failed",
    "disk_low",
    "store_unavailable",
    # from upstream's log (watchdog.upstream_log)
    "queue_empty",
    "gpu_oom",
    "warmup_slow",
    # the daemon in front of upstream's API (watchdog.front)
    "task_stalled",
)
SEVERITIES = ("info", "warning", "critical")

# What an operator should do, per alert: an event is only useful if it says where to look.
FIXES = {
    "cpu_fallback": "run `heygem-ops doctor`: the CUDA provider failed to load (missing CUDA/cuDNN "
    "libraries or a mixed onnxruntime install); the replica runs on CPU at a fraction of the speed",
    "gpu_idle_busy_queue": "models are loaded and work is waiting but the GPU computes nothing: look "
    "for a stalled stage, a hung worker or a CPU fallback on this GPU",
    "zombies": "only the parent can reap its zombies: fix or restart that parent (`heygem-ops zombies`); "
    "the watchdog restarts it when actions.restart_parent is on",
    "orphans": "orphaned workers hold GPU memory; stop the service's process tree (`heygem-ops clean`)",
    "worker_dead": "the watchdog restarts the worker with back-off and requeues its job; check its "
    "exit code and log",
    "worker_hung": "the worker is alive but silent: the watchdog restarts it (TERM, then KILL)",
    "stage_stalled": "the stage has input but makes no progress: check its worker's log; the "
    "watchdog restarts the worker and requeues the job",
    "queue_full": "a full queue is backpressure, not an error, but continuously full means the "
    "stage downstream is too slow or stalled: look at it rather than raising queue sizes",
    "crash_loop": "restarts stopped: the worker keeps dying right after start; fix the cause shown "
    "in its log, then `heygem-ops restart`",
    "job_failed": "see the job's reason (`heygem-ops jobs`); the job was not retried further",
    "disk_low": "free space on the volume: results and temporary frames need room",
    "store_unavailable": "the job store does not answer (PostgreSQL down or out of reach: `pg_isready`, the server's "
    "log, the network; [store] url): replicas finish the jobs they hold and claim no new ones, and everything "
    "resumes when it answers; no job is lost",
    "queue_empty": "a stage waited past its timeout for input that never came: the stage before it is slow "
    "(a warm-up on CPU, a busy GPU) or died; find it in the same log (`heygem-ops doctor --log`). "
    "Lengthening the sleep or the timeout hides it",
    "gpu_oom": "the GPU ran out of memory: upstream puts every session on GPU 0, so concurrent tasks and "
    "orphaned workers share it; free what stale processes hold (`heygem-ops gpu`, `heygem-ops clean`) and "
    "run one task per GPU at a time",
    "task_stalled": "a task at upstream made no progress for longer than this host needs for it (the learned "
    "deadline: `heygem-ops monitor`, heygem_upstream_stall_deadline_seconds): the watchdog restarts upstream and "
    "sends its tasks again, in order; look in upstream's log for why it stopped (`heygem-ops logs --task CODE`)",
    "warmup_slow": "upstream's warm-up (init_wh: face detection on the first 100 frames) outlasted its 60 s "
    "queue timeout, so the driving queue fills before frames are generated: usually a CPU fallback "
    "(`heygem-ops doctor`) or a GPU shared with other tasks",
}


@dataclass(frozen=True)
class Condition:
    """One rule's verdict on one instance at one tick.

    Keys name what the alert is about, in one format everywhere: a unit (`replica-0`,
    `external`), one of its processes (`replica-0/generate`), a GPU (`gpu-0`), a path, a job id;
    "" for host-wide alerts, "log" for log-derived ones."""

    alert: str
    key: str
    active: bool
    severity: str
    summary: str
    evidence: dict = field(default_factory=dict)
    for_s: Optional[float] = None  # overrides the book's `for` duration of this alert (e.g. a log
    # line that upstream writes only after its own wait fires at once)


@dataclass(frozen=True)
class AlertEvent:
    """A state change of one alert instance, ready to be logged and acted upon.

    `since` is when the condition started holding, `at` when this event happened. Whoever acts
    on a firing alert records what it did with `with_action`.
    """

    alert: str
    key: str
    state: str  # "firing" | "resolved"
    severity: str
    summary: str
    evidence: dict
    since: float
    at: float
    repeat: bool = False
    action: str = ""

    def with_action(self, action: str) -> "AlertEvent":
        return dataclasses.replace(self, action=action)

    @property
    def level(self) -> str:
        """The log level: resolutions are news, not problems; critical alerts are errors."""
        if self.state == "resolved":
            return "info"
        return {"critical": "error", "warning": "warning"}.get(self.severity, "info")

    def fields(self) -> dict:
        """The structured log record (DESIGN.md): `log.warning(**event.fields())`."""
        return {
            "event": "alert",
            "alert": self.alert,
            "key": self.key,
            "state": self.state,
            "severity": self.severity,
            "summary": self.summary,
            "evidence": self.evidence,
            "action": self.action,
            "fix": FIXES.get(self.alert, ""),
            "held_s": round(self.at - self.since, 3),
            "repeat": self.repeat,
        }


@dataclass
class _Instance:
    condition: Condition
    since: float
    announced_at: Optional[float] = None  # None while pending

    def event(self, state: str, now: float, repeat: bool = False) -> AlertEvent:
        c = self.condition
        return AlertEvent(c.alert, c.key, state, c.severity, c.summary, c.evidence, self.since, now, repeat)


class AlertBook:
    """Alert state across ticks: pending -> firing (after `for_s[alert]`) -> resolved.

    `update` must be given every condition evaluated this tick. An instance that is not reported
    active -- reported inactive, or absent because the thing it was about is gone -- resolves
    (a pending one is dropped silently). Alerts named in `skipped` keep their state untouched: use
    it when a probe failed this tick, so that a transient NVML error does not resolve and re-fire
    every GPU alert.
    """

    def __init__(self, for_s: Mapping[str, float], repeat_s: float):
        self.for_s = dict(for_s)
        self.repeat_s = repeat_s
        self._instances: dict[tuple[str, str], _Instance] = {}

    def update(self, conditions: Iterable[Condition], now: float, skipped: Iterable[str] = ()) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        held: set[tuple[str, str]] = set()
        last: dict[tuple[str, str], Condition] = {}
        for c in conditions:
            ident = (c.alert, c.key)
            last[ident] = c
            if not c.active:
                continue
            held.add(ident)
            inst = self._instances.get(ident)
            if inst is None:
                inst = self._instances[ident] = _Instance(c, since=now)
            inst.condition = c
            if inst.announced_at is None:
                wait = c.for_s if c.for_s is not None else self.for_s.get(c.alert, 0.0)
                if now - inst.since >= wait:
                    inst.announced_at = now
                    events.append(inst.event("firing", now))
            elif now - inst.announced_at >= self.repeat_s:
                inst.announced_at = now
                events.append(inst.event("firing", now, repeat=True))
        skip = set(skipped)
        for ident, inst in list(self._instances.items()):
            if ident in held or ident[0] in skip:
                continue
            del self._instances[ident]
            if inst.announced_at is not None:
                # Report the values that show it is over, when the rule gave them.
                if ident in last:
                    inst.condition = last[ident]
                events.append(inst.event("resolved", now))
        return events

    def firing(self) -> list[AlertEvent]:
        """The alerts firing now, as their latest firing event (sorted by alert, key)."""
        return [
            inst.event("firing", inst.announced_at)
            for _, inst in sorted(self._instances.items())
            if inst.announced_at is not None
        ]


def for_durations(rules: "RulesConfig") -> dict[str, float]:
    """How long each alert must hold before it fires; alerts not named fire at once.

    queue_full in particular needs the duration: a queue that is full for a moment is ordinary
    backpressure, only one full for `queue_full_for_s` is a problem.
    """
    return {
        "gpu_idle_busy_queue": rules.gpu_idle_for_s,
        "zombies": rules.zombies_for_s,
        "queue_full": rules.queue_full_for_s,
    }


# ---- views: what the probes hand to the rules ---------------------------------------------


@dataclass(frozen=True)
class GpuView:
    index: int
    util_pct: float
    mem_used_mib: float


@dataclass(frozen=True)
class StageView:
    """One pipeline stage of one replica, as read from the stage board.

    `queue_depth`/`queue_capacity` describe the stage's *input* queue; `items_out` counts items
    that left the stage, `dropped` the part of them let go because their job failed (so
    `items_in - items_out` is what it holds); `last_progress` is when it last handed an item on
    and `heartbeat` its last sign of life; `gpu` is the replica's device
    (None on CPU). A stage in state "backpressure" waits on a full downstream queue: not a stall.
    """

    replica: int | str
    stage: str
    items_in: int
    items_out: int
    last_progress: float
    heartbeat: float
    queue_depth: int
    queue_capacity: int
    gpu: Optional[int] = None
    state: str = ""
    dropped: int = 0
    times: tuple = ()  # ((kind, seconds), ...): where the stage's wall time went (heygem.board.TIMES)

    @property
    def unit(self) -> str:
        return f"replica-{self.replica}"

    @property
    def key(self) -> str:
        return f"{self.unit}/{self.stage}"

    @property
    def has_input(self) -> bool:
        return self.queue_depth > 0 or self.items_in > self.items_out


@dataclass(frozen=True)
class WorkerView:
    """A worker process the daemon supervises.

    `heartbeat_age_s` is the age of its last heartbeat, or of its start while it has not beaten
    yet (so a worker stuck loading models is not exempt).
    """

    name: str  # "<unit>/<stage>", or the unit's name where it is one process ("external")
    pid: Optional[int]
    alive: bool
    heartbeat_age_s: float
    exit_code: Optional[int] = None

    @property
    def unit(self) -> str:
        return self.name.split("/")[0]


@dataclass(frozen=True)
class ProviderView:
    """A replica's sessions: the execution providers asked for and those really active."""

    replica: int | str
    requested: tuple[str, ...]
    active: tuple[str, ...]
    reason: Optional[str] = None


@dataclass(frozen=True)
class DiskView:
    path: str
    free_mib: float


# ---- rules: views + thresholds + now -> conditions -----------------------------------------


def idle_but_busy(util_pct: Optional[float], mem_used_mib: float, *, util_max_pct: float, mem_min_mib: float) -> bool:
    """A GPU holding models (memory at or above `mem_min_mib`) and computing nothing (utilisation
    at or below `util_max_pct`). The one definition the daemon's alert, `doctor` and `gpu` share.
    An unknown utilisation is no evidence: False."""
    return util_pct is not None and util_pct <= util_max_pct and mem_used_mib >= mem_min_mib


def gpu_idle_busy_queue(
    gpus: Sequence[GpuView],
    stages: Sequence[StageView],
    *,
    gpu_idle_util_pct: float,
    gpu_busy_mem_mib: float,
    jobs_waiting: int = 0,
) -> list[Condition]:
    """The incident's signature: models resident on a GPU, work waiting, utilisation ~0.

    Work waiting for a GPU is the queued items of the stages of its replicas, plus jobs still in
    the store (any idle replica should be claiming those).
    """
    queued: dict[int, int] = {}
    for s in stages:
        if s.gpu is not None:
            queued[s.gpu] = queued.get(s.gpu, 0) + max(s.queue_depth, 0)
    out = []
    for g in gpus:
        waiting = queued.get(g.index, 0) + jobs_waiting
        active = waiting > 0 and idle_but_busy(g.util_pct, g.mem_used_mib, util_max_pct=gpu_idle_util_pct,
                                               mem_min_mib=gpu_busy_mem_mib)
        out.append(Condition(
            "gpu_idle_busy_queue", f"gpu-{g.index}", active, "critical",
            f"GPU {g.index}: {g.util_pct:g} % busy, {g.mem_used_mib:.0f} MiB used, {waiting} items/jobs waiting",
            {"gpu": g.index, "util_pct": g.util_pct, "mem_used_mib": g.mem_used_mib, "queued_items": queued.get(g.index, 0), "jobs_waiting": jobs_waiting},
        ))
    return out


def stage_stalled(stages: Sequence[StageView], *, stall_after_s: float, now: float) -> list[Condition]:
    """A stage with input that has not handed anything on for `stall_after_s` (pipeline config).

    The stall is immediate once the time has passed (no `for` duration): `stall_after_s` already
    is the patience.
    """
    out = []
    for s in stages:
        idle_s = now - s.last_progress
        active = s.has_input and s.state != "backpressure" and idle_s >= stall_after_s
        out.append(Condition(
            "stage_stalled", s.key, active, "critical",
            f"stage {s.stage} of replica {s.replica}: no progress for {idle_s:.0f} s with "
            f"{s.items_in - s.items_out} items in hand and {s.queue_depth} queued",
            {"since_progress_s": round(idle_s, 3), "heartbeat_age_s": round(now - s.heartbeat, 3),
             "items_in": s.items_in, "items_out": s.items_out, "queue_depth": s.queue_depth},
        ))
    return out


def queue_full(stages: Sequence[StageView]) -> list[Condition]:
    """A stage's input queue at capacity now; the book's `queue_full_for_s` makes it "continuously"."""
    return [
        Condition(
            "queue_full", s.key, s.queue_capacity > 0 and s.queue_depth >= s.queue_capacity, "warning",
            f"input queue of stage {s.stage}, replica {s.replica}: {s.queue_depth}/{s.queue_capacity}",
            {"queue_depth": s.queue_depth, "queue_capacity": s.queue_capacity},
        )
        for s in stages
    ]


def worker_dead(workers: Sequence[WorkerView]) -> list[Condition]:
    return [
        Condition(
            "worker_dead", w.name, not w.alive, "critical",
            f"worker {w.name} (pid {w.pid}) " + ("is running" if w.alive else f"exited with code {w.exit_code}"),
            {"pid": w.pid, "exit_code": w.exit_code},
        )
        for w in workers
    ]


def worker_hung(workers: Sequence[WorkerView], *, heartbeat_timeout_s: float, starting: Iterable[str] = (),
                start_timeout_s: Optional[float] = None) -> list[Condition]:
    """Alive but silent for longer than `heartbeat_timeout_s` (a dead worker is worker_dead's).

    A worker of a unit in `starting` loads models and opens sessions without beating: it gets
    `start_timeout_s` instead, or many replicas restarted together on a busy host, each taking
    longer than one heartbeat to start, would be found hung and restarted again and again."""
    starting = set(starting)
    out = []
    for w in workers:
        limit = start_timeout_s if w.unit in starting and start_timeout_s is not None else heartbeat_timeout_s
        out.append(Condition(
            "worker_hung", w.name, w.alive and w.heartbeat_age_s > limit, "critical",
            f"worker {w.name} (pid {w.pid}): " + (f"still starting after {w.heartbeat_age_s:.0f} s" if limit != heartbeat_timeout_s
                                                  else f"last heartbeat {w.heartbeat_age_s:.0f} s ago"),
            {"pid": w.pid, "heartbeat_age_s": round(w.heartbeat_age_s, 3), "timeout_s": limit},
        ))
    return out


def zombies(by_parent: Mapping[int, int], *, zombies_max: int) -> list[Condition]:
    """More zombies than `zombies_max`; evidence names the parents, the only ones who can reap."""
    count = sum(by_parent.values())
    return [Condition(
        "zombies", "", count > zombies_max, "warning",
        f"{count} zombie processes (max {zombies_max}) under {len(by_parent)} parents",
        {"count": count, "max": zombies_max, "parents": {str(p): n for p, n in sorted(by_parent.items())}},
    )]


def disk_low(disks: Sequence[DiskView], *, disk_min_free_mib: float) -> list[Condition]:
    return [
        Condition(
            "disk_low", d.path, d.free_mib < disk_min_free_mib, "warning",
            f"{d.path}: {d.free_mib:.0f} MiB free (min {disk_min_free_mib:.0f})",
            {"free_mib": round(d.free_mib, 1), "min_free_mib": disk_min_free_mib},
        )
        for d in disks
    ]


def cpu_fallback(replicas: Sequence[ProviderView]) -> list[Condition]:
    """A replica whose sessions lack a provider they asked for (CUDA fell back to CPU)."""
    out = []
    for r in replicas:
        missing = [p for p in r.requested if p not in r.active]
        summary = f"replica {r.replica}: asked for {', '.join(r.requested)}, runs on {', '.join(r.active) or 'nothing'}"
        if r.reason:
            summary += f" ({r.reason})"
        out.append(Condition(
            "cpu_fallback", f"replica-{r.replica}", bool(missing), "critical", summary,
            {"requested": list(r.requested), "active": list(r.active), "missing": missing},
        ))
    return out
