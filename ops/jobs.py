"""`heygem-ops submit`, `jobs`, `cancel`: the job store from the command line.

Replaces clicking in the web UI and polling `/easy/query` every 2 s. The CLI writes to the same
SQLite store as the daemon and its replicas (`StatePaths.store`; WAL, safe to share), so a
submitted job is on disk when `submit` returns, whether or not a daemon is running; it only runs
once one is, which submit says on stderr rather than let the job wait silently.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import click

from ops.context import OK, PROBLEM, USAGE, console, emit_json

STATE_STYLE = {"queued": "cyan", "running": "yellow", "succeeded": "green", "failed": "red", "cancelled": "dim"}
POLL_S = 0.5


def _store(env):
    """The configured job store (`[store]`): SQLite in the state directory, or the fleet's
    PostgreSQL, checked here: a store that cannot work as configured exits 2, one that does not
    answer exits 1, each with the reason."""
    from heygem.jobs import UNAVAILABLE, StoreConfigError
    from watchdog.store import open_job_store

    try:
        store = open_job_store(env.config)
        if store.shared:
            store.prepare()
    except StoreConfigError as err:
        _fail(f"job store: {err}")
    except UNAVAILABLE as err:
        click.echo(f"error: job store: {err}", err=True)
        raise click.exceptions.Exit(PROBLEM) from None
    return store


def _daemon_running(env) -> bool:
    from watchdog.state import StatePaths, read_pidfile

    record = read_pidfile(StatePaths(env.config.state_dir()))
    return record is not None and record.alive()


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(USAGE)


def _outcome(job) -> str:
    """What a person needs to know of a job's end: the output file, or why it did not get one."""
    if job.state == "succeeded":
        return job.result or ""
    return job.reason or ""


_INPUT = click.Path(exists=True, dir_okay=False, readable=True, resolve_path=True, path_type=Path)


@click.command()
@click.argument("audio", type=_INPUT)
@click.argument("video", type=_INPUT)
@click.option("--out", "output", type=click.Path(dir_okay=False, resolve_path=True, path_type=Path),
              help="Where the finished video goes (default: the state directory's outputs/).")
@click.option("--code", help="Client task code (upstream's `code`; default: a random UUID). Must be unique.")
@click.option("--wait", is_flag=True, help="Show progress until the job ends; exit 0 on success, 1 otherwise.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="With --wait: give up waiting after this many seconds (the job keeps going).")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON (with --wait: as it ended).")
@click.pass_obj
def submit(env, audio: Path, video: Path, output: Optional[Path], code: Optional[str], wait: bool,
           timeout_s: float, as_json: bool) -> None:
    """Queue a lip-sync job: AUDIO (speech) + VIDEO (template) -> talking video.

    Paths are stored absolute, since the daemon runs elsewhere. The job is committed before this
    returns; it runs when a heygem-ops daemon is up.

    Exit code: 0 queued (with --wait: succeeded), 1 failed/cancelled/timed out, 2 bad input.

    \b
    Examples:
      heygem-ops submit speech.wav face.mp4 --wait
      heygem-ops submit speech.wav face.mp4 --out /data/out/42.mp4 --code task-42 --json
    """
    from heygem.jobs import DuplicateCode, OutputNameTooLong
    from rich.text import Text

    if output is not None and not output.parent.is_dir():
        _fail(f"--out {output}: folder {output.parent} does not exist")
    store = _store(env)
    try:
        job = store.submit(str(audio), str(video), None if output is None else str(output), code)
    except (DuplicateCode, OutputNameTooLong) as err:
        _fail(str(err))
    if not store.shared and not _daemon_running(env):  # a shared store: any host's daemon runs it
        click.echo(f"warning: job {job.id} is queued, but no heygem-ops daemon is running: it starts when one "
                   "does (`heygem-ops start` or `systemctl start heygem-ops`)", err=True)
    if not wait:
        if as_json:
            emit_json(job.to_dict())
        else:
            console().print(Text(f"job {job.id} queued (code {job.code})"))
        return
    job = _wait(env, job, timeout_s, show=not as_json)
    if as_json:
        emit_json(job.to_dict())
    elif job.state == "succeeded":
        console().print(Text.assemble((f"job {job.id} succeeded:", "green"), f" {job.result}"))
    elif job.state in ("failed", "cancelled"):
        console().print(Text.assemble((f"job {job.id} {job.state}:", "red"), f" {job.reason}"))  # paths: foreign text
    else:
        console().print(Text(f"job {job.id} still {job.state} ({job.progress} %, {job.stage}) after "
                             f"{timeout_s:g} s; it keeps going: `heygem-ops jobs`", style="yellow"))
    raise click.exceptions.Exit(OK if job.state == "succeeded" else PROBLEM)


