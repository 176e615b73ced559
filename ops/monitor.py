"""`heygem-ops monitor`: one live screen instead of the runbook's three `watch -n 1` loops.

The runbook watched `nvidia-smi`, `ps aux | grep defunct | wc -l` and `tail -f dh.log | grep 队列`
side by side. All of that is already in the daemon's snapshot.json (rewritten every tick), so the
screen reads that file and the job store: no HTTP, no NVML session, no process scan of its own,
and it keeps working while the daemon's HTTP server is busy. The snapshot is only trusted when it
was written by the daemon the pidfile names, and that daemon is alive: a snapshot left behind by a
dead daemon would show a healthy service that no longer exists.

This module also holds the views that `heygem-ops status` prints (replicas, stages, alerts, jobs),
so both commands read the snapshot the same way. Redraw is in place with rich's Live, without the
alternate screen, so it works over plain SSH and leaves the last frame in the scrollback.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import click

from ops.context import age

STALE_TICKS = 3
BAR_WIDTH = 20
STATE_STYLE = {"idle": "green", "busy": "cyan", "backpressure": "yellow", "starting": "yellow",
               "stopped": "red", "failed": "red", "absent": "red", "dead": "red"}
SEVERITY_STYLE = {"critical": "red", "warning": "yellow", "info": "cyan"}


@dataclass(frozen=True)
class Look:
    """What the state directory says right now: the recorded daemon and its last snapshot."""

    record: Optional[object]  # watchdog.state.DaemonRecord
    alive: bool
    snapshot: Optional[dict]  # only the live daemon's own snapshot
    age_s: Optional[float]
    stale: bool  # older than STALE_TICKS ticks: the daemon's loop is wedged


def look(paths, interval_s: float, now: float) -> Look:
    from watchdog.state import read_json, read_pidfile

    record = read_pidfile(paths)
    alive = record is not None and record.alive()
    snap = read_json(paths.snapshot) if alive else None
    if snap is not None and snap.get("pid") != record.pid:
        snap = None  # written by an earlier daemon
    age_s = None if snap is None else max(0.0, now - snap["time"])
    stale = age_s is not None and age_s > STALE_TICKS * interval_s + snap.get("tick_s", 0.0)
    return Look(record, alive, snap, age_s, stale)


# ---- rows: plain dicts, shared by the tables here and `status --json` --------------------------

def replica_rows(snap: dict, now: float) -> list[dict]:
    """Per replica: providers asked for vs running on (the daemon's own cpu_fallback rule decides
    which is a fallback), readiness, restarts, and why it is out of service if it is."""
    from watchdog.alerts import cpu_fallback
    from watchdog.probes import provider_views

    views = {v.replica: v for v in provider_views(snap)}
    fell_back = {c.key for c in cpu_fallback(list(views.values())) if c.active}
    rows = []
    for r in snap.get("replicas", []):
        i = r["index"]
        view = views.get(i)
        unit = snap.get("units", {}).get(f"replica-{i}", {})
        rows.append({
            "replica": i, "device": r["device"], "generation": r["generation"], "ready": r["ready"],
            "requested": list(view.requested) if view else [], "active": list(view.active) if view else [],
            "cpu_fallback": f"replica-{i}" in fell_back, "fallback_reason": view.reason if view else None,
            "missing_libraries": sorted({lib for s in r["sessions"].values() for lib in s.get("missing_libraries", [])}),
            "restarts": snap.get("restarts", {}).get(f"replica-{i}", 0),
            "since_start_s": round(now - r["started_at"], 1) if r.get("started_at") else None,
            "state": unit.get("state"), "problem": unit.get("detail") if unit.get("state") not in (None, "running") else None,
            "dead": r["dead"], "fatal": r["fatal"],
        })
    return rows


def stage_rows(snap: dict, now: float) -> list[dict]:
    """Per (replica, stage): board state, heartbeat age, items, and its input queue's depth."""
    from watchdog.probes import INPUT_OF

    replicas = {r["index"]: r for r in snap.get("replicas", [])}
    rows = []
    for s in snap.get("stages", []):
        replica = replicas.get(s["replica"], {})
        queue = INPUT_OF.get(s["stage"])
        dead = s["stage"] in replica.get("dead", {})
        rows.append({
            "replica": s["replica"], "stage": s["stage"], "pid": s["pid"], "state": "dead" if dead else s["state"],
            "heartbeat_age_s": round(max(0.0, now - s["heartbeat"]), 1) if s["heartbeat"] else None,
            "items_in": s["items_in"], "items_out": s["items_out"], "queue": queue,
            "queue_depth": replica.get("queues", {}).get(queue, 0) if queue else None,
            "queue_capacity": replica.get("queue_capacity") if queue else None, "job": s["job"],
        })
    return rows


