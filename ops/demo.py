"""`heygem-ops demo`: the whole pipeline on embedded defaults, offline, in one command."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ops.context import OK, PROBLEM, USAGE, emit_json


@click.command()
@click.option("--jobs", "n_jobs", type=click.IntRange(1, 500), default=3, show_default=True, help="Demo jobs to run.")
@click.option("--seconds", type=click.FloatRange(0.5, 60), default=3.0, show_default=True, help="Speech length per job.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("heygem-demo"),
              show_default=True, help="Folder for the videos, the preview and the demo's job store.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1), default=300.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def demo(env, n_jobs: int, seconds: float, out_dir: Path, timeout_s: float, as_json: bool) -> None:
    """Build tiny real ONNX models, a drawn talking-head template and speech-like audio, then
    lip-sync them through the real pipeline (one replica per configured device, sessions
    verified, frames in shared memory) and write playable MP4s plus a preview PNG.

    \b
    Examples:
      heygem-ops demo                      3 jobs, results in ./heygem-demo/
      heygem-ops demo --jobs 10 --json     more jobs, machine-readable summary
    """
    from heygem import assets
    from heygem.jobs import JobStore
    from heygem.pipeline import Pipeline
    from heygem.providers import ModelError

    config = env.config
    out_dir = out_dir.resolve()
    inputs = out_dir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    template = assets.make_template_video(inputs / "template.mp4", seconds=4.0)
    speech = [assets.make_speech_audio(inputs / f"speech-{i}.wav", seconds=seconds, seed=i) for i in range(min(n_jobs, 3))]

    store_path = out_dir / "jobs.sqlite3"
    store_path.unlink(missing_ok=True)
    store = JobStore(store_path, max_attempts=config.pipeline.max_attempts)
    pipeline = Pipeline(config.pipeline, store, models_dir=out_dir / "models", output_dir=out_dir / "outputs",
                        log_json=bool(env.log_json), log_level="warning")
    started = time.monotonic()
    try:
        pipeline.start()
    except ModelError as err:
        click.echo(f"error: {err}", err=True)
        raise SystemExit(USAGE) from None
    try:
        ids = [store.submit(str(speech[i % len(speech)]), str(template), str(out_dir / "outputs" / f"demo-{i + 1}.mp4")).id
               for i in range(n_jobs)]
        ready_s, fatal = _follow(pipeline, store, ids, started + timeout_s, quiet=as_json)
    finally:
        pipeline_status = pipeline.status()
        pipeline.stop(grace_s=config.daemon.stop_grace_s)
    wall_s = time.monotonic() - started
    jobs = [store.get(i) for i in ids]
    preview = _preview(jobs, out_dir / "preview.png")
    result = {
        "ok": all(j.state == "succeeded" for j in jobs),
        "wall_s": round(wall_s, 2),
        "startup_s": round(ready_s, 2) if ready_s is not None else None,
        "replicas": [{"index": r["index"], "device": r["device"], "sessions": r["sessions"]} for r in pipeline_status["replicas"]],
        "jobs": [j.to_dict() for j in jobs],
        "preview": str(preview) if preview else None,
        "fatal": fatal,
    }
    if as_json:
        emit_json(result)
    else:
        _render(result)
    raise SystemExit(OK if result["ok"] else PROBLEM)


def _follow(pipeline, store, ids: list[int], deadline: float, quiet: bool):
    """Wait (bounded) for every job to end, with a progress bar per job. Returns the start-up
    time and the replicas' fatal reports (also printed, on stderr, so --json stays JSON)."""
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    begun = time.monotonic()
    ready_s = None
    fatal = []
    errors = Console(file=sys.stderr, highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.fields[stage]}"), TimeElapsedColumn(), disable=quiet, transient=False) as bar:
        boot = bar.add_task("starting replicas", total=1, stage="")
        tasks = {i: bar.add_task(f"job {i}", total=100, stage="queued") for i in ids}
        while time.monotonic() < deadline:
            for replica, kind, stage, payload in pipeline.poll():
                if kind == "fatal":
                    fatal.append({"replica": replica, "stage": stage, "reason": payload["reason"]})
                    errors.print(Text(f"replica {replica} {stage}: {payload['reason']}", style="red"))
            if ready_s is None and pipeline.ready():
                ready_s = time.monotonic() - begun
                bar.update(boot, completed=1, description=f"replicas ready ({ready_s:.1f} s)")
            if any(r.fell_back() or r.dead() for r in pipeline.replicas):
                break
            jobs = [store.get(i) for i in ids]
            for job in jobs:
                bar.update(tasks[job.id], completed=job.progress, stage=job.stage or job.state)
            if all(j.state in ("succeeded", "failed", "cancelled") for j in jobs):
                break
            time.sleep(0.2)
    return ready_s, fatal


def _preview(jobs, path: Path):
    """Four frames of the first finished video side by side, to look at without a player."""
    import cv2
    import numpy as np

    done = next((j for j in jobs if j.state == "succeeded"), None)
    if done is None:
        return None
    cap = cv2.VideoCapture(done.result)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for index in np.linspace(0, max(0, count - 1), 4).astype(int):
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(index))
        ok, frame = cap.read()
        if ok:
            frames.append(frame)
    cap.release()
    if len(frames) < 4:
        return None
    cv2.imwrite(str(path), np.vstack([np.hstack(frames[:2]), np.hstack(frames[2:])]))
    return path


def _short(providers) -> str:
    """CUDAExecutionProvider -> CUDA: the table stays readable in 80 columns."""
    return ", ".join(p.removesuffix("ExecutionProvider") for p in providers)


def _render(result: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    from ops.context import console

    out = console()
    replicas = Table(title="Replicas: sessions verified on their provider", title_justify="left")
    for col in ("replica", "device", "model", "asked", "running on"):
        replicas.add_column(col)
    for r in result["replicas"]:
        for role, s in sorted(r["sessions"].items()):
            colour = "red" if s["fallback"] else "green"
            replicas.add_row(str(r["index"]), str(r["device"]), role, Text(_short(s["requested"])),
                             Text(_short(s["active"]), style=colour))
    out.print(replicas)
    table = Table(title="Jobs", title_justify="left")
    for col in ("job", "state", "attempts", "seconds", "output / reason"):
        table.add_column(col)
    for j in result["jobs"]:
        colour = "green" if j["state"] == "succeeded" else "red"
        table.add_row(str(j["id"]), Text(j["state"], style=colour), str(j["attempts"]),
                      f"{j['updated_at'] - j['created_at']:.1f}", Text(j["result"] or j["reason"] or ""))
    out.print(table)
    done = sum(j["state"] == "succeeded" for j in result["jobs"])
    out.print(f"{done} of {len(result['jobs'])} jobs succeeded in {result['wall_s']:.1f} s"
              + (f" (replicas ready after {result['startup_s']:.1f} s)" if result["startup_s"] is not None else ""))
    if result["preview"]:
        out.print(Text(f"preview of the first video: {result['preview']}"))
