"""GPU proof: the product on a real NVIDIA GPU, in one prepared command (sized for < 8 minutes).

Nothing of heygem-ops had run on CUDA before this script; a GPU machine is lent rarely and for
minutes, so everything here was checked beforehand (`--dry-run`, tests/test_gpu_check.py).
From the repository root of a fresh GPU host (one NVIDIA GPU, PyPI reachable):

    python3 benchmarks/gpu_check.py --out gpu-proof

Steps, each a subprocess with its own timeout (one failing is recorded with its stderr tail and
the others still run):

    install      python -m venv .venv-gpu; pip install -e . "onnxruntime-gpu[cuda,cudnn]" (PyPI only);
                 --no-install uses this interpreter instead. pip's NVIDIA library folders go on
                 LD_LIBRARY_PATH of every later step, as `heygem-ops doctor` tells operators to do.
    doctor       `heygem-ops doctor --json`: the session asked for CUDA runs on CUDA, no cpu_fallback
    gpu          `heygem-ops gpu --json` against nvidia-smi --query-gpu taken at the same moment:
                 the same GPUs, memory used within 1 % of the GPU's memory
    demo         `heygem-ops --config (devices = [N]) demo --json`: videos written, every session
                 asked for CUDA on CUDA, frames per second (frames of the outputs / processing time)
    pipeline     benchmarks/bench_pipeline.py --device N: pipeline fps / generator alone fps
                 (target >= 0.9), generator on CUDA vs on CPU
    gpu_query    one NVML sample of every GPU in process vs one `nvidia-smi` call
                 (benchmarks/bench_gpu_query.py's code)
    mdwe         a CUDA session built and run in a child under PR_SET_MDWE (the kernel's
                 MemoryDenyWriteExecute): is the unit's MemoryDenyWriteExecute=yes safe with CUDA?

It prints one table and writes it to OUT/gpu_check.json and OUT/gpu_check.md (for BENCHMARKS.md),
each step's output to OUT/logs/ and its raw results (doctor.json, demo.json and the videos...) to
OUT/steps/. Without a GPU (no nvidia-smi, or NVML cannot initialise) it says so in one line and
exits 2 before installing anything. `--dry-run` checks, without a GPU, every
command, script and option the steps will use, the config they write and the output folder, and
writes the outputs with every step "skipped (dry run)".

Exit: 0 every check passed; 1 a check failed (or, with --dry-run, the plan has a problem);
2 no GPU, or bad usage.

This file is also each step's worker (`--step NAME`, run by the environment under test), so the
orchestrator itself needs nothing but the standard library.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
CUDA = "CUDAExecutionProvider"
MARKER = "GPU_CHECK_RESULT "  # a worker's last stdout line: MARKER + JSON
SMI_QUERY = ["--query-gpu=index,utilization.gpu,memory.used,memory.total", "--format=csv,noheader,nounits"]
MEM_TOLERANCE = 0.01  # of the GPU's memory
PIPELINE_TARGET = 0.9
DRY = "skipped (dry run)"
TAIL = 3000  # characters of stderr kept for a failed step


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    timeout_s: float


STEPS = (
    Step("install", "venv + pip install -e . onnxruntime-gpu[cuda,cudnn]", 300),
    Step("doctor", "heygem-ops doctor --json: sessions on CUDA", 120),
    Step("gpu", "heygem-ops gpu --json vs nvidia-smi", 60),
    Step("demo", "heygem-ops demo on devices = [{device}]", 240),
    Step("pipeline", "bench_pipeline.py --device {device}", 300),
    Step("gpu_query", "NVML sample vs nvidia-smi call", 90),
    Step("mdwe", "CUDA session under PR_SET_MDWE", 90),
)


@dataclass
class Result:
    name: str
    title: str
    status: str  # pass | fail | n/a | skipped (dry run) | not run: ...
    summary: str = ""
    metrics: dict = field(default_factory=dict)
    seconds: Optional[float] = None
    command: Optional[str] = None
    stderr_tail: Optional[str] = None
    plan_problems: list = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status == "fail" or self.status.startswith("not run")


# ---- processes ----------------------------------------------------------------------------------

def run_bounded(cmd: list, timeout_s: float, env: Optional[dict] = None, cwd: Path = ROOT) -> tuple[Optional[int], str, str, float]:
    """Run `cmd` in its own session; at the timeout KILL its whole process group (ours).
    Returns (exit code or None on timeout, stdout, stderr, seconds)."""
    began = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout_s))
        code: Optional[int] = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, children included
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        code = None
    return code, out, err, time.monotonic() - began


def _tail(text: str) -> str:
    return text[-TAIL:].strip()


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Fallback|Exit|Interrupt|Expired)\b.*")


_ORT_LOG = re.compile(r";? ?\[[WE]:onnxruntime.*$")


def _reason(text: str) -> str:
    """One line for a table: the last exception line of a traceback, else the last line; ONNX
    Runtime's own log lines appended to a message are cut (they are in the logs)."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line)]
    return _ORT_LOG.sub("", (raised or lines or ["(no output)"])[-1])[:300]


