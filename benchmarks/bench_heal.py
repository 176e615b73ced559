"""Healing at the scale of the fault, and the cost of an idle tick, this tree vs a baseline commit.

Correlated hang: a daemon with N CPU replicas (heartbeat_timeout_s 3, term_grace_s 5, interval
0.5 s, WatchdogSec 4 s) is ready; every generate stage is SIGSTOPped at the same moment (one
driver hangs every GPU). Measured: seconds until /readyz answers 200 again with every replica in
a new incarnation, the longest gap between WATCHDOG=1 pings, and how often /healthz was not 200
(polled every 0.1 s). Expected: bounded by heartbeat timeout + term grace + start time + 2 ticks,
the gap near the ping interval, /healthz always 200. The start time of N replicas (each imports
ONNX Runtime and opens its sessions) grows with N on 2 cores; "cold start s", the daemon's own
start to all ready, measures that term in the same run.

Idle tick: the daemon in-process (interval 0.1 s), ready, its scheduler paused; `tick()` called K
times, one interval apart; thread CPU time and wall time per tick (embedded, one CPU replica;
external, a 50-process tree). The share of a core is given at the default 2 s interval.

Both run against this tree and against `--baseline REV` (checked out with `git worktree` into a
temporary folder), side by side in one run, since the machines are shared and noisy.

    .venv/bin/python benchmarks/bench_heal.py [--replicas 1 3 6] [--baseline 60f8599] [--ticks 200]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.support.daemon_helpers import Daemon, wait_for  # noqa: E402
from watchdog.procs import ProcRef, send  # noqa: E402

HEARTBEAT_S, GRACE_S, INTERVAL_S, WATCHDOG_S = 3.0, 5.0, 0.5, 4.0
CONFIG = (f"[rules]\nheartbeat_timeout_s = {HEARTBEAT_S}\n[actions]\nterm_grace_s = {GRACE_S}\n"
          "backoff_initial_s = 0.2\nbackoff_max_s = 0.2\ncrash_loop_restarts = 100\n"
          "[pipeline]\ncpu_replicas = {n}\ncpu_threads = 1\n")

# Runs inside the tree under test (cwd), so the same program measures old and new code.
TICK_PROGRAM = r'''
import json, os, sys, tempfile, time
from pathlib import Path
from watchdog.config import parse
from watchdog.daemon import Daemon
mode, ticks = sys.argv[1], int(sys.argv[2])
state = Path(tempfile.mkdtemp())
keys = {"state_dir": str(state), "http_port": 0, "interval_s": 0.1}
if mode == "external":
    keys.update(mode="external", command=[sys.executable, "-c",
        "import os, time\nfor _ in range(49):\n    if os.fork() == 0:\n        time.sleep(600); os._exit(0)\ntime.sleep(600)"])
d = Daemon(parse({"daemon": keys}))
d.start()
d.scheduler.pause()
deadline = time.monotonic() + 120
while not d.readiness()[0] and time.monotonic() < deadline:
    d.tick(); time.sleep(0.2)
for _ in range(5):
    d.tick()
cpu, wall = [], []
for _ in range(ticks):  # spaced by the interval, as the scheduler would
    time.sleep(0.1)
    c0, w0 = time.thread_time(), time.perf_counter()
    d.tick()
    cpu.append(time.thread_time() - c0); wall.append(time.perf_counter() - w0)
d.shutdown()
print(json.dumps({"cpu": cpu, "wall": wall}))
'''


def tick_cost(root: Path, mode: str, ticks: int) -> dict:
    out = subprocess.run([sys.executable, "-c", TICK_PROGRAM, mode, str(ticks)], cwd=root, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
    if out.returncode != 0:
        raise RuntimeError(f"tick cost ({root}, {mode}) failed:\n{out.stderr[-2000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return {"cpu_ms": statistics.median(data["cpu"]) * 1000, "wall_ms": statistics.median(data["wall"]) * 1000}


class Poller(threading.Thread):
    """GET /healthz every 0.1 s; counts answers that were not 200."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.total, self.bad, self.running = url + "/healthz", 0, 0, True

    def run(self) -> None:
        while self.running:
            try:
                with urllib.request.urlopen(self.url, timeout=2) as resp:
                    ok = resp.status == 200
            except Exception:
                ok = False
            self.total += 1
            self.bad += not ok
            time.sleep(0.1)


