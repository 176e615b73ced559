"""`heygem-ops clean`: rid ONE service's process tree of zombies and orphaned workers.

Replaces the runbook's cleanup script, which sent SIGCHLD to every zombie's parent and then ran
`pkill -9 -f multiprocessing.spawn`: that kills every such process on the host, anyone's, with no
chance to clean up, and still leaves the zombies of a parent that does not reap. Here:

- The scope is the service's own processes: a pid's tree (`--pid`), a systemd unit's cgroup
  (`--unit`), or the heygem-ops daemon's tree from its pidfile (default). Never a command line.
- A zombie can only be reaped by its parent. The parent gets one SIGCHLD (enough when it has a
  handler that reaps); if the zombies outlive a short wait, the parent is terminated (TERM, grace,
  KILL; only with --yes or a confirmation), so its zombies are re-parented to the subreaper (the
  daemon) or init, which reap them, and its supervisor starts it again. The daemon itself is never
  nudged or stopped: it reaps its own children.
- Orphaned workers: processes that carry the root's marker `HEYGEM_OPS_DAEMON=<pid>:<start ticks>`
  in their environment (the daemon sets it for the workers it starts; children inherit it) but are
  no longer in its tree, or, under systemd, processes in the unit's cgroup that do not descend from
  its main pid. They are terminated (TERM, grace, KILL).
- Every signal goes through watchdog.procs (pid + start time verified right before sending).

`plan()` is a pure function of the observed facts, so what clean would do is unit-tested without
processes; `--dry-run` prints exactly that plan.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import click

from ops.context import OK, PROBLEM, USAGE, console, emit_json

MARKER = "HEYGEM_OPS_DAEMON"  # = watchdog.external.MARKER; not imported to keep --help light
CGROUP_ROOT = Path("/sys/fs/cgroup")
POLL_S = 0.05


@dataclass(frozen=True)
class Proc:
    """One observed process."""

    pid: int
    start_ticks: int
    ppid: int
    command: str


@dataclass(frozen=True)
class Observed:
    """What clean saw: the service's processes, zombies whose parent is one of them, orphans."""

    scope: dict[int, Proc]
    zombies: tuple[Proc, ...]
    orphans: tuple[Proc, ...]
    daemon_pid: Optional[int] = None
    main_pid: Optional[int] = None  # --unit: systemd's MainPID (0: the unit has none)


@dataclass(frozen=True)
class Step:
    """One line of the plan. `what`: nudge, restart (only if the nudge did not help), terminate, leave."""

    pid: int
    start_ticks: int
    command: str
    what: str
    signal: str
    why: str
    zombies: tuple[int, ...] = field(default=())
    descendants: tuple[tuple[int, int], ...] = field(default=())  # (pid, start ticks) stopped with it


ACTIONS = ("nudge", "restart", "terminate")


def plan(observed: Observed, grace_s: float) -> list[Step]:
    """The steps that would leave the scope without zombies and orphans (pure: no I/O).

    Per unreaping parent: a SIGCHLD nudge, then a conditional restart. Zombies of an orphan go
    with the orphan's termination; zombies of the daemon are left to it (it reaps on SIGCHLD).
    """
    kill = f"SIGTERM, SIGKILL after {grace_s:g} s"
    orphan_pids = {o.pid for o in observed.orphans}
    by_parent: dict[int, list[int]] = defaultdict(list)
    for z in observed.zombies:
        by_parent[z.ppid].append(z.pid)
    zombie_pids = {z.pid for z in observed.zombies}
    children: dict[int, list[Proc]] = defaultdict(list)
    for p in observed.scope.values():
        if p.pid not in zombie_pids:
            children[p.ppid].append(p)

    def live_descendants(pid: int) -> tuple[tuple[int, int], ...]:
        """A restarted parent takes its workers with it; left running they would be orphans."""
        found, todo = [], list(children[pid])
        while todo:
            p = todo.pop()
            found.append((p.pid, p.start_ticks))
            todo.extend(children[p.pid])
        return tuple(sorted(found))

    steps = []
    for ppid, pids in sorted(by_parent.items(), key=lambda item: (-len(item[1]), item[0])):
        parent = observed.scope.get(ppid)
        if parent is None or ppid in orphan_pids:
            continue
        zs = tuple(sorted(pids))
        count = f"{len(zs)} zombie(s)"
        if ppid == observed.daemon_pid:
            steps.append(Step(ppid, parent.start_ticks, parent.command, "leave", "-",
                              f"{count}: the heygem-ops daemon reaps its own children", zs))
            continue
        steps.append(Step(ppid, parent.start_ticks, parent.command, "nudge", "SIGCHLD",
                          f"{count}: a parent with a SIGCHLD handler reaps them now", zs))
        family = live_descendants(ppid)
        with_family = f" (with its {len(family)} live descendant(s))" if family else ""
        steps.append(Step(ppid, parent.start_ticks, parent.command, "restart", kill,
                          f"only if its zombies outlive the nudge: stop the parent{with_family}; a zombie can only "
                          "be reaped by its parent; once the parent exits they are re-parented to the subreaper "
                          "or init, which reaps them, and the service's supervisor starts the parent again",
                          zs, family))
    for o in sorted(observed.orphans, key=lambda p: p.pid):
        zs = tuple(sorted(by_parent.get(o.pid, ())))
        also = f"; its {len(zs)} zombie(s) go with it" if zs else ""
        steps.append(Step(o.pid, o.start_ticks, o.command, "terminate", kill,
                          f"orphaned worker of the service (parent now pid {o.ppid}): nobody will stop it "
                          f"and it keeps its memory and GPU memory{also}", zs))
    return steps


