"""`heygem-ops gpu` and watchdog.gpu against the real pynvml bindings and a fake libnvidia-ml.so.1.

The fake library (tests/fakenvml) is compiled here and found through LD_LIBRARY_PATH of a
subprocess, so dlopen, symbol lookup, ctypes structs and error codes are the real path.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakenvml import FakeGpu, build_library, fake_env, write_values
from watchdog.gpu import GpuSample, idle_busy

HOST_PID_NS = os.stat("/proc/self/ns/pid").st_ino == 0xEFFFFFFC
GONE_PID = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # above pid_max: never a live process
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory):
    return build_library(tmp_path_factory.mktemp("fakenvml"))


@pytest.fixture
def sleeper():
    """A process of ours that 'holds GPU memory', so user and command line can be looked up."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def incident(pid: int) -> list[FakeGpu]:
    """The runbook's picture: 8 GPUs at 0 % holding 40-50 GB each."""
    return [
        FakeGpu(
            uuid=f"GPU-{i:08x}-1111-2222-3333-444455556666", util_pct=0, mem_used_mib=40960 + 1280 * i,
            temperature_c=30 + i, power_w=60 + i, compute=[(pid, 40000 + 100 * i)], graphics=[(GONE_PID, 512)] if i == 0 else [],
        )
        for i in range(8)
    ]


def serve(tmp_path: Path, lib_dir: Path, gpus: list[FakeGpu], **kwargs) -> dict[str, str]:
    values = tmp_path / "nvml.txt"
    write_values(values, gpus, **kwargs)
    return fake_env(lib_dir, values)


def test_json_shows_exactly_the_values_served(cli, lib_dir, tmp_path, sleeper):
    served = incident(sleeper.pid)
    result = cli("gpu", "--json", env=serve(tmp_path, lib_dir, served))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["driver_version"] == "550.54.15"
    assert data["cuda_driver_version"] == "12.4"
    assert [g["index"] for g in data["gpus"]] == list(range(8))
    for g, want in zip(data["gpus"], served):
        assert (g["name"], g["uuid"]) == (want.name, want.uuid)
        assert g["util_pct"] == 0.0
        assert g["mem_used_mib"] == want.mem_used_mib and g["mem_total_mib"] == 81920.0
        assert g["temperature_c"] == want.temperature_c and g["power_w"] == want.power_w
        ours = g["processes"][0]
        assert (ours["pid"], ours["used_mib"]) == (sleeper.pid, want.compute[0][1])
        if HOST_PID_NS:
            assert ours["status"] == "running"
            assert ours["user"] == pwd.getpwuid(os.getuid()).pw_name
            assert "time.sleep(120)" in ours["cmdline"]
        else:
            assert ours["status"] == "other pid namespace"
    gone = data["gpus"][0]["processes"][1]
    assert gone == {"pid": GONE_PID, "used_mib": 512.0, "user": None, "cmdline": None,
                    "status": "gone" if HOST_PID_NS else "other pid namespace"}
    assert all(len(g["processes"]) == 1 for g in data["gpus"][1:])


