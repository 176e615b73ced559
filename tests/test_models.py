"""Model contracts and the demo models, run in real ONNX Runtime CPU sessions."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from heygem import assets, audio, face, models
from heygem.models import SPECS, ModelError, build_demo_models, check_model, infer
from heygem.providers import ModelError as ProvidersModelError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def sessions(demo):
    return {role: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for role, path in demo.items()}


@pytest.fixture(scope="module")
def face_crop(sessions, tmp_path_factory):
    """A crop of the template's face, cut around the demo detector's box."""
    from heygem.video import read_frames

    path = assets.make_template_video(tmp_path_factory.mktemp("video") / "t.mp4", seconds=0.4)
    frame = next(read_frames(path, [5]))
    box = face.detect(sessions["detector"], frame)
    assert box is not None
    return face.crop(frame, box)[0]


def test_demo_models_meet_their_specs_and_stay_small(demo):
    for role, path in demo.items():
        assert check_model(path, role) is SPECS[role]
        assert path.stat().st_size < 2 << 20, f"{role} is {path.stat().st_size} bytes"


def test_build_is_idempotent_deterministic_and_repairs(demo, tmp_path):
    stamps = {role: path.stat().st_mtime_ns for role, path in demo.items()}
    assert build_demo_models(demo["generator"].parent) == demo
    assert {role: path.stat().st_mtime_ns for role, path in demo.items()} == stamps
    again = build_demo_models(tmp_path)
    for role in demo:
        assert again[role].read_bytes() == demo[role].read_bytes()
    again["generator"].write_bytes(b"truncated")
    build_demo_models(tmp_path)
    assert again["generator"].read_bytes() == demo["generator"].read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_audio_encoder_shapes_and_loudness_channels(sessions):
    rng = np.random.default_rng(0)
    loud = rng.uniform(15, 22, (3, 80, 80)).astype(np.float32)
    silent = np.full((2, 80, 80), audio.LOG_FLOOR, np.float32)
    out = infer(sessions["audio_encoder"], "audio_encoder", {"mel": np.concatenate([loud, silent])})
    assert out.shape == (5, 256, 20) and out.dtype == np.float32
    assert np.isfinite(out).all()
    energy = out[:, : models.ENERGY_CHANNELS].mean(axis=(1, 2))
    assert (energy[:3] > 0.5).all() and (energy[3:] < -0.9).all()


def _mouth_box(size: int = models.CROP) -> tuple[slice, slice]:
    cx, cy, rx, ry = models.MOUTH
    return slice(int((cy - ry) * size), int((cy + ry) * size)), slice(int((cx - rx) * size), int((cx + rx) * size))


def test_generator_mouth_opens_with_loud_audio_only(sessions, face_crop, tmp_path):
    wav = assets.make_speech_audio(tmp_path / "s.wav", 3.0)
    samples, sr = audio.load_audio(wav)
    wins = audio.windows(audio.mel(samples, sr), 75, 25.0)
    feats = audio.features(sessions["audio_encoder"], wins)
    loudness = feats[:, : models.ENERGY_CHANNELS, 9:11].mean(axis=(1, 2))
    pick = [int(np.argmax(loudness)), int(np.argmin(loudness))]
    assert loudness[pick[0]] > 0.5 > -0.5 > loudness[pick[1]]

    ref = face.to_nchw(np.stack([face_crop] * 2))
    masked = face.to_nchw(np.stack([face.mask(face_crop)] * 2))
    out = infer(sessions["generator"], "generator", {"masked": masked, "reference": ref, "audio": feats[pick]})
    assert out.shape == (2, 3, 256, 256) and out.dtype == np.float32
    diff = np.abs(out[0] - out[1]).mean(axis=0)
    rows, cols = _mouth_box()
    in_mouth = diff[rows, cols].mean()
    elsewhere = diff.copy()
    elsewhere[rows, cols] = np.nan
    assert in_mouth > 0.15, in_mouth
    assert in_mouth > 20 * np.nanmean(elsewhere)
    y0, y1, x0, x1 = (int(round(v * 256)) for v in models.MASK_REGION)
    elsewhere[y0:y1, x0:x1] = np.nan
    assert np.nanmax(elsewhere) < 1e-6  # outside the masked region the audio changes nothing
    # Silent audio: the crop comes back as the face it was given (mouth closed).
    assert np.abs(out[1] - ref[1]).max() < 0.03


def test_generator_runs_batches(sessions):
    batch = {
        "masked": np.zeros((4, 3, 256, 256), np.float32),
        "reference": np.full((4, 3, 256, 256), 0.5, np.float32),
        "audio": np.zeros((4, 256, 20), np.float32),
    }
    assert infer(sessions["generator"], "generator", batch).shape == (4, 3, 256, 256)


def _with_dim(src, dst, tensor: str, axis: int, value: int):
    model = onnx.load(str(src))
    for value_info in [*model.graph.input, *model.graph.output]:
        if value_info.name == tensor:
            value_info.type.tensor_type.shape.dim[axis].dim_value = value
    onnx.save(model, str(dst))
    return dst


def test_check_model_names_file_tensor_and_both_shapes(demo, tmp_path):
    bad = _with_dim(demo["generator"], tmp_path / "dinet.onnx", "audio", 2, 40)
    with pytest.raises(ModelError) as err:
        check_model(bad, "generator")
    text = str(err.value)
    assert text.startswith(str(bad)) and "input 'audio'" in text
    assert "expected [N,256,20] float32, got [N,256,40] float32" in text


def test_check_model_refuses_the_wrong_role(demo):
    with pytest.raises(ModelError) as err:
        check_model(demo["detector"], "generator")
    text = str(err.value)
    assert str(demo["detector"]) in text and "input 'masked'" in text and "missing" in text
    assert "unexpected input 'image'" in text


@pytest.mark.parametrize("content", [b"", b"this is a text file, not a model\n", bytes(range(256)) * 8])
def test_check_model_refuses_files_that_are_not_onnx(tmp_path, content):
    path = tmp_path / "generator.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=r"generator\.onnx: not an ONNX model"):
        check_model(path, "generator")


def test_check_model_missing_file_and_unknown_role(tmp_path, demo):
    with pytest.raises(ModelError, match=r"nope\.onnx: no such file"):
        check_model(tmp_path / "nope.onnx", "generator")
    with pytest.raises(ValueError, match="unknown model role"):
        check_model(demo["generator"], "vocoder")
    assert ModelError is ProvidersModelError
