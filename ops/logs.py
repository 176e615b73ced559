"""`heygem-ops logs`: the daemon's JSON log, filtered by what a record IS, not by what it says.

Replaces `tail -f dh.log | grep -E '队列|阻塞|GPU|ERROR'`: a grep misses what is worded
differently and matches what merely mentions a word. Every record here is a JSON object
(`timestamp`, `level`, `event`, `component`, fields; alerts: `event="alert"`, `alert`, `state`,
`severity`, `summary`, `evidence`, `action`), so `category()` decides from fields alone.

Lines that are not JSON (a traceback, a C library's warning) have no fields to filter on. They are
shown as-is, and follow the verdict of the record before them, which they most likely continue;
before any record they are shown only when nothing is filtered. `--json` prints only the JSON
lines, unchanged, so its output stays valid JSON lines.

Source: `--file` (`-` for stdin), else journald when the daemon runs under systemd, else the
daemon's log file in the state directory.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

import click

from ops.context import OK, USAGE, console

CATEGORIES = ("queue", "gpu", "zombie", "worker", "job", "error")

ALERT_CATEGORIES = {
    "queue_full": {"queue"},
    "stage_stalled": {"queue"},
    "gpu_idle_busy_queue": {"queue", "gpu"},
    "cpu_fallback": {"gpu"},
    "zombies": {"zombie"},
    "orphans": {"zombie"},
    "worker_dead": {"worker"},
    "worker_hung": {"worker"},
    "crash_loop": {"worker"},
    "job_failed": {"job"},
}
EVENT_CATEGORIES = {
    "cpu_fallback": {"gpu"},
    "replica_out_of_service": {"gpu", "worker"},
    "zombie_parent_nudged": {"zombie"},
    "orphan_terminated": {"zombie"},
    "reaped": {"zombie"},
    "crash_loop": {"worker"},
    "replica_restarted": {"worker"},
    "external_exited": {"worker"},
    "external_restarted": {"worker"},
    "stage_fatal": {"worker"},
}
PREFIXES = {"queue_": "queue", "gpu_": "gpu", "worker_": "worker", "job_": "job"}
LEVEL_STYLE = {"debug": "dim", "info": "blue", "warning": "yellow", "error": "red", "critical": "bold red"}
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
FOLLOW_BACKLOG = 10
POLL_S = 0.2
# shown in the line's head, or not at all (the fix text is in the docs and `heygem-ops doctor`)
HEAD_FIELDS = {"timestamp", "level", "event", "component", "alert", "state", "severity", "summary", "action",
               "fix", "key", "repeat", "held_s", "evidence"}


def _prefixed(name: str) -> set[str]:
    return {cat for prefix, cat in PREFIXES.items() if name.startswith(prefix)}


def category(record: dict) -> set[str]:
    """The categories of one log record, from its fields only (pure)."""
    cats: set[str] = set()
    event = str(record.get("event", ""))
    if event == "alert":
        alert = str(record.get("alert", ""))
        cats |= ALERT_CATEGORIES.get(alert, set()) | _prefixed(alert)
    else:
        cats |= EVENT_CATEGORIES.get(event, set()) | _prefixed(event)
    if str(record.get("level", "")).lower() in ("error", "critical"):
        cats.add("error")
    return cats


def parse(line: str) -> Optional[dict]:
    """The record on this line, or None when it is not a JSON object."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _iso(text: str) -> datetime:
    """ISO 8601; `Z` accepted (Python 3.10's fromisoformat does not), no zone means UTC like the log."""
    when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def parse_since(text: str, now: float) -> float:
    """"10m", "2h", "1d", "30s" before `now`, or an ISO timestamp; epoch seconds. ValueError if neither."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match:
        return now - float(match.group(1)) * UNITS[match.group(2)]
    try:
        return _iso(text).timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (10m, 2h, 1d) nor an ISO timestamp") from None


def record_time(record: dict) -> Optional[float]:
    try:
        return _iso(str(record["timestamp"])).timestamp()
    except (KeyError, ValueError):
        return None


class Selector:
    """Decides line by line what is shown; stateful only for non-JSON lines (see module doc)."""

    def __init__(self, categories: Iterable[str] = (), alerts: bool = False, since: Optional[float] = None):
        self.categories = set(categories)
        self.alerts = alerts
        self.since = since
        self.last = not (self.categories or alerts or since is not None)

    def wants(self, record: Optional[dict]) -> bool:
        if record is None:
            return self.last
        self.last = (
            (not self.categories or bool(self.categories & category(record)))
            and (not self.alerts or record.get("event") == "alert")
            and (self.since is None or (record_time(record) or float("-inf")) >= self.since)
        )
        return self.last


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def render(line: str, record: Optional[dict]):
    """One readable line: time, level, component, event (or alert + state), key fields."""
    from rich.text import Text

    if record is None:
        return Text(line)
    level = str(record.get("level", "")).lower()
    out = Text()
    out.append(str(record.get("timestamp", "-"))[:23].replace("T", " "), style="dim")
    out.append(f" {level.upper() or '-':<8}", style=LEVEL_STYLE.get(level, ""))
    if record.get("component"):
        out.append(f" {record['component']}", style="cyan")
    if record.get("event") == "alert":
        state = str(record.get("state", ""))
        out.append(f" alert {record.get('alert', '?')} {state}", style="bold red" if state == "firing" else "bold green")
        if record.get("key"):
            out.append(f" [{record['key']}]")
        if record.get("summary"):
            out.append(f": {record['summary']}")
        fields = dict(record.get("evidence") or {}) if isinstance(record.get("evidence"), dict) else {}
    else:
        out.append(f" {record.get('event', '-')}", style="bold")
        fields = {k: v for k, v in record.items() if k not in HEAD_FIELDS}
    for key, value in fields.items():
        out.append(f" {key}=", style="dim")
        out.append(_value(value))
    if record.get("action"):
        out.append(f" -> {record['action']}", style="magenta")
    return out


# ---- sources -----------------------------------------------------------------------------------

class FileTail:
    """Complete lines added to a file since the last read; survives truncation and rotation."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        self.partial = b""

    def read(self) -> list[str]:
        chunk = self.partial + self.file.read()
        if not chunk:
            self._reopen_if_replaced()
            return []
        *lines, self.partial = chunk.split(b"\n")
        return [raw.decode("utf-8", "replace").rstrip("\r") for raw in lines]

    def _reopen_if_replaced(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:  # mid-rotation: the new file is not there yet
            return
        if st.st_ino != os.fstat(self.file.fileno()).st_ino:
            self.file.close()
            self.file = open(self.path, "rb")
            self.partial = b""
        elif st.st_size < self.file.tell():  # truncated in place (copytruncate)
            self.file.seek(0)
            self.partial = b""

    def close(self) -> None:
        self.file.close()


def _journal_unit(pid: int) -> Optional[str]:
    """The systemd unit the process runs in, if systemd started it (INVOCATION_ID in its environment)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    if not any(entry.startswith(b"INVOCATION_ID=") for entry in environ):
        return None
    units = [part for part in cgroup.replace("\n", "/").split("/") if part.endswith(".service")]
    return units[-1] if units else "heygem-ops.service"


def _journal_lines(unit: str, follow: bool, since: Optional[float]) -> Iterator[str]:
    import shutil
    import subprocess

    journalctl = shutil.which("journalctl")
    if journalctl is None:
        raise click.ClickException("the daemon runs under systemd but journalctl is not installed; use --file")
    argv = [journalctl, "-u", unit, "-o", "cat", "--no-pager"]
    argv += ["--since", f"@{int(since)}"] if since is not None else []
    argv += ["-f"] if follow else []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        for raw in proc.stdout:
            yield raw.decode("utf-8", "replace").rstrip("\r\n")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _default_source(env) -> tuple[str, object]:
    """("journal", unit) when the daemon runs under systemd, else ("file", the daemon's log)."""
    from watchdog.state import StatePaths, read_pidfile

    paths = StatePaths(env.config.state_dir())
    record = read_pidfile(paths)
    if record is not None and record.alive():
        unit = _journal_unit(record.pid)
        if unit:
            return "journal", unit
    if not paths.log.exists():
        click.echo(f"error: no daemon log at {paths.log} and no daemon under systemd; give --file PATH "
                   "(e.g. journalctl -u heygem-ops -o cat | heygem-ops logs --file -)", err=True)
        raise click.exceptions.Exit(USAGE)
    return "file", paths.log


# ---- the command -------------------------------------------------------------------------------

@click.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records (Ctrl-C to stop).")
@click.option("--since", help="Only records since: 10m, 2h, 1d, or an ISO timestamp (UTC if no zone).")
@click.option("--category", "categories", type=click.Choice(CATEGORIES), multiple=True,
              help="Only records of this category (repeatable): by alert name, event and level, not by text.")
@click.option("--alerts", is_flag=True, help="Only alert events (firing/resolved).")
@click.option("--json", "as_json", is_flag=True, help="Print the matching JSON lines unchanged (JSON lines).")
@click.option("--file", "path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Read this file ('-': stdin) instead of journald / the daemon's log.")
@click.pass_obj
def logs(env, follow: bool, since: Optional[str], categories: tuple[str, ...], alerts: bool, as_json: bool,
         path: Optional[Path]) -> None:
    """Show the daemon's log: one readable line per record, filtered by category.

    Categories: queue (queue_full, stage_stalled, gpu_idle_busy_queue), gpu (cpu_fallback, gpu_*),
    zombie (zombies, orphans, reaping), worker (worker_*, crash_loop, restarts), job (job_*),
    error (level error or critical).

    \b
    Examples:
      heygem-ops logs --follow --category queue --category gpu
      heygem-ops logs --since 2h --alerts
      heygem-ops logs --category error --json | jq .event
      journalctl -u heygem-ops -o cat | heygem-ops logs --file - --category zombie
    """
    try:
        start = None if since is None else parse_since(since, time.time())
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--since'") from None
    selector = Selector(categories, alerts, start)
    out = console()

    def pick(lines: Iterable[str]) -> Iterator[tuple[str, Optional[dict]]]:
        for line in lines:
            record = parse(line)
            if selector.wants(record) and not (as_json and record is None):
                yield line, record

    def show(picked: Iterable[tuple[str, Optional[dict]]]) -> None:
        for line, record in picked:
            if as_json:
                click.echo(line)
            else:
                out.print(render(line, record), soft_wrap=True)

    try:
        if path is None:
            kind, where = _default_source(env)
            if kind == "journal":
                show(pick(_journal_lines(where, follow, start)))
                return
            path = where
        if str(path) == "-":
            show(pick(line.rstrip("\r\n") for line in click.get_text_stream("stdin")))
            return
        try:
            tail = FileTail(path)
        except OSError as err:
            click.echo(f"error: cannot read {path}: {err.strerror}", err=True)
            raise click.exceptions.Exit(USAGE) from None
        try:
            backlog = pick(tail.read())
            if follow and start is None:  # like tail -f: the last few matching records, then new ones
                backlog = deque(backlog, maxlen=FOLLOW_BACKLOG)
            show(backlog)
            while follow:
                time.sleep(POLL_S)
                show(pick(tail.read()))
        finally:
            tail.close()
    except KeyboardInterrupt:
        raise click.exceptions.Exit(OK) from None