def zombie_count(snap: dict) -> int:
    return sum(len(g["zombies"]) for g in snap.get("zombies", []))


# ---- renderables -------------------------------------------------------------------------------

def bar(fraction: float, style: str, width: int = BAR_WIDTH):
    """A text bar; filled and empty cells differ in shape, so it reads without colour too."""
    from rich.text import Text

    filled = round(max(0.0, min(1.0, fraction)) * width)
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


def brief(text: str, limit: int = 160) -> str:
    """The first line, cut at `limit`: ONNX Runtime's reasons run to a dozen lines (--json has them whole)."""
    line = text.strip().split("\n", 1)[0]
    return line if len(line) <= limit and line == text.strip() else line[: limit - 1].rstrip() + "…"


def replicas_table(rows: list[dict]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="replicas", title_justify="left")
    for column in ("replica", "device", "ready", "asked for", "running on", "restarts", "last start", "problem"):
        table.add_column(column, justify="right" if column in ("replica", "restarts") else "left", overflow="fold")
    for r in rows:
        running = Text(", ".join(r["active"]) or "-", style="bold red" if r["cpu_fallback"] else "")
        problem = r["problem"] or r["fatal"] or ""
        if r["cpu_fallback"]:
            why = f"cannot load {', '.join(r['missing_libraries'])}" if r["missing_libraries"] else brief(r["fallback_reason"] or "")
            problem = f"CPU fallback{': ' + why if why else ''}. {problem}".strip()
        table.add_row(str(r["replica"]), str(r["device"]), Text("yes", "green") if r["ready"] else Text("no", "red"),
                      Text(", ".join(r["requested"]) or "-"), running, str(r["restarts"]),
                      f"{age(r['since_start_s'])} ago" if r["since_start_s"] is not None else "-",
                      Text(problem, style="red"))
    return table


def stages_table(rows: list[dict]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="workers and queues", title_justify="left")
    for column in ("replica", "stage", "pid", "state", "heartbeat", "in", "out", "input queue", "job"):
        table.add_column(column, justify="right" if column in ("replica", "pid", "in", "out", "job") else "left",
                         no_wrap=True)
    for s in rows:
        if s["queue"] is None:
            queue = Text("-")
        else:
            depth, capacity = s["queue_depth"], s["queue_capacity"] or 0
            style = "red" if capacity and depth >= capacity else "yellow" if depth else "green"
            queue = Text.assemble(bar(depth / capacity if capacity else 0.0, style, width=10), f" {depth}/{capacity}")
        beat = "-" if s["heartbeat_age_s"] is None else f"{s['heartbeat_age_s']:.1f} s ago"
        table.add_row(str(s["replica"]), s["stage"], str(s["pid"] or "-"), Text(s["state"], STATE_STYLE.get(s["state"], "")),
                      beat, str(s["items_in"]), str(s["items_out"]), queue, str(s["job"] or "-"))
    return table


def alerts_table(alerts: list[dict]):
    from rich.table import Table
    from rich.text import Text

    if not alerts:
        return Text("no alerts firing", style="green")
    table = Table(title=f"{len(alerts)} alert(s) firing", title_justify="left")
    for column in ("alert", "key", "severity", "summary", "action or fix"):
        table.add_column(column, overflow="fold", ratio=2 if column in ("summary", "action or fix") else None)
    for a in alerts:
        style = SEVERITY_STYLE.get(a["severity"], "")
        table.add_row(Text(a["alert"], style), Text(a["key"]), Text(a["severity"], style), Text(brief(a["summary"])),
                      Text(a.get("action") or a.get("fix") or ""))
    return table


def jobs_text(counts: dict[str, int]):
    from rich.text import Text

    from ops.jobs import STATE_STYLE as JOB_STYLE

    parts: list = ["jobs: "]
    for i, (state, n) in enumerate(counts.items()):
        parts += [" · " if i else "", (f"{state} {n}", JOB_STYLE.get(state, "") if n else "dim")]
    return Text.assemble(*parts)


def external_text(ext: dict):
    from rich.text import Text

    state = "running" if ext["exit_code"] is None else f"exited with code {ext['exit_code']}"
    return Text(f"external command pid {ext['pid']}: {state}, {ext['processes']} process(es)",
                style="" if ext["exit_code"] is None else "red")


