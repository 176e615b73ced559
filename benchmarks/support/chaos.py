"""The chaos batch harness, shared by tests/test_chaos.py and benchmarks/bench_batch.py.

A real `heygem-ops daemon` (2 CPU replicas) takes demo jobs over HTTP while `chaos` SIGKILLs
stage processes, SIGSTOPs one (a hang) and SIGKILLs the daemon itself, then starts a new daemon
on the same state directory. Every signal goes to a process this harness's daemon started, found
in its snapshot and verified by pid, create time and parent. `Batch` records every process and
shared-memory segment it saw, the faults and their detection (the alert line), and the daemon's
CPU and memory.
"""

from __future__ import annotations

import random
import signal
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import psutil

from benchmarks.support.daemon_helpers import Daemon
from heygem.jobs import TERMINAL, JobStore

FPS = 25.0
AUDIO_S = 1.0
WATCH_EVERY_S = 0.25
CONFIG = """[pipeline]
cpu_replicas = 2
lease_s = 6.0
max_attempts = 20
[rules]
heartbeat_timeout_s = 3.0
[actions]
backoff_initial_s = 0.2
backoff_max_s = 2.0
term_grace_s = 1.0
crash_loop_restarts = 100
"""
PLAN = ("kill", "hang", "kill", "daemon", "kill", "kill")  # the faults, in order


@dataclass
class Fault:
    kind: str  # the alert that must name it (worker_dead, worker_hung), or daemon_killed, jobs_requeued
    target: str  # replica-I/stage, or "daemon"
    pid: int
    at: float  # epoch seconds when the signal was sent
    detected: Optional[float] = None  # epoch seconds of the log line that reported it
    action: str = ""

    @property
    def latency_s(self) -> Optional[float]:
        return None if self.detected is None else self.detected - self.at


