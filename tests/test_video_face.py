"""Real video files through OpenCV, and the crop / mask / paste / detect geometry."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from heygem import face, video
from heygem.face import FaceError
from heygem.models import MASK_REGION, build_demo_models
from heygem.video import VideoError, VideoWriter, probe, read_frames


def numbered_video(path, n: int = 12, size=(64, 48), fps: float = 10.0):
    """Frame i is a flat grey of level 10 * (i + 1): its index survives compression."""
    with VideoWriter(path, fps, size) as out:
        for i in range(n):
            out.write(np.full((size[1], size[0], 3), 10 * (i + 1), np.uint8))
    return path


def index_of(frame: np.ndarray) -> int:
    return int(round(frame.mean() / 10)) - 1


def smooth_image(h: int = 360, w: int = 640, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 40, w // 40, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def test_probe_reads_what_was_written(tmp_path):
    path = numbered_video(tmp_path / "v.mp4", n=12, size=(64, 48), fps=10.0)
    info = probe(path)
    assert (info.width, info.height, info.frames) == (64, 48, 12)
    assert info.fps == pytest.approx(10.0) and info.seconds == pytest.approx(1.2)


def test_probe_errors_name_the_file(tmp_path):
    with pytest.raises(VideoError, match=r"absent\.mp4: no such file"):
        probe(tmp_path / "absent.mp4")
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    with pytest.raises(VideoError, match=r"notes\.mp4: not a video"):
        probe(tmp_path / "notes.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4: empty file"):
        probe(tmp_path / "empty.mp4")
    big = numbered_video(tmp_path / "big.mp4", n=2, size=(64, 48))
    with pytest.raises(VideoError, match=r"big\.mp4: resolution 64x48 is above the limit 32x32"):
        probe(big, max_width=32, max_height=32)
    tiny = numbered_video(tmp_path / "tiny.mp4", n=2, size=(8, 8))
    with pytest.raises(VideoError, match=r"tiny\.mp4: resolution 8x8 is too small"):
        probe(tiny)


def test_probe_refuses_a_video_without_frames(tmp_path):
    path = tmp_path / "noframes.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (64, 48))
    writer.release()
    if not path.exists():
        path.write_bytes(b"")
    with pytest.raises(VideoError, match=r"noframes\.mp4: (zero frames|not a video|empty file)"):
        probe(path)


def test_read_frames_follows_a_ping_pong_plan(tmp_path):
    path = numbered_video(tmp_path / "v.mp4", n=12)
    plan = [0, 1, 2, 3, 11, 10, 9, 3, 3, 0, 5]
    assert [index_of(f) for f in read_frames(path, plan)] == plan
    # With no room to cache, going back means seeking; the frames must still be the right ones.
    assert [index_of(f) for f in read_frames(path, plan, cache_bytes=0)] == plan
    with pytest.raises(VideoError, match=r"v\.mp4: cannot read frame 12"):
        list(read_frames(path, range(13)))


def test_writer_publishes_only_complete_files(tmp_path):
    final = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(final, 10.0, (64, 48)) as out:
            out.write(np.zeros((48, 64, 3), np.uint8))
            raise RuntimeError("stage failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VideoError, match=r"out\.mp4: frame 1 is \(48, 60, 3\) uint8, expected \(48, 64, 3\) uint8"):
        with VideoWriter(final, 10.0, (64, 48)) as out:
            out.write(np.zeros((48, 64, 3), np.uint8))
            out.write(np.zeros((48, 60, 3), np.uint8))
    with pytest.raises(VideoError, match="no frames were written"):
        VideoWriter(final, 10.0, (64, 48)).close()
    assert list(tmp_path.iterdir()) == []
    numbered_video(final, n=3)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"] and probe(final).frames == 3


@pytest.mark.skipif(shutil.which("ffmpeg") is not None, reason="ffmpeg is installed")
def test_mux_without_ffmpeg_keeps_the_silent_video(tmp_path):
    silent = numbered_video(tmp_path / "frames.mp4", n=3)
    (tmp_path / "a.wav").write_bytes(b"unused")
    assert video.mux(silent, tmp_path / "a.wav", tmp_path / "final.mp4") is False
    assert not silent.exists() and probe(tmp_path / "final.mp4").frames == 3


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_mux_with_ffmpeg_adds_the_audio(tmp_path):
    from heygem.assets import make_speech_audio

    silent = numbered_video(tmp_path / "frames.mp4", n=10)
    wav = make_speech_audio(tmp_path / "a.wav", 1.0)
    assert video.mux(silent, wav, tmp_path / "final.mp4") is True
    assert probe(tmp_path / "final.mp4").frames >= 9


def has_audio(path) -> bool:
    import subprocess

    probe_cmd = [shutil.which("ffprobe") or "ffprobe", "-v", "error", "-select_streams", "a", "-show_entries",
                 "stream=codec_name", "-of", "csv=p=0", str(path)]
    return "aac" in subprocess.run(probe_cmd, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_encoded_writer_makes_what_mux_makes_in_one_pass(tmp_path):
    """Issue 16: frames go to ffmpeg as they come (no mp4v, no second pass at the job's end);
    the file is H.264 + AAC, atomically published, every frame in its place."""
    from heygem.assets import make_speech_audio

    wav = make_speech_audio(tmp_path / "a.wav", 1.0)
    final = tmp_path / "final.mp4"
    writer = video.open_writer(final, 10.0, (64, 48), wav)
    assert isinstance(writer, video.EncodedWriter) and writer.muxed
    with writer:
        for i in range(10):
            writer.write(np.full((48, 64, 3), 10 * (i + 1), np.uint8))
        assert not final.exists()
    assert [p.name for p in tmp_path.iterdir()] == sorted(["a.wav", "final.mp4"])
    cap = cv2.VideoCapture(str(final))
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("ascii", "replace").lower()
    assert fourcc in ("h264", "avc1"), fourcc
    cap.release()
    assert [index_of(f) for f in read_frames(final, range(10))] == list(range(10))
    assert has_audio(final)
    assert isinstance(video.open_writer(tmp_path / "silent.mp4", 10.0, (64, 48)), video.VideoWriter)  # no audio


def x264_options(path) -> dict[str, str]:
    """The options x264 wrote into the stream (its SEI user data: "... options: key=value ...")."""
    data = path.read_bytes()
    start = data.index(b"options: ") + len(b"options: ")
    text = data[start : data.index(b"\x00", start)].decode("ascii")
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_both_encoders_write_the_configured_x264_settings(tmp_path):
    """The preset, crf and threads given reach x264, through the streaming writer and through
    mux; the default is veryfast (its 10-frame lookahead), x264's own medium looks 40 ahead."""
    from heygem.assets import make_speech_audio

    wav = make_speech_audio(tmp_path / "a.wav", 1.0)
    frames = [np.full((48, 64, 3), 10 * (i + 1), np.uint8) for i in range(10)]
    with video.open_writer(tmp_path / "default.mp4", 10.0, (64, 48), wav) as writer:
        for frame in frames:
            writer.write(frame)
    assert x264_options(tmp_path / "default.mp4")["rc_lookahead"] == "10"
    medium = video.Encoding(preset="medium", crf=18, threads=1)
    with video.open_writer(tmp_path / "medium.mp4", 10.0, (64, 48), wav, encoding=medium) as writer:
        for frame in frames:
            writer.write(frame)
    video.mux(numbered_video(tmp_path / "frames.mp4", n=10), wav, tmp_path / "muxed.mp4", encoding=medium)
    for path in (tmp_path / "medium.mp4", tmp_path / "muxed.mp4"):
        options = x264_options(path)
        assert (options["rc_lookahead"], options["crf"][:5], options["threads"]) == ("40", "18.0", "1"), path


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_encoded_writer_aborts_cleanly_and_says_why_ffmpeg_failed(tmp_path):
    from heygem.assets import make_speech_audio

    wav = make_speech_audio(tmp_path / "a.wav", 1.0)
    final = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with video.EncodedWriter(final, 10.0, (64, 48), wav) as out:
            out.write(np.zeros((48, 64, 3), np.uint8))
            raise RuntimeError("stage failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"], "abort kills ffmpeg and leaves nothing"
    with pytest.raises(VideoError, match=r"out\.mp4: frame 1 is \(48, 60, 3\) uint8"):
        with video.EncodedWriter(final, 10.0, (64, 48), wav) as out:
            out.write(np.zeros((48, 64, 3), np.uint8))
            out.write(np.zeros((48, 60, 3), np.uint8))
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio\n")
    with pytest.raises(VideoError, match=r"out\.mp4: ffmpeg (stopped|failed to) encod"):
        with video.EncodedWriter(final, 10.0, (64, 48), not_audio) as out:
            for _ in range(200):  # ffmpeg gives up on the audio; a write or the close says so
                out.write(np.zeros((48, 64, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "notes.wav"]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_encoded_writer_ends_the_video_with_the_audio_as_mux_does(tmp_path):
    """-shortest: frames past the audio's end are dropped, not an error (the pipe closes early)."""
    from heygem.assets import make_speech_audio

    wav = make_speech_audio(tmp_path / "a.wav", 0.5)
    with video.EncodedWriter(tmp_path / "out.mp4", 25.0, (64, 48), wav) as out:
        for _ in range(400):
            out.write(np.zeros((48, 64, 3), np.uint8))
    assert out.frames == 400 and out.ended
    assert 10 <= probe(tmp_path / "out.mp4").frames < 100


def test_crop_then_paste_back_is_nearly_lossless():
    frame = smooth_image()
    original = frame.copy()
    box = (250, 100, 120, 150)
    cut, placement = face.crop(frame, box)
    assert cut.shape == (256, 256, 3) and cut.dtype == np.uint8
    face.paste(frame, cut, placement)
    assert np.abs(frame.astype(int) - original).mean() < 1.0
    assert np.abs(frame.astype(int) - original).max() < 40


def test_paste_changes_only_the_crop_square_and_fades_in():
    frame = np.zeros((360, 640, 3), np.uint8)
    box = (250, 100, 120, 150)
    _, placement = face.crop(frame, box)
    face.paste(frame, np.full((256, 256, 3), 255, np.uint8), placement)
    side = 150 * (1 + 2 * face.MARGIN)
    cx, cy = 250 + 60, 100 + 75
    assert (frame[int(cy), int(cx)] == 255).all()
    outside = np.ones(frame.shape[:2], bool)
    outside[int(cy - side / 2) - 1 : int(cy + side / 2) + 2, int(cx - side / 2) - 1 : int(cx + side / 2) + 2] = False
    assert frame[outside].max() == 0
    row = frame[int(cy), :, 0].astype(int)
    assert np.abs(np.diff(row)).max() < 60  # feathered: no hard edge from 0 to 255


def test_crop_at_the_frame_edge():
    frame = smooth_image()
    cut, placement = face.crop(frame, (600, 320, 80, 80))
    assert cut.shape == (256, 256, 3)
    before = frame.copy()
    face.paste(frame, np.zeros_like(cut), placement)
    assert (frame[359, 639] < before[359, 639]).any() and (frame[:200, :500] == before[:200, :500]).all()


def test_mask_zeroes_the_mouth_region_only():
    cut = np.full((256, 256, 3), 200, np.uint8)
    masked = face.mask(cut)
    y0, y1, x0, x1 = (int(round(v * 256)) for v in MASK_REGION)
    assert (masked[y0:y1, x0:x1] == 0).all()
    masked[y0:y1, x0:x1] = 200
    assert (masked == cut).all()


def test_nchw_round_trip():
    images = np.random.default_rng(1).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    x = face.to_nchw(images)
    assert x.shape == (2, 3, 8, 6) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert (face.from_nchw(x) == images).all()
    assert face.to_nchw(images[0]).shape == (1, 3, 8, 6)


def test_detect_with_the_demo_detector(tmp_path):
    from heygem.assets import make_template_video

    session = ort.InferenceSession(str(build_demo_models(tmp_path)["detector"]), providers=["CPUExecutionProvider"])
    template = make_template_video(tmp_path / "t.mp4", seconds=1.2)
    frame = next(read_frames(template, [25]))
    x, y, w, h = face.detect(session, frame)
    # The drawn head: centred near (320, 162) +- its sway, 110 px wide, 144 px tall with its
    # top under the hair, which is not skin.
    assert abs(x + w / 2 - 320) < 15 and abs(y + h / 2 - 170) < 20
    assert 90 < w < 130 and 90 < h < 150
    assert face.detect(session, np.full((360, 640, 3), (110, 80, 50), np.uint8)) is None


def test_detect_with_a_callable_converts_to_pixels():
    frame = np.zeros((200, 400, 3), np.uint8)
    assert face.detect(lambda feeds: np.array([[0.25, 0.1, 0.5, 0.6]], np.float32), frame) == (100, 20, 100, 100)
    assert face.detect(lambda feeds: np.array([[np.nan, 0, 1, 1]], np.float32), frame) is None


def test_fixed_box_must_fit_the_frame():
    assert face.fixed_box([10, 20, 64, 64], (360, 640, 3)) == (10, 20, 64, 64)
    with pytest.raises(FaceError, match=r"face_box \(600, 20, 64, 64\) does not fit in the 640x360 video"):
        face.fixed_box([600, 20, 64, 64], (360, 640, 3))
    with pytest.raises(FaceError, match="at least 4 px"):
        face.fixed_box([0, 0, 2, 64], (360, 640, 3))
