"""CLI cold start: `heygem-ops zombies --json` (and `status --json`) against `ps aux | grep defunct | wc -l`.

Operators run these in `watch -n 1` loops, so what counts is the whole process, interpreter start
included. Each command runs as a fresh process, interleaved with the others, with real zombies
present (a helper parent that never waits), and the table shows medians with ratios to the `ps`
pipeline. The CLI is measured twice: as operators install it (a wheel, built here into a scratch
venv whose dependencies come from .venv) and as this checkout's editable install, whose import
finder alone costs more than the whole `ps` pipeline. The floor rows show what any Python CLI pays
before its first line of code.

The comparison repeats with more (sleeping) processes on the host, because `ps aux` reads several
/proc files and resolves a user per process while `zombies` reads one small file per process: the
crossover is a process count, and a GPU server running 8 replicas, with its kernel threads, has
hundreds to thousands.

    .venv/bin/python benchmarks/bench_cli.py [--runs 20] [--zombies 20] [--extra 300 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.support.procs_helpers import ZombieMaker  # noqa: E402

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


def wheel_venv() -> Path:
    """A scratch venv with this project installed from a wheel, as `pip install .` would; its
    dependencies come from .venv through a path entry (whose own .pth files stay unprocessed)."""
    venv = SCRATCH / "venv"
    subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(SCRATCH / "wheel"), str(ROOT)], check=True)
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheel = next((SCRATCH / "wheel").glob("heygem_ops-*.whl"))
    subprocess.run([PY, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "heygem-ops-bench-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


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


def _exit_code(code: int) -> Check:
    return lambda done: done.returncode == code


def _status_available() -> bool:
    """`status` may not be registered yet: click then says "No such command"."""
    done = subprocess.run([CLI, "status", "--help"], capture_output=True, text=True, timeout=TIMEOUT_S, env=ENV)
    return "No such command" not in done.stderr


def cases(wheel: Path) -> list[tuple[str, Optional[list[str]], Check]]:
    """(label, argv or None when not available, output check); the first row is the baseline."""
    status = [CLI, "status", "--json"] if _status_available() else None
    found = _json_out((1,))  # real zombies are present: exit 1
    return [
        ("ps aux | grep defunct | wc -l", ["sh", "-c", "ps aux | grep defunct | wc -l"], _int_out),
        ("heygem-ops zombies --json (wheel)", [str(wheel / "heygem-ops"), "zombies", "--json"], found),
        ("heygem-ops zombies --json (editable)", [CLI, "zombies", "--json"], found),
        ("heygem-ops zombies (table, wheel)", [str(wheel / "heygem-ops"), "zombies"], _exit_code(1)),
        ("heygem-ops status --json (editable)", status, _json_out((0, 1))),
        ("heygem-ops --help (editable)", [CLI, "--help"], _exit_code(0)),
        ("  floor: python -I -S -c pass", [PY, "-I", "-S", "-c", "pass"], _exit_code(0)),
        ("  floor: python -c pass (wheel venv)", [str(wheel / "python"), "-c", "pass"], _exit_code(0)),
        ("  floor: python -c pass (editable venv)", [PY, "-c", "pass"], _exit_code(0)),
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
    print(f"{'command':42} {'median ms':>10} {'min ms':>8} {'vs ps':>7}")
    for label, argv, _ in table:
        if not argv:
            print(f"{label:42} not available (No such command)")
            continue
        median = statistics.median(times[label])
        print(f"{label:42} {median * 1000:10.1f} {min(times[label]) * 1000:8.1f} {median / base:6.2f}x")


def _processes() -> int:
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--zombies", type=int, default=20, help="real zombies present during every run")
    parser.add_argument("--extra", type=int, nargs="*", default=[300, 1000], help="sleeping processes added, one setting each")
    args = parser.parse_args()

    sleepers: list[subprocess.Popen] = []
    maker = ZombieMaker(args.zombies)
    try:
        table = cases(wheel_venv())
        report(f"host as is: {_processes()} processes ({args.zombies} zombies), median of {args.runs} interleaved runs",
               table, measure(table, args.runs))
        for extra in args.extra:
            sleepers += [subprocess.Popen(["sleep", "600"]) for _ in range(extra - len(sleepers))]
            report(f"with {len(sleepers)} extra sleeping processes: {_processes()} processes, median of {args.runs} runs",
                   table, measure(table, args.runs))
    finally:
        for proc in sleepers:  # only the processes this benchmark started, by their Popen handles
            proc.kill()
        for proc in sleepers:
            proc.wait(timeout=10)
        maker.stop()
        shutil.rmtree(SCRATCH, ignore_errors=True)
    print(f"\ncommand: .venv/bin/python benchmarks/bench_cli.py --runs {args.runs} --zombies {args.zombies} --extra {' '.join(map(str, args.extra))}")


if __name__ == "__main__":
    main()
