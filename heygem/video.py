"""Video files: probe, read frames by index, write atomically, mux the audio.

OpenCV reads and writes; ffmpeg, when installed, adds the audio track. Every error names the
file. A half-written output never appears under its final name: frames go to a temp file next
to it, renamed only when the writer closes cleanly. `open_writer` picks a job's writer: with
ffmpeg, `EncodedWriter` encodes the frames and the audio in one pass as they come (what `mux`
makes of a `VideoWriter`'s file afterwards, without the second pass); without, `VideoWriter`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Union

import numpy as np

MIN_SIDE = 16
MAX_FPS = 240.0
CACHE_BYTES = 256 << 20
MUX_TIMEOUT_S = 600.0
# An EncodedWriter whose ffmpeg takes no frame data for this long has failed.
WRITE_STALL_S = 60.0


class Encoding(NamedTuple):
    """What `mux` and `EncodedWriter` produce: H.264 (x264) + AAC, ending with the shorter stream.

    The default preset is veryfast, not x264's medium, because the encoder shares the CPU with
    the pipeline (BENCHMARKS.md, issue 16; 640x360, crf 20): it costs a third less CPU per frame
    (3.1 vs 4.6 ms), and its 10-frame lookahead instead of 40 is what a job waits for after its
    last frame (0.06 - 0.09 vs 0.14 - 0.23 s). The price: 52.8 vs 54.6 dB PSNR against the frames
    at crf 20, both far beyond what the eye tells apart. `threads` 0 leaves x264 its own choice
    (1.5 threads per core); the pipeline sizes it to the cores its generators leave free.
    """

    preset: str = "veryfast"
    crf: int = 20
    threads: int = 0

    def args(self) -> list[str]:
        return ["-c:v", "libx264", "-preset", self.preset, "-crf", str(self.crf), "-threads", str(self.threads),
                "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k", "-shortest"]


# OpenCV's FFmpeg backend reads an input as exactly one local file, like heygem.audio's ffmpeg:
# the file protocol only, and containers that cannot refer to other files (an HLS playlist would
# otherwise make it read any video on the host). OpenCV reads this variable at every open.
VIDEO_FORMATS = "mov,matroska,avi,flv,mpegts,mpeg,asf,m4v,h264,hevc"
_CAPTURE_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_CAPTURE_OPTIONS = f"protocol_whitelist;file|format_whitelist;{VIDEO_FORMATS}"


class VideoError(ValueError):
    """A video that cannot be read or written; the message starts with the file's name."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


def _open(path: Path):
    import cv2

    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if not path.is_file():
        raise VideoError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file")
    if os.environ.get(_CAPTURE_ENV) != _CAPTURE_OPTIONS:
        os.environ[_CAPTURE_ENV] = _CAPTURE_OPTIONS
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{path}: not a video OpenCV can open")
    return cap


