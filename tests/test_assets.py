"""The synthetic demo media: a moving drawn face and speech-like audio."""

from __future__ import annotations

import numpy as np

from heygem import assets, audio, video


def test_template_video_is_a_moving_face(tmp_path):
    path = assets.make_template_video(tmp_path / "t.mp4", seconds=2.0, fps=25.0, size=(320, 180))
    info = video.probe(path)
    assert (info.width, info.height, info.frames, info.fps) == (320, 180, 50, 25.0)
    frames = list(video.read_frames(path, [10, 30]))
    skin = [np.argwhere((f[:, :, 2].astype(int) - f[:, :, 0]) > 50) for f in frames]
    centres = [s.mean(axis=0) for s in skin]
    assert all(len(s) > 0.03 * 320 * 180 for s in skin)  # a head-sized skin blob
    assert 0.5 < np.abs(centres[0] - centres[1]).max() < 15  # the head moved a little


def test_speech_audio_has_syllables_and_pauses(tmp_path):
    path = assets.make_speech_audio(tmp_path / "s.wav", 6.0)
    samples, sr = audio.load_audio(path)
    assert sr == 16000 and len(samples) == 96000
    rms = np.sqrt(np.mean(samples[: len(samples) // 160 * 160].reshape(-1, 160) ** 2, axis=1))
    quiet = rms < 0.01 * rms.max()
    assert 0.2 < quiet.mean() < 0.65  # pauses between syllables and phrases
    loud = rms > 0.1 * rms.max()
    onsets = np.sum(loud[1:] & ~loud[:-1])
    assert 2.0 < onsets / 6.0 < 6.0  # syllables, counting the pauses: about 3 a second
    assert assets.make_speech_audio(tmp_path / "again.wav", 6.0).read_bytes() == path.read_bytes()
