"""The daemon: one process that is the parent of the service, samples it, decides, heals, reports.

Shaped like gunicorn's arbiter. The main thread owns signals: handlers only record and wake the
loop (the SIGCHLD self-pipe); the loop reaps, handles queued TERM/INT/HUP, and pings the systemd
watchdog while ticks keep completing. The tick runs on apscheduler (one worker thread,
coalesced) as named steps, serialised with reaping and shutdown by one lock so the service's
children are never waited on from two threads:

    sample    GPUs (NVML), the pipeline (replicas, stage board, queues) or the external command,
              zombies in our tree (each parent pinned by pid and start time now), orphans
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

External mode with `[daemon] upstream_url`: `watchdog.front` holds upstream's tasks in the job store
and forwards and follows them on its own thread (every call to upstream bounded); the tick only
reads what it published (readiness, `task_stalled`, API silence as `worker_hung`) and tells it of
each TERM and START of upstream, so a restart sends the tasks upstream lost again, in order.
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
from heygem.jobs import HOST_ENV, STATES, UNAVAILABLE, JobStore, StoreConfigError, host_name
from watchdog import alerts as rules
from watchdog import escalation, probes
from watchdog.alerts import AlertBook, Condition, for_durations
from watchdog.backoff import RestartPolicy
from watchdog.config import Config, ConfigError, DaemonConfig, load
from watchdog.metrics import Metrics
from watchdog.reaper import ChildWatch, become_subreaper, reap
from watchdog.sdnotify import Notifier
from watchdog.state import SNAPSHOT_VERSION, StatePaths, write_json, write_pidfile
from watchdog.supervisor import CRASH_LOOP, OUT_OF_SERVICE, RUNNING, STARTING, Supervisor

WAKE_S = 0.25
LOCK_TIMEOUT_S = 0.5
RESTART_FAULTS = ("worker_dead", "worker_hung", "stage_stalled", "task_stalled")  # firing alerts that restart their unit
FRONT_FAULTS = ("queue_full",)  # with the front (watchdog.front): upstream's log line restarts it, its tasks are kept
UNHEALTHY = RESTART_FAULTS + ("queue_full",)  # a zombie-keeping parent that is also unhealthy is restarted
# [daemon] keys that the front (watchdog.front) and the log watch (watchdog.logwatch) are built from.
FRONT_KEYS = tuple(k for k in DaemonConfig.model_fields if k.startswith("upstream_")) + ("data_dir",)
LOG_KEYS = tuple(k for k in DaemonConfig.model_fields if k.startswith("log_"))
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
        if config.daemon.host_name:
            os.environ[HOST_ENV] = config.daemon.host_name  # inherited by workers: their names carry it
        self.host = host_name()
        self.metrics = Metrics(_version(), config.daemon.mode, host=self.host,
                               store="postgresql" if config.store.url else "sqlite")
        # The job store as the tick last saw it: None or why it is away; since when it answers.
        self.store_error: Optional[str] = None
        self.store_ok_since: Optional[float] = None
        self.service_pending = False  # the pipeline waits for a store that did not answer at start
        self.last_jobs: dict = dict.fromkeys(STATES, 0)
        self.held: set = set()  # (job, attempt) running under this host's workers at the last tick
        self.book = AlertBook(for_durations(config.rules), config.rules.repeat_s)
        self.store: Optional[JobStore] = None
        self.lease_store: Optional[JobStore] = None
        self.pipeline = None
        self.external = None
        self.front = None  # watchdog.front.Front: external mode with [daemon] upstream_url
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
        self.ready_state: tuple[bool, dict] = (False, {"daemon": "starting"})
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
                # RestartPreventExitStatus=2 does not restart in a loop; so is a token file or an
                # http_host that cannot be used (ConfigError).
                return 2 if isinstance(err, (ModelError, ConfigError, StoreConfigError)) else 1
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
        from watchdog.http import Access, ApiServer, JobFiles, Limits, bind_address

        d = self.config.daemon
        # Configuration errors first (exit 2), before anything starts: the token file, the address.
        access, limits = Access.from_config(d), Limits.from_config(d)
        bind_address(d.http_host, d.http_port)
        os.environ[MARKER] = marker_value()  # inherited by every worker: how `clean` finds our orphans
        ready = self._open_store()
        self._start_gpu_probe()
        if ready or self.config.daemon.mode == "external":
            self._start_service()
        else:
            self.service_pending = True
        d = self.config.daemon
        self.http = ApiServer(d.http_host, d.http_port, self.store, self.metrics.render, self.health,
                              self.readiness, lambda: self.accepting, JobFiles.from_config(d, self.paths.root),
                              front=self.front, access=access, limits=limits)
        self.metrics.watch_http(self.http.stats)
        self.http.start()
        write_pidfile(self.paths, self.http.url)
        self.scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1)}, timezone="UTC")
        self.scheduler.add_job(self.tick, "interval", seconds=d.interval_s, id="tick", max_instances=1,
                               coalesce=True, misfire_grace_time=None, next_run_time=_now_dt())
        self.scheduler.start()
        self.log.info("daemon_started", http=self.http.url, interval_s=d.interval_s)

    def _open_store(self) -> bool:
        """Open the configured job store and create or migrate its schema. A store that can never
        work as configured (URL, credentials, schema) raises StoreConfigError: exit 2. One that
        does not answer (a PostgreSQL server down) is an alert, not an exit: the daemon serves
        /healthz, /readyz and /metrics, and its tick starts the pipeline once the store answers."""
        from watchdog.store import open_job_store

        self.store = open_job_store(self.config, self.paths)
        # The tick's own writes wait briefly: a tick blocked on the store is a tick that cannot see.
        self.lease_store = self.store.with_options(busy_timeout_s=1.0)
        try:
            self.store.prepare(migrate=True)
        except UNAVAILABLE as err:
            self.store_error = f"unreachable: {err}"
            self.log.error("store_unavailable", store=self.store.describe(), error=str(err),
                           action="serving /healthz, /readyz and /metrics; the pipeline starts once the store "
                                  "answers (tried every tick)")
            return False
        self.store_ok_since = time.time()
        self.log.info("store_ready", backend=self.store.backend, store=self.store.describe(), host=self.host)
        return True

    def _store_sample(self, sample: dict, now: float) -> None:
        """Read the queue (counts, oldest wait, jobs per host); note when the store is away and
        when it is back. A store that was away at start is prepared (migrated) first."""
        try:
            if self.service_pending:
                self.store.prepare(migrate=True)
            stats = self.store.stats(now)
        except (*UNAVAILABLE, StoreConfigError) as err:
            why = f"unreachable: {err}" if not isinstance(err, StoreConfigError) else str(err)
            if self.store_error is None:
                self.log.error("store_unavailable", store=self.store.describe(), error=str(err),
                               action="replicas finish the jobs they hold and claim no new ones")
            self.store_error, self.store_ok_since = why, None
            sample["jobs"], sample["store"] = self.last_jobs, {"ok": False, "error": why, "oldest_queued_s": None,
                                                                "held": {}}
            return
        if self.store_ok_since is None:
            self.store_ok_since = now
            if self.store_error is not None:
                self.log.info("store_available", store=self.store.describe(), after=self.store_error)
        self.store_error = None
        self.last_jobs = sample["jobs"] = stats.counts
        self._count_claims(stats)
        sample["store"] = {"ok": True, "error": None, "oldest_queued_s": stats.oldest_queued_s, "held": stats.held}
        if self.service_pending:
            self.service_pending = False
            self.log.info("store_ready", backend=self.store.backend, store=self.store.describe(), host=self.host,
                          action="starting the pipeline")
            self._start_service()

    def _count_claims(self, stats) -> None:
        """Claims by this host's workers since the last tick (heygem_job_events_total{event="claimed"}):
        the running jobs it holds now that it did not hold then."""
        held = set()
        if stats.held.get(self.host):
            try:
                held = {(j.id, j.attempts) for j in self.store.list(state="running", limit=1000) if j.host == self.host}
            except (*UNAVAILABLE, StoreConfigError):
                return
        for _ in held - self.held:
            self.metrics.count_job("claimed")
        self.held = held

    def _may_expire(self, now: float) -> bool:
        """Leases of a shared store expire only once it has answered this daemon for a lease's
        length: after an outage, the workers that rode it out renew first."""
        if not self.store.shared:
            return True
        return self.store_ok_since is not None and now - self.store_ok_since >= self.config.pipeline.lease_s

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
            if self.config.daemon.upstream_url:
                from watchdog.front import Front

                self.front = Front.of(self.config, self.paths.root, self.store)
                self.front.start()
                self.metrics.registry.register(self.front)
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
        if self.front is not None:  # first: nothing more goes to an upstream that stops
            self.front.stop()
            self.metrics.registry.unregister(self.front)
            self.front = None
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
        for store in (self.store, self.lease_store):
            if store is not None:
                store.dispose()
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
        """As of the last tick (/readyz reads it from the HTTP thread: the tick thread alone
        touches the units)."""
        return self.ready_state

    def _readiness(self, now: float) -> tuple[bool, dict]:
        """Ready when every unit serves; `why` names each one that does not, and why."""
        why = {}
        for unit in self.units:
            sup = self.supervisors[unit.name]
            if sup.state != RUNNING:
                why[unit.name] = sup.describe(now)
            elif not unit.observe(()).ready:  # e.g. restarts are off and it died
                why[unit.name] = "not ready (a process exited or has not opened its sessions)"
        if self.front is not None and "external" not in why and not self.front.ready():
            why["upstream"] = self.front.not_ready_reason() or "upstream's API does not answer"
        if self.store_error is not None:
            why["job store"] = (f"{self.store_error}; " + ("the pipeline starts once it answers" if self.service_pending
                                else "replicas finish the jobs they hold and claim no new ones"))
        return bool(self.units) and not why, why

    def reload(self) -> None:
        """SIGHUP: re-read the config (a bad one is refused and the old one kept), and give every
        unit a fresh restart budget: one stopped in a crash loop or out of service starts again.

        At once: rules, the interval, the API's token, bounds and input files, the log watch. A new
        [pipeline], mode, command or front setting (upstream_*, data_dir) restarts the service.
        The HTTP address and [store] wait for the next start (`heygem-ops restart`), said in the log."""
        from watchdog.http import Access, JobFiles, Limits

        try:
            new = load(self.config_path)
            access, limits = Access.from_config(new.daemon), Limits.from_config(new.daemon)  # reads the token file
            files = JobFiles.from_config(new.daemon, self.paths.root)
        except ConfigError as err:
            self.log.error("config_reload_failed", error=str(err), action="kept the running config")
            return
        if not self.lock.acquire(timeout=10.0):
            self.log.error("config_reload_failed", error="tick did not finish within 10 s", action="kept the running config")
            return
        try:
            if new.store != self.config.store:
                self.log.warning("store_unchanged", serving=self.store.describe(),
                                 why="[store] takes effect at the next start: heygem-ops restart")
                new = new.model_copy(update={"store": self.config.store})
            old, self.config = self.config, new
            self.book = AlertBook(for_durations(new.rules), new.rules.repeat_s)
            if self.http is not None:  # token, open paths, bounds, inputs apply at once; the address needs a restart
                self.http.configure(access._replace(loopback=self.http.access.loopback), limits, files)
                if (new.daemon.http_host, new.daemon.http_port) != (old.daemon.http_host, old.daemon.http_port):
                    self.log.warning("http_address_unchanged", serving=self.http.url,
                                     why="http_host and http_port take effect at the next start: heygem-ops restart")
            if new.daemon.interval_s != old.daemon.interval_s and self.scheduler is not None:
                self.scheduler.reschedule_job("tick", trigger="interval", seconds=new.daemon.interval_s)
            # The front follows upstream's tasks with the settings it was built with, and hands them
            # back when it stops: it is rebuilt with its upstream, as after a new command.
            front = (new.daemon.mode == "external" and bool(old.daemon.upstream_url or new.daemon.upstream_url)
                     and _differ(old.daemon, new.daemon, FRONT_KEYS))
            restart = (new.pipeline != old.pipeline or new.daemon.mode != old.daemon.mode
                       or new.daemon.command != old.daemon.command or front)
            if not restart and _differ(old.daemon, new.daemon, LOG_KEYS):
                from watchdog.logwatch import LogWatch

                self.logwatch = LogWatch.of(new.daemon) if new.daemon.log_file and new.daemon.mode == "external" else None
            if restart:
                self._stop_service(old.daemon.stop_grace_s)
                self.ready_sent = False
                if not self.service_pending:  # else the tick starts it once the store answers
                    self._start_service()
                if self.http is not None:
                    self.http.front = self.front
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
            sample["pipeline"] = self.pipeline.status(jobs=False)
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
        self._store_sample(sample, now)
        self.last_sample = sample
        return sample

    def _pipeline_event(self, replica: int, kind: str, stage: str, payload, now: float) -> None:
        if kind == "job":
            self.metrics.count_job(payload.get("state"))
        if kind == "fatal":
            self.log.error("stage_fatal", replica=replica, stage=stage, kind=payload.get("kind"), reason=payload.get("reason"))
        elif kind == "job" and payload.get("state") == "failed":
            event = Condition("job_failed", str(payload["job"]), True, "warning",
                              f"job {payload['job']} failed in {stage}: {payload.get('reason')}",
                              {"job": payload["job"], "stage": stage, "reason": payload.get("reason")})
            self._log_alert(rules.AlertEvent(event.alert, event.key, "firing", event.severity, event.summary,
                                             event.evidence, now, now, action="job marked failed; not retried"))

    def expire_leases(self, now: float) -> None:
        if not self._may_expire(now):
            return
        try:
            expired = self.lease_store.expire_leases(now, self.config.pipeline.max_attempts)
        except (*UNAVAILABLE, StoreConfigError) as err:  # locked by a writer that may be the hung stage; away
            self.log.warning("job_store_busy", error=str(err), action="lease expiry retried next tick")
            return
        for job in expired:  # `host`: where it was; a shared store's next claim may be on any host
            self.log.warning("job_lease_expired", job=job.id, state=job.state, attempts=job.attempts, reason=job.reason,
                             host=job.host, by=self.host)

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
            starting = {name for name, s in self.supervisors.items() if s.state == STARTING}
            conditions += rules.worker_hung(workers, heartbeat_timeout_s=r.heartbeat_timeout_s, starting=starting,
                                            start_timeout_s=r.start_timeout_s)
            conditions += rules.stage_stalled(stages, stall_after_s=self.config.pipeline.stall_after_s, now=now)
            conditions += rules.queue_full(stages)
        if self.external is not None:
            ext = sample["external"]
            if "external" in serving:
                conditions += rules.worker_dead([rules.WorkerView("external", ext["pid"], ext["exit_code"] is None, 0.0, ext["exit_code"])])
            if self.logwatch is not None:
                conditions += self.logwatch.conditions(now)
            if self.front is not None:
                sup = self.supervisors.get("external")
                conditions += self.front.conditions(now, sup is not None and sup.state == RUNNING, r.heartbeat_timeout_s)
        zombie_parents = {g["ppid"]: len(g["zombies"]) for g in sample["zombies"]}
        conditions += rules.zombies(zombie_parents, zombies_max=r.zombies_max)
        conditions.append(Condition("orphans", "", bool(sample["orphans"]), "warning",
                                    f"{len(sample['orphans'])} orphaned processes re-parented to the daemon",
                                    {"pids": sample["orphans"]}))
        conditions += rules.disk_low(sample["disks"], disk_min_free_mib=r.disk_min_free_mib)
        conditions.append(Condition("store_unavailable", "", self.store_error is not None, "critical",
                                    f"job store {self.store.describe()}: {self.store_error or 'answers'}",
                                    {"store": self.store.describe(), "error": self.store_error}))
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
        restart = self.config.actions.restart_workers
        for unit in self.units:  # stepped even without restarts: a unit still becomes ready
            self._heal(unit, faults.get(unit.name, {}) if restart else {}, actions, now)
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
            elif (self.front is not None and e.alert in FRONT_FAULTS and e.key not in self.supervisors
                  and self.front.fresh_log_line(self.logwatch, e.alert, e.key)):
                out.setdefault("external", {})[(e.alert, e.key)] = None  # upstream's queue blocked
        return out

    def _heal(self, unit, faults: dict, actions: dict, now: float) -> None:
        """Step the unit's supervisor until it has nothing more to do this tick (a dead unit is
        TERMed, collected and started in one tick); faults count only at the first step."""
        sup = self.supervisors[unit.name]
        reasons = tuple(dict.fromkeys(alert for alert, _ in faults))
        front = self.front if unit.kind == "external" else None
        for i in range(STEPS_PER_TICK):
            ready = {} if front is None else {"ready": front.ready()}  # upstream answers its API (since its start)
            steps = sup.step(unit.observe(reasons if i == 0 else (), **ready), now)
            if not steps:
                break
            self._carry_out(unit, sup, steps, actions, faults)

    def _carry_out(self, unit, sup: Supervisor, steps, actions: dict, faults) -> None:
        from watchdog.units import EVENTS

        for step in steps:
            if self.front is not None and unit.kind == "external":
                self.front.on_action(step.kind, step.why, time.time())
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
        if self.external is not None and any(e.alert in UNHEALTHY for e in firing):
            unhealthy.add("external")  # its alerts are keyed by task code (log lines) or "external"
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
        held = sample["store"]["held"]
        self.metrics.update_store(sample["store"]["ok"], sample["store"]["oldest_queued_s"], held.get(self.host, 0))
        ready, why = self.ready_state = self._readiness(now)
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
            "external": sample.get("external"), "front": self.front.view() if self.front is not None else None,
            "jobs": jobs, "zombies": sample["zombies"],
            "orphans": sample["orphans"], "alerts": [e.fields() for e in firing],
            "units": {name: {"state": s.state, "detail": s.describe(now), "restarts": s.policy.restarts}
                      for name, s in self.supervisors.items()},
            "restarts": restarts,
            "store": {"backend": self.store.backend, "where": self.store.describe(), "shared": self.store.shared,
                      "host": self.host, **sample["store"]},
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


def _differ(old, new, keys) -> bool:
    """Does any of `keys` differ between two config sections?"""
    return any(getattr(old, k) != getattr(new, k) for k in keys)
