"""Audio in, one mel window per output video frame out.

The pipeline's audio side: read a file into 16 kHz mono float32, compute a log-mel spectrogram
(10 ms hop), decide which template frame each output frame shows (`frame_plan`), and cut the mel
window centred on each output frame (`windows`) for the audio encoder. Plain numpy functions, so
any worker process can call them; every error names the file and says what is wrong with it.
`FeatureStream` gives the same features a chunk of frames at a time, as a stage reaches them,
so a long job's first frame does not wait for its whole audio (`mel_span` computes only the mel
frames a chunk needs).

Conventions follow Kaldi fbank as WeNet uses it (samples scaled to the int16 range, 25 ms frames,
10 ms hop, 80 bins, natural log with a float32-epsilon floor), with a Hann window; close, not
bit-exact. A real encoder exported to `heygem.models.SPECS["audio_encoder"]` sees the same layout.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import wave
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

SAMPLE_RATE = 16000
HOP = 160  # 10 ms at 16 kHz: 100 mel frames a second
WIN = 400  # 25 ms analysis window
N_FFT = 512
N_MELS = 80
FMIN, FMAX = 20.0, 8000.0
LOG_FLOOR = float(np.log(np.finfo(np.float32).eps))  # the log-mel value of digital silence
WINDOW = 80  # mel frames per video-frame window: 800 ms = the encoder's 20 steps of 40 ms
MEL_RATE = SAMPLE_RATE / HOP

FEATURE_CHUNK = 32  # output frames whose features FeatureStream computes in one encoder call

MIN_PEAK_DBFS = -60.0
MIN_AUDIO_S = 0.2
MAX_AUDIO_TO_VIDEO = 10.0
FFMPEG_TIMEOUT_S = 300.0
# ffmpeg reads an input as exactly one local file: only the file protocol, and only container
# formats that cannot refer to other files (no HLS/DASH playlists, no concat lists, no image
# sequences), so an input cannot make ffmpeg read files outside the folders it was checked
# against. `mov` covers mp4/m4a/3gp, `matroska` covers mkv/mka/webm.
AUDIO_FORMATS = "wav,w64,mp3,aac,flac,ogg,mov,matroska,aiff,caf,amr,au,wv,ac3,eac3,asf,avi,mpegts"


def ffmpeg_input(path: Union[str, Path], formats: str = AUDIO_FORMATS) -> list[str]:
    """ffmpeg arguments that open `path` as one local file of one of `formats` (an `-i` and its options)."""
    return ["-protocol_whitelist", "file", "-format_whitelist", formats, "-i", f"file:{path}"]


class AudioError(ValueError):
    """Audio that cannot be used; the message starts with the file's name."""


