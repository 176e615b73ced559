"""`heygem-ops zombies --json` against the runbook's `ps aux | grep defunct | wc -l`, side by side.

Makes N real zombies (a helper parent that never waits; stopped and reaped at the end), then times
each way of counting them, interleaved, and prints medians with ratios to the `ps` pipeline. The
floor rows (bare interpreter, `import ops.cli`) show where a Python CLI's cold start goes.

    .venv/bin/python benchmarks/bench_zombies.py [--zombies 20] [--runs 20]
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
from typing import Callable

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from procs_helpers import ZombieMaker  # noqa: E402

from watchdog import procs  # noqa: E402

VENV = ROOT / ".venv" / "bin"
PY = str(VENV / "python") if (VENV / "python").exists() else sys.executable
CLI = str(VENV / "heygem-ops")


def _psutil_scan() -> int:
    return sum(1 for p in psutil.process_iter(["status"]) if p.info["status"] == psutil.STATUS_ZOMBIE)


def _zombies_grouped() -> int:
    return sum(len(g.zombies) for g in procs.by_parent(procs.zombies()))


# Installed packages run from cached bytecode; this checkout may be run with PYTHONDONTWRITEBYTECODE=1,
# which recompiles our modules on every start. Cache bytecode outside the tree for the "cached" rows.
PYC_DIR = tempfile.mkdtemp(prefix="bench-zombies-pyc-")
CACHED = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, "PYTHONPYCACHEPREFIX": PYC_DIR}
UNCACHED = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def _subprocess(argv: list[str], count: Callable[[str], int | None], env: dict = CACHED) -> Callable[[], int | None]:
    def run() -> int | None:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env).stdout
        return count(out)

    return run


CASES = [
    ("ps aux | grep defunct | wc -l", _subprocess(["sh", "-c", "ps aux | grep defunct | wc -l"], lambda out: int(out))),
    ("heygem-ops zombies --json", _subprocess([CLI, "zombies", "--json"], lambda out: json.loads(out)["total"])),
    ("  same, no .pyc (PYTHONDONTWRITEBYTECODE=1)", _subprocess([CLI, "zombies", "--json"], lambda out: json.loads(out)["total"], UNCACHED)),
    ("  floor: python -I -S -c pass", _subprocess([PY, "-I", "-S", "-c", "pass"], lambda out: None)),
    ("  floor: python -c pass (venv site)", _subprocess([PY, "-c", "pass"], lambda out: None)),
    ("  floor: python -c 'import ops.cli'", _subprocess([PY, "-c", "import ops.cli"], lambda out: None)),
    ("  python -c 'import psutil'", _subprocess([PY, "-c", "import psutil"], lambda out: None)),
    ("in-process procs.zombies() + by_parent", _zombies_grouped),
    ("in-process psutil.process_iter scan", _psutil_scan),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zombies", type=int, default=20)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    maker = ZombieMaker(args.zombies)
    try:
        times: dict[str, list[float]] = {name: [] for name, _ in CASES}
        counts: dict[str, int | None] = {}
        for _ in range(args.runs):
            for name, run in CASES:
                start = time.perf_counter()
                counts[name] = run()
                times[name].append(time.perf_counter() - start)
    finally:
        maker.stop()
        shutil.rmtree(PYC_DIR)

    base = statistics.median(times[CASES[0][0]])
    print(f"{args.zombies} real zombies present, {len(psutil.pids())} processes on the host, median of {args.runs} runs")
    print(f"{'method':44} {'median ms':>10} {'vs ps':>7} {'found':>6}")
    for name, _ in CASES:
        median = statistics.median(times[name])
        found = "" if counts[name] is None else str(counts[name])
        print(f"{name:44} {median * 1000:10.2f} {median / base:6.2f}x {found:>6}")
    print("(ps counts its own `grep defunct` line too; found = zombies seen on the last run)")


if __name__ == "__main__":
    main()