def probe(path: Union[str, Path], max_width: int = 3840, max_height: int = 2160) -> VideoInfo:
    """Size, frame rate and frame count, checked: zero frames, a bad frame rate or a
    resolution below MIN_SIDE or above the limits (config `max_width`/`max_height`) is an error.

    The container's frame count is trusted only when positive; otherwise frames are counted by
    decoding, since some files carry no count."""
    import cv2

    path = Path(path)
    cap = _open(path)
    try:
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        ok, first = cap.read()
        if not ok or first is None:
            raise VideoError(f"{path}: zero frames (no decodable video frame)")
        if frames <= 0:
            frames = 1
            while cap.grab():
                frames += 1
    finally:
        cap.release()
    if width < MIN_SIDE or height < MIN_SIDE:
        raise VideoError(f"{path}: resolution {width}x{height} is too small (at least {MIN_SIDE}x{MIN_SIDE})")
    if width > max_width or height > max_height:
        raise VideoError(f"{path}: resolution {width}x{height} is above the limit {max_width}x{max_height} (config max_width/max_height)")
    if not (math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise VideoError(f"{path}: frame rate {fps:g} is not usable (0 < fps <= {MAX_FPS:g})")
    return VideoInfo(width, height, fps, frames)


def read_frames(path: Union[str, Path], indices: Iterable[int], cache_bytes: int = CACHE_BYTES) -> Iterator[np.ndarray]:
    """Yield the BGR uint8 frame for each index, in the order given (repeats and going back
    allowed, as a ping-pong frame plan needs).

    Forward steps decode sequentially; recently decoded frames are kept up to `cache_bytes`, so
    the backward half of a ping-pong loop over a short template decodes nothing; older frames
    are reached by seeking. Yielded arrays may be shared with the cache: do not modify them.
    """
    import cv2

    path = Path(path)
    cap = _open(path)
    cache: OrderedDict[int, np.ndarray] = OrderedDict()
    used = 0
    pos = 0  # index of the frame the next cap.read() returns
    try:
        for index in indices:
            if index < 0:
                raise VideoError(f"{path}: frame index {index} is negative")
            frame = cache.get(index)
            if frame is not None:
                cache.move_to_end(index)
                yield frame
                continue
            if index < pos or index > pos + 64:
                cap.set(cv2.CAP_PROP_POS_FRAMES, index)
                pos = index
            while pos < index:
                if not cap.grab():
                    raise VideoError(f"{path}: cannot read frame {index} (the file ends at frame {pos})")
                pos += 1
            ok, frame = cap.read()
            if not ok or frame is None:
                raise VideoError(f"{path}: cannot read frame {index}")
            pos += 1
            cache[index] = frame
            used += frame.nbytes
            while used > cache_bytes and len(cache) > 1:
                used -= cache.popitem(last=False)[1].nbytes
            yield frame
    finally:
        cap.release()


def make_output_folder(path: Union[str, Path]) -> Path:
    """Create the folder the video `path` goes in; a VideoError that says what is in the way."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise VideoError(f"{path}: cannot create its folder: {blocker} is a file, not a folder") from None
    except OSError as err:
        raise VideoError(f"{path}: cannot create its folder {folder}: {err.strerror}") from None
    return folder


def _why_unwritable(folder: Path) -> str:
    """The likely reason OpenCV (which only logs) could not open a file in `folder`."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"{folder} is on a read-only file system"
    except OSError as err:
        return f"{folder}: {err.strerror}"
    if not os.access(folder, os.W_OK):
        return f"no permission to write in {folder}"
    return "no encoder for mp4v in this OpenCV build?"


class Published:
    """A file written to a temp name: `close()` publishes it, `abort()` discards it; a `with` block
    does the first when it ends cleanly and the second when it raises."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class VideoWriter(Published):
    """Write BGR uint8 frames to `path` (mp4v in MP4), atomically.

    Frames go to a hidden temp file in the same folder; `close()` renames it to `path`, and
    `abort()` (or leaving the `with` block by an exception) deletes it, so `path` either holds
    a complete video or is untouched. OpenCV drops frames of the wrong size without a word;
    `write` refuses them instead. The video is silent (`muxed` False): `mux` adds the audio.
    """

    muxed = False

    def __init__(self, path: Union[str, Path], fps: float, size: tuple[int, int]):
        import cv2

        self.path = Path(path)
        self.size = (int(size[0]), int(size[1]))
        self.frames = 0
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.partial{self.path.suffix or '.mp4'}")
        self._writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), self.size)
        if not self._writer.isOpened():
            self._writer.release()
            with contextlib.suppress(OSError):  # EROFS, EACCES: the reason below says it better
                self.tmp.unlink(missing_ok=True)
            raise VideoError(f"{self.path}: OpenCV cannot write an mp4v video here ({self.size[0]}x{self.size[1]} "
                             f"at {fps:g} fps): {_why_unwritable(self.tmp.parent)}")

    def write(self, frame: np.ndarray) -> None:
        _check_frame(self, frame, self._writer is not None)
        self._writer.write(frame)
        self.frames += 1

    def close(self) -> Path:
        """Finish the file and move it to its final name; a video with no frames is an error."""
        if self._writer is None:
            return self.path
        self._writer.release()
        self._writer = None
        if self.frames == 0:
            self.tmp.unlink(missing_ok=True)
            raise VideoError(f"{self.path}: no frames were written")
        self._verify()
        os.replace(self.tmp, self.path)
        return self.path

    def _verify(self) -> None:
        """Read the file back: OpenCV only warns when a write fails (ENOSPC), and would leave a
        truncated, unplayable video to be renamed into place as a success."""
        import cv2

        cap = cv2.VideoCapture(str(self.tmp))
        readable = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        cap.release()
        if readable != self.frames:
            free = shutil.disk_usage(self.tmp.parent).free
            self.tmp.unlink(missing_ok=True)
            raise VideoError(f"{self.path}: the written video is incomplete ({readable} of {self.frames} frames "
                             f"readable); disk full? {free} bytes free in {self.tmp.parent}")

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        _discard(self.tmp)


def mux(video: Union[str, Path], audio: Union[str, Path], out: Union[str, Path], timeout_s: float = MUX_TIMEOUT_S,
        encoding: Encoding = Encoding()) -> bool:
    """Put `audio` under `video` as `out` (`encoding`: H.264 + AAC, ends with the shorter stream).

    Returns True when muxed. Without ffmpeg the silent video is moved to `out` and False is
    returned, for the caller to report; the job still has its frames. `video` is consumed
    either way. ffmpeg writes to a temp name first, so `out` is never half-written.
    """
    from heygem.audio import ffmpeg_input

    video, audio, out = Path(video), Path(audio), Path(out)
    ffmpeg: Optional[str] = shutil.which("ffmpeg")
    if ffmpeg is None:
        shutil.move(str(video), str(out))
        return False
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.mux{out.suffix or '.mp4'}")
    cmd = [
        ffmpeg, "-nostdin", "-v", "error", "-y", *ffmpeg_input(video, VIDEO_FORMATS), *ffmpeg_input(audio),
        "-map", "0:v:0", "-map", "1:a:0", *encoding.args(), str(tmp),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise VideoError(f"{out}: ffmpeg did not finish muxing within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise VideoError(f"{out}: ffmpeg failed to mux {video.name} + {audio.name}: {why[-1] if why else f'exit {done.returncode}'}")
    os.replace(tmp, out)
    video.unlink(missing_ok=True)
    return True


def open_writer(path: Union[str, Path], fps: float, size: tuple[int, int], audio: Optional[Union[str, Path]] = None,
                encoding: Encoding = Encoding()) -> Union["EncodedWriter", VideoWriter]:
    """The writer for a job's frames: with ffmpeg installed and an `audio`, an `EncodedWriter`
    (the finished video, `muxed`); otherwise a `VideoWriter` (silent mp4v, for `mux`)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is not None and audio is not None:
        return EncodedWriter(path, fps, size, audio, ffmpeg, encoding=encoding)
    return VideoWriter(path, fps, size)


class EncodedWriter(Published):
    """Pipe BGR uint8 frames into ffmpeg, which encodes them with `audio` under them as `mux`
    does (`encoding`), atomically, as they come.

    Writing a `VideoWriter`'s mp4v and then `mux`ing it encodes every frame twice, and the
    second pass (measured: 5.5 ms of CPU per 640x360 frame) starts only when the last frame is
    written, so a job's end waited for a pass over its whole video. Here the one pass runs
    beside the stage, and `close()` waits for ffmpeg's last few frames only (~0.2 s); the frames
    also skip mp4v's generation loss. Same contract as `VideoWriter`: ffmpeg writes a hidden
    temp file, `close()` renames it to `path`, `abort()` kills ffmpeg and deletes it; frames of
    the wrong size are refused. Waits are bounded: a write gives up when ffmpeg has taken no
    data for `stall_s` (or has failed), `close()` after MUX_TIMEOUT_S. Like `mux`, the video
    ends with the shorter stream: once ffmpeg has ended it at the audio's end (and exited
    cleanly), later frames are counted and dropped.
    """

    muxed = True

    def __init__(self, path: Union[str, Path], fps: float, size: tuple[int, int], audio: Union[str, Path],
                 ffmpeg: Optional[str] = None, stall_s: float = WRITE_STALL_S, encoding: Encoding = Encoding()):
        import fcntl
        import tempfile

        from heygem.audio import ffmpeg_input

        self.path = Path(path)
        self.size = (int(size[0]), int(size[1]))
        self.frames = 0
        self.stall_s = stall_s
        self.ended = False  # ffmpeg ended the video at the audio's end (-shortest) and exited
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.partial{self.path.suffix or '.mp4'}")
        ffmpeg = ffmpeg or shutil.which("ffmpeg")
        if ffmpeg is None:
            raise VideoError(f"{self.path}: no ffmpeg to encode with; install ffmpeg")
        w, h = self.size
        cmd = [ffmpeg, "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}",
               "-r", repr(float(fps)), "-i", "pipe:0", *ffmpeg_input(audio), "-map", "0:v:0", "-map", "1:a:0",
               *encoding.args(), str(self.tmp)]
        self._errors = tempfile.TemporaryFile()  # ffmpeg's reasons, read when it fails
        try:
            self._proc: Optional[subprocess.Popen] = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._errors)
        except OSError as err:
            self._errors.close()
            raise VideoError(f"{self.path}: cannot start ffmpeg: {err.strerror}") from None
        self._fd = self._proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError, AttributeError):  # a frame per pipe write where the kernel allows
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, min(1 << 20, max(1 << 16, w * h * 3)))

    def write(self, frame: np.ndarray) -> None:
        import select
        import time

        _check_frame(self, frame, self._proc is not None)
        data = memoryview(np.ascontiguousarray(frame)).cast("B")
        deadline = time.monotonic() + self.stall_s
        while data and not self.ended:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except (BrokenPipeError, ConnectionResetError):
                self._exited()
                continue
            if sent:
                data = data[sent:]
                deadline = time.monotonic() + self.stall_s
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise VideoError(f"{self.path}: ffmpeg took no frame data for {self.stall_s:.0f} s")
            if self._proc.poll() is not None:
                self._exited()
                continue
            select.select([], [self._fd], [], min(1.0, left))
        self.frames += 1

    def _exited(self) -> None:
        """ffmpeg closed its input: ended at the audio's end (exit 0) or failed (raises)."""
        try:
            code = self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            raise VideoError(f"{self.path}: ffmpeg stopped encoding: {self._why(code)}")
        self.ended = True

    def close(self, timeout_s: float = MUX_TIMEOUT_S) -> Path:
        """Let ffmpeg finish (bounded), then move the video to its final name."""
        proc = self._proc
        if proc is None:
            return self.path
        self._proc = None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            raise VideoError(f"{self.path}: ffmpeg did not finish encoding within {timeout_s:.0f} s") from None
        try:
            if proc.returncode != 0:
                self.tmp.unlink(missing_ok=True)
                raise VideoError(f"{self.path}: ffmpeg failed to encode: {self._why(proc.returncode)}")
            if self.frames == 0:
                self.tmp.unlink(missing_ok=True)
                raise VideoError(f"{self.path}: no frames were written")
            os.replace(self.tmp, self.path)
        finally:
            self._errors.close()
        return self.path

    def abort(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self._kill(proc)
            self._errors.close()
        _discard(self.tmp)

    def _kill(self, proc: subprocess.Popen) -> None:
        """Our own ffmpeg child: SIGKILL, reap (bounded), remove its temp file."""
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
        with contextlib.suppress(OSError):
            proc.stdin.close()
        _discard(self.tmp)

    def _why(self, code: Optional[int] = None) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._errors.seek(0)
            lines = self._errors.read().decode("utf-8", "replace").strip().splitlines()
            # ffmpeg's last line is often a consequence ("Error initializing output stream"): a
            # line naming a system error is the cause.
            cause = next((line for line in reversed(lines) if any(e in line for e in _SYSTEM_ERRORS)), None)
            if cause and "No space left on device" in cause:  # said as the operator will search for it
                with contextlib.suppress(OSError):
                    return f"{cause} (disk full: {shutil.disk_usage(self.tmp.parent).free} bytes free in {self.tmp.parent})"
            if cause or lines:
                return cause or lines[-1]
        code = self._proc.poll() if code is None and self._proc is not None else code
        return f"exit {code}" if code is not None else "no reason given"


def _check_frame(writer, frame: np.ndarray, open_: bool) -> None:
    """Both writers refuse a write after close, and a frame of another size or type."""
    if not open_:
        raise VideoError(f"{writer.path}: writer is closed")
    w, h = writer.size
    if frame.shape != (h, w, 3) or frame.dtype != np.uint8:
        raise VideoError(f"{writer.path}: frame {writer.frames} is {frame.shape} {frame.dtype}, expected ({h}, {w}, 3) uint8")


_SYSTEM_ERRORS = ("No space left on device", "Read-only file system", "Permission denied", "No such file or directory",
                  "Disk quota exceeded", "Input/output error")


def _discard(path: Path) -> None:
    """Remove a temp file on an abort path, which must never raise: on a read-only file system
    (EROFS), the very failure being cleaned up, the file cannot exist anyway."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