def load_audio(path: Union[str, Path], sr: int = SAMPLE_RATE, min_peak_dbfs: float = MIN_PEAK_DBFS) -> tuple[np.ndarray, int]:
    """(samples, sr): mono float32 in [-1, 1] at `sr` Hz.

    PCM WAV (8/16/24/32-bit, any channel count) is read with the standard library, so the demo
    needs no ffmpeg; channels are averaged, other rates resampled by FFT (exact band limit,
    one pass; inputs are speech clips, minutes at most). Anything else goes through ffmpeg when
    it is installed. Missing, empty, undecodable, zero-length and silent files are refused.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if not path.is_file():
        raise AudioError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(12)
    is_wav = head[:4] == b"RIFF" and head[8:12] == b"WAVE"
    ffmpeg = shutil.which("ffmpeg")
    if is_wav:
        try:
            samples, rate = _read_wav(path)
        except (wave.Error, EOFError, ValueError) as err:
            if not ffmpeg:
                raise AudioError(f"{path}: unsupported WAV ({err}); only PCM WAV can be read without ffmpeg; install ffmpeg") from None
            samples, rate = _read_ffmpeg(ffmpeg, path, sr)
    elif ffmpeg:
        samples, rate = _read_ffmpeg(ffmpeg, path, sr)
    else:
        raise AudioError(f"{path}: not a WAV file; only WAV can be read without ffmpeg; install ffmpeg")
    if samples.size == 0:
        raise AudioError(f"{path}: no audio samples")
    samples = resample(samples, rate, sr)
    peak = float(np.max(np.abs(samples)))
    peak_db = 20 * math.log10(peak) if peak > 0 else -math.inf
    if peak_db < min_peak_dbfs:
        raise AudioError(f"{path}: silent (peak {peak_db:.0f} dBFS, below {min_peak_dbfs:.0f} dBFS)")
    return samples, sr


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if width == 1:  # 8-bit WAV is unsigned
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        data = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 8388608.0
    elif width == 4:
        data = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{8 * width}-bit samples")
    data = data[: len(data) - len(data) % channels].reshape(-1, channels)
    return data.mean(axis=1, dtype=np.float32), rate


def _read_ffmpeg(ffmpeg: str, path: Path, sr: int) -> tuple[np.ndarray, int]:
    cmd = [ffmpeg, "-nostdin", "-v", "error", *ffmpeg_input(path), "-vn", "-f", "s16le", "-ac", "1", "-ar", str(sr), "-"]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise AudioError(f"{path}: ffmpeg did not finish decoding within {FFMPEG_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AudioError(f"{path}: not audio ffmpeg can decode ({why[-1] if why else f'exit {done.returncode}'})")
    return np.frombuffer(done.stdout, "<i2").astype(np.float32) / 32768.0, sr


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """FFT resampling: keep the spectrum below the lower Nyquist frequency, then invert."""
    if rate == target:
        return samples.astype(np.float32, copy=False)
    n_out = max(1, int(round(len(samples) * target / rate)))
    spec = np.fft.rfft(samples.astype(np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out = np.fft.irfft(spec[:keep], n_out) * (n_out / len(samples))
    return out.astype(np.float32)


@lru_cache(maxsize=4)
def mel_filters(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters, equally spaced on the HTK mel scale."""
    to_mel = lambda f: 1127.0 * np.log1p(np.asarray(f) / 700.0)  # noqa: E731
    edges = to_mel(FMIN) + np.arange(n_mels + 2) * (to_mel(min(FMAX, sr / 2)) - to_mel(FMIN)) / (n_mels + 1)
    bins = to_mel(np.arange(n_fft // 2 + 1) * sr / n_fft)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid))
    return np.maximum(tri, 0.0).astype(np.float32)


def mel(samples: np.ndarray, sr: int = SAMPLE_RATE, chunk: int = 4096) -> np.ndarray:
    """[80, T] log-mel spectrogram, T = 1 + len(samples) // 160; frame k is centred at k * 10 ms.

    Frames are computed `chunk` at a time so a long clip never holds all spectra at once.
    """
    _check_rate(sr)
    return mel_span(samples, 0, mel_frames(len(samples)), chunk)


def mel_frames(n_samples: int) -> int:
    """T: how many mel frames `mel` makes of `n_samples` samples."""
    return 1 + n_samples // HOP


def mel_span(samples: np.ndarray, first: int, stop: int, chunk: int = 4096) -> np.ndarray:
    """[80, stop - first]: mel frames first .. stop - 1 of `samples` (16 kHz), the same values as
    those columns of `mel(samples)`, computed from the samples they cover only. Columns outside
    the audio (before frame 0, from frame T on) hold LOG_FLOOR, as `windows` pads them."""
    total = mel_frames(len(samples))
    out = np.full((stop - first, N_MELS), LOG_FLOOR, np.float32)
    lo, hi = max(first, 0), min(stop, total)
    if hi > lo:
        # frame k covers samples k * HOP - WIN / 2 .. k * HOP + WIN / 2, zeros beyond the ends
        begin, end = lo * HOP - WIN // 2, (hi - 1) * HOP + WIN - WIN // 2
        x = np.zeros(end - begin, np.float32)
        s0, s1 = max(begin, 0), min(end, len(samples))
        x[s0 - begin : s1 - begin] = np.asarray(samples[s0:s1], np.float32) * 32768.0
        frames = np.lib.stride_tricks.sliding_window_view(x, WIN)[::HOP]
        window = np.hanning(WIN + 1)[:-1].astype(np.float32)
        fb = mel_filters(SAMPLE_RATE).T
        for start in range(0, len(frames), chunk):
            block = frames[start : start + chunk] * window
            power = np.abs(np.fft.rfft(block, N_FFT, axis=1)) ** 2
            at = lo - first + start
            out[at : at + len(block)] = np.log(np.maximum(power.astype(np.float32) @ fb, np.finfo(np.float32).eps))
    return out.T.copy()


def _check_rate(sr: int) -> None:
    if sr != SAMPLE_RATE:
        raise ValueError(f"mel expects {SAMPLE_RATE} Hz samples, got {sr} Hz; load_audio resamples")


def frame_plan(
    audio_s: float,
    video_frames: int,
    fps: float,
    min_audio_s: float = MIN_AUDIO_S,
    max_ratio: float = MAX_AUDIO_TO_VIDEO,
) -> list[int]:
    """Template frame index for each output frame.

    The output follows the AUDIO: round(audio_s * fps) frames. The template loops ping-pong
    (0, 1, .., n-1, n-2, .., 1, 0, 1, ..) so the head never jumps back to frame 0. Audio shorter
    than `min_audio_s`, or longer than `max_ratio` times the template, is refused: the first is
    no speech to sync, the second would show one short clip bouncing back and forth for minutes.
    """
    if video_frames < 1:
        raise AudioError(f"template video has {video_frames} frames; at least 1 is needed")
    if not fps > 0 or not math.isfinite(fps):
        raise AudioError(f"template frame rate {fps} is not a positive number")
    if not audio_s >= min_audio_s:
        raise AudioError(f"audio is {audio_s:.2f} s long; at least {min_audio_s:g} s is needed")
    video_s = video_frames / fps
    if audio_s > max_ratio * video_s:
        raise AudioError(
            f"audio is {audio_s:.1f} s, more than {max_ratio:g}x the template video ({video_s:.1f} s); use a longer template"
        )
    n_out = max(1, int(round(audio_s * fps)))
    if video_frames == 1:
        return [0] * n_out
    period = 2 * (video_frames - 1)
    return [k % period if k % period < video_frames else period - k % period for k in range(n_out)]


def windows(mels: np.ndarray, n_frames: int, fps: float, width: int = WINDOW) -> np.ndarray:
    """[n_frames, 80, width]: the mel window centred on each output frame's time.

    Output frame i shows time i / fps; its window is mel frames round(i / fps * 100) - width/2
    .. + width/2. Beyond the ends of the audio the window holds LOG_FLOOR (silence), so the
    mouth closes rather than repeating the first or last sound.
    """
    half = width // 2
    padded = np.pad(mels, ((0, 0), (half, width - half)), constant_values=LOG_FLOOR)
    view = np.lib.stride_tricks.sliding_window_view(padded, width, axis=1)  # [80, T+1, width]
    centres = np.round(np.arange(n_frames) * (MEL_RATE / fps)).astype(np.int64)
    centres = np.clip(centres, 0, view.shape[1] - 1)
    return np.ascontiguousarray(view[:, centres, :].transpose(1, 0, 2))


def features(model: Union[object, Callable], mel_windows: np.ndarray, batch: int = 64) -> np.ndarray:
    """[n, 256, 20] encoder features for [n, 80, WINDOW] mel windows, `batch` windows per call."""
    from heygem.models import FEATURE_DIM, FEATURE_STEPS, infer

    parts = [infer(model, "audio_encoder", {"mel": mel_windows[i : i + batch]}) for i in range(0, len(mel_windows), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, FEATURE_DIM, FEATURE_STEPS), np.float32)


class FeatureStream:
    """A job's encoder features, computed `chunk` output frames at a time as they are asked for.

    `stream[i]` is output frame i's [256, 20] features: what `features(model, windows(mel(samples),
    n_frames, fps))[i]` gives, within float rounding, without computing the whole audio first.
    Frames are meant to be asked for in order (as a stage decodes them); going back recomputes
    the chunk. Costs one chunk of mel frames and one encoder call per `chunk` frames, so a job's
    first frame is ready in milliseconds whatever the length of its audio.
    """

    def __init__(self, model: Union[object, Callable], samples: np.ndarray, sr: int, n_frames: int, fps: float,
                 chunk: int = FEATURE_CHUNK, width: int = WINDOW):
        _check_rate(sr)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model, self.samples, self.n, self.fps, self.chunk, self.width = model, samples, n_frames, fps, chunk, width
        self._first = 0
        self._feats: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(f"frame {i} of {self.n}")
        if self._feats is None or not 0 <= i - self._first < len(self._feats):
            self._first, self._feats = i, self._compute(i, min(self.n, i + self.chunk))
        return self._feats[i - self._first]

    def _compute(self, lo: int, hi: int) -> np.ndarray:
        half = self.width // 2
        centres = np.round(np.arange(lo, hi) * (MEL_RATE / self.fps)).astype(np.int64)
        centres = np.clip(centres, 0, mel_frames(len(self.samples)))  # as `windows` clips them
        span = mel_span(self.samples, int(centres[0]) - half, int(centres[-1]) - half + self.width)
        view = np.lib.stride_tricks.sliding_window_view(span, self.width, axis=1)
        return features(self.model, np.ascontiguousarray(view[:, centres - centres[0], :].transpose(1, 0, 2)))
