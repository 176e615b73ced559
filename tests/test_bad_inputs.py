"""Bad inputs, one table row each: what the user sees, exactly.

Pipeline path: a real Pipeline (spawned stages, real sessions, real store). Each bad job must fail
with a reason that names the culprit and the stage that refused it, leave nothing at (or next to)
its output path, and the pipeline must then serve a good job. Command path: `heygem-ops` as a
subprocess with a bad config or model; a config error exits 2 and names the key.

API path (issue 13): a real daemon with a token and small bounds; each hostile or careless request
(no token, a rebinding Host, not JSON, a Content-Length of '²', a lone surrogate, a 5000-byte path,
a slow-loris client, 150 idle connections, a full queue, another user's file in /dev/shm...) gets
its exact answer, then a good job is submitted and made. Another user: the HTTP server as user
nobody, for what root cannot be refused. CLI path: settings that must exit 2 naming the key (the
state directory, an address beyond loopback without a token, the token file), a root `stop` on
another user's pidfile, and other users' command lines that are rich markup.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import wave
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pytest

from heygem import assets, segments
from heygem.config import PipelineConfig
from heygem.jobs import JobStore
from heygem.models import build_demo_models
from tests.conftest import run_cli
from tests.daemon_helpers import ROOT, Daemon, wait_for
from tests.onnx_models import conv_model
from tests.test_pipeline import finished, frame_count, serving, wait
from watchdog.http import PATH_MAX, JobFiles

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
                 "encode", ("{tmp}/ro/", "read-only file system"),
                 id="output-read-only-fs"),
    pytest.param(lambda t, m, fs: (m["audio"], m["template"], filled(fs("full", "size=64k")) / "out.mp4"),
                 "encode", ("{tmp}/full/", "disk full"), id="output-disk-full"),
]


def filled(folder: Path) -> Path:
    """Fill a (small) file system to its last block, as a disk is when a video's write fails."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return folder


@pytest.mark.parametrize("make, stage, culprit", PIPELINE_CASES)
def test_a_bad_job_fails_with_its_culprit_and_the_next_job_succeeds(pipeline, media, tmp_path, tmpfs, make, stage, culprit):
    store = pipeline.store
    audio, video, output = make(tmp_path, media, tmpfs)
    bad = store.submit(str(audio), str(video), str(output)).id
    good = store.submit(str(media["audio"]), str(media["template"]), str(tmp_path / "good.mp4")).id
    assert wait(lambda: finished(store, bad)() and finished(store, good)(), 120, pipeline), pipeline.status()
    job = store.get(bad)
    assert job.state == "failed", f"{job.state}: {job.result or job.reason}"
    # a tuple: words that must all be there, whatever the encoder (ffmpeg's or OpenCV's) says around them
    words = culprit if isinstance(culprit, tuple) else (culprit,)
    assert job.reason.startswith(f"{stage}: ") and all(w.format(tmp=tmp_path).lower() in job.reason.lower() for w in words), job.reason
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


# ---- the daemon's API and the CLI against hostile and careless input (issue 13) ----------------------
# A real `heygem-ops daemon` (embedded pipeline) per module, with a token and small bounds. Every row
# sends one bad request, checks the exact answer, then submits a good job and waits until it has
# really been made: a bad request must never cost the next client its service.

TOKEN = "bad-inputs-" + "7" * 21
DEADLINE_S = 2.0
MAX_CONNECTIONS = 8
MAX_QUEUED = 3
NOBODY = 65534
REFUSED = f"audio_url: {JobFiles.REFUSED}"
is_root = os.geteuid() == 0


