"""One pipeline replica, seen from its supervisor: three stage processes bound to one device.

A replica owns its plumbing (frame ring, queues, events, stop and drain flags). Restarting it
means a new incarnation: fresh ring and queues (a lock a killed process held dies with them) and
a new worker name, so a presumed-dead incarnation can never complete a job handed to another.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from heygem.channels import Aborts, Channels, Flag
from heygem.jobs import UNAVAILABLE, JobError, JobStore, host_name
from heygem.ring import FrameRing
from heygem.segments import segment_name
from heygem.stages import EXIT_FALLBACK, STAGES, StageSpec, main, slot_bytes

QUEUE_SLOTS = 4  # descriptors between stages; the ring's slots are the real bound
# After the grace: how long stages get to die of SIGTERM, then of SIGKILL. A stage does not catch
# SIGTERM, so this is the kernel's time to tear a process down; one still there is stuck in it.
SIGNAL_WAIT_S = 2.0
EVENTS_PER_POLL = 256


@dataclass
class ReplicaState:
    """What the supervisor knows of a replica, updated from its stages' events."""

    ready: set = field(default_factory=set)  # stages that opened their sessions
    sessions: dict = field(default_factory=dict)  # role -> SessionCheck dict
    fatal: Optional[dict] = None  # the last stage's fatal report
    started_at: float = 0.0


