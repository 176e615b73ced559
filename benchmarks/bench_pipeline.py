"""Pipeline throughput, side by side in one run, on the demo models (CPU):

    each stage alone    decode (read, detect, crop), generate (batches of 4), encode (paste,
                        write), each by itself in one process: the slowest is the bottleneck
    sequential loop     every stage in one process, frame after frame (no overlap)
    pipeline, 1 replica decode -> generate -> encode processes, frames in shared memory
    pipeline, 2 replicas

The pipeline's target is the bottleneck's own fps (ratio >= 0.9): stages overlap, so it can
go no faster than its slowest stage, and should lose little to the plumbing. fps counts output frames from the first job's claim to the last job's end (start-up excluded,
reported apart). Peak memory: the largest summed RSS of one replica's three stage processes.

    .venv/bin/python benchmarks/bench_pipeline.py [--jobs 4] [--seconds 4] [--size 640x360]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from heygem import assets, audio, face, video  # noqa: E402
from heygem.config import PipelineConfig  # noqa: E402
from heygem.jobs import JobStore  # noqa: E402
from heygem.models import build_demo_models, infer  # noqa: E402
from heygem.pipeline import Pipeline  # noqa: E402
from heygem.providers import open_session  # noqa: E402


def sequential(models: dict, audio_path: Path, template: Path, out: Path, batch: int) -> tuple[int, float]:
    """The same work with no processes and no overlap: the baseline the pipeline must beat."""
    encoder, _ = open_session(str(models["audio_encoder"]), "cpu")
    generator, _ = open_session(str(models["generator"]), "cpu")
    detector, _ = open_session(str(models["detector"]), "cpu")
    began = time.perf_counter()
    info = video.probe(template)
    samples, sr = audio.load_audio(audio_path)
    plan = audio.frame_plan(len(samples) / sr, info.frames, info.fps)
    feats = audio.features(encoder, audio.windows(audio.mel(samples, sr), len(plan), info.fps))
    frames = [f.copy() for f in video.read_frames(template, plan)]
    with video.VideoWriter(out, info.fps, (info.width, info.height)) as writer:
        reference = None
        for start in range(0, len(frames), batch):
            chunk = frames[start : start + batch]
            crops, places = zip(*(face.crop(f, face.detect(detector, f)) for f in chunk))
            reference = crops[0] if reference is None else reference
            generated = face.from_nchw(infer(generator, "generator", {
                "masked": face.to_nchw(np.stack([face.mask(c) for c in crops])),
                "reference": face.to_nchw(np.broadcast_to(reference, (len(crops), *reference.shape))),
                "audio": feats[start : start + len(chunk)],
            }))
            for frame, crop, place in zip(chunk, generated, places):
                writer.write(face.paste(frame, crop, place))
    return len(frames), time.perf_counter() - began


def stages_alone(models: dict, template: Path, n: int, batch: int) -> dict[str, float]:
    """Seconds for `n` frames of each stage's own work, one stage at a time, in this process."""
    generator, _ = open_session(str(models["generator"]), "cpu", threads=1, spinning=False)
    detector, _ = open_session(str(models["detector"]), "cpu", threads=1, spinning=False)
    info = video.probe(template)
    plan = audio.frame_plan(n / info.fps, info.frames, info.fps)
    times = {}
    began = time.perf_counter()
    crops = []
    for frame in video.read_frames(template, plan):
        crops.append(face.crop(frame, face.detect(detector, frame)))
    times["decode"] = time.perf_counter() - began
    crop = crops[0][0]
    masked = face.to_nchw(np.stack([face.mask(crop)] * batch))
    reference = face.to_nchw(np.stack([crop] * batch))
    feats = np.random.default_rng(0).standard_normal((batch, 256, 20)).astype(np.float32)
    began = time.perf_counter()
    for _ in range(0, n, batch):
        out = infer(generator, "generator", {"masked": masked, "reference": reference, "audio": feats})
        face.from_nchw(out)
    times["generate"] = time.perf_counter() - began
    frames = [f.copy() for f in video.read_frames(template, plan)]
    began = time.perf_counter()
    with video.VideoWriter(template.with_name("encode-alone.mp4"), info.fps, (info.width, info.height)) as writer:
        for frame, (c, place) in zip(frames, crops):
            writer.write(face.paste(frame, c, place))
    times["encode"] = time.perf_counter() - began
    return times


