"""The three ONNX models of the pipeline: their contracts, a checker, and tiny demo builds.

`SPECS` is the contract a model must meet to plug in through config (`[pipeline.models]`):
input/output names, ranks and fixed dims, batch first and dynamic. Real models (a WeNet-style
audio encoder, DINet, a face detector) are exported to these names and shapes; `check_model`
says exactly what differs before a replica loads anything.

    audio_encoder  mel [N,80,80]      log-mel windows, 80 bins x 80 frames of 10 ms (800 ms)
                   -> features [N,256,20]   256 dims x 20 steps of 40 ms, one window per video frame
    generator      masked [N,3,256,256]    the face crop with the mouth region zeroed (MASK_REGION)
                   reference [N,3,256,256] an unmasked crop of the same face
                   audio [N,256,20]        the frame's feature window
                   -> crop [N,3,256,256]   the crop with a mouth that says the audio
    detector       image [1,3,H,W]         the frame resized to H x W (160 x 160 for the demo)
                   -> box [1,4]            normalised x0, y0, x1, y1; all zero when no face

Images are BGR float32 in [0, 1] (see heygem.face.to_nchw). `build_demo_models` writes small
models with hand-set weights and real Conv/Gemm/Resize kernels, so the demo and tests run the
whole chain through ONNX Runtime without downloading anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from heygem.providers import ModelError

ROLES = ("audio_encoder", "generator", "detector")
CROP = 256
N_MELS, MEL_WINDOW = 80, 80
FEATURE_DIM, FEATURE_STEPS = 256, 20
DETECTOR_SIZE = 160
# Rows y0..y1 and columns x0..x1 (shares of the crop side) that `face.mask` zeroes: the lower
# face, as DINet masks its source image.
MASK_REGION = (0.5, 0.94, 0.16, 0.84)

DEMO_VERSION = "1"  # bump whenever a demo weight or graph changes: old files are then rebuilt
_VERSION_KEY = "heygem_demo_version"
# IR 8 / opset 17 load in every onnxruntime since 1.13, whatever the onnx package's default.
IR_VERSION, OPSET = 8, 17


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: None in `dims` means any size (the batch, or a detector's H, W)."""

    name: str
    dims: tuple[Optional[int], ...]

    def describe(self) -> str:
        return _dims_text(self.dims) + " float32"


@dataclass(frozen=True)
class ModelSpec:
    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


SPECS: dict[str, ModelSpec] = {
    "audio_encoder": ModelSpec(
        "audio_encoder",
        (TensorSpec("mel", (None, N_MELS, MEL_WINDOW)),),
        (TensorSpec("features", (None, FEATURE_DIM, FEATURE_STEPS)),),
    ),
    "generator": ModelSpec(
        "generator",
        (
            TensorSpec("masked", (None, 3, CROP, CROP)),
            TensorSpec("reference", (None, 3, CROP, CROP)),
            TensorSpec("audio", (None, FEATURE_DIM, FEATURE_STEPS)),
        ),
        (TensorSpec("crop", (None, 3, CROP, CROP)),),
    ),
    "detector": ModelSpec(
        "detector",
        (TensorSpec("image", (1, 3, None, None)),),
        (TensorSpec("box", (1, 4)),),
    ),
}


def _dims_text(dims) -> str:
    return "[" + ",".join("N" if d is None and i == 0 else "?" if d is None else str(d) for i, d in enumerate(dims)) + "]"


def check_model(path: Union[str, Path], role: str) -> ModelSpec:
    """Compare the model file's graph with SPECS[role]; every difference goes into one
    ModelError that starts with the file's name. Returns the spec when the model fits.

    Symbolic dims in the model (an export with dynamic axes) accept any size; a fixed dim must
    equal the spec's. Extra outputs are fine; an extra input would never be fed and is not.
    """
    import onnx

    spec = SPECS.get(role)
    if spec is None:
        raise ValueError(f"unknown model role {role!r}; one of {', '.join(ROLES)}")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError, RuntimeWarning wrappers, ...
        raise ModelError(f"{path}: not an ONNX model ({type(err).__name__}: {err})") from None
    if model.ir_version == 0 or not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model (no graph in it)")
    initializers = {t.name for t in model.graph.initializer}
    got_inputs = {v.name: v for v in model.graph.input if v.name not in initializers}
    got_outputs = {v.name: v for v in model.graph.output}
    problems = []
    for kind, expected, got in (("input", spec.inputs, got_inputs), ("output", spec.outputs, got_outputs)):
        for want in expected:
            value = got.get(want.name)
            if value is None:
                problems.append(f"{kind} '{want.name}' {want.describe()} is missing (the model has {', '.join(got) or 'none'})")
                continue
            mismatch = _mismatch(want, value)
            if mismatch:
                problems.append(f"{kind} '{want.name}': expected {want.describe()}, got {mismatch}")
    wanted = {t.name for t in spec.inputs}
    problems += [f"unexpected input '{name}' (the pipeline feeds only {', '.join(sorted(wanted))})" for name in got_inputs if name not in wanted]
    if problems:
        raise ModelError(f"{path}: not a {role} model: " + "; ".join(problems))
    return spec


