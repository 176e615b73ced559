"""The daemon's files in its state directory, and how other processes read them.

    jobs.sqlite3     the job store (heygem.jobs), shared by daemon, replicas and CLI
    snapshot.json    the daemon's view after each tick, atomically replaced (schema below)
    daemon.json      the pidfile: pid, start time (clock ticks), HTTP address, started; gone on clean exit
    daemon.log       the daemon's JSON log lines when started by `heygem-ops start` (not systemd)
    outputs/         finished videos of jobs submitted without an output path
    models/          demo models, built on first use when no model paths are configured

Snapshot (version 1): `time`, `pid`, `mode`, `ready`, `tick`, `tick_s`, `http`, `gpus` (list of
`watchdog.gpu.to_dict` GPUs, or null with `gpu_error`), `replicas` (heygem.replica status),
`stages` (board rows), `jobs` (count by state), `zombies` (groups), `alerts` (firing alert
fields), `restarts` (per replica), `config` (the file it runs with), `front` (external mode with
`upstream_url`: `watchdog.front.Front.view()`, upstream's readiness, held and waiting tasks, learned pace; else null).
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
    """What the pidfile says of the running daemon: enough to signal it safely.

    The identity is the kernel's start time in clock ticks (`watchdog.procs`), which no clock step
    changes. A pidfile written by an earlier version has only psutil's `create_time` float; it is
    read as `legacy`: converted to ticks with the boot time as the kernel states it now, and
    matched within a second (a clock stepped since that daemon started can make it look stale:
    `heygem-ops restart` writes a new pidfile). `owner` is the uid that owns the pidfile.
    """

    pid: int
    start_ticks: int
    http: Optional[str]
    started: float
    legacy: bool = False
    owner: Optional[int] = None

    def alive(self) -> bool:
        """Same pid AND same start time: a reused pid is not our daemon."""
        return self.ref() is not None

    def ref(self):
        """The live daemon as a watchdog.procs.ProcRef (its real start ticks), or None."""
        from watchdog.procs import LEGACY_SLACK_TICKS, ProcRef, start_ticks

        ticks = start_ticks(self.pid)
        if ticks is None:
            return None
        if ticks == self.start_ticks or (self.legacy and abs(ticks - self.start_ticks) <= LEGACY_SLACK_TICKS):
            return ProcRef(self.pid, ticks)
        return None

    def untrusted(self) -> Optional[str]:
        """Why the process this pidfile names must not be signalled on its word, or None.

        The daemon writes its own pidfile, so its owner is the daemon's user (or root). A pidfile
        owned by anyone else may name any process: refused (most of all when root runs `stop`)."""
        from watchdog.procs import real_uid

        if self.owner is None or self.owner == 0:
            return None
        uid = real_uid(self.pid)
        if uid is None or uid == self.owner:
            return None
        return (f"the pidfile is owned by uid {self.owner}, but pid {self.pid} runs as uid {uid}: "
                "a pidfile the daemon's own user did not write is not trusted; nothing was signalled")


def write_pidfile(paths: StatePaths, http: Optional[str]) -> DaemonRecord:
    import psutil

    from watchdog.procs import start_ticks

    pid = os.getpid()
    record = DaemonRecord(pid, start_ticks(pid), http, time.time())
    # create_time too: what earlier versions of the CLI read (they compare it with psutil's).
    write_json(paths.pidfile, {"pid": pid, "start_ticks": record.start_ticks, "create_time": psutil.Process().create_time(),
                               "http": http, "started": record.started})
    return record


def read_pidfile(paths: StatePaths) -> Optional[DaemonRecord]:
    data = read_json(paths.pidfile)
    if not data:
        return None
    try:
        owner = os.stat(paths.pidfile).st_uid
    except OSError:
        owner = None
    try:
        pid, http, started = int(data["pid"]), data.get("http"), float(data["started"])
        if "start_ticks" in data:
            return DaemonRecord(pid, int(data["start_ticks"]), http, started, owner=owner)
        from watchdog.procs import ticks_of_create_time

        return DaemonRecord(pid, ticks_of_create_time(float(data["create_time"])), http, started, legacy=True, owner=owner)
    except (KeyError, TypeError, ValueError, OSError):
        return None
