"""`heygem-ops doctor` end to end, in subprocesses: real sessions, real NVML bindings, real zombies.

Decision: a --model that is not an ONNX model is a usage error (exit 2, the file named on
stderr), like a bad config: the operator pointed doctor at the wrong file, no check ran on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.fakenvml import FakeGpu, build_library, fake_env, write_values
from tests.onnx_models import conv_model
from tests.procs_helpers import ZombieMaker

NAMES = ["onnxruntime_package", "cpu_fallback", "cuda_libraries", "environment", "nvml", "gpu_idle_busy", "zombies"]


@pytest.fixture
def doctor(cli, tmp_path):
    """Run `doctor --json` with a config file of `toml`; return (returncode, {name: check}, result)."""

    def run(*args, toml="", env=None):
        config = tmp_path / "config.toml"
        config.write_text(toml)
        result = cli("--config", str(config), "doctor", "--json", *args, env=env)
        assert result.returncode in (0, 1), result.stderr
        data = json.loads(result.stdout)
        assert data["ok"] == (result.returncode == 0)
        return result.returncode, {c["name"]: c for c in data["checks"]}, result

    return run


def test_cpu_fallback_fails_with_the_library_named(doctor):
    code, checks, _ = doctor(toml="[pipeline]\ndevices = [2, 5]\n")
    assert code == 1
    assert list(checks) == NAMES
    for c in checks.values():
        assert set(c) == {"name", "status", "summary", "evidence", "fix"} and c["status"] in ("ok", "warn", "fail")
    fb = checks["cpu_fallback"]
    assert fb["status"] == "fail"
    assert fb["evidence"]["device"] == 2  # the first configured GPU
    assert fb["evidence"]["requested"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert fb["evidence"]["active"] == ["CPUExecutionProvider"]
    lib = fb["evidence"]["missing_libraries"][0]
    assert lib.startswith("lib") and lib in fb["summary"]
    assert fb["evidence"]["requires"]["cuda"] and fb["evidence"]["requires"]["cudnn"]
    assert 'pip install "onnxruntime-gpu[cuda,cudnn]"' in fb["fix"]
    assert checks["onnxruntime_package"]["status"] == "ok"
    assert "CUDAExecutionProvider" in checks["onnxruntime_package"]["evidence"]["available_providers"]
    libs = checks["cuda_libraries"]
    assert libs["status"] == "fail" and lib in libs["evidence"]["missing"] and "libc.so.6" in libs["evidence"]["found"]


def test_model_and_device_options(doctor, tmp_path):
    model = tmp_path / "generator.onnx"
    model.write_bytes(conv_model({"crop": (1, 6, 16, 16), "reference": (1, 3, 16, 16)}))
    _, checks, _ = doctor("--model", str(model), "--device", "4")
    assert checks["cpu_fallback"]["evidence"]["model"] == str(model)
    assert checks["cpu_fallback"]["evidence"]["device"] == 4 and "GPU 4" in checks["cpu_fallback"]["summary"]


def test_non_onnx_model_is_a_usage_error(cli, tmp_path):
    bogus = tmp_path / "dinet.onnx"
    bogus.write_text("not a model\n")
    result = cli("doctor", "--model", str(bogus))
    assert result.returncode == 2
    assert f"{bogus}: not an ONNX model" in result.stderr and "Traceback" not in result.stderr
    assert cli("doctor", "--model", str(tmp_path / "absent.onnx")).returncode == 2


def test_human_output_has_table_and_fix(cli):
    result = cli("doctor", env={"COLUMNS": "250"})
    assert result.returncode == 1
    out = result.stdout
    assert "heygem-ops doctor" in out and "┃ check" in out
    row = next(line for line in out.splitlines() if line.startswith("│ cpu_fallback"))
    assert "fail" in row and "CPUExecutionProvider" in row
    assert 'fix: pip install "onnxruntime-gpu[cuda,cudnn]"' in out
    assert "2 fail" in out


@pytest.mark.parametrize(
    "env, toml, expected",
    [
        ({"CUDA_VISIBLE_DEVICES": ""}, "", "CUDA_VISIBLE_DEVICES='' hides every GPU"),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "[pipeline]\ndevices = [0, 1]\n", "config uses GPU 1"),
        ({"OMP_NUM_THREADS": "zero"}, "", "OMP_NUM_THREADS='zero' is not a positive thread count"),
    ],
)
def test_environment_warns(doctor, env, toml, expected):
    _, checks, _ = doctor(toml=toml, env=env)
    check = checks["environment"]
    assert check["status"] == "warn" and expected in check["summary"] and check["fix"]


def test_environment_explains_settings(doctor):
    _, checks, _ = doctor(env={"OMP_NUM_THREADS": "4", "ORT_LOGGING_LEVEL": "3"})
    check = checks["environment"]
    assert check["status"] == "ok" and "OMP_NUM_THREADS=4" in check["summary"]
    assert "caps OpenMP threads" in check["evidence"]["OMP_NUM_THREADS"]["meaning"]
    assert check["evidence"]["ORT_LOGGING_LEVEL"] == {"value": "3", "meaning": "read by ONNX Runtime"}


def test_no_driver_is_a_warning_not_a_traceback(doctor, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _, checks, result = doctor(env={"LD_LIBRARY_PATH": str(empty)})
    assert checks["nvml"]["status"] == "warn" and "no NVIDIA driver" in checks["nvml"]["summary"]
    assert checks["gpu_idle_busy"]["status"] == "warn"
    assert "Traceback" not in result.stderr


def test_eight_idle_gpus_holding_memory_fail(doctor, tmp_path):
    """The incident: 8 GPUs at 0 % with 40-50 GB used each, held by a live process."""
    lib_dir = build_library(tmp_path / "nvml")
    values = tmp_path / "values.txt"
    holder = os.getpid()
    gpus = [
        FakeGpu(uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000", util_pct=0, mem_used_mib=40960 + 1200 * i,
                compute=[(holder, 40000 + 1200 * i)])
        for i in range(8)
    ]
    write_values(values, gpus)
    _, checks, _ = doctor(env=fake_env(lib_dir, values))
    assert checks["nvml"]["status"] == "ok" and "8 GPU(s)" in checks["nvml"]["summary"]
    busy = checks["gpu_idle_busy"]
    assert busy["status"] == "fail" and busy["evidence"]["idle_busy"] == list(range(8))
    assert f"pid {holder}" in busy["summary"] and "8 GPU(s)" in busy["summary"]
    assert busy["evidence"]["gpus"][0]["processes"][0]["status"] == "running"

    _, checks, _ = doctor(toml="[rules]\ngpu_busy_mem_mib = 60000.0\n", env=fake_env(lib_dir, values))
    assert checks["gpu_idle_busy"]["status"] == "ok"  # thresholds come from the config


def test_zombies_are_grouped_by_parent(doctor):
    maker = ZombieMaker(3)
    try:
        _, checks, _ = doctor()
    finally:
        maker.stop()
    check = checks["zombies"]
    assert check["status"] == "warn"
    group = next(g for g in check["evidence"]["groups"] if g["ppid"] == maker.pid)
    assert sorted(z["pid"] for z in group["zombies"]) == sorted(maker.zombie_pids)
    assert f"3 under pid {maker.pid}" in check["summary"]


def test_two_flavours_fail_with_uninstall_fix(doctor, tmp_path):
    dist = tmp_path / "site" / "onnxruntime-1.20.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime\nVersion: 1.20.0\n")
    _, checks, _ = doctor(env={"PYTHONPATH": os.pathsep.join([str(dist.parent), str(ROOT)])})
    check = checks["onnxruntime_package"]
    assert check["status"] == "fail" and check["evidence"]["conflict"] is True
    assert check["fix"].startswith("pip uninstall -y onnxruntime onnxruntime-gpu")


def test_help_is_cheap_and_has_an_example(cli):
    result = cli("doctor", "--help")
    assert result.returncode == 0 and "heygem-ops doctor --json" in result.stdout
    code = "import sys, ops.doctor; assert not {'onnxruntime', 'onnx', 'pynvml'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)


# ---- doctor --log: upstream's failure lines after the fact ----------------------------------------

DH_LOG = ROOT / "tests" / "fixtures" / "dh.log"


def test_log_names_each_failure_with_its_line_and_fix(doctor):
    code, checks, _ = doctor("--log", str(DH_LOG))
    assert code == 1
    assert [(name, c["status"]) for name, c in checks.items()] == [
        ("log", "ok"), ("cpu_fallback", "fail"), ("gpu_oom", "fail"), ("queue_empty", "fail"), ("job_failed", "fail"),
        ("warmup_slow", "warn"), ("queue_full", "fail")]
    assert "5 upstream task(s): 2 succeeded, 2 failed, 1 running" in checks["log"]["summary"]
    full = checks["queue_full"]
    assert full["evidence"]["first"]["lineno"] == 81 and "任务视频驱动队列满" in full["evidence"]["first"]["line"]
    assert full["evidence"]["tasks"] == ["6a1f0c3e-8d2b-4c55-9e0a-2f7b1c9d4e11"]
    # the public report's lesson: the warm-up, not the queue, was the cause
    assert "earlier in this log, the likely causes: warmup_slow at line 78" in full["summary"] and "(110.42 s)" in full["summary"]
    assert "only hide it" in full["fix"]
    fallback = checks["cpu_fallback"]
    assert fallback["evidence"]["count"] == 4 and "libonnxruntime_providers_cuda.so" in fallback["evidence"]["first"]["line"]
    assert "heygem-ops doctor" in fallback["fix"]
    assert checks["queue_empty"]["evidence"]["first"]["line"] == "_queue.Empty"
    assert checks["warmup_slow"]["evidence"]["first"]["value"] == 110.42


def test_log_without_failures_is_ok(doctor, tmp_path):
    log = tmp_path / "dh.log"
    log.write_text("".join(line + "\n" for line in DH_LOG.read_text(encoding="utf-8").splitlines()[9:42]), encoding="utf-8")
    code, checks, _ = doctor("--log", str(log))
    assert code == 0 and list(checks) == ["log"]
    assert checks["log"]["summary"].endswith("2 upstream task(s): 2 succeeded; no failure line")


def test_log_with_configured_patterns_and_builtins_off(doctor, tmp_path):
    log = tmp_path / "dh.log"
    log.write_text("[2025-03-18 12:58:00,000] [x.py[line:1]] [WARNING] [磁盘空间不足]\n" + DH_LOG.read_text(encoding="utf-8"),
                   encoding="utf-8")
    toml = '[daemon]\nlog_builtin_patterns = false\n[[daemon.log_patterns]]\nregex = "磁盘空间不足"\nalert = "disk_low"\n'
    code, checks, _ = doctor("--log", str(log), toml=toml)
    assert code == 0 and list(checks) == ["log", "disk_low"]  # a warning-severity pattern is no failure
    assert checks["disk_low"]["status"] == "warn" and checks["disk_low"]["evidence"]["first"]["lineno"] == 1


def test_log_human_output_and_bad_path(cli, tmp_path):
    result = cli("doctor", "--log", str(DH_LOG), env={"COLUMNS": "200"})
    assert result.returncode == 1, result.stderr
    assert "heygem-ops doctor --log" in result.stdout and "fix: upstream's drivered_queue" in result.stdout
    assert "1 ok, 1 warn, 5 fail" in result.stdout
    missing = cli("doctor", "--log", str(tmp_path / "nope.log"))
    assert missing.returncode == 2 and "nope.log" in missing.stderr
