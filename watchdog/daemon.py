"""The daemon: one process that is the parent of the service, samples it, decides, heals, reports.

Shaped like gunicorn's arbiter. The main thread owns signals: handlers only record; the loop
wakes on SIGCHLD (self-pipe) or every `WAKE_S`, reaps, handles queued TERM/INT/HUP, and pings the
systemd watchdog only while ticks keep completing. The tick runs on apscheduler (one worker
thread, coalesced): sample -> expire leases -> evaluate rules -> act -> publish. A lock
serialises the tick with reaping and shutdown, so the service's children are never waited on
from two threads.

    sample    GPUs (NVML), the pipeline (replicas, stage board, queues) or the external command,
              zombies in our tree, orphans re-parented to us, disk, log patterns
    evaluate  pure rules (watchdog.alerts) -> AlertBook -> one event per state change
    act       restart dead / hung / stalled replicas with back-off (their jobs are requeued),
              stop at a crash loop, terminate orphans, nudge then restart a zombie-keeping parent
    publish   Prometheus metrics, snapshot.json, sd_notify STATUS / READY
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
from watchdog import probes
from watchdog.alerts import AlertBook, Condition, for_durations
from watchdog.backoff import RestartPolicy
from watchdog.config import Config, ConfigError, load
from watchdog.metrics import Metrics
from watchdog.reaper import ChildWatch, become_subreaper, reap
from watchdog.sdnotify import Notifier
from watchdog.state import SNAPSHOT_VERSION, StatePaths, write_json, write_pidfile

WAKE_S = 0.25
LOCK_TIMEOUT_S = 0.5


class Daemon:
    def __init__(self, config: Config, config_path: Optional[Path] = None):
        self.config = config
        self.config_path = config_path
        self.paths = StatePaths(config.state_dir())
        self.log = logs.get("daemon")
        self.lock = threading.Lock()
        self.signals: deque[int] = deque()
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
        self.policies: dict[int, RestartPolicy] = {}
        self.looping: set[int] = set()  # replicas in a crash loop: no more restarts
        self.out_of_service: dict[int, str] = {}  # replica -> why (CPU fallback with fallback=fail)
        self.nudged: dict[int, float] = {}  # zombie parent pid -> when SIGCHLD was sent
        self.ticks = 0
        self.last_tick = time.monotonic()
        self.tick_s = 0.0
        self.ready_sent = False
        self.accepting = True
        self.last_sample: dict = {}

    # ---- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        import logging

        # apscheduler logs every run at INFO and every coalesced run skipped behind a long tick (a
        # replica restart) at WARNING: both by design here. A wedged tick is caught by healthy().
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        subreaper = become_subreaper()
        self.log.info("daemon_starting", pid=os.getpid(), mode=self.config.daemon.mode, subreaper=subreaper,
                      state_dir=str(self.paths.root), config=str(self.config_path or "built-in defaults"))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._queue_signal)
        with ChildWatch() as children:
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
                woke = children.wait(WAKE_S)
                self.reap(woke)
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

        from watchdog.http import ApiServer

        from watchdog.external import MARKER, marker_value

        os.environ[MARKER] = marker_value()  # inherited by every worker: how `clean` finds our orphans
        self.store = JobStore(self.paths.store, max_attempts=self.config.pipeline.max_attempts)
        # The tick's own writes wait briefly: a tick blocked on the store is a tick that cannot see.
        self.lease_store = JobStore(self.paths.store, max_attempts=self.config.pipeline.max_attempts, busy_timeout_s=1.0)
        self._start_gpu_probe()
        self._start_service()
        d = self.config.daemon
        self.http = ApiServer(d.http_host, d.http_port, self.store, self.metrics.render, self.health,
                              self.readiness, lambda: self.accepting, self.paths.root, self.paths.outputs)
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
        if self.config.daemon.mode == "external":
            from watchdog.external import External, LogWatch

            self.external = External(self.config.daemon.command)
            self.external.start()
            self.policies = {0: RestartPolicy.from_config(self.config.actions)}
            self.policies[0].record_start(time.time())
            if self.config.daemon.log_file:
                self.logwatch = LogWatch.from_config(self.config.daemon.log_file, self.config.daemon.log_patterns)
            return
        from heygem.pipeline import Pipeline

        self.pipeline = Pipeline(self.config.pipeline, self.store, models_dir=self.paths.models,
                                 output_dir=self.paths.outputs, log_json=True)
        self.pipeline.start()
        if self.pipeline.swept:
            self.log.warning("stale_segments_removed", segments=self.pipeline.swept,
                             why="left in /dev/shm by a supervisor that died with its resource tracker")
        now = time.time()
        self.policies = {r.index: RestartPolicy.from_config(self.config.actions) for r in self.pipeline.replicas}
        for policy in self.policies.values():
            policy.record_start(now)

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
            requeued = []
            if self.pipeline is not None:
                requeued = self.pipeline.stop(grace_s=grace)
            if self.external is not None:
                self.external.stop(grace)
            if self.http is not None:
                self.http.stop(timeout=2.0)
            if self.nvml is not None:
                self.nvml.close()
            for pid in probes.orphans(os.getpid(), self._tracked()):
                self._terminate_orphan(pid)
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
        if self.pipeline is not None:
            for replica in self.pipeline.replicas:
                pids.update(replica.pids().values())
        if self.external is not None and self.external.pid:
            pids.add(self.external.pid)
        tracker = probes.resource_tracker_pid()
        if tracker:
            pids.add(tracker)
        return pids

    def reap(self, woke: bool) -> None:
        if not self.lock.acquire(timeout=LOCK_TIMEOUT_S):
            return  # a tick is acting on children; the next wake reaps
        try:
            for exit_ in reap(exclude=self._tracked()):
                self.log.info("reaped", pid=exit_.pid, code=exit_.code, signal=exit_.signal)
        finally:
            self.lock.release()

    def healthy(self) -> bool:
        """The tick loop is alive: a tick finished within three intervals (or 10 s)."""
        return time.monotonic() - self.last_tick < max(3 * self.config.daemon.interval_s, 10.0) + self.tick_s

    def health(self) -> dict:
        return {"healthy": self.healthy(), "ticks": self.ticks, "last_tick_age_s": round(time.monotonic() - self.last_tick, 3)}

    def readiness(self) -> tuple[bool, dict]:
        why = {}
        if self.pipeline is not None:
            for r in self.pipeline.replicas:
                if r.index in self.out_of_service:
                    why[f"replica-{r.index}"] = self.out_of_service[r.index]
                elif r.index in self.looping:
                    why[f"replica-{r.index}"] = "crash loop: restarts stopped"
                elif not r.ready():
                    why[f"replica-{r.index}"] = "starting or restarting"
            serving = any(r.ready() and r.index not in self.out_of_service for r in self.pipeline.replicas)
            return serving and not why, why
        alive = self.external is not None and self.external.exit_code() is None
        return alive, {} if alive else {"command": "not running"}

    def reload(self) -> None:
        """SIGHUP: re-read the config; a bad one is refused and the old one kept."""
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
                if self.pipeline is not None:
                    self.pipeline.stop(grace_s=old.daemon.stop_grace_s)
                    self.pipeline = None
                if self.external is not None:
                    self.external.stop(old.daemon.stop_grace_s)
                    self.external = None
                self.out_of_service.clear()
                self.looping.clear()
                self.ready_sent = False
                self._start_service()
            self.log.info("config_reloaded", service_restarted=restart)
        finally:
            self.lock.release()

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
        from watchdog.procs import by_parent, zombies

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
        if self.external is not None:
            sample["external"] = {"pid": self.external.pid, "exit_code": self.external.exit_code(),
                                  "processes": len(self.external.refs())}
            if self.logwatch is not None:
                self.logwatch.read(now)
        sample["zombies"] = [g.as_dict() for g in by_parent(zombies(root=os.getpid()))]
        sample["orphans"] = probes.orphans(os.getpid(), self._tracked())
        sample["disks"] = probes.disk_views([self.paths.root])
        sample["jobs"] = self.store.counts()
        self.last_sample = sample
        return sample

    def _pipeline_event(self, replica: int, kind: str, stage: str, payload, now: float) -> None:
        if kind == "fatal":
            self.log.error("stage_fatal", replica=replica, stage=stage, kind=payload.get("kind"), reason=payload.get("reason"))
            if payload.get("kind") == "cpu_fallback":
                self.out_of_service[replica] = payload.get("reason", "CPU fallback")
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

    def evaluate(self, sample: dict, now: float) -> tuple[list[Condition], list[str]]:
        r = self.config.rules
        conditions: list[Condition] = []
        skipped: list[str] = []
        status = sample.get("pipeline")
        stages = probes.stage_views(status) if status else []
        gpus = probes.gpu_views(sample["gpus"]) if sample["gpus"] is not None else []
        if sample["gpus"] is None and self.nvml is not None:
            skipped.append("gpu_idle_busy_queue")  # a failed read must not resolve the alert
        conditions += rules.gpu_idle_busy_queue(gpus, stages, gpu_idle_util_pct=r.gpu_idle_util_pct,
                                                gpu_busy_mem_mib=r.gpu_busy_mem_mib, jobs_waiting=sample["jobs"]["queued"])
        if status:
            workers = [w for w in probes.worker_views(status, now)
                       if int(w.name.split("/")[0].split("-")[1]) not in self.out_of_service]
            conditions += rules.cpu_fallback(probes.provider_views(status))
            conditions += rules.worker_dead(workers)
            conditions += rules.worker_hung(workers, heartbeat_timeout_s=r.heartbeat_timeout_s)
            conditions += rules.stage_stalled(stages, stall_after_s=self.config.pipeline.stall_after_s, now=now)
            conditions += rules.queue_full(stages)
        if self.external is not None:
            ext = sample["external"]
            conditions += rules.worker_dead([rules.WorkerView("external", ext["pid"], ext["exit_code"] is None, 0.0, ext["exit_code"])])
            if self.logwatch is not None:
                conditions += self.logwatch.conditions(now)
        zombie_parents = {g["ppid"]: len(g["zombies"]) for g in sample["zombies"]}
        conditions += rules.zombies(zombie_parents, zombies_max=r.zombies_max)
        conditions.append(Condition("orphans", "", bool(sample["orphans"]), "warning",
                                    f"{len(sample['orphans'])} orphaned processes re-parented to the daemon",
                                    {"pids": sample["orphans"]}))
        conditions += rules.disk_low(sample["disks"], disk_min_free_mib=r.disk_min_free_mib)
        for index in sorted(self.looping):
            conditions.append(Condition("crash_loop", f"replica-{index}", True, "critical",
                                        f"replica {index} exited {self.config.actions.crash_loop_restarts}+ times within "
                                        f"{self.config.actions.crash_loop_window_s:g} s: restarts stopped",
                                        {"restarts": self.policies[index].restarts}))
        return conditions, skipped

    # ---- actions --------------------------------------------------------------------------------
    def act(self, sample: dict, events: list, now: float) -> None:
        """Heal what the rules found, then log every alert event with what was done."""
        actions: dict[tuple[str, str], str] = {}
        if self.pipeline is not None:
            actions.update(self._manage_replicas(sample["pipeline"], events, now))
        if self.external is not None:
            actions.update(self._manage_external(now))
        if sample["orphans"]:
            done = [self._terminate_orphan(pid) for pid in sample["orphans"]]
            actions[("orphans", "")] = "terminated " + ", ".join(done)
        actions.update(self._handle_zombies(sample["zombies"], now))
        for event in events:
            action = actions.get((event.alert, event.key), "")
            self._log_alert(event.with_action(action) if action else event)

    def _log_alert(self, event) -> None:
        getattr(self.log, event.level)(**event.fields())

    def _manage_replicas(self, status: dict, events: list, now: float) -> dict:
        """Restart each replica whose stage died, hung or stalled, with back-off; stop at a loop."""
        firing = {(e.alert, e.key) for e in self.book.firing()}
        actions = {}
        for replica in self.pipeline.replicas:
            i = replica.index
            if i in self.out_of_service or i in self.looping or not self.config.actions.restart_workers:
                continue
            if replica.fell_back():
                self.out_of_service[i] = "sessions not on the requested provider and fallback = \"fail\""
                self.log.error("replica_out_of_service", replica=i, reason=self.out_of_service[i])
                continue
            names = [f"replica-{i}/{s}" for s in replica.procs]
            why = [(a, k) for a, k in firing if a in ("worker_dead", "worker_hung") and k in names]
            why += [(a, k) for a, k in firing if a == "stage_stalled" and k.startswith(f"{i}/")]
            if not why:
                continue
            policy = self.policies[i]
            if policy.running:
                policy.record_exit(now)
            if policy.crash_looping(now):
                self.looping.add(i)
                self.log.error("crash_loop", replica=i, restarts=policy.restarts, action="restarts stopped")
                continue
            start_at = policy.next_start_at(now)
            if now < start_at:
                for alert in why:
                    actions[alert] = f"restart of replica {i} in {start_at - now:.1f} s (back-off)"
                continue
            requeued = self.pipeline.restart(i, grace_s=self.config.actions.term_grace_s)
            policy.record_start(time.time())
            action = f"restarted replica {i} (generation {replica.generation}); requeued jobs {requeued}"
            self.log.warning("replica_restarted", replica=i, why=sorted({a for a, _ in why}), requeued=requeued,
                             generation=replica.generation, restarts=policy.restarts)
            for alert in why:
                actions[alert] = action
        return actions

    def _manage_external(self, now: float) -> dict:
        code = self.external.exit_code()
        if code is None:
            return {}
        policy = self.policies[0]
        if policy.running:
            policy.record_exit(now)
            self.log.warning("external_exited", pid=self.external.pid, code=code)
        if policy.crash_looping(now):
            self.looping.add(0)
            return {}
        if now < policy.next_start_at(now):
            return {}
        self.external.start()
        policy.record_start(time.time())
        self.log.warning("external_restarted", pid=self.external.pid, restarts=policy.restarts)
        return {("worker_dead", "external"): f"restarted the command as pid {self.external.pid}"}

    def _terminate_orphan(self, pid: int) -> str:
        from watchdog.procs import ProcRef, terminate

        try:
            ref = ProcRef.of(pid)
        except Exception:
            return f"{pid} (gone)"
        result = terminate([ref], self.config.actions.term_grace_s)
        how = "killed" if result.get("killed") else "terminated"
        self.log.warning("orphan_terminated", pid=pid, how=how)
        return f"{pid} ({how})"

    def _handle_zombies(self, groups: list[dict], now: float) -> dict:
        """Zombies under a live parent in our tree: SIGCHLD once; if they outlive the grace, the
        parent is restarted (only a parent can reap; its restart hands them to us, the reaper)."""
        from watchdog.procs import ProcRef, send

        if not self.config.actions.reap:
            return {}
        actions = {}
        parents = {g["ppid"] for g in groups if g["ppid"] != os.getpid()}
        for pid in list(self.nudged):
            if pid not in parents:
                del self.nudged[pid]
        for pid in parents:
            try:
                ref = ProcRef.of(pid)
            except Exception:
                continue
            if pid not in self.nudged:
                send(ref, signal.SIGCHLD)
                self.nudged[pid] = now
                actions[("zombies", "")] = f"sent SIGCHLD to parent {pid}"
                self.log.info("zombie_parent_nudged", parent=pid)
            elif now - self.nudged[pid] >= self.config.actions.zombie_parent_grace_s and self.config.actions.restart_parent:
                actions[("zombies", "")] = self._restart_parent(pid)
                self.log.warning("zombie_parent_restarted", parent=pid, action=actions[("zombies", "")])
                del self.nudged[pid]
        return actions

    def _restart_parent(self, pid: int) -> str:
        if self.external is not None and pid == self.external.pid:
            self.external.stop(self.config.actions.term_grace_s)
            self.external.start()
            self.policies[0].record_start(time.time())
            return f"restarted the command (parent {pid} kept its zombies past the grace)"
        if self.pipeline is not None:
            for replica in self.pipeline.replicas:
                if pid in replica.pids().values():
                    requeued = self.pipeline.restart(replica.index, self.config.actions.term_grace_s)
                    return f"restarted replica {replica.index} (stage pid {pid} kept its zombies); requeued {requeued}"
        return f"terminated parent {self._terminate_orphan(pid)}; its zombies pass to the reaper"

    # ---- publish -----------------------------------------------------------------------------
    def publish(self, sample: dict, now: float) -> None:
        firing = self.book.firing()
        status = sample.get("pipeline")
        self.metrics.update_from(
            gpus=probes.gpu_views(sample["gpus"] or []),
            stages=probes.stage_views(status) if status else [],
            jobs=sample["jobs"],
            zombies=sum(len(g["zombies"]) for g in sample["zombies"]),
            restarts={f"replica-{i}": p.restarts for i, p in self.policies.items()},
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
        write_json(self.paths.snapshot, {
            "version": SNAPSHOT_VERSION, "time": now, "pid": os.getpid(), "mode": self.config.daemon.mode,
            "ready": ready, "not_ready": why, "tick": self.ticks, "tick_s": round(self.tick_s, 4),
            "http": self.http.url if self.http else None, "config": str(self.config_path) if self.config_path else None,
            "gpus": sample["gpus"], "gpu_error": sample.get("gpu_error"),
            "replicas": status["replicas"] if status else [], "stages": status["stages"] if status else [],
            "external": sample.get("external"), "jobs": jobs, "zombies": sample["zombies"],
            "orphans": sample["orphans"], "alerts": [e.fields() for e in firing],
            "restarts": {f"replica-{i}": p.restarts for i, p in self.policies.items()},
            "out_of_service": self.out_of_service, "crash_loop": sorted(self.looping),
        })


def _now_dt():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def _version() -> str:
    from heygem import __version__

    return __version__
