"""`heygem-ops gpu`: per-GPU load and the processes holding GPU memory, straight from NVML.

Replaces `nvidia-smi --query-gpu=...` and `watch -n 1 nvidia-smi`: one NVML session in this
process instead of a fork per refresh, and each GPU process named by user and command line, so an
orphaned worker that still holds 40 GB is visible at a glance. Heavy imports happen inside the
command: `heygem-ops --help` imports this module.
"""

from __future__ import annotations

import time
from typing import Optional

import click

from ops.context import PROBLEM, console, emit_json

STATUS_STYLE = {"zombie": "red", "gone": "red", "other pid namespace": "yellow"}


def _num(value: Optional[float], unit: str) -> str:
    return "n/a" if value is None else f"{value:.0f}{unit}"


def render(info, rules):
    """One frame: a GPU table, then a process table, then the idle-but-busy hint if it applies."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from watchdog.gpu import idle_busy

    stuck = {g.index for g in idle_busy(info.gpus, rules.gpu_idle_util_pct, rules.gpu_busy_mem_mib)}
    cuda = info.cuda_driver_version or "n/a"
    gpus = Table(title=f"driver {info.driver_version}  CUDA {cuda}  {time.strftime('%H:%M:%S')}", title_justify="left")
    for header in ("GPU", "name", "UUID", "util", "memory used / total", "temp", "power", "state"):
        gpus.add_column(header, justify="right" if header in ("GPU", "util", "temp", "power") else "left")
    for g in info.gpus:
        if g.index in stuck:
            state = "[red]idle, memory held[/]"
        else:
            state = "n/a" if g.util_pct is None else "idle" if g.util_pct <= rules.gpu_idle_util_pct else "busy"
        gpus.add_row(
            str(g.index), Text(g.name), g.uuid, _num(g.util_pct, " %"),
            f"{g.mem_used_mib:.0f} / {g.mem_total_mib:.0f} MiB", _num(g.temperature_c, " °C"), _num(g.power_w, " W"), state,
        )
    procs = Table(title="processes using GPU memory", title_justify="left")
    for header in ("GPU", "pid", "GPU memory", "user", "status"):
        procs.add_column(header, justify="right" if header in ("GPU", "pid", "GPU memory") else "left", no_wrap=True)
    procs.add_column("command", overflow="ellipsis", no_wrap=True)
    for g in info.gpus:
        for p in g.processes:
            procs.add_row(
                str(g.index), str(p.pid), _num(p.used_mib, " MiB"), Text(p.user or "-"),
                Text(p.status, style=STATUS_STYLE.get(p.status, "")), Text(p.cmdline or "-"),  # Text: no markup
            )
    parts = [gpus, procs if procs.row_count else "no processes hold GPU memory"]
    if stuck:
        parts.append(
            f"[red]GPU {', '.join(map(str, sorted(stuck)))}: memory held at <= {rules.gpu_idle_util_pct:g} % utilisation: "
            "work is stuck or running on the CPU. Check with `heygem-ops doctor`.[/]"
        )
    return Group(*parts)


def _watch(nvml, interval: float, rules) -> None:
    """Redraw in place every `interval` seconds until Ctrl-C, on the one NVML session."""
    from rich.live import Live

    try:
        with Live(render(nvml.sample(), rules), console=console(), auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(nvml.sample(), rules), refresh=True)
    except KeyboardInterrupt:
        pass


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
@click.option("--watch", "interval", type=click.FloatRange(min=0.1), metavar="SECONDS", help="Redraw every SECONDS until Ctrl-C.")
@click.pass_obj
def gpu(env, as_json: bool, interval: Optional[float]) -> None:
    """Per-GPU utilisation, memory, temperature, power, and the processes using each GPU.

    A GPU that holds memory at (near) 0 % utilisation is marked: that is how the stuck service
    looked. Exit 1 when NVML cannot be used (no driver).

    \b
    Examples:
      heygem-ops gpu               one table, like nvidia-smi
      heygem-ops gpu --watch 1     redraw every second until Ctrl-C, like watch nvidia-smi
      heygem-ops gpu --json        the same data for scripts
    """
    from watchdog.gpu import Nvml, NvmlUnavailable, to_dict

    if as_json and interval is not None:
        raise click.UsageError("--json and --watch cannot be combined")
    rules = None if as_json else env.config.rules
    try:
        with Nvml() as nvml:
            if as_json:
                emit_json(to_dict(nvml.sample()))
            elif interval is None:
                console().print(render(nvml.sample(), rules))
            else:
                _watch(nvml, interval, rules)
    except NvmlUnavailable as err:
        click.echo(f"error: {err}", err=True)
        raise click.exceptions.Exit(PROBLEM) from None
