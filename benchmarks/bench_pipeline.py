"""Pipeline throughput on CPU, side by side in one run, in two settings:

    demo models       the demo's tiny generator: every stage costs about the same, so on a
                      small machine the pipeline is bound by the total CPU, not by one stage
    generator-bound   the demo generator made heavier by identity convolutions (same output)
                      and given a core of its own (cpu_threads = 1), as a GPU is a device of
                      its own: the generator is the bottleneck, as in production, and the
                      ratio to it measures what the plumbing loses

Rows of each setting:

    each stage alone    the stage's own per-frame work in one process: decode (read, detect,
                        crop, into a slot), generate (batches through heygem.batch.Batch, the
                        generator), encode (paste, write through the stage's writer: with
                        ffmpeg, the H.264 + AAC encoder process included); the slowest is the
                        bottleneck (one job of up to 1000 frames)
    sequential loop     every stage in one process, one after another, as upstream does a job:
                        features, frames, then the mux (with ffmpeg: H.264 + AAC, the output the
                        pipeline writes; without, both write a silent mp4v)
    pipeline            decode -> generate -> encode processes, frames in shared memory; encode
                        streams frames to ffmpeg as they come, jobs follow without a drain
    generate beside     (generator-bound) the generator again, while another process decodes
      decode + encode   and encodes at its pace: on a CPU machine the pipeline's generator
                        shares caches and memory bandwidth with the other stages, which a GPU
                        generator does not; the pipeline's ratio to this row is what the
                        plumbing itself loses

The target is the bottleneck's own fps (ratio >= 0.9): stages overlap, so the pipeline can go
no faster than its slowest stage, and should lose little to the plumbing. This process applies
the stage processes' tuning (heygem.tuning.tune_process) so single-process rows compare like
with like. fps counts output frames from the first job's submission to the last job's end
(start-up excluded, reported apart). Peak memory: the largest summed RSS of one replica's three
stage processes. Each pipeline row also prints each stage's CPU per frame (and ffmpeg's, the
encoder processes encode started), where each stage's wall time went (the stage board's TIMES:
frames, or waiting for input, output, a ring slot, a job, a job's start or end) and how long the
run went on after the generator's last frame (the last job's encoder flush and completion).
The header gives the CPU model, the cores, the load average and whether ffmpeg is installed
(--no-ffmpeg runs every row as on a host without it). Every row encodes with the pipeline's x264
settings (heygem.pipeline.Pipeline.encoding); --preset sets the preset (default veryfast).

With --device N every session (stages alone, the sequential loop, the pipeline's one replica,
devices = [N]) is asked for CUDA on GPU N and refuses to fall back; the generator-bound setting
adds the generator alone on CPU (all cores), for CUDA vs CPU. --json FILE writes every row's
median fps (benchmarks/gpu_check.py reads it).

    .venv/bin/python benchmarks/bench_pipeline.py [--jobs 4] [--seconds 4] [--size 640x360] [--heavier 12] [--rounds 3]
                                                  [--device cpu|N] [--json FILE] [--no-ffmpeg] [--preset P]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from heygem import assets, audio, face, video  # noqa: E402
from heygem.batch import Batch  # noqa: E402
from heygem.board import TIMES  # noqa: E402
from heygem.config import PRESETS, ModelPaths, PipelineConfig  # noqa: E402
from heygem.jobs import JobStore  # noqa: E402
from heygem.models import build_demo_models, infer  # noqa: E402
from heygem.pipeline import Pipeline  # noqa: E402
from heygem.providers import open_session  # noqa: E402
from heygem.tuning import tune_process  # noqa: E402

BATCH = 4
ALONE_MAX = 1000  # frames of the stages-alone rows (a frame plan is at most 10x the 4 s template)


def heavier_generator(demo: Path, convs: int, out: Path) -> Path:
    """The demo generator followed by `convs` identity 3x3 convolutions: the same crops, more work."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(demo))
    graph = model.graph
    last = graph.output[0].name
    identity = np.zeros((3, 3, 3, 3), np.float32)
    identity[range(3), range(3), 1, 1] = 1.0
    graph.initializer.append(numpy_helper.from_array(identity, "identity_3x3"))
    for node in graph.node:
        node.output[:] = [f"{last}_0" if name == last else name for name in node.output]
    for i in range(convs):
        target = last if i == convs - 1 else f"{last}_{i + 1}"
        graph.node.append(helper.make_node("Conv", [f"{last}_{i}", "identity_3x3"], [target], pads=[1, 1, 1, 1]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def sessions(models: dict, threads: int, device="cpu") -> dict:
    return {
        role: open_session(str(path), device, threads=threads if role == "generator" else 1, spinning=False)[0]
        for role, path in models.items()
    }


def decode_frames(s: dict, template: Path, plan) -> list:
    """Decode's per-frame work: read, detect, crop, copy into a slot-sized buffer."""
    out = []
    for frame in video.read_frames(template, plan):
        crop, placement = face.crop(frame, face.detect(s["detector"], frame))
        slot = np.empty_like(frame)
        slot[:] = frame
        out.append((slot, crop, placement))
    return out


def generate(s: dict, batch: Batch, crops: list, feats: np.ndarray) -> None:
    """Generate's per-batch work, in place: the stage's own Batch and generator call."""
    for start in range(0, len(crops), BATCH):
        chunk = crops[start : start + BATCH]
        out = infer(s["generator"], "generator", batch.inputs(chunk, feats[start : start + len(chunk)]))
        batch.outputs(out, chunk)


def encode(decoded: list, out: Path, fps: float, size: tuple, speech=None, encoding=video.Encoding()) -> None:
    """Encode's per-frame work: paste the crop back, write the frame. With `speech`, through the
    writer the stage uses (heygem.video.open_writer: with ffmpeg, H.264 + the audio as frames
    come, ffmpeg's time included); without, a silent mp4v (OpenCV)."""
    with video.open_writer(out, fps, size, speech, encoding) as writer:
        for frame, crop, placement in decoded:
            writer.write(face.paste(frame, crop, placement))


def stages_alone(models: dict, threads: int, template: Path, speech: Path, n: int, work: Path, encoding: video.Encoding,
                 beside: bool = False, device="cpu", cpu_threads: int = 0) -> dict[str, float]:
    """Seconds for `n` frames of each stage's own work, one stage at a time. With `beside`,
    generate runs once more next to another process that decodes and encodes at the generator's
    own pace: the load the other two stages put on the machine in the pipeline. With
    `cpu_threads`, the generator runs once more on CPU with that many threads. `speech` is at
    least `n` frames long (the encoder ends the video with the audio)."""
    s = sessions(models, threads, device)
    info = video.probe(template)
    plan = audio.frame_plan(n / info.fps, info.frames, info.fps)
    times = {}
    began = time.perf_counter()
    decoded = decode_frames(s, template, plan)
    times["decode"] = time.perf_counter() - began
    times["generate"] = generate_seconds(s, decoded)
    if cpu_threads:
        times[f"generate on CPU, {cpu_threads} threads"] = generate_seconds(sessions(models, cpu_threads), decoded)
    if beside:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        other = ctx.Process(target=company, args=(models, template, speech, n / times["generate"], work / "company.mp4",
                                                  encoding, ready, stop))
        other.start()
        try:
            ready.wait(60)
            times["generate beside decode + encode"] = generate_seconds(s, decoded)
        finally:
            stop.set()
            other.join(60)
    began = time.perf_counter()
    encode(decoded, work / "encode-alone.mp4", info.fps, (info.width, info.height), speech, encoding)
    times["encode"] = time.perf_counter() - began
    return times


def generate_seconds(s: dict, decoded: list) -> float:
    batch = Batch(BATCH)
    batch.set_reference(decoded[0][1])
    feats = np.random.default_rng(0).standard_normal((len(decoded), 256, 20)).astype(np.float32)
    began = time.perf_counter()
    generate(s, batch, [crop for _, crop, _ in decoded], feats)
    return time.perf_counter() - began


def company(models: dict, template: Path, speech: Path, fps: float, out: Path, encoding: video.Encoding, ready,
            stop) -> None:
    """Decode and encode the template over and over, `fps` frames a second, until `stop`."""
    tune_process()
    s = sessions(models, 1)
    info = video.probe(template)
    chunk = list(range(min(info.frames, 100)))
    ready.set()
    due = time.perf_counter()
    while not stop.is_set():
        encode(decode_frames(s, template, chunk), out, info.fps, (info.width, info.height), speech, encoding)
        due += len(chunk) / fps
        stop.wait(max(0.0, due - time.perf_counter()))


def sequential(models: dict, threads: int, audio_path: Path, template: Path, out: Path, encoding: video.Encoding,
               device="cpu") -> tuple[int, float]:
    """The same work with no processes and no overlap: the baseline the pipeline must beat. As
    upstream does a job: features, every frame through every stage, then the mux (with ffmpeg:
    H.264 + AAC, the output the pipeline writes, same x264 settings; without: the silent mp4v,
    as the pipeline)."""
    s = sessions(models, threads, device)
    began = time.perf_counter()
    info = video.probe(template)
    samples, sr = audio.load_audio(audio_path)
    plan = audio.frame_plan(len(samples) / sr, info.frames, info.fps)
    feats = audio.features(s["audio_encoder"], audio.windows(audio.mel(samples, sr), len(plan), info.fps))
    decoded = decode_frames(s, template, plan)
    batch = Batch(BATCH)
    batch.set_reference(decoded[0][1])
    generate(s, batch, [crop for _, crop, _ in decoded], feats)
    silent = out.with_name(f"{out.stem}.silent{out.suffix}")
    encode(decoded, silent, info.fps, (info.width, info.height))
    video.mux(silent, audio_path, out, encoding=encoding)
    return len(decoded), time.perf_counter() - began


def pipeline_run(config: PipelineConfig, models_dir: Path, work: Path, jobs: list[tuple[Path, Path]], name: str) -> dict:
    import psutil

    store = JobStore(work / f"jobs-{name}.sqlite3")
    p = Pipeline(config, store, models_dir=models_dir, output_dir=work / f"out-{name}", log_level="warning")
    t0 = time.perf_counter()
    p.start()
    try:
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
        cpu_before = stage_cpu(p)
        times_before = stage_times(p)
        began = time.perf_counter()
        ids = [store.submit(str(a), str(v), str(work / f"out-{name}" / f"{i}.mp4")).id for i, (a, v) in enumerate(jobs)]
        while any(store.get(i).state in ("queued", "running") for i in ids):
            p.poll()
            time.sleep(0.02)
        wall = time.perf_counter() - began
        ended = time.time()
        cpu = {stage: used - cpu_before[stage] for stage, used in stage_cpu(p).items()}
        last_out = max(r["progress_at"] for r in p.board.snapshot() if r["stage"] == "generate")
        times = {stage: {k: v - times_before[stage][k] for k, v in spent.items()} for stage, spent in stage_times(p).items()}
        done.set()
        watcher.join(timeout=2)
    finally:
        p.stop(grace_s=5)
    frames = sum(video.probe(store.get(i).result).frames for i in ids if store.get(i).result)
    states = {store.get(i).state for i in ids}
    return {"frames": frames, "wall": wall, "startup": startup, "peak_rss_mib": peak[0] / 2**20, "states": states,
            "cpu": cpu, "times": times, "tail": max(0.0, ended - last_out)}


def stage_times(p: Pipeline) -> dict[str, dict[str, float]]:
    """Wall seconds each stage has spent on each of heygem.board.TIMES so far (the board's
    counters), summed over the replicas. Read while the stages are idle (before the first job,
    after the last), so the time since a stage's last charge, a slice of its idle wait that its
    heartbeat dates, is added as "claim": differences of two readings are then exact."""
    out: dict[str, dict[str, float]] = {}
    now = time.time()
    for row in p.board.snapshot():
        spent = out.setdefault(row["stage"], dict.fromkeys(TIMES, 0.0))
        for kind in TIMES:
            spent[kind] += row[f"{kind}_s"]
        spent["claim"] += max(0.0, now - row["heartbeat"])
    return out


def stage_cpu(p: Pipeline) -> dict[str, float]:
    """CPU seconds (user + system) each stage has used so far, summed over the replicas, and
    "ffmpeg": encode's finished children (the encoder of every completed job)."""
    import psutil

    used: dict[str, float] = {}
    ffmpeg = 0.0
    for r in p.replicas:
        for stage, pid in r.pids().items():
            times = psutil.Process(pid).cpu_times()
            used[stage] = used.get(stage, 0.0) + times.user + times.system
            if stage == "encode":
                ffmpeg += times.children_user + times.children_system
    return {**used, "ffmpeg": ffmpeg}


def setting(title: str, models: dict, threads: int, pipelines: list[tuple[str, PipelineConfig]],
            models_dir: Path, work: Path, jobs: list[tuple[Path, Path]], rounds: int, beside: bool = False,
            device="cpu", cpu_threads: int = 0) -> dict:
    """Every row `rounds` times, interleaved (load on a shared machine hits every row alike); medians.
    The single-process rows encode as the first pipeline does (its x264 preset, crf, threads)."""
    first = Pipeline(pipelines[0][1], None, work)
    encoding = first.encoding(first.devices)
    speech, template = jobs[0]
    info = video.probe(template)
    # Stages alone run one job of up to ALONE_MAX frames (a frame plan is at most 10x its template).
    per_job = len(audio.frame_plan(audio.load_audio(speech)[0].size / audio.SAMPLE_RATE, info.frames, info.fps))
    n_alone = min(per_job * len(jobs), ALONE_MAX)
    speech_alone = assets.make_speech_audio(work / "alone.wav", seconds=n_alone / info.fps + 0.5)
    fps: dict[str, list[float]] = {}
    runs: dict[str, list[dict]] = {name: [] for name, _ in pipelines}
    for _ in range(rounds):
        n_seq, t_seq = 0, 0.0
        for _ in jobs:
            n, t = sequential(models, threads, speech, template, work / "seq.mp4", encoding, device)
            n_seq, t_seq = n_seq + n, t_seq + t
        for stage, t in stages_alone(models, threads, template, speech_alone, n_alone, work, encoding, beside, device,
                                     cpu_threads).items():
            fps.setdefault(f"{stage} stage alone" if " " not in stage else stage, []).append(n_alone / t)
        fps.setdefault("sequential loop, 1 process", []).append(n_seq / t_seq)
        for name, config in pipelines:
            r = pipeline_run(config, models_dir, work, jobs, name)
            runs[name].append(r)
            fps.setdefault(name, []).append(r["frames"] / r["wall"])
    median = {name: statistics.median(values) for name, values in fps.items()}
    neck = min((name for name in median if name.endswith("stage alone")), key=median.get)
    x264 = f"x264 {encoding.preset}, crf {encoding.crf}, {encoding.threads} thread(s)" if shutil.which("ffmpeg") else "mp4v"
    print(f"\n{title}: {n_seq} frames each way ({n_alone} for stages alone), generator threads {threads}, {x264}, "
          f"median of {rounds} rounds; load average {os.getloadavg()[0]:.2f} now")
    print(f"{'run':<44} {'fps':>7} {'vs bottleneck':>14} {'vs sequential':>14} {'startup s':>10} {'peak RSS MiB/replica':>21}"
          "  fps of each round")
    for name, value in median.items():
        label = name + (" (bottleneck)" if name == neck else "")
        startup = rss = ""
        if name in runs:
            startup = f"{statistics.median(r['startup'] for r in runs[name]):.1f}"
            rss = f"{max(r['peak_rss_mib'] for r in runs[name]):.0f}"
        print(f"{label:<44} {value:7.1f} {value / median[neck]:13.2f}x {value / median['sequential loop, 1 process']:13.2f}x {startup:>10} {rss:>21}"
              f"  {' / '.join(f'{v:.1f}' for v in fps[name])}")
    details = {}
    for name, rs in runs.items():
        per_frame = {stage: statistics.median(r["cpu"][stage] / r["frames"] * 1e3 for r in rs) for stage in rs[0]["cpu"]}
        busy = statistics.median(r["cpu"]["generate"] / r["wall"] for r in rs)
        print(f"{name}: CPU per frame " + ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in per_frame.items())
              + f"; generate CPU = {busy:.0%} of the wall")
        print_times(rs)
        tail = statistics.median(r["tail"] for r in rs)
        print(f"    after the generator's last frame: {tail:.2f} s ({statistics.median(r['tail'] / r['wall'] for r in rs):.1%}"
              " of the wall): the last frames encoded, the last job completed (encoder flush, store)")
        details[name] = {"cpu_ms_per_frame": per_frame, "generate_cpu_of_wall": busy, "tail_s": tail,
                         "times_of_wall": {stage: {k: statistics.median(r["times"][stage][k] / r["wall"] for r in rs)
                                                   for k in TIMES} for stage in rs[0]["times"]}}
    first_name = pipelines[0][0]
    paired = [run / neck_fps for run, neck_fps in zip(fps[first_name], fps[neck])]
    print(f"{first_name} / the bottleneck alone, in the same round (a shared machine's speed drifts between rounds): "
          f"{' / '.join(f'{r:.2f}' for r in paired)}, median {statistics.median(paired):.2f}x")
    if "generate beside decode + encode" in median:
        print(f"pipeline vs the generator with decode + encode beside it: "
              f"{median[pipelines[0][0]] / median['generate beside decode + encode']:.2f}x")
    if len(pipelines) > 1:
        one, two = (median[name] for name, _ in pipelines[:2])
        print(f"scaling 1 -> 2 replicas: {two / one:.2f}x")
    states = set().union(*(r['states'] for rs in runs.values() for r in rs))
    print(f"job states: {states}")
    return {"title": title, "frames": n_seq, "fps": median, "fps_rounds": fps, "bottleneck": neck, "paired": paired,
            "job_states": sorted(states), "pipelines": details}


def print_times(rs: list[dict]) -> None:
    """Where each stage's wall time went (the board's TIMES counters), % of the pipeline's wall,
    median over the rounds; per replica where there are several."""
    replicas = max(1, round(sum(rs[0]["times"]["generate"].values()) / rs[0]["wall"]))
    print("    where each stage's wall went (heygem.board.TIMES, % of the wall):")
    for stage in rs[0]["times"]:
        shares = {kind: statistics.median(r["times"][stage][kind] / r["wall"] / replicas for r in rs) for kind in TIMES}
        print(f"    {stage:<9} " + "  ".join(f"{kind} {share:5.1%}" for kind, share in shares.items()))


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU model unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0, help="speech per job")
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--heavier", type=int, default=12, help="identity convolutions added to the generator-bound setting's generator")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every row (medians)")
    ap.add_argument("--device", default="cpu", help='"cpu" (default) or a GPU index: every session on CUDA there')
    ap.add_argument("--json", type=Path, help="also write every row's median fps to this file")
    ap.add_argument("--preset", default=PipelineConfig().encoder_preset, choices=PRESETS,
                    help="x264 preset of every output (the pipeline's encoder_preset)")
    ap.add_argument("--no-ffmpeg", action="store_true",
                    help="run as on a host without ffmpeg (silent mp4v outputs, no encoder process)")
    args = ap.parse_args()
    if args.no_ffmpeg:  # every row, and the stage processes (they inherit the environment), miss it
        os.environ["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                             if d and not (Path(d) / "ffmpeg").exists())
    device = "cpu" if args.device == "cpu" else int(args.device)
    width, height = (int(v) for v in args.size.split("x"))
    tune_process()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = build_demo_models(work / "models")
        template = assets.make_template_video(work / "t.mp4", seconds=4.0, size=(width, height))
        speech = assets.make_speech_audio(work / "a.wav", seconds=args.seconds)
        jobs = [(speech, template)] * args.jobs
        print(f"{args.jobs} jobs x {args.seconds:g} s speech at {width}x{height}, "
              + (f"CPU, {cores} cores" if device == "cpu" else f"CUDA GPU {device}, {cores} cores")
              + f" ({cpu_model()}); load average {os.getloadavg()[0]:.2f}")
        ffmpeg = shutil.which("ffmpeg")
        print(f"ffmpeg: {ffmpeg}: outputs are H.264 + AAC; the sequential loop muxes after its frames (as upstream), "
              "encode streams frames to ffmpeg as they come" if ffmpeg else
              "ffmpeg: none: outputs are silent mp4v (OpenCV), no encoder process")

        def config(**kw) -> PipelineConfig:
            return PipelineConfig(encoder_preset=args.preset, **kw)

        results = []
        if device == "cpu":
            results.append(setting("demo models", models, cores, [
                ("pipeline, 1 replica", config(cpu_replicas=1)),
                ("pipeline, 2 replicas", config(cpu_replicas=2)),
                ("pipeline, 1 replica, cpu_threads = 1", config(cpu_threads=1)),
            ], work / "models", work, jobs, args.rounds))
        else:
            results.append(setting("demo models", models, cores, [
                ("pipeline, 1 replica", config(devices=[device])),
            ], work / "models", work, jobs, args.rounds, device=device))

        heavy = {**models, "generator": heavier_generator(models["generator"], args.heavier, work / "heavy_generator.onnx")}
        if device == "cpu":
            results.append(setting(f"generator-bound (+{args.heavier} identity convolutions, a core of its own)", heavy, 1, [
                ("pipeline, 1 replica", config(cpu_threads=1, models=ModelPaths(generator=heavy["generator"]))),
            ], work / "models", work, jobs, args.rounds, beside=True))
        else:
            results.append(setting(f"generator-bound (+{args.heavier} identity convolutions, on GPU {device})", heavy, 1, [
                ("pipeline, 1 replica", config(devices=[device], models=ModelPaths(generator=heavy["generator"]))),
            ], work / "models", work, jobs, args.rounds, beside=True, device=device, cpu_threads=cores))
        command = (f".venv/bin/python benchmarks/bench_pipeline.py --jobs {args.jobs} --seconds {args.seconds:g} "
                   f"--size {args.size} --heavier {args.heavier} --rounds {args.rounds}"
                   + ("" if device == "cpu" else f" --device {device}") + (" --no-ffmpeg" if args.no_ffmpeg else "")
                   + ("" if args.preset == PipelineConfig().encoder_preset else f" --preset {args.preset}"))
        print(f"\ncommand: {command}")
        if args.json:
            args.json.write_text(json.dumps({"device": device, "command": command, "cpu": cpu_model(), "cores": cores,
                                             "ffmpeg": bool(ffmpeg), "settings": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
