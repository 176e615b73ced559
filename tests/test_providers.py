"""Verified sessions against the real onnxruntime-gpu wheel on a machine without CUDA.

Asking for CUDA here really falls back to CPU, exactly as on the incident's servers with broken
CUDA libraries: no mock is needed, and none is used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from heygem.cudalibs import cuda_libraries, elf_needed
from heygem.providers import (
    CPU,
    CUDA,
    ModelError,
    ProviderFallback,
    open_session,
    package_flavour,
    probe_model,
    required_versions,
)
from tests.conftest import ROOT
from tests.onnx_models import conv_model

GEN = conv_model({"crop": (1, 6, 32, 32), "reference": (1, 3, 32, 32)})


def test_cuda_request_falls_back_and_says_why():
    session, check = open_session(GEN, 0, fallback="warn")
    assert check.fallback is True
    assert check.requested == (CUDA, CPU)
    assert check.active == (CPU,) == tuple(session.get_providers())
    assert ".so" in check.reason
    assert check.missing_libraries and all(lib in check.reason for lib in check.missing_libraries)
    assert required_versions(check.reason)["cuda"]  # ORT names the CUDA version it was built for
    out = session.run(None, {"crop": np.ones((1, 6, 32, 32), np.float32), "reference": np.ones((1, 3, 32, 32), np.float32)})
    assert out[0].shape == (1, 3, 32, 32)
    data = json.loads(json.dumps(check.to_dict()))
    assert data["active"] == [CPU] and data["fallback"] is True and data["device"] == 0


def test_fail_policy_raises_naming_device_and_library():
    with pytest.raises(ProviderFallback) as err:
        open_session(probe_model(), 3)
    check = err.value.check
    assert check.device == 3 and check.fallback
    assert "GPU 3" in str(err.value)
    assert check.missing_libraries[0] in str(err.value)


def test_cpu_device_is_no_fallback():
    session, check = open_session(probe_model(), "cpu", threads=1)
    assert check.requested == check.active == (CPU,)
    assert not check.fallback and check.reason is None and check.missing_libraries == ()
    assert session.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("device", [-1, True, "gpu0", 1.0])
def test_bad_device_is_refused(device):
    with pytest.raises(ValueError, match="device"):
        open_session(probe_model(), device)


def test_not_onnx_names_the_file(tmp_path):
    bogus = tmp_path / "generator.onnx"
    bogus.write_text("this is a README, not a model\n")
    with pytest.raises(ModelError, match=rf"^{bogus}: not an ONNX model"):
        open_session(bogus, "cpu")
    with pytest.raises(ModelError, match=rf"^{tmp_path / 'absent.onnx'}: no such file"):
        open_session(tmp_path / "absent.onnx", 0)


def test_model_file_path_works(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(GEN)
    _, check = open_session(path, 0, fallback="warn")
    assert check.fallback and check.active == (CPU,)


def test_stderr_fd_is_restored(capfd):
    open_session(probe_model(), 0, fallback="warn")
    os.write(2, b"after-capture-marker\n")
    print("python-stderr-marker", file=sys.stderr)
    err = capfd.readouterr().err
    assert "after-capture-marker" in err and "python-stderr-marker" in err
    assert "cannot open shared object file" not in err  # the fallback log went into the check


def test_concurrent_sessions_keep_their_own_log():
    """fd 2 is process-wide: each thread's reason must hold its own device's lines only."""
    checks = {}

    def build(device):
        checks[device] = open_session(probe_model(), device, fallback="warn")[1]

    threads = [threading.Thread(target=build, args=(d,)) for d in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(checks) == {1, 2}
    for device, check in checks.items():
        other = 3 - device
        assert f"device_id={device}" in check.reason and f"device_id={other}" not in check.reason


def test_package_flavour_sees_the_gpu_wheel():
    info = package_flavour()
    assert info["flavour"] == "onnxruntime-gpu" and info["version"]
    assert info["conflict"] is False


def test_package_flavour_detects_two_flavours(tmp_path):
    """A second distribution's metadata on sys.path is what pip leaves after `pip install onnxruntime`."""
    dist = tmp_path / "onnxruntime-1.20.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime\nVersion: 1.20.0\n")
    code = "import json; from heygem.providers import package_flavour; print(json.dumps(package_flavour()))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=True)
    info = json.loads(out.stdout)
    assert info["conflict"] is True
    assert {d["name"] for d in info["installed"]} == {"onnxruntime", "onnxruntime-gpu"}


def _compile(tmp_path, name, source, *flags):
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    out = tmp_path / name
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src), *flags], check=True, timeout=60)
    return out


def test_elf_needed_reads_dynamic_section(tmp_path):
    lib = _compile(tmp_path, "libprobe.so", "#include <math.h>\ndouble f(double x) { return cos(x); }\n", "-lm")
    assert "libm.so.6" in elf_needed(lib)
    with pytest.raises(ValueError, match="not an ELF"):
        elf_needed(tmp_path / "libprobe.so.c")


def test_cuda_libraries_lists_the_missing():
    libs = {lib["name"]: lib for lib in cuda_libraries()}
    assert libs["libcublasLt.so.13"]["found"] is False
    assert "cannot open shared object file" in libs["libcublasLt.so.13"]["error"]
    assert libs["libc.so.6"]["found"] is True and libs["libc.so.6"]["path"]
    assert "libcudnn.so.9" in libs


def test_cuda_libraries_follows_ld_library_path(tmp_path):
    """A library placed on LD_LIBRARY_PATH is found there, as the provider's dlopen would."""
    _compile(tmp_path, "libcublasLt.so.13", "int cublasLtGetVersion(void) { return 1; }\n")
    code = "import json; from heygem.cudalibs import cuda_libraries; print(json.dumps(cuda_libraries()))"
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=True)
    libs = {lib["name"]: lib for lib in json.loads(out.stdout)}
    assert libs["libcublasLt.so.13"]["found"] is True
    assert libs["libcublasLt.so.13"]["path"] == str(tmp_path / "libcublasLt.so.13")
    assert libs["libcublas.so.13"]["found"] is False
