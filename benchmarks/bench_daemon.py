"""The daemon's own cost and its reaction times, measured on real daemons in one run.

- Cost: CPU seconds of the daemon process (all its threads, not its children) per tick, tick
  duration (snapshot `tick_s` and the heygem_tick_duration_seconds histogram), RSS and USS. In
  external mode the supervised script keeps a 50-process tree so the process probes have work; in
  embedded mode one CPU replica idles, then processes demo jobs.
- Zombie to reaped: the supervised script forks a child that forks a grandchild and exits; the
  grandchild, re-parented to the daemon (the subreaper), writes time.time() and exits. Latency is
  the daemon's `reaped` log timestamp for that pid minus that stamp.
- Hang to restart: SIGSTOP a stage; time to the `worker_hung` alert and to `replica_restarted`,
  both minus heartbeat_timeout_s (the last heartbeat came before the stop, so the alert may come
  a little before the timeout). A stopped stage ignores TERM: its restart also waits
  term_grace_s and the replica's TERM wait before KILL. Kill to restart: SIGKILL a stage; time to
  `worker_dead` and to `replica_restarted`. Also the time until /readyz answers 200 again.

Every process is one this benchmark's daemons started, signalled through a pid + create-time ref.

    .venv/bin/python benchmarks/bench_daemon.py [--windows 5] [--window-s 4] [--orphans 20] [--faults 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.support.daemon_helpers import Daemon, wait_for  # noqa: E402
from heygem import assets  # noqa: E402
from watchdog.procs import ProcRef, send  # noqa: E402

TREE = 50  # processes in the external command's tree, itself included
HEARTBEAT_TIMEOUT_S = 2.0
INTERVAL_S = 0.5  # what benchmarks.support.daemon_helpers configures
EMBEDDED_CONFIG = (f"[rules]\nheartbeat_timeout_s = {HEARTBEAT_TIMEOUT_S}\n[actions]\nbackoff_initial_s = 0.2\n"
                   "backoff_max_s = 0.2\nterm_grace_s = 1.0\ncrash_loop_restarts = 100\n")
READY_TIMEOUT_S = 120

# The supervised command of external mode. argv: CHILDREN GRANDCHILDREN_EACH STAMPS GO_FILE.
# Sleepers exit when their parent is gone (they are re-parented to the daemon) or after 15 min.
# Once GO_FILE exists it makes an orphan every 0.5 s: a child that forks a grandchild and exits
# (reaped here), and the grandchild, once re-parented, stamps its exit time and exits.
EXTERNAL_APP = r'''
import os, sys, time

children, each, stamps, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]


def sleeper(kids):
    parent = os.getppid()
    for _ in range(kids):
        if os.fork() == 0:
            sleeper(0)
    deadline = time.monotonic() + 900
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.5)
    os._exit(0)


def orphan():
    pid = os.fork()
    if pid == 0:
        me = os.getpid()
        if os.fork() == 0:
            while os.getppid() == me:
                time.sleep(0.001)
            with open(stamps, "a") as f:
                f.write(f"{os.getpid()} {time.time()!r}\n")
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)


for _ in range(children):
    if os.fork() == 0:
        sleeper(each)
print("tree started", flush=True)
while True:
    time.sleep(0.5)
    if os.path.exists(go):
        orphan()
'''


# ---- reading the daemon ---------------------------------------------------------------------------
def _stamp(record: dict) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def _events(d: Daemon, event: str, alert: Optional[str] = None) -> list[dict]:
    """Log records of `event`; for alerts (event "alert"), the firing events of `alert`."""
    return [r for r in d.records() if r.get("event") == event
            and (alert is None or (r.get("alert"), r.get("state")) == (alert, "firing"))]


def _snapshot(d: Daemon) -> dict:
    """The latest snapshot.json (the daemon replaces it each tick)."""
    snap = wait_for(d.snapshot, 10, 0.02)
    assert snap, f"no snapshot; log:\n{d.log_path.read_text()[-3000:]}"
    return snap


def _tick_histogram(d: Daemon) -> tuple[float, float]:
    """(sum, count) of heygem_tick_duration_seconds from /metrics."""
    status, text = d.http("/metrics")
    assert status == 200, text
    family = {f.name: f for f in text_string_to_metric_families(text)}["heygem_tick_duration_seconds"]
    values = {s.name: s.value for s in family.samples}
    return values["heygem_tick_duration_seconds_sum"], values["heygem_tick_duration_seconds_count"]


class NotifyReader:
    """Reads the notify socket as systemd does, from READY=1 until stopped. Left unread, the socket
    fills up and every STATUS= send of the tick blocks for the notifier's 1 s timeout."""

    def __init__(self, d: Daemon, timeout_s: float = READY_TIMEOUT_S):
        assert d.wait_notify("READY=1", timeout_s), f"daemon not ready; log:\n{d.log_path.read_text()[-3000:]}"
        self.d, self.done = d, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            self.d.read_notify()  # blocks at most the helper's 0.2 s socket timeout

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=2)


