"""The supervised units as the supervisor's actions see them: a pipeline replica, or the external
command. Each carries out START, TERM, KILL and COLLECT without waiting, and answers what an
`Observation` needs. Nothing here decides: `watchdog.supervisor` does.
"""

from __future__ import annotations

from typing import Optional

from watchdog.supervisor import COLLECT, KILL, START, TERM, Observation

EXTERNAL = "external"
# Log events per action: `<kind>_stopping`, `<kind>_killed`, `<kind>_stopped`, `<kind>_restarted`.
EVENTS = {TERM: "stopping", KILL: "killed", COLLECT: "stopped", START: "restarted"}


def replica_name(index: int) -> str:
    """The one key format of a replica (alerts, metrics, snapshot): `replica-<index>`."""
    return f"replica-{index}"


class ReplicaUnit:
    """Replica `index` of a `heygem.pipeline.Pipeline`."""

    def __init__(self, pipeline, index: int):
        self.pipeline = pipeline
        self.index = index
        self.name = replica_name(index)
        self.kind = "replica"
        self.fields = {"replica": index}

    @property
    def replica(self):
        return self.pipeline.replicas[self.index]

    def observe(self, faults: tuple[str, ...]) -> Observation:
        r = self.replica
        refuses = 'sessions not on the requested provider and fallback = "fail"' if r.fell_back() else None
        return Observation(ready=r.ready(), gone=r.gone(), faults=faults, refuses=refuses)

    def pids(self) -> set[int]:
        return set(self.replica.pids().values())

    def carry_out(self, kind: str) -> tuple[str, dict]:
        """Do one action; returns what was done (for the alert's `action`) and log fields."""
        r = self.replica
        if kind == TERM:
            r.signal_stop()
            return f"stopping replica {self.index} (stop flag and SIGTERM)", {}
        if kind == KILL:
            r.kill()
            return f"killed replica {self.index} (SIGKILL: it outlived the grace)", {}
        if kind == COLLECT:
            requeued = self.pipeline.collect(self.index)
            return f"replica {self.index} stopped; requeued jobs {requeued}", {"requeued": requeued}
        if kind == START:
            self.pipeline.start_replica(self.index)
            return f"restarted replica {self.index} (generation {r.generation})", {"generation": r.generation}
        raise ValueError(kind)


class ExternalUnit:
    """The external command (`watchdog.external.External`)."""

    name = kind = EXTERNAL

    def __init__(self, external):
        self.external = external
        self.fields: dict = {}

    def observe(self, faults: tuple[str, ...], ready: Optional[bool] = None) -> Observation:
        running = self.external.exit_code() is None
        return Observation(ready=running if ready is None else ready, gone=self.external.gone(), faults=faults)

    def pids(self) -> set[int]:
        return {self.external.pid} if self.external.pid else set()

    def carry_out(self, kind: str) -> tuple[str, dict]:
        ext = self.external
        if kind == TERM:
            return f"stopping the command (SIGTERM to {ext.signal_stop()} processes of its tree)", {"pid": ext.pid}
        if kind == KILL:
            return f"killed the command (SIGKILL to {ext.kill()} processes that outlived the grace)", {"pid": ext.pid}
        if kind == COLLECT:
            return f"the command exited with code {ext.exit_code()}", {"pid": ext.pid, "code": ext.exit_code()}
        if kind == START:
            ext.start()
            return f"restarted the command as pid {ext.pid}", {"pid": ext.pid}
        raise ValueError(kind)