def has_actions(steps: list[Step]) -> bool:
    return any(s.what in ACTIONS for s in steps)


# ---- observing ---------------------------------------------------------------------------------

class _Usage(Exception):
    """A target that cannot be resolved: exit 2 with this message."""


@dataclass(frozen=True)
class Target:
    """How the scope is found again after acting: a root (pid + start ticks) or a unit. `slack`:
    how many ticks the root's identity may be off (a legacy pidfile's, converted from a create time)."""

    kind: str  # "pid" | "daemon" | "unit"
    root: Optional[tuple[int, int]] = None
    unit: Optional[str] = None
    slack: int = 0

    def describe(self) -> str:
        if self.kind == "unit":
            return f"unit {self.unit}"
        return f"the tree of {'daemon' if self.kind == 'daemon' else 'pid'} {self.root[0]}"


def _snapshot() -> dict[int, tuple]:
    """pid -> (start ticks, ppid, status, command, uid) of every process we may see (status is
    "zombie" for a zombie, else the kernel's state letter)."""
    from watchdog.procs import _cmdline, _scan, real_uid

    out = {}
    for pid, st in _scan().items():
        command = _cmdline(pid) or f"[{st.name}]"
        out[pid] = (st.start_ticks, st.ppid, "zombie" if st.state == "Z" else st.state, command, real_uid(pid))
    return out


def _tree(root: int, snap: dict[int, tuple]) -> set[int]:
    """`root` and its descendants that the snapshot saw (empty when the root is gone)."""
    import psutil

    from watchdog.procs import tree

    try:
        return {ref.pid for ref in tree(root)} & snap.keys()
    except psutil.NoSuchProcess:
        return set()


def _marker(pid: int) -> Optional[tuple[int, int, int]]:
    """The daemon identity in the process's environment as (pid, start ticks, slack), or None
    (unmarked, unreadable, gone). `<pid>:<ticks>` is exact; `<pid>:<create time>` (a float, what
    earlier versions wrote) is converted and matched within a second."""
    from watchdog.procs import LEGACY_SLACK_TICKS, ticks_of_create_time

    prefix = f"{MARKER}=".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    for entry in env.split(b"\0"):
        if entry.startswith(prefix):
            pid_s, _, started = entry[len(prefix):].decode(errors="replace").partition(":")
            try:
                if started.isdecimal():
                    return int(pid_s), int(started), 0
                return int(pid_s), ticks_of_create_time(float(started)), LEGACY_SLACK_TICKS
            except (ValueError, OSError):
                return None
    return None


def _same_identity(a: tuple[int, int], b: tuple[int, int], slack: int = 0) -> bool:
    return a[0] == b[0] and abs(a[1] - b[1]) <= slack


