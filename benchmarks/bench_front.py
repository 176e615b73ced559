"""The daemon in front of upstream's API (watchdog.front) vs upstream directly, side by side in one run.

Two stand-in upstreams (benchmarks/support/standin_upstream.py, the same program and settings):
one supervised by a daemon with `[daemon] upstream_url` (external mode, tick 0.5 s, follower
every 0.2 s), one alone. Measured:

- Latency, as the desktop client sees it (a new connection per request, as its HTTP client
  makes them): `POST /easy/submit` and `GET /easy/query` of a waiting task, alternating between
  the front and the lone upstream, R requests each; medians and 95th percentiles. Target: the
  front adds under 5 ms at the median. Its submit commits the task to the job store (SQLite WAL,
  synchronous=FULL: an fsync) before it answers; its query is one store read. Tasks the latency
  run left are cancelled (`heygem-ops cancel`) before the next part.
- Hang to running again: W warm-up tasks teach the daemon this host's pace; then, H times, the
  stand-in is told to hang mid-task (its API keeps answering, progress frozen) and the seconds
  from the hang (the stand-in's own event) to the same task starting again in upstream's next
  incarnation are measured. Target: the learned deadline + upstream's restart time (TERM of the
  old one to the new one listening, from the same run's log and events) + 2 ticks.

    .venv/bin/python benchmarks/bench_front.py [--requests 300] [--hangs 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.support import standin_upstream  # noqa: E402
from benchmarks.support.standin_upstream import write_wav  # noqa: E402
from benchmarks.support.daemon_helpers import Daemon, wait_for  # noqa: E402

STANDIN = Path(standin_upstream.__file__)
TICK_S, POLL_S, FLOOR_S, MARGIN = 0.5, 0.2, 2.0, 3.0
PER_AUDIO_S, BASE_S, STARTUP_S = 0.5, 0.1, 1.0  # a 2 s speech takes 1.1 s; a (re)start takes 1 s before listening


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[float, dict]:
    """(seconds, answer) of one request on a new connection."""
    raw = None if body is None else json.dumps(body).encode()
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=raw, headers={"Content-Type": "application/json"} if raw else {})
        answer = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return time.perf_counter() - began, answer


def standin_command(port: int, data: Path, control: Path, log: Path) -> list[str]:
    return [sys.executable, str(STANDIN), "--port", str(port), "--data", str(data), "--control", str(control), "--log",
            str(log), "--per-audio-s", str(PER_AUDIO_S), "--base-s", str(BASE_S), "--startup-s", str(STARTUP_S)]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def latency(front_port: int, direct_port: int, n: int) -> dict:
    task = {"audio_url": "speech.wav", "video_url": "template.mp4", "chaofen": 0, "watermark_switch": 0, "pn": 1}
    out = {("submit", "front"): [], ("submit", "direct"): [], ("query", "front"): [], ("query", "direct"): []}
    for i in range(n):
        for where, port in (("front", front_port), ("direct", direct_port)) if i % 2 else (("direct", direct_port), ("front", front_port)):
            took, answer = call(port, "POST", "/easy/submit", {**task, "code": f"lat-{where}-{i}"})
            assert answer["code"] == 10000, answer
            out[("submit", where)].append(took)
    for i in range(n):  # tasks still waiting at either end (the newer half): status 1, from memory / the store
        code = n - 1 - i % max(1, n // 2)
        for where, port in (("front", front_port), ("direct", direct_port)) if i % 2 else (("direct", direct_port), ("front", front_port)):
            took, answer = call(port, "GET", f"/easy/query?code=lat-{where}-{code}")
            assert answer["code"] == 10000 and answer["data"]["status"] == 1, answer
            out[("query", where)].append(took)
    return out


def events(control: Path) -> list[list[str]]:
    path = control / "events.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def log_time(record: dict) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def hang_to_running(d: Daemon, port: int, control: Path, warmup: int, hangs: int) -> list[dict]:
    def submit(code: str) -> None:
        status, answer = d.http("/easy/submit", {"audio_url": "speech.wav", "video_url": "template.mp4", "code": code,
                                                 "chaofen": 0, "watermark_switch": 0, "pn": 1})
        assert answer["code"] == 10000, answer

    def done(code: str) -> bool:
        return d.http(f"/easy/query?code={code}")[1]["data"]["status"] == 2

    for i in range(warmup):
        submit(f"warm-{i}")
    assert wait_for(lambda: done(f"warm-{warmup - 1}"), 120), d.log_path.read_text()[-3000:]
    rows = []
    for k in range(hangs):
        snap = wait_for(lambda: (s := d.snapshot()) and s["front"]["pace"]["samples"] >= warmup + k and s, 30)
        pace = snap["front"]["pace"]
        deadline = max(FLOOR_S, MARGIN * pace["s_per_audio_second"] * 2.0)  # the task's 2 s of speech
        (control / "hang").write_text("")
        code = f"hang-{k}"
        submit(code)
        assert wait_for(lambda: done(code), 120), d.log_path.read_text()[-3000:]
        lines = events(control)
        hung = next(line for line in lines if line[1] == "hang" and line[2] == code)
        again = next(line for line in lines if line[1] == "start" and line[2] == code and line[3] != hung[3])
        listening = next(line for line in lines if line[1] == "listening" and line[3] == again[3])
        stopping = [r for r in d.records() if r.get("event") == "external_stopping" and log_time(r) >= float(hung[0])]
        restart_s = float(listening[0]) - log_time(stopping[0])
        seconds = float(again[0]) - float(hung[0])
        target = deadline + restart_s + 2 * TICK_S
        rows.append({"hang": k + 1, "seconds": seconds, "deadline_s": deadline, "restart_s": restart_s, "target_s": target,
                     "why": stopping[0].get("why"), "s_per_audio_second": pace["s_per_audio_second"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="submits and queries per side")
    parser.add_argument("--hangs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="tasks that teach the pace before the first hang")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, control, direct_control = tmp / "data", tmp / "control", tmp / "direct-control"
        data.mkdir()
        write_wav(data / "speech.wav", 2.0)
        (data / "template.mp4").write_bytes(b"template")
        port, direct_port = free_port(), free_port()
        # the lone upstream: the same program; its tasks wait behind a long one so queries find them waiting
        direct = subprocess.Popen(standin_command(direct_port, data, direct_control, tmp / "direct.log"))
        (tmp / "daemon").mkdir()
        d = Daemon(tmp / "daemon", "[actions]\nterm_grace_s = 1.0\nbackoff_initial_s = 0.2\nbackoff_max_s = 0.5\n"
                   "crash_loop_restarts = 100\n",
                   daemon_keys=f'mode = "external"\ncommand = {json.dumps(standin_command(port, data, control, tmp / "dh.log"))}\n'
                               f'data_dir = "{data}"\nupstream_url = "http://127.0.0.1:{port}"\nupstream_poll_s = {POLL_S}\n'
                               f'upstream_timeout_s = 1.0\nupstream_stall_floor_s = {FLOOR_S}\nupstream_stall_margin = {MARGIN}\n',
                   input_roots=())
        try:
            assert d.wait_notify("READY=1", 120), d.log_path.read_text()[-3000:]
            front_port = int(d.url().rsplit(":", 1)[1])
            assert wait_for(lambda: (control / "events.log").exists() and (direct_control / "events.log").exists(), 30)
            wait_for(lambda: " listening " in (direct_control / "events.log").read_text(), 30)
            lat = latency(front_port, direct_port, args.requests)
            # what the latency run queued behind upstream is cancelled (`heygem-ops cancel`), not waited for
            from heygem.jobs import JobStore
            from watchdog.state import StatePaths

            store = JobStore(StatePaths(d.state).store)
            for job in store.list("queued", 1 << 30):
                store.cancel(job.id)
            wait_for(lambda: not d.snapshot()["front"]["held"], 30)
            rows = hang_to_running(d, port, control, args.warmup, args.hangs)
        finally:
            direct.terminate()  # the lone stand-in this benchmark started
            direct.wait(10)
            d.stop(60)

    console = Console(width=130)
    table = Table(title=f"latency as the client sees it, ms ({args.requests} each, new connection per request; "
                        "front: store first, then answer)", title_justify="left")
    for col in ("request", "direct p50", "front p50", "added p50", "direct p95", "front p95", "target"):
        table.add_column(col, justify="left" if col == "request" else "right")
    for kind in ("submit", "query"):
        f, u = [x * 1000 for x in lat[(kind, "front")]], [x * 1000 for x in lat[(kind, "direct")]]
        added = statistics.median(f) - statistics.median(u)
        table.add_row(kind, f"{statistics.median(u):.2f}", f"{statistics.median(f):.2f}", f"{added:+.2f}",
                      f"{pct(u, 0.95):.2f}", f"{pct(f, 0.95):.2f}", "ok (< 5 ms added)" if added < 5 else "MISSED (>= 5 ms)")
    console.print(table)
    hang = Table(title=f"hang mid-task -> the same task running again in upstream's next incarnation (tick {TICK_S:g} s, "
                       f"follower {POLL_S:g} s, floor {FLOOR_S:g} s, margin {MARGIN:g}, 2 s of speech)", title_justify="left")
    for col in ("hang", "seconds", "learned s/s audio", "deadline s", "restart s", "target s", ""):
        hang.add_column(col, justify="right")
    for r in rows:
        hang.add_row(str(r["hang"]), f"{r['seconds']:.2f}", f"{r['s_per_audio_second']:.3f}", f"{r['deadline_s']:.2f}",
                     f"{r['restart_s']:.2f}", f"{r['target_s']:.2f}", "ok" if r["seconds"] <= r["target_s"] else "MISSED")
    console.print(hang)


if __name__ == "__main__":
    main()
