"""`heygem-ops start | stop | restart | status`: the daemon's life cycle, precisely.

Replaces `ps aux | grep 'python app.py' | xargs kill -9; nohup python app.py &`. Where systemd
runs the host and knows the heygem-ops unit, these delegate to `systemctl` (it owns the cgroup,
the restart policy and the journal). Otherwise the daemon is started detached (own session, stdin
from /dev/null, output appended to daemon.log) and found again through its pidfile, which records
pid AND start time (clock ticks since boot, which a clock step does not change): a stop never
signals a process that merely reuses the pid, nor one named by a pidfile that neither root nor
that process's own user owns (exit 2). Stop is TERM first (the daemon drains within [daemon]
stop_grace_s and stops its children), then KILL for whatever of the tree captured before the
TERM is still there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import click

from ops.context import OK, PROBLEM, USAGE, age, console, emit_json

UNIT = "heygem-ops"
POLL_S = 0.2
STOP_MARGIN_S = 10.0
SETTLE_S = 2.0
HTTP_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 20
# Inherited from a CLI that itself runs under systemd, these would make the daemon talk to (or
# take sockets of) that other unit.
FOREIGN_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def _say(message: str, err: bool = False) -> None:
    click.echo(message, err=err)


# ---- systemd -----------------------------------------------------------------------------------

def systemd_manager() -> Optional[list[str]]:
    """The `systemctl` argv (system or --user manager) when systemd is PID 1 and knows our unit."""
    import shutil

    systemctl = shutil.which("systemctl")
    if systemctl is None or not Path("/run/systemd/system").is_dir():
        return None
    for scope in ([], ["--user"]):
        try:
            found = subprocess.run([systemctl, *scope, "cat", UNIT], capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            continue
        if found.returncode == 0:
            return [systemctl, *scope]
    return None


def _systemctl(manager: list[str], action: str, timeout_s: float, no_block: bool = False) -> int:
    argv = [*manager, action, *(["--no-block"] if no_block else []), UNIT]
    shown = " ".join(argv[1:])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _say(f"error: `systemctl {shown}` did not finish within {timeout_s:g} s; systemd goes on with it: "
             f"systemctl {' '.join(manager[1:] + ['status', UNIT])}", err=True)
        return PROBLEM
    if done.returncode != 0:
        _say(f"error: `systemctl {shown}` failed ({done.returncode}): {done.stderr.strip()}", err=True)
        return PROBLEM
    _say(f"systemctl {shown}: done")
    return OK


def _unit_state(manager: list[str]) -> str:
    try:
        done = subprocess.run([*manager, "is-active", UNIT], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "unknown (systemctl did not answer)"
    return done.stdout.strip() or "unknown"


# ---- the pidfile way ---------------------------------------------------------------------------

def _paths(env):
    from watchdog.state import StatePaths

    return StatePaths(env.config.state_dir())


def http_get(url: str) -> tuple[Optional[int], Optional[dict]]:
    """(status, JSON body) of a GET, or (None, None) when nothing answers."""
    import http.client
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (OSError, ValueError, http.client.HTTPException):
        return None, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def _log_tail(path: Path, offset: int) -> str:
    """The last lines this start appended to the log (not earlier runs')."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _spawn(env, paths) -> tuple[subprocess.Popen, int]:
    """The daemon, detached: its own session (no terminal signals reach it), stdin /dev/null,
    output appended to the log, no inherited descriptors (so callers capturing our output are not
    held open). The working directory is kept so relative paths in the config mean the same."""
    command = [sys.executable, "-m", "ops.cli"]
    if env.config_path is not None:
        command += ["--config", str(Path(env.config_path).absolute())]
    command.append("daemon")
    child_env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    child_env["PYTHONUNBUFFERED"] = "1"
    offset = paths.log.stat().st_size if paths.log.exists() else 0
    with open(paths.log, "ab") as log, open(os.devnull, "rb") as null:
        proc = subprocess.Popen(command, stdin=null, stdout=log, stderr=log, start_new_session=True,
                                close_fds=True, env=child_env)
    return proc, offset


def _start(env, paths, timeout_s: float, no_wait: bool) -> int:
    from watchdog.state import read_pidfile

    record = read_pidfile(paths)
    if record is not None and record.alive():
        _say(f"error: the daemon is already running: pid {record.pid} ({record.http}); "
             "`heygem-ops restart` to restart it", err=True)
        return PROBLEM
    if paths.pidfile.exists():
        paths.pidfile.unlink(missing_ok=True)
        _say(f"removed the stale pidfile {paths.pidfile}")
    proc, offset = _spawn(env, paths)
    _say(f"started the daemon: pid {proc.pid}, log {paths.log}")
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.poll()
        if code is not None:
            _say(f"error: the daemon exited with code {code} before it was ready; last lines of {paths.log}:", err=True)
            _say(_log_tail(paths.log, offset), err=True)
            return PROBLEM
        record = read_pidfile(paths)
        if record is not None and record.pid == proc.pid:
            if no_wait:
                _say(f"daemon pid {proc.pid} serves {record.http}; not waiting for readiness (--no-wait)")
                return OK
            if http_get(f"{record.http}/readyz")[0] == 200:
                _say(f"daemon pid {proc.pid} is ready at {record.http}")
                return OK
        if time.monotonic() >= deadline:
            _say(f"error: daemon pid {proc.pid} is not ready after {timeout_s:g} s; it keeps starting. "
                 f"Why: `heygem-ops status`; log: {paths.log}", err=True)
            return PROBLEM
        time.sleep(POLL_S)


def _stop(config, paths) -> int:
    import psutil

    from watchdog.procs import terminate, tree, wait_exit
    from watchdog.state import read_pidfile

    record = read_pidfile(paths)
    if record is None:
        if paths.pidfile.exists():
            paths.pidfile.unlink(missing_ok=True)
            _say(f"removed an unreadable pidfile {paths.pidfile}")
        _say(f"no daemon is running (no pidfile in {paths.root})")
        return OK
    why = record.untrusted()
    if why:
        _say(f"error: {paths.pidfile}: {why}", err=True)
        return USAGE
    daemon = record.ref()
    if daemon is None:
        paths.pidfile.unlink(missing_ok=True)
        _say(f"the pidfile was stale (pid {record.pid} is not that daemon any more); removed {paths.pidfile}")
        return OK
    try:
        refs = tree(record.pid)  # captured before the TERM: after it, the children are re-parented
    except psutil.NoSuchProcess:
        refs = []
    rest = refs[1:] if refs and refs[0] == daemon else []  # else the pid changed hands in between
    grace = config.daemon.stop_grace_s + config.actions.term_grace_s + STOP_MARGIN_S
    _say(f"stopping daemon pid {record.pid}: SIGTERM, waiting up to {grace:g} s for it to drain and exit")
    began = time.monotonic()
    outcome = terminate([daemon], grace)
    took = time.monotonic() - began
    if outcome["killed"]:
        _say(f"daemon pid {record.pid} did not exit within {grace:g} s: killed (SIGKILL)")
    elif outcome["terminated"]:
        _say(f"daemon pid {record.pid} exited after SIGTERM in {took:.1f} s")
    else:
        _say(f"daemon pid {record.pid} had already exited")
    # Children that exit on their own once the daemon is gone (multiprocessing's resource tracker
    # reads EOF) get a moment first; only what is still running after it is signalled.
    left = terminate(wait_exit(rest, SETTLE_S), config.actions.term_grace_s)
    if left["terminated"] or left["killed"]:
        pids = sorted(ref.pid for ref in left["terminated"] + left["killed"])
        _say(f"stopped {len(pids)} leftover process(es) of its tree ({len(left['killed'])} needed SIGKILL): {pids}")
    stuck = outcome["alive"] + left["alive"]
    if stuck:
        _say(f"error: still there after SIGKILL (stuck in the kernel?): {sorted(ref.pid for ref in stuck)}", err=True)
        return PROBLEM
    current = read_pidfile(paths)
    if current is not None and current.pid == record.pid:
        paths.pidfile.unlink(missing_ok=True)  # a killed daemon could not remove it itself
    return OK


_TIMEOUT = click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=120.0, show_default=True,
                        help="Give up waiting for readiness after this many seconds.")