def _wait(env, job, timeout_s: float, show: bool):
    """Poll the store until the job ends or `timeout_s` passes; a progress bar when `show`."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from heygem.jobs import TERMINAL

    store = _store(env)
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn(f"job {job.id}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[stage]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console(), disable=not show, transient=False) as bar:
        task = bar.add_task("", total=100, completed=job.progress, stage=f"{job.state}: {job.stage}")
        while job.state not in TERMINAL and time.monotonic() < deadline:
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            job = store.get(job.id)
            bar.update(task, completed=job.progress, stage=f"{job.state}: {job.stage}")
    return job


@click.command()
@click.option("--state", help="Only jobs in this state: queued, running, succeeded, failed, cancelled.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Newest N jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of jobs.")
@click.pass_obj
def jobs(env, state: Optional[str], limit: int, as_json: bool) -> None:
    """List jobs, newest first: state, progress, stage, attempts, age, result or reason.

    \b
    Examples:
      heygem-ops jobs
      heygem-ops jobs --state failed --limit 10
      heygem-ops jobs --json | jq '.[] | select(.state == "running") | .progress'
    """
    from heygem.jobs import STATES

    if state is not None and state not in STATES:
        raise click.BadParameter(f"{state!r}; one of {', '.join(STATES)}", param_hint="'--state'")
    store = _store(env)
    found = store.list(state, limit)
    # a queued job's place in line: claims (a replica's, or the front's toward upstream) take the oldest first
    positions = {job.id: i + 1 for i, job in enumerate(sorted(store.list("queued", 1 << 30), key=lambda j: j.id))} \
        if any(job.state == "queued" for job in found) else {}
    if as_json:
        emit_json([{**job.to_dict(), **({"position": positions[job.id]} if job.id in positions else {})} for job in found])
        return
    out = console()
    if not found:
        out.print(f"no {state + ' ' if state else ''}jobs")
        return
    from rich.table import Table
    from rich.text import Text

    from ops.context import age

    table = Table(title=f"{len(found)} job(s), newest first", title_justify="left")
    fleet = ("host",) if store.shared else ()  # a shared store: which host holds (or last held) each job
    for column in ("id", "code", "state", "progress", "stage", "attempts", "age", *fleet):
        table.add_column(column, justify="right" if column in ("id", "progress", "attempts") else "left", no_wrap=True)
    table.add_column("result or reason", overflow="fold", ratio=1)
    now = time.time()
    for job in found:
        style = STATE_STYLE[job.state]
        stage = f"{job.stage}, position {positions[job.id]}" if job.id in positions else job.stage
        table.add_row(str(job.id), Text(job.code), Text(job.state, style=style), f"{job.progress} %", Text(stage),
                      str(job.attempts), age(now - job.created_at), *[Text(job.host or "-") for _ in fleet],
                      Text(_outcome(job), style=style))
    out.print(table)


@click.command()
@click.argument("job_id", metavar="ID", type=int)
@click.pass_obj
def cancel(env, job_id: int) -> None:
    """Cancel a queued or running job (a running one stops at its worker's next batch).

    Exit code: 0 cancelled, 1 it had already ended, 2 no such job.

    \b
    Example:
      heygem-ops cancel 42
    """
    from heygem.jobs import JobNotFound

    store = _store(env)
    try:
        cancelled = store.cancel(job_id)
    except JobNotFound:
        _fail(f"no job {job_id}")
    if not cancelled:
        click.echo(f"job {job_id} had already ended: {store.get(job_id).state}")
        raise click.exceptions.Exit(PROBLEM)
    click.echo(f"job {job_id} cancelled")