def _mismatch(want: TensorSpec, value) -> Optional[str]:
    """None when `value` (an onnx ValueInfoProto) fits `want`, else how it looks."""
    import onnx

    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim] if tensor.HasField("shape") else None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown type"
    fits = dtype == "float32"
    if dims is not None:
        fits = fits and len(dims) == len(want.dims) and all(w is None or g is None or w == g for w, g in zip(want.dims, dims))
    return None if fits else f"{_dims_text(dims) if dims is not None else '[unknown shape]'} {dtype}"


def infer(model: Union[object, Callable], role: str, inputs: dict) -> np.ndarray:
    """Run one call of a `role` model and return its (first) spec output.

    `model` is an ONNX Runtime session, or any callable taking the input dict and returning the
    output array; inputs are passed as contiguous float32.
    """
    feeds = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in inputs.items()}
    if hasattr(model, "run"):
        return model.run([SPECS[role].outputs[0].name], feeds)[0]
    return np.asarray(model(feeds))


def build_demo_models(directory: Union[str, Path]) -> dict[str, Path]:
    """Write the demo models into `directory` (created if needed) and return role -> path.

    Deterministic, and idempotent: a file that already carries this DEMO_VERSION is kept.
    Files are written under a temp name and renamed, so replicas building at once never load a
    half-written model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    builders = {"audio_encoder": _audio_encoder, "generator": _generator, "detector": _detector}
    paths = {}
    for role in ROLES:
        path = directory / f"demo_{role}.onnx"
        if _demo_version(path) != DEMO_VERSION:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(_finish(builders[role](), role))
            os.replace(tmp, path)
        paths[role] = path
    return paths


def _demo_version(path: Path) -> Optional[str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    return next((p.value for p in model.metadata_props if p.key == _VERSION_KEY), None)


def _finish(graph, role: str) -> bytes:
    from onnx import checker, helper

    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="heygem-ops")
    helper.set_model_props(model, {_VERSION_KEY: DEMO_VERSION, "role": role})
    checker.check_model(model)
    return model.SerializeToString()


def _io(spec: TensorSpec):
    """A graph input/output for `spec`; the dynamic batch dim is named N."""
    from onnx import TensorProto, helper

    dims = ["N" if d is None else d for d in spec.dims]
    return helper.make_tensor_value_info(spec.name, TensorProto.FLOAT, dims)


def _const(name: str, value):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(value), name)


# The demo audio encoder: log-mel windows -> one Conv1d (k=3) -> Tanh -> AveragePool(4).
# Channels 0..31 measure loudness (the mean log-mel, centred on LOUD_AT and scaled by LOUD_SCALE),
# the rest respond to spectral shape (seeded zero-sum filters, blind to overall level).
ENERGY_CHANNELS = 32
LOUD_AT, LOUD_SCALE = 13.0, 2.5


def _audio_encoder():
    from onnx import helper

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((FEATURE_DIM, N_MELS, 3)).astype(np.float32)
    weight -= weight.mean(axis=(1, 2), keepdims=True)
    weight *= 0.25 / np.sqrt(N_MELS * 3)
    bias = np.zeros(FEATURE_DIM, np.float32)
    weight[:ENERGY_CHANNELS] = 1.0 / (N_MELS * 3 * LOUD_SCALE)
    bias[:ENERGY_CHANNELS] = -LOUD_AT / LOUD_SCALE
    spec = SPECS["audio_encoder"]
    nodes = [
        helper.make_node("Conv", ["mel", "w", "b"], ["conv"], pads=[1, 1]),
        helper.make_node("Tanh", ["conv"], ["act"]),
        helper.make_node("AveragePool", ["act"], ["features"], kernel_shape=[MEL_WINDOW // FEATURE_STEPS], strides=[MEL_WINDOW // FEATURE_STEPS]),
    ]
    return helper.make_graph(nodes, "demo_audio_encoder", [_io(t) for t in spec.inputs], [_io(t) for t in spec.outputs], [_const("w", weight), _const("b", bias)])


# The demo generator. Mouth: where it sits in a crop cut by heygem.face.crop around a detected
# face (centre x, y and half-width, greatest half-opening, as shares of the side), the colour of
# its inside (BGR), and how sharply a cell of the GRID x GRID mouth map opens with loudness.
MOUTH = (0.5, 0.635, 0.11, 0.07)
MOUTH_COLOUR = (0.12, 0.10, 0.32)
GRID = 64
OPEN_GAIN = 14.0
OPEN_FROM = 0.1
FADE_PX = 6.0


def _generator():
    """masked + reference -> rebuilt crop (mouth region from the reference, feathered in by a
    1x1 Conv); audio -> loudness (Gemm over the centre steps of the energy channels) -> a GRID x GRID
    map whose cells open in an ellipse as loudness rises (Gemm, Sigmoid, 3x3 Conv blur) ->
    Resize to 256x256 -> the mouth's inside blended over the rebuilt crop."""
    from onnx import helper

    y0, y1, x0, x1 = (int(round(v * CROP)) for v in MASK_REGION)
    # 1 on the masked region, fading to 0 over FADE_PX around it: the reference's lower face
    # blends into the masked crop's upper face instead of meeting it at a hard edge.
    yy, xx = np.mgrid[0:CROP, 0:CROP] + 0.5
    dy = np.maximum(np.maximum(y0 - yy, yy - y1), 0.0)
    dx = np.maximum(np.maximum(x0 - xx, xx - x1), 0.0)
    soft = np.clip(1.0 - np.hypot(dx, dy) / FADE_PX, 0.0, 1.0)[None, None]

    steps = np.arange(FEATURE_STEPS) - (FEATURE_STEPS - 1) / 2
    tri = np.clip(1.0 - np.abs(steps) / 3.0, 0.0, None)  # the frame's own +-120 ms
    loud = np.zeros((FEATURE_DIM, FEATURE_STEPS), np.float32)
    loud[:ENERGY_CHANNELS] = tri / (tri.sum() * ENERGY_CHANNELS)

    cx, cy, rx, ry = MOUTH
    centres = (np.arange(GRID) + 0.5) / GRID
    dx = (centres[None, :] - cx) / rx
    dy = (centres[:, None] - cy) / ry
    inside = np.clip(1.0 - dx**2, 1e-3, None)
    threshold = np.where(dx**2 < 1.0, OPEN_FROM + (1 - OPEN_FROM) * dy**2 / inside, 4.0).astype(np.float32)
    blur = (np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16)[None, None]
    blend = np.zeros((3, 6, 1, 1), np.float32)
    for c in range(3):
        blend[c, c] = blend[c, 3 + c] = 1.0
    inits = [
        _const("soft", soft.astype(np.float32)),
        _const("keep", (1.0 - soft).astype(np.float32)),
        _const("blend", blend),
        _const("flat", np.array([-1, FEATURE_DIM * FEATURE_STEPS], np.int64)),
        _const("loud_w", loud.reshape(-1, 1)),
        _const("loud_b", np.zeros(1, np.float32)),
        _const("open_w", np.full((1, GRID * GRID), OPEN_GAIN, np.float32)),
        _const("open_b", (-OPEN_GAIN * threshold).reshape(-1)),
        _const("grid", np.array([-1, 1, GRID, GRID], np.int64)),
        _const("blur", blur),
        _const("scales", np.array([1, 1, CROP // GRID, CROP // GRID], np.float32)),
        _const("one", np.ones(1, np.float32)),
        _const("colour", np.array(MOUTH_COLOUR, np.float32).reshape(1, 3, 1, 1)),
    ]
    nodes = [
        helper.make_node("Mul", ["masked", "keep"], ["upper"]),
        helper.make_node("Mul", ["reference", "soft"], ["lower"]),
        helper.make_node("Concat", ["upper", "lower"], ["both"], axis=1),
        helper.make_node("Conv", ["both", "blend"], ["rebuilt"]),
        helper.make_node("Reshape", ["audio", "flat"], ["audio_flat"]),
        helper.make_node("Gemm", ["audio_flat", "loud_w", "loud_b"], ["loudness"]),
        helper.make_node("Gemm", ["loudness", "open_w", "open_b"], ["open_logit"]),
        helper.make_node("Sigmoid", ["open_logit"], ["open_cells"]),
        helper.make_node("Reshape", ["open_cells", "grid"], ["open_grid"]),
        helper.make_node("Conv", ["open_grid", "blur"], ["open_smooth"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["open_smooth", "", "scales"], ["open_map"], mode="linear"),
        helper.make_node("Sub", ["one", "open_map"], ["closed_map"]),
        helper.make_node("Mul", ["rebuilt", "closed_map"], ["face_part"]),
        helper.make_node("Mul", ["open_map", "colour"], ["mouth_part"]),
        helper.make_node("Add", ["face_part", "mouth_part"], ["crop"]),
    ]
    spec = SPECS["generator"]
    return helper.make_graph(nodes, "demo_generator", [_io(t) for t in spec.inputs], [_io(t) for t in spec.outputs], inits)


# The demo detector: a 1x1 Conv scores skin colour (red well above blue) per pixel; the box is
# the skin blob's mean +- 2 standard deviations per axis (exact for a filled ellipse), gated to
# zero when less than FACE_MIN_SHARE of the image is skin.
SKIN_RB = 0.2
SKIN_GAIN = 50.0
FACE_MIN_SHARE = 0.005
GATE_GAIN = 2000.0


def _detector():
    from onnx import helper

    n = DETECTOR_SIZE
    centres = ((np.arange(n) + 0.5) / n).astype(np.float32)
    xs = np.broadcast_to(centres[None, :], (n, n))[None, None]
    ys = np.broadcast_to(centres[:, None], (n, n))[None, None]
    skin_w = np.array([-SKIN_GAIN, 0.0, SKIN_GAIN], np.float32).reshape(1, 3, 1, 1)
    inits = [
        _const("skin_w", skin_w),
        _const("skin_b", np.array([-SKIN_GAIN * SKIN_RB], np.float32)),
        _const("xs", np.ascontiguousarray(xs)),
        _const("ys", np.ascontiguousarray(ys)),
        _const("axes", np.array([2, 3], np.int64)),
        _const("eps", np.array([1e-6], np.float32)),
        _const("two", np.array([2.0], np.float32)),
        _const("gate_gain", np.array([GATE_GAIN / (n * n)], np.float32)),
        _const("gate_bias", np.array([-GATE_GAIN * FACE_MIN_SHARE], np.float32)),
        _const("out_shape", np.array([1, 4], np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "skin_w", "skin_b"], ["skin_logit"]),
        helper.make_node("Sigmoid", ["skin_logit"], ["skin"]),
        helper.make_node("ReduceSum", ["skin", "axes"], ["mass_raw"]),
        helper.make_node("Add", ["mass_raw", "eps"], ["mass"]),
    ]
    for axis, grid in (("x", "xs"), ("y", "ys")):
        nodes += [
            helper.make_node("Mul", ["skin", grid], [f"w{axis}"]),
            helper.make_node("ReduceSum", [f"w{axis}", "axes"], [f"s{axis}"]),
            helper.make_node("Div", [f"s{axis}", "mass"], [f"c{axis}"]),
            helper.make_node("Mul", [f"w{axis}", grid], [f"w{axis}{axis}"]),
            helper.make_node("ReduceSum", [f"w{axis}{axis}", "axes"], [f"s{axis}{axis}"]),
            helper.make_node("Div", [f"s{axis}{axis}", "mass"], [f"m{axis}{axis}"]),
            helper.make_node("Mul", [f"c{axis}", f"c{axis}"], [f"c{axis}2"]),
            helper.make_node("Sub", [f"m{axis}{axis}", f"c{axis}2"], [f"v{axis}"]),
            helper.make_node("Relu", [f"v{axis}"], [f"v{axis}p"]),
            helper.make_node("Sqrt", [f"v{axis}p"], [f"sd{axis}"]),
            helper.make_node("Mul", [f"sd{axis}", "two"], [f"half{axis}"]),
            helper.make_node("Sub", [f"c{axis}", f"half{axis}"], [f"{axis}0"]),
            helper.make_node("Add", [f"c{axis}", f"half{axis}"], [f"{axis}1"]),
        ]
    nodes += [
        helper.make_node("Mul", ["mass_raw", "gate_gain"], ["gate_scaled"]),
        helper.make_node("Add", ["gate_scaled", "gate_bias"], ["gate_logit"]),
        helper.make_node("Sigmoid", ["gate_logit"], ["gate"]),
        helper.make_node("Concat", ["x0", "y0", "x1", "y1"], ["box_raw"], axis=3),
        helper.make_node("Mul", ["box_raw", "gate"], ["box_gated"]),
        helper.make_node("Reshape", ["box_gated", "out_shape"], ["box"]),
    ]
    image = TensorSpec("image", (1, 3, n, n))
    return helper.make_graph(nodes, "demo_detector", [_io(image)], [_io(SPECS["detector"].outputs[0])], inits)
