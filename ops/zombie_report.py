"""What `heygem-ops zombies` prints, click-free: it also runs on the entry point's fast path.

Replaces `ps aux | grep defunct | wc -l`: a count says nothing about whose zombies they are, and
only the parent can reap them. Imports stay in the standard library (rich only to draw a table).
"""

from __future__ import annotations

import sys

from ops.context import OK, PROBLEM, USAGE, age, console, emit_json


def report(as_json: bool, root: int | None) -> int:
    """Print the zombies (of `root`'s tree, or the host) as JSON or a table; return the exit code."""
    from watchdog import procs

    try:
        groups = procs.by_parent(procs.zombies(root))
    except ProcessLookupError:
        print(f"error: no process with pid {root}", file=sys.stderr)
        return USAGE
    total = sum(len(g.zombies) for g in groups)
    if as_json:
        emit_json({"total": total, "groups": [_group_json(g) for g in groups]})
    else:
        _print_table(groups, total, root)
    return PROBLEM if total else OK


def _group_json(group) -> dict:
    first = group.zombies[0]
    return {
        "ppid": group.ppid,
        "parent_name": first.parent_name,
        "parent_cmdline": group.parent_cmdline,
        "parent_user": first.parent_user,
        "parent_age_s": None if group.parent_age_s is None else round(group.parent_age_s, 1),
        "count": len(group.zombies),
        "zombies": [{"pid": z.pid, "name": z.name, "state": "Z"} for z in group.zombies],
    }


def _members(zs, shown: int = 3) -> str:
    """The first few zombies; a parent with 41 of them would otherwise fill the screen."""
    text = "\n".join(f"{z.pid} ({z.name})" for z in zs[:shown])
    return text + (f"\n+{len(zs) - shown} more" if len(zs) > shown else "")


def _plain(text: str):
    """Another user's text (a command line, a process name) as rich Text: never read as markup,
    so `[/oops]` prints as it is instead of crashing the table and `[link=...]` makes no link."""
    from rich.text import Text

    return Text(text)


def _print_table(groups, total: int, root: int | None) -> None:
    where = f"in the tree of pid {root}" if root else "on this host"
    out = console()
    if not groups:
        out.print(f"no zombies {where}")
        return
    from rich.table import Table

    table = Table(title=f"{total} zombie process(es) {where}, state Z (defunct), by parent")
    for column in ("parent pid", "user", "parent age", "zombies", "zombie pids (name)"):
        table.add_column(column, justify="right" if column == "zombies" else "left")
    table.add_column("parent command", overflow="fold", ratio=1)
    for g in groups:
        first = g.zombies[0]
        table.add_row(str(g.ppid), _plain(first.parent_user or "?"), age(g.parent_age_s), str(len(g.zombies)),
                      _plain(_members(g.zombies)), _plain(g.parent_cmdline or first.parent_name or "?"))
    out.print(table)
    out.print("Only a parent can reap its zombies: make it reap, or restart it (`heygem-ops clean --dry-run` shows how).")
