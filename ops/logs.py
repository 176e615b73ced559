"""`heygem-ops logs`: the daemon's JSON log or upstream's `dh.log`, filtered by what a record IS.

Replaces `tail -f dh.log | grep -E '队列|阻塞|GPU|ERROR'`. The format is decided line by line
(`watchdog.upstream_log.Reader`), so one command reads both, and a mix:

- Our records are JSON objects (`timestamp`, `level`, `event`, `component`, fields; alerts:
  `event="alert"`, `alert`, `state`, `severity`, `summary`, `evidence`, `action`): `category()`
  decides from fields alone, a grep misses what is worded differently and matches what merely
  mentions a word.
- Upstream's records (`[2025-03-18 12:52:07,646] [run.py[line:147]] [INFO] [[1002] -> ...]`) and
  ONNX Runtime's own log lines have no fields: their categories come from what they say and from
  upstream's failure signatures (`watchdog.upstream_log.SIGNATURES`), and each carries its task
  code (its own, else the task running then). Their times are the host's local time.

A traceback is one entry: shown when it matches on its own (it is an error) or when the record
before it -- which it belongs to -- is shown. Other bare lines (`print` output, a C library's
warning) follow the verdict of the record before them, unless they carry a failure signature;
before any record they are shown only when nothing is filtered. `--json` prints our JSON lines
unchanged and upstream's entries as JSON objects (bare lines without a signature are left out), so
its output stays valid JSON lines. `--tasks` gives one row per upstream task: its timings and
outcome.

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
from watchdog.upstream_log import SIGNATURES, UPSTREAM_QUEUE_TIMEOUT_S, Entry, Reader, Task, TaskBook, strip_code

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
    # raised from upstream's log: as its catalogue files them (queue_empty, gpu_oom, warmup_slow)
    **{s.alert: set(s.categories - {"error"}) for s in SIGNATURES if s.alert not in ("queue_full", "cpu_fallback", "job_failed")},
}
EVENT_CATEGORIES = {
    "cpu_fallback": {"gpu"},
    "replica_out_of_service": {"gpu", "worker"},
    "zombie_parent_nudged": {"zombie"},
    "zombie_parent_restart": {"zombie", "worker"},
    "orphan_terminated": {"zombie"},
    "orphan_killed": {"zombie"},
    "reaped": {"zombie"},
    "crash_loop": {"worker"},
    "stage_fatal": {"worker"},
}
# the supervisor's steps: replica_stopping, replica_killed, replica_stopped, replica_restarted,
# and the same for external_
PREFIXES = {"queue_": "queue", "gpu_": "gpu", "worker_": "worker", "job_": "job", "replica_": "worker",
            "external_": "worker"}
LEVEL_STYLE = {"debug": "dim", "info": "blue", "warning": "yellow", "error": "red", "critical": "bold red"}
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
FOLLOW_BACKLOG = 10
POLL_S = 0.2
PENDING_FLUSH_S = 2.0  # a traceback still open after this long without new lines is shown as it is
# shown in the line's head, or not at all (the fix text is in the docs and `heygem-ops doctor`)
HEAD_FIELDS = {"timestamp", "level", "event", "component", "alert", "state", "severity", "summary", "action",
               "fix", "key", "repeat", "held_s", "evidence"}
REASON_MAX = 120  # characters of a failure reason in the --tasks table (--json has it whole)


def _prefixed(name: str) -> set[str]:
    return {cat for prefix, cat in PREFIXES.items() if name.startswith(prefix)}


def category(record: dict) -> set[str]:
    """The categories of one of our JSON log records, from its fields only (pure)."""
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


def entry_categories(entry: Entry) -> set[str]:
    """Ours by fields, upstream's by what they say (`watchdog.upstream_log.categories`)."""
    return category(entry.record) if entry.kind == "json" else set(entry.categories)


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


def entry_time(entry: Entry) -> Optional[float]:
    """Epoch seconds of a record: ours in UTC when no zone is given, upstream's in local time
    (its logger writes the host's, or the container's, wall clock); None for bare lines."""
    if entry.kind == "json":
        return record_time(entry.record)
    if entry.timestamp is None:
        return None
    try:
        return datetime.fromisoformat(entry.timestamp).timestamp()
    except ValueError:
        return None