_NO_WAIT = click.option("--no-wait", is_flag=True, help="Return once the daemon is started; do not wait until it is ready.")


@click.command()
@_TIMEOUT
@_NO_WAIT
@click.pass_obj
def start(env, timeout_s: float, no_wait: bool) -> None:
    """Start the daemon (detached) and wait until it is ready.

    With the systemd unit installed: `systemctl start heygem-ops`. Otherwise refuses when a daemon
    is already running (exit 1); on failure prints the daemon's last log lines.

    \b
    Examples:
      heygem-ops start
      heygem-ops --config /etc/heygem-ops/config.toml start --timeout 300
      heygem-ops start --no-wait
    """
    paths = _paths(env)  # a bad config ends here with exit 2, before anything starts
    manager = systemd_manager()
    code = _systemctl(manager, "start", timeout_s, no_wait) if manager else _start(env, paths, timeout_s, no_wait)
    raise click.exceptions.Exit(code)


@click.command()
@click.pass_obj
def stop(env) -> None:
    """Stop the daemon: SIGTERM, wait for its drain ([daemon] stop_grace_s), then SIGKILL whatever
    is left of its process tree. Only the process the pidfile names (pid and start time) is
    signalled; a stale pidfile is removed. With the systemd unit installed: `systemctl stop`.

    \b
    Examples:
      heygem-ops stop
      heygem-ops stop && heygem-ops status
    """
    config = env.config
    manager = systemd_manager()
    if manager:
        timeout = config.daemon.stop_grace_s + config.actions.term_grace_s + 2 * STOP_MARGIN_S
        raise click.exceptions.Exit(_systemctl(manager, "stop", timeout))
    raise click.exceptions.Exit(_stop(config, _paths(env)))


