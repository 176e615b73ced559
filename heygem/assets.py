"""Synthetic demo inputs: a drawn talking-head template video and a speech-like WAV.

The demo and the tests need media that exercise every stage without shipping recordings: a
face the demo detector finds (skin-coloured head on a blue background, moving a little so the
box track is real work) and audio whose loudness rises and falls like syllables, so the demo
generator's mouth visibly follows it. Both are deterministic for a given seed.
"""

from __future__ import annotations

import math
import wave
from pathlib import Path
from typing import Union

import numpy as np

from heygem.video import VideoWriter

SKIN = (150, 180, 228)  # BGR
HAIR = (30, 40, 60)
SHIRT = (140, 80, 40)
LIPS = (70, 70, 170)

# Vowel formants (F1, F2, F3) in Hz: a, e, i, o, u.
VOWELS = ((730, 1090, 2440), (530, 1840, 2480), (270, 2290, 3010), (570, 840, 2410), (300, 870, 2240))


def make_template_video(path: Union[str, Path], seconds: float = 4.0, fps: float = 25.0, size: tuple[int, int] = (640, 360)) -> Path:
    """Write a video of a drawn face (head, hair, eyes that blink, closed mouth) that bobs and
    sways a few pixels, on a shaded background. Returns the path."""
    width, height = size
    n = max(1, int(round(seconds * fps)))
    background = _background(width, height)
    with VideoWriter(path, fps, size) as out:
        for i in range(n):
            out.write(_face_frame(background, i / fps))
    return Path(path)


def _background(width: int, height: int) -> np.ndarray:
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top, bottom = np.array([110, 80, 50], np.float32), np.array([70, 50, 35], np.float32)
    img = top + (bottom - top) * y + np.float32(20) * (x - 0.5)
    return np.clip(img, 0, 255).astype(np.uint8)


def _face_frame(background: np.ndarray, t: float) -> np.ndarray:
    import cv2

    img = background.copy()
    h, w = img.shape[:2]
    s = h / 360.0  # everything scales with the frame height
    cx = w / 2 + 8 * s * math.sin(2 * math.pi * 0.3 * t)
    cy = h * 0.45 + 5 * s * math.sin(2 * math.pi * 0.5 * t + 1.0)
    ax, ay = 55 * s, 72 * s
    tilt = 3.0 * math.sin(2 * math.pi * 0.2 * t)

    def p(dx: float, dy: float) -> tuple[int, int]:
        return int(round(cx + dx * s)), int(round(cy + dy * s))

    def axes(a: float, b: float) -> tuple[int, int]:
        return max(1, int(round(a * s))), max(1, int(round(b * s)))

    aa = cv2.LINE_AA
    cv2.ellipse(img, p(0, 150), axes(150, 70), 0, 180, 360, SHIRT, -1, aa)
    cv2.ellipse(img, p(0, 0), (int(ax), int(ay)), tilt, 0, 360, SKIN, -1, aa)
    cv2.ellipse(img, p(0, -40), axes(58, 42), tilt, 180, 360, HAIR, -1, aa)
    blink = (t % 3.0) < 0.12
    for side in (-1, 1):
        cv2.line(img, p(side * 30, -29), p(side * 13, -27), HAIR, max(1, int(3 * s)), aa)
        if blink:
            cv2.line(img, p(side * 30, -14), p(side * 12, -14), HAIR, max(1, int(2 * s)), aa)
        else:
            cv2.ellipse(img, p(side * 21, -14), axes(10, 6), tilt, 0, 360, (245, 245, 245), -1, aa)
            cv2.circle(img, p(side * 21, -14), max(1, int(round(4 * s))), (40, 30, 20), -1, aa)
    cv2.line(img, p(0, -6), p(-4, 14), (110, 140, 190), max(1, int(2 * s)), aa)
    cv2.ellipse(img, p(0, 33), axes(18, 3), tilt, 0, 360, LIPS, -1, aa)
    return img


def make_speech_audio(path: Union[str, Path], seconds: float, sr: int = 16000, seed: int = 0) -> Path:
    """Write a 16-bit mono WAV that sounds roughly like speech: voiced syllables at about 4 Hz
    (raised-cosine envelopes, gliding pitch, vowel formants, noisy consonant onsets) in phrases
    separated by pauses. Returns the path."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    out = np.zeros(n, np.float64)
    t = 0.15
    while t < seconds - 0.1:
        for _ in range(int(rng.integers(3, 8))):  # one phrase
            dur = float(rng.uniform(0.14, 0.26))
            if t + dur > seconds - 0.05:
                break
            _add_syllable(out, int(t * sr), int(dur * sr), sr, rng)
            t += dur + float(rng.uniform(0.03, 0.1))
        t += float(rng.uniform(0.25, 0.6))  # pause between phrases
    peak = np.max(np.abs(out)) or 1.0
    pcm = np.round(out / peak * 0.7 * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return Path(path)


def _add_syllable(out: np.ndarray, start: int, length: int, sr: int, rng: np.random.Generator) -> None:
    k = np.arange(length)
    env = np.sin(np.pi * k / length) ** 2
    f0 = float(rng.uniform(110, 180)) * (1 + 0.15 * np.linspace(0.5, -0.5, length))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = VOWELS[int(rng.integers(len(VOWELS)))]
    voiced = np.zeros(length)
    for h in range(1, int(3800 / f0.max()) + 1):
        freq = h * float(f0.mean())
        gain = sum(math.exp(-(((freq - f) / (0.12 * f + 60)) ** 2)) / (i + 1) for i, f in enumerate(formants))
        voiced += (gain + 0.02) / h**0.5 * np.sin(h * phase)
    onset = int(min(length, 0.04 * sr))
    noise = np.zeros(length)
    noise[:onset] = rng.standard_normal(onset) * np.linspace(0.4, 0.0, onset)
    noise = np.convolve(noise, [1, -0.9], mode="same")  # brighten: consonant-like hiss
    out[start : start + length] += env * voiced + noise