def _unit_cgroup(unit: str) -> tuple[int, Path]:
    """The unit's main pid (0 when none) and cgroup v2 folder, asked from systemd."""
    import shutil
    import subprocess

    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise _Usage(f"--unit {unit}: systemctl not found; this host does not run systemd (use --pid PID)")
    try:
        result = subprocess.run([systemctl, "show", "-p", "MainPID", "-p", "ControlGroup", "--", unit],
                                capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        raise _Usage(f"--unit {unit}: systemctl show did not answer within 10 s") from None
    if result.returncode != 0:
        raise _Usage(f"--unit {unit}: systemctl show failed: {result.stderr.strip() or result.returncode}")
    props = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    group = props.get("ControlGroup", "")
    if not group:
        raise _Usage(f"--unit {unit}: the unit has no control group (unknown unit, or not running)")
    if not group.rstrip("/").endswith((".service", ".scope")):  # a slice (or the root) holds other services
        raise _Usage(f"--unit {unit}: control group {group} is not one service's; name a .service unit")
    path = CGROUP_ROOT / group.lstrip("/")
    if not (path / "cgroup.procs").is_file():
        raise _Usage(f"--unit {unit}: {path}/cgroup.procs not found (cgroup v2 required; use --pid PID)")
    return int(props.get("MainPID") or 0), path


def _cgroup_pids(path: Path) -> set[int]:
    """Every process in the cgroup and its sub-cgroups."""
    pids = set()
    for folder, _, files in os.walk(path):
        if "cgroup.procs" in files:
            try:
                pids.update(int(line) for line in Path(folder, "cgroup.procs").read_text().split())
            except OSError:
                continue
    return pids


def observe(target: Target, daemon: Optional[tuple[int, int]]) -> Observed:
    """Read the live system for `target`; `daemon` is the live daemon's identity, if any."""
    snap = _snapshot()

    def proc(pid: int) -> Proc:
        created, ppid, _, command, _ = snap[pid]
        return Proc(pid, created, ppid, command)

    def live(pid: int) -> bool:
        return pid in snap and snap[pid][2] != "zombie"

    def root_alive(root: tuple[int, int]) -> bool:
        return root[0] in snap and _same_identity((root[0], snap[root[0]][0]), root, target.slack)

    if target.kind == "unit":
        main, path = _unit_cgroup(target.unit)
        tree = _tree(main, snap) if main in snap else set()
        cgroup = {pid for pid in _cgroup_pids(path) if pid in snap}
        scope = tree | cgroup
        orphan_pids = {pid for pid in cgroup - tree if live(pid)}
    else:
        scope = _tree(target.root[0], snap) if root_alive(target.root) else set()
        me = os.getuid()
        orphan_pids = {
            pid for pid, (_, _, status, _, uid) in snap.items()
            if uid == me and pid not in scope and status != "zombie"
            and (mark := _marker(pid)) is not None and _same_identity(mark[:2], target.root, mark[2] + target.slack)
        }
    everyone = scope | orphan_pids
    zombies = tuple(proc(pid) for pid, info in snap.items() if info[2] == "zombie" and info[1] in everyone)
    parents = {pid: proc(pid) for pid in everyone if pid in snap}
    daemon_pid = daemon[0] if daemon and daemon[0] in scope else None
    return Observed(parents, zombies, tuple(parents[p] for p in sorted(orphan_pids)), daemon_pid,
                    main if target.kind == "unit" else None)


# ---- acting ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Done:
    pid: int
    action: str
    result: str


def _zombies_left(pids: tuple[int, ...], parent: Optional[int] = None) -> dict[int, int]:
    """Which of `pids` are still zombies (of `parent`, when given), with their parent now. A
    zombie's pid cannot be reused until it is reaped, so a pid that is no longer a zombie was reaped."""
    import psutil

    left = {}
    for pid in dict.fromkeys(pids):
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE and (parent is None or p.ppid() == parent):
                left[pid] = p.ppid()
        except psutil.NoSuchProcess:
            continue
    return left


def _wait_reaped(pids: tuple[int, ...], parent: Optional[int], wait_s: float) -> dict[int, int]:
    deadline = time.monotonic() + wait_s
    while True:
        left = _zombies_left(pids, parent)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_S)


