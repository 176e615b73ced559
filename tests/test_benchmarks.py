"""Every benchmark runs as BENCHMARKS.md writes it: its smallest case, the way a user runs it.

`.venv/bin/python benchmarks/bench_x.py ARGS` from the repository root (here: this interpreter),
exit 0, and its result printed. A new benchmarks/bench_*.py must add its row to SMALLEST (the
completeness test fails until it does). Benchmarks import nothing from tests/: run as scripts,
tests/ is not on their path and its modules expect pytest's (test_pipeline's `from conftest
import ROOT` broke bench_batch.py); shared harnesses live in benchmarks/support/.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

# script -> (smallest valid arguments, a regular expression its printed result must match)
SMALLEST: dict[str, tuple[list[str], str]] = {
    "bench_ring.py": (["--frames", "10", "--reps", "1", "--shape", "72x128x3"], r"(?m)^ring\s+\d+\.\d"),
    # one claimer, one round, a few calls; the PostgreSQL column reads nan where it cannot run
    "bench_store.py": (["--jobs", "20", "--claimers", "1", "--rounds", "1", "--calls", "5", "--pickups", "2"],
                       r"(?m)^claims/s, 1 claimer\s+\d+\.\d\s+(\d+\.\d|nan)"),
    "bench_conversions.py": (["--batches", "2"], r"(?m)^batch, tuned\s+\d+\.\d\d"),
    "bench_gpu_query.py": (["--samples", "1", "--runs", "1"], r"(?m)^Nvml\.sample\(\) in process.*\d+\.\d\dms"),
    "bench_sessions.py": (["--runs", "1"], r"(?m)^heygem-ops doctor --json\s+\d+\.\d\d"),
    "bench_cli.py": (["--runs", "1", "--zombies", "1", "--extra"], r"(?m)^heygem-ops zombies --json \(wheel\)\s+\d+\.\d"),
    "bench_pipeline.py": (["--jobs", "1", "--seconds", "0.5", "--size", "160x96", "--heavier", "1", "--rounds", "1"],
                          r"(?m)^pipeline, 1 replica\s+\d+\.\d"),
    # a window must hold at least one 0.5 s tick: 1.5 s is the shortest that always measures
    "bench_daemon.py": (["--windows", "1", "--window-s", "1.5", "--orphans", "1", "--faults", "1"],
                        r"(?m)^SIGKILL stage -> worker_dead alert\s+\d+\.\d"),
    # the chaos run always injects its whole plan (and submits 2 more jobs for the daemon kill);
    # one job and no pause between faults is the least. Row: run, succeeded, failed (none).
    "bench_batch.py": (["--jobs", "1", "--pace", "0"], r"(?m)^chaos\s+\d+\s+0\s"),
    # one replica hung and healed, a few idle ticks per mode; no baseline checkout
    "bench_heal.py": (["--replicas", "1", "--ticks", "5", "--idle-s", "2"], r"(?s)this tree\W+1\W+\d+\.\d.*embedded\W+\d+\.\d\d"),
    # a few requests each way and one hang; rows: submit/query medians, then the hang's seconds
    "bench_front.py": (["--requests", "10", "--hangs", "1", "--warmup", "1"],
                       r"(?s)submit\W+\d+\.\d\d\W+\d+\.\d\d.*query\W+\d+\.\d\d.*restart s.*\W1\W+\d+\.\d\d"),
}


def test_every_benchmark_has_its_smallest_case():
    scripts = {p.name for p in BENCHMARKS.glob("bench_*.py")}
    assert not scripts - set(SMALLEST), f"add the smallest arguments of {sorted(scripts - set(SMALLEST))} to SMALLEST"
    assert not set(SMALLEST) - scripts, f"SMALLEST lists benchmarks that are gone: {sorted(set(SMALLEST) - scripts)}"


def _tests_modules() -> set[str]:
    """Names a script could import from tests/ once it is on sys.path."""
    return {p.stem for p in (ROOT / "tests").glob("*.py")} | {p.name for p in (ROOT / "tests").iterdir() if (p / "__init__.py").exists()}


def test_no_benchmark_imports_from_tests():
    banned = _tests_modules() | {"tests"}
    found = []
    for path in sorted(BENCHMARKS.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in banned]
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(r"sys\.path\.\w+\([^)\n]*tests[^)\n]*\)", source)]
    assert not found, found


def test_the_import_check_catches_an_import_from_tests(tmp_path):
    """The check above is not vacuous: the forms it must refuse are refused."""
    banned = _tests_modules() | {"tests"}
    assert {"conftest", "daemon_helpers", "procs_helpers", "fakenvml", "onnx_models", "test_chaos"} <= banned
    for line in ("from tests.test_chaos import Batch", "import conftest", "from onnx_models import conv_model"):
        node = ast.parse(line).body[0]
        module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
        assert module.split(".")[0] in banned, line


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_benchmark_runs_as_documented(script):
    args, printed = SMALLEST[script]
    began = time.monotonic()
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=280)
    took = time.monotonic() - began
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited {proc.returncode} after {took:.1f} s:\n{proc.stderr[-3000:]}"
    assert re.search(printed, proc.stdout), f"{script} printed no result matching {printed!r}:\n{proc.stdout[-3000:]}"