class Api:
    """A client of one daemon's HTTP API: exact requests, raw bytes when a client library would
    refuse to send them."""

    def __init__(self, daemon, data: Path, token=None, pid=None):
        self.daemon, self.data, self.token = daemon, data, token
        self.pid = pid if pid is not None else daemon.proc.pid
        url = daemon.url()
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.address = (host, int(port))

    def request(self, method: str, path: str, body=None, headers=None, auth: bool = True,
                content_type="application/json") -> tuple[int, object]:
        conn = http.client.HTTPConnection(*self.address, timeout=15)
        sent = {}
        if auth and self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        if body is not None and content_type:
            sent["Content-Type"] = content_type
        sent.update(headers or {})
        try:
            conn.request(method, path, body=json.dumps(body).encode() if isinstance(body, dict) else body, headers=sent)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def raw(self, data: bytes) -> tuple[int, dict]:
        """Send bytes as they are; (status, JSON body) of what comes back before the server closes."""
        with socket.create_connection(self.address, timeout=15) as s:
            s.sendall(data)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        return parse_answer(got)

    def post(self, fields: dict, **headers) -> bytes:
        """A raw POST /easy/submit of `fields` (JSON text as given, so escapes such as \\ud800 survive)."""
        body = fields if isinstance(fields, bytes) else json.dumps(fields).encode()
        head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Authorization": f"Bearer {self.token}",
                "Content-Length": str(len(body)), **headers}
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items() if v is not None)
        return f"POST /easy/submit HTTP/1.0\r\n{lines}\r\n".encode("latin-1") + body

    def good(self) -> dict:
        return {"audio_url": "speech.wav", "video_url": "face.mp4", "code": f"good-{uuid.uuid4().hex[:12]}"}

    def serves_a_good_job(self, timeout_s: float = 120, made: bool = True) -> None:
        """Submit a good job and wait until its video is made (`made`), else until it is queued."""
        job = self.good()
        status, answer = self.request("POST", "/easy/submit", job)
        assert (status, answer["code"]) == (200, 10000), answer
        if not made:
            assert self.request("GET", f"/easy/query?code={job['code']}")[1]["data"]["status"] == 1
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status, answer = self.request("GET", f"/easy/query?code={job['code']}")
            assert status == 200 and answer["code"] == 10000, answer
            if answer["data"]["status"] == 2:
                assert (self.data / answer["data"]["result"].lstrip("/")).stat().st_size > 0
                return
            assert answer["data"]["status"] == 1, answer
            time.sleep(0.1)
        raise AssertionError(f"the good job did not finish within {timeout_s} s: {answer}")

    def threads(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))

    def metric(self, name: str, **labels) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        status, text = self.request("GET", "/metrics", auth=False)
        assert status == 200, text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise AssertionError(f"no {name}{labels} in /metrics")


