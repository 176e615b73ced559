"""Bad inputs, one table row each: what the user sees, exactly.

Pipeline path: a real Pipeline (spawned stages, real sessions, real store). Each bad job must fail
with a reason that names the culprit and the stage that refused it, leave nothing at (or next to)
its output path, and the pipeline must then serve a good job. Command path: `heygem-ops` as a
subprocess with a bad config or model; a config error exits 2 and names the key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from heygem import assets
from heygem.config import PipelineConfig
from heygem.jobs import JobStore
from heygem.models import build_demo_models
from tests.conftest import run_cli
from tests.onnx_models import conv_model
from tests.test_pipeline import finished, frame_count, serving, wait

pytestmark = pytest.mark.timeout(300)
FPS = 25.0
MAX_W, MAX_H = 640, 480  # the fixture pipeline's resolution limit


# ---- media --------------------------------------------------------------------------------------
def cv2_video(path: Path, fourcc: str, size: tuple[int, int], frames: list) -> Path:
    """A video OpenCV writes itself (the product's writer refuses most of these on purpose)."""
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, size)
    assert out.isOpened(), f"OpenCV cannot write {fourcc} {size} here"
    for frame in frames:
        out.write(frame)
    out.release()
    return path


def template_frames(template: Path) -> list:
    cap = cv2.VideoCapture(str(template))
    frames = []
    while (got := cap.read())[0]:
        frames.append(got[1])
    cap.release()
    return frames


def first_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def text(path: Path, content: str = "this is not media\n") -> Path:
    path.write_text(content)
    return path


def wav_without_samples(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    return path


def silent_wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(16000, "<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    template = assets.make_template_video(root / "template.mp4", seconds=2.0, fps=FPS)
    return {
        "root": root,
        "models": root / "models",
        "template": template,
        "template_avi": cv2_video(root / "template.avi", "MJPG", (640, 360), template_frames(template)),
        "audio": assets.make_speech_audio(root / "speech.wav", seconds=1.0),
        "audio_1_6": assets.make_speech_audio(root / "speech16.wav", seconds=1.6, seed=3),
        "long": assets.make_speech_audio(root / "long.wav", seconds=21.0, seed=4),
    }


@pytest.fixture(scope="module")
def pipeline(media, tmp_path_factory):
    """One replica for the whole table: a bad job must not need a fresh pipeline."""
    store = JobStore(tmp_path_factory.mktemp("store") / "jobs.sqlite3")
    config = PipelineConfig(lease_s=10.0, max_width=MAX_W, max_height=MAX_H)
    with serving(config, store, media["models"], media["root"] / "out") as p:
        yield p


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options) -> a fresh tmpfs under tmp_path (unmounted after the test); skips
    where mounting is not allowed (needs root with CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "heygem-test", str(path)],
                              capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs ({options}) here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=10).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


