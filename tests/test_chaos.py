"""Chaos batch: the incident's batch through a real daemon while its processes are killed and hung.

One daemon subprocess (2 CPU replicas) takes demo jobs over HTTP. Between submissions the test
SIGKILLs a random stage process, SIGSTOPs one (a hang), and SIGKILLs the daemon itself, then
starts a new daemon on the same state directory. Every signal goes to a process this test's
daemon started, found in its snapshot and verified by pid, create time and parent.

At the end: every job succeeded exactly once with a playable video of the audio's length; no
process of ours is left (zombie or orphan); no shared-memory segment of ours is left; and the
alert log shows each fault, named, with the action taken. Detection latencies are printed
(`pytest -s`); benchmarks/bench_batch.py reports them over a larger batch.

`Batch` and `chaos` are shared with the benchmark.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import psutil
import pytest

from heygem import assets
from heygem.jobs import TERMINAL, JobStore
from tests.daemon_helpers import Daemon, wait_for
from tests.test_pipeline import frame_count

pytestmark = pytest.mark.timeout(300)

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
        d = Daemon(home, self.config)
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


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos-media")
    return {"template": assets.make_template_video(root / "template.mp4", seconds=2.0, fps=FPS),
            "audio": assets.make_speech_audio(root / "speech.wav", seconds=AUDIO_S)}


def test_a_batch_survives_killed_hung_stages_and_a_killed_daemon(tmp_path, media):
    shm_before = shm_heygem()
    batch = Batch(tmp_path, CONFIG, media["audio"], media["template"])
    try:
        batch.start_daemon()
        chaos(batch, before_each=lambda: batch.submit(3))
        assert batch.wait(batch.done, 180, every_s=0.5), [(j.code, j.state, j.stage) for j in batch.jobs()]
    finally:
        left = batch.close()
    print("\n" + latency_table(batch.faults))

    jobs = batch.jobs()
    failed = {j.code: j.reason for j in jobs if j.state != "succeeded"}
    assert not failed, f"jobs that did not succeed: {failed}"
    succeeded = [r["job"] for r in batch.records() if r.get("event") == "job_succeeded"]
    twice = {j for j in succeeded if succeeded.count(j) > 1}
    assert sorted(succeeded) == sorted(j.id for j in jobs) and not twice, f"completed more than once: {twice}"
    for job in jobs:
        assert frame_count(job.result) == round(AUDIO_S * FPS), job.result

    assert len(batch.seen) > 12, "the batch saw too few processes: the leftover check below would prove nothing"
    assert not left, f"processes of ours left behind: {[(p.pid, p.status()) for p in left]}"
    assert batch.segments, "no shared-memory segment seen: the leak check below would prove nothing"
    leaked = (shm_heygem() - shm_before) & batch.segments
    assert not leaked, f"shared-memory segments left behind: {leaked}"

    restarts = [(log_time(r), r["replica"], r["why"]) for r in batch.records() if r.get("event") == "replica_restarted"]
    for fault in batch.faults:
        assert fault.detected is not None, fault
        if fault.kind in ("worker_dead", "worker_hung"):
            replica = fault.target.split("/")[0].replace("-", " ")
            assert replica in fault.action, f"the action must name {replica}: {fault}"
            index = int(replica.split()[1])
            assert any(t >= fault.at and i == index and fault.kind in why for t, i, why in restarts), \
                f"{replica} was never restarted for {fault}: {restarts}"
    assert {f.kind for f in batch.faults} >= {"worker_dead", "worker_hung", "daemon_killed"}


SUPERVISOR = """
import os, signal, sys
from pathlib import Path
from heygem.config import PipelineConfig
from heygem.jobs import TERMINAL, JobStore
from heygem.pipeline import Pipeline

if __name__ == "__main__":
    p = Pipeline(PipelineConfig(), JobStore(sys.argv[1]), models_dir=Path(sys.argv[2]), output_dir=Path(sys.argv[3]))
    p.start()  # spawns the stages and returns while they are still importing
    print(" ".join(str(pid) for pid in p.replicas[0].pids().values()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies before its stages run a line of their own
"""


def test_a_stage_born_after_its_supervisor_died_exits(tmp_path):
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR)
    sup = subprocess.Popen([sys.executable, str(script), str(tmp_path / "jobs.sqlite3"), str(tmp_path / "models"),
                            str(tmp_path / "out")], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        stages = [psutil.Process(int(p)) for p in sup.stdout.readline().split()]
    finally:
        sup.wait(timeout=60)
    assert len(stages) == 3 and sup.returncode == -signal.SIGKILL
    left = outliving(stages, 10)
    for proc in left:  # processes this test started
        proc.kill()
    assert not left, f"stages outlived their supervisor: {[p.pid for p in left]}"


def test_two_replicas_dying_together_each_alert_names_its_own_replica(tmp_path):
    d = Daemon(tmp_path, "[pipeline]\ncpu_replicas = 2\n[actions]\nbackoff_initial_s = 0.2\n")
    try:
        assert d.wait_notify("READY=1", 120), d.log_path.read_text()[-3000:]
        victims = [psutil.Process(d.stage_pid("decode", replica=i)) for i in (0, 1)]
        assert all(v.ppid() == d.proc.pid for v in victims)
        for victim in victims:  # processes of the daemon this test started
            victim.kill()
        fired = wait_for(lambda: len(d.alerts("worker_dead")) >= 2 and d.alerts("worker_dead"), 30)
        assert fired, d.log_path.read_text()[-3000:]
        for alert in fired:
            replica = alert["key"].split("/")[0].replace("-", " ")
            assert replica in alert["action"], (alert["key"], alert["action"])
    finally:
        d.stop()


def test_a_stage_hung_inside_a_store_transaction_is_still_restarted(tmp_path):
    d = Daemon(tmp_path, "[rules]\nheartbeat_timeout_s = 2.0\n[actions]\nbackoff_initial_s = 0.2\nterm_grace_s = 1.0\n")
    victim = None
    try:
        assert d.wait_notify("READY=1", 120), d.log_path.read_text()[-3000:]
        victim = psutil.Process(d.stage_pid("encode"))
        assert victim.ppid() == d.proc.pid
        # The lock a stage SIGSTOPped inside store.renew() would hold: the same SQLite write lock.
        held = sqlite3.connect(d.state / "jobs.sqlite3", isolation_level=None, timeout=1)
        held.execute("BEGIN IMMEDIATE")
        try:
            victim.suspend()
            fired = wait_for(lambda: d.alerts("worker_hung"), 15)
            gone = not outliving([victim], 8)
        finally:
            held.execute("ROLLBACK")
            held.close()
        assert fired, [(r.get("event"), r.get("error")) for r in d.records() if r.get("event") == "tick_failed"][:3]
        assert gone, "the hung stage was not stopped"
    finally:
        if victim is not None and alive(victim):  # a process of the daemon this test started
            victim.kill()
        d.stop()
