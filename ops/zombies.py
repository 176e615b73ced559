"""`heygem-ops zombies` for click: its options and help. The report itself is ops/zombie_report.py,
which the entry point also calls directly for a well-formed invocation (ops/cli.py)."""

from __future__ import annotations

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print {\"total\": N, \"groups\": [...]} instead of a table.")
@click.option("--pid", "root", type=click.IntRange(min=1), help="Only zombies in this process's tree (it and its descendants).")
def zombies(as_json: bool, root: int | None) -> None:
    """List zombie (defunct) processes, grouped by parent, with the total.

    A zombie is a child that exited and whose parent never reaped it. Only that parent can: fix or
    restart the parent (`heygem-ops clean`); signalling the zombie does nothing.

    Exit code: 0 none, 1 zombies found, 2 PID does not exist.

    \b
    Examples:
      heygem-ops zombies                 table of every zombie on the host
      heygem-ops zombies --pid 4242      only under process 4242 (e.g. `python app.py`)
      heygem-ops zombies --json | jq .total
    """
    from ops.zombie_report import report

    raise click.exceptions.Exit(report(as_json, root))
