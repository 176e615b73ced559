"""The embedded pipeline end to end: real spawned stage processes, real ONNX Runtime sessions on
the demo models, real shared memory and a real SQLite store."""

from __future__ import annotations


import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import cv2
import psutil
import pytest

from conftest import ROOT
from heygem import assets, segments
from heygem.config import PipelineConfig
from heygem.jobs import JobStore
from heygem.pipeline import Pipeline, resolve_models

pytestmark = pytest.mark.timeout(180)
FPS = 25.0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {
        "root": root,
        "models": root / "models",
        "template": assets.make_template_video(root / "template.mp4", seconds=2.0, fps=FPS),
        "audio": assets.make_speech_audio(root / "speech.wav", seconds=1.2),
        "long_audio": assets.make_speech_audio(root / "long.wav", seconds=6.0, seed=1),
    }


def shm_segments() -> set[str]:
    """Segments this test process created (board and ring names carry the creator's pid)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("heygem_") and f"_{os.getpid()}" in n}


@contextmanager
def serving(config: PipelineConfig, store: JobStore, models: Path, outputs: Path):
    """A started, ready pipeline; on exit it is stopped and must leave no process and no
    shared-memory segment behind."""
    before = shm_segments()
    p = Pipeline(config, store, models_dir=models, output_dir=outputs)
    p.start()
    wait(lambda: p.ready() or any(r.dead() for r in p.replicas), 60, p)
    assert p.ready(), p.status()
    yield p
    pids = [pid for r in p.replicas for pid in r.pids().values()]
    p.stop(grace_s=5)
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not stage_children(), "a stage process was left behind"
    assert shm_segments() <= before, "a shared-memory segment was left behind"


@pytest.fixture
def pipeline(inputs, tmp_path):
    with serving(PipelineConfig(lease_s=10.0), JobStore(tmp_path / "jobs.sqlite3"), inputs["models"], tmp_path / "out") as p:
        yield p


def stage_children() -> list:
    """Our spawned children (stage processes), less multiprocessing's resource tracker (it lives as
    long as the test run); other children of the test run (the session's PostgreSQL) are not ours."""
    out = []
    for c in psutil.Process().children():
        with suppress(psutil.NoSuchProcess):
            line = " ".join(c.cmdline())
            if "multiprocessing" in line and "resource_tracker" not in line:
                out.append(c)
    return out


def wait(predicate, timeout_s: float, pipeline=None):
    """Poll `predicate` (draining pipeline events) until true or the bounded time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pipeline is not None:
            pipeline.poll()
        if predicate():
            return True
        time.sleep(0.05)
    return False


def finished(store, job_id):
    return lambda: store.get(job_id).state in ("succeeded", "failed", "cancelled")


def frame_count(path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_jobs_produce_playable_videos_of_the_audio_length(pipeline, inputs, tmp_path):
    store = pipeline.store
    ids = [store.submit(str(inputs["audio"]), str(inputs["template"]), str(tmp_path / f"o{i}.mp4")).id for i in range(2)]
    assert wait(lambda: all(finished(store, i)() for i in ids), 90, pipeline)
    for job_id in ids:
        job = store.get(job_id)
        assert job.state == "succeeded", job.reason
        assert job.progress == 100 and job.attempts == 1
        assert frame_count(job.result) == round(1.2 * FPS)
    assert not list(tmp_path.glob(".*partial*")), "temp files must be renamed or removed"
    rows = {r["stage"]: r for r in pipeline.status()["stages"]}
    assert rows["encode"]["items_out"] == 2 * round(1.2 * FPS)
    sessions = pipeline.status()["replicas"][0]["sessions"]
    assert {s["active"][0] for s in sessions.values()} == {"CPUExecutionProvider"}


def test_stages_account_for_their_time_and_jobs_follow_without_a_drain(pipeline, inputs, tmp_path):
    """Issue 16. Every stage splits its wall time on the board (`TIMES`, seconds), so the parts
    add up to the time that passed; and decode takes the next job while the current one is
    still being generated, encoded or completed: jobs overlap, nothing drains between them."""
    from heygem.board import TIMES

    def charged() -> tuple[float, dict]:
        """Seconds charged per stage, plus what an idle stage has waited since its last slice."""
        now = time.time()
        return now, {r["stage"]: sum(r[f"{k}_s"] for k in TIMES) + (now - r["heartbeat"])
                     for r in pipeline.board.snapshot()}

    store = pipeline.store
    t0, before = charged()
    ids = [store.submit(str(inputs["audio"]), str(inputs["template"]), str(tmp_path / f"o{i}.mp4")).id for i in range(3)]
    overlapped = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not all(finished(store, i)() for i in ids):
        pipeline.poll()
        decoding = {r["stage"]: r["job"] for r in pipeline.board.snapshot()}["decode"]
        if decoding in ids[1:] and store.get(ids[ids.index(decoding) - 1]).state == "running":
            overlapped.add(decoding)
        time.sleep(0.003)
    assert all(store.get(i).state == "succeeded" for i in ids), [store.get(i) for i in ids]
    assert overlapped, "decode started no job before the previous one was complete"
    assert wait(lambda: all(r["job"] is None for r in pipeline.board.snapshot()), 10, pipeline)
    t1, after = charged()
    for stage in after:
        assert after[stage] - before[stage] == pytest.approx(t1 - t0, abs=0.3), stage
    rows = {r["stage"]: r for r in pipeline.board.snapshot()}
    assert rows["generate"]["work_s"] > 0 and rows["decode"]["start_s"] > 0 and rows["encode"]["work_s"] > 0


def test_jobs_writing_one_output_one_after_another_do_not_collide(pipeline, inputs, tmp_path):
    """The second job's frames are written while the first job is still being completed (its
    encoder's last frames, the store): their temp files are named after their jobs."""
    store, folder = pipeline.store, tmp_path / "videos"
    ids = [store.submit(str(inputs["audio"]), str(inputs["template"]), str(folder / "same.mp4")).id for _ in range(2)]
    assert wait(lambda: all(finished(store, i)() for i in ids), 90, pipeline)
    assert [store.get(i).state for i in ids] == ["succeeded", "succeeded"], [store.get(i).reason for i in ids]
    assert frame_count(folder / "same.mp4") == round(1.2 * FPS)
    assert [p.name for p in folder.iterdir()] == ["same.mp4"], "temp files are renamed or removed"


def test_generate_runs_before_its_helpers_on_a_busy_cpu(pipeline):
    """The bottleneck gets the CPU first: decode and encode run HELPER_NICE nicer."""
    from heygem.tuning import HELPER_NICE

    [replica] = pipeline.replicas
    nice = {stage: psutil.Process(pid).nice() for stage, pid in replica.pids().items()}
    base = psutil.Process().nice()
    assert nice == {"decode": base + HELPER_NICE, "generate": base, "encode": base + HELPER_NICE}


@pytest.mark.parametrize(
    "make_bad, culprit",
    [
        (lambda d, i: (str(d / "missing.wav"), str(i["template"])), "missing.wav: no such file"),
        (lambda d, i: (str(i["audio"]), str(_text_file(d / "notes.mp4"))), "notes.mp4"),
        (lambda d, i: (str(_text_file(d / "speech.wav")), str(i["template"])), "speech.wav"),
    ],
    ids=["missing-audio", "text-as-video", "text-as-audio"],
)
def test_a_bad_job_fails_alone_with_its_reason(pipeline, inputs, tmp_path, make_bad, culprit):
    store = pipeline.store
    bad = store.submit(*make_bad(tmp_path, inputs), str(tmp_path / "bad.mp4")).id
    good = store.submit(str(inputs["audio"]), str(inputs["template"]), str(tmp_path / "good.mp4")).id
    assert wait(lambda: finished(store, bad)() and finished(store, good)(), 90, pipeline)
    assert store.get(bad).state == "failed"
    assert culprit in store.get(bad).reason
    assert not (tmp_path / "bad.mp4").exists()
    assert store.get(good).state == "succeeded", store.get(good).reason


def _text_file(path: Path) -> Path:
    path.write_text("this is not media\n")
    return path


def test_an_encode_failure_travels_and_the_next_job_starts_clean(pipeline, inputs, tmp_path):
    (tmp_path / "a-file").write_text("x")
    store = pipeline.store
    bad = store.submit(str(inputs["long_audio"]), str(inputs["template"]), str(tmp_path / "a-file" / "out.mp4")).id
    good = store.submit(str(inputs["audio"]), str(inputs["template"]), str(tmp_path / "good.mp4")).id
    assert wait(finished(store, bad), 30, pipeline)
    failed = store.get(bad)
    assert failed.state == "failed" and failed.reason.startswith("encode:") and "a-file" in failed.reason
    # Decode learns of the failure and stops feeding the job instead of decoding all 6 s of it.
    assert wait(finished(store, good), 60, pipeline)
    assert store.get(good).state == "succeeded", store.get(good).reason
    assert pipeline.replicas[0].channels.ring.in_use() == {}


def test_cancel_stops_a_running_job(pipeline, inputs, tmp_path):
    store = pipeline.store
    job = store.submit(str(inputs["long_audio"]), str(inputs["template"]), str(tmp_path / "c.mp4")).id
    assert wait(lambda: store.get(job).progress >= 20, 30, pipeline)
    assert store.cancel(job)
    after = store.submit(str(inputs["audio"]), str(inputs["template"]), str(tmp_path / "after.mp4")).id
    assert wait(finished(store, after), 60, pipeline)
    assert store.get(job).state == "cancelled"
    assert store.get(after).state == "succeeded", store.get(after).reason
    assert not (tmp_path / "c.mp4").exists()


def test_a_killed_stage_is_seen_and_its_job_requeued_on_restart(pipeline, inputs, tmp_path):
    store = pipeline.store
    job = store.submit(str(inputs["long_audio"]), str(inputs["template"]), str(tmp_path / "k.mp4")).id
    assert wait(lambda: store.get(job).progress >= 20, 30, pipeline)  # its frames have begun
    replica = pipeline.replicas[0]
    os.kill(replica.pids()["generate"], signal.SIGKILL)  # a process this test's pipeline started
    assert wait(lambda: "generate" in replica.dead(), 10, pipeline)
    assert replica.dead()["generate"] == -signal.SIGKILL
    old_worker = replica.worker
    assert pipeline.restart(0, grace_s=2) == [job]
    assert replica.worker != old_worker
    assert wait(finished(store, job), 90, pipeline)
    done = store.get(job)
    assert done.state == "succeeded" and done.attempts == 2, done.reason
    assert frame_count(done.result) == round(6.0 * FPS)


def test_stop_drains_a_running_job_within_the_grace(pipeline, inputs, tmp_path):
    store = pipeline.store
    job = store.submit(str(inputs["audio"]), str(inputs["template"]), str(tmp_path / "d.mp4")).id
    assert wait(lambda: store.get(job).state == "running", 30, pipeline)
    queued = store.submit(str(inputs["audio"]), str(inputs["template"]), str(tmp_path / "q.mp4")).id
    pipeline.stop(grace_s=30)
    assert store.get(job).state == "succeeded"
    assert store.get(queued).state == "queued", "a drained pipeline takes no new job"


def test_stop_requeues_what_the_grace_cannot_finish(pipeline, inputs, tmp_path):
    store = pipeline.store
    job = store.submit(str(inputs["long_audio"]), str(inputs["template"]), str(tmp_path / "r.mp4")).id
    assert wait(lambda: store.get(job).progress >= 20, 30, pipeline)  # its frames have begun
    assert pipeline.stop(grace_s=0.2) == [job]
    assert store.get(job).state == "queued"
    assert not (tmp_path / "r.mp4").exists()


def test_bad_model_is_refused_before_any_process_starts(inputs, tmp_path):
    bogus = tmp_path / "gen.onnx"
    bogus.write_text("not a model")
    config = PipelineConfig.model_validate({"models": {"audio_encoder": str(inputs["models"] / "demo_audio_encoder.onnx"),
                                                       "generator": str(bogus)}})
    with pytest.raises(ValueError, match="gen.onnx"):
        resolve_models(config, inputs["models"])


def test_a_stage_killed_while_waiting_does_not_wedge_the_restart(pipeline):
    """multiprocessing.Event.set() blocks forever on a waiter that died inside wait(); the
    stop flag must not: an idle decode stage sits in exactly that wait."""
    replica = pipeline.replicas[0]
    time.sleep(0.5)  # idle: decode polls for jobs, waiting on the stop flag between polls
    os.kill(replica.pids()["decode"], signal.SIGKILL)
    assert wait(lambda: "decode" in replica.dead(), 10, pipeline)
    began = time.monotonic()
    pipeline.restart(0, grace_s=2)
    assert time.monotonic() - began < 15
    assert wait(pipeline.ready, 60, pipeline)


ORPHAN_SCRIPT = """
import sys, time
from pathlib import Path
from heygem.config import PipelineConfig
from heygem.jobs import JobStore
from heygem.pipeline import Pipeline

if __name__ == "__main__":
    p = Pipeline(PipelineConfig(), JobStore(sys.argv[1]), models_dir=Path(sys.argv[2]), output_dir=Path(sys.argv[3]))
    p.start()
    while not p.ready():
        p.poll()
        time.sleep(0.05)
    print(" ".join(str(pid) for pid in p.replicas[0].pids().values()), flush=True)
    time.sleep(600)
"""


def test_stages_exit_when_their_supervisor_is_killed(inputs, tmp_path):
    """A SIGKILLed daemon cannot stop its stages; they must notice and leave by themselves."""
    import subprocess
    import sys

    script = tmp_path / "supervisor.py"
    script.write_text(ORPHAN_SCRIPT)
    sup = subprocess.Popen([sys.executable, str(script), str(tmp_path / "j.sqlite3"), str(inputs["models"]), str(tmp_path / "o")],
                           stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        line = sup.stdout.readline()
        stages = [int(p) for p in line.split()]
        assert len(stages) == 3, line
    finally:
        sup.kill()  # the supervisor this test started
        sup.wait(timeout=10)
    assert wait(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in stages), 15)


def test_start_frees_the_rings_a_dead_supervisor_left(inputs, tmp_path):
    from multiprocessing import resource_tracker
    from multiprocessing.shared_memory import SharedMemory

    child = subprocess.Popen([sys.executable, "-c", "pass"])  # a supervisor that is gone
    child.wait(timeout=30)
    stale = segments.segment_name("ring", "r0", "g1", pid=child.pid)
    SharedMemory(name=stale, create=True, size=1 << 20).close()
    resource_tracker.unregister(f"/{stale}", "shared_memory")  # as if its tracker died with it
    with serving(PipelineConfig(), JobStore(tmp_path / "jobs.sqlite3"), inputs["models"], tmp_path / "out") as p:
        assert p.swept == [stale]
        assert stale not in os.listdir("/dev/shm")


def test_cpu_generator_threads_are_configured_or_the_cores_shared(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    assert Pipeline(PipelineConfig(cpu_threads=3), store, tmp_path).cpu_threads(replicas=2) == 3
    assert Pipeline(PipelineConfig(), store, tmp_path).cpu_threads(replicas=2) == max(1, len(os.sched_getaffinity(0)) // 2)


def test_encoder_threads_are_the_cores_the_generators_leave(tmp_path, monkeypatch):
    """Issue 16: x264 sized to the whole host preempted a CPU generator; it gets what is left."""
    from heygem import pipeline
    from heygem.video import Encoding

    monkeypatch.setattr(pipeline, "usable_cores", lambda: 16)
    store = JobStore(tmp_path / "jobs.sqlite3")

    def encoding(**config):
        p = Pipeline(PipelineConfig(**config), store, tmp_path)
        return p.encoding(p.devices)

    assert encoding(cpu_threads=1) == Encoding("veryfast", 20, 15)
    assert encoding().threads == 1  # the generator has every core: x264 still gets one
    assert encoding(cpu_replicas=4, cpu_threads=2).threads == 2  # (16 - 4 x 2) / 4
    assert encoding(devices=[0, 1]).threads == 8  # GPU generators leave every core
    assert encoding(encoder_threads=3, encoder_preset="medium", encoder_crf=18) == Encoding("medium", 18, 3)


EXIT_WITH_UNREAD = """
import multiprocessing, sys, types
from heygem.channels import release_queues
ctx = multiprocessing.get_context("spawn")
ch = types.SimpleNamespace(to_generate=ctx.Queue(4), to_encode=ctx.Queue(4), events=ctx.Queue())
ch.to_generate.put(b"x" * 300_000)  # a JobStart-sized message; its reader has left
if sys.argv[1] == "release":
    release_queues(ch, orphaned=True)
"""


@pytest.mark.parametrize("how, exits", [("release", True), ("plain", False)])
def test_a_stage_exits_though_nobody_reads_its_queue(how, exits):
    """Without release_queues, the exit waits forever on the queue's feeder thread."""
    proc = subprocess.Popen([sys.executable, "-c", EXIT_WITH_UNREAD, how], cwd=ROOT)
    try:
        proc.wait(timeout=10 if exits else 3)
        exited = True
    except subprocess.TimeoutExpired:
        exited = False
    finally:
        proc.kill()  # the process this test started
        proc.wait(timeout=10)
    assert exited == exits


WORKER_NAME = """
import sys
from heygem.replica import Replica
from heygem.stages import StageSpec
base = StageSpec(0, "cpu", "", None, "board", {}, "fail", 4, 30.0, 64, 64, None, "out")
replica = Replica(0, base, ring_slots=2)
replica.generation = 1  # as after start()
print(replica.worker)
"""


def test_a_new_supervisors_workers_are_not_a_killed_ones():
    """Two daemons on one job store (one killed, one started after it) hold leases under different
    names, so the new one's first incarnation cannot finish or requeue the old one's jobs as its own."""
    names = {subprocess.run([sys.executable, "-c", WORKER_NAME], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, check=True).stdout.strip() for _ in range(2)}
    assert len(names) == 2 and all(name.startswith("replica-0.1@") for name in names)