def cost(d: Daemon, windows: int, window_s: float, busy: Callable[[], bool] = lambda: True) -> dict[str, list[float]]:
    """Per window: daemon CPU ms per tick, CPU % of one core, mean tick ms (histogram), tick_s values
    seen in the snapshot; then RSS/USS. A window in which `busy()` was false at more than a fifth of
    the polls is dropped (a job hand-over can leave the snapshot between jobs for a tick)."""
    proc = psutil.Process(d.proc.pid)
    out: dict[str, list[float]] = {"cpu_ms_per_tick": [], "cpu_pct": [], "hist_tick_ms": [], "snapshot_tick_ms": []}
    for _ in range(windows):
        cpu0, wall0, tick0, (sum0, count0) = sum(proc.cpu_times()[:2]), time.monotonic(), _snapshot(d)["tick"], _tick_histogram(d)
        seen: dict[int, float] = {}
        polls = busy_polls = 0
        while time.monotonic() - wall0 < window_s:
            snap = _snapshot(d)
            seen[snap["tick"]] = snap["tick_s"]
            polls, busy_polls = polls + 1, busy_polls + bool(busy())
            time.sleep(0.2)
        cpu1, wall1, tick1, (sum1, count1) = sum(proc.cpu_times()[:2]), time.monotonic(), _snapshot(d)["tick"], _tick_histogram(d)
        if busy_polls < 0.8 * polls or tick1 <= tick0:
            continue
        out["cpu_ms_per_tick"].append((cpu1 - cpu0) / (tick1 - tick0) * 1000)
        out["cpu_pct"].append((cpu1 - cpu0) / (wall1 - wall0) * 100)
        out["hist_tick_ms"].append((sum1 - sum0) / (count1 - count0) * 1000)
        out["snapshot_tick_ms"] += [s * 1000 for s in seen.values()]
    assert out["cpu_ms_per_tick"], "no window was measured in a steady state"
    mem = proc.memory_full_info()
    out["rss_mib"], out["uss_mib"] = [mem.rss / 2**20], [mem.uss / 2**20]
    return out


def _signal_stage(d: Daemon, stage: str, sig: int) -> tuple[int, float]:
    """Signal one of this daemon's stage processes, verified by pid and create time; (pid, when)."""
    pid = d.stage_pid(stage)
    assert pid in d.descendants(), f"stage {stage} pid {pid} is not a child of our daemon"
    ref = ProcRef.of(pid)
    when = time.time()
    assert send(ref, sig), f"stage {stage} pid {pid} vanished"
    return pid, when