def apply(steps: list[Step], grace_s: float, wait_s: float, confirm: Callable[[Step], bool]) -> list[Done]:
    """Carry out the plan: orphans, nudges, then restarts of the parents whose zombies stayed."""
    import signal

    from watchdog.escalation import RESTART, escalate
    from watchdog.procs import ProcRef, send, terminate

    done = []
    orphans = [s for s in steps if s.what == "terminate"]
    if orphans:
        result = terminate([ProcRef(s.pid, s.start_ticks) for s in orphans], grace_s)
        outcome = {ref.pid: how for how, refs in result.items() for ref in refs}
        done += [Done(s.pid, "terminate", outcome.get(s.pid, "gone")) for s in orphans]
    nudged = []
    for s in (s for s in steps if s.what == "nudge"):
        if send(ProcRef(s.pid, s.start_ticks), signal.SIGCHLD):
            nudged.append(s)
        else:
            done.append(Done(s.pid, "nudge", "parent gone (or pid reused): not signalled"))
    nudged_at = time.monotonic()
    deadline = nudged_at + wait_s
    for s in nudged:
        left = _wait_reaped(s.zombies, s.pid, max(0.0, deadline - time.monotonic()))
        reaped = len(s.zombies) - len(left)
        done.append(Done(s.pid, "nudge", f"SIGCHLD sent; {reaped} reaped, {len(left)} remain"))
        if not left:
            continue
        # The daemon's escalation, with the operator as the judge of whether a restart pays.
        restart = next(r for r in steps if r.what == "restart" and r.pid == s.pid)
        if escalate(nudged_at, max(time.monotonic(), deadline), wait_s, restart_ok=confirm(restart)) != RESTART:
            done.append(Done(s.pid, "restart", "skipped: SIGCHLD did not help; rerun with --yes to restart it"))
            continue
        parent = ProcRef(s.pid, s.start_ticks)
        result = terminate([parent, *(ProcRef(*d) for d in restart.descendants)], grace_s)
        how = next(how for how, refs in result.items() if parent in refs)
        if restart.descendants:
            how += f" with {len(restart.descendants)} descendant(s)"
        left = _wait_reaped(tuple(left), None, wait_s)
        after = f"; {len(left)} zombie(s) still unreaped by their new parent" if left else "; its zombies were reaped"
        done.append(Done(s.pid, "restart", f"{how}{after}"))
    return done


# ---- the command -------------------------------------------------------------------------------

def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(USAGE)


def _resolve(env, pid: Optional[int], unit: Optional[str]) -> tuple[Target, Optional[tuple[int, int]]]:
    """The target and the live daemon's identity (from its pidfile), or exit 2."""
    import psutil

    from watchdog.procs import ProcRef
    from watchdog.state import StatePaths, read_pidfile

    from watchdog.procs import LEGACY_SLACK_TICKS

    record = read_pidfile(StatePaths(env.config.state_dir()))
    live = record.ref() if record else None
    daemon = (live.pid, live.start_ticks) if live else None
    if record is not None and not pid and not unit and (why := record.untrusted()):
        _fail(f"{StatePaths(env.config.state_dir()).pidfile}: {why}")
    if unit:
        return Target("unit", unit=unit if "." in unit else f"{unit}.service"), daemon
    if pid:
        try:
            ref = ProcRef.of(pid)
        except psutil.NoSuchProcess:
            _fail(f"no process with pid {pid}")
        return Target("pid", root=(ref.pid, ref.start_ticks)), daemon
    if record is None:
        _fail(f"no daemon pidfile in {env.config.state_dir()}: name the service with --pid PID or --unit NAME")
    # A dead daemon still names its orphans: they carry its identity in their environment.
    return Target("daemon", root=daemon or (record.pid, record.start_ticks),
                  slack=LEGACY_SLACK_TICKS if record.legacy and not daemon else 0), daemon


def _print_plan(target: Target, steps: list[Step]) -> None:
    from rich.table import Table
    from rich.text import Text

    out = console()
    if not steps:
        out.print(Text(f"nothing to clean in {target.describe()}: no zombies, no orphaned workers"))
        return
    table = Table(title=Text(f"plan for {target.describe()}"), title_justify="left")
    table.add_column("pid", no_wrap=True)
    table.add_column("command", overflow="ellipsis", no_wrap=True, max_width=48)
    table.add_column("what", no_wrap=True)
    table.add_column("signal")
    table.add_column("why", overflow="fold", ratio=1)
    style = {"nudge": "yellow", "restart": "red", "terminate": "red", "leave": "dim"}
    for s in steps:
        table.add_row(str(s.pid), Text(" ".join(s.command.split())), Text(s.what, style=style[s.what]), s.signal, Text(s.why))
    out.print(table)


def _print_done(done: list[Done], remaining: list[Step], leftover: dict[int, int]) -> None:
    from rich.table import Table

    out = console()
    if done:
        table = Table(title="done", title_justify="left")
        for column in ("pid", "action", "result"):
            table.add_column(column, overflow="fold")
        for d in done:
            table.add_row(str(d.pid), d.action, d.result)
        out.print(table)
    if has_actions(remaining) or leftover:
        problems = list({
            s.pid: f"orphan {s.pid} still runs" if s.what == "terminate" else f"pid {s.pid} keeps {len(s.zombies)} zombie(s)"
            for s in remaining if s.what in ACTIONS
        }.values())
        for ppid in sorted(set(leftover.values())):
            pids = " ".join(str(pid) for pid, parent in leftover.items() if parent == ppid)
            problems.append(f"zombie(s) {pids} re-parented to pid {ppid}, which does not reap them: run the "
                            "service under the heygem-ops daemon (a subreaper) or an init that reaps")
        out.print("[red]problems remain:[/] " + "; ".join(problems))
    else:
        out.print("[green]clean:[/] no zombies and no orphaned workers left")