# ---- the pipeline table -------------------------------------------------------------------------
# make(tmp, media, tmpfs) -> (audio, video, output); then the stage that must refuse the job and
# the exact words of its reason ({tmp}: the test's folder).
PIPELINE_CASES = [
    pytest.param(lambda t, m, fs: (m["audio"], t / "missing.mp4", t / "out.mp4"),
                 "decode", "missing.mp4: no such file", id="video-missing"),
    pytest.param(lambda t, m, fs: (m["audio"], text(t / "empty.mp4", ""), t / "out.mp4"),
                 "decode", "empty.mp4: empty file", id="video-empty"),
    pytest.param(lambda t, m, fs: (m["audio"], text(t / "notes.mp4"), t / "out.mp4"),
                 "decode", "notes.mp4: not a video OpenCV can open", id="video-is-a-text-file"),
    pytest.param(lambda t, m, fs: (m["audio"], first_half(m["template"], t / "half.mp4"), t / "out.mp4"),
                 "decode", "half.mp4: not a video OpenCV can open", id="video-truncated-mp4"),
    # AVI keeps its frame count in the header: the cut shows only when frame 25 is read, so the
    # job fails mid-way, after encode has begun writing (1.6 s of audio = 40 frames).
    pytest.param(lambda t, m, fs: (m["audio_1_6"], first_half(m["template_avi"], t / "half.avi"), t / "out.mp4"),
                 "decode", "half.avi: cannot read frame 25", id="video-truncated-mid-job"),
    pytest.param(lambda t, m, fs: (m["audio"], cv2_video(t / "zero.avi", "MJPG", (64, 64), []), t / "out.mp4"),
                 "decode", "zero.avi: zero frames", id="video-zero-frames"),
    pytest.param(lambda t, m, fs: (m["audio"], cv2_video(t / "header.mp4", "mp4v", (64, 64), []), t / "out.mp4"),
                 "decode", "header.mp4: not a video OpenCV can open", id="video-header-only"),
    pytest.param(lambda t, m, fs: (m["audio"], cv2_video(t / "dot.avi", "MJPG", (1, 1), [np.zeros((1, 1, 3), np.uint8)] * 25),
                                   t / "out.mp4"),
                 "decode", "dot.avi: resolution 1x1 is too small (at least 16x16)", id="video-1x1"),
    pytest.param(lambda t, m, fs: (m["audio"], cv2_video(t / "wide.mp4", "mp4v", (5000, 16), [np.zeros((16, 5000, 3), np.uint8)] * 25),
                                   t / "out.mp4"),
                 "decode", f"wide.mp4: resolution 5000x16 is above the limit {MAX_W}x{MAX_H}", id="video-5000x16"),
    pytest.param(lambda t, m, fs: (t / "missing.wav", m["template"], t / "out.mp4"),
                 "decode", "missing.wav: no such file", id="audio-missing"),
    pytest.param(lambda t, m, fs: (wav_without_samples(t / "nosamples.wav"), m["template"], t / "out.mp4"),
                 "decode", "nosamples.wav: no audio samples", id="audio-no-samples"),
    pytest.param(lambda t, m, fs: (silent_wav(t / "silent.wav"), m["template"], t / "out.mp4"),
                 "decode", "silent.wav: silent (peak -inf dBFS", id="audio-silent"),
    pytest.param(lambda t, m, fs: (text(t / "speech.mp3", "ID3\x03 not really mp3"), m["template"], t / "out.mp4"),
                 "decode", "speech.mp3: not a WAV file; only WAV can be read without ffmpeg; install ffmpeg",
                 id="audio-mp3-without-ffmpeg",
                 marks=pytest.mark.skipif(shutil.which("ffmpeg") is not None, reason="ffmpeg is installed")),
    pytest.param(lambda t, m, fs: (m["long"], m["template"], t / "out.mp4"),
                 "decode", "long.wav: audio is 21.0 s, more than 10x the template video (2.0 s)", id="audio-10x-video"),
    # root ignores permission bits, so "not writable" must be real: a path under a regular file,
    # and a read-only file system.
    pytest.param(lambda t, m, fs: (m["audio"], m["template"], text(t / "a-file", "x") / "out.mp4"),
                 "encode", "{tmp}/a-file/out.mp4: cannot create its folder: {tmp}/a-file is a file, not a folder", id="output-under-a-file"),
    pytest.param(lambda t, m, fs: (m["audio"], m["template"], fs("ro", "size=1m,ro") / "out.mp4"),
                 "encode", "{tmp}/ro/.out.video.mp4: OpenCV cannot write an mp4v video here (640x360 at 25 fps): {tmp}/ro is on a read-only file system",
                 id="output-read-only-fs"),
    pytest.param(lambda t, m, fs: (m["audio"], m["template"], fs("full", "size=16k") / "out.mp4"),
                 "encode", "disk full", id="output-disk-full"),
]


@pytest.mark.parametrize("make, stage, culprit", PIPELINE_CASES)
def test_a_bad_job_fails_with_its_culprit_and_the_next_job_succeeds(pipeline, media, tmp_path, tmpfs, make, stage, culprit):
    store = pipeline.store
    audio, video, output = make(tmp_path, media, tmpfs)
    bad = store.submit(str(audio), str(video), str(output)).id
    good = store.submit(str(media["audio"]), str(media["template"]), str(tmp_path / "good.mp4")).id
    assert wait(lambda: finished(store, bad)() and finished(store, good)(), 120, pipeline), pipeline.status()
    job = store.get(bad)
    assert job.state == "failed", f"{job.state}: {job.result or job.reason}"
    assert job.reason.startswith(f"{stage}: ") and culprit.format(tmp=tmp_path) in job.reason, job.reason
    assert not output.exists(), "nothing may appear at the final path of a failed job"
    if output.parent.is_dir():
        assert not list(output.parent.glob(f".{output.stem}*")), "temp files of a failed job must be removed"
    done = store.get(good)
    assert done.state == "succeeded", done.reason
    assert frame_count(done.result) == round(1.0 * FPS)
    assert all(r.ready() for r in pipeline.replicas), "a bad input must not take a stage down"


