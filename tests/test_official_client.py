"""Upstream's desktop client against a real daemon configured only with `[daemon] data_dir`.

The loop below is the client's own (HeyGem.ai `src/main/service/video.js`: `makeVideoByF2F`,
`loopPending`; `src/main/api/f2f.js`), replayed in Python: submit file names relative to its data
folder (`~/heygem_data/face2face/temp`, `src/main/config/config.js` `assetPath.model`), poll
/easy/query (every 2 s there, 0.2 s here) with its code rules, then open
`path.join(<data folder>, data.result)` as Node would and read the video.
"""

from __future__ import annotations

import posixpath
import time
import uuid

import cv2
import pytest

from heygem import assets
from tests.daemon_helpers import Daemon

pytestmark = pytest.mark.timeout(240)
POLL_S = 0.2  # the client's 2 s, ten times faster


def node_path_join(*parts: str) -> str:
    """Node's path.posix.join: join the non-empty parts with '/', then normalise (a part's leading
    '/' does not restart the path, unlike Python's os.path.join)."""
    return posixpath.normpath("/".join(p for p in parts if p)) or "."


def client_make_video(d: Daemon, audio_name: str, video_name: str) -> tuple[str, dict]:
    """makeVideoByF2F: (code, the submit answer)."""
    code = str(uuid.uuid4())
    param = {"audio_url": audio_name, "video_url": video_name, "code": code, "chaofen": 0, "watermark_switch": 0, "pn": 1}
    status, result = d.http("/easy/submit", param)
    assert status == 200, result
    return code, result


def client_loop_pending(d: Daemon, code: str, timeout_s: float = 150) -> tuple[str, dict, list]:
    """loopPending for one video: ('success' | 'failed', last answer, progress seen)."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, res = d.http(f"/easy/query?code={code}")
        assert status == 200, res
        if res["code"] in (9999, 10002, 10003):
            return "failed", res, seen
        if res["code"] == 10000:
            data = res["data"]
            if data["status"] == 1:
                seen.append((data["progress"], data["msg"]))
            elif data["status"] == 2:
                return "success", res, seen
            elif data["status"] == 3:
                return "failed", res, seen
        time.sleep(POLL_S)
    raise AssertionError(f"task {code} still pending after {timeout_s} s; seen {seen[-5:]}")


def test_the_desktop_client_works_unchanged_with_a_data_folder(tmp_path):
    data = tmp_path / "home" / "heygem_data" / "face2face" / "temp"  # the client's assetPath.model
    data.mkdir(parents=True)
    # what the client puts there: a model video named by time (addModel), TTS audio named by uuid
    video_name = "20250325085726279.mp4"
    audio_name = f"{uuid.uuid4()}.wav"
    assets.make_template_video(data / video_name, seconds=2.0)
    assets.make_speech_audio(data / audio_name, seconds=1.0)

    d = Daemon(tmp_path, daemon_keys=f'data_dir = "{data}"\n', input_roots=())
    try:
        assert d.wait_notify("READY=1", 120), d.log_path.read_text()[-3000:]

        # a file outside the data folder is refused (code != 10000: the client marks it failed) ...
        code, refused = client_make_video(d, "../../../../../../etc/passwd", video_name)
        assert refused["code"] == 10002, refused

        # ... and the next good job is served
        code, answer = client_make_video(d, audio_name, video_name)
        assert answer["code"] == 10000, answer
        outcome, res, seen = client_loop_pending(d, code)
        assert outcome == "success", (res, seen)
        assert [p for p, _ in seen] == sorted(p for p, _ in seen), seen

        result = res["data"]["result"]
        assert result == f"/{code}-r.mp4", result  # upstream's form: relative to the data folder
        file_path = node_path_join(str(data), result)  # what the client opens (ffprobe) and stores
        assert file_path == str(data / f"{code}-r.mp4")
        cap = cv2.VideoCapture(file_path)
        frames = 0
        while cap.read()[0]:
            frames += 1
        cap.release()
        assert frames == 25, frames  # 1.0 s of speech at the template's 25 fps

        # our own state stays in the state directory; the data folder holds only the client's files
        assert (d.state / "jobs.sqlite3").exists() and (d.state / "snapshot.json").exists()
        assert sorted(p.name for p in data.iterdir()) == sorted([video_name, audio_name, f"{code}-r.mp4"])
    finally:
        d.stop_and_clear()