@click.command()
@click.option("--pid", "pid", type=click.IntRange(min=1), help="Root of the service's process tree (e.g. `python app.py`).")
@click.option("--unit", help="A systemd unit: its cgroup is the scope (e.g. heygem-ops).")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing (exit 1 when it has actions).")
@click.option("--yes", is_flag=True, help="Restart a parent whose zombies outlive SIGCHLD without asking; with --unit, "
              "also act on a unit that has no main process (every process of its cgroup is then an orphan).")
@click.option("--nudge-wait", "wait_s", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds to give nudged parents to reap (and re-parented zombies to be reaped).")
@click.option("--json", "as_json", is_flag=True, help="Print {target, plan, done, remaining, clean} as JSON.")
@click.pass_obj
def clean(env, pid: Optional[int], unit: Optional[str], dry_run: bool, yes: bool, wait_s: float, as_json: bool) -> None:
    """Clean the service's own process tree: reap zombies, stop orphaned workers.

    The scope is --pid's tree, --unit's cgroup, or by default the heygem-ops daemon's tree (from
    its pidfile). Never matches command lines: other processes on the host are never touched.
    The plan is printed first. A zombie's parent gets SIGCHLD; only if its zombies stay is it
    restarted (SIGTERM, grace, SIGKILL), with --yes or after confirming. A --unit with no main
    process is refused (exit 2) unless --yes: all of its cgroup would count as orphans.

    Exit code: 0 clean (dry run: nothing to do), 1 problems remain (dry run: the plan has actions),
    2 unknown pid/unit, no daemon, a unit without a main process (without --yes), or an untrusted
    pidfile.

    \b
    Examples:
      heygem-ops clean --dry-run               what would be done to the daemon's tree
      heygem-ops clean --pid 4242 --yes        zombies under `python app.py` (pid 4242)
      heygem-ops clean --unit heygem-ops --json
    """
    if pid and unit:
        _fail("give --pid or --unit, not both")
    grace_s = env.config.actions.term_grace_s
    try:
        target, daemon = _resolve(env, pid, unit)
        observed = observe(target, daemon)
        steps = plan(observed, grace_s)
    except _Usage as err:
        _fail(str(err))
    if target.kind == "unit" and not observed.main_pid and has_actions(steps) and not (yes or dry_run):
        _fail(f"--unit {target.unit} has no main process (MainPID=0), so every process in its control group "
              f"counts as an orphan and would be terminated ({len(observed.orphans)} of them); check "
              f"`systemctl status {target.unit}`, `heygem-ops clean --unit {target.unit} --dry-run` shows the plan, "
              "and --yes carries it out")
    doc = {"target": target.describe(), "dry_run": dry_run, "plan": [asdict(s) for s in steps]}
    if not as_json:
        _print_plan(target, steps)
    if dry_run:
        if as_json:
            emit_json(doc)
        raise click.exceptions.Exit(PROBLEM if has_actions(steps) else OK)

    def confirm(step: Step) -> bool:
        if yes:
            return True
        return sys.stdin.isatty() and click.confirm(
            f"pid {step.pid} ({step.command}) keeps {len(step.zombies)} zombie(s) after SIGCHLD; restart it?", err=True)

    done = apply(steps, grace_s, wait_s, confirm) if has_actions(steps) else []
    try:
        after = observe(target, daemon)
    except _Usage as err:
        _fail(str(err))
    remaining = plan(after, grace_s)
    # zombies handed out of the scope by a restart, to a new parent that does not reap them
    left = _zombies_left(tuple(z for s in steps if s.what in ACTIONS for z in s.zombies))
    leftover = {pid: ppid for pid, ppid in left.items() if ppid not in after.scope}
    ok = not has_actions(remaining) and not leftover
    if as_json:
        emit_json(doc | {"done": [asdict(d) for d in done], "remaining": [asdict(s) for s in remaining],
                         "unreaped": [{"pid": pid, "ppid": ppid} for pid, ppid in leftover.items()], "clean": ok})
    else:
        _print_done(done, remaining, leftover)
    raise click.exceptions.Exit(OK if ok else PROBLEM)