def front_text(front: dict, now: float):
    """The daemon in front of upstream (watchdog.front): upstream's state, what it holds, who waits."""
    from rich.text import Text

    pace = front.get("pace") or {}
    learned = pace.get("s_per_audio_second")
    per = (f"{learned:.2f} s per s of audio" if learned is not None else
           f"{pace['s_per_task']:.1f} s per task" if pace.get("s_per_task") is not None else
           f"nothing learned yet (floor {pace.get('floor_s', 0):g} s)")
    head = (f"upstream {front['upstream']}: {'answers' if front['ready'] else 'not answering'}; "
            f"{front['outstanding']}/{front['concurrency']} at upstream, {front['waiting']} waiting; pace {per}")
    parts: list = [(head, "" if front["ready"] else "red")]
    for h in front.get("held", ()):
        idle = max(0.0, now - h["last_change"])
        parts.append((f"\n  {h['code']}: {h['progress']} % {h['msg'] or h['phase']}, attempt {h['attempt']}, "
                      f"still {idle:.0f} s of {h['deadline_s']:.0f} s allowed", "red" if idle > h["deadline_s"] else ""))
    waiting = front.get("positions", ())
    if waiting:
        shown = ", ".join(f"{p['position']}. {p['code']}" for p in waiting[:5])
        parts.append(f"\n  next: {shown}" + (f" (+{front['waiting'] - 5} more)" if front["waiting"] > 5 else ""))
    return Text.assemble(*parts)


def tree_text(zombies: int, orphans: int):
    from rich.text import Text

    return Text(f"zombies in the service tree: {zombies}   orphans: {orphans}", style="red" if zombies or orphans else "green")


def _gpus(snap: dict):
    from rich.table import Table
    from rich.text import Text

    if snap.get("gpus") is None:
        return Text(f"GPUs: n/a ({snap.get('gpu_error') or 'no sample'})", style="yellow")
    table = Table(title="GPUs", title_justify="left")
    for column in ("GPU", "name", "util", "memory", "processes"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("GPU", "processes") else "left")
    for g in snap["gpus"]:
        util = g["util_pct"]
        util_cell = Text("n/a") if util is None else Text.assemble(bar(util / 100, "cyan"), f" {util:3.0f} %")
        mem = g["mem_used_mib"] / g["mem_total_mib"] if g["mem_total_mib"] else 0.0
        table.add_row(str(g["index"]), Text(g["name"]), util_cell,
                      Text.assemble(bar(mem, "magenta"), f" {g['mem_used_mib']:.0f} / {g['mem_total_mib']:.0f} MiB"),
                      str(len(g["processes"])))
    return table


def _running_jobs(jobs: list, now: float):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{len(jobs)} running job(s)", title_justify="left")
    for column in ("id", "code", "stage", "progress", "worker", "attempts", "updated"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("id", "attempts") else "left")
    for job in jobs:
        table.add_row(str(job.id), Text(job.code), Text(job.stage), Text.assemble(bar(job.progress / 100, "green"), f" {job.progress:3d} %"),
                      Text(job.worker or "-"), str(job.attempts), f"{age(now - job.updated_at)} ago")
    return table


def _header(seen: Look, now: float):
    from rich.panel import Panel
    from rich.text import Text

    clock = time.strftime("%H:%M:%S", time.localtime(now))
    if not seen.alive:
        return Panel(Text("daemon not running: heygem-ops start", style="bold red"), title=f"heygem-ops monitor {clock}",
                     title_align="left")
    record = seen.record
    line = Text(f"heygem-ops monitor {clock}   daemon pid {record.pid}, up {age(now - record.started)}")
    snap = seen.snapshot
    if snap is None:
        return Text.assemble(line, ("   starting: no snapshot yet", "yellow"))
    ready = ("ready", "green") if snap["ready"] else ("not ready: " + "; ".join(f"{k}: {v}" for k, v in snap["not_ready"].items()), "red")
    tick = (f"   tick {snap['tick']}, {seen.age_s:.1f} s ago", "red" if seen.stale else "")
    wedged = ("  (stale: the daemon's loop is wedged)", "bold red") if seen.stale else ""
    return Text.assemble(line, "   ", ready, tick, wedged)