def _why(session: dict) -> str:
    """Why a session is not on CUDA, in a few words."""
    if session.get("missing_libraries") or session.get("missing"):
        return "cannot load " + ", ".join(session.get("missing_libraries") or session.get("missing"))
    reason = (session.get("reason") or "no reason given").strip().splitlines()
    return next((line for line in reason if "Failed" in line or "Require" in line), reason[0])[:200]


def _cli() -> list[str]:
    """The `heygem-ops` of the interpreter running this (a worker runs in the environment under test)."""
    script = Path(sys.executable).with_name("heygem-ops")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ops.cli"]


def _json_of(text: str):
    return json.loads(text)


# ---- no GPU: say so and stop before installing anything -----------------------------------------

def no_gpu_reason(device: int) -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi is not on PATH (no NVIDIA driver on this host)"
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as err:
        return f"NVML cannot be loaded: {err}"
    try:
        code = nvml.nvmlInit_v2()
    except AttributeError:
        return "libnvidia-ml.so.1 has no nvmlInit_v2: the NVIDIA driver is too old"
    if code != 0:
        nvml.nvmlErrorString.restype = ctypes.c_char_p
        return f"NVML cannot initialise: {nvml.nvmlErrorString(code).decode(errors='replace')} (nvmlInit_v2 returned {code})"
    count = ctypes.c_uint(0)
    code = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count))
    nvml.nvmlShutdown()
    if code != 0 or count.value == 0:
        return "NVML initialised but lists no GPU"
    if device >= count.value:
        return f"--device {device}, but NVML lists {count.value} GPU(s)"
    return None


# ---- install --------------------------------------------------------------------------------------

def nvidia_lib_dirs(python: str, env: dict) -> list[str]:
    """Folders of pip's NVIDIA wheels (site-packages/nvidia/*/lib) in `python`'s environment."""
    code = ("import glob, importlib.util, os\n"
            "s = importlib.util.find_spec('nvidia')\n"
            "roots = list(s.submodule_search_locations or []) if s else []\n"
            "print('\\n'.join(sorted(d for r in roots for d in glob.glob(os.path.join(r, '*', 'lib')))))\n")
    rc, out, _, _ = run_bounded([python, "-c", code], 60, env)
    return [line for line in out.splitlines() if line.strip()] if rc == 0 else []


