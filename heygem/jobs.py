"""The durable job store: every job is stored before `submit` returns, and never done twice.

Upstream kept jobs in process memory and queues; a dead worker took its job with it. Here a job
is a row in a database shared by every process of the service (the daemon's HTTP thread, replica
workers, the CLI). One contract, two homes (`open_store`):

- SQLite (`JobStore`, the default): one file in the state directory (WAL journal,
  `synchronous=FULL`). No server; one host. Each process and thread gets its own connection
  (opened lazily, reopened after a fork), so one `JobStore` may be handed to spawned children:
  it pickles as its path.
- PostgreSQL (`heygem.jobs_pg.PgJobStore`, `[store] url = "postgresql://..."`): one queue for a
  fleet of hosts. Claims take `FOR UPDATE SKIP LOCKED`, leases run on the database's clock, the
  daemon creates and migrates the schema. It pickles as its URL and settings; each process opens
  its own connection pool.

Life of a job (the pure table `TRANSITIONS`, checked by `transition` on every change)::

    queued --claim--> running --succeed--> succeeded
      |                 |  \\--fail------> failed
      |                 |   \\--cancel---> cancelled
      |                 \\--requeue--> queued       (lease expired / worker died / released, attempts left)
      \\--cancel--> cancelled

A worker `claim`s the oldest queued job and holds a lease until `lease_until`; it must `renew`
before the lease ends (a stage heartbeat is a good moment). `expire_leases` (the daemon's tick)
and `requeue` (the daemon saw the worker die) put a job back in the queue, or fail it with the
reason once `attempts >= max_attempts`, so a poison job cannot crash-loop the service. A worker
that cannot do a job here (its input is not on this host's storage) `release`s it: back to the
queue with the reason, claimable by other hosts at once and by this host only after a delay.

Worker calls (`renew`, `progress`, `succeed`, `fail`, `release`) name the worker. When that worker
no longer holds the job (its lease expired and the job was requeued or claimed by another, or the
job was cancelled) they raise `LeaseLost`: the worker must drop the job and clean up, never report
it. That is what makes "never completed twice" hold. Workers poll `cancelled(job_id)` between
batches to stop early.

Worker names carry the host: `replica-0.1@gpu-07:4242` (replica, incarnation, host, supervisor
pid); `worker_host` reads the host back and the store keeps it in `Job.host`, so a shared store
shows which host holds which job.

Progress (percent) and stage, as the replica's stages report them: 0 `queued` / `claimed`, 10
`features` (inputs read, audio features under way), 20 `frames` (frames flowing; from 20 to 89
the share of frames encoded), 90 `mux`, 100 `done`. Progress of one claim never goes down.

Every name in a job's `output` path (the file's, and each folder's) must fit `NAME_MAX` bytes, the
file-name limit of Linux file systems, counted in bytes, not characters (a CJK character is 3
bytes in UTF-8): `submit` refuses a longer one (`OutputNameTooLong`) rather than let the job fail
when the encoder opens the file.

Clocks. SQLite: times are `time.time()` seconds unless a `now` is passed (tests drive a pure
clock). PostgreSQL: the database's `now()` decides every lease, whatever `now` a caller passes, so
hosts whose clocks differ can neither steal a lease early nor keep one too long.

Errors. `JobError` and its subclasses are about jobs (and `StoreConfigError` about a store that can
never work as configured: a bad URL, bad credentials, a schema newer than this program).
`StoreUnavailable` means the store could not be reached or was busy now: the call did not happen,
or, for a write, its outcome is unknown. `UNAVAILABLE` is what to catch for either backend (SQLite
reports a lock it waited for too long as `sqlite3.OperationalError`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

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

# A released job waits this long before the host that released it may claim it again; every
# other host may claim it at once (idle replicas ask every 50 ms).
RELEASE_RETRY_S = 5.0

# How this host names itself in worker names (and so in the store, logs and metrics). The daemon
# sets it from `[daemon] host_name`; spawned workers inherit it.
HOST_ENV = "HEYGEM_HOST"

SCHEMA_VERSION = 2
_MIGRATIONS: dict[int, str] = {
    1: """
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
""",
    # the host holding (or that last held) a job; when the host that released it may claim it again
    2: """
ALTER TABLE jobs ADD COLUMN host TEXT;
ALTER TABLE jobs ADD COLUMN retry_at REAL;
""",
}


class JobError(Exception):
    """Base of the store's errors about jobs."""


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


class StoreConfigError(JobError):
    """The store cannot work as configured (a bad URL, credentials, a missing database or schema,
    a schema newer than this program): retrying will not help; a person must act."""


