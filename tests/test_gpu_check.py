"""benchmarks/gpu_check.py, the GPU proof, made ready on machines without a GPU.

Its dry run must check everything that can be checked without one and write the report; without
a GPU it must stop at once with exit 2, before installing anything. A fake libnvidia-ml.so.1
(benchmarks/support/fakenvml) and a fake nvidia-smi reading the same values make the steps run
for real on this CPU machine: the GPU comparisons pass or fail on their numbers, and the CUDA
steps fail, each recorded, while the others still run. The judges of the steps that need CUDA
get the real JSON of doctor and demo here, then the same JSON with the sessions on CUDA.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.support.fakenvml import FakeGpu, build_library, fake_env, write_values

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STEPS = ["install", "doctor", "gpu", "demo", "pipeline", "gpu_query", "mdwe"]
DRY = "skipped (dry run)"
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"

# Prints what `nvidia-smi --query-gpu=FIELDS --format=csv[,noheader][,nounits]` would for the
# fake NVML's values file, plus FAKE_SMI_EXTRA_MIB on memory.used (a disagreeing tool).
FAKE_SMI = r'''
import os, sys
MIB = 1024 * 1024
extra = int(os.environ.get("FAKE_SMI_EXTRA_MIB", "0"))
gpus, driver, cuda = [], "?", 12040
for line in open(os.environ["FAKE_NVML_FILE"]):
    kind, _, rest = line.strip().partition(" ")
    if kind == "driver":
        driver = rest
    elif kind == "cuda":
        cuda = int(rest)
    elif kind == "gpu":
        util, used, total, temp, power, uuid, name = rest.split(" ", 6)
        gpus.append({"index": str(len(gpus)), "name": name, "uuid": uuid, "utilization.gpu": util,
                     "memory.used": str(int(used) // MIB + extra), "memory.total": str(int(total) // MIB),
                     "temperature.gpu": temp, "power.draw": power, "driver_version": driver})
query = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--query-gpu=")), None)
if query is None:
    print(f"| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {cuda // 1000}.{cuda % 1000 // 10} |")
    sys.exit(0)
fields = query.split(",")
if "noheader" not in next((a for a in sys.argv[1:] if a.startswith("--format=")), ""):
    print(", ".join(fields))
for g in gpus:
    print(", ".join(g.get(f, "[N/A]") for f in fields))
'''


def load():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def real_nvml() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


def run(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def fake_gpu(tmp_path):
    """PATH with a fake nvidia-smi and the fake NVML of one GPU holding 1024 MiB: the env to add."""
    if real_nvml() or shutil.which("nvidia-smi"):
        pytest.skip("a real NVIDIA driver is here: the fake one would not be the one loaded")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the fake libnvidia-ml.so.1")
    values = tmp_path / "nvml.txt"
    write_values(values, [FakeGpu(mem_used_mib=1024, mem_total_mib=81920, util_pct=0)])
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(f"#!{sys.executable}\n{FAKE_SMI}")
    smi.chmod(0o755)
    return {**fake_env(build_library(tmp_path / "lib"), values), "PATH": f"{smi.parent}{os.pathsep}{os.environ['PATH']}"}


# ---- no GPU ---------------------------------------------------------------------------------------

def test_without_a_gpu_it_stops_at_once_and_installs_nothing(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is installed here")
    began = time.monotonic()
    proc = run("--out", str(tmp_path / "out"), "--venv", str(tmp_path / "venv"), timeout=60)
    took = time.monotonic() - began
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU:") and "nvidia-smi" in lines[0], proc.stderr
    assert proc.stdout == ""
    assert took < 10, f"took {took:.1f} s to say there is no GPU"
    assert not (tmp_path / "venv").exists() and not (tmp_path / "out").exists()


def test_nvml_that_cannot_load_stops_it_too(tmp_path, fake_gpu):
    """nvidia-smi is there (fake) but libnvidia-ml.so.1 cannot be loaded."""
    env = {**fake_gpu, "LD_LIBRARY_PATH": str(tmp_path / "empty")}
    proc = run("--out", str(tmp_path / "out"), "--venv", str(tmp_path / "venv"), env=env, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("gpu_check: no GPU: NVML cannot be loaded") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "venv").exists()


def test_a_device_nvml_does_not_list_stops_it(tmp_path, fake_gpu):
    proc = run("--out", str(tmp_path / "out"), "--venv", str(tmp_path / "venv"), "--device", "3", env=fake_gpu, timeout=60)
    assert proc.returncode == 2 and "--device 3, but NVML lists 1 GPU(s)" in proc.stderr, proc.stderr
    assert not (tmp_path / "venv").exists()


def test_an_output_folder_it_cannot_write_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run("--dry-run", "--out", str(blocker / "out"), timeout=60)
    assert proc.returncode == 2 and "is not writable" in proc.stderr, proc.stderr


# ---- dry run ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dry_run_checks_the_plan_and_writes_every_step_skipped(tmp_path):
    out = tmp_path / "out"
    proc = run("--dry-run", "--out", str(out), "--venv", str(tmp_path / "venv"), "--device", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["device"] == 1
    assert [s["name"] for s in report["steps"]] == STEPS
    assert all(s["status"] == DRY for s in report["steps"]), [(s["name"], s["status"]) for s in report["steps"]]
    assert not [s for s in report["steps"] if s["plan_problems"]], report["steps"]
    assert report["failed"] == [] and report["plan_problems"] == [] and report["verdict"].startswith("dry run: every step")
    # every step's plan was really checked, by the environment the steps would run in
    for name in STEPS[1:]:
        log = (out / "logs" / f"{name}-check.log").read_text()
        assert '"problems": []' in log and "--check" in log, log
    # the config the demo step writes validated (watchdog.config.parse), for the asked device
    assert (out / "steps" / "demo" / "config.toml").read_text().startswith("[pipeline]\ndevices = [1]\n")
    markdown = (out / "gpu_check.md").read_text()
    for name in STEPS:
        assert f"| {name}: " in markdown and f"| {DRY} |" in markdown.split(f"| {name}: ", 1)[1].splitlines()[0], markdown
    assert "dry run: every step" in proc.stdout and "skipped (dry run)" in proc.stdout
    assert not (tmp_path / "venv").exists(), "a dry run installed something"


@pytest.mark.slow
def test_the_plan_check_finds_an_option_a_script_lacks():
    gpu_check = load()
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench_pipeline.py")]
    assert gpu_check._help_lists(bench, ["--device", "--json", "--heavier"]) == []
    problems = gpu_check._help_lists(bench, ["--device", "--no-such-option"])
    assert len(problems) == 1 and "--no-such-option" in problems[0], problems
    assert gpu_check._help_lists([sys.executable, "-c", "import sys; sys.exit(3)"], ["--x"])[0].endswith("exited 3: ")


def test_the_step_table_is_checked():
    gpu_check = load()
    assert gpu_check.plan_problems() == []
    gpu_check.STEPS = (*gpu_check.STEPS, gpu_check.Step("doctor", "again", 0))
    problems = gpu_check.plan_problems()
    assert "step doctor appears twice" in problems and "step doctor: timeout 0 s" in problems, problems


# ---- a run on a fake driver: CUDA steps fail, each recorded, every step still runs ---------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_without_cuda_records_each_failure_and_runs_every_step(tmp_path, fake_gpu):
    out = tmp_path / "out"
    proc = run("--no-install", "--out", str(out), "--budget", "240", env=fake_gpu, timeout=280)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    status = {s["name"]: s for s in report["steps"]}
    assert list(status) == STEPS
    assert status["install"]["status"] == "n/a"
    # the GPU comparisons ran against the fake driver and agree with it
    assert status["gpu"]["status"] == "pass", status["gpu"]
    assert status["gpu"]["metrics"]["gpus"][0]["ours_used_mib"] == 1024.0
    assert status["gpu_query"]["status"] == "pass" and status["gpu_query"]["metrics"]["gpus"] == 1, status["gpu_query"]
    # no CUDA here: each CUDA step failed with the reason, and the steps after it still ran
    for name in ("doctor", "demo", "pipeline"):
        assert status[name]["status"] == "fail", status[name]
        assert CPU in status[name]["summary"] or "cannot load" in status[name]["summary"], status[name]
    assert "ProviderFallback" in status["pipeline"]["summary"] and status["pipeline"]["stderr_tail"]
    assert status["mdwe"]["status"] in ("fail", "n/a"), status["mdwe"]
    if status["mdwe"]["status"] == "fail":
        assert status["mdwe"]["summary"].startswith("unproven: CUDA does not work"), status["mdwe"]
    else:
        assert status["mdwe"]["summary"].startswith("unsupported kernel"), status["mdwe"]
    assert set(report["failed"]) == {n for n in STEPS if status[n]["status"] == "fail"}
    assert report["verdict"].startswith("FAILED: doctor")
    assert (out / "steps" / "doctor" / "doctor.json").read_text().startswith("{")
    assert "| gpu: " in (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_gpu_step_fails_when_nvidia_smi_disagrees(tmp_path, fake_gpu):
    """1 % of 81920 MiB is 819 MiB: nvidia-smi 900 MiB off fails, 100 MiB off passes."""
    for extra, expected in ((900, "fail"), (100, "pass")):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--step", "gpu", "--work", str(tmp_path / f"w{extra}")],
                              cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **fake_gpu, "FAKE_SMI_EXTRA_MIB": str(extra)})
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1].split(" ", 1)[1])
        assert result["status"] == expected, (extra, result)
        if expected == "fail":
            assert "GPU 0: used 1024 vs 1924 MiB" in result["summary"], result


# ---- the judges of the CUDA steps, on the commands' real JSON -----------------------------------------

def _on_cuda(session: dict) -> None:
    session.update(requested=[CUDA, CPU], active=[CUDA, CPU], fallback=False, reason=None, missing_libraries=[])


@pytest.mark.slow
def test_doctor_judge_passes_cuda_and_fails_cpu(tmp_path):
    if real_nvml():
        pytest.skip("a GPU host: doctor's own answer is the proof")
    gpu_check = load()
    proc = subprocess.run([sys.executable, "-m", "ops.cli", "doctor", "--json", "--device", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    data = json.loads(proc.stdout)
    verdict = gpu_check.judge_doctor(data, proc.returncode)
    assert verdict["status"] == "fail" and "cpu_fallback fail" in verdict["summary"], verdict
    for check in data["checks"]:
        if check["name"] == "cpu_fallback":
            check["status"] = "ok"
            _on_cuda(check["evidence"])
        if check["name"] == "cuda_libraries":
            check["status"] = "ok"
    verdict = gpu_check.judge_doctor(data, 1)
    assert verdict["status"] == "pass", verdict
    assert verdict["metrics"]["active"][0] == CUDA


@pytest.mark.slow
def test_demo_judge_counts_frames_and_wants_every_session_on_cuda(tmp_path):
    gpu_check = load()
    proc = subprocess.run([sys.executable, "-m", "ops.cli", "demo", "--jobs", "1", "--seconds", "1", "--json",
                           "--out", str(tmp_path / "demo")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    verdict = gpu_check.judge_demo(result, 0)
    assert verdict["status"] == "fail" and "no session asked for CUDA" in verdict["summary"], verdict
    for replica in result["replicas"]:
        for session in replica["sessions"].values():
            _on_cuda(session)
    verdict = gpu_check.judge_demo(result, 0)
    assert verdict["status"] == "pass", verdict
    assert verdict["metrics"]["frames"] == 25 and verdict["metrics"]["fps"] > 0, verdict  # 1 s at 25 fps
    session = next(iter(result["replicas"][0]["sessions"].values()))
    session.update(active=[CPU], fallback=True, missing_libraries=["libcudnn.so.9"])
    verdict = gpu_check.judge_demo(result, 0)
    assert verdict["status"] == "fail" and "cannot load libcudnn.so.9" in verdict["summary"], verdict


def test_pipeline_judge_holds_the_pipeline_to_its_bottleneck():
    gpu_check = load()

    def data(pipeline, generator, decode, cpu=None):
        fps = {"decode stage alone": decode, "generate stage alone": generator, "encode stage alone": 1000.0,
               "pipeline, 1 replica": pipeline}
        if cpu:
            fps["generate on CPU, 16 threads"] = cpu
        neck = min((k for k in fps if k.endswith("stage alone")), key=fps.get)
        setting = {"title": "t", "frames": 100, "fps": fps, "bottleneck": neck, "job_states": ["succeeded"]}
        return {"device": 0, "settings": [setting, setting]}

    good = gpu_check.judge_pipeline(data(95.0, 100.0, 500.0, cpu=20.0))
    assert good["status"] == "pass" and good["metrics"]["pipeline_vs_generator"] == 0.95, good
    assert good["metrics"]["cuda_vs_cpu_generator"] == 5.0 and "CUDA vs CPU 5.0x" in good["summary"]
    assert gpu_check.judge_pipeline(data(80.0, 100.0, 500.0))["status"] == "fail"
    # a GPU generator faster than CPU decode: judged against decode, both ratios shown
    fast = gpu_check.judge_pipeline(data(190.0, 1000.0, 200.0))
    assert fast["status"] == "pass" and "not the bottleneck (decode stage alone" in fast["summary"], fast
    assert fast["metrics"]["pipeline_vs_generator"] == 0.19