def faults(d: Daemon, sig: int, alert: str, times: int, stages: list[str]) -> dict[str, list[float]]:
    """Inject `sig` into a stage `times` times (rotating stages); seconds until the alert, the
    restart and readiness, each from the moment of the signal. Readiness is seen right after a
    tick, so a random pause spreads the faults over the tick interval as real ones fall."""
    out: dict[str, list[float]] = {"alert": [], "restarted": [], "ready": []}
    rng = random.Random(sig)
    for i in range(times):
        fired, restarted = len(_events(d, "alert", alert)), len(_events(d, "replica_restarted"))
        time.sleep(rng.uniform(0, INTERVAL_S))
        pid, when = _signal_stage(d, stages[i % len(stages)], sig)
        got_alert = wait_for(lambda: (a := _events(d, "alert", alert)) and len(a) > fired and a[-1], 30)
        got_restart = wait_for(lambda: (r := _events(d, "replica_restarted")) and len(r) > restarted and r[-1], 30)
        assert got_alert and got_restart, f"no {alert} / restart after {signal.Signals(sig).name}; log:\n{d.log_path.read_text()[-3000:]}"
        back = wait_for(lambda: d.http("/readyz")[0] == 200 and pid not in _snapshot(d)["replicas"][0]["pids"].values(), 60, 0.05)
        assert back, "replica did not become ready again"
        out["alert"].append(_stamp(got_alert) - when)
        out["restarted"].append(_stamp(got_restart) - when)
        out["ready"].append(time.time() - when)
    return out


# ---- scenarios ----------------------------------------------------------------------------------
def external(tmp: Path, args, rows: list) -> None:
    app, stamps, go = tmp / "app.py", tmp / "stamps.txt", tmp / "go"
    app.write_text(EXTERNAL_APP)
    children = 7
    each = (TREE - 1 - children) // children  # 7 children x 6 grandchildren + the script = 50
    command = json.dumps([sys.executable, str(app), str(children), str(each), str(stamps), str(go)])
    d = Daemon(tmp, daemon_keys=f'mode = "external"\ncommand = {command}\n')
    reader = None
    try:
        reader = NotifyReader(d)
        tree = wait_for(lambda: (s := _snapshot(d))["external"] and s["external"]["processes"] >= TREE and s, 60)
        assert tree, _snapshot(d)
        _cost_rows(rows, f"external, {tree['external']['processes']}-process tree, idle", cost(d, args.windows, args.window_s))
        go.touch()
        matched = wait_for(lambda: (m := _reap_latencies(d, stamps)) and len(m) >= args.orphans and m, args.orphans * 0.5 + 30, 0.5)
        go.unlink()
        assert matched, f"orphans not reaped; stamps {stamps.read_text() if stamps.exists() else ''}"
        rows.append(("orphan exit -> daemon's `reaped` log line", matched, "ms"))
    finally:
        _stop(d, reader)


def _reap_latencies(d: Daemon, stamps: Path) -> list[float]:
    if not stamps.exists():
        return []
    exited = {int(pid): float(t) for pid, t in (line.split() for line in stamps.read_text().splitlines() if line.count(" ") == 1)}
    return [(_stamp(r) - exited[r["pid"]]) * 1000 for r in _events(d, "reaped") if r["pid"] in exited]


def embedded(tmp: Path, args, rows: list) -> None:
    media = tmp / "media"
    media.mkdir()
    template = assets.make_template_video(media / "template.mp4", seconds=2.0)
    audio = assets.make_speech_audio(media / "speech.wav", seconds=4.0)
    d = Daemon(tmp, EMBEDDED_CONFIG)
    reader = None
    try:
        reader = NotifyReader(d)
        _cost_rows(rows, "embedded, 1 CPU replica, idle", cost(d, args.windows, args.window_s))
        feeder = Feeder(d, audio, template)
        assert wait_for(feeder.busy, 60), "no job started"
        _cost_rows(rows, "embedded, 1 CPU replica, processing jobs", cost(d, args.windows, args.window_s, feeder.busy))
        idle = wait_for(lambda: (j := _snapshot(d)["jobs"]) and not j["queued"] and not j["running"], 180, 0.5)
        assert idle, _snapshot(d)["jobs"]
        stages = sorted(_snapshot(d)["replicas"][0]["pids"])
        hung = faults(d, signal.SIGSTOP, "worker_hung", args.faults, stages)
        rows.append((f"SIGSTOP stage -> worker_hung alert, minus timeout {HEARTBEAT_TIMEOUT_S:g} s",
                     [(s - HEARTBEAT_TIMEOUT_S) * 1000 for s in hung["alert"]], "ms"))
        rows.append(("SIGSTOP stage -> replica_restarted, minus timeout", [(s - HEARTBEAT_TIMEOUT_S) * 1000 for s in hung["restarted"]], "ms"))
        rows.append(("SIGSTOP stage -> /readyz 200 again, minus timeout", [(s - HEARTBEAT_TIMEOUT_S) * 1000 for s in hung["ready"]], "ms"))
        dead = faults(d, signal.SIGKILL, "worker_dead", args.faults, stages)
        rows.append(("SIGKILL stage -> worker_dead alert", [s * 1000 for s in dead["alert"]], "ms"))
        rows.append(("SIGKILL stage -> replica_restarted", [s * 1000 for s in dead["restarted"]], "ms"))
        rows.append(("SIGKILL stage -> /readyz 200 again", [s * 1000 for s in dead["ready"]], "ms"))
    finally:
        _stop(d, reader)


