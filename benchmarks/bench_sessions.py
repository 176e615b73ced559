"""What verifying a session costs: `open_session` against a bare `InferenceSession`, side by side.

open_session redirects fd 2 to a temp file while the session is built, reads get_providers()
and parses ORT's log. This measures that against the plain constructor (CPU, and CUDA asked on
a host where it falls back), interleaved, and `heygem-ops doctor --json` against the runbook's
`python -c "import onnxruntime; print(onnxruntime.get_available_providers())"`. Medians; ratio
to the first row of each group.

    .venv/bin/python benchmarks/bench_sessions.py [--runs 30] 2>/dev/null   (the bare CUDA rows print ORT's warning)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from heygem.models import build_demo_models  # noqa: E402
from heygem.providers import CPU, open_session, providers_for  # noqa: E402


def _demo_generator() -> bytes:
    """The demo generator: the upstream generator's inputs (256x256 crops, an audio window)."""
    with tempfile.TemporaryDirectory(prefix="bench-sessions-") as tmp:
        return build_demo_models(tmp)["generator"].read_bytes()


MODEL = _demo_generator()


def _plain(device):
    return lambda: ort.InferenceSession(MODEL, providers=providers_for(device))


def _verified(device):
    return lambda: open_session(MODEL, device, fallback="warn")


def _command(argv):
    return lambda: subprocess.run(argv, capture_output=True, timeout=60, cwd=ROOT)


GROUPS = [
    ("session on CPU", [("InferenceSession([CPU])", _plain("cpu")), ("open_session('cpu')", _verified("cpu"))]),
    ("CUDA asked, falls back", [("InferenceSession([CUDA, CPU])", _plain(0)), ("open_session(0, 'warn')", _verified(0))]),
    ("provider question, fresh process", [
        ("python -c 'get_available_providers()'",
         _command([sys.executable, "-c", "import onnxruntime; print(onnxruntime.get_available_providers())"])),
        ("heygem-ops doctor --json", _command([sys.executable, "-m", "ops.cli", "doctor", "--json"])),
    ]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    assert CPU in ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, {args.runs} runs each, interleaved\n")
    print(f"{'case':<42} {'median ms':>10} {'ratio':>7}")
    for title, cases in GROUPS:
        runs = 5 if "process" in title else args.runs
        times: dict[str, list[float]] = {name: [] for name, _ in cases}
        for _ in range(runs):
            for name, fn in cases:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times[cases[0][0]])
        print(f"-- {title} ({runs} runs)")
        for name, _ in cases:
            med = statistics.median(times[name])
            print(f"{name:<42} {med * 1000:>10.2f} {med / base:>7.2f}")


if __name__ == "__main__":
    main()