def test_table_marks_idle_gpus_holding_memory(cli, lib_dir, tmp_path, sleeper):
    gpus = incident(sleeper.pid)
    gpus[7].util_pct = 95
    result = cli("gpu", env={**serve(tmp_path, lib_dir, gpus), "COLUMNS": "220"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("idle, memory held") == 7
    assert "busy" in result.stdout
    assert "GPU 0, 1, 2, 3, 4, 5, 6: memory held" in result.stdout
    assert str(GONE_PID) in result.stdout and "40700 MiB" in result.stdout


def samples(util: float) -> list[GpuSample]:
    return [GpuSample(i, "A100", f"GPU-{i}", util, 40960.0 + 1280 * i, 81920.0, 30.0, 60.0, ()) for i in range(8)]


def test_idle_busy_is_the_incident_signature():
    assert [g.index for g in idle_busy(samples(0.0), util_max_pct=5, mem_min_mib=1024)] == list(range(8))
    assert idle_busy(samples(90.0), util_max_pct=5, mem_min_mib=1024) == []
    assert idle_busy(samples(0.0), util_max_pct=5, mem_min_mib=60000) == []
    assert idle_busy(samples(None), util_max_pct=5, mem_min_mib=1024) == []  # unknown utilisation: no evidence


def test_without_nvml_a_clear_message_and_exit_1(cli, tmp_path):
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        pass
    else:
        pytest.skip("a real libnvidia-ml.so.1 is installed here; an empty LD_LIBRARY_PATH cannot hide it")
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["gpu"], ["gpu", "--json"]):
        result = cli(*args, env={"LD_LIBRARY_PATH": str(empty)})
        assert result.returncode == 1
        assert "no NVIDIA driver found: libnvidia-ml.so.1 cannot be loaded" in result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_library_without_driver_is_reported(cli, lib_dir, tmp_path):
    result = cli("gpu", "--json", env=fake_env(lib_dir, tmp_path / "absent.txt"))  # fake: DRIVER_NOT_LOADED
    assert result.returncode == 1
    assert "no NVIDIA driver loaded" in result.stderr and "Traceback" not in result.stderr


def test_unsupported_fields_are_null_not_a_crash(cli, lib_dir, tmp_path):
    gpu = FakeGpu(util_pct=None, temperature_c=None, power_w=None, mem_used_mib=2048, compute=[(GONE_PID, None)])
    env = serve(tmp_path, lib_dir, [gpu], cuda=None)
    result = cli("gpu", "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cuda_driver_version"] is None
    g = data["gpus"][0]
    assert (g["util_pct"], g["temperature_c"], g["power_w"]) == (None, None, None)
    assert g["mem_used_mib"] == 2048.0
    assert g["processes"][0]["used_mib"] is None
    table = cli("gpu", env={**env, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "n/a" in table.stdout and "Traceback" not in table.stderr


def test_watch_redraws_until_ctrl_c(lib_dir, tmp_path, sleeper):
    out = tmp_path / "watch.out"
    terminal = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "220", "LINES": "100"}  # redraw in place
    env = {**os.environ, **serve(tmp_path, lib_dir, incident(sleeper.pid)), **terminal}
    # A child inherits an ignored SIGINT (pytest started in the background); give it Python's default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with out.open("w") as stdout:
            proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "gpu", "--watch", "0.2"], cwd=ROOT, env=env,
                                    stdout=stdout, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 30
        while out.read_text().count("driver 550.54.15") < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert out.read_text().count("driver 550.54.15") >= 2, "no second frame drawn"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "GPU-00000007-1111-2222-3333-444455556666" in out.read_text()


SAMPLE_TWICE = """
import json, sys
from pathlib import Path
from watchdog.gpu import Nvml, to_dict
with Nvml() as nvml:
    first = nvml.sample()
    Path(sys.argv[1]).write_text(sys.argv[2])
    second = nvml.sample()
print(json.dumps([to_dict(first), to_dict(second)]))
"""


def test_second_sample_sees_new_values(lib_dir, tmp_path, sleeper):
    env = {**os.environ, **serve(tmp_path, lib_dir, incident(sleeper.pid))}
    busy = incident(sleeper.pid)
    for g in busy:
        g.util_pct, g.mem_used_mib = 90, 70000
    later = tmp_path / "later.txt"
    write_values(later, busy[:2])
    result = subprocess.run([sys.executable, "-c", SAMPLE_TWICE, env["FAKE_NVML_FILE"], later.read_text()],
                            capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert [g["util_pct"] for g in first["gpus"]] == [0.0] * 8
    assert [(g["util_pct"], g["mem_used_mib"]) for g in second["gpus"]] == [(90.0, 70000.0)] * 2


def test_command_module_imports_nothing_heavy():
    code = "import sys, ops.gpu; print(sorted(m for m in ('rich', 'psutil', 'pynvml', 'pydantic') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stderr
