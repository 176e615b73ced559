"""The generator stage's per-batch work outside the model, side by side in fresh processes:

    plain     crops -> stack, mask copies, astype, scale, repeat -> model -> scale, clip,
              astype, transpose (heygem.face.to_nchw / from_nchw, the stage's code before Batch)
    batch     heygem.batch.Batch: reused buffers, results written in place

each in a process as spawned (glibc malloc defaults) and after heygem.tuning.tune_process (the
stage processes' tuning), with the demo generator in between. Reports per batch of 4 crops:
wall, user and kernel CPU, and minor page faults.

    .venv/bin/python benchmarks/bench_conversions.py [--batches 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from heygem import face
from heygem.batch import Batch
from heygem.models import infer
from heygem.providers import open_session

way, tuned, model, batches = sys.argv[1], sys.argv[2] == "tuned", sys.argv[3], int(sys.argv[4])
if tuned:
    from heygem.tuning import tune_process
    tune_process()
session, _ = open_session(model, "cpu", threads=1, spinning=False)
rng = np.random.default_rng(0)
slots = [rng.integers(0, 256, (256, 256, 3), np.uint8) for _ in range(4)]
feats = [rng.standard_normal((256, 20)).astype(np.float32) for _ in range(4)]
buffers = Batch(4)
buffers.set_reference(slots[0])
reference = face.to_nchw(slots[0])

def plain():
    crops = np.stack(slots)
    out = infer(session, "generator", {{
        "masked": face.to_nchw(np.stack([face.mask(c) for c in crops])),
        "reference": np.repeat(reference, len(crops), axis=0),
        "audio": np.stack(feats),
    }})
    for slot, generated in zip(slots, face.from_nchw(out)):
        slot[:] = generated

def batch():
    buffers.outputs(infer(session, "generator", buffers.inputs(slots, feats)), slots)

step = plain if way == "plain" else batch
for _ in range(10):
    step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(batches):
    step()
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"wall": wall / batches, "user": (r1.ru_utime - r0.ru_utime) / batches,
                  "sys": (r1.ru_stime - r0.ru_stime) / batches, "faults": (r1.ru_minflt - r0.ru_minflt) / batches}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from heygem.models import build_demo_models

    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_demo_models(tmp)["generator"])
        code = CHILD.format(root=str(ROOT))
        rows = []
        for way in ("plain", "batch"):
            for tuning in ("spawned", "tuned"):
                out = subprocess.run([sys.executable, "-c", code, way, tuning, model, str(args.batches)],
                                     capture_output=True, text=True, timeout=600, check=True).stdout
                rows.append((f"{way}, {tuning}", json.loads(out.strip().splitlines()[-1])))
    base = rows[0][1]["wall"]
    print(f"per batch of 4 crops (demo generator included), {args.batches} batches each")
    print(f"{'way':<18} {'wall ms':>8} {'user ms':>8} {'kernel ms':>10} {'faults':>8} {'vs plain':>9}")
    for name, r in rows:
        print(f"{name:<18} {r['wall'] * 1e3:8.2f} {r['user'] * 1e3:8.2f} {r['sys'] * 1e3:10.2f} {r['faults']:8.0f} {r['wall'] / base:8.2f}x")
    print(f"\ncommand: .venv/bin/python benchmarks/bench_conversions.py --batches {args.batches}")


if __name__ == "__main__":
    main()
