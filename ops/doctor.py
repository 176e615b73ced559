"""`heygem-ops doctor`: is inference really on the GPUs, and if not, why and what to do.

Replaces the runbook's `python -c "import onnxruntime; print(get_available_providers())"`, which
answers yes on every host with the GPU wheel. Doctor builds a real session and reads what it runs
on, lists the CUDA libraries that do not load, the environment that hides GPUs, and the incident's
signatures (GPUs idle while holding memory, zombies). Heavy modules load inside the checks so
that `heygem-ops --help` stays fast.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import click

from ops.context import OK, PROBLEM, USAGE, console, emit_json

STYLES = {"ok": "green", "warn": "yellow", "fail": "bold red"}
REQUIREMENTS_URL = "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements"

# What a variable does to this service; prefixes cover the families.
MEANINGS = {
    "CUDA_VISIBLE_DEVICES": "GPUs CUDA may use, renumbered from 0 in the order listed; empty hides every GPU",
    "CUDA_DEVICE_ORDER": "how CUDA numbers GPUs; PCI_BUS_ID matches nvidia-smi, the default FASTEST_FIRST may not",
    "NVIDIA_VISIBLE_DEVICES": "GPUs the NVIDIA container runtime puts in this container; none/void gives none",
    "LD_LIBRARY_PATH": "folders searched first for shared libraries such as libcublasLt and libcudnn",
    "LD_PRELOAD": "libraries loaded into every process before all others",
    "OMP_NUM_THREADS": "caps OpenMP threads per process (ONNX Runtime CPU kernels, OpenCV)",
    "OMP_WAIT_POLICY": "PASSIVE lets idle OpenMP threads sleep, ACTIVE keeps them spinning on CPUs",
    "OPENBLAS_NUM_THREADS": "caps OpenBLAS threads (numpy)",
    "MKL_NUM_THREADS": "caps Intel MKL threads (numpy, ONNX Runtime builds with MKL)",
}
PREFIXES = {"ORT_": "read by ONNX Runtime", "OMP_": "an OpenMP setting", "OPENBLAS_": "an OpenBLAS setting", "MKL_": "an Intel MKL setting"}
_HIDES_ALL = {"", "-1", "none", "void", "nodevfiles"}


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    summary: str
    evidence: dict = field(default_factory=dict)
    fix: Optional[str] = None


def check_package() -> Check:
    from heygem.providers import CUDA, package_flavour

    info = package_flavour()
    if not info["installed"]:
        return Check("onnxruntime_package", "fail", "ONNX Runtime is not installed", info, "pip install onnxruntime-gpu")
    names = [d["name"] for d in info["installed"]]
    if info["conflict"]:
        return Check(
            "onnxruntime_package", "fail",
            f"{len(names)} ONNX Runtime distributions installed at once ({', '.join(names)}): they overwrite each "
            f"other's files, the import runs {info['flavour']}'s",
            info, f"pip uninstall -y {' '.join(names)} && pip install onnxruntime-gpu",
        )
    import onnxruntime

    info["available_providers"] = onnxruntime.get_available_providers()
    label = f"{info['flavour']} {info['version']}"
    if CUDA not in info["available_providers"]:
        return Check(
            "onnxruntime_package", "fail", f"{label} has no CUDA provider", info,
            f"pip uninstall -y {info['flavour']} && pip install onnxruntime-gpu",
        )
    return Check(
        "onnxruntime_package", "ok",
        f"{label}, lists {', '.join(info['available_providers'])} (a list, not a promise: see cpu_fallback)", info,
    )


def cuda_fix(missing: list[str], requires: dict[str, str]) -> str:
    """Concrete steps that make the missing libraries loadable (requires: ORT's stated versions)."""
    from heygem.cudalibs import provider_library, wheel_copies

    parts = []
    if "libcuda.so.1" in missing:
        parts.append("install the NVIDIA driver (it ships libcuda.so.1; `nvidia-smi` must list the GPUs)")
    runtime = [name for name in missing if name != "libcuda.so.1"]
    wheels = wheel_copies()
    if runtime and all(name in wheels for name in runtime):
        folders = ":".join(dict.fromkeys(os.path.dirname(wheels[name]) for name in runtime))
        parts.append(f"export LD_LIBRARY_PATH={folders}:$LD_LIBRARY_PATH (pip's NVIDIA wheels are installed, not on the loader's path)")
    elif runtime:
        provider = provider_library()
        site = provider.parents[2] if provider else "<site-packages>"
        versions = f"CUDA {requires['cuda']} and cuDNN {requires['cudnn']}" if requires else "CUDA and cuDNN"
        parts.append(
            f'pip install "onnxruntime-gpu[cuda,cudnn]" (installs {versions} runtime wheels) && '
            f"export LD_LIBRARY_PATH=$(ls -d {site}/nvidia/*/lib | paste -sd:):$LD_LIBRARY_PATH; "
            f"or install {versions} system-wide and run ldconfig"
        )
    return "; ".join(parts) or f"read ONNX Runtime's reason in the evidence and {REQUIREMENTS_URL}"


def check_cpu_fallback(model: Optional[Path], device: int) -> Check:
    """A real session asking for CUDA on `device`; ModelError propagates (a bad --model is a usage error)."""
    from heygem.providers import open_session, probe_model, required_versions

    _, check = open_session(model if model else probe_model(), device, fallback="warn")
    requires = required_versions(check.reason)
    evidence = {
        "model": str(model) if model else "built-in probe (one Conv, 1x3x32x32)",
        **check.to_dict(),
        "requires": requires,
    }
    if not check.fallback:
        return Check("cpu_fallback", "ok", f"GPU {device}: session runs on {', '.join(check.active)}", evidence)
    summary = f"GPU {device}: asked for CUDA, session runs on {', '.join(check.active)}"
    if check.missing_libraries:
        summary += f": cannot load {', '.join(check.missing_libraries)}"
    if requires:
        summary += f" (ONNX Runtime requires CUDA {requires['cuda']}, cuDNN {requires['cudnn']})"
    return Check("cpu_fallback", "fail", summary, evidence, cuda_fix(list(check.missing_libraries), requires))


def check_cuda_libraries() -> Check:
    from heygem.cudalibs import cuda_libraries, provider_library

    provider = provider_library()
    if provider is None:
        return Check("cuda_libraries", "warn", "this ONNX Runtime build has no CUDA provider library", {},
                     "pip install onnxruntime-gpu")
    libs = cuda_libraries(provider)
    missing = [lib for lib in libs if not lib["found"]]
    evidence = {
        "provider": str(provider),
        "found": {lib["name"]: lib["path"] for lib in libs if lib["found"]},
        "missing": {lib["name"]: lib["error"] for lib in missing},
        "in_pip_wheels": {lib["name"]: lib["wheel_path"] for lib in libs if lib["wheel_path"]},
    }
    if not missing:
        return Check("cuda_libraries", "ok", f"all {len(libs)} libraries of the CUDA provider load", evidence)
    names = [lib["name"] for lib in missing]
    return Check(
        "cuda_libraries", "fail", f"{len(missing)} of {len(libs)} missing: {', '.join(names)}", evidence,
        cuda_fix(names, {}),
    )


def _meaning(name: str) -> str:
    return MEANINGS.get(name) or next((m for p, m in PREFIXES.items() if name.startswith(p)), "")


def check_environment(devices) -> Check:
    names = sorted(n for n in os.environ if n in MEANINGS or n.startswith(tuple(PREFIXES)))
    evidence = {n: {"value": os.environ[n], "meaning": _meaning(n)} for n in names}
    problems, fixes = [], []
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        value = os.environ.get(name)
        if value is None:
            continue
        if value.strip().lower() in _HIDES_ALL:
            problems.append(f"{name}={value!r} hides every GPU")
            fixes.append(f"unset {name}")
        elif name == "CUDA_VISIBLE_DEVICES" and isinstance(devices, list) and max(devices) >= len(value.split(",")):
            problems.append(f"{name}={value} shows {len(value.split(','))} GPU(s), config uses GPU {max(devices)}")
            fixes.append(f"export {name}={','.join(map(str, devices))}, or unset it")
    for name in names:
        if name.endswith("_NUM_THREADS") and not re.fullmatch(r"[1-9]\d*", os.environ[name].strip()):
            problems.append(f"{name}={os.environ[name]!r} is not a positive thread count")
            fixes.append(f"export {name}=<threads per process> or unset it")
    if problems:
        return Check("environment", "warn", "; ".join(problems), evidence, "; ".join(fixes))
    shown = ", ".join(f"{n}={os.environ[n]}" for n in names if n != "LD_LIBRARY_PATH")
    return Check("environment", "ok", shown or "no CUDA/ORT/OpenMP/BLAS variables set: defaults apply", evidence)


def sample_gpus():
    """One NVML sample shared by the GPU checks: NvmlInfo, or the NvmlUnavailable explaining why not."""
    from watchdog.gpu import Nvml, NvmlUnavailable

    try:
        with Nvml() as nvml:
            return nvml.sample()
    except NvmlUnavailable as err:
        return err


def check_nvml(info) -> Check:
    from watchdog.gpu import NvmlUnavailable, to_dict

    if isinstance(info, NvmlUnavailable):
        return Check("nvml", "warn", str(info), {"error": str(info)},
                     'install the NVIDIA driver (`nvidia-smi` must work); on a CPU-only host set [pipeline] devices = "cpu"')
    gpus = "; ".join(
        f"{g.index} {g.name} {'?' if g.util_pct is None else f'{g.util_pct:.0f}'}% {g.mem_used_mib:.0f}/{g.mem_total_mib:.0f} MiB"
        for g in info.gpus
    )
    summary = f"driver {info.driver_version}, CUDA {info.cuda_driver_version or '?'}, {len(info.gpus)} GPU(s)"
    if not info.gpus:
        return Check("nvml", "warn", summary, to_dict(info), "check `nvidia-smi` and the container's GPU runtime")
    return Check("nvml", "ok", f"{summary}: {gpus}", to_dict(info))


def _holders(gpu) -> str:
    procs = [f"pid {p.pid} {p.cmdline or p.status}" + (f" {p.used_mib:.0f} MiB" if p.used_mib is not None else "") for p in gpu.processes]
    return ", ".join(procs) or "no process listed"


def check_gpu_idle_busy(info, rules) -> Check:
    from watchdog.gpu import NvmlUnavailable, idle_busy, to_dict

    if isinstance(info, NvmlUnavailable):
        return Check("gpu_idle_busy", "warn", "not checked: NVML unavailable (see nvml)")
    limits = {"util_max_pct": rules.gpu_idle_util_pct, "mem_min_mib": rules.gpu_busy_mem_mib}
    stuck = idle_busy(info.gpus, rules.gpu_idle_util_pct, rules.gpu_busy_mem_mib)
    evidence = {**limits, "gpus": to_dict(info)["gpus"]}
    if not stuck:
        return Check("gpu_idle_busy", "ok", f"no GPU holds >= {rules.gpu_busy_mem_mib:.0f} MiB while idle", evidence)
    evidence["idle_busy"] = [g.index for g in stuck]
    detail = "; ".join(f"GPU {g.index} {g.util_pct:.0f}% {g.mem_used_mib:.0f} MiB held by {_holders(g)}" for g in stuck)
    return Check(
        "gpu_idle_busy", "fail",
        f"{len(stuck)} GPU(s) at <= {rules.gpu_idle_util_pct:g}% utilisation hold >= {rules.gpu_busy_mem_mib:.0f} MiB: {detail}",
        evidence,
        "the holders above are stuck or orphaned: if they are the service's workers, `heygem-ops restart`; "
        "a zombie or gone holder frees its memory only when its parent reaps or restarts (`heygem-ops zombies`)",
    )


def check_zombies() -> Check:
    from watchdog.procs import by_parent, zombies

    groups = by_parent(zombies())
    evidence = {"groups": [g.as_dict() for g in groups]}
    if not groups:
        return Check("zombies", "ok", "no zombie processes", evidence)
    total = sum(len(g.zombies) for g in groups)
    parents = "; ".join(
        f"{len(g.zombies)} under pid {g.ppid} {g.parent_cmdline or '?'}"
        + (f" (up {g.parent_age_s:.0f} s)" if g.parent_age_s is not None else "")
        for g in groups
    )
    return Check(
        "zombies", "warn", f"{total} zombie(s): {parents}", evidence,
        "only the parent can reap them: fix or restart that parent (`heygem-ops zombies` for details); "
        "SIGCHLD and `kill -9` on zombies do nothing",
    )


# causes to name next to an effect found in the same log: (effect, causes)
LOG_CAUSES = {"queue_full": ("warmup_slow", "cpu_fallback", "gpu_oom"),
              "queue_empty": ("warmup_slow", "cpu_fallback", "gpu_oom")}


def _where(hit) -> str:
    at = f"line {hit.lineno}" + (f" [{hit.timestamp.replace('T', ' ')}]" if hit.timestamp else "")
    return at + (f" task {hit.task}" if hit.task else "")


def log_checks(path: Path, daemon) -> list[Check]:
    """Upstream's failure signatures (and `[daemon] log_patterns`) in a log, after the fact: a
    summary row, then one row per signature found, with its first and last line and the fix."""
    from watchdog.upstream_log import Reader, TaskBook, signatures

    reader, book = Reader(signatures(daemon.log_patterns, daemon.log_builtin_patterns)), TaskBook()
    found: dict[str, list] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = (line.rstrip("\r\n") for line in f)
        for entries in (reader.feed(lines), reader.flush()):
            for entry in entries:
                book.feed(entry)
                for hit in entry.hits:
                    found.setdefault(hit.alert, []).append(hit)
    tasks = book.rows()
    counts = {o: sum(t.outcome == o for t in tasks) for o in ("succeeded", "failed", "running")}
    summary = f"{path}: {reader.lineno} lines, {len(tasks)} upstream task(s)"
    if tasks:
        summary += ": " + ", ".join(f"{n} {o}" for o, n in counts.items() if n)
    if not found:
        summary += "; no failure line"
    checks = [Check("log", "ok", summary, {"file": str(path), "lines": reader.lineno, "tasks": [t.to_dict() for t in tasks]})]
    for alert, hits in found.items():
        sig, first, last = hits[0].signature, hits[0], hits[-1]
        text = f"{first.what()}. {len(hits)} line(s); first at {_where(first)}: {first.line}"
        if len(hits) > 1:
            text += f"; last at {_where(last)}"
        causes = []
        for cause in LOG_CAUSES.get(alert, ()):
            # lines before the effect: the same task's first, else the first
            before = [h for h in found.get(cause, ()) if h.lineno < last.lineno]
            hit = next((h for h in before if h.task and h.task in {x.task for x in hits}), next(iter(before), None))
            if hit is not None:
                causes.append(f"{cause} at {_where(hit)}" + (f" ({hit.value:g} s)" if hit.value is not None else ""))
        if causes:
            text += "; earlier in this log, the likely causes: " + ", ".join(causes)
        checks.append(Check(
            alert, "fail" if sig.failure else "warn", text,
            {"count": len(hits), "tasks": sorted({h.task for h in hits if h.task}), "first": first.evidence(),
             "last": last.evidence()},
            sig.fix_text(),
        ))
    return checks


def _guarded(name: str, run: Callable[[], Check]) -> Check:
    """One broken check must not hide the others: its error becomes its row."""
    from heygem.providers import ModelError

    try:
        return run()
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - reported, with its type, as this check's failure
        return Check(name, "fail", f"check could not run: {type(err).__name__}: {err}", {"error": repr(err)})


def run_checks(config, model: Optional[Path], device: int) -> list[Check]:
    """All checks in order; the session check runs before anything loads CUDA libraries itself."""
    checks = [
        _guarded("onnxruntime_package", check_package),
        _guarded("cpu_fallback", lambda: check_cpu_fallback(model, device)),
        _guarded("cuda_libraries", check_cuda_libraries),
        _guarded("environment", lambda: check_environment(config.pipeline.devices)),
    ]
    info = sample_gpus()
    checks += [
        _guarded("nvml", lambda: check_nvml(info)),
        _guarded("gpu_idle_busy", lambda: check_gpu_idle_busy(info, config.rules)),
        _guarded("zombies", check_zombies),
    ]
    return checks


def render(checks: list[Check], title: str = "heygem-ops doctor") -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("summary / fix", overflow="fold")
    for c in checks:
        text = Text(c.summary)
        if c.fix and c.status != "ok":
            text.append("\nfix: ", style="bold")
            text.append(c.fix)
        table.add_row(Text(c.name), Text(c.status, style=STYLES[c.status]), text)
    out = console()
    out.print(table)
    counts = {s: sum(c.status == s for c in checks) for s in STYLES}
    out.print(", ".join(f"{n} {s}" for s, n in counts.items()))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option("--model", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="ONNX model to build the session from (default: a tiny built-in Conv model).")
@click.option("--device", type=click.IntRange(min=0),
              help="GPU index to ask CUDA for (default: the first of [pipeline] devices, or 0).")
@click.option("--log", "log", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Instead: read this log after the fact (upstream's log/dh.log, or ours) for upstream's "
              "failure lines and say what each means and how to fix it.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, model: Optional[Path], device: Optional[int], log: Optional[Path]) -> None:
    """Check that inference really runs on the GPUs; say why not and how to fix it.

    Builds a real ONNX Runtime session asking for CUDA and compares what it runs on, lists CUDA
    libraries that do not load, environment variables that hide GPUs, GPUs idle while holding
    memory, and zombies. With --log, reads a log instead: one row per failure signature found
    (queue full, queue.Empty, CPU fallback, GPU out of memory, failed task, slow warm-up), with
    its line and the fix. Exit 0: no failure; 1: a check failed or a failure line was found;
    2: bad config, --model or --log.

    \b
    Examples:
      heygem-ops doctor
      heygem-ops doctor --json --device 3
      heygem-ops doctor --model /models/dinet.onnx
      heygem-ops doctor --log ~/heygem_data/face2face/log/dh.log
    """
    from heygem.providers import ModelError

    config = ctx.obj.config
    if log is not None:
        try:
            checks = log_checks(log, config.daemon)
        except OSError as err:
            click.echo(f"error: cannot read {log}: {err.strerror}", err=True)
            ctx.exit(USAGE)
        failed = any(c.status == "fail" for c in checks)
        if as_json:
            emit_json({"checks": [asdict(c) for c in checks], "ok": not failed})
        else:
            render(checks, f"heygem-ops doctor --log {log}")
        ctx.exit(PROBLEM if failed else OK)
    if device is None:
        devices = config.pipeline.devices
        device = devices[0] if isinstance(devices, list) else 0
    try:
        checks = run_checks(config, model, device)
    except ModelError as err:
        click.echo(f"error: {err}", err=True)
        ctx.exit(USAGE)
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        emit_json({"checks": [asdict(c) for c in checks], "ok": not failed})
    else:
        render(checks)
    ctx.exit(PROBLEM if failed else OK)