class Feeder:
    """Keeps one job queued behind the running one, so the replica never idles while measured."""

    def __init__(self, d: Daemon, audio: Path, template: Path):
        self.d, self.audio, self.template, self.sent = d, audio, template, 0

    def busy(self) -> bool:
        jobs = _snapshot(self.d)["jobs"]
        if not jobs["queued"]:
            status, body = self.d.http("/easy/submit", {"audio_url": str(self.audio), "video_url": str(self.template),
                                                        "code": f"busy-{self.sent}"})
            assert status == 200 and body["code"] == 10000, body
            self.sent += 1
        return jobs["running"] > 0


def _cost_rows(rows: list, label: str, c: dict[str, list[float]]) -> None:
    rows.append((f"{label}: daemon CPU per tick", c["cpu_ms_per_tick"], "ms"))
    rows.append((f"{label}: daemon CPU, % of one core", c["cpu_pct"], "%"))
    rows.append((f"{label}: tick duration (histogram mean)", c["hist_tick_ms"], "ms"))
    rows.append((f"{label}: tick duration (snapshot tick_s)", c["snapshot_tick_ms"], "ms"))
    rows.append((f"{label}: RSS", c["rss_mib"], "MiB"))
    rows.append((f"{label}: USS", c["uss_mib"], "MiB"))


# ---- owning the daemons -------------------------------------------------------------------------
def _stop(d: Daemon, reader: Optional[NotifyReader]) -> None:
    """SIGTERM (the helper KILLs after 30 s), then KILL whatever of its tree outlived it."""
    if reader is not None:
        reader.stop()
    tree = []
    for pid in d.descendants():
        try:
            tree.append(ProcRef.of(pid))
        except psutil.NoSuchProcess:
            continue
    d.stop()
    for ref in tree:
        try:
            if psutil.Process(ref.pid).status() != psutil.STATUS_ZOMBIE:
                send(ref, signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=5, help="cost windows per setting")
    parser.add_argument("--window-s", type=float, default=4.0)
    parser.add_argument("--orphans", type=int, default=20)
    parser.add_argument("--faults", type=int, default=5, help="SIGSTOPs and SIGKILLs each")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    rows: list[tuple[str, list[float], str]] = []
    began = time.monotonic()
    try:
        (scratch / "external").mkdir()
        external(scratch / "external", args, rows)
        (scratch / "embedded").mkdir()
        embedded(scratch / "embedded", args, rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"interval_s = {INTERVAL_S:g}, {psutil.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"{time.monotonic() - began:.0f} s in all")
    print("embedded config: " + EMBEDDED_CONFIG.replace("\n", " ").strip())
    print(f"{'what':72} {'median':>9} {'max':>9} {'n':>4}")
    for what, values, unit in rows:
        print(f"{what:72} {statistics.median(values):9.1f} {max(values):9.1f} {len(values):4} {unit}")
    print(f"\ncommand: .venv/bin/python benchmarks/bench_daemon.py --windows {args.windows} --window-s {args.window_s:g} "
          f"--orphans {args.orphans} --faults {args.faults}")


if __name__ == "__main__":
    main()