# ---- the command / config table ------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    demo = build_demo_models(root)
    text(root / "bogus.onnx", "not a model")
    (root / "small.onnx").write_bytes(conv_model({"masked": (1, 3, 128, 128), "reference": (1, 3, 128, 128)}))
    return {"root": root, **{role: str(p) for role, p in demo.items()}}


MODELS = '[pipeline.models]\naudio_encoder = "{audio_encoder}"\ngenerator = "{root}/{generator_file}"\n'

# (config text, command, exit code, words the user must see on stderr/stdout)
COMMAND_CASES = [
    pytest.param("[daemon]\nintervall_s = 2\n", ["daemon"], 2, ["[daemon] intervall_s: unknown key"], id="unknown-key"),
    pytest.param("[pipeline]\ncpu_replicas = \"two\"\n", ["daemon"], 2,
                 ["[pipeline] cpu_replicas: Input should be a valid integer (got 'two')"], id="wrong-type"),
    pytest.param("[daemon]\ninterval_s = -1\n", ["daemon"], 2,
                 ["[daemon] interval_s: Input should be greater than 0 (got -1)"], id="negative-interval"),
    pytest.param("[daemon]\ninterval_s = -1\n", ["doctor"], 2, ["[daemon] interval_s"], id="negative-interval-doctor"),
    pytest.param("[pipeline]\ndevices = [1, 1]\n", ["demo"], 2, ["[pipeline] devices: GPU indices must be distinct"],
                 id="duplicate-devices"),
    pytest.param("[daemon\n", ["daemon"], 2, ["not valid TOML"], id="not-toml"),
    pytest.param(MODELS.replace("{generator_file}", "bogus.onnx"), ["daemon"], 2,
                 ["[pipeline.models] generator", "bogus.onnx: not an ONNX model"], id="model-not-onnx-daemon"),
    pytest.param(MODELS.replace("{generator_file}", "bogus.onnx"), ["demo", "--jobs", "1"], 2,
                 ["[pipeline.models] generator", "bogus.onnx: not an ONNX model"], id="model-not-onnx-demo"),
    pytest.param(MODELS.replace("{generator_file}", "small.onnx"), ["daemon"], 2,
                 ["[pipeline.models] generator",
                  "small.onnx: not a generator model: input 'masked': expected [N,3,256,256] float32, got [1,3,128,128] float32"],
                 id="model-wrong-input-shape"),
    # No GPU 7 here (nor CUDA): the config is valid, the host is not. Doctor and demo exit 1 and
    # name the GPU; the CPU fallback is refused (fallback = "fail").
    pytest.param("[pipeline]\ndevices = [7]\n", ["doctor", "--json"], 1, ["GPU 7: asked for CUDA, session runs on CPUExecutionProvider"],
                 id="device-7-doctor"),
    pytest.param("[pipeline]\ndevices = [7]\n", ["demo", "--jobs", "1"], 1, ["replica 0", "GPU 7: asked for"], id="device-7-demo"),
]


@pytest.mark.parametrize("config, command, code, words", COMMAND_CASES)
def test_a_bad_config_or_model_is_refused_with_its_key(models, tmp_path, config, command, code, words):
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nhttp_port = 0\n' * ("[daemon]" not in config)
                    + config.format(**models))
    if command[0] == "demo":
        command = [*command, "--out", str(tmp_path / "demo")]
    done = run_cli("--config", str(path), *command, timeout=120)
    said = done.stderr + done.stdout
    assert done.returncode == code, said[-3000:]
    for w in words:
        assert w in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]


def test_demo_json_stays_json_when_a_replica_refuses_to_serve(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[pipeline]\ndevices = [7]\n")
    done = run_cli("--config", str(path), "demo", "--jobs", "1", "--json", "--out", str(tmp_path / "demo"), timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["ok"] is False
    assert "GPU 7" in json.dumps(result), "the JSON must say why no job ran"