class Replica:
    """Start, watch and stop the stage processes of replica `index` on `device`."""

    def __init__(self, index: int, base: StageSpec, ring_slots: int, ctx=None, log_json: bool = True,
                 log_level: str = "info"):
        self.index = index
        self.base = base
        self.ring_slots = ring_slots
        self.ctx = ctx or multiprocessing.get_context("spawn")
        self.log_json = log_json
        self.log_level = log_level
        self.generation = 0
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.state = ReplicaState()
        self.channels: Optional[Channels] = None

    @property
    def device(self):
        return self.base.device

    @property
    def worker(self) -> str:
        """The lease holder's name: replica, incarnation, host and supervisor pid
        (`replica-0.1@gpu-07:4242`). The host tells a shared store's fleet who holds what; the
        pid keeps a new daemon's first incarnation from taking the name of a killed daemon's,
        whose jobs may still be leased to it."""
        return f"replica-{self.index}.{self.generation}@{host_name()}:{os.getpid()}"

    def start(self) -> None:
        """Spawn a new incarnation: fresh plumbing, three stage processes."""
        if self.procs:
            raise RuntimeError(f"replica {self.index} is running; stop it first")
        self.generation += 1
        ctx = self.ctx
        ring = FrameRing.create(self.ring_slots, (slot_bytes(self.base.max_width, self.base.max_height),), ctx=ctx,
                                name=segment_name("ring", f"r{self.index}", f"g{self.generation}"))
        self.channels = Channels(
            ring=ring,
            to_generate=ctx.Queue(QUEUE_SLOTS),
            to_encode=ctx.Queue(QUEUE_SLOTS),
            events=ctx.Queue(EVENTS_PER_POLL),
            stop=Flag(ctx),
            drain=Flag(ctx),
            aborts=Aborts(ctx),
        )
        spec = replace(self.base, worker=self.worker, supervisor=os.getpid())
        self.state = ReplicaState(started_at=time.time())
        for stage in STAGES:
            proc = ctx.Process(target=main, args=(stage, spec, self.channels, self.log_json, self.log_level),
                               name=f"heygem-{stage}-{self.index}", daemon=False)
            proc.start()
            self.procs[stage] = proc

    def pids(self) -> dict[str, int]:
        return {stage: p.pid for stage, p in self.procs.items() if p.pid is not None}

    def dead(self) -> dict[str, Optional[int]]:
        """Stages whose process has exited, with exit codes (the supervisor joins them)."""
        return {stage: p.exitcode for stage, p in self.procs.items() if not p.is_alive()}

    def ready(self) -> bool:
        return bool(self.procs) and self.state.ready >= set(STAGES) and not self.dead()

    def fell_back(self) -> bool:
        """True when a stage refused to serve on the CPU (fallback = "fail")."""
        return any(code == EXIT_FALLBACK for code in self.dead().values())

    def poll(self) -> list[tuple]:
        """Drain the stages' events without blocking; update what is known of the replica."""
        out = []
        if self.channels is None:
            return out
        for _ in range(EVENTS_PER_POLL):
            try:
                kind, stage, payload = self.channels.events.get_nowait()
            except queue.Empty:
                break
            if kind == "ready":
                self.state.ready.add(stage)
            elif kind == "session":
                self.state.sessions[payload["role"]] = payload
            elif kind == "fatal":
                self.state.fatal = {"stage": stage, **payload}
            out.append((kind, stage, payload))
        return out

    def drain(self) -> None:
        """Take no new job; the current one runs to its end."""
        if self.channels is not None:
            self.channels.drain.set()

    def signal_stop(self) -> None:
        """Ask every stage to leave (the stop flag) and SIGTERM it; returns at once.

        A stage does not catch SIGTERM, so a running one dies of it now; a hung one (SIGSTOPped,
        stuck in a driver call) does not, and gets `kill()` once the caller's grace has passed.
        The replica is restarted anyway, so the gentle path buys nothing here; `stop()` is the
        path that lets stages finish (the flag, then the grace, then signals)."""
        if self.channels is not None:
            self.channels.stop.set()
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()

    def kill(self) -> None:
        """SIGKILL every stage still there; returns at once."""
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()

    def gone(self) -> bool:
        """No stage process is left (is_alive() also collects the exited ones)."""
        return not any(proc.is_alive() for proc in self.procs.values())

    def collect(self, store: JobStore) -> list[int]:
        """After the stages are gone: read their last events, free the plumbing, requeue the
        jobs this incarnation still holds. Returns the requeued job ids."""
        self.poll()
        self._close_plumbing()
        self.procs = {}
        return self.requeue_held(store, "replica stopped")

    def stop(self, store: JobStore, grace_s: float) -> list[int]:
        """Stop every stage within `grace_s` (the stop flag, then SIGTERM, then SIGKILL), free
        the plumbing, and requeue the jobs this incarnation still holds. Blocks; the daemon's
        tick uses the non-blocking steps above instead. Returns the requeued job ids."""
        if self.channels is not None:
            self.channels.stop.set()
        _join(self.procs.values(), grace_s)
        for send in (self.signal_stop, self.kill):
            alive = [proc for proc in self.procs.values() if proc.is_alive()]
            send()
            _join(alive, SIGNAL_WAIT_S)
        return self.collect(store)

    def requeue_held(self, store: JobStore, reason: str) -> list[int]:
        """Jobs still running under this incarnation's name go back to the queue."""
        try:
            held = [j for j in store.list(state="running", limit=1000) if j.worker == self.worker]
        except UNAVAILABLE:
            return []  # the store is away: lease expiry requeues them once it is back
        out = []
        for job in held:
            try:
                store.requeue(job.id, f"{self.worker}: {reason}")
                out.append(job.id)
            except JobError:
                pass  # finished or requeued by someone else meanwhile
            except UNAVAILABLE:
                break  # the store is locked (by a hung writer?) or away: lease expiry requeues them later
        return out

    def _close_plumbing(self) -> None:
        ch, self.channels = self.channels, None
        if ch is None:
            return
        for q in (ch.to_generate, ch.to_encode, ch.events):
            q.cancel_join_thread()  # never block on a feeder thread whose reader is gone
            q.close()
        ch.ring.close()

    def queue_depths(self) -> dict[str, int]:
        """Items waiting at the input of `generate` and `encode` right now (the parent owns the
        queues, so this is exact, unlike a count a stage last wrote)."""
        ch = self.channels
        if ch is None:
            return {}
        return {"generate": ch.to_generate.qsize(), "encode": ch.to_encode.qsize()}

    def status(self) -> dict:
        return {
            "index": self.index,
            "device": self.device,
            "worker": self.worker,
            "generation": self.generation,
            "ready": self.ready(),
            "pids": self.pids(),
            "dead": self.dead(),
            "sessions": self.state.sessions,
            "queues": self.queue_depths(),
            "queue_capacity": QUEUE_SLOTS,
            "fatal": self.state.fatal,
            "started_at": self.state.started_at,
        }


def _join(procs, timeout_s: float) -> None:
    """Join every process against one deadline."""
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
