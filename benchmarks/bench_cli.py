"""CLI cold start: `heygem-ops zombies --json` and `status --json` against `ps aux | grep defunct | wc -l`.

Operators run these in `watch -n 1` loops, so what counts is the whole process, interpreter start
included. Each command runs as a fresh process, interleaved with the others, and the table shows
medians with ratios to the `ps` pipeline. The floor rows show what any Python CLI pays before its
first line of code. The comparison runs twice: on the host as it is, and with 300 more (sleeping)
processes, because `ps aux` reads several /proc files and resolves a user name per process while
`zombies` reads one small file per process; a GPU server running 8 replicas has hundreds.

    .venv/bin/python benchmarks/bench_cli.py [--runs 20] [--extra 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"
PY = str(VENV / "python") if (VENV / "python").exists() else sys.executable
CLI = str(VENV / "heygem-ops")
TIMEOUT_S = 60

# An installed CLI runs from cached bytecode, while this checkout may run with
# PYTHONDONTWRITEBYTECODE=1 (every start recompiles our modules): cache it outside the tree.
SCRATCH = Path(tempfile.mkdtemp(prefix="bench-cli-"))
(SCRATCH / "config.toml").write_text(f'[daemon]\nstate_dir = "{SCRATCH / "state"}"\n')
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
       "PYTHONPYCACHEPREFIX": str(SCRATCH / "pyc"), "HEYGEM_OPS_CONFIG": str(SCRATCH / "config.toml")}

Check = Callable[[subprocess.CompletedProcess], bool]


def _json_out(codes: tuple[int, ...]) -> Check:
    """The command did its job: an expected exit code and one JSON document (a broken command is fast too)."""
    def check(done: subprocess.CompletedProcess) -> bool:
        try:
            json.loads(done.stdout)
        except ValueError:
            return False
        return done.returncode in codes

    return check


def _int_out(done: subprocess.CompletedProcess) -> bool:
    return done.stdout.strip().isdigit()


def _exit_ok(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == 0


def _status_available() -> bool:
    """`status` may not be registered yet: click then says "No such command"."""
    done = subprocess.run([CLI, "status", "--help"], capture_output=True, text=True, timeout=TIMEOUT_S, env=ENV)
    return "No such command" not in done.stderr


def cases() -> list[tuple[str, Optional[list[str]], Check]]:
    """(label, argv or None when not available, output check); the first row is the baseline."""
    status = [CLI, "status", "--json"] if _status_available() else None
    return [
        ("ps aux | grep defunct | wc -l", ["sh", "-c", "ps aux | grep defunct | wc -l"], _int_out),
        ("heygem-ops zombies --json", [CLI, "zombies", "--json"], _json_out((0, 1))),
        ("heygem-ops status --json", status, _json_out((0, 1))),
        ("heygem-ops --help", [CLI, "--help"], _exit_ok),
        ("  floor: python -c pass (venv site)", [PY, "-c", "pass"], _exit_ok),
        ("  floor: python -I -S -c pass", [PY, "-I", "-S", "-c", "pass"], _exit_ok),
    ]


def measure(table: list[tuple[str, Optional[list[str]], Check]], runs: int) -> dict[str, list[float]]:
    """Interleaved runs (load changes hit every row alike); one warm-up each fills the bytecode cache."""
    times: dict[str, list[float]] = {label: [] for label, argv, _ in table if argv}
    for round_ in range(runs + 1):
        for label, argv, check in table:
            if not argv:
                continue
            start = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=ENV)
            elapsed = time.perf_counter() - start
            if not check(done):
                raise SystemExit(f"{label} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
            if round_:
                times[label].append(elapsed)
    return times


def report(title: str, table, times: dict[str, list[float]]) -> None:
    base = statistics.median(times[table[0][0]])
    print(f"\n{title}")
    print(f"{'command':40} {'median ms':>10} {'min ms':>8} {'vs ps':>7}")
    for label, argv, _ in table:
        if not argv:
            print(f"{label:40} not available (No such command)")
            continue
        median = statistics.median(times[label])
        print(f"{label:40} {median * 1000:10.1f} {min(times[label]) * 1000:8.1f} {median / base:6.2f}x")


def _processes() -> int:
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--extra", type=int, default=300, help="sleeping processes added for the second setting")
    args = parser.parse_args()

    table = cases()
    sleepers: list[subprocess.Popen] = []
    try:
        report(f"host as is: {_processes()} processes, median of {args.runs} interleaved runs",
               table, measure(table, args.runs))
        sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(args.extra)]
        report(f"with {args.extra} extra sleeping processes: {_processes()} processes, median of {args.runs} runs",
               table, measure(table, args.runs))
    finally:
        for proc in sleepers:  # only the processes this benchmark started, by their Popen handles
            proc.kill()
        for proc in sleepers:
            proc.wait(timeout=10)
        shutil.rmtree(SCRATCH, ignore_errors=True)
    print(f"\ncommand: .venv/bin/python benchmarks/bench_cli.py --runs {args.runs} --extra {args.extra}")


if __name__ == "__main__":
    main()
