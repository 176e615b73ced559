"""Audio loading (real WAV files of every PCM width), log-mel, per-frame windows, frame plan."""

from __future__ import annotations

import shutil
import wave

import numpy as np
import pytest

from heygem import audio
from heygem.audio import AudioError, frame_plan, load_audio, mel, windows


def write_wav(path, samples: np.ndarray, sr: int, width: int) -> None:
    """samples: [n] or [n, channels] floats in [-1, 1], written as `width`-byte PCM."""
    data = samples if samples.ndim == 2 else samples[:, None]
    if width == 1:
        raw = np.round(data * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        ints = np.round(data * 8388607).astype("<i4").reshape(-1, 1).view(np.uint8).reshape(-1, 4)[:, :3]
        raw = ints.tobytes()
    else:
        dtype = {2: "<i2", 4: "<i4"}[width]
        raw = np.round(data * (2 ** (8 * width - 1) - 1)).astype(dtype).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(width)
        w.setframerate(sr)
        w.writeframes(raw)


def tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)


def peak_hz(samples: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * sr / len(samples))


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_widths_load_as_float_at_16k(tmp_path, width):
    path = tmp_path / f"{width}.wav"
    write_wav(path, tone(440, 0.5, 16000), 16000, width)
    samples, sr = load_audio(path)
    assert sr == 16000 and samples.dtype == np.float32 and len(samples) == 8000
    assert abs(np.max(np.abs(samples)) - 0.5) < 0.02
    assert abs(peak_hz(samples, sr) - 440) < 4


def test_stereo_44k_is_mixed_down_and_resampled(tmp_path):
    left, right = tone(1000, 1.0, 44100, 0.6), tone(1000, 1.0, 44100, 0.2)
    path = tmp_path / "stereo.wav"
    write_wav(path, np.stack([left, right], axis=1), 44100, 2)
    samples, sr = load_audio(path)
    assert sr == 16000 and len(samples) == 16000
    assert abs(peak_hz(samples, sr) - 1000) < 3
    assert abs(np.max(np.abs(samples[100:-100])) - 0.4) < 0.02  # mean of the two channels


def test_resampling_removes_what_16k_cannot_hold(tmp_path):
    path = tmp_path / "hi.wav"
    write_wav(path, tone(1000, 0.5, 44100, 0.4) + tone(12000, 0.5, 44100, 0.4), 44100, 2)
    samples, sr = load_audio(path)
    spectrum = np.abs(np.fft.rfft(samples))
    freqs = np.fft.rfftfreq(len(samples), 1 / sr)
    # 12 kHz would alias to 4 kHz with naive decimation.
    assert spectrum[np.abs(freqs - 4000) < 50].max() < 0.01 * spectrum[np.abs(freqs - 1000) < 50].max()


def test_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(AudioError, match=r"gone\.wav: no such file"):
        load_audio(tmp_path / "gone.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: empty file"):
        load_audio(tmp_path / "empty.wav")
    write_wav(tmp_path / "zero.wav", np.zeros(0), 16000, 2)
    with pytest.raises(AudioError, match=r"zero\.wav: no audio samples"):
        load_audio(tmp_path / "zero.wav")
    write_wav(tmp_path / "quiet.wav", np.zeros(16000), 16000, 2)
    with pytest.raises(AudioError, match=r"quiet\.wav: silent"):
        load_audio(tmp_path / "quiet.wav")


@pytest.mark.skipif(shutil.which("ffmpeg") is not None, reason="ffmpeg is installed: it reads these")
def test_non_wav_without_ffmpeg_says_to_install_it(tmp_path):
    (tmp_path / "speech.mp3").write_bytes(b"ID3\x03\x00" + bytes(200))
    with pytest.raises(AudioError, match=r"speech\.mp3: not a WAV file; only WAV can be read without ffmpeg; install ffmpeg"):
        load_audio(tmp_path / "speech.mp3")
    (tmp_path / "notes.wav").write_text("just some text\n")
    with pytest.raises(AudioError, match=r"notes\.wav: not a WAV file"):
        load_audio(tmp_path / "notes.wav")


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_ffmpeg_decodes_and_refuses_non_audio(tmp_path):
    (tmp_path / "notes.mp3").write_text("just some text\n")
    with pytest.raises(AudioError, match=r"notes\.mp3: not audio ffmpeg can decode"):
        load_audio(tmp_path / "notes.mp3")