class Selector:
    """Decides entry by entry what is shown; stateful only for lines that are no record (see
    module doc)."""

    def __init__(self, categories: Iterable[str] = (), alerts: bool = False, since: Optional[float] = None,
                 task: Optional[str] = None):
        self.categories = set(categories)
        self.alerts = alerts
        self.since = since
        self.task = task
        self.unfiltered = not (self.categories or alerts or since is not None or task is not None)
        self.last = self.unfiltered
        self.in_time = since is None  # the last record was not before --since

    def wants(self, record: Optional[dict]) -> bool:
        """One of our JSON records, or None for a line that is not one."""
        if record is None:
            return self.last
        self.last = (
            (not self.categories or bool(self.categories & category(record)))
            and (not self.alerts or record.get("event") == "alert")
            and (self.since is None or (record_time(record) or float("-inf")) >= self.since)
        )
        return self.last

    def wants_entry(self, entry: Entry) -> bool:
        task_ok = self.task is None or entry.task == self.task
        if entry.kind == "json":
            self.in_time = self.since is None or (record_time(entry.record) or float("-inf")) >= self.since
            return self._set(self.wants(entry.record) and task_ok)
        if entry.kind in ("dh", "ort"):
            self.in_time = self.since is None or (entry_time(entry) or float("-inf")) >= self.since
            return self._set(self._own(entry) and self.in_time and task_ok)
        # a traceback or a bare line: the verdict of the record before, or its own when it has one
        has_own = entry.kind == "traceback" or bool(entry.hits) or not (self.categories or self.alerts)
        own = has_own and self._own(entry) and self.in_time and task_ok
        if entry.kind == "text" and not entry.continues:  # some process's print: shown unfiltered
            return own or self.unfiltered
        return self._set(self.last or own)

    def _own(self, entry: Entry) -> bool:
        return ((not self.categories or bool(self.categories & entry_categories(entry)))
                and (not self.alerts or bool(entry.hits)))

    def _set(self, verdict: bool) -> bool:
        self.last = verdict
        return verdict


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def render(line: str, record: Optional[dict]):
    """One readable line: time, level, component, event (or alert + state), key fields.

    Everything goes into rich `Text` pieces, never through console markup, so a log line holding
    `[/oops]` prints as it is."""
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


def render_entry(entry: Entry):
    """Ours as `render`; upstream's: time, level, source, [task], message, signatures found."""
    from rich.text import Text

    if entry.kind == "json":
        return render(entry.lines[0], entry.record)
    if entry.kind in ("dh", "ort"):
        r = entry.record
        level = r["level"]
        out = Text()
        out.append(r["timestamp"].replace("T", " ")[:23], style="dim")
        out.append(f" {level.upper():<8}", style=LEVEL_STYLE.get(level, ""))
        out.append(f" {r['source']}", style="cyan")
        if entry.task:
            out.append(f" [{entry.task}]", style="bold")
        out.append(" ")
        out.append(strip_code(r["message"], entry.task))
    else:
        out = Text("\n".join(entry.lines), style="red" if entry.kind == "traceback" else "")
    for hit in entry.hits:
        out.append(f"  <{hit.alert}>", style="bold red" if hit.signature.failure else "bold yellow")
    return out


def _seconds(value: Optional[float], limit: Optional[float] = None):
    from rich.text import Text

    if value is None:
        return Text("-", style="dim")
    return Text(f"{value:.3g} s" if value < 100 else f"{value:.0f} s",
                style="bold red" if limit is not None and value > limit else "")