def parse_answer(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/"), raw[:200]
    status = int(head.split()[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"raw": body.decode(errors="replace")}


def data_folder(root: Path, media: dict, owner: Optional[int] = None) -> Path:
    data = root / "data"
    data.mkdir()
    shutil.copy(media["audio"], data / "speech.wav")
    shutil.copy(media["template"], data / "face.mp4")
    if owner is not None:
        for path in (data, data / "speech.wav", data / "face.mp4"):
            os.chown(path, owner, owner)
    return data


@pytest.fixture(scope="module")
def api(media, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    data = data_folder(tmp, media)
    keys = (f'data_dir = "{data}"\napi_token = "{TOKEN}"\nopen_paths = ["/healthz", "/metrics"]\n'
            f"request_timeout_s = {DEADLINE_S}\nmax_connections = {MAX_CONNECTIONS}\nmax_queued = {MAX_QUEUED}\n")
    # Issue 13: another user's empty file named like a dead supervisor's ring stopped every start.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    planted = Path(segments.SHM_DIR) / segments.segment_name("ring", "r0", "g1", pid=gone.pid)
    planted.touch()
    if is_root:
        os.chown(planted, NOBODY, NOBODY)
    d = Daemon(tmp, daemon_keys=keys, input_roots=())
    try:
        assert d.wait_notify("READY=1", 120), d.log_path.read_text()[-3000:]
        api = Api(d, data, TOKEN)
        api.planted = planted
        yield api
    finally:
        d.stop_and_clear()
        planted.unlink(missing_ok=True)


def answer(got: tuple[int, object]) -> tuple[int, int, str]:
    status, body = got
    assert isinstance(body, dict), body
    return status, body["code"], body["msg"]


# -- bounds: real sockets ---------------------------------------------------------------------------
def slow_loris(a: Api) -> tuple[int, int, str]:
    """One byte every 0.5 s: each read is quick, the request never ends; cut at the deadline."""
    began = time.monotonic()
    got = b""
    with socket.create_connection(a.address, timeout=15) as s:
        s.sendall(b"POST /easy/submit HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.settimeout(0.5)
        for byte in itertools.cycle(b"X-Slow: 1\r\n"):
            assert time.monotonic() - began < DEADLINE_S + 5, "the slow client was never cut off"
            try:
                s.send(bytes([byte]))
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    took = time.monotonic() - began
    assert DEADLINE_S - 0.1 <= took <= DEADLINE_S + 1.5, took
    assert a.metric("heygem_http_rejected_total", reason="deadline") >= 1
    return answer(parse_answer(got))


def idle_connections(a: Api) -> tuple[int, int, str]:
    """150 idle connections: MAX_CONNECTIONS get a thread each (until the deadline: 408), every
    other is answered 503 at once by the accept loop; the daemon's threads stay bounded."""
    before = a.threads()
    socks, most = [], before
    try:
        for _ in range(150):
            socks.append(socket.create_connection(a.address, timeout=15))
            most = max(most, a.threads())
        answers: dict[int, bytes] = {}
        deadline = time.monotonic() + DEADLINE_S + 5
        while len(answers) < 150 and time.monotonic() < deadline:
            most = max(most, a.threads())
            for i, s in enumerate(socks):
                if i not in answers:
                    try:
                        answers[i] = s.recv(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
            time.sleep(0.02)
        statuses = [parse_answer(raw)[0] for raw in answers.values()]
        assert (statuses.count(503), statuses.count(408)) == (150 - MAX_CONNECTIONS, MAX_CONNECTIONS), statuses
        assert most <= before + MAX_CONNECTIONS + 2, (before, most)
        assert a.metric("heygem_http_connections_max") == MAX_CONNECTIONS
        assert a.metric("heygem_http_rejected_total", reason="busy") >= 150 - MAX_CONNECTIONS
        return answer(parse_answer(next(raw for raw in answers.values() if raw.startswith(b"HTTP/1.0 503"))))
    finally:
        for s in socks:
            s.close()
        assert wait_for(lambda: a.threads() <= before + 1, 10), (before, a.threads())


def queue_at_max(a: Api) -> tuple[int, int, str]:
    """max_queued jobs waiting in the store: /easy/submit answers 10001 busy and stores nothing."""
    store = JobStore(a.daemon.state / "jobs.sqlite3")
    fillers = [store.submit(str(a.data / "speech.wav"), str(a.data / "face.mp4"), str(a.data / f"fill-{i}.mp4"),
                            code=f"fill-{uuid.uuid4().hex[:8]}") for i in range(MAX_QUEUED + 3)]
    try:
        assert store.counts()["queued"] >= MAX_QUEUED
        job = a.good()
        got = answer(a.request("POST", "/easy/submit", job))
        assert store.by_code(job["code"]) is None
        assert a.metric("heygem_http_rejected_total", reason="queue_full") >= 1
        assert a.metric("heygem_jobs_max_queued") == MAX_QUEUED
        return got
    finally:
        for job in fillers:
            store.cancel(job.id)
        store.close()


def foreign_segment(a: Api) -> tuple[int, int, str]:
    """The daemon started and serves although a file of another user in /dev/shm is named like a
    dead supervisor's ring; the file is left alone (not the daemon's to judge)."""
    if not is_root:
        pytest.skip("making a file of another user needs root")
    assert a.planted.exists() and a.planted.stat().st_uid == NOBODY
    assert "daemon_start_failed" not in a.daemon.log_path.read_text()
    return answer(a.request("GET", "/easy/query?code=never-submitted"))


surrogate = b'{"audio_url": "\\ud800.wav", "video_url": "face.mp4", "code": "s1"}'
surrogate_echo = b'{"audio_url": "http://\\udcff/a.wav", "video_url": "face.mp4", "code": "s2"}'

# probe(api) -> (HTTP status, body code, msg): what the client sees.
API_CASES = [
    pytest.param(lambda a: answer(a.request("POST", "/easy/submit", a.good(), auth=False)),
                 (401, 10002, "unauthorized: send `Authorization: Bearer <token>` ([daemon] api_token)"), id="no-token"),
    pytest.param(lambda a: answer(a.request("POST", "/easy/submit", a.good(), headers={"Authorization": "Bearer " + "x" * 32})),
                 (401, 10002, "unauthorized"), id="wrong-token"),
    pytest.param(lambda a: answer(a.request("GET", "/easy/query?code=x", headers={"Authorization": f"Basic {TOKEN}"})),
                 (401, 10002, "unauthorized"), id="token-as-basic-auth"),
    pytest.param(lambda a: (a.request("GET", "/readyz", auth=False)[0], None, None), (401, None, None), id="readyz-not-an-open-path"),
    pytest.param(lambda a: (a.request("GET", "/healthz", auth=False)[0], None, None), (200, None, None), id="healthz-open-path"),
    pytest.param(lambda a: answer(a.request("POST", "/easy/submit", a.good(), headers={"Host": "rebind.example:8383"})),
                 (421, 10002, "Host 'rebind.example:8383' is not this service"), id="dns-rebinding-host"),
    pytest.param(lambda a: answer(a.raw(a.post(a.good(), Host="127.0.0.1") .replace(b"Host: 127.0.0.1\r\n",
                                                                                 b"Host: 127.0.0.1\r\nHost: evil.example\r\n"))),
                 (421, 10002, "Host '127.0.0.1, evil.example' is not this service"), id="two-host-headers"),
    pytest.param(lambda a: answer(a.request("POST", "/easy/submit", a.good(), content_type="text/plain")),
                 (415, 10002, "Content-Type must be application/json, not 'text/plain'"), id="post-text-plain"),
    pytest.param(lambda a: answer(a.raw(a.post(a.good(), **{"Content-Type": None}))),
                 (415, 10002, "Content-Type must be application/json, not '(none)'"), id="post-without-content-type"),
    pytest.param(lambda a: answer(a.raw(a.post(a.good(), **{"Content-Length": "\u00b2"}))),
                 (400, 10002, "bad Content-Length '²': one decimal number of ASCII digits"), id="content-length-superscript-two"),
    pytest.param(lambda a: answer(a.raw(a.post(a.good()).replace(b"Content-Length:", b"Content-Length: 2\r\nContent-Length:"))),
                 (400, 10002, "bad Content-Length"), id="content-length-twice"),
    pytest.param(lambda a: answer(a.raw(a.post(a.good(), **{"Transfer-Encoding": "chunked"}))),
                 (411, 10002, "a chunked (Transfer-Encoding) body is not accepted"), id="chunked-body"),
    pytest.param(lambda a: answer(a.raw(a.post(surrogate))),
                 (200, 10002, "audio_url is not valid Unicode text: a lone surrogate '\\ud800' at character 0"), id="lone-surrogate"),
    pytest.param(lambda a: answer(a.raw(a.post(surrogate_echo))),
                 (200, 10002, "audio_url is not valid Unicode text: a lone surrogate '\\udcff' at character 7"),
                 id="lone-surrogate-in-a-url"),
    pytest.param(lambda a: answer(a.request("POST", "/easy/submit", {**a.good(), "audio_url": "a" * 5000})),
                 (200, 10002, f"audio_url is 5000 bytes long; a file name or path is at most {PATH_MAX} bytes"), id="path-5000-chars"),
    pytest.param(lambda a: answer(a.request("POST", "/easy/submit", {**a.good(), "audio_url": "n" * 300 + ".wav"})),
                 (200, 10002, REFUSED), id="name-longer-than-name-max"),
    pytest.param(lambda a: answer(a.request("GET", "/easy/query?code=" + "q" * 5000)),
                 (200, 10002, "code is 5000 bytes long; a task code is at most 1024 bytes"), id="query-code-5000-chars"),
    pytest.param(slow_loris, (408, 10002, f"the request did not arrive within {DEADLINE_S:g} s ([daemon] request_timeout_s)"),
                 id="slow-loris"),
    pytest.param(idle_connections, (503, 10001, f"busy: {MAX_CONNECTIONS} requests are in progress"), id="150-idle-connections"),
    pytest.param(foreign_segment, (200, 10004, "task never-submitted not found"), id="another-users-shm-segment-at-start"),
    pytest.param(queue_at_max, (200, 10001, f"tasks are queued, the most this service takes ([daemon] max_queued = {MAX_QUEUED})"),
                 id="queue-at-max-queued"),
]


@pytest.mark.slow
@pytest.mark.parametrize("probe, expected", API_CASES)
def test_a_bad_request_gets_its_answer_and_the_next_good_job_is_served(api, probe, expected):
    status, code, msg = probe(api)
    assert (status, code) == expected[:2], (status, code, msg)
    if expected[2] is not None:
        assert expected[2] in msg, msg
    assert "Traceback" not in api.daemon.log_path.read_text(errors="replace")[-20000:]
    api.serves_a_good_job()


# -- the API of a service that runs as an ordinary user (nobody) --------------------------------------
# Root ignores file permissions, so "permission denied" is only real for another user. The daemon's
# workers cannot run as nobody here (the interpreter may live under /root), so this is the daemon's
# HTTP server itself (watchdog.http.ApiServer with its JobFiles and job store) in a process of
# user nobody; "served" means the good job is accepted and stored.
NOBODY_SERVER = r"""
import signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from heygem import logs

logs.configure(json=True, level="info", stream=sys.stderr)  # before the modules that bind their loggers
from heygem.jobs import JobStore
from watchdog.http import ApiServer, JobFiles
from watchdog.metrics import Metrics

state, data = Path(sys.argv[2]), Path(sys.argv[3])
state.mkdir(mode=0o700, exist_ok=True)
metrics = Metrics("test", "embedded")
api = ApiServer("127.0.0.1", 0, JobStore(state / "jobs.sqlite3"), metrics.render, lambda: {"healthy": True},
                lambda: (True, {}), lambda: True, JobFiles(state, data))
metrics.watch_http(api.stats)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
api.start()
print(api.url, flush=True)
signal.sigwait([signal.SIGTERM])
api.stop()
"""


class NobodyServer:
    def __init__(self, media: dict):
        self.base = Path(tempfile.mkdtemp(prefix="heygem-nobody-", dir="/tmp"))
        os.chown(self.base, NOBODY, NOBODY)
        self.data = data_folder(self.base, media, owner=NOBODY)
        locked = self.data / "locked"  # root's, 0700: nobody may not look inside
        locked.mkdir(mode=0o700)
        (locked / "x.wav").write_bytes((self.data / "speech.wav").read_bytes())
        self.log_path = self.base / "server.log"
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", NOBODY_SERVER,
             str(ROOT), str(self.base / "state"), str(self.data)],
            stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), cwd=ROOT, text=True)
        self.http = self.proc.stdout.readline().strip()

    def url(self) -> str:
        assert self.http.startswith("http://"), self.log_path.read_text()[-3000:]
        return self.http

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stdout.close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def nobody_api(media):
    if not is_root or shutil.which("setpriv") is None:
        pytest.skip("a server of another user needs root and setpriv")
    server = NobodyServer(media)
    try:
        yield Api(server, server.data, pid=server.proc.pid)
    finally:
        server.stop()


def permission_denied(a: Api) -> tuple[int, int, str]:
    """A file the service may not reach (EACCES, not a missing file): the same refusal, no 9999."""
    got = answer(a.request("POST", "/easy/submit", {**a.good(), "audio_url": "locked/x.wav"}))
    assert wait_for(lambda: "cannot stat: Permission denied" in a.daemon.log_path.read_text(), 10), \
        "the operator's log line must give the real reason"
    return got


NOBODY_CASES = [
    pytest.param(permission_denied, (200, 10002, REFUSED), id="input-permission-denied"),
    pytest.param(lambda a: answer(a.request("POST", "/easy/submit", {**a.good(), "video_url": "locked"})),
                 (200, 10002, f"video_url: {JobFiles.REFUSED}"), id="input-folder-permission-denied"),
]


@pytest.mark.parametrize("probe, expected", NOBODY_CASES)
def test_a_server_of_another_user_refuses_what_it_may_not_read_and_takes_the_next_job(nobody_api, probe, expected):
    status, code, msg = probe(nobody_api)
    assert (status, code) == expected[:2] and expected[2] in msg, (status, code, msg)
    nobody_api.serves_a_good_job(made=False)


# -- the CLI and the configuration: exit 2 naming the key; foreign text printed as text ----------------
def state(tmp: Path, mode: Optional[int] = None, owner: Optional[int] = None, name: str = "state") -> Path:
    path = tmp / name
    path.mkdir()
    if mode is not None:
        path.chmod(mode)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


def secret_file(tmp: Path, mode: int, text: str = TOKEN + "\n") -> Path:
    path = tmp / "api_token"
    path.write_text(text)
    path.chmod(mode)
    return path


MARKUP = "[/oops][link=https://evil.example]click[/link]"


class MarkupParent:
    """A parent with 2 zombies whose command line (argv[0]) is rich markup, as another user's
    process could have; stopped (its zombies reaped) by the test."""

    def __init__(self):
        from procs_helpers import SCRIPT

        self.proc = subprocess.Popen([MARKUP, str(SCRIPT), "2", "0"], executable=sys.executable, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().split()
        self.pid, self.zombies = int(line[1]), [int(z) for z in line[2:]]
        assert wait_for(lambda: all(Path(f"/proc/{z}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                                    for z in self.zombies), 30)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.proc.stdout.close()


class Sleeper:
    """A process of ours (root) that a planted pidfile names."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

    def stop(self) -> None:
        alive = self.proc.poll() is None
        self.proc.kill()
        self.proc.wait(timeout=20)
        assert alive, "the process a foreign pidfile named must not have been signalled"


def planted_pidfile(tmp: Path, started: list) -> dict:
    """A pidfile owned by nobody naming our process: a root `stop` must not signal it."""
    sleeper = Sleeper()
    started.append(sleeper)
    root = state(tmp)
    ticks = int(Path(f"/proc/{sleeper.proc.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])
    pidfile = root / "daemon.json"
    pidfile.write_text(json.dumps({"pid": sleeper.proc.pid, "start_ticks": ticks, "http": None, "started": time.time()}))
    os.chown(pidfile, NOBODY, NOBODY)
    return {"args": ["stop"], "words": [f"is owned by uid {NOBODY}, but pid {sleeper.proc.pid} runs as uid 0",
                                        "nothing was signalled"]}


def markup_parent(started: list, *args: str) -> dict:
    parent = MarkupParent()
    started.append(parent)
    return {"args": [a.format(pid=parent.pid) for a in args], "words": [MARKUP], "config": ""}


TOKEN_LINE = f'api_token = "{TOKEN}"\n'
needs_root = pytest.mark.skipif(not is_root, reason="needs root (another user's files, chown)")

# make(tmp, started) -> {"config": [daemon] keys (state_dir and http_port added unless given),
#                        "args": the command, "words": extra words}; then exit code and words.
CLI_CASES = [
    pytest.param(lambda t, s: {"config": f'state_dir = "{(t / "afile").write_text("") or t / "afile"}"\n', "args": ["daemon"]},
                 2, ["[daemon] state_dir: {tmp}/afile exists and is not a directory"], id="state-dir-is-a-file"),
    pytest.param(lambda t, s: {"config": f'state_dir = "{state(t, 0o777)}"\n', "args": ["status"]},
                 2, ["[daemon] state_dir: {tmp}/state has mode 0777: group or others may write in it"],
                 id="state-dir-world-writable"),
    pytest.param(lambda t, s: {"config": f'state_dir = "{state(t, 0o770)}"\n', "args": ["jobs"]},
                 2, ["has mode 0770: group or others may write in it", "chmod 700"], id="state-dir-group-writable"),
    pytest.param(lambda t, s: {"config": f'state_dir = "{state(t, 0o700, NOBODY)}"\n', "args": ["daemon"]},
                 2, ["[daemon] state_dir: {tmp}/state is owned by nobody (uid 65534), not by root (uid 0)"],
                 id="state-dir-of-another-user", marks=needs_root),
    pytest.param(lambda t, s: {"config": 'http_host = "0.0.0.0"\n', "args": ["daemon"]},
                 2, ["[daemon] http_host: an address beyond loopback needs an API token", "(got '0.0.0.0')"],
                 id="http-host-any-without-token"),
    pytest.param(lambda t, s: {"config": 'http_host = "::"\n', "args": ["daemon"]},
                 2, ["[daemon] http_host: an address beyond loopback needs an API token"], id="http-host-ipv6-any-without-token"),
    pytest.param(lambda t, s: {"config": 'http_host = "192.168.1.20"\n', "args": ["start", "--no-wait"]},
                 2, ["[daemon] http_host", "set [daemon] api_token (or api_token_file)"], id="http-host-lan-without-token"),
    pytest.param(lambda t, s: {"config": 'http_host = "no-such-host.invalid"\n' + TOKEN_LINE, "args": ["daemon"]},
                 2, ["[daemon] http_host: cannot resolve 'no-such-host.invalid'"], id="http-host-unresolvable"),
    pytest.param(lambda t, s: {"config": 'api_token = "hunter2"\n', "args": ["daemon"]},
                 2, ["[daemon] api_token: the token must be at least 16 printable ASCII characters"], id="token-too-short"),
    pytest.param(lambda t, s: {"config": f'api_token_file = "{secret_file(t, 0o644)}"\n', "args": ["daemon"]},
                 2, ["[daemon] api_token_file: {tmp}/api_token has mode 0644: group or others may read it"],
                 id="token-file-world-readable"),
    pytest.param(lambda t, s: {"config": f'api_token_file = "{secret_file(t, 0o600, "short")}"\n', "args": ["daemon"]},
                 2, ["[daemon] api_token_file: the token in {tmp}/api_token must be at least 16"], id="token-file-too-short"),
    pytest.param(lambda t, s: {"config": TOKEN_LINE + 'api_token_file = "/etc/hostname"\n', "args": ["daemon"]},
                 2, ["[daemon] api_token_file: give api_token or api_token_file, not both"], id="token-and-token-file"),
    pytest.param(lambda t, s: {"config": TOKEN_LINE + 'open_paths = ["/easy/submit"]\n', "args": ["daemon"]},
                 2, ["[daemon] open_paths.0: Input should be '/metrics', '/healthz' or '/readyz'"], id="open-path-not-a-probe"),
    pytest.param(lambda t, s: {"config": "request_timeout_s = 0\nmax_connections = 0\n", "args": ["daemon"]},
                 2, ["[daemon] request_timeout_s: Input should be greater than 0", "[daemon] max_connections"],
                 id="bounds-zero"),
    pytest.param(lambda t, s: planted_pidfile(t, s), 2, [], id="root-stop-with-another-users-pidfile", marks=needs_root),
    pytest.param(lambda t, s: markup_parent(s, "zombies", "--pid", "{pid}"), 1, ["2 zombie process(es)"],
                 id="zombies-command-line-is-markup"),
    pytest.param(lambda t, s: markup_parent(s, "clean", "--dry-run", "--pid", "{pid}"), 1, ["nudge", "SIGCHLD"],
                 id="clean-command-line-is-markup"),
]


@pytest.mark.parametrize("make, code, words", CLI_CASES)
def test_a_bad_setting_or_foreign_text_gets_its_answer(tmp_path, make, code, words):
    started: list = []
    try:
        case = make(tmp_path, started)
        keys = case.get("config", "")
        if "state_dir" not in keys:
            keys += f'state_dir = "{tmp_path / "state"}"\n'
        path = tmp_path / "config.toml"
        path.write_text(f"[daemon]\nhttp_port = 0\n{keys}")
        done = run_cli("--config", str(path), *case["args"], env={"COLUMNS": "250"}, timeout=120)
        said = done.stdout + done.stderr
        assert done.returncode == code, said[-3000:]
        for w in [*words, *case.get("words", [])]:
            assert w.replace("{tmp}", str(tmp_path)) in said, said[-3000:]
        assert "Traceback" not in said and "MarkupError" not in said, said[-3000:]
    finally:
        for thing in started:
            thing.stop()


def test_clean_refuses_a_unit_without_a_main_process_unless_yes(tmp_path, monkeypatch):
    """systemd reports MainPID=0 (the unit's main process died, its workers stay): every process of
    the cgroup would count as an orphan. Refused (exit 2) unless --yes; with --yes they go."""
    from click.testing import CliRunner

    from ops import clean
    from ops.commands import cli

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        group = tmp_path / "cgroup"
        group.mkdir()
        (group / "cgroup.procs").write_text(f"{worker.pid}\n")
        monkeypatch.setattr(clean, "_unit_cgroup", lambda unit: (0, group))
        config = tmp_path / "config.toml"
        config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[actions]\nterm_grace_s = 2\n')
        refused = CliRunner().invoke(cli, ["--config", str(config), "clean", "--unit", "worker"])
        assert refused.exit_code == 2, refused.output
        assert ("--unit worker.service has no main process (MainPID=0), so every process in its control group counts as"
                " an orphan and would be terminated (1 of them)") in refused.output
        assert worker.poll() is None, "nothing may be signalled without --yes"
        plan = CliRunner().invoke(cli, ["--config", str(config), "clean", "--unit", "worker", "--dry-run", "--json"])
        assert plan.exit_code == 1 and json.loads(plan.output)["plan"][0]["pid"] == worker.pid, plan.output
        done = CliRunner().invoke(cli, ["--config", str(config), "clean", "--unit", "worker", "--yes", "--json"])
        assert done.exit_code == 0 and json.loads(done.output)["done"] == [
            {"pid": worker.pid, "action": "terminate", "result": "terminated"}], done.output
        worker.wait(timeout=20)  # reaped already by terminate's wait (it is our child)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=20)
