"""The pipeline: one replica per configured device, a job store, a stage board.

This is the interface the daemon (and `heygem-ops demo`) drives. It decides nothing on its own
about restarts: it reports (`poll`, `status`, the board) and obeys (`restart`, `stop`).

    pipeline = Pipeline(config.pipeline, store, models_dir=state / "models")
    pipeline.start()                      # models checked before any process is spawned
    while serving:
        for event in pipeline.poll(): ...     # ("ready" | "session" | "fatal" | "job", ...)
        pipeline.status()                     # replicas, sessions, stage rows, job counts
    pipeline.stop(grace_s=20)             # drain, then stop; unfinished jobs are requeued
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from heygem import segments
from heygem.board import Board
from heygem.config import PipelineConfig
from heygem.jobs import UNAVAILABLE, JobStore
from heygem.replica import Replica
from heygem.stages import STAGES, StageSpec
from heygem.video import Encoding


def resolve_models(config: PipelineConfig, models_dir: Path) -> dict[str, str]:
    """Model path per role: the configured ones, checked against their contract; the demo
    models (built on first use) for any role left unset. Raises ModelError naming the file."""
    from heygem.models import build_demo_models, check_model
    from heygem.providers import ModelError

    configured = config.models.model_dump()
    if all(configured[r] for r in ("audio_encoder", "generator")):
        paths = {role: p for role, p in configured.items() if p}
    else:
        demo = build_demo_models(models_dir)
        paths = {role: configured.get(role) or demo[role] for role in demo}
        if config.face_box is not None and not configured.get("detector"):
            paths.pop("detector", None)  # a configured fixed box replaces the demo detector
    for role, path in paths.items():
        try:
            check_model(path, role)
        except ModelError as err:  # name the config key, so the operator knows what to edit
            raise ModelError(f"[pipeline.models] {role}: {err}" if configured.get(role) else str(err)) from None
    return {role: str(p) for role, p in paths.items()}


def usable_cores() -> int:
    """The cores this process may run on: its affinity (a cpuset, systemd's CPUAffinity=), which
    sizes thread pools better than the host's core count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Pipeline:
    def __init__(self, config: PipelineConfig, store: JobStore, models_dir: Path,
                 output_dir: Optional[Path] = None, log_json: bool = True, log_level: str = "info"):
        self.config = config
        self.store = store
        self.models_dir = Path(models_dir)
        self.output_dir = Path(output_dir) if output_dir else self.models_dir.parent / "outputs"
        self.log_json = log_json
        self.log_level = log_level
        self.board: Optional[Board] = None
        self.replicas: list[Replica] = []
        self.models: dict[str, str] = {}
        self.swept: list[str] = []  # segments of dead supervisors that start() unlinked

    @property
    def devices(self) -> list:
        if self.config.devices == "cpu":
            return ["cpu"] * self.config.cpu_replicas
        return list(self.config.devices)

    def cpu_threads(self, replicas: int) -> int:
        """The generator's intra-op threads in a CPU replica: configured, or the cores shared."""
        return self.config.cpu_threads or max(1, usable_cores() // replicas)

    def encoding(self, devices: list) -> Encoding:
        """The outputs' H.264. x264's threads per job: configured, or the cores that the CPU
        replicas' generators leave, shared among the replicas (at least one). x264's own choice
        sizes itself to the whole host: on 2 cores beside a CPU generator, 3 frame threads and a
        lookahead thread that preempted the generator and cost 7 % more CPU per frame than one
        thread (BENCHMARKS.md, issue 16)."""
        cpu = devices.count("cpu")
        left = usable_cores() - (cpu * self.cpu_threads(cpu) if cpu else 0)
        threads = self.config.encoder_threads or max(1, left // len(devices))
        return Encoding(self.config.encoder_preset, self.config.encoder_crf, threads)

    def start(self) -> None:
        """Check the models, free what dead supervisors left in /dev/shm, create the board, spawn
        every replica."""
        self.models = resolve_models(self.config, self.models_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.swept = segments.sweep()
        devices = self.devices
        encoding = self.encoding(devices)
        self.board = Board.create(segments.segment_name("board"), len(devices), STAGES)
        for index, device in enumerate(devices):
            base = StageSpec(
                replica=index, device=device, worker="", store=self.store, board_name=self.board.name,
                models=self.models, fallback=self.config.fallback, batch_size=self.config.batch_size,
                lease_s=self.config.lease_s, max_width=self.config.max_width, max_height=self.config.max_height,
                face_box=self.config.face_box, output_dir=str(self.output_dir),
                threads=self.cpu_threads(len(devices)) if device == "cpu" else None, encoding=encoding,
            )
            replica = Replica(index, base, self.config.ring_slots, log_json=self.log_json, log_level=self.log_level)
            replica.start()
            self.replicas.append(replica)

    def poll(self) -> list[tuple]:
        """Events of every replica since the last poll: (replica, kind, stage, payload)."""
        return [(r.index, *event) for r in self.replicas for event in r.poll()]

    def ready(self) -> bool:
        return bool(self.replicas) and all(r.ready() for r in self.replicas)

    def restart(self, index: int, grace_s: float) -> list[int]:
        """Stop replica `index` (its held jobs go back to the queue) and start a new incarnation.
        Blocks for the stop; the daemon drives `collect` and `start_replica` step by step."""
        requeued = self.replicas[index].stop(self.store, grace_s)
        self.start_replica(index)
        return requeued

    def collect(self, index: int) -> list[int]:
        """Replica `index` has no process left: free its plumbing, requeue its held jobs."""
        return self.replicas[index].collect(self.store)

    def start_replica(self, index: int) -> None:
        """A new incarnation of replica `index` (returns at once; it reports ready later). Its
        rows start clean now, not when each stage gets to it: what the last incarnation held
        must not read as a stall of the new one."""
        for stage in STAGES:
            self.board.row(index, stage).start(pid=0)
        self.replicas[index].start()

    def stop(self, grace_s: float) -> list[int]:
        """Drain (no new jobs; running ones may finish) within `grace_s`, then stop everything.
        Jobs still unfinished are requeued, so nothing is lost. Returns their ids."""
        deadline = time.monotonic() + grace_s
        for replica in self.replicas:
            replica.drain()
        workers = {r.worker for r in self.replicas}
        while time.monotonic() < deadline:
            try:
                if not any(j.worker in workers for j in self.store.list(state="running", limit=1000)):
                    break
            except UNAVAILABLE:  # the store is away: the stages finish what they can; leases keep the rest
                pass
            time.sleep(0.1)
        requeued = []
        for replica in self.replicas:
            requeued += replica.stop(self.store, max(1.0, deadline - time.monotonic()))
        self.replicas = []
        if self.board is not None:
            self.board.close()
            self.board = None
        return requeued

    def status(self, jobs: bool = True) -> dict:
        """What the daemon samples; `jobs=False` leaves out the job counts (the daemon reads the
        store itself, and rides out its outages)."""
        return {
            "devices": self.devices,
            "models": self.models,
            "board": self.board.name if self.board else None,
            "replicas": [r.status() for r in self.replicas],
            "stages": self.board.snapshot() if self.board else [],
            "jobs": self.store.counts() if jobs else None,
        }
