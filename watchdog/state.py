"""The daemon's files in its state directory, and how other processes read them.

    jobs.sqlite3     the job store (heygem.jobs), shared by daemon, replicas and CLI
    snapshot.json    the daemon's view after each tick, atomically replaced (schema below)
    daemon.json      the pidfile: pid, create time, HTTP address, started; gone on clean exit
    daemon.log       the daemon's JSON log lines when started by `heygem-ops start` (not systemd)
    outputs/         finished videos of jobs submitted without an output path
    models/          demo models, built on first use when no model paths are configured

Snapshot (version 1): `time`, `pid`, `mode`, `ready`, `tick`, `tick_s`, `http`, `gpus` (list of
`watchdog.gpu.to_dict` GPUs, or null with `gpu_error`), `replicas` (heygem.replica status),
`stages` (board rows), `jobs` (count by state), `zombies` (groups), `alerts` (firing alert
fields), `restarts` (per replica), `config` (the file it runs with).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def store(self) -> Path:
        return self.root / "jobs.sqlite3"

    @property
    def snapshot(self) -> Path:
        return self.root / "snapshot.json"

    @property
    def pidfile(self) -> Path:
        return self.root / "daemon.json"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def models(self) -> Path:
        return self.root / "models"


def write_json(path: Path, data: dict) -> None:
    """Replace `path` atomically (temp file + rename), so a reader never sees half a document.

    The temp file is made by mkstemp (O_EXCL, a random name, mode 0600): a name planted
    beforehand, or a symlink, is never followed. One `json.dumps` (the C encoder) and one write:
    `json.dump` to a file encodes piece by piece, several times slower."""
    import tempfile

    text = json.dumps(data, ensure_ascii=False, default=str).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Optional[dict]:
    """The document, or None when it does not exist or is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


@dataclass(frozen=True)
class DaemonRecord:
    """What the pidfile says of the running daemon: enough to signal it safely."""

    pid: int
    create_time: float
    http: Optional[str]
    started: float

    def alive(self) -> bool:
        """Same pid AND same create time: a reused pid is not our daemon."""
        from watchdog.procs import ProcRef

        return ProcRef(self.pid, self.create_time).matches()


def write_pidfile(paths: StatePaths, http: Optional[str]) -> DaemonRecord:
    import psutil

    me = psutil.Process()
    record = DaemonRecord(me.pid, me.create_time(), http, time.time())
    write_json(paths.pidfile, record.__dict__)
    return record


def read_pidfile(paths: StatePaths) -> Optional[DaemonRecord]:
    data = read_json(paths.pidfile)
    if not data:
        return None
    try:
        return DaemonRecord(int(data["pid"]), float(data["create_time"]), data.get("http"), float(data["started"]))
    except (KeyError, TypeError, ValueError):
        return None