def install(venv: Path, timeout_s: float, env: dict, ort: str = "onnxruntime-gpu[cuda,cudnn]") -> tuple[Result, Optional[str]]:
    """A venv with the project and the CUDA wheels; returns the result and the venv's python."""
    step = STEPS[0]
    began = time.monotonic()
    python = venv / "bin" / "python"
    commands = [[sys.executable, "-m", "venv", venv],
                [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", ROOT, ort]]
    log = []
    for cmd in commands:
        left = timeout_s - (time.monotonic() - began)
        rc, out, err, _ = run_bounded(cmd, left, env)
        log.append(f"$ {' '.join(map(str, cmd))}\n{out}{err}")
        if rc != 0:
            why = "timed out" if rc is None else f"exit {rc}"
            return Result(step.name, step.title, "fail", f"`{' '.join(map(str, cmd[:4]))} ...` {why}",
                          seconds=time.monotonic() - began, command=" && ".join(" ".join(map(str, c)) for c in commands),
                          stderr_tail=_tail(err or out)), None
    rc, out, _, _ = run_bounded([python, "-m", "pip", "list", "--format=json"], 60, env)
    versions = {}
    if rc == 0:
        wanted = ("heygem-ops", "onnxruntime-gpu", "nvidia-ml-py", "numpy", "opencv-python-headless")
        versions = {p["name"]: p["version"] for p in json.loads(out) if p["name"].lower() in wanted or p["name"].lower().startswith("nvidia-")}
    return Result(step.name, step.title, "pass", f"{venv}: onnxruntime-gpu {versions.get('onnxruntime-gpu', '?')}",
                  {"versions": versions}, time.monotonic() - began,
                  " && ".join(" ".join(map(str, c)) for c in commands)), str(python)


# ---- the steps' workers (run by the environment under test) ----------------------------------------

def config_text(device: int) -> str:
    return f'[pipeline]\ndevices = [{device}]\nfallback = "fail"\n'


def write_config(work: Path, device: int) -> Path:
    path = work / "config.toml"
    path.write_text(config_text(device))
    return path


def validate_config(path: Path) -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from watchdog.config import parse

    config = parse(tomllib.loads(path.read_text()), str(path))
    assert config.pipeline.devices != "cpu", config.pipeline.devices


def _help_lists(cmd: list, options: list[str]) -> list[str]:
    """Problems: `cmd --help` must succeed and name every option."""
    rc, out, err, _ = run_bounded([*cmd, "--help"], 60)
    if rc != 0:
        return [f"`{' '.join(map(str, cmd))} --help` exited {rc}: {_tail(err)[-300:]}"]
    return [f"`{' '.join(map(str, cmd))} --help` does not list {opt}" for opt in options if opt not in out]


def _session_problems(sessions: dict) -> tuple[int, list[str]]:
    """(sessions that asked for CUDA, problems: any of those not on CUDA)."""
    asked, problems = 0, []
    for role, s in sessions.items():
        if s.get("requested") and s["requested"][0] == CUDA:
            asked += 1
            if not s.get("active") or s["active"][0] != CUDA or s.get("fallback"):
                problems.append(f"{role} on {', '.join(s.get('active') or ['?'])} ({_why(s)})")
    return asked, problems


def step_doctor(work: Path, device: int, timeout_s: float, check: bool) -> dict:
    cmd = [*_cli(), "--config", write_config(work, device), "doctor", "--json", "--device", str(device)]
    if check:
        return {"problems": _help_lists(_cli()[:], ["--config"]) + _help_lists([*_cli(), "doctor"], ["--json", "--device"])}
    rc, out, err, _ = run_bounded(cmd, timeout_s)
    (work / "doctor.json").write_text(out)
    try:
        data = _json_of(out)
    except ValueError:
        return {"status": "fail", "command": " ".join(map(str, cmd)), "stderr_tail": _tail(err),
                "summary": f"doctor {'timed out' if rc is None else f'exited {rc}'} without its JSON: {_reason(err)}"}
    return {**judge_doctor(data, rc), "command": " ".join(map(str, cmd))}


def judge_doctor(data: dict, rc: Optional[int]) -> dict:
    """Doctor's JSON: cpu_fallback ok with CUDA first among the session's providers, and every
    library of the CUDA provider loads. Other failed checks (zombies, an idle GPU holding memory)
    are reported, not judged: they are about the host, not about CUDA."""
    checks = {c["name"]: c for c in data["checks"]}
    fb = checks["cpu_fallback"]
    ev = fb.get("evidence", {})
    libs = checks.get("cuda_libraries", {})
    others = sorted(n for n, c in checks.items() if c["status"] == "fail" and n not in ("cpu_fallback", "cuda_libraries"))
    ok = fb["status"] == "ok" and list(ev.get("active") or [])[:1] == [CUDA] and not ev.get("fallback") and libs.get("status") == "ok"
    package = checks.get("onnxruntime_package", {}).get("evidence", {})
    summary = f"cpu_fallback {fb['status']}: {fb['summary']}; cuda_libraries {libs.get('status')}: {libs.get('summary')}"
    if others:
        summary += f"; other failed checks (not part of this proof): {', '.join(others)}"
    return {"status": "pass" if ok else "fail", "summary": summary,
            "metrics": {"active": ev.get("active"), "requested": ev.get("requested"), "doctor_exit": rc,
                        "onnxruntime": f"{package.get('flavour')} {package.get('version')}",
                        "missing_libraries": ev.get("missing_libraries"), "other_failed_checks": others}}


def _smi(save: Optional[Path] = None) -> dict[int, dict]:
    rc, out, err, _ = run_bounded(["nvidia-smi", *SMI_QUERY], 30)
    if save is not None:
        save.write_text(out + err)
    if rc != 0:
        raise RuntimeError(f"nvidia-smi exited {rc}: {err.strip()}")
    rows = {}
    for line in out.strip().splitlines():
        index, util, used, total = (v.strip() for v in line.split(","))
        rows[int(index)] = {"util_pct": None if not util.isdigit() else int(util), "mem_used_mib": float(used), "mem_total_mib": float(total)}
    return rows


def step_gpu(work: Path, device: int, timeout_s: float, check: bool) -> dict:
    cmd = [*_cli(), "--config", write_config(work, device), "gpu", "--json"]
    if check:
        return {"problems": _help_lists([*_cli(), "gpu"], ["--json"])}
    # nvidia-smi just before and just after the CLI's one NVML sample: "the same moment" within the
    # CLI's start-up; the CLI's value must match the nearer of the two.
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        before = _smi(work / "nvidia-smi-before.csv")
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:  # ours: it did not finish in time
            proc.kill()
            proc.wait()
    after = _smi(work / "nvidia-smi-after.csv")
    (work / "gpu.json").write_text(out)
    if proc.returncode != 0:
        raise RuntimeError(f"heygem-ops gpu --json exited {proc.returncode}: {err.strip()[-500:]}")
    ours = {g["index"]: g for g in _json_of(out)["gpus"]}
    problems, rows = [], []
    if set(ours) != set(before):
        problems.append(f"GPUs differ: heygem-ops {sorted(ours)}, nvidia-smi {sorted(before)}")
    for index in sorted(set(ours) & set(before)):
        g, total = ours[index], before[index]["mem_total_mib"]
        diff = min(abs(g["mem_used_mib"] - s[index]["mem_used_mib"]) for s in (before, after) if index in s)
        rows.append({"index": index, "ours_used_mib": round(g["mem_used_mib"], 1), "smi_used_mib": before[index]["mem_used_mib"],
                     "ours_total_mib": round(g["mem_total_mib"], 1), "smi_total_mib": total, "diff_mib": round(diff, 1),
                     "diff_pct_of_total": round(100 * diff / total, 3), "ours_util_pct": g["util_pct"],
                     "smi_util_pct": before[index]["util_pct"]})
        if diff > MEM_TOLERANCE * total or abs(g["mem_total_mib"] - total) > MEM_TOLERANCE * total:
            problems.append(f"GPU {index}: used {g['mem_used_mib']:.0f} vs {before[index]['mem_used_mib']:.0f} MiB, "
                            f"total {g['mem_total_mib']:.0f} vs {total:.0f} MiB (tolerance {MEM_TOLERANCE:.0%} of total)")
    worst = max((r["diff_pct_of_total"] for r in rows), default=0.0)
    summary = "; ".join(problems) or f"{len(rows)} GPU(s) match; memory used differs by at most {worst:.3f} % of total"
    return {"status": "fail" if problems else "pass", "summary": summary, "command": " ".join(map(str, cmd)),
            "metrics": {"gpus": rows}}


def _frames(path: str) -> int:
    import cv2

    cap = cv2.VideoCapture(path)
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def step_demo(work: Path, device: int, timeout_s: float, check: bool) -> dict:
    config = write_config(work, device)
    demo_timeout = max(10, int(timeout_s - 30))
    cmd = [*_cli(), "--config", config, "demo", "--jobs", "2", "--seconds", "2", "--out", work / "demo", "--json",
           "--timeout", str(demo_timeout)]
    if check:
        validate_config(config)
        return {"problems": _help_lists([*_cli(), "demo"], ["--jobs", "--seconds", "--out", "--json", "--timeout"])}
    rc, out, err, _ = run_bounded(cmd, timeout_s)
    (work / "demo.json").write_text(out)
    try:
        result = _json_of(out)
    except ValueError:
        return {"status": "fail", "command": " ".join(map(str, cmd)), "stderr_tail": _tail(err),
                "summary": f"demo {'timed out' if rc is None else f'exited {rc}'} without its JSON: {_reason(err)}"}
    return {**judge_demo(result, rc), "command": " ".join(map(str, cmd))}


def judge_demo(result: dict, rc: Optional[int], frames_of: Callable[[str], int] = _frames) -> dict:
    """The demo's JSON: every job's video written, every session that asked for CUDA on CUDA.
    The demo reports no fps; here: frames of the videos / (last job's end - first submission -
    replica start-up)."""
    problems = []
    asked = 0
    for replica in result["replicas"]:
        n, bad = _session_problems(replica["sessions"])
        asked += n
        problems += [f"replica {replica['index']} {b}" for b in bad]
    if not asked:
        problems.append("no session asked for CUDA: the config's devices were not applied")
    jobs = result["jobs"]
    frames = 0
    for job in jobs:
        if job["state"] != "succeeded" or not job["result"] or not Path(job["result"]).is_file():
            problems.append(f"job {job['id']} {job['state']}: {job['reason'] or 'no video'}")
        else:
            frames += frames_of(job["result"])
    busy_s = max(j["updated_at"] for j in jobs) - min(j["created_at"] for j in jobs) - (result.get("startup_s") or 0.0)
    fps = frames / busy_s if busy_s > 0 and frames else None
    if result.get("fatal"):
        stages = ", ".join(f"replica {f['replica']} {f['stage']}" for f in result["fatal"])
        problems.append(f"fatal in {stages}: {_reason(result['fatal'][0]['reason'].splitlines()[0])}")
    summary = "; ".join(problems) if problems else (
        f"{len(jobs)} videos, {frames} frames, {asked} sessions on CUDA, {fps:.1f} fps "
        f"(replicas ready after {result.get('startup_s')} s)")
    return {"status": "fail" if problems or rc != 0 else "pass", "summary": summary,
            "metrics": {"exit": rc, "videos": [j["result"] for j in jobs], "frames": frames, "fps": fps,
                        "wall_s": result.get("wall_s"), "startup_s": result.get("startup_s"),
                        "sessions": {r["index"]: {role: s.get("active") for role, s in r["sessions"].items()} for r in result["replicas"]}}}


PIPELINE_ARGS = ["--jobs", "2", "--seconds", "2", "--size", "640x360", "--rounds", "1"]


def step_pipeline(work: Path, device: int, timeout_s: float, check: bool, heavier: int = 12) -> dict:
    script = ROOT / "benchmarks" / "bench_pipeline.py"
    out_json = work / "bench_pipeline.json"
    cmd = [sys.executable, script, *PIPELINE_ARGS, "--heavier", str(heavier), "--device", str(device), "--json", out_json]
    if check:
        return {"problems": _help_lists([sys.executable, script],
                                        [o for o in cmd if isinstance(o, str) and o.startswith("--")])}
    rc, out, err, _ = run_bounded(cmd, timeout_s)
    (work / "bench_pipeline.txt").write_text(out)
    if rc != 0:
        return {"status": "fail", "command": " ".join(map(str, cmd)), "stderr_tail": _tail(err),
                "summary": f"bench_pipeline.py {'timed out' if rc is None else f'exited {rc}'}: {_reason(err)}"}
    return {**judge_pipeline(json.loads(out_json.read_text())), "command": " ".join(map(str, cmd))}


def judge_pipeline(data: dict) -> dict:
    """bench_pipeline.py --json: in the generator-bound setting, pipeline fps / generator alone
    fps >= PIPELINE_TARGET. Where another stage is slower than the generator (a fast GPU, CPU
    decode), the pipeline cannot beat that stage: it is judged against it, and both are shown."""
    bound = data["settings"][-1]  # generator-bound
    fps = bound["fps"]
    pipe, gen = fps["pipeline, 1 replica"], fps["generate stage alone"]
    cpu_gen = next((v for k, v in fps.items() if k.startswith("generate on CPU")), None)
    neck = bound["bottleneck"]
    vs_gen, vs_neck = pipe / gen, pipe / fps[neck]
    generator_bound = neck == "generate stage alone"
    ok = (vs_gen if generator_bound else vs_neck) >= PIPELINE_TARGET and bound["job_states"] == ["succeeded"]
    summary = f"pipeline {pipe:.1f} fps / generator alone {gen:.1f} fps = {vs_gen:.2f} (target >= {PIPELINE_TARGET})"
    if cpu_gen:
        summary += f"; generator CUDA vs CPU {gen / cpu_gen:.1f}x ({gen:.1f} vs {cpu_gen:.1f} fps)"
    if not generator_bound:
        summary += (f"; the generator is not the bottleneck ({neck}, {fps[neck]:.1f} fps): judged against it, "
                    f"{vs_neck:.2f}")
    demo_setting = data["settings"][0]["fps"]
    return {"status": "pass" if ok else "fail", "summary": summary,
            "metrics": {"pipeline_fps": pipe, "generator_alone_fps": gen, "pipeline_vs_generator": vs_gen,
                        "bottleneck": neck, "pipeline_vs_bottleneck": vs_neck, "generator_cpu_fps": cpu_gen,
                        "cuda_vs_cpu_generator": gen / cpu_gen if cpu_gen else None,
                        "demo_models_pipeline_fps": demo_setting.get("pipeline, 1 replica"),
                        "settings": data["settings"]}}


def step_gpu_query(work: Path, device: int, timeout_s: float, check: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_gpu_query as bench  # its in-process sampler and its nvidia-smi query

    smi = shutil.which("nvidia-smi")
    if check:
        missing = [n for n in ("IN_PROCESS", "QUERY", "cold", "real_driver") if not hasattr(bench, n)]
        return {"problems": [f"bench_gpu_query.py has no {n}" for n in missing]}
    env = dict(os.environ)
    rc, out, err, _ = run_bounded([sys.executable, "-c", bench.IN_PROCESS, "100"], timeout_s / 2, env)
    if rc != 0:
        return {"status": "fail", "command": f"{sys.executable} -c <bench_gpu_query.IN_PROCESS> 100", "stderr_tail": _tail(err),
                "summary": f"in-process NVML sampler {'timed out' if rc is None else f'exited {rc}'}: {_reason(err)}"}
    inproc = json.loads(out.strip().splitlines()[-1])
    smi_s = bench.cold([smi, f"--query-gpu={bench.QUERY}", "--format=csv"], env, 5)
    ratio = smi_s / inproc["median"]
    return {"status": "pass", "command": f"{sys.executable} -c <bench_gpu_query.IN_PROCESS> 100; nvidia-smi --query-gpu=... x5",
            "summary": f"{inproc['gpus']} GPU(s): NVML sample {inproc['median'] * 1e3:.2f} ms in process, "
                       f"nvidia-smi {smi_s * 1e3:.1f} ms: {ratio:.0f}x",
            "metrics": {"gpus": inproc["gpus"], "nvml_sample_ms": inproc["median"] * 1e3, "nvml_init_ms": inproc["init"] * 1e3,
                        "nvidia_smi_ms": smi_s * 1e3, "smi_vs_sample": ratio}}


MDWE_CHILD = r"""
import ctypes, errno, json, mmap, sys
device, mdwe = int(sys.argv[1]), sys.argv[2] == "mdwe"
libc = ctypes.CDLL(None, use_errno=True)
if mdwe and libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    e = ctypes.get_errno()
    print(json.dumps({"prctl_errno": e, "einval": e == errno.EINVAL}))
    sys.exit(3)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    if mdwe:
        print(json.dumps({"error": "a W+X mapping was allowed: MDWE is not in force"}))
        sys.exit(4)
except OSError:
    pass
import numpy as np
from heygem.providers import open_session, probe_model
session, check = open_session(probe_model(), device, fallback="warn")
out = session.run(None, {"input": np.ones((1, 3, 32, 32), np.float32)})[0]
print(json.dumps({"active": list(check.active), "fallback": check.fallback, "reason": check.reason,
                  "missing": list(check.missing_libraries), "output_shape": list(out.shape)}))
"""


def _on_cuda(data: dict) -> bool:
    return (data.get("active") or [None])[0] == CUDA and not data.get("fallback")


def step_mdwe(work: Path, device: int, timeout_s: float, check: bool) -> dict:
    """The same child with and without MDWE: CUDA under MDWE settles it; CUDA only without MDWE
    means MDWE breaks it; neither means this host cannot tell (CUDA itself does not work)."""
    cmd = [sys.executable, "-c", MDWE_CHILD, str(device), "mdwe"]
    if check:
        problems = []
        if not hasattr(ctypes.CDLL(None), "prctl"):
            problems.append("libc has no prctl")
        from heygem.providers import open_session, probe_model  # noqa: F401 - the child's imports exist

        compile(MDWE_CHILD, "<mdwe child>", "exec")
        return {"problems": problems}
    rc, out, err, _ = run_bounded(cmd, timeout_s)
    (work / "mdwe.txt").write_text(f"exit {rc}\n{out}\n{err}")
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    try:
        data = json.loads(last)
    except ValueError:
        data = {}
    command = f"{sys.executable} -c <prctl(PR_SET_MDWE); open_session(probe, {device})>"
    if rc == 3 and data.get("einval"):
        return {"status": "n/a", "summary": f"unsupported kernel: prctl(PR_SET_MDWE) -> EINVAL ({platform.release()})",
                "command": command, "metrics": {"kernel": platform.release(), "verdict": "unsupported kernel"}}
    if rc == 0 and _on_cuda(data):
        return {"status": "pass", "command": command,
                "summary": f"safe: CUDA session built and ran under MDWE (kernel {platform.release()})",
                "metrics": {"kernel": platform.release(), "verdict": "safe", **data}}
    rc0, out0, _, _ = run_bounded([*cmd[:-1], "plain"], timeout_s / 2)
    try:
        plain = json.loads(out0.strip().splitlines()[-1]) if rc0 == 0 else {}
    except (ValueError, IndexError):
        plain = {}
    verdict = "unsafe" if _on_cuda(plain) else "unproven"
    if rc is None:
        why = "timed out"
    elif rc < 0:
        why = f"killed by signal {-rc}"
    elif rc == 3:
        why = f"prctl failed, errno {data.get('prctl_errno')}"
    else:
        why = data.get("error") or (f"session on {', '.join(data.get('active') or ['?'])} ({_why(data)})" if data
                                    else f"exit {rc}: {_reason(err)}")
    summary = (f"unsafe: CUDA works without MDWE, not under it: {why}" if verdict == "unsafe" else
               f"unproven: CUDA does not work in this environment even without MDWE: {why}")
    return {"status": "fail", "command": command, "summary": summary,
            "metrics": {"kernel": platform.release(), "verdict": verdict, "exit": rc, **data}, "stderr_tail": _tail(err)}


WORKERS: dict[str, Callable[..., dict]] = {
    "doctor": step_doctor, "gpu": step_gpu, "demo": step_demo, "pipeline": step_pipeline,
    "gpu_query": step_gpu_query, "mdwe": step_mdwe,
}


def worker_main(args) -> None:
    """One step in this (the tested) environment; the result is the last stdout line."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    fn = WORKERS[args.step]
    kwargs = {"heavier": args.heavier} if args.step == "pipeline" else {}
    result = fn(work, args.device, args.step_timeout, args.check, **kwargs)
    print(MARKER + json.dumps(result, default=str), flush=True)


# ---- the orchestrator --------------------------------------------------------------------------------

def plan_problems() -> list[str]:
    """The step table itself: unique names, install first, a worker for every other step, sane timeouts."""
    names = [s.name for s in STEPS]
    problems = [f"step {n} appears twice" for n in sorted(set(n for n in names if names.count(n) > 1))]
    if names[0] != "install":
        problems.append("the first step must be install")
    problems += [f"step {n} has no worker" for n in names[1:] if n not in WORKERS]
    problems += [f"worker {n} is not a step" for n in WORKERS if n not in names]
    problems += [f"step {s.name}: timeout {s.timeout_s} s" for s in STEPS if not 0 < s.timeout_s <= 600]
    return problems


def run_step(step: Step, python: str, env: dict, work: Path, device: int, timeout_s: float, logs: Path,
             check: bool = False, heavier: int = 12) -> tuple[Optional[dict], Optional[int], str, str, float]:
    cmd = [python, HERE, "--step", step.name, "--work", work / step.name, "--device", str(device),
           "--step-timeout", f"{max(5.0, timeout_s - 10):.0f}", "--heavier", str(heavier)]
    if check:
        cmd.append("--check")
    rc, out, err, seconds = run_bounded(cmd, timeout_s, env)
    (logs / f"{step.name}{'-check' if check else ''}.log").write_text(f"$ {' '.join(map(str, cmd))}\n--- stdout\n{out}\n--- stderr\n{err}")
    found = [line[len(MARKER):] for line in out.splitlines() if line.startswith(MARKER)]
    return (json.loads(found[-1]) if found else None), rc, out, err, seconds


def host_info(env: dict) -> dict:
    info = {"kernel": platform.release(), "python": sys.version.split()[0], "machine": platform.machine()}
    if shutil.which("nvidia-smi"):
        rc, out, _, _ = run_bounded(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total",
                                     "--format=csv,noheader"], 30, env)
        if rc == 0:
            info["gpus"] = [line.strip() for line in out.strip().splitlines()]
        rc, out, _, _ = run_bounded(["nvidia-smi"], 30, env)
        match = re.search(r"CUDA Version:\s*([\d.]+)", out or "")
        if match:
            info["driver_cuda"] = match.group(1)
    return info


def markdown(report: dict) -> str:
    lines = [f"GPU proof, {report['finished']}, `{report['command']}`", ""]
    host = report["host"]
    lines.append(f"Host: {'; '.join(host.get('gpus', ['no GPU']))}; driver CUDA {host.get('driver_cuda', '?')}; "
                 f"kernel {host['kernel']}; Python {host['python']}.")
    if report.get("ld_library_path"):
        lines.append(f"LD_LIBRARY_PATH: {len(report['ld_library_path'])} folders of pip's NVIDIA wheels.")
    lines += ["", "| step | status | result | s |", "| --- | --- | --- | --- |"]
    for r in report["steps"]:
        text = r["summary"].replace("|", "\\|").replace("\n", " ")
        if r.get("plan_problems"):
            text += " (plan: " + "; ".join(r["plan_problems"]).replace("|", "\\|") + ")"
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['name']}: {r['title']} | {r['status']} | {text} | {seconds} |")
    lines += ["", f"Result: {report['verdict']}", ""]
    return "\n".join(lines)


def render(report: dict, python: str, json_path: Path) -> None:
    """The table with rich (from the tested environment, which has it); plain Markdown otherwise."""
    try:
        import rich  # noqa: F401
    except ImportError:
        rc, out, _, _ = run_bounded([python, HERE, "--render", json_path], 60)
        if rc == 0:
            print(out, end="")
            return
        print(markdown(report))
        return
    render_rich(report)


def render_rich(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    colours = {"pass": "green", "fail": "bold red", "n/a": "yellow"}
    table = Table(title=f"GPU proof ({report['finished']})", title_justify="left")
    for col in ("step", "status", "result", "s"):
        table.add_column(col, overflow="fold")
    for r in report["steps"]:
        colour = colours.get(r["status"], "red" if r["status"].startswith("not run") else "dim")
        text = r["summary"] + ("" if not r.get("plan_problems") else "\nplan: " + "; ".join(r["plan_problems"]))
        table.add_row(r["name"], f"[{colour}]{r['status']}[/{colour}]", text, "" if r["seconds"] is None else f"{r['seconds']:.0f}")
    out = Console(highlight=False)
    out.print(table)
    out.print(report["verdict"])


def orchestrate(args) -> int:
    started = time.monotonic()
    if not args.dry_run:
        reason = no_gpu_reason(args.device)
        if reason:
            print(f"gpu_check: no GPU: {reason}; nothing was installed or run.", file=sys.stderr)
            return 2
    out_dir = Path(args.out).resolve()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        (out_dir / "logs").mkdir(exist_ok=True)
    except OSError as err:
        print(f"gpu_check: the output folder {out_dir} is not writable: {err}", file=sys.stderr)
        return 2

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    work = out_dir / "steps"  # each step's raw outputs (doctor.json, demo.json and videos, ...)
    logs = out_dir / "logs"
    results: list[Result] = []
    python: Optional[str] = sys.executable
    deadline = started + args.budget

    def left() -> float:
        return deadline - time.monotonic()

    install_step = STEPS[0]
    if args.dry_run or args.no_install:
        problems = []
        if args.dry_run and not args.no_install:  # what the install will need
            if run_bounded([sys.executable, "-c", "import ensurepip, venv"], 60)[0] != 0:
                problems.append(f"python -m venv with pip (Debian: python3-venv) is not available to {sys.executable}")
            if not (ROOT / "pyproject.toml").is_file():
                problems.append(f"{ROOT} has no pyproject.toml")
        status = DRY if args.dry_run else "n/a"
        summary = ("would create " + str(args.venv) if args.dry_run and not args.no_install
                   else f"--no-install: {sys.executable}")
        results.append(Result(install_step.name, install_step.title, status, summary, plan_problems=problems))
    else:
        result, python = install(Path(args.venv).resolve(), min(install_step.timeout_s, left()), env, args.ort)
        results.append(result)

    lib_dirs = nvidia_lib_dirs(python, env) if python else []
    if lib_dirs:
        env["LD_LIBRARY_PATH"] = ":".join([*lib_dirs, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])

    for step in STEPS[1:]:
        title = step.title.format(device=args.device)
        if args.dry_run:
            data, rc, out, err, seconds = run_step(step, python, env, work, args.device, 120, logs, check=True, heavier=args.heavier)
            problems = data["problems"] if data else [f"plan check exited {rc}: {_tail(err)[-500:]}"]
            results.append(Result(step.name, title, DRY, "plan ok" if not problems else "plan has problems",
                                  plan_problems=problems))
            continue
        if python is None:
            results.append(Result(step.name, title, "not run: install failed"))
            continue
        budget = min(step.timeout_s, left())
        if budget < 15:
            results.append(Result(step.name, title, "not run: out of time budget", f"{args.budget:.0f} s budget spent"))
            continue
        data, rc, out, err, seconds = run_step(step, python, env, work, args.device, budget, logs, heavier=args.heavier)
        if data is None:
            why = "timed out" if rc is None else f"exited {rc} without a result"
            results.append(Result(step.name, title, "fail", f"{why}: {_reason(err)}", seconds=seconds, stderr_tail=_tail(err)))
        else:
            results.append(Result(step.name, title, data.get("status", "fail"), data.get("summary", ""), data.get("metrics", {}),
                                  seconds, data.get("command"), data.get("stderr_tail") or (_tail(err) if data.get("status") == "fail" else None)))

    failed = [r.name for r in results if r.failed or r.plan_problems]
    table_problems = plan_problems() if args.dry_run else []
    if table_problems:
        failed.append("step table")
    if args.dry_run:
        verdict = (f"dry run: plan problems in {', '.join(failed)}" if failed else
                   f"dry run: every step's plan checks out ({len(results)} steps); nothing ran on a GPU")
    else:
        verdict = f"FAILED: {', '.join(failed)}" if failed else "PASSED: every check"
    report = {
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python3", "benchmarks/gpu_check.py", *sys.argv[1:]]),
        "dry_run": bool(args.dry_run), "device": args.device, "seconds": round(time.monotonic() - started, 1),
        "host": host_info(env), "python": python, "ld_library_path": lib_dirs,
        "steps": [asdict(r) for r in results], "failed": failed, "verdict": verdict, "plan_problems": table_problems,
    }
    json_path = out_dir / "gpu_check.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(report))
    render(report, python or sys.executable, json_path)
    print(f"written: {json_path}, {out_dir / 'gpu_check.md'}, {logs}/, {work}/")
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/gpu-check", help="folder for gpu_check.json, gpu_check.md and logs/ (default: out/gpu-check)")
    ap.add_argument("--dry-run", action="store_true", help="check the plan without a GPU; run nothing on one")
    ap.add_argument("--no-install", action="store_true", help="use this interpreter's environment instead of a new venv")
    ap.add_argument("--venv", default=str(ROOT / ".venv-gpu"), help="the venv the install step creates (default: .venv-gpu)")
    ap.add_argument("--device", type=int, default=0, help="GPU index to prove (default 0)")
    ap.add_argument("--ort", default="onnxruntime-gpu[cuda,cudnn]",
                    help="what the install step asks pip for besides the project (default: onnxruntime-gpu[cuda,cudnn], "
                         "whose current releases need CUDA 13, a driver >= 580; for an older driver e.g. "
                         "'onnxruntime-gpu[cuda,cudnn]<VERSION' of a CUDA 12 build)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run; steps get what is left (default 450)")
    ap.add_argument("--heavier", type=int, default=12, help="bench_pipeline.py --heavier (default 12, as in BENCHMARKS.md)")
    ap.add_argument("--step", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--step-timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--render", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device < 0 or args.budget <= 0:
        ap.error("--device must be >= 0 and --budget > 0")
    if args.step:
        worker_main(args)
        return 0
    if args.render:
        render_rich(json.loads(Path(args.render).read_text()))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