def log_time(record: dict) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie; `is_running` compares the create time, so a reused pid is not ours."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def outliving(procs: list[psutil.Process], timeout_s: float, tick: Callable[[], None] = lambda: None) -> list[psutil.Process]:
    """Those of `procs` still alive after waiting (bounded) for all of them to exit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        tick()
        time.sleep(0.1)
    return [p for p in procs if alive(p)]


class Batch:
    """A daemon that can be killed and replaced on the same state directory, the jobs submitted to
    it, the faults injected, and every process and shared-memory segment it ever had."""

    def __init__(self, root: Path, config: str, audio: Path, template: Path, seed: int = 7):
        self.root, self.config, self.audio, self.template = root, config, audio, template
        self.daemons: list[Daemon] = []
        self.seen: dict[tuple[int, float], psutil.Process] = {}  # (pid, create time) -> process
        self.segments: set[str] = set()  # /dev/shm names our processes mapped
        self.faults: list[Fault] = []
        self.codes: list[str] = []
        self.stopped: list[psutil.Process] = []  # SIGSTOPped by us: SIGKILLed at close if still there
        self.usage: list[tuple[float, float]] = []  # daemon (cpu %, rss MiB) samples
        self.rng = random.Random(seed)
        self._watched = 0.0
        self._daemon_proc: Optional[psutil.Process] = None
        self._store: Optional[JobStore] = None

    # ---- the daemon ------------------------------------------------------------------------------
    @property
    def daemon(self) -> Daemon:
        return self.daemons[-1]

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(self.daemons[0].state / "jobs.sqlite3")
        return self._store

    def start_daemon(self) -> Daemon:
        home = self.root / f"daemon-{len(self.daemons)}"
        home.mkdir()
        if self.daemons:  # the same state directory: store, outputs, models
            (home / "state").symlink_to(self.daemons[0].state)
        d = Daemon(home, self.config, input_roots=tuple(dict.fromkeys([self.audio.parent, self.template.parent])))
        self.daemons.append(d)
        self._daemon_proc = psutil.Process(d.proc.pid)
        self._daemon_proc.cpu_percent(None)
        assert self.wait(lambda: d.wait_notify("READY=1", 0.5) or d.proc.poll() is not None, 120) and d.proc.poll() is None, \
            d.log_path.read_text()[-3000:]
        return d

    def records(self) -> list[dict]:
        return [r for d in self.daemons for r in d.records()]

    # ---- watching ---------------------------------------------------------------------------------
    def watch(self, force: bool = False) -> None:
        """Record the daemon's processes (snapshot pids and descendants), the segments they map,
        and the daemon's CPU and memory. Throttled: call it from every wait loop."""
        now = time.monotonic()
        if not force and now - self._watched < WATCH_EVERY_S:
            return
        self._watched = now
        d = self.daemon
        pids = {d.proc.pid, *d.descendants()}
        snap = d.snapshot()
        if snap and snap.get("pid") == d.proc.pid:
            pids |= {pid for r in snap["replicas"] for pid in r["pids"].values()}
        for pid in pids:
            try:
                proc = psutil.Process(pid)
                self.seen.setdefault((pid, proc.create_time()), proc)
                with open(f"/proc/{pid}/maps") as maps:
                    self.segments |= {line.rsplit("/", 1)[1].strip() for line in maps if "/dev/shm/heygem_" in line}
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                continue
        if d.proc.poll() is None and self._daemon_proc is not None:
            try:
                self.usage.append((self._daemon_proc.cpu_percent(None), self._daemon_proc.memory_info().rss / 2**20))
            except psutil.NoSuchProcess:
                pass

    def wait(self, predicate: Callable[[], object], timeout_s: float, every_s: float = 0.1):
        """Poll `predicate` (watching meanwhile) until truthy (returned) or the time is up (None)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.watch()
            value = predicate()
            if value:
                return value
            time.sleep(every_s)
        return None

    # ---- jobs ----------------------------------------------------------------------------------------
    def submit(self, n: int) -> None:
        for _ in range(n):
            code = f"chaos-{len(self.codes)}"
            status, body = self.daemon.http("/easy/submit", {"audio_url": str(self.audio), "video_url": str(self.template), "code": code})
            assert status == 200 and body["code"] == 10000, body
            self.codes.append(code)

    def jobs(self) -> list:
        store = self.store
        return [store.by_code(c) for c in self.codes]

    def done(self) -> bool:
        return all(j.state in TERMINAL for j in self.jobs())

    # ---- faults ------------------------------------------------------------------------------------
    def victim(self) -> tuple[str, psutil.Process]:
        """A random stage process of a ready replica of the current daemon, verified to be its child."""

        def pick():
            d = self.daemon
            snap = d.snapshot()
            if not snap or snap.get("pid") != d.proc.pid:
                return None
            ready = [r for r in snap["replicas"] if r["ready"] and not r["dead"]]
            if not ready:
                return None
            replica = self.rng.choice(ready)
            stage = self.rng.choice(sorted(replica["pids"]))
            try:
                proc = psutil.Process(replica["pids"][stage])
                ours = proc.ppid() == d.proc.pid and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return None
            return ours and (f"replica-{replica['index']}/{stage}", proc)

        found = self.wait(pick, 60)
        assert found, f"no ready replica to pick a victim from: {self.daemon.snapshot()}"
        return found

    def kill_stage(self) -> Fault:
        name, proc = self.victim()
        fault = Fault("worker_dead", name, proc.pid, time.time())
        proc.send_signal(signal.SIGKILL)  # psutil checks pid + create time first
        self.faults.append(fault)
        assert self.wait(lambda: self.detect(fault), 30), f"{fault} not reported; log:\n{self.daemon.log_path.read_text()[-3000:]}"
        self.recovered(fault)
        return fault

    def hang_stage(self) -> Fault:
        name, proc = self.victim()
        fault = Fault("worker_hung", name, proc.pid, time.time())
        proc.suspend()  # SIGSTOP: alive, silent
        self.stopped.append(proc)
        self.faults.append(fault)
        assert self.wait(lambda: self.detect(fault), 30), f"{fault} not reported; log:\n{self.daemon.log_path.read_text()[-3000:]}"
        assert self.wait(lambda: not alive(proc), 30), f"the hung stage {proc.pid} was not stopped by the daemon"
        self.recovered(fault)
        return fault

    def recovered(self, fault: Fault) -> None:
        """Wait until the fault's replica was restarted and is ready again, so that the next fault
        is the only one in flight (two at once: see test_two_replicas_dying_together_...)."""
        index = int(fault.target.split("/")[0].split("-")[1])
        d = self.daemon

        def ready():
            restarted = any(r.get("event") == "replica_restarted" and r.get("replica") == index and log_time(r) >= fault.at
                            for r in d.records())
            snap = d.snapshot()
            return restarted and snap and snap.get("pid") == d.proc.pid and snap["replicas"][index]["ready"]

        assert self.wait(ready, 60), f"replica {index} did not come back after {fault}"

    def kill_daemon(self) -> Fault:
        """SIGKILL the daemon mid-job. Its children must exit by themselves (detected: when the
        last one is gone); a new daemon on the same state directory must get the jobs they held
        back when the leases expire (a second record, `jobs_requeued`)."""
        old = self.daemon

        def steady():  # no replica mid-restart: see test_a_stage_born_after_its_supervisor_died_exits
            snap = old.snapshot()
            return snap and snap.get("pid") == old.proc.pid and all(r["ready"] for r in snap["replicas"])

        def early_job():  # a job in decode: its stages must drop it, not finish it
            return steady() and [j.id for j in self.jobs() if j.state == "running" and 0 < j.progress < 50]

        assert self.wait(steady, 60), f"replicas not ready: {old.snapshot()}"
        if not any(j.state == "queued" for j in self.jobs()):
            self.submit(2)
        assert self.wait(early_job, 60, every_s=0.02), "no job started on ready replicas: the kill would not be mid-job"
        self.watch(force=True)
        children = [psutil.Process(p) for p in old.descendants()]
        fault = Fault("daemon_killed", "daemon", old.proc.pid, time.time())
        old.proc.send_signal(signal.SIGKILL)  # the Popen this test started
        old.proc.wait(timeout=10)
        self.faults.append(fault)
        left = outliving(children, 20, self.watch)
        assert not left, (f"children of the killed daemon did not exit by themselves: {[(p.pid, p.cmdline()) for p in left]}; "
                          f"its last records: {[(r.get('event'), r.get('alert'), r.get('key')) for r in old.records()[-20:]]}")
        fault.detected = time.time()
        fault.action = f"its {len(children)} children exited by themselves"
        old.stop()
        held = sorted(j.id for j in self.jobs() if j.state == "running")
        self.start_daemon()
        if held:
            requeued = Fault("jobs_requeued", "daemon", old.proc.pid, fault.at)
            expired = self.wait(lambda: (r := [x for x in self.daemon.records() if x.get("event") == "job_lease_expired"])
                                and {x["job"] for x in r} >= set(held) and r, 30)
            assert expired, f"jobs {held} held by the killed daemon never came back"
            requeued.detected = log_time(expired[-1])
            requeued.action = f"new daemon requeued jobs {held} on lease expiry"
            self.faults.append(requeued)
        return fault

    def detect(self, fault: Fault) -> bool:
        """The first firing alert of the fault's kind that names its worker and pid."""
        for r in self.daemon.records():
            if (r.get("event") == "alert" and r.get("alert") == fault.kind and r.get("state") == "firing"
                    and r.get("key") == fault.target and r.get("evidence", {}).get("pid") == fault.pid):
                fault.detected, fault.action = log_time(r), r.get("action") or ""
                return True
        return False

    # ---- the end -----------------------------------------------------------------------------------
    def close(self, timeout_s: float = 30) -> list[psutil.Process]:
        """Stop the daemon; return our processes still there after `timeout_s` (then kill those)."""
        self.watch(force=True)
        for d in self.daemons:
            d.stop()
        left = outliving(list(self.seen.values()), timeout_s, self.watch)
        for proc in left + [p for p in self.stopped if alive(p)]:  # only processes this batch started
            proc.kill()
        return left


def chaos(batch: Batch, plan=PLAN, before_each: Callable[[], None] = lambda: None) -> None:
    """Inject the plan's faults in order; `before_each` runs before each (to submit, or to pace)."""
    steps = {"kill": batch.kill_stage, "hang": batch.hang_stage, "daemon": batch.kill_daemon}
    for step in plan:
        before_each()
        steps[step]()


def latency_table(faults: list[Fault]) -> str:
    rows = [f"{'fault':<14} {'target':<20} {'pid':>7} {'detected after':>15}  action"]
    for f in faults:
        lat = "-" if f.latency_s is None else f"{f.latency_s:.2f} s"
        rows.append(f"{f.kind:<14} {f.target:<20} {f.pid:>7} {lat:>15}  {f.action}")
    by_kind: dict[str, list[float]] = {}
    for f in faults:
        if f.latency_s is not None:
            by_kind.setdefault(f.kind, []).append(f.latency_s)
    for kind, values in by_kind.items():
        rows.append(f"{kind}: median {statistics.median(values):.2f} s, max {max(values):.2f} s over {len(values)}")
    return "\n".join(rows)


def shm_heygem() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("heygem_")}