@click.command()
@_TIMEOUT
@_NO_WAIT
@click.pass_obj
def restart(env, timeout_s: float, no_wait: bool) -> None:
    """Stop the daemon (if running), start it again and wait until it is ready.

    \b
    Examples:
      heygem-ops restart
      heygem-ops restart --timeout 300
    """
    paths = _paths(env)
    manager = systemd_manager()
    if manager:
        raise click.exceptions.Exit(_systemctl(manager, "restart", timeout_s, no_wait))
    code = _stop(env.config, paths)
    raise click.exceptions.Exit(code if code != OK else _start(env, paths, timeout_s, no_wait))


# ---- status ------------------------------------------------------------------------------------

def observe(env, now: float) -> dict:
    """Everything `status` reports, as one JSON-ready object; `problems` empty means healthy."""
    from ops.monitor import STALE_TICKS, look, replica_rows, stage_rows, zombie_count

    config, paths = env.config, _paths(env)
    seen = look(paths, config.daemon.interval_s, now)
    record, snap = seen.record, seen.snapshot
    manager = systemd_manager()
    problems = []
    daemon = {"up": False, "pidfile": "absent" if record is None else "ok" if seen.alive else "stale",
              "pid": None, "started": None, "uptime_s": None, "http": None, "healthz": None}
    ready, not_ready = False, {}
    if seen.alive:
        status, health = http_get(f"{record.http}/healthz") if record.http else (None, None)
        daemon.update(pid=record.pid, started=record.started, uptime_s=round(now - record.started, 1), http=record.http,
                      healthz={**(health or {}), "http_status": status})
        daemon["up"] = status == 200
        if status is None:
            problems.append(f"daemon pid {record.pid} runs but its HTTP server ({record.http}) does not answer")
        elif status != 200:
            problems.append(f"daemon pid {record.pid} is unhealthy: /healthz answered {status} (its loop stopped ticking)")
        status, body = http_get(f"{record.http}/readyz") if record.http else (None, None)
        if status is not None:
            ready, not_ready = status == 200, (body or {}).get("reasons", {})
        elif snap is not None:
            ready, not_ready = snap["ready"], snap["not_ready"]
        if not ready:
            problems.append("not ready: " + ("; ".join(f"{k}: {v}" for k, v in not_ready.items()) or "no readiness answer"))
    else:
        problems.append("daemon not running" + (f" (stale pidfile: pid {record.pid})" if record else ""))
    if seen.stale:
        problems.append(f"snapshot is {seen.age_s:.1f} s old (> {STALE_TICKS} ticks of {config.daemon.interval_s:g} s): "
                        "the daemon's loop is wedged")
    alerts = snap.get("alerts", []) if snap else []
    problems += [f"critical alert {a['alert']}{' ' + a['key'] if a['key'] else ''}: {a['summary']}"
                 for a in alerts if a["severity"] == "critical"]
    from watchdog.store import status_view

    jobs, store, trouble = status_view(config, paths)  # a shared store: which host holds which job
    problems += [trouble] if trouble else []
    return {
        "healthy": not problems, "problems": problems, "state_dir": str(paths.root),
        "manager": "systemd" if manager else "pidfile", "unit": _unit_state(manager) if manager else None,
        "daemon": daemon, "ready": ready, "not_ready": not_ready,
        "snapshot": None if snap is None else {"age_s": round(seen.age_s, 2), "stale": seen.stale, "tick": snap["tick"],
                                               "tick_s": snap["tick_s"], "mode": snap["mode"], "config": snap["config"]},
        "replicas": replica_rows(snap, now) if snap else [], "stages": stage_rows(snap, now) if snap else [],
        "external": snap.get("external") if snap else None,
        "jobs": jobs, "store": store, "alerts": alerts, "restarts": snap.get("restarts", {}) if snap else {},
        "units": snap.get("units", {}) if snap else {},
        "zombies": zombie_count(snap) if snap else None, "orphans": snap.get("orphans", []) if snap else None,
    }


