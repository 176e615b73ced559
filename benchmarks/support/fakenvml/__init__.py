"""A fake libnvidia-ml.so.1 for machines without an NVIDIA driver.

pynvml dlopens "libnvidia-ml.so.1" and looks functions up by name, so a small C library with the
same symbols, found through LD_LIBRARY_PATH of a *new* process (the loader reads it at start),
lets tests and benchmarks run the real bindings end to end. Values come from a text file that
the library re-reads on every call; `write_values` writes it (format: fake_nvml.c).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("fake_nvml.c")
MIB = 1024 * 1024


@dataclass
class FakeGpu:
    """One GPU as the fake driver reports it; None makes that query return NOT_SUPPORTED."""

    name: str = "NVIDIA A100-SXM4-80GB"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    util_pct: Optional[int] = 0
    mem_used_mib: int = 0
    mem_total_mib: int = 81920
    temperature_c: Optional[int] = 34
    power_w: Optional[int] = 62
    compute: list[tuple[int, Optional[int]]] = field(default_factory=list)  # (pid, MiB or None)
    graphics: list[tuple[int, Optional[int]]] = field(default_factory=list)


def build_library(dest: Path) -> Path:
    """Compile fake_nvml.c into dest/libnvidia-ml.so.1; return dest, the LD_LIBRARY_PATH entry."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(dest / "libnvidia-ml.so.1"), str(SOURCE)],
        check=True, capture_output=True, text=True, timeout=120,
    )
    return dest


def _na(value: Optional[int]) -> str:
    return "NA" if value is None else str(value)


def write_values(path: Path, gpus: list[FakeGpu], driver: str = "550.54.15", cuda: Optional[int] = 12040) -> None:
    """Write the values file; the library reads it afresh on every call, so rewriting is live."""
    lines = [f"driver {driver}"]
    if cuda is not None:
        lines.append(f"cuda {cuda}")
    for g in gpus:
        power_mw = None if g.power_w is None else g.power_w * 1000
        lines.append(
            f"gpu {_na(g.util_pct)} {g.mem_used_mib * MIB} {g.mem_total_mib * MIB} {_na(g.temperature_c)} "
            f"{_na(power_mw)} {g.uuid} {g.name}"
        )
    for index, g in enumerate(gpus):
        for kind, procs in (("c", g.compute), ("g", g.graphics)):
            lines += [f"proc {index} {kind} {pid} {_na(None if mib is None else mib * MIB)}" for pid, mib in procs]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def fake_env(lib_dir: Path, values: Path) -> dict[str, str]:
    """Environment for a subprocess that should load the fake library with these values."""
    return {"LD_LIBRARY_PATH": str(lib_dir), "FAKE_NVML_FILE": str(values)}
