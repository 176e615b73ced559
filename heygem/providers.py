"""Build ONNX Runtime sessions that are verified to run where they were asked to run.

`onnxruntime.get_available_providers()` lists CUDAExecutionProvider whenever the GPU wheel is
installed, even when the CUDA libraries cannot load; ONNX Runtime then logs a warning from C++
straight to file descriptor 2 and quietly builds a CPU-only session. The upstream service ran
for hours like that, at 0 % GPU, with its queues filling up. Every session of the pipeline is
built through `open_session`, which captures that log, reads `session.get_providers()` and turns
a silent fallback into an error (or a reported warning, by policy).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

if TYPE_CHECKING:  # the daemon imports this module's types without paying for onnxruntime
    import onnxruntime

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
FALLBACK_POLICIES = ("fail", "warn")

# Distributions that install the `onnxruntime` import package; two at once overwrite each
# other's files and the import breaks or silently becomes the CPU build.
FLAVOURS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-rocm",
    "onnxruntime-migraphx",
    "onnxruntime-qnn",
    "onnxruntime-silicon",
    "onnxruntime-training",
)

# Errors ONNX Runtime raises for the model itself rather than for a device.
_MODEL_ERRORS = {
    "InvalidProtobuf": "not an ONNX model",
    "NoSuchFile": "no such file",
    "NoModel": "no model in it",
    "InvalidGraph": "invalid ONNX graph",
    "NotImplemented": "uses something this ONNX Runtime does not implement",
    "ModelRequiresCompilation": "needs compiling for this execution provider",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ ")
_MISSING = re.compile(r"([\w.+-]+\.so[\w.]*): cannot open shared object file")
_REQUIRES = re.compile(r"Require cuDNN (\S+?) and CUDA (\S+?)\.(?:\s|$)")
_capture_lock = threading.Lock()


class ModelError(ValueError):
    """The model file itself cannot be used; the message starts with the file's name."""


@dataclass(frozen=True)
class SessionCheck:
    """What a session was asked to run on against what it really runs on."""

    device: Union[int, str]
    requested: tuple[str, ...]
    active: tuple[str, ...]
    fallback: bool
    reason: Optional[str]
    missing_libraries: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


class ProviderFallback(RuntimeError):
    """CUDA was asked for and the session would run on something else."""

    def __init__(self, check: SessionCheck):
        self.check = check
        why = check.reason or "ONNX Runtime gave no reason"
        if check.missing_libraries:
            why = f"cannot load {', '.join(check.missing_libraries)}; {why}"
        super().__init__(
            f"GPU {check.device}: asked for {list(check.requested)}, session runs on {list(check.active)}: {why}"
        )


def providers_for(device: Union[int, str]) -> list:
    """The provider list for a GPU index (CUDA on that device, then CPU) or "cpu"."""
    if device == "cpu":
        return [CPU]
    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise ValueError(f'device must be a GPU index >= 0 or "cpu", got {device!r}')
    return [(CUDA, {"device_id": device}), CPU]


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Redirect file descriptor 2 to a temp file; the yielded list receives the text on exit.

    ONNX Runtime's logger writes from C++ to fd 2, below Python's sys.stderr, so swapping
    sys.stderr would see nothing. fd 2 is process-wide: the lock keeps two threads from stacking
    redirections (session builds in one process are serialised; replicas are processes), and
    whatever another thread writes to fd 2 meanwhile lands here too.
    """
    text: list[str] = []
    with _capture_lock, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode("utf-8", errors="replace"))


def _log_lines(raw: str) -> str:
    """ORT's log without colour codes and timestamps: its own words, one message a line."""
    lines = (_TIMESTAMP.sub("", _ANSI.sub("", line)).strip() for line in raw.splitlines())
    return "\n".join(line for line in lines if line)


def missing_libraries(text: Optional[str]) -> tuple[str, ...]:
    """Library names from the loader's "X: cannot open shared object file" messages."""
    return tuple(dict.fromkeys(_MISSING.findall(text or "")))


def required_versions(text: Optional[str]) -> dict[str, str]:
    """{"cuda": "13.*", "cudnn": "9.*"} from ORT's "Require cuDNN 9.* and CUDA 13.*" line."""
    match = _REQUIRES.search(text or "")
    return {"cuda": match.group(2), "cudnn": match.group(1)} if match else {}