def _render(report: dict) -> None:
    from rich.text import Text

    from ops.monitor import alerts_table, brief, external_text, jobs_text, replicas_table, stages_table, tree_text

    out = console()
    d = report["daemon"]
    if d["pid"] is None:
        stale = " (the pidfile was stale)" if d["pidfile"] == "stale" else ""
        out.print(Text.assemble(("daemon   not running", "bold red"), f"{stale}: heygem-ops start"))
    else:
        health = ("healthy", "green") if d["up"] else ("unhealthy", "bold red")
        out.print(Text.assemble("daemon   ", ("up", "green") if d["up"] else ("running", "yellow"),
                                f"   pid {d['pid']}, up {age(d['uptime_s'])}, {d['http']}, ", health))
    out.print(Text(f"state    {report['state_dir']}" + (f"   systemd unit {UNIT}: {report['unit']}" if report["unit"] else "")))
    if d["pid"] is not None:
        reasons = "; ".join(f"{k}: {v}" for k, v in report["not_ready"].items())
        out.print(Text.assemble("ready    ", ("yes", "green") if report["ready"] else (f"no: {reasons or '?'}", "bold red")))
    snap = report["snapshot"]
    if snap is not None:
        out.print(Text.assemble(f"snapshot tick {snap['tick']}, {snap['age_s']:.1f} s old, {snap['mode']} mode",
                                ("   STALE: the daemon's loop is wedged", "bold red") if snap["stale"] else ""))
        if report["external"]:
            out.print(external_text(report["external"]))
        if report["replicas"]:
            out.print(replicas_table(report["replicas"]))
        if report["stages"]:
            out.print(stages_table(report["stages"]))
        out.print(tree_text(report["zombies"], len(report["orphans"])))
        out.print(alerts_table(report["alerts"]))
    out.print(jobs_text(report["jobs"]))
    if report["store"]["hosts"] is not None:
        out.print(_fleet_text(report["store"]))
    if report["healthy"]:
        out.print(Text("healthy", style="bold green"))
    else:
        out.print(Text(f"{len(report['problems'])} problem(s):", style="bold red"))
        for problem in report["problems"]:
            out.print(Text(f"  - {brief(problem)}", style="red"))


def _fleet_text(store: dict):
    """A shared store: which host holds which running job."""
    from rich.text import Text

    hosts = store["hosts"]
    held = " · ".join(f"{host or '(no host)'} holds {len(ids)} (job{'s' if len(ids) > 1 else ''} "
                      f"{', '.join(map(str, ids))})" for host, ids in hosts.items())
    return Text(f"fleet    {store['where']}: {held or 'no job running on any host'}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.pass_obj
def status(env, as_json: bool) -> None:
    """Is the daemon up and ready? Replicas and their providers (asked for vs running on), workers,
    queues, jobs, firing alerts, restarts.

    Exit code: 0 healthy (up, ready, no critical alert), 1 otherwise, 2 config error.

    \b
    Examples:
      heygem-ops status
      heygem-ops status --json | jq '.replicas[] | {replica, active, cpu_fallback}'
    """
    report = observe(env, time.time())
    if as_json:
        emit_json(report)
    else:
        _render(report)
    raise click.exceptions.Exit(OK if report["healthy"] else PROBLEM)
