"""The incident's batch (150 jobs; upstream finished 10), side by side in one run: calm vs chaos.

Both runs: a real `heygem-ops daemon` with 2 CPU replicas, short demo jobs (1 s speech, 2 s
template) submitted over HTTP (`POST /easy/submit`), wall time from the first submit until every
job is finished. The chaos run injects the faults of tests/test_chaos.py (the harness in
benchmarks/support/chaos.py) while the batch runs,
one every few seconds: SIGKILL a random stage, SIGSTOP one (a hang), SIGKILL the daemon itself
and start a new one on the same state directory, then more stage kills.

Reported: jobs succeeded / failed, wall time, jobs/min and its ratio to the calm run; per fault
kind, detection latency (fault -> the daemon's alert line; for a killed daemon: until its
children have all exited by themselves, and until the new daemon requeued their jobs) as median
and max; the daemon process's CPU % and RSS sampled every 0.25 s during the batch; and what the
batch left behind (processes, shared memory).

    .venv/bin/python benchmarks/bench_batch.py [--jobs 150] [--pace 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from heygem import assets  # noqa: E402
from benchmarks.support.chaos import AUDIO_S, CONFIG, FPS, Batch, chaos, latency_table, shm_heygem  # noqa: E402


def run(root: Path, media: dict, jobs: int, pace_s: float, with_chaos: bool) -> dict:
    before = shm_heygem()
    batch = Batch(root, CONFIG, media["audio"], media["template"])
    try:
        batch.start_daemon()
        began = time.monotonic()
        batch.submit(jobs)
        if with_chaos:
            chaos(batch, before_each=lambda: batch.wait(lambda: False, pace_s))  # pace, watching
        finished = batch.wait(batch.done, max(600.0, 4.0 * jobs), every_s=0.5)
        wall_s = time.monotonic() - began
    finally:
        left = batch.close()
    states = [j.state for j in batch.jobs()]
    cpu = [c for c, _ in batch.usage]
    return {
        "run": "chaos" if with_chaos else "calm",
        "finished": bool(finished),
        "jobs": len(states),
        "succeeded": states.count("succeeded"),
        "failed": {j.code: j.reason for j in batch.jobs() if j.state == "failed"},
        "wall_s": wall_s,
        "jobs_per_min": 60.0 * states.count("succeeded") / wall_s,
        "cpu_mean": statistics.fmean(cpu) if cpu else 0.0,
        "cpu_max": max(cpu, default=0.0),
        "rss_max": max((r for _, r in batch.usage), default=0.0),
        "left": len(left),
        "leaked_shm": len((shm_heygem() - before) & batch.segments),
        "faults": batch.faults,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=150, help="jobs per run (default 150, the incident's batch)")
    parser.add_argument("--pace", type=float, default=3.0, help="seconds between faults in the chaos run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)
        media = {"template": assets.make_template_video(root / "template.mp4", seconds=2.0, fps=FPS),
                 "audio": assets.make_speech_audio(root / "speech.wav", seconds=AUDIO_S)}
        results = []
        for name, with_chaos in (("calm", False), ("chaos", True)):
            (root / name).mkdir()
            results.append(run(root / name, media, args.jobs, args.pace, with_chaos))
            print(f"{name}: done in {results[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)

    calm = results[0]
    print(f"\n{args.jobs} jobs of {AUDIO_S:g} s speech, 2 CPU replicas, one daemon over HTTP\n")
    print(f"{'run':<6} {'ok':>5} {'failed':>6} {'wall s':>7} {'jobs/min':>9} {'vs calm':>8} "
          f"{'daemon CPU % mean/max':>22} {'RSS MiB':>8} {'left':>5} {'shm':>4}")
    for r in results:
        print(f"{r['run']:<6} {r['succeeded']:>5} {len(r['failed']):>6} {r['wall_s']:>7.1f} {r['jobs_per_min']:>9.1f} "
              f"{r['jobs_per_min'] / calm['jobs_per_min']:>8.2f} {r['cpu_mean']:>11.1f} / {r['cpu_max']:<8.1f} "
              f"{r['rss_max']:>8.1f} {r['left']:>5} {r['leaked_shm']:>4}")
        for code, reason in r["failed"].items():
            print(f"  failed {code}: {reason}")
    print("\nfaults of the chaos run (detection latency: fault -> alert line)\n")
    print(latency_table(results[1]["faults"]))
    if not all(r["finished"] and r["succeeded"] == r["jobs"] and not r["left"] and not r["leaked_shm"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
