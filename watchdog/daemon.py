"""The daemon: one process that is the parent of the service, samples it, decides, heals, reports.

Shaped like gunicorn's arbiter. The main thread owns signals: handlers only record and wake the
loop (the SIGCHLD self-pipe); the loop reaps, handles queued TERM/INT/HUP, and pings the systemd
watchdog while ticks keep completing. The tick runs on apscheduler (one worker thread,
coalesced) as named steps, serialised with reaping and shutdown by one lock so the service's
children are never waited on from two threads:

    sample    GPUs (NVML), the pipeline (replicas, stage board, queues) or the external command,
              zombies in our tree (each parent pinned by pid and create time now), orphans
              re-parented to us, disk, log patterns
    evaluate  pure rules (watchdog.alerts) -> AlertBook -> one event per state change
    heal      one Supervisor per unit (replica or external command) steps on what was seen; its
              actions signal or spawn and return, so N broken units heal in parallel and the
              tick stays short; zombie parents are nudged, and restarted only when it pays
              (watchdog.escalation); orphans get TERM now and KILL on a later tick
    publish   Prometheus metrics, snapshot.json, sd_notify STATUS / READY

Operator controls: SIGHUP re-reads the config and gives every unit a fresh restart budget (a unit
stopped in a crash loop or out of service starts again); `heygem-ops restart` restarts the whole
daemon.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from heygem import logs
from heygem.jobs import JobStore
from watchdog import alerts as rules
from watchdog import escalation, probes
from watchdog.alerts import AlertBook, Condition, for_durations
from watchdog.backoff import RestartPolicy
from watchdog.config import Config, ConfigError, load
from watchdog.metrics import Metrics
from watchdog.reaper import ChildWatch, become_subreaper, reap
from watchdog.sdnotify import Notifier
from watchdog.state import SNAPSHOT_VERSION, StatePaths, write_json, write_pidfile
from watchdog.supervisor import CRASH_LOOP, OUT_OF_SERVICE, RUNNING, STARTING, Supervisor

WAKE_S = 0.25
LOCK_TIMEOUT_S = 0.5
RESTART_FAULTS = ("worker_dead", "worker_hung", "stage_stalled")  # firing alerts that restart their unit
UNHEALTHY = RESTART_FAULTS + ("queue_full",)  # a zombie-keeping parent that is also unhealthy is restarted
STEPS_PER_TICK = 3  # a dead unit: TERM (nothing left), COLLECT + START, within one tick


class Daemon:
    def __init__(self, config: Config, config_path: Optional[Path] = None):
        self.config = config
        self.config_path = config_path
        self.paths = StatePaths(config.state_dir())
        self.log = logs.get("daemon")
        self.lock = threading.Lock()
        self.signals: deque[int] = deque()
        self.children: Optional[ChildWatch] = None
        self.notifier = Notifier.from_env(unset=True)
        self.metrics = Metrics(_version(), config.daemon.mode)
        self.book = AlertBook(for_durations(config.rules), config.rules.repeat_s)
        self.store: Optional[JobStore] = None
        self.lease_store: Optional[JobStore] = None
        self.pipeline = None
        self.external = None
        self.logwatch = None
        self.http = None
        self.nvml = None
        self.scheduler = None
        self.units: list = []  # watchdog.units.ReplicaUnit | ExternalUnit
        self.supervisors: dict[str, Supervisor] = {}
        self.nudged: dict = {}  # zombie parent ProcRef -> when SIGCHLD was sent
        self.terminating: dict = {}  # orphan ProcRef -> when SIGTERM was sent
        self.ticks = 0
        self.last_tick = time.monotonic()
        self.tick_s = 0.0
        self.ready_sent = False
        self.accepting = True
        self.last_sample: dict = {}
        self.published: tuple[str, float] = ("", 0.0)  # the snapshot's material content as last written, and when

    # ---- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        import logging

        # apscheduler logs every run at INFO and every coalesced run skipped at WARNING: both by
        # design here. A wedged tick is caught by healthy().
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        subreaper = become_subreaper()
        self.log.info("daemon_starting", pid=os.getpid(), mode=self.config.daemon.mode, subreaper=subreaper,
                      state_dir=str(self.paths.root), config=str(self.config_path or "built-in defaults"))
        with ChildWatch() as children:
            self.children = children
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._queue_signal)
            try:
                self.start()
            except Exception as err:
                from heygem.providers import ModelError

                self.log.error("daemon_start_failed", error=f"{type(err).__name__}: {err}")
                self.shutdown()
                # An unusable configured model is a configuration error: exit 2, which the unit's
                # RestartPreventExitStatus=2 does not restart in a loop.
                return 2 if isinstance(err, ModelError) else 1
            ping_every = self.notifier.watchdog_interval()
            last_ping = 0.0
            while True:
                children.wait(WAKE_S)
                self.reap_children()
                if self._handle_signals():
                    break
                if ping_every and time.monotonic() - last_ping >= ping_every and self.healthy():
                    self.notifier.watchdog()
                    last_ping = time.monotonic()
            self.shutdown()
        return 0

    def start(self) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        from watchdog.external import MARKER, marker_value
        from watchdog.http import ApiServer, JobFiles

        os.environ[MARKER] = marker_value()  # inherited by every worker: how `clean` finds our orphans
        self.store = JobStore(self.paths.store, max_attempts=self.config.pipeline.max_attempts)
        # The tick's own writes wait briefly: a tick blocked on the store is a tick that cannot see.
        self.lease_store = JobStore(self.paths.store, max_attempts=self.config.pipeline.max_attempts, busy_timeout_s=1.0)
        self._start_gpu_probe()
        self._start_service()
        d = self.config.daemon
        self.http = ApiServer(d.http_host, d.http_port, self.store, self.metrics.render, self.health,
                              self.readiness, lambda: self.accepting, JobFiles.from_config(d, self.paths.root))
        self.http.start()
        write_pidfile(self.paths, self.http.url)
        self.scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1)}, timezone="UTC")
        self.scheduler.add_job(self.tick, "interval", seconds=d.interval_s, id="tick", max_instances=1,
                               coalesce=True, misfire_grace_time=None, next_run_time=_now_dt())
        self.scheduler.start()
        self.log.info("daemon_started", http=self.http.url, interval_s=d.interval_s)

    def _start_gpu_probe(self) -> None:
        from watchdog.gpu import Nvml, NvmlUnavailable

        try:
            self.nvml = Nvml()
        except NvmlUnavailable as err:
            self.nvml = None
            self.log.warning("gpu_probe_unavailable", reason=str(err))

    def _start_service(self) -> None:
        from watchdog.units import ExternalUnit, ReplicaUnit

        if self.config.daemon.mode == "external":
            from watchdog.external import External
            from watchdog.logwatch import LogWatch

            self.external = External(self.config.daemon.command)
            self.external.start()
            self.units = [ExternalUnit(self.external)]
            if self.config.daemon.log_file:
                self.logwatch = LogWatch.of(self.config.daemon)
        else:
            from heygem.pipeline import Pipeline

            self.pipeline = Pipeline(self.config.pipeline, self.store, models_dir=self.paths.models,
                                     output_dir=self.paths.outputs, log_json=True)
            self.pipeline.start()
            if self.pipeline.swept:
                self.log.warning("stale_segments_removed", segments=self.pipeline.swept,
                                 why="left in /dev/shm by a supervisor that died with its resource tracker")
            self.units = [ReplicaUnit(self.pipeline, r.index) for r in self.pipeline.replicas]
        now = time.time()
        a = self.config.actions
        self.supervisors = {}
        for unit in self.units:
            sup = Supervisor(unit.name, RestartPolicy.from_config(a), a.term_grace_s)
            sup.started(now)
            self.supervisors[unit.name] = sup

    def _stop_service(self, grace_s: float) -> list[int]:
        """Blocking: drain and stop the pipeline or the command (shutdown, reload)."""
        requeued = []
        if self.pipeline is not None:
            requeued = self.pipeline.stop(grace_s=grace_s)
            self.pipeline = None
        if self.external is not None:
            self.external.stop(grace_s)
            self.external = None
        self.units, self.supervisors = [], {}
        return requeued

    def shutdown(self) -> None:
        """Stop accepting, drain or requeue within the grace, stop children, leave nothing."""
        self.accepting = False
        self.notifier.stopping()
        grace = self.config.daemon.stop_grace_s
        self.log.info("daemon_stopping", grace_s=grace)
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        got = self.lock.acquire(timeout=max(grace, 1.0))  # let a running tick finish
        try:
            requeued = self._stop_service(grace)
            if self.http is not None:
                self.http.stop(timeout=2.0)
            if self.nvml is not None:
                self.nvml.close()
            from watchdog.procs import terminate

            left = [*self.terminating, *_refs(probes.orphans(os.getpid(), self._tracked()))]
            if left:
                terminate(dict.fromkeys(left), self.config.actions.term_grace_s)
            reap(exclude=self._tracked())
        finally:
            if got:
                self.lock.release()
        self.paths.pidfile.unlink(missing_ok=True)
        self.log.info("daemon_stopped", requeued=requeued)
        self.notifier.close()

    # ---- signals and reaping (main thread) -----------------------------------------------------
    def _queue_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        if self.children is not None:
            self.children.wake()

    def _handle_signals(self) -> bool:
        """Process queued signals; True when the daemon should stop."""
        while self.signals:
            sig = self.signals.popleft()
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.log.info("signal", signal=signal.Signals(sig).name, action="shutdown")
                return True
            if sig == signal.SIGHUP:
                self.reload()
        return False

    def _tracked(self) -> set[int]:
        """Children someone in this process will wait() on: never reap those behind their back."""
        pids = set()
        for unit in self.units:
            pids |= unit.pids()
        tracker = probes.resource_tracker_pid()
        if tracker:
            pids.add(tracker)
        return pids

    def reap_children(self) -> None:
        """Reap every exited child nobody else waits for (re-parented orphans, stray forks)."""
        if not self.lock.acquire(timeout=LOCK_TIMEOUT_S):
            return  # a tick is acting on children; the next wake reaps
        try:
            for exit_ in reap(exclude=self._tracked()):
                self.log.info("reaped", pid=exit_.pid, code=exit_.code, signal=exit_.signal)
        finally:
            self.lock.release()

    def healthy(self) -> bool:
        """The loop and the tick run: a tick finished within three intervals (or 10 s). Healing
        does not make the daemon unhealthy; readiness says whether the service serves."""
        return time.monotonic() - self.last_tick < max(3 * self.config.daemon.interval_s, 10.0) + self.tick_s

    def health(self) -> dict:
        return {"healthy": self.healthy(), "ticks": self.ticks, "last_tick_age_s": round(time.monotonic() - self.last_tick, 3)}

    def readiness(self) -> tuple[bool, dict]:
        """Ready when every unit serves; `why` names each one that does not, and why."""
        now = time.time()
        sups = list(self.supervisors.values())
        why = {s.name: s.describe(now) for s in sups if s.state != RUNNING}
        return bool(sups) and not why, why

    def reload(self) -> None:
        """SIGHUP: re-read the config (a bad one is refused and the old one kept), and give every
        unit a fresh restart budget: one stopped in a crash loop or out of service starts again."""
        try:
            new = load(self.config_path)
        except ConfigError as err:
            self.log.error("config_reload_failed", error=str(err), action="kept the running config")
            return
        if not self.lock.acquire(timeout=10.0):
            self.log.error("config_reload_failed", error="tick did not finish within 10 s", action="kept the running config")
            return
        try:
            old, self.config = self.config, new
            self.book = AlertBook(for_durations(new.rules), new.rules.repeat_s)
            if new.daemon.interval_s != old.daemon.interval_s and self.scheduler is not None:
                self.scheduler.reschedule_job("tick", trigger="interval", seconds=new.daemon.interval_s)
            restart = new.pipeline != old.pipeline or new.daemon.mode != old.daemon.mode or new.daemon.command != old.daemon.command
            if restart:
                self._stop_service(old.daemon.stop_grace_s)
                self.ready_sent = False
                self._start_service()
            else:
                self._reset_budgets(time.time())
            self.log.info("config_reloaded", service_restarted=restart)
        finally:
            self.lock.release()

    def _reset_budgets(self, now: float) -> None:
        a = self.config.actions
        for unit in self.units:
            sup = self.supervisors[unit.name]
            sup.term_grace_s = a.term_grace_s
            if sup.state in (CRASH_LOOP, OUT_OF_SERVICE):
                self._carry_out(unit, sup, sup.reset(now), {}, ())
            else:
                sup.policy.reset()

    # ---- the tick (scheduler thread) ----------------------------------------------------------
    def tick(self) -> None:
        if not self.lock.acquire(timeout=self.config.daemon.interval_s):
            self.log.warning("tick_skipped", reason="previous work still holds the lock")
            return
        began = time.monotonic()
        try:
            now = time.time()
            sample = self.sample(now)
            conditions, skipped = self.evaluate(sample, now)
            events = self.book.update(conditions, now, skipped)
            self.act(sample, events, now)
            self.expire_leases(now)  # last: a writer hung inside a transaction must not stop the rules
            self.publish(sample, now)
        except Exception as err:  # a tick must never kill the scheduler: log and go on
            self.log.exception("tick_failed", error=f"{type(err).__name__}: {err}")
        finally:
            self.tick_s = time.monotonic() - began
            self.metrics.observe_tick(self.tick_s)
            self.ticks += 1
            self.last_tick = time.monotonic()
            self.lock.release()

    def sample(self, now: float) -> dict:
        from watchdog.gpu import to_dict
        from watchdog.procs import by_parent, family, subtree, zombies

        sample: dict = {"time": now}
        if self.nvml is not None:
            try:
                sample["gpus"] = to_dict(self.nvml.sample())["gpus"]
            except Exception as err:
                sample["gpus"], sample["gpu_error"] = None, str(err)
        else:
            sample["gpus"], sample["gpu_error"] = None, "NVML unavailable"
        if self.pipeline is not None:
            for replica, kind, stage, payload in self.pipeline.poll():
                self._pipeline_event(replica, kind, stage, payload, now)
            sample["pipeline"] = self.pipeline.status()
        own = os.getpid()
        tree = family(own)  # one read of our process tree serves zombies, orphans, the command's size
        if self.external is not None:
            code = self.external.exit_code()
            sample["external"] = {"pid": self.external.pid, "exit_code": code,
                                  "processes": len(subtree(self.external.pid, tree)) if code is None else 0}
            if self.logwatch is not None:
                self.logwatch.read(now)
        groups = by_parent(zombies(own, tree))
        sample["zombies"] = [g.as_dict() for g in groups]
        sample["zombie_parents"] = _pinned(g.ppid for g in groups if g.ppid != own)
        sample["orphans"] = probes.orphans(own, self._tracked(), tree)
        sample["tree"] = tree
        sample["disks"] = probes.disk_views([self.paths.root])
        sample["jobs"] = sample["pipeline"]["jobs"] if self.pipeline is not None else self.store.counts()
        self.last_sample = sample
        return sample

    def _pipeline_event(self, replica: int, kind: str, stage: str, payload, now: float) -> None:
        if kind == "fatal":
            self.log.error("stage_fatal", replica=replica, stage=stage, kind=payload.get("kind"), reason=payload.get("reason"))
        elif kind == "job" and payload.get("state") == "failed":
            event = Condition("job_failed", str(payload["job"]), True, "warning",
                              f"job {payload['job']} failed in {stage}: {payload.get('reason')}",
                              {"job": payload["job"], "stage": stage, "reason": payload.get("reason")})
            self._log_alert(rules.AlertEvent(event.alert, event.key, "firing", event.severity, event.summary,
                                             event.evidence, now, now, action="job marked failed; not retried"))

    def expire_leases(self, now: float) -> None:
        import sqlite3

        try:
            expired = self.lease_store.expire_leases(now, self.config.pipeline.max_attempts)
        except sqlite3.OperationalError as err:  # locked by a writer that may be the hung stage
            self.log.warning("job_store_busy", error=str(err), action="lease expiry retried next tick")
            return
        for job in expired:
            self.log.warning("job_lease_expired", job=job.id, state=job.state, attempts=job.attempts, reason=job.reason)

    def _serving(self) -> set[str]:
        """Units whose processes should be running: only their deaths and silences are faults."""
        return {name for name, s in self.supervisors.items() if s.state in (STARTING, RUNNING)}

    def evaluate(self, sample: dict, now: float) -> tuple[list[Condition], list[str]]:
        r = self.config.rules
        conditions: list[Condition] = []
        skipped: list[str] = []
        serving = self._serving()
        status = sample.get("pipeline")
        stages = [s for s in probes.stage_views(status) if s.unit in serving] if status else []
        gpus = probes.gpu_views(sample["gpus"]) if sample["gpus"] is not None else []
        if sample["gpus"] is None and self.nvml is not None:
            skipped.append("gpu_idle_busy_queue")  # a failed read must not resolve the alert
        conditions += rules.gpu_idle_busy_queue(gpus, stages, gpu_idle_util_pct=r.gpu_idle_util_pct,
                                                gpu_busy_mem_mib=r.gpu_busy_mem_mib, jobs_waiting=sample["jobs"]["queued"])
        if status:
            workers = [w for w in probes.worker_views(status, now) if w.unit in serving]
            conditions += rules.cpu_fallback(probes.provider_views(status))
            conditions += rules.worker_dead(workers)
            conditions += rules.worker_hung(workers, heartbeat_timeout_s=r.heartbeat_timeout_s)
            conditions += rules.stage_stalled(stages, stall_after_s=self.config.pipeline.stall_after_s, now=now)
            conditions += rules.queue_full(stages)
        if self.external is not None:
            ext = sample["external"]
            if "external" in serving:
                conditions += rules.worker_dead([rules.WorkerView("external", ext["pid"], ext["exit_code"] is None, 0.0, ext["exit_code"])])
            if self.logwatch is not None:
                conditions += self.logwatch.conditions(now)
        zombie_parents = {g["ppid"]: len(g["zombies"]) for g in sample["zombies"]}
        conditions += rules.zombies(zombie_parents, zombies_max=r.zombies_max)
        conditions.append(Condition("orphans", "", bool(sample["orphans"]), "warning",
                                    f"{len(sample['orphans'])} orphaned processes re-parented to the daemon",
                                    {"pids": sample["orphans"]}))
        conditions += rules.disk_low(sample["disks"], disk_min_free_mib=r.disk_min_free_mib)
        for sup in self.supervisors.values():
            if sup.state == CRASH_LOOP:
                conditions.append(Condition("crash_loop", sup.name, True, "critical", f"{sup.name}: {sup.describe(now)}",
                                            {"restarts": sup.policy.restarts, "last_reason": sup.why}))
        return conditions, skipped

    # ---- heal ---------------------------------------------------------------------------------
    def act(self, sample: dict, events: list, now: float) -> None:
        """Heal what the rules found, then log every alert event with what was done."""
        actions: dict[tuple[str, str], str] = {}
        firing = self.book.firing()
        faults = self._faults(firing)
        self._handle_zombies(sample, firing, faults, actions, now)
        if self.config.actions.restart_workers:
            for unit in self.units:
                self._heal(unit, faults.get(unit.name, {}), actions, now)
        self._handle_orphans(sample["orphans"], actions, now)
        for event in events:
            action = actions.get((event.alert, event.key), "")
            self._log_alert(event.with_action(action) if action else event)

    def _faults(self, firing) -> dict[str, dict[tuple[str, str], None]]:
        """Per unit, the firing alerts that call for its restart (ordered, as alert keys)."""
        out: dict[str, dict] = {}
        for e in firing:
            if e.alert in RESTART_FAULTS:
                out.setdefault(e.key.split("/")[0], {})[(e.alert, e.key)] = None
        return out

    def _heal(self, unit, faults: dict, actions: dict, now: float) -> None:
        """Step the unit's supervisor until it has nothing more to do this tick (a dead unit is
        TERMed, collected and started in one tick); faults count only at the first step."""
        sup = self.supervisors[unit.name]
        reasons = tuple(dict.fromkeys(alert for alert, _ in faults))
        for i in range(STEPS_PER_TICK):
            steps = sup.step(unit.observe(reasons if i == 0 else ()), now)
            if not steps:
                break
            self._carry_out(unit, sup, steps, actions, faults)

    def _carry_out(self, unit, sup: Supervisor, steps, actions: dict, faults) -> None:
        from watchdog.units import EVENTS

        for step in steps:
            done, fields = unit.carry_out(step.kind)
            self.log.warning(f"{unit.kind}_{EVENTS[step.kind]}", **unit.fields, **fields, why=step.why, state=sup.state,
                             restarts=sup.policy.restarts)
            for alert in faults:
                actions[alert] = done if alert not in actions else f"{actions[alert]}; {done}"
        if sup.state == CRASH_LOOP:
            self.log.error("crash_loop", unit=unit.name, restarts=sup.policy.restarts, action="restarts stopped",
                           last_reason=sup.why)
        elif sup.state == OUT_OF_SERVICE:
            self.log.error("replica_out_of_service", unit=unit.name, reason=sup.why)

    def _handle_zombies(self, sample: dict, firing, faults: dict, actions: dict, now: float) -> None:
        """Zombies under a live parent in our tree: SIGCHLD once, alert; restart the parent only
        when its zombies threaten the pid space or its unit is unhealthy anyway (escalation)."""
        from watchdog.procs import send, subtree

        a = self.config.actions
        if not a.reap:
            return
        counts = {g["ppid"]: len(g["zombies"]) for g in sample["zombies"]}
        parents = sample["zombie_parents"]
        for ref in [r for r in self.nudged if r not in parents.values()]:
            del self.nudged[ref]
        unhealthy = {e.key.split("/")[0] for e in firing if e.alert in UNHEALTHY} | set(faults)
        if self.external is not None and any(e.alert in UNHEALTHY and e.key == "log" for e in firing):
            unhealthy.add("external")
        room = escalation.pid_room() if parents else None
        for pid, ref in parents.items():
            unit = self._unit_of(pid)
            threat = escalation.threatens_pids(counts.get(pid, 0), room, a.zombie_restart_at)
            restart_ok = a.restart_parent and (threat or (unit is not None and unit.name in unhealthy))
            step = escalation.escalate(self.nudged.get(ref), now, a.zombie_parent_grace_s, restart_ok)
            if step == escalation.NUDGE:
                send(ref, signal.SIGCHLD)
                self.nudged[ref] = now
                actions[("zombies", "")] = f"sent SIGCHLD to parent {pid}"
                self.log.info("zombie_parent_nudged", parent=pid, zombies=counts.get(pid, 0))
            elif step == escalation.ALERT:
                actions[("zombies", "")] = (f"parent {pid} keeps {counts.get(pid, 0)} zombies after SIGCHLD; not restarted "
                                            "(its service is healthy and the pid space is not at risk)")
            elif step == escalation.RESTART:
                why = "zombies threaten the pid space" if threat else "zombies, and its service is unhealthy"
                self.log.warning("zombie_parent_restart", parent=pid, zombies=counts.get(pid, 0), why=why)
                del self.nudged[ref]
                if unit is not None:
                    faults.setdefault(unit.name, {})[("zombies", "")] = None
                else:  # as `clean` does: the parent with its live descendants, which would be orphans
                    tree = sample["tree"]
                    family = [p for p in subtree(pid, tree) if p != pid and tree[p].state != "Z"]
                    for each in [ref, *_refs(family)]:
                        self._terminate(each, now)
                    actions[("zombies", "")] = (f"terminated parent {pid} with {len(family)} descendant(s) ({why}); "
                                                "its zombies pass to the reaper")

    def _unit_of(self, pid: int):
        """The unit whose processes include `pid` (for the external command: its whole tree)."""
        for unit in self.units:
            if pid in unit.pids():
                return unit
        if self.external is not None and any(ref.pid == pid for ref in self.external.refs()):
            return self.units[0]
        return None

    def _handle_orphans(self, orphans: list[int], actions: dict, now: float) -> None:
        """TERM new orphans now; KILL, on a later tick, those that outlive the grace."""
        from watchdog.procs import send

        for ref, at in list(self.terminating.items()):
            if not ref.matches():
                del self.terminating[ref]
            elif now - at >= self.config.actions.term_grace_s and send(ref, signal.SIGKILL):
                self.log.warning("orphan_killed", pid=ref.pid)
                del self.terminating[ref]
        fresh = [ref for ref in _refs(orphans) if ref not in self.terminating]
        for ref in fresh:
            self._terminate(ref, now)
        if fresh:
            actions[("orphans", "")] = "sent SIGTERM to " + ", ".join(str(ref.pid) for ref in fresh)

    def _terminate(self, ref, now: float) -> None:
        from watchdog.procs import send

        if send(ref, signal.SIGTERM):
            self.terminating[ref] = now
            self.log.warning("orphan_terminated", pid=ref.pid)

    def _log_alert(self, event) -> None:
        getattr(self.log, event.level)(**event.fields())

    # ---- publish -----------------------------------------------------------------------------
    def publish(self, sample: dict, now: float) -> None:
        firing = self.book.firing()
        status = sample.get("pipeline")
        restarts = {name: s.policy.restarts for name, s in self.supervisors.items()}
        self.metrics.update_from(
            gpus=probes.gpu_views(sample["gpus"] or []),
            stages=probes.stage_views(status) if status else [],
            jobs=sample["jobs"],
            zombies=sum(len(g["zombies"]) for g in sample["zombies"]),
            restarts=restarts,
            units={name: s.state for name, s in self.supervisors.items()},
            firing=firing,
        )
        ready, why = self.readiness()
        if ready and not self.ready_sent:
            self.notifier.ready()
            self.ready_sent = True
            self.log.info("daemon_ready", replicas=len(status["replicas"]) if status else None)
        jobs = sample["jobs"]
        self.notifier.status(f"{'ready' if ready else 'not ready'}; jobs queued {jobs['queued']} running {jobs['running']}; "
                             f"alerts firing {len(firing)}")
        snapshot = {
            "version": SNAPSHOT_VERSION, "pid": os.getpid(), "mode": self.config.daemon.mode,
            "ready": ready, "not_ready": why,
            "http": self.http.url if self.http else None, "config": str(self.config_path) if self.config_path else None,
            "gpus": sample["gpus"], "gpu_error": sample.get("gpu_error"),
            "replicas": status["replicas"] if status else [], "stages": status["stages"] if status else [],
            "external": sample.get("external"), "jobs": jobs, "zombies": sample["zombies"],
            "orphans": sample["orphans"], "alerts": [e.fields() for e in firing],
            "units": {name: {"state": s.state, "detail": s.describe(now), "restarts": s.policy.restarts}
                      for name, s in self.supervisors.items()},
            "restarts": restarts,
        }
        # Written at once when something an operator acts on changed, else every other tick:
        # readers judge staleness by `time` (monitor: 3 intervals), and heartbeats alone should
        # not cost an idle tick a file replace.
        material = repr((ready, why, jobs, [(e.alert, e.key) for e in firing], snapshot["units"], snapshot["zombies"],
                         snapshot["orphans"]))
        if material != self.published[0] or now - self.published[1] >= 2 * self.config.daemon.interval_s:
            write_json(self.paths.snapshot, {**snapshot, "time": now, "tick": self.ticks, "tick_s": round(self.tick_s, 4)})
            self.published = (material, now)


def _pinned(pids) -> dict:
    """pid -> ProcRef, captured now (at sample time): a later action reaches this very process."""
    return {ref.pid: ref for ref in _refs(pids)}


def _refs(pids) -> list:
    from watchdog.procs import ProcRef

    out = []
    for pid in pids:
        try:
            out.append(ProcRef.of(pid))
        except Exception:  # gone since the scan
            continue
    return out


def _now_dt():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def _version() -> str:
    from heygem import __version__

    return __version__