def correlated_hang(root: Path, n: int, tmp: Path) -> dict:
    began = time.monotonic()
    d = Daemon(tmp, CONFIG.format(n=n), watchdog_usec=int(WATCHDOG_S * 1e6), root=root,
               input_roots=())
    try:
        assert d.wait_notify("READY=1", 180), d.log_path.read_text()[-3000:]
        snap = wait_for(lambda: (s := d.snapshot()) and len(s["replicas"]) == n and all(r["ready"] for r in s["replicas"]) and s, 120)
        cold_start = time.monotonic() - began  # the start-time term of the bound, on this machine now
        generations = {r["index"]: r["generation"] for r in snap["replicas"]}
        refs = [ProcRef.of(r["pids"]["generate"]) for r in snap["replicas"]]
        poller = Poller(d.url())
        poller.start()
        d.read_notify()
        hung_at = time.monotonic()
        for ref in refs:  # every process signalled is a stage this benchmark's daemon started
            send(ref, signal.SIGSTOP)

        def healed():
            d.read_notify()
            s = d.snapshot()
            return (s and all(r["generation"] > generations[r["index"]] and r["ready"] for r in s["replicas"])
                    and d.http("/readyz")[0] == 200)

        ok = wait_for(healed, 300, every_s=0.05)
        took = time.monotonic() - hung_at
        poller.running = False
        poller.join(5)
        pings = [t for t, m in d.messages if m == "WATCHDOG=1" and t >= hung_at - WATCHDOG_S]
        gaps = [b - a for a, b in zip(pings, pings[1:])] + ([time.monotonic() - pings[-1]] if pings else [])
        for ref in refs:
            send(ref, signal.SIGCONT)  # a survivor, if any, may die normally
        return {"healed": bool(ok), "seconds": took, "cold_start_s": cold_start, "max_gap_s": max(gaps) if gaps else float("inf"),
                "healthz_bad": poller.bad, "healthz_total": poller.total}
    finally:
        d.stop(60)


def idle_cpu(root: Path, tmp: Path, seconds: float) -> float:
    """% of a core the whole daemon process (every thread, not its workers) uses while idle, at
    the default 2 s interval: ticks, the main loop's wake-ups, the HTTP accept loop."""
    import psutil

    d = Daemon(tmp, "", root=root, input_roots=(), interval_s=2.0)
    try:
        assert d.wait_notify("READY=1", 180), d.log_path.read_text()[-3000:]
        time.sleep(4.0)  # let start-up work settle
        proc = psutil.Process(d.proc.pid)
        t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
        time.sleep(seconds)
        return (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0) * 100
    finally:
        d.stop(60)


def worktree(rev: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="heygem-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--baseline", default=None, help="git revision to measure side by side (e.g. 60f8599)")
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--idle-s", type=float, default=30.0, help="seconds of idle daemon measured per tree")
    parser.add_argument("--skip-ticks", action="store_true")
    args = parser.parse_args()
    trees = {"this tree": ROOT}
    base = worktree(args.baseline) if args.baseline else None
    if base:
        trees[f"baseline {args.baseline}"] = base
    try:
        from rich.console import Console
        from rich.table import Table

        hang = Table(title=f"correlated hang: every generate SIGSTOPped (heartbeat {HEARTBEAT_S:g} s, grace {GRACE_S:g} s, "
                           f"tick {INTERVAL_S:g} s, WatchdogSec {WATCHDOG_S:g} s)", title_justify="left")
        for col in ("tree", "replicas", "all ready after s", "cold start s", "longest WATCHDOG=1 gap s", "/healthz not 200"):
            hang.add_column(col, justify="right" if col != "tree" else "left")
        for n in args.replicas:
            for label, root in trees.items():
                with tempfile.TemporaryDirectory() as tmp:
                    r = correlated_hang(root, n, Path(tmp))
                hang.add_row(label, str(n), f"{r['seconds']:.1f}" + ("" if r["healed"] else " (not healed)"),
                             f"{r['cold_start_s']:.1f}", f"{r['max_gap_s']:.1f}", f"{r['healthz_bad']} of {r['healthz_total']}")
        console = Console(width=140)
        console.print(hang)
        if not args.skip_ticks:
            ticks = Table(title=f"idle tick, median of {args.ticks}", title_justify="left")
            for col in ("tree", "mode", "CPU ms/tick", "wall ms/tick", f"% of a core at {2.0:g} s interval"):
                ticks.add_column(col, justify="right" if col not in ("tree", "mode") else "left")
            for mode in ("embedded", "external"):
                for label, root in trees.items():
                    c = tick_cost(root, mode, args.ticks)
                    ticks.add_row(label, mode, f"{c['cpu_ms']:.2f}", f"{c['wall_ms']:.2f}", f"{c['cpu_ms'] / 2000 * 100:.2f}")
            console.print(ticks)
            idle = Table(title=f"idle daemon process (embedded, 1 CPU replica, interval 2 s), {args.idle_s:g} s", title_justify="left")
            for col in ("tree", "% of a core"):
                idle.add_column(col, justify="right" if col != "tree" else "left")
            for label, root in trees.items():
                with tempfile.TemporaryDirectory() as tmp:
                    idle.add_row(label, f"{idle_cpu(root, Path(tmp), args.idle_s):.2f}")
            console.print(idle)
    finally:
        if base:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)


if __name__ == "__main__":
    main()