def pipeline_run(models_dir: Path, work: Path, jobs: list[tuple[Path, Path]], replicas: int) -> dict:
    import psutil

    store = JobStore(work / f"jobs-{replicas}.sqlite3")
    p = Pipeline(PipelineConfig(cpu_replicas=replicas), store, models_dir=models_dir, output_dir=work / f"out-{replicas}",
                 log_level="warning")
    t0 = time.perf_counter()
    p.start()
    while not p.ready():
        p.poll()
        time.sleep(0.02)
    startup = time.perf_counter() - t0
    peak = [0]
    done = threading.Event()

    def watch_memory():
        while not done.is_set():
            for r in p.replicas:
                total = 0
                for pid in r.pids().values():
                    try:
                        total += psutil.Process(pid).memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                peak[0] = max(peak[0], total)
            done.wait(0.1)

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    ids = [store.submit(str(a), str(v), str(work / f"out-{replicas}" / f"{i}.mp4")).id for i, (a, v) in enumerate(jobs)]
    began = time.perf_counter()
    while any(store.get(i).state in ("queued", "running") for i in ids):
        p.poll()
        time.sleep(0.02)
    wall = time.perf_counter() - began
    done.set()
    watcher.join(timeout=2)
    frames = sum(sum(1 for _ in video.read_frames(store.get(i).result, range(video.probe(store.get(i).result).frames))) for i in ids)
    states = {store.get(i).state for i in ids}
    p.stop(grace_s=5)
    return {"frames": frames, "wall": wall, "startup": startup, "peak_rss_mib": peak[0] / 2**20, "states": states}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0, help="speech per job")
    ap.add_argument("--size", default="640x360")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = build_demo_models(work / "models")
        template = assets.make_template_video(work / "t.mp4", seconds=4.0, size=(width, height))
        speech = assets.make_speech_audio(work / "a.wav", seconds=args.seconds)
        jobs = [(speech, template)] * args.jobs

        rows = []
        n_seq, t_seq = 0, 0.0
        for _ in range(args.jobs):
            n, t = sequential(models, speech, template, work / "seq.mp4", 4)
            n_seq, t_seq = n_seq + n, t_seq + t
        alone = stages_alone(models, template, n_seq, 4)
        one = pipeline_run(work / "models", work, jobs, 1)
        two = pipeline_run(work / "models", work, jobs, 2)
        stage_fps = {stage: n_seq / t for stage, t in alone.items()}
        bottleneck = min(stage_fps, key=stage_fps.get)
        fps_neck, fps_seq = stage_fps[bottleneck], n_seq / t_seq
        for stage, fps in stage_fps.items():
            rows.append((f"{stage} stage alone" + (" (bottleneck)" if stage == bottleneck else ""), fps, "", ""))
        rows.append(("sequential loop, 1 process", fps_seq, "", ""))
        for name, r in (("pipeline, 1 replica", one), ("pipeline, 2 replicas", two)):
            rows.append((name, r["frames"] / r["wall"], f"{r['startup']:.1f}", f"{r['peak_rss_mib']:.0f}"))
        print(f"{args.jobs} jobs x {args.seconds:g} s speech at {width}x{height}, {n_seq} frames each way, CPU, demo models")
        print(f"{'run':<32} {'fps':>7} {'vs bottleneck':>14} {'vs sequential':>14} {'startup s':>10} {'peak RSS MiB/replica':>21}")
        for name, fps, startup, rss in rows:
            print(f"{name:<32} {fps:7.1f} {fps / fps_neck:13.2f}x {fps / fps_seq:13.2f}x {startup:>10} {rss:>21}")
        print(f"scaling 1 -> 2 replicas: {(two['frames'] / two['wall']) / (one['frames'] / one['wall']):.2f}x; "
              f"job states: {one['states'] | two['states']}")


if __name__ == "__main__":
    main()