def test_mel_shape_frequency_and_silence_floor():
    sr = 16000
    x = np.concatenate([tone(1000, 0.5, sr), np.zeros(sr // 2)]).astype(np.float32)
    m = mel(x, sr)
    assert m.shape == (80, 1 + len(x) // 160) and m.dtype == np.float32
    centres = audio.mel_filters().argmax(axis=1) * sr / audio.N_FFT
    loudest = int(np.argmax(m[:, 20]))
    assert abs(centres[loudest] - 1000) < 100
    assert np.allclose(m[:, 60:], audio.LOG_FLOOR)
    with pytest.raises(ValueError, match="16000 Hz"):
        mel(x, 44100)


def test_windows_are_centred_on_each_frame_and_padded_with_silence():
    n_mel = 400  # 4 s of mel frames
    m = np.zeros((80, n_mel), np.float32)
    m[:, 200] = 7.0  # 2.00 s = frame 50 at 25 fps
    w = windows(m, 100, 25.0)
    assert w.shape == (100, 80, audio.WINDOW)
    assert (w[50, :, audio.WINDOW // 2] == 7.0).all()
    assert (w[49, :, audio.WINDOW // 2 + 4] == 7.0).all()  # 40 ms earlier: the mark is 4 steps later
    assert (w[0, :, : audio.WINDOW // 2] == audio.LOG_FLOOR).all()
    assert (w[99, :, -1] == audio.LOG_FLOOR).all()


def encoder(feeds: dict) -> np.ndarray:
    """A stand-in audio encoder with the contract's shapes: [n, 80, 80] -> [n, 256, 20], every
    output a function of its own window only (each window's mean and a few of its values)."""
    x = feeds["mel"]
    out = np.repeat(x[:, :, ::4].mean(axis=1, keepdims=True), 256, axis=1)
    return out + x[:, :1, :1] * np.arange(256, dtype=np.float32)[None, :, None] / 256


@pytest.mark.parametrize("seconds, fps, extra", [(4.0, 25.0, 0), (1.21, 25.0, 3), (3.0, 29.97, 0), (0.5, 60.0, 2)])
def test_streamed_features_are_the_whole_audio_features(seconds, fps, extra):
    """A chunk at a time (issue 16: a long job's first frame must not wait for its whole audio),
    the same features, frames past the audio's end included (silence)."""
    rng = np.random.default_rng(3)
    samples = (0.3 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    n = round(seconds * fps) + extra
    whole = audio.features(encoder, windows(mel(samples), n, fps))
    for chunk in (1, 7, audio.FEATURE_CHUNK):
        stream = audio.FeatureStream(encoder, samples, 16000, n, fps, chunk=chunk)
        assert len(stream) == n
        np.testing.assert_allclose(np.stack([stream[i] for i in range(n)]), whole, rtol=0, atol=1e-5)
    with pytest.raises(IndexError):
        stream[n]
    with pytest.raises(ValueError, match="16000 Hz"):
        audio.FeatureStream(encoder, samples, 44100, n, fps)


def test_mel_span_is_those_columns_of_mel_and_silence_beyond():
    samples = tone(440, 1.0, 16000).astype(np.float32)
    whole = mel(samples)
    span = audio.mel_span(samples, -30, whole.shape[1] + 20)
    np.testing.assert_array_equal(span[:, 30:-20], whole)
    assert (span[:, :30] == audio.LOG_FLOOR).all() and (span[:, -20:] == audio.LOG_FLOOR).all()
    np.testing.assert_array_equal(audio.mel_span(samples, 17, 61), whole[:, 17:61])


def test_frame_plan_follows_the_audio_and_ping_pongs():
    assert frame_plan(0.4, 4, 25.0) == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    plan = frame_plan(7.0, 100, 25.0)
    assert len(plan) == 175 and max(plan) == 99 and plan[99:102] == [99, 98, 97]
    assert all(abs(a - b) == 1 for a, b in zip(plan, plan[1:]))  # never jumps
    assert frame_plan(0.36, 1, 25.0) == [0] * 9
    assert frame_plan(0.25, 100, 30.0) == list(range(8))


@pytest.mark.parametrize(
    "args, message",
    [
        ((0.1, 100, 25.0), "audio is 0.10 s long; at least 0.2 s is needed"),
        ((41.0, 100, 25.0), "more than 10x the template video (4.0 s)"),
        ((1.0, 0, 25.0), "template video has 0 frames"),
        ((1.0, 100, 0.0), "frame rate 0.0 is not a positive number"),
        ((float("nan"), 100, 25.0), "at least 0.2 s is needed"),
    ],
)
def test_frame_plan_refuses_with_a_reason(args, message):
    with pytest.raises(AudioError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        frame_plan(*args)
