"""Probes: turn what the pipeline, NVML and /proc report into the plain views the rules take.

The conversions are pure functions of already-read data and `now`, so the daemon's tick is
"read everything, convert, evaluate" and each conversion is testable on a dict.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Optional

from heygem.board import TIMES
from watchdog.alerts import DiskView, GpuView, ProviderView, StageView, WorkerView

INPUT_OF = {"generate": "generate", "encode": "encode"}  # stage -> its input queue's name


def gpu_views(gpus: Iterable[dict]) -> list[GpuView]:
    """From `watchdog.gpu.to_dict(info)["gpus"]`; a GPU without a utilisation reading is left out
    (an unknown value must not look like 0 %)."""
    return [GpuView(g["index"], g["util_pct"], g["mem_used_mib"]) for g in gpus if g.get("util_pct") is not None]


def stage_views(status: dict) -> list[StageView]:
    """One view per (replica, stage) from `Pipeline.status()`: board counters plus the exact
    input-queue depths the replica's owner reads from its queues."""
    replicas = {r["index"]: r for r in status["replicas"]}
    out = []
    for row in status["stages"]:
        replica = replicas.get(row["replica"])
        if replica is None:
            continue
        device = replica["device"]
        queue = INPUT_OF.get(row["stage"])
        out.append(StageView(
            replica=row["replica"], stage=row["stage"],
            items_in=row["items_in"], items_out=row["items_out"],
            last_progress=row["progress_at"] or replica["started_at"],
            heartbeat=row["heartbeat"] or replica["started_at"],
            queue_depth=replica["queues"].get(queue, 0) if queue else 0,
            queue_capacity=replica["queue_capacity"] if queue else 0,
            gpu=device if isinstance(device, int) else None,
            state=row["state"], dropped=row.get("dropped", 0),
            times=tuple((kind, row.get(f"{kind}_s", 0.0)) for kind in TIMES),
        ))
    return out


def worker_views(status: dict, now: float) -> list[WorkerView]:
    """One view per stage process: alive or its exit code, and its heartbeat's age (or the
    replica's age while it has not beaten yet, so one stuck loading models is not exempt)."""
    beats = {(r["replica"], r["stage"]): r["heartbeat"] for r in status["stages"]}
    out = []
    for replica in status["replicas"]:
        for stage, pid in replica["pids"].items():
            beat = beats.get((replica["index"], stage)) or replica["started_at"]
            dead = stage in replica["dead"]
            out.append(WorkerView(
                name=f"replica-{replica['index']}/{stage}", pid=pid, alive=not dead,
                heartbeat_age_s=max(0.0, now - beat), exit_code=replica["dead"].get(stage),
            ))
    return out


def provider_views(status: dict) -> list[ProviderView]:
    """Per replica: every provider its sessions asked for vs those really active."""
    out = []
    for replica in status["replicas"]:
        sessions = replica["sessions"].values()
        if not sessions:
            continue
        requested = tuple(dict.fromkeys(p for s in sessions for p in s["requested"]))
        active = tuple(dict.fromkeys(p for s in sessions for p in s["active"]))
        reasons = [s["reason"] for s in sessions if s.get("fallback") and s.get("reason")]
        out.append(ProviderView(replica["index"], requested, active, reasons[0] if reasons else None))
    return out


def disk_views(paths: Iterable[Path]) -> list[DiskView]:
    out = []
    for path in paths:
        try:
            out.append(DiskView(str(path), shutil.disk_usage(path).free / 2**20))
        except OSError:
            continue
    return out


def orphans(own_pid: int, tracked: set[int], tree: Optional[dict] = None) -> list[int]:
    """Running children of the daemon that it did not start: descendants re-parented to it (the
    subreaper) after their parent died. Zombies are the reaper's, not orphans. `tree`:
    `watchdog.procs.family(own_pid)`, when read already this tick."""
    from watchdog.procs import children, family

    return [pid for pid in children(own_pid, family(own_pid) if tree is None else tree) if pid not in tracked]


def resource_tracker_pid() -> Optional[int]:
    """multiprocessing's resource tracker is our child too, and waited on by multiprocessing."""
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)
