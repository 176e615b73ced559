"""An input is read as one local file: a playlist or list inside the input folders must not make
ffmpeg (audio, mux) or OpenCV's FFmpeg backend (video) read other files of the host.

`-protocol_whitelist file` alone does not do it: an HLS playlist's segments are files too. The
readers also whitelist container formats that cannot name other files; these tests show both
the refusal and that ordinary inputs still open.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from heygem import assets
from heygem.audio import AudioError, load_audio
from heygem.video import VideoError, mux, probe

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg is not installed")


def playlist(path: Path, *segments: Path | str) -> Path:
    lines = ["#EXTM3U", "#EXT-X-TARGETDURATION:1"]
    for seg in segments:
        lines += ["#EXTINF:1,", str(seg)]
    path.write_text("\n".join([*lines, "#EXT-X-ENDLIST", ""]))
    return path


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """Media in a folder that is not an input folder: what a playlist would smuggle in."""
    root = tmp_path_factory.mktemp("outside")
    return {
        "video": assets.make_template_video(root / "private.mp4", seconds=1.0),
        "audio": assets.make_speech_audio(root / "private.wav", seconds=1.0),
    }


def test_a_video_playlist_naming_a_file_elsewhere_is_not_opened(tmp_path, outside):
    assert probe(outside["video"]).frames == 25  # the file itself is a readable video
    hls = playlist(tmp_path / "face.m3u8", outside["video"])
    with pytest.raises(VideoError, match=r"face\.m3u8: not a video OpenCV can open"):
        probe(hls)


def test_a_video_playlist_naming_etc_hostname_is_not_opened(tmp_path):
    with pytest.raises(VideoError, match="not a video OpenCV can open"):
        probe(playlist(tmp_path / "face.m3u8", "/etc/hostname"))


def test_ordinary_video_containers_still_open(tmp_path):
    import cv2
    import numpy as np

    frame = np.full((64, 64, 3), 128, np.uint8)
    for name, fourcc in (("a.avi", "MJPG"), ("m.mp4", "mp4v"), ("k.mkv", "MJPG")):
        out = cv2.VideoWriter(str(tmp_path / name), cv2.VideoWriter_fourcc(*fourcc), 25.0, (64, 64))
        if not out.isOpened():
            continue
        for _ in range(25):
            out.write(frame)
        out.release()
        assert probe(tmp_path / name).frames == 25, name


@needs_ffmpeg
def test_an_audio_playlist_naming_etc_hostname_and_a_file_elsewhere_is_refused(tmp_path, outside):
    segment = tmp_path / "private.aac"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-i", str(outside["audio"]), "-c:a", "aac", str(segment)],
                   check=True, timeout=60)
    # unrestricted, ffmpeg would decode the second segment (it refuses /etc/hostname only for its extension)
    hls = playlist(tmp_path / "speech.m3u8", "/etc/hostname", segment)
    with pytest.raises(AudioError, match=r"speech\.m3u8: not audio ffmpeg can decode"):
        load_audio(hls)


@needs_ffmpeg
def test_an_ffconcat_list_is_refused(tmp_path, outside):
    listing = tmp_path / "speech.txt"
    listing.write_text(f"ffconcat version 1.0\nfile {outside['audio'].name}\n")
    shutil.copy(outside["audio"], tmp_path / outside["audio"].name)
    with pytest.raises(AudioError, match="not audio ffmpeg can decode"):
        load_audio(listing)


@needs_ffmpeg
@pytest.mark.parametrize("suffix, codec", [(".mp3", "libmp3lame"), (".m4a", "aac"), (".ogg", "libvorbis"), (".flac", "flac")])
def test_ordinary_audio_formats_still_decode(tmp_path, outside, suffix, codec):
    path = tmp_path / f"speech{suffix}"
    made = subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-i", str(outside["audio"]), "-c:a", codec, str(path)],
                          capture_output=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"this ffmpeg cannot encode {codec}")
    samples, sr = load_audio(path)
    assert sr == 16000 and abs(len(samples) / sr - 1.0) < 0.1


@needs_ffmpeg
def test_mux_reads_its_inputs_with_the_same_restrictions(tmp_path, outside):
    video = tmp_path / "silent.mp4"
    shutil.copy(outside["video"], video)
    assert mux(video, outside["audio"], tmp_path / "out.mp4") is True
    assert probe(tmp_path / "out.mp4").frames == 25
    video2 = tmp_path / "silent2.mp4"
    shutil.copy(outside["video"], video2)
    with pytest.raises(VideoError, match="ffmpeg failed to mux"):
        mux(video2, playlist(tmp_path / "speech.m3u8", outside["audio"]), tmp_path / "out2.mp4")