def time_text(snap: dict, before: Optional[dict] = None):
    """Where each stage's wall time went (the board's `TIMES`): since the previous frame's
    snapshot (`before`, same stage process), else since the stage started. A generator that is
    not busy says here what it waits for: input (decode), output (encode), claim (no job)."""
    from rich.text import Text

    from heygem.board import TIMES

    old = {(r["replica"], r["stage"], r["pid"]): r for r in (before or {}).get("stages", [])}
    lines, windowed = [], False
    for r in snap.get("stages", []):
        prev = old.get((r["replica"], r["stage"], r["pid"]))
        spent = {k: r.get(f"{k}_s", 0.0) - (prev.get(f"{k}_s", 0.0) if prev else 0.0) for k in TIMES}
        windowed |= prev is not None
        total = sum(spent.values())
        if total <= 0:
            continue
        shares = sorted(((v / total, k) for k, v in spent.items() if v / total >= 0.005), reverse=True)
        lines.append(f"\n  {r['replica']} {r['stage']:<9} " + " · ".join(f"{k} {share:.0%}" for share, k in shares))
    if not lines:
        return Text("")
    span = f"last {snap['time'] - before['time']:.0f} s" if windowed and before and "time" in snap else "since start"
    return Text.assemble(f"where the stages' time went ({span}):", *lines)


def frame(seen: Look, counts: dict[str, int], running: list, now: float, before: Optional[dict] = None):
    """One screen: the daemon line, GPUs, replicas, workers and queues, zombies, alerts, jobs.
    `before`: an earlier snapshot, for the stages' time over the span between the two."""
    from rich.console import Group

    parts: list = [_header(seen, now)]
    snap = seen.snapshot
    if snap is not None:
        parts.append(_gpus(snap))
        if snap.get("external"):
            parts.append(external_text(snap["external"]))
            if snap.get("front"):
                parts.append(front_text(snap["front"], now))
        else:
            parts += [replicas_table(replica_rows(snap, now)), stages_table(stage_rows(snap, now)), time_text(snap, before)]
        parts += [tree_text(zombie_count(snap), len(snap.get("orphans", []))), alerts_table(snap.get("alerts", []))]
    parts.append(jobs_text(counts))
    if running:
        parts.append(_running_jobs(running, now))
    return Group(*parts)


# ---- the live loop -----------------------------------------------------------------------------

@contextmanager
def _keys() -> Iterator[Callable[[float], Optional[str]]]:
    """A `wait(seconds) -> key or None`. On a terminal: cbreak mode (keys arrive unbuffered, Ctrl-C
    still interrupts), restored on the way out; otherwise there is nothing to read and it sleeps."""
    if not sys.stdin.isatty():
        yield lambda seconds: time.sleep(seconds)
        return
    import select
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)

        def wait(seconds: float) -> Optional[str]:
            ready, _, _ = select.select([fd], [], [], seconds)
            return os.read(fd, 1).decode(errors="replace") if ready else None

        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _live(paint: Callable[[], object], interval: float) -> None:
    from rich.live import Live

    from ops.context import console

    try:
        with _keys() as wait, Live(paint(), console=console(), screen=False, auto_refresh=False) as live:
            while True:
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    if wait(left) in ("q", "Q"):
                        return
                live.update(paint(), refresh=True)
    except KeyboardInterrupt:
        pass


@click.command()
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, metavar="SECONDS",
              help="Redraw every SECONDS.")
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts and `| less`).")
@click.pass_obj
def monitor(env, interval: float, once: bool) -> None:
    """Live screen: GPUs, replicas and their providers, workers (state, heartbeat, items), queue
    depths, zombies, firing alerts, running jobs with progress. `q` or Ctrl-C quits.

    Reads the daemon's snapshot file and the job store, so it needs no HTTP; without a daemon it
    says so and still shows the jobs.

    \b
    Examples:
      heygem-ops monitor                 redraw every second until q
      heygem-ops monitor --interval 5
      heygem-ops monitor --once | less   one frame, no key reading
    """
    from ops.context import console
    from watchdog.state import StatePaths

    config = env.config
    paths = StatePaths(config.state_dir())
    from watchdog.store import open_job_store

    store = open_job_store(config, paths)  # [store]: SQLite here, or the fleet's PostgreSQL (worker names carry hosts)

    seen_before: dict = {}  # the previous frame's snapshot: the stages' time is shown over the span since

    def paint():
        now = time.time()
        seen = look(paths, config.daemon.interval_s, now)
        shown = frame(seen, store.counts(), store.list(state="running"), now, seen_before.get("snap"))
        if seen.snapshot is not None and seen.snapshot.get("time") != (seen_before.get("snap") or {}).get("time"):
            seen_before["snap"] = seen.snapshot
        return shown

    if once:
        console().print(paint())
    else:
        _live(paint, interval)