class StoreUnavailable(Exception):
    """The store did not answer now (server down or unreachable, a lock held too long). The call
    did not happen or, for a write, its outcome is unknown; retry later."""


# What a caller catches for "the store could not be reached now", on either backend.
UNAVAILABLE: tuple[type[BaseException], ...] = (StoreUnavailable, sqlite3.OperationalError)


def host_name() -> str:
    """This host's name in the fleet: $HEYGEM_HOST (the daemon's `[daemon] host_name`), else the
    system's host name."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def worker_host(worker: Optional[str]) -> Optional[str]:
    """The host in a worker name `name@host:pid` (None for names without one, e.g. `gpu0`)."""
    if not worker or "@" not in worker:
        return None
    where = worker.rpartition("@")[2]
    host, colon, _pid = where.rpartition(":")
    return (host if colon else where) or None


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
    host: Optional[str] = None  # the host holding the job (running), or that last held it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StoreStats:
    """One read of the whole queue, for the daemon's tick and `status`.

    `counts`: jobs per state (every state present); `oldest_queued_s`: how long the oldest queued
    job has waited (the store's clock), None when none waits; `held`: running jobs per host ("" for
    workers without a host)."""

    counts: dict
    oldest_queued_s: Optional[float]
    held: dict


# ---- the contract's pure parts, shared by both backends ---------------------------------------

def check_held(job: Optional[Job], job_id: int, worker: str) -> Job:
    """The job, if `worker` holds it; else `JobNotFound` or `LeaseLost` naming who or what took it."""
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    if job.state != "running" or job.worker != worker:
        holder = f" by {job.worker}" if job.state == "running" else ""
        raise LeaseLost(f"job {job_id} is {job.state}{holder}, no longer held by {worker}")
    return job


def give_back(job: Job, reason: str, max_attempts: int) -> tuple[str, str]:
    """A running job that its worker lost or gave up: (new state, recorded reason). Back to the
    queue, or failed once its attempts are used up."""
    if job.attempts >= max_attempts:
        return transition(job.state, "fail"), f"{reason} (gave up after {job.attempts} attempts)"
    return transition(job.state, "requeue"), reason


def check_list_state(state: Optional[str]) -> None:
    if state is not None and state not in STATES:
        raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")


def check_submit(audio: str, video: str, output: Optional[str]) -> None:
    if not audio or not video:
        raise ValueError("a job needs both an audio and a video")
    if output is not None:
        check_output_name(output)


def check_progress(pct: int) -> None:
    if not 0 <= pct <= 100:
        raise ValueError(f"progress is a percentage, got {pct}")


_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
_SELECT = f"SELECT {', '.join(_FIELDS)} FROM jobs"


class JobStore:
    """Jobs in one SQLite file; safe from many processes and threads at once.

    `busy_timeout_s` bounds how long a writer waits for another writer's transaction; writes are
    short single-row transactions, so contention costs milliseconds. `max_attempts` is the default
    for `requeue`, `release` and `expire_leases`.
    """

    backend = "sqlite"
    shared = False  # one host: the file is on this host's disk

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
                raise StoreConfigError(
                    f"{self.path}: job store schema {version} is newer than this program ({SCHEMA_VERSION})")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step].split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # pickling: a store travels to spawned children as its settings; connections are per process
    def __getstate__(self) -> dict:
        return {"path": self.path, "max_attempts": self.max_attempts, "busy_timeout_s": self.busy_timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def describe(self) -> str:
        """Where the jobs are, for logs and `status` (no secrets in it)."""
        return str(self.path)

    def with_options(self, max_attempts: Optional[int] = None, busy_timeout_s: Optional[float] = None) -> "JobStore":
        """The same store with other settings (its own connections)."""
        return JobStore(self.path, max_attempts or self.max_attempts,
                        self.busy_timeout_s if busy_timeout_s is None else busy_timeout_s)

    def prepare(self, migrate: bool = False) -> None:
        """Check the store can be used (the constructor created or migrated the file already)."""

    def ping(self) -> None:
        """One cheap round trip; raises what a real call would."""
        self._db().execute("SELECT 1").fetchone()

    def for_worker(self, should_stop: Callable[[], bool], log=None) -> "JobStore":
        """What a worker process uses: this store itself (a local file has no outage to ride out;
        a lock held too long raises, as it always did)."""
        return self

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

    def dispose(self) -> None:
        """Release what this process holds (here: this thread's connection)."""
        self.close()

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
        check_list_state(state)
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        rows = self._db().execute(f"{_SELECT} {where} ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Job(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per state, every state present (0 when none)."""
        found = dict(self._db().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {s: found.get(s, 0) for s in STATES}

    def stats(self, now: Optional[float] = None) -> StoreStats:
        """Counts, the oldest queued job's wait, running jobs per host: one consistent read."""
        now = time.time() if now is None else now
        db = self._db()
        db.execute("BEGIN")  # one snapshot for the three reads
        try:
            found = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            oldest = db.execute("SELECT created_at FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            held = dict(db.execute(
                "SELECT COALESCE(host, ''), COUNT(*) FROM jobs WHERE state = 'running' GROUP BY 1").fetchall())
        finally:
            db.execute("COMMIT")
        return StoreStats({s: found.get(s, 0) for s in STATES}, None if oldest is None else max(0.0, now - oldest[0]), held)

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
        check_submit(audio, video, output)
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

        A job this worker's host released waits `RELEASE_RETRY_S` before this host takes it
        again. Idle workers call this many times a second: a plain read answers "nothing queued"
        without taking the write lock that submissions and lease renewals need.
        """
        now = time.time() if now is None else now
        if self._db().execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone() is None:
            return None
        host = worker_host(worker)
        with self._tx() as db:
            row = db.execute(
                f"{_SELECT} WHERE state = 'queued' AND (host IS NOT ? OR retry_at IS NULL OR retry_at <= ?)"
                " ORDER BY id LIMIT 1", (host, now)).fetchone()
            if row is None:
                return None
            job = Job(*row)
            state = transition(job.state, "claim")
            db.execute(
                "UPDATE jobs SET state = ?, worker = ?, host = ?, lease_until = ?, attempts = attempts + 1,"
                " progress = 0, stage = 'claimed', retry_at = NULL, updated_at = ? WHERE id = ?",
                (state, worker, host, now + lease_s, now, job.id),
            )
            return self._row(db, job.id)

    def _held(self, db: sqlite3.Connection, job_id: int, worker: str) -> Job:
        """The job, if `worker` still holds it; else `LeaseLost` naming who or what took it."""
        row = db.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
        return check_held(Job(*row) if row else None, job_id, worker)

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
        check_progress(pct)
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

    def _release(self, db: sqlite3.Connection, job: Job, reason: str, max_attempts: int, now: float,
                 retry_at: Optional[float] = None) -> Job:
        """Back to the queue, or failed once its attempts are used up."""
        state, reason = give_back(job, reason, max_attempts)
        if state == "failed":
            db.execute(
                "UPDATE jobs SET state = ?, lease_until = NULL, reason = ?, updated_at = ? WHERE id = ?",
                (state, reason, now, job.id),
            )
        else:
            db.execute(
                "UPDATE jobs SET state = ?, worker = NULL, lease_until = NULL, progress = 0,"
                " stage = 'queued', reason = ?, retry_at = ?, updated_at = ? WHERE id = ?",
                (state, reason, retry_at, now, job.id),
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

    def release(
        self, job_id: int, worker: str, reason: str, retry_after_s: float = RELEASE_RETRY_S,
        max_attempts: Optional[int] = None, now: Optional[float] = None,
    ) -> Job:
        """The holder gives the job back (it cannot do it here: e.g. its input is not on this
        host's storage): queued again with `reason`, for other hosts at once and for this one after
        `retry_after_s`; failed when its attempts are used up. `LeaseLost` if not held."""
        now = time.time() if now is None else now
        with self._tx() as db:
            job = self._held(db, job_id, worker)
            return self._release(db, job, reason, max_attempts or self.max_attempts, now, now + retry_after_s)

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


def open_store(
    url: Optional[str] = None, path: Union[str, Path, None] = None, *, max_attempts: int = 3,
    busy_timeout_s: float = 10.0, connect_timeout_s: float = 5.0, pool_size: int = 4,
):
    """The job store `[store] url` names: PostgreSQL for a `postgresql://` URL, else SQLite at
    `path`. Opening a PostgreSQL store connects lazily: `prepare()` checks it (and migrates)."""
    if url:
        from heygem.jobs_pg import PgJobStore

        return PgJobStore(url, max_attempts=max_attempts, busy_timeout_s=busy_timeout_s,
                          connect_timeout_s=connect_timeout_s, pool_size=pool_size)
    if path is None:
        raise ValueError("a SQLite job store needs a path")
    return JobStore(path, max_attempts=max_attempts, busy_timeout_s=busy_timeout_s)


class WorkerStore:
    """A worker process's view of a shared store, which rides out the store being unreachable.

    The job in hand is finished, not dropped: `progress`, `renew` and `cancelled` skip while the
    store is away (the lease is on the database's clock; the daemon expires none until the store
    has been back for a lease's length, so the worker renews first); `succeed`, `fail` and
    `release` wait for the store, calling `should_stop()` between tries (it beats the stage's
    heartbeat and says when to give up: then `StoreUnavailable` is raised and the lease, left to
    expire, puts the job back). `claim` answers None while the store is away: no new job. One call
    per back-off step actually tries the store; the others answer at once. Everything else is the
    store's own.

    A write whose outcome was unknown (the connection broke after it was sent) is recognised when
    retried: `LeaseLost` for a job this worker had just finished the same way counts as done.
    """

    BACKOFF_S = (0.5, 1.0, 2.0, 5.0)

    def __init__(self, store, should_stop: Callable[[], bool], log=None):
        self._store = store
        self._should_stop = should_stop
        self._log = log
        self._down: Optional[str] = None  # why the store is away, while it is
        self._failures = 0
        self._next_try = 0.0

    def __getattr__(self, name):
        if name.startswith("__") or name == "_store":  # copy/pickle probes, a half-made object
            raise AttributeError(name)
        return getattr(self._store, name)

    def __getstate__(self):  # a worker's view never travels; the store does
        raise TypeError("WorkerStore is per process: pass the store itself")

    @property
    def down(self) -> Optional[str]:
        return self._down

    def _gate(self) -> bool:
        """False while backing off after a failure: answer without asking the store."""
        return self._down is None or time.monotonic() >= self._next_try

    def _failed(self, err: BaseException, call: str) -> None:
        self._failures += 1
        self._next_try = time.monotonic() + self.BACKOFF_S[min(self._failures, len(self.BACKOFF_S)) - 1]
        if self._down is None and self._log is not None:
            self._log.warning("store_unavailable", call=call, error=str(err),
                              action="finishing the job in hand; no new job until the store answers")
        self._down = str(err) or type(err).__name__

    def _ok(self) -> None:
        if self._down is not None and self._log is not None:
            self._log.info("store_available", after_failures=self._failures)
        self._down, self._failures = None, 0

    def _soft(self, call: str, default, *args, **kwargs):
        if not self._gate():
            return default
        try:
            out = getattr(self._store, call)(*args, **kwargs)
        except UNAVAILABLE as err:
            self._failed(err, call)
            return default
        self._ok()
        return out

    def claim(self, worker: str, lease_s: float, now: Optional[float] = None) -> Optional[Job]:
        return self._soft("claim", None, worker, lease_s, now=now)

    def cancelled(self, job_id: int) -> bool:
        return self._soft("cancelled", False, job_id)

    def renew(self, job_id: int, worker: str, lease_s: float, now: Optional[float] = None) -> None:
        self._soft("renew", None, job_id, worker, lease_s, now=now)

    def progress(self, job_id: int, worker: str, pct: int, stage: str, lease_s: Optional[float] = None,
                 now: Optional[float] = None) -> None:
        self._soft("progress", None, job_id, worker, pct, stage, lease_s=lease_s, now=now)

    def _until_done(self, call: str, job_id: int, worker: str, ended: Callable[[Job], bool], *args, **kwargs) -> Job:
        unsure = False
        while True:
            if self._gate():
                try:
                    out = getattr(self._store, call)(job_id, worker, *args, **kwargs)
                except UNAVAILABLE as err:
                    self._failed(err, call)
                    unsure = True
                except LeaseLost:
                    if unsure:  # did the try that broke off go through?
                        job = self._soft("get", None, job_id)
                        if job is not None and ended(job):
                            self._ok()
                            return job
                    raise
                else:
                    self._ok()
                    return out
            if self._should_stop():
                raise StoreUnavailable(f"{call} of job {job_id}: the store is unreachable ({self._down}) and the "
                                       "worker is stopping; its lease will put the job back")
            time.sleep(0.2)

    def succeed(self, job_id: int, worker: str, result_path: str, now: Optional[float] = None) -> Job:
        return self._until_done("succeed", job_id, worker,
                                lambda j: j.state == "succeeded" and j.worker == worker and j.result == str(result_path),
                                result_path, now=now)

    def fail(self, job_id: int, worker: str, reason: str, now: Optional[float] = None) -> Job:
        return self._until_done("fail", job_id, worker,
                                lambda j: j.state == "failed" and j.worker == worker and j.reason == reason, reason, now=now)

    def release(self, job_id: int, worker: str, reason: str, retry_after_s: float = RELEASE_RETRY_S,
                max_attempts: Optional[int] = None, now: Optional[float] = None) -> Job:
        def released(j: Job) -> bool:  # queued again (no worker) or failed, by this host, for this reason
            return (j.state in ("queued", "failed") and j.host == worker_host(worker) and j.worker in (None, worker)
                    and (j.reason or "").startswith(reason))

        return self._until_done("release", job_id, worker, released, reason, retry_after_s=retry_after_s,
                                max_attempts=max_attempts, now=now)
