"""A failed job leaves no trace on the stage board (issue 10: "one failed job poisons its replica").

One real pipeline (spawned stages, real sessions on the demo models, real shared memory, a real
store) serves every case in turn. Each case makes one job fail at the first, a middle or the last
frame of one stage, through `heygem.failpoints` (no bad input reaches generate, or the middle of
encode), or through a real fault where one hits the point (an output under a regular file: encode
fails at open, as the issue's over-long name did). After the failed job:

- the job is failed with the stage's reason, and nothing is left at its output path;
- every stage lets go of what it held: each board row has items_in == items_out (the failing
  stage's drops visible in `dropped`), the ring is empty, no queue holds anything; so the daemon's
  `stage_stalled` rule, however short its patience, finds no stage with input;
- the next job succeeds on the same replica.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from heygem import assets, failpoints
from heygem.config import PipelineConfig
from heygem.jobs import JobStore
from heygem.stages import STAGES
from tests.test_pipeline import finished, frame_count, serving, wait
from watchdog.alerts import stage_stalled
from watchdog.probes import stage_views

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
FPS = 25.0
SECONDS = 1.0
FRAMES = round(SECONDS * FPS)  # 25: batches of 4 put frame 12 mid-batch and frame 24 alone
WHERE = {"first": 0, "middle": FRAMES // 2, "last": -1}
CASES = [(stage, where) for stage in STAGES for where in WHERE]


def code_of(stage: str, where: str) -> str:
    return f"fp-{stage}-{where}"


def point_of(stage: str, where: str) -> str:
    return f"{stage}:frame={WHERE[where]}:code={code_of(stage, where)}"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return {
        "root": root,
        "models": root / "models",
        "template": assets.make_template_video(root / "template.mp4", seconds=2.0, fps=FPS),
        "audio": assets.make_speech_audio(root / "speech.wav", seconds=SECONDS),
        "long_audio": assets.make_speech_audio(root / "long.wav", seconds=6.0, seed=1),
    }


@pytest.fixture(scope="module")
def pipeline(media, tmp_path_factory):
    """One replica for every case; its stages read the failpoints once, at start."""
    store = JobStore(tmp_path_factory.mktemp("store") / "jobs.sqlite3")
    config = PipelineConfig(lease_s=10.0, max_width=640, max_height=480)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(failpoints.ENV, ";".join(point_of(*case) for case in CASES))
        with serving(config, store, media["models"], media["root"] / "out") as p:
            yield p


def rows(pipeline) -> dict[str, dict]:
    return {r["stage"]: r for r in pipeline.status()["stages"]}


def settled(pipeline) -> bool:
    """Every stage is past the job (its JobEnd went through), and nothing is left in any stage's
    hands, queue or ring slot."""
    status = pipeline.status()
    [replica] = status["replicas"]
    return (all(r["job"] is None and r["items_in"] == r["items_out"] for r in status["stages"])
            and not any(replica["queues"].values())
            and pipeline.replicas[0].channels.ring.in_use() == {})


def assert_no_stall(pipeline) -> None:
    """The daemon's rule, with no patience at all, evaluated a minute later: no stage has input."""
    views = stage_views(pipeline.status())
    assert len(views) == len(STAGES)
    assert not any(v.has_input for v in views), views
    active = [c for c in stage_stalled(views, stall_after_s=0.001, now=time.time() + 60) if c.active]
    assert not active, active


def run_good_job(pipeline, media, out: Path) -> None:
    store = pipeline.store
    good = store.submit(str(media["audio"]), str(media["template"]), str(out)).id
    assert wait(finished(store, good), 60, pipeline)
    done = store.get(good)
    assert done.state == "succeeded", done.reason
    assert frame_count(done.result) == FRAMES


def fail_one_job(pipeline, media, output: Path, code: str):
    store = pipeline.store
    before = rows(pipeline)
    bad = store.submit(str(media["audio"]), str(media["template"]), str(output), code=code).id
    assert wait(finished(store, bad), 60, pipeline), pipeline.status()
    job = store.get(bad)
    assert job.state == "failed", f"{job.state}: {job.result or job.reason}"
    assert not output.exists(), "nothing may appear at the final path of a failed job"
    assert wait(lambda: settled(pipeline), 10, pipeline), pipeline.status()
    return job, before, rows(pipeline)


@pytest.mark.parametrize("stage, where", CASES, ids=[f"{s}-{w}" for s, w in CASES])
def test_a_job_failed_at_any_frame_of_any_stage_leaves_no_trace(pipeline, media, tmp_path, stage, where):
    output = tmp_path / f"{code_of(stage, where)}.mp4"
    job, before, after = fail_one_job(pipeline, media, output, code_of(stage, where))
    assert job.reason == f"{stage}: failpoint {point_of(stage, where)}"
    assert after[stage]["dropped"] > before[stage]["dropped"], "the failing stage's frames are dropped, visibly"
    assert not list(tmp_path.glob(".*")), "temp files of a failed job must be removed"
    assert_no_stall(pipeline)
    run_good_job(pipeline, media, tmp_path / "good.mp4")
    assert_no_stall(pipeline)


def test_an_output_encode_cannot_open_leaves_no_trace(pipeline, media, tmp_path):
    """The issue's case: encode fails at open (there, a 384-byte name; here, a folder that is a
    file), before its first frame; generate had taken the job's frames already."""
    (tmp_path / "a-file").write_text("x")
    output = tmp_path / "a-file" / "out.mp4"
    job, before, after = fail_one_job(pipeline, media, output, "real-encode-open")
    assert job.reason.startswith("encode: ") and "a-file is a file, not a folder" in job.reason, job.reason
    dropped = sum(after[s]["dropped"] - before[s]["dropped"] for s in STAGES)
    assert dropped > 0, "the frames already on their way are dropped, visibly"
    assert_no_stall(pipeline)
    run_good_job(pipeline, media, tmp_path / "good.mp4")


def test_the_longest_output_name_the_store_takes_is_written(pipeline, media, tmp_path):
    """255 bytes (83 CJK characters + '-r.mp4'): the encoder's temp names must fit too."""
    output = tmp_path / f"{'视' * 83}-r.mp4"
    assert len(output.name.encode()) == 255
    run_good_job(pipeline, media, output)
    assert output.exists()
    assert not list(tmp_path.glob(".*")), "temp files are renamed or removed"
    assert_no_stall(pipeline)


def test_a_job_cancelled_mid_way_leaves_no_trace(pipeline, media, tmp_path):
    """Cancelled, not failed: every stage learns it from the store (`gone`) and lets go."""
    store = pipeline.store
    output = tmp_path / "cancelled.mp4"
    job = store.submit(str(media["long_audio"]), str(media["template"]), str(output)).id
    assert wait(lambda: store.get(job).progress >= 20, 30, pipeline)  # its frames have begun
    assert store.cancel(job)
    assert wait(lambda: settled(pipeline), 10, pipeline), pipeline.status()
    assert store.get(job).state == "cancelled" and not output.exists()
    assert_no_stall(pipeline)
    run_good_job(pipeline, media, tmp_path / "good.mp4")