def render_tasks(tasks: list[Task], title: str):
    """One row per task: the timings upstream logs and the outcome."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left")
    for name in ("task", "started", "preprocess", "audio", "warm-up", "frames", "total", "outcome"):
        table.add_column(name, no_wrap=name not in ("task", "outcome"), overflow="fold")
    styles = {"succeeded": "green", "failed": "bold red", "running": "yellow"}
    for t in tasks:
        frames = "-" if t.frames is None else str(t.frames)
        if t.frames is not None and t.frames_done is not None and t.frames_done < t.frames:
            frames = f"{t.frames_done}/{t.frames}"
        outcome = Text(t.outcome, style=styles[t.outcome])
        if t.reason:
            reason = t.reason if len(t.reason) <= REASON_MAX else t.reason[:REASON_MAX - 1] + "…"
            outcome.append(f": {reason}" if t.outcome == "failed" else f", last error: {reason}")
        table.add_row(Text(t.code), Text((t.started or "-").replace("T", " ")[:19]), _seconds(t.preprocess_s),
                      _seconds(t.audio_features_s), _seconds(t.warmup_s, UPSTREAM_QUEUE_TIMEOUT_S),
                      Text(frames), _seconds(t.total_s), outcome)
    return table


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
@click.option("--since", help="Only records since: 10m, 2h, 1d, or an ISO timestamp (UTC if no zone; "
              "upstream's records are in local time).")
@click.option("--category", "categories", type=click.Choice(CATEGORIES), multiple=True,
              help="Only records of this category (repeatable): ours by alert name, event and level; "
              "upstream's by level, words and failure signature.")
@click.option("--alerts", is_flag=True, help="Only alert events (firing/resolved), and upstream's failure lines.")
@click.option("--task", "task", metavar="CODE", help="Only the lines of this task (upstream's task code, our job id).")
@click.option("--tasks", "tasks", is_flag=True, help="One row per upstream task: timings and outcome.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON lines: ours unchanged, upstream's entries as objects (with --tasks: one document).")
@click.option("--file", "path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Read this file ('-': stdin) instead of journald / the daemon's log, e.g. upstream's log/dh.log.")
@click.pass_obj
def logs(env, follow: bool, since: Optional[str], categories: tuple[str, ...], alerts: bool, task: Optional[str],
         tasks: bool, as_json: bool, path: Optional[Path]) -> None:
    """Show the daemon's log or upstream's dh.log: one readable line per record, filtered by category.

    Categories: queue (queue_full, stage_stalled, gpu_idle_busy_queue; upstream: 队列, 阻塞, Empty),
    gpu (cpu_fallback, gpu_*; upstream: CUDA, GPU, 显存, providers), zombie (zombies, orphans,
    reaping), worker (worker_*, crash_loop, restarts; upstream: process start/stop), job (job_*;
    upstream: task start, end, result, failure), error (level error or critical; upstream also
    异常, 失败, tracebacks).

    \b
    Examples:
      heygem-ops logs --follow --category queue --category gpu
      heygem-ops logs --since 2h --alerts
      heygem-ops logs --file log/dh.log --category error
      heygem-ops logs --file log/dh.log --task 1002
      heygem-ops logs --file log/dh.log --tasks
      heygem-ops logs --category error --json | jq .event
      journalctl -u heygem-ops -o cat | heygem-ops logs --file - --category zombie
    """
    try:
        start = None if since is None else parse_since(since, time.time())
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--since'") from None
    if tasks and (follow or categories or alerts):
        raise click.UsageError("--tasks summarises whole tasks: it takes --file, --since, --task and --json, "
                               "not --follow, --category or --alerts")
    selector = Selector(categories, alerts, start, task)
    reader = Reader()
    book = TaskBook() if tasks else None
    out = console()

    def pick(entries: Iterable[Entry]) -> Iterator[Entry]:
        for entry in entries:
            if selector.wants_entry(entry) and not (as_json and not _has_json(entry)):
                yield entry

    def show(picked: Iterable[Entry]) -> None:
        for entry in picked:
            if book is not None:
                book.feed(entry)
            elif as_json:
                click.echo(entry.lines[0] if entry.kind == "json" else json.dumps(entry.to_dict(), ensure_ascii=False))
            else:
                out.print(render_entry(entry), soft_wrap=True)

    def read_all(lines: Iterable[str]) -> None:
        show(pick(reader.feed(lines)))
        show(pick(reader.flush()))

    try:
        source = str(path) if path is not None else None
        if path is None:
            kind, where = _default_source(env)
            source = f"journal of {where}" if kind == "journal" else str(where)
            if kind == "journal":
                read_all(_journal_lines(where, follow and book is None, start))
                return
            path = where
        if str(path) == "-":
            source = "stdin"
            read_all(line.rstrip("\r\n") for line in click.get_text_stream("stdin"))
            return
        try:
            tail = FileTail(path)
        except OSError as err:
            click.echo(f"error: cannot read {path}: {err.strerror}", err=True)
            raise click.exceptions.Exit(USAGE) from None
        try:
            if not follow:
                read_all(tail.read())
                return
            backlog = pick(reader.feed(tail.read()))
            if start is None:  # like tail -f: the last few matching records, then new ones
                backlog = deque(backlog, maxlen=FOLLOW_BACKLOG)
            show(backlog)
            idle_s = 0.0
            while True:
                time.sleep(POLL_S)
                lines = tail.read()
                idle_s = 0.0 if lines else idle_s + POLL_S
                show(pick(reader.feed(lines)))
                if idle_s >= PENDING_FLUSH_S:  # a traceback whose end never came (its writer died)
                    show(pick(reader.flush()))
        finally:
            tail.close()
    except KeyboardInterrupt:
        raise click.exceptions.Exit(OK) from None
    finally:
        if book is not None:
            _show_tasks(book, task, as_json, source, out)


def _has_json(entry: Entry) -> bool:
    """Whether `--json` prints the entry: not a bare line without a signature, and not what trails
    one of our JSON records (as before upstream's log was read: our log's --json is its JSON lines)."""
    if entry.kind in ("json", "dh", "ort"):
        return True
    return entry.after != "json" and (entry.kind == "traceback" or bool(entry.hits))


def _show_tasks(book: TaskBook, task: Optional[str], as_json: bool, source: Optional[str], out) -> None:
    from ops.context import emit_json

    rows = [t for t in book.rows() if task is None or t.code == task]
    if as_json:
        emit_json({"source": source, "tasks": [t.to_dict() for t in rows]})
    elif not rows:
        click.echo(f"no upstream task found in {source}")
    else:
        out.print(render_tasks(rows, f"upstream tasks in {source}"))
        counts = {o: sum(t.outcome == o for t in rows) for o in ("succeeded", "failed", "running")}
        out.print(", ".join(f"{n} {o}" for o, n in counts.items()), highlight=False)
