"""The durable job store: every job is on disk before `submit` returns, and never done twice.

Upstream kept jobs in process memory and queues; a dead worker took its job with it. Here a job
is a row in SQLite (WAL journal, `synchronous=FULL`), shared by every process of the service
(the daemon's HTTP thread, replica workers, the CLI). Each process and thread gets its own
connection (opened lazily, reopened after a fork), so one `JobStore` may be handed to spawned
children: it pickles as its path.

Life of a job (the pure table `TRANSITIONS`, checked by `transition` on every change)::

    queued --claim--> running --succeed--> succeeded
      |                 |  \\--fail------> failed
      |                 |   \\--cancel---> cancelled
      |                 \\--requeue--> queued       (lease expired / worker died, attempts left)
      \\--cancel--> cancelled

A worker `claim`s the oldest queued job and holds a lease until `lease_until`; it must `renew`
before the lease ends (a stage heartbeat is a good moment). `expire_leases` (the daemon's tick)
and `requeue` (the daemon saw the worker die) put a job back in the queue, or fail it with the
reason once `attempts >= max_attempts`, so a poison job cannot crash-loop the service.

Worker calls (`renew`, `progress`, `succeed`, `fail`) name the worker. When that worker no longer
holds the job (its lease expired and the job was requeued or claimed by another, or the job was
cancelled) they raise `LeaseLost`: the worker must drop the job and clean up, never report it.
That is what makes "never completed twice" hold. Workers poll `cancelled(job_id)` between batches
to stop early.

Progress (percent) and stage, as the replica's stages report them: 0 `queued` / `claimed`, 10
`features` (inputs read, audio features under way), 20 `frames` (frames flowing; from 20 to 89
the share of frames encoded), 90 `mux`, 100 `done`. Progress of one claim never goes down.

Every name in a job's `output` path (the file's, and each folder's) must fit `NAME_MAX` bytes, the
file-name limit of Linux file systems, counted in bytes, not characters (a CJK character is 3
bytes in UTF-8): `submit` refuses a longer one (`OutputNameTooLong`) rather than let the job fail
when the encoder opens the file.

Times are `time.time()` seconds unless a `now` is passed (tests drive a pure clock).
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

TRANSITIONS: dict[tuple[str, str], str] = {
    ("queued", "claim"): "running",
    ("queued", "cancel"): "cancelled",
    ("running", "requeue"): "queued",
    ("running", "succeed"): "succeeded",
    ("running", "fail"): "failed",
    ("running", "cancel"): "cancelled",
}

# Bytes in one file name (NAME_MAX of ext4, xfs, btrfs, tmpfs and most Linux file systems).
NAME_MAX = 255

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    code        TEXT NOT NULL UNIQUE,
    audio       TEXT NOT NULL,
    video       TEXT NOT NULL,
    output      TEXT,
    state       TEXT NOT NULL CHECK (state IN ('queued','running','succeeded','failed','cancelled')),
    progress    INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    stage       TEXT NOT NULL DEFAULT 'queued',
    attempts    INTEGER NOT NULL DEFAULT 0,
    worker      TEXT,
    lease_until REAL,
    reason      TEXT,
    result      TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
"""


class JobError(Exception):
    """Base of the store's errors."""


class IllegalTransition(JobError):
    """An event that the job's current state does not allow (e.g. claiming a finished job)."""


class JobNotFound(JobError):
    """No job with that id."""


class DuplicateCode(JobError):
    """A job with this client code exists already (upstream clients use the code as task id)."""


class LeaseLost(JobError):
    """The worker no longer holds the job: it must drop it without reporting a result."""


class OutputNameTooLong(JobError, ValueError):
    """A name in the output's path is over `NAME_MAX` bytes: no file system here could create it."""


def check_output_name(output: Union[str, Path]) -> None:
    """`OutputNameTooLong` if the file name of `output`, or a folder name on its path, does not
    fit `NAME_MAX` bytes."""
    path = Path(output)
    for part in (path.name, *path.parent.parts):
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            what = "its file name" if part == path.name else f"the folder name {part[:16]}..."
            raise OutputNameTooLong(
                f"output {output}: {what} is {size} bytes ({len(part)} characters); a file name holds at most"
                f" {NAME_MAX} bytes"
            )


