"""One sample of every GPU: in-process NVML (watchdog.gpu) vs a cold CLI vs forking nvidia-smi.

The daemon samples every tick and `gpu --watch` every refresh; this shows what each way costs.
Without an NVIDIA driver it runs against benchmarks/support/fakenvml (8 GPUs, the incident's values), which
measures the Python side (bindings, psutil look-ups, process start) but not a real driver.

    .venv/bin/python benchmarks/bench_gpu_query.py [--samples N] [--runs M]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.support.fakenvml import FakeGpu, build_library, fake_env, write_values  # noqa: E402

QUERY = "index,name,uuid,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"

# Runs in a child so that LD_LIBRARY_PATH (read by the loader at start) can point at the fake.
IN_PROCESS = """
import json, sys, time, statistics
from watchdog.gpu import Nvml
t0 = time.perf_counter()
nvml = Nvml()
first = nvml.sample()
init = time.perf_counter() - t0
times = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter(); nvml.sample(); times.append(time.perf_counter() - t)
nvml.close()
print(json.dumps({"init": init, "median": statistics.median(times), "gpus": len(first.gpus)}))
"""


def real_driver() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


def cold(cmd: list[str], env: dict[str, str], runs: int) -> float:
    """Median wall time of `runs` fresh processes."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="in-process samples (median)")
    parser.add_argument("--runs", type=int, default=7, help="cold process runs (median)")
    args = parser.parse_args()

    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        if real_driver():
            source = "real NVIDIA driver"
        else:
            values = Path(tmp) / "nvml.txt"
            gpus = [
                FakeGpu(uuid=f"GPU-{i:08x}-0000-0000-0000-000000000000", mem_used_mib=40960 + 1280 * i,
                        compute=[(os.getpid(), 40000)])
                for i in range(8)
            ]
            write_values(values, gpus)
            env.update(fake_env(build_library(Path(tmp) / "lib"), values))
            source = "fake libnvidia-ml.so.1 (benchmarks/support/fakenvml)"

        child = subprocess.run([sys.executable, "-c", IN_PROCESS, str(args.samples)], env=env, cwd=ROOT,
                               check=True, capture_output=True, text=True, timeout=300)
        inproc = json.loads(child.stdout)
        cli = [str(Path(sys.executable).with_name("heygem-ops"))]
        if not Path(cli[0]).exists():
            cli = [sys.executable, "-m", "ops.cli"]
        rows = [
            (f"Nvml.sample() in process (median of {args.samples})", inproc["median"]),
            ("Nvml() init + first sample", inproc["init"]),
            (f"cold `heygem-ops gpu --json` (median of {args.runs})", cold([*cli, "gpu", "--json"], env, args.runs)),
        ]
        smi = shutil.which("nvidia-smi")
        if smi and source.startswith("real"):
            rows.append((f"nvidia-smi --query-gpu (no processes) (median of {args.runs})",
                         cold([smi, f"--query-gpu={QUERY}", "--format=csv"], env, args.runs)))
        else:
            rows.append(("nvidia-smi --query-gpu", "skipped (fake driver)" if smi else "not installed"))

    base = rows[0][1]
    print(f"GPU query cost, {inproc['gpus']} GPUs, {source}")
    print(f"{'what':<58} {'time':>10} {'x sample':>9}")
    for what, seconds in rows:
        if isinstance(seconds, str):
            print(f"{what:<58} {seconds}")
        else:
            print(f"{what:<58} {seconds * 1000:>8.2f}ms {seconds / base:>9.1f}")


if __name__ == "__main__":
    main()