def _model_name(model: Union[str, Path, bytes]) -> str:
    return "<in-memory model>" if isinstance(model, bytes) else str(model)


def open_session(
    model: Union[str, Path, bytes],
    device: Union[int, str],
    fallback: str = "fail",
    threads: Optional[int] = None,
    spinning: bool = True,
) -> tuple["onnxruntime.InferenceSession", SessionCheck]:
    """Build a session on GPU `device` (CUDA, then CPU) or on "cpu", and verify it.

    fallback="fail" raises ProviderFallback when CUDA was asked for and is not active;
    "warn" returns the session with check.fallback=True for the caller to report. ORT's log
    lines are kept in check.reason on a fallback; otherwise they go on to the real stderr, so
    capturing never hides anything. A file that is no model raises ModelError naming it.
    `threads` caps the intra-op pool; `spinning=False` stops idle pool threads from busy-waiting,
    which matters when several processes share the cores (a pipeline's stages).
    """
    import onnxruntime as ort

    if fallback not in FALLBACK_POLICIES:
        raise ValueError(f"fallback must be one of {FALLBACK_POLICIES}, got {fallback!r}")
    providers = providers_for(device)
    name = _model_name(model)
    if not isinstance(model, bytes):
        model = str(model)
        if not os.path.isfile(model):
            raise ModelError(f"{name}: no such file" if not os.path.exists(model) else f"{name}: not a file")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    captured: list[str] = []
    try:
        with captured_stderr() as captured:
            session = ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as err:
        model_error = _MODEL_ERRORS.get(type(err).__name__)
        if model_error is None and type(err).__name__ == "Fail" and "model" in str(err).lower():
            model_error = "ONNX Runtime cannot load it"
        if model_error is None:
            sys.stderr.write("".join(captured))
            raise
        raise ModelError(f"{name}: {model_error}: {err}") from None
    log = _log_lines(captured[0])
    requested = tuple(p[0] if isinstance(p, tuple) else p for p in providers)
    active = tuple(session.get_providers())
    fell_back = CUDA in requested and CUDA not in active
    if log and not fell_back:
        sys.stderr.write(captured[0])
    check = SessionCheck(
        device=device,
        requested=requested,
        active=active,
        fallback=fell_back,
        reason=(log or None) if fell_back else None,
        missing_libraries=missing_libraries(log) if fell_back else (),
    )
    if fell_back and fallback == "fail":
        raise ProviderFallback(check)
    return session, check


def _built_flavour() -> Optional[str]:
    """The distribution whose files are on disk now: the last one installed wins the overwrite."""
    spec = importlib.util.find_spec("onnxruntime")
    for root in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(root) / "capi" / "build_and_package_info.py").read_text(encoding="utf-8")
        except OSError:
            continue
        match = re.search(r"^package_name = ['\"]([^'\"]+)", text, re.M)
        if match:
            return match.group(1)
    return None


def package_flavour() -> dict:
    """Installed ONNX Runtime distributions, read from package metadata without importing it.

    Returns {"installed": [{"name", "version"}], "flavour", "version", "conflict"}: flavour is
    the build whose files are on disk (None when none is installed).
    """
    installed = []
    for name in FLAVOURS:
        try:
            installed.append({"name": name, "version": metadata.version(name)})
        except metadata.PackageNotFoundError:
            continue
    flavour = _built_flavour() or (installed[0]["name"] if installed else None)
    version = next((d["version"] for d in installed if d["name"] == flavour), None)
    return {"installed": installed, "flavour": flavour, "version": version, "conflict": len(installed) > 1}


def probe_model() -> bytes:
    """A tiny real model (one 3x3 Conv on a 1x3x32x32 input), built in memory for doctor.

    A Conv rather than an Identity: the CUDA provider claims it, so the check exercises cuDNN.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((3, 3, 3, 3), 1 / 27, dtype=np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "weight"], ["output"], pads=[1, 1, 1, 1])],
        "heygem-probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 32, 32])],
        [weight],
    )
    # IR 8 / opset 17: loadable by every onnxruntime since 1.13, whatever the onnx package's default.
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