def transition(state: str, event: str) -> str:
    """The state after `event`, or `IllegalTransition`. Pure: the whole life cycle in one table."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"cannot {event} a job that is {state}") from None


@dataclasses.dataclass(frozen=True)
class Job:
    id: int
    code: str
    audio: str
    video: str
    output: Optional[str]
    state: str
    progress: int
    stage: str
    attempts: int
    worker: Optional[str]
    lease_until: Optional[float]
    reason: Optional[str]
    result: Optional[str]
    created_at: float
    updated_at: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SELECT = f"SELECT {', '.join(f.name for f in dataclasses.fields(Job))} FROM jobs"


class JobStore:
    """Jobs in one SQLite file; safe from many processes and threads at once.

    `busy_timeout_s` bounds how long a writer waits for another writer's transaction; writes are
    short single-row transactions, so contention costs milliseconds. `max_attempts` is the default
    for `requeue` and `expire_leases`.
    """

    def __init__(self, path: Union[str, Path], max_attempts: int = 3, busy_timeout_s: float = 10.0):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JobError(f"{self.path}: job store schema {version} is newer than this program ({SCHEMA_VERSION})")
            for statement in _SCHEMA.split(";"):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # pickling: a store travels to spawned children as its settings; connections are per process
    def __getstate__(self) -> dict:
        return {"path": self.path, "max_attempts": self.max_attempts, "busy_timeout_s": self.busy_timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        """This thread's connection; a connection inherited through fork is never reused."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise JobError(f"{self.path}: cannot switch the job store to WAL (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their thread or process ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the write lock up front, so read-then-write is atomic."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ---- reads -------------------------------------------------------------------------------

    def get(self, job_id: int) -> Optional[Job]:
        row = self._db().execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def by_code(self, code: str) -> Optional[Job]:
        row = self._db().execute(f"{_SELECT} WHERE code = ?", (code,)).fetchone()
        return Job(*row) if row else None

    def list(self, state: Optional[str] = None, limit: int = 100) -> list[Job]:
        """Newest first, optionally only jobs in `state`."""
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        rows = self._db().execute(f"{_SELECT} {where} ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Job(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per state, every state present (0 when none)."""
        found = dict(self._db().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {s: found.get(s, 0) for s in STATES}

    def cancelled(self, job_id: int) -> bool:
        """Cheap poll for workers between batches: has someone cancelled this job?"""
        row = self._db().execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and row[0] == "cancelled"

    # ---- writes ------------------------------------------------------------------------------

    def submit(
        self, audio: str, video: str, output: Optional[str] = None, code: Optional[str] = None,
        *, now: Optional[float] = None,
    ) -> Job:
        """Queue a job; it is committed to disk when this returns. `code` defaults to a UUID.

        `OutputNameTooLong` when `output`'s file name does not fit `NAME_MAX` bytes."""
        if not audio or not video:
            raise ValueError("a job needs both an audio and a video")
        if output is not None:
            check_output_name(output)
        now = time.time() if now is None else now
        code = code or uuid.uuid4().hex
        try:
            with self._tx() as db:
                cur = db.execute(
                    "INSERT INTO jobs (code, audio, video, output, state, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                    (code, str(audio), str(video), None if output is None else str(output), now, now),
                )
                job_id = cur.lastrowid
        except sqlite3.IntegrityError:
            raise DuplicateCode(f"a job with code {code!r} exists already") from None
        return self.get(job_id)

    def claim(self, worker: str, lease_s: float, now: Optional[float] = None) -> Optional[Job]:
        """Take the oldest queued job for `worker` (attempts + 1, leased until now + lease_s).

        Idle workers call this many times a second: a plain read answers "nothing queued"
        without taking the write lock that submissions and lease renewals need.
        """
        now = time.time() if now is None else now
        if self._db().execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone() is None:
            return None
        with self._tx() as db:
            row = db.execute(f"{_SELECT} WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            job = Job(*row)
            state = transition(job.state, "claim")
            db.execute(
                "UPDATE jobs SET state = ?, worker = ?, lease_until = ?, attempts = attempts + 1,"
                " progress = 0, stage = 'claimed', updated_at = ? WHERE id = ?",
                (state, worker, now + lease_s, now, job.id),
            )
            return self._row(db, job.id)

    def _held(self, db: sqlite3.Connection, job_id: int, worker: str) -> Job:
        """The job, if `worker` still holds it; else `LeaseLost` naming who or what took it."""
        job = self._row(db, job_id)
        if job.state != "running" or job.worker != worker:
            holder = f" by {job.worker}" if job.state == "running" else ""
            raise LeaseLost(f"job {job_id} is {job.state}{holder}, no longer held by {worker}")
        return job

    def _row(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id}")
        return Job(*row)

    def renew(self, job_id: int, worker: str, lease_s: float, now: Optional[float] = None) -> None:
        """Extend the lease; `LeaseLost` when the worker no longer holds the job."""
        now = time.time() if now is None else now
        with self._tx() as db:
            self._held(db, job_id, worker)
            db.execute(
                "UPDATE jobs SET lease_until = ?, updated_at = ? WHERE id = ?", (now + lease_s, now, job_id)
            )

    def progress(
        self, job_id: int, worker: str, pct: int, stage: str, lease_s: Optional[float] = None,
        now: Optional[float] = None,
    ) -> None:
        """Record progress (never lower than before) and the stage; optionally renew the lease."""
        if not 0 <= pct <= 100:
            raise ValueError(f"progress is a percentage, got {pct}")
        now = time.time() if now is None else now
        with self._tx() as db:
            job = self._held(db, job_id, worker)
            lease = job.lease_until if lease_s is None else now + lease_s
            db.execute(
                "UPDATE jobs SET progress = MAX(progress, ?), stage = ?, lease_until = ?, updated_at = ?"
                " WHERE id = ?",
                (int(pct), stage, lease, now, job_id),
            )

    def _finish(self, job_id: int, worker: str, event: str, now: Optional[float], **fields) -> Job:
        now = time.time() if now is None else now
        with self._tx() as db:
            job = self._held(db, job_id, worker)
            state = transition(job.state, event)
            sets = ", ".join(f"{k} = ?" for k in fields)
            db.execute(
                f"UPDATE jobs SET state = ?, lease_until = NULL, updated_at = ?, {sets} WHERE id = ?",
                (state, now, *fields.values(), job_id),
            )
            return self._row(db, job_id)

    def succeed(self, job_id: int, worker: str, result_path: str, now: Optional[float] = None) -> Job:
        """Mark done with the output file; `LeaseLost` if the worker no longer holds the job."""
        return self._finish(job_id, worker, "succeed", now, result=str(result_path), progress=100, stage="done")

    def fail(self, job_id: int, worker: str, reason: str, now: Optional[float] = None) -> Job:
        """Mark failed with the stage's reason; `LeaseLost` if the worker no longer holds the job."""
        return self._finish(job_id, worker, "fail", now, reason=reason)

    def cancel(self, job_id: int, now: Optional[float] = None) -> bool:
        """Cancel a queued or running job. False when it had already finished."""
        now = time.time() if now is None else now
        with self._tx() as db:
            job = self._row(db, job_id)
            if job.state in TERMINAL:
                return False
            state = transition(job.state, "cancel")
            db.execute(
                "UPDATE jobs SET state = ?, lease_until = NULL, reason = 'cancelled', updated_at = ?"
                " WHERE id = ?",
                (state, now, job_id),
            )
            return True

    def _release(self, db: sqlite3.Connection, job: Job, reason: str, max_attempts: int, now: float) -> Job:
        """Back to the queue, or failed once its attempts are used up."""
        if job.attempts >= max_attempts:
            state = transition(job.state, "fail")
            reason = f"{reason} (gave up after {job.attempts} attempts)"
            db.execute(
                "UPDATE jobs SET state = ?, lease_until = NULL, reason = ?, updated_at = ? WHERE id = ?",
                (state, reason, now, job.id),
            )
        else:
            state = transition(job.state, "requeue")
            db.execute(
                "UPDATE jobs SET state = ?, worker = NULL, lease_until = NULL, progress = 0,"
                " stage = 'queued', reason = ?, updated_at = ? WHERE id = ?",
                (state, reason, now, job.id),
            )
        return self._row(db, job.id)

    def requeue(
        self, job_id: int, reason: str, worker: Optional[str] = None, max_attempts: Optional[int] = None,
        now: Optional[float] = None,
    ) -> Optional[Job]:
        """A dead worker's job: queued again, or failed with `reason` when attempts are used up.

        With `worker`, only if that worker still holds it (the job may have been re-claimed since
        the death was noticed). Returns the job after the change, or None when it was not running
        (or not held by `worker`): nothing to requeue.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            job = self._row(db, job_id)
            if job.state != "running" or (worker is not None and job.worker != worker):
                return None
            return self._release(db, job, reason, max_attempts or self.max_attempts, now)

    def expire_leases(self, now: Optional[float] = None, max_attempts: Optional[int] = None) -> list[Job]:
        """Requeue (or fail) every running job whose lease has passed; returns them after the change."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(f"{_SELECT} WHERE state = 'running' AND lease_until < ? ORDER BY id", (now,))
            expired = [Job(*r) for r in rows.fetchall()]
            return [
                self._release(db, job, f"lease expired (worker {job.worker})", max_attempts or self.max_attempts, now)
                for job in expired
            ]
