"""The job store on PostgreSQL: one queue for a fleet of hosts (`[store] url = "postgresql://..."`).

The same contract as `heygem.jobs.JobStore` (the contract suite, tests/test_jobs.py, runs against
both), with what a shared server changes:

- Claims are one statement: `UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED)`, so
  concurrent claimers on every host never wait for each other and never get the same job.
- The database's clock decides: `lease_until = now() + lease_s` on the server, and expiry compares
  with the server's `now()`. A caller's `now` is accepted for the interface and ignored, so hosts
  whose clocks differ can neither steal a lease early nor keep one too long.
- A server that restarted keeps every lease for one lease length after it came back
  (`pg_postmaster_start_time()`), so workers that rode out the outage renew before anyone expires
  their jobs: an outage loses time, never a job, and runs none twice.
- Connections: a psycopg 3 pool per process (created lazily, recreated after a fork; the store
  pickles as its URL and settings). Each connection is checked when taken from the pool, waits at
  most `busy_timeout_s` for a row lock (`lock_timeout`) and is cut by the server if it sits in a
  transaction for more than `IDLE_IN_TX_S` (a SIGSTOPped worker holds no lock for long).
- Schema: `prepare(migrate=True)` (the daemon, at start) creates and migrates it under an advisory
  lock, recording each version in `heygem_schema`; other users (`prepare()`) only check it. No ORM.
- Errors: connection failures, a full pool and lock timeouts are `StoreUnavailable`; a bad URL,
  bad credentials, a missing database or schema, or a schema newer than this program are
  `StoreConfigError` (a person must act).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from heygem.jobs import (
    STATES, TERMINAL, DuplicateCode, Job, JobNotFound, StoreConfigError, StoreStats, StoreUnavailable,
    check_held, check_list_state, check_progress, check_submit, give_back, host_name, transition, worker_host,
    RELEASE_RETRY_S,
)

SCHEMA_VERSION = 1
IDLE_IN_TX_S = 30  # the server ends a session idle inside a transaction this long (a stopped client)
CHECK_IDLE_S = 1.0  # a pooled connection unused this long is checked (one round trip) before use
_LOCK_KEY = 0x4E7_6E3  # pg_advisory_xact_lock key of schema migrations ("heygem")

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE heygem_jobs (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            code        text NOT NULL UNIQUE,
            audio       text NOT NULL,
            video       text NOT NULL,
            output      text,
            state       text NOT NULL CHECK (state IN ('queued','running','succeeded','failed','cancelled')),
            progress    integer NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
            stage       text NOT NULL DEFAULT 'queued',
            attempts    integer NOT NULL DEFAULT 0,
            worker      text,
            host        text,
            lease_until timestamptz,
            lease_s     double precision,
            retry_at    timestamptz,
            reason      text,
            result      text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        ) WITH (fillfactor = 80)""",
        # Few indexes, none on what renewals and progress change (lease_until, progress, stage,
        # updated_at): those updates, the most frequent, stay HOT (no index writes, room left on
        # the page by the fillfactor). The claim's scan: queued jobs, oldest first.
        "CREATE INDEX heygem_jobs_queued ON heygem_jobs (id) WHERE state = 'queued'",
        # lease expiry and "who holds what": the running jobs (one per replica at most, or two)
        "CREATE INDEX heygem_jobs_running ON heygem_jobs (id) WHERE state = 'running'",
    ],
}

_EPOCH = "extract(epoch from {})::float8"
_COLUMNS = ", ".join(_EPOCH.format(f) if f in ("lease_until", "created_at", "updated_at") else f
                     for f in ("id", "code", "audio", "video", "output", "state", "progress", "stage", "attempts",
                               "worker", "lease_until", "reason", "result", "created_at", "updated_at", "host"))
_SELECT = f"SELECT {_COLUMNS} FROM heygem_jobs"
_RETURNING = f"RETURNING {_COLUMNS}"
_LEASE = "now() + make_interval(secs => %(lease_s)s)"

# Server answers that no retry fixes: the URL, the credentials or the database are wrong.
_CONFIG_ERRORS = re.compile(
    r"password authentication failed|authentication failed|does not exist|no pg_hba\.conf entry|"
    r"invalid .* for connection option|invalid connection option|invalid URI|invalid (integer|sslmode) value|"
    r"missing \"=\"|SSL (is not enabled|required)|unsupported frontend protocol|permission denied", re.I)


def redact(url: str) -> str:
    """The URL without its password (for logs, status and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://(unparsable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        who, _, where = netloc.rpartition("@")
        netloc = f"{who.split(':', 1)[0]}@{where}"
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_url(url: str) -> str:
    """`url` if it is a PostgreSQL URL libpq can parse; else ValueError saying what is wrong."""
    if not re.match(r"postgres(ql)?://", url):
        raise ValueError(f"{redact(url)!r} is not a postgresql:// URL")
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # pragma: no cover - a dependency of the distribution
        raise ValueError("psycopg is not installed: pip install 'psycopg[binary,pool]'") from None
    try:
        conninfo_to_dict(url)
    except Exception as err:
        raise ValueError(f"{redact(url)}: {str(err).strip()}") from None
    return url


def _job(row) -> Optional[Job]:
    return Job(*row) if row else None


class PgJobStore:
    """Jobs in PostgreSQL, shared by every host of a fleet. See the module's docstring."""

    backend = "postgresql"
    shared = True

    def __init__(self, url: str, max_attempts: int = 3, busy_timeout_s: float = 10.0, connect_timeout_s: float = 5.0,
                 pool_size: int = 4):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        try:
            check_url(url)
        except ValueError as err:
            raise StoreConfigError(str(err)) from None
        self.url = url
        self.max_attempts = max_attempts
        self.busy_timeout_s = busy_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.pool_size = pool_size
        self._lock = threading.Lock()
        self._pool = None
        self._pid = 0

    # pickling: settings travel, the pool is per process
    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in ("url", "max_attempts", "busy_timeout_s", "connect_timeout_s", "pool_size")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._pool, self._pid = threading.Lock(), None, 0

    def describe(self) -> str:
        return redact(self.url)

    def with_options(self, max_attempts: Optional[int] = None, busy_timeout_s: Optional[float] = None) -> "PgJobStore":
        return PgJobStore(self.url, max_attempts or self.max_attempts,
                          self.busy_timeout_s if busy_timeout_s is None else busy_timeout_s, self.connect_timeout_s,
                          self.pool_size)

    def for_worker(self, should_stop, log=None):
        from heygem.jobs import WorkerStore

        return WorkerStore(self, should_stop, log)

    # ---- connections -------------------------------------------------------------------------

    def _connect_kwargs(self) -> dict:
        return {"autocommit": True, "connect_timeout": max(2, int(round(self.connect_timeout_s))),
                "application_name": f"heygem-ops@{host_name()}"[:63]}

    def _configure(self, conn) -> None:
        conn.execute(f"SET lock_timeout = {max(1, int(self.busy_timeout_s * 1000))}")
        conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TX_S * 1000}")
        conn.execute("SET TIME ZONE 'UTC'")

    def _get_pool(self):
        if self._pool is not None and self._pid == os.getpid():
            return self._pool
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                from psycopg_pool import ConnectionPool

                # The pool logs every failed reconnection; the store reports outages itself.
                logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
                self._pool = ConnectionPool(
                    self.url, min_size=1, max_size=max(1, self.pool_size), open=True, timeout=self.connect_timeout_s,
                    kwargs=self._connect_kwargs(), configure=self._configure, check=_check_if_idle,
                    reconnect_timeout=max(60.0, 10 * self.connect_timeout_s), name=f"heygem-{os.getpid()}",
                )
                self._pid = os.getpid()
        return self._pool

    @contextmanager
    def _conn(self) -> Iterator:
        """A pooled connection (autocommit: one statement is one transaction; several take
        `conn.transaction()`); psycopg's errors become the store's."""
        with self._errors():
            with self._get_pool().connection(timeout=self.connect_timeout_s) as conn:
                try:
                    yield conn
                finally:
                    conn._heygem_used = time.monotonic()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        import psycopg
        from psycopg import errors
        from psycopg_pool import PoolTimeout

        try:
            yield
        except errors.UndefinedTable:
            raise StoreConfigError(f"{self.describe()}: no job store schema; the daemon creates it at its start "
                                   "(`heygem-ops daemon` with this [store] url)") from None
        except (errors.LockNotAvailable, errors.QueryCanceled) as err:
            raise StoreUnavailable(f"{self.describe()}: busy: {_first_line(err)}") from None
        except PoolTimeout:
            raise StoreUnavailable(f"{self.describe()}: no connection within {self.connect_timeout_s:g} s "
                                   "(the server is down or unreachable)") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as err:
            raise self._classify(err) from None

    def _classify(self, err: BaseException) -> Exception:
        text = _first_line(err)
        if _CONFIG_ERRORS.search(text):
            return StoreConfigError(f"{self.describe()}: {text}")
        return StoreUnavailable(f"{self.describe()}: {text}")

    def close(self) -> None:
        """Nothing per thread to close: connections go back to the pool after every call."""

    def dispose(self) -> None:
        """Close this process's pool (a later call opens a new one)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.close(timeout=2.0)

    # ---- schema ------------------------------------------------------------------------------

    def prepare(self, migrate: bool = False) -> None:
        """Connect once and check the schema; with `migrate` (the daemon) create or migrate it.

        `StoreConfigError` for what a person must fix (URL, credentials, database, schema);
        `StoreUnavailable` when the server does not answer."""
        import psycopg

        try:
            conn = psycopg.connect(self.url, **self._connect_kwargs())
        except psycopg.Error as err:
            raise self._classify(err) from None
        try:
            with self._errors():
                if migrate:
                    self._migrate(conn)
                else:
                    self._check_version(conn)
        finally:
            conn.close()

    def schema_version(self, conn) -> int:
        row = conn.execute("SELECT to_regclass('heygem_schema') IS NOT NULL").fetchone()
        if not row[0]:
            return 0
        return conn.execute("SELECT COALESCE(max(version), 0) FROM heygem_schema").fetchone()[0]

    def _check_version(self, conn) -> None:
        version = self.schema_version(conn)
        if version == 0:
            raise StoreConfigError(f"{self.describe()}: no job store schema yet; the daemon creates it at its start")
        if version != SCHEMA_VERSION:
            newer = version > SCHEMA_VERSION
            raise StoreConfigError(
                f"{self.describe()}: job store schema {version} is {'newer' if newer else 'older'} than this program's "
                f"({SCHEMA_VERSION}): {'upgrade heygem-ops here' if newer else 'start the upgraded daemon to migrate it'}")

    def _migrate(self, conn) -> list[int]:
        """Apply the missing migrations in one transaction, one daemon at a time. Returns them."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute("CREATE TABLE IF NOT EXISTS heygem_schema (version integer PRIMARY KEY, "
                         "applied_at timestamptz NOT NULL DEFAULT now(), applied_by text)")
            version = self.schema_version(conn)
            if version > SCHEMA_VERSION:
                raise StoreConfigError(f"{self.describe()}: job store schema {version} is newer than this program "
                                       f"({SCHEMA_VERSION}): upgrade heygem-ops on this host")
            applied = []
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
                conn.execute("INSERT INTO heygem_schema (version, applied_by) VALUES (%s, %s)", (step, host_name()))
                applied.append(step)
        return applied

    # ---- reads -------------------------------------------------------------------------------

    def ping(self) -> None:
        with self._conn() as conn:
            conn.execute("SELECT 1").fetchone()

    def get(self, job_id: int) -> Optional[Job]:
        with self._conn() as conn:
            return _job(conn.execute(f"{_SELECT} WHERE id = %s", (job_id,)).fetchone())

    def by_code(self, code: str) -> Optional[Job]:
        with self._conn() as conn:
            return _job(conn.execute(f"{_SELECT} WHERE code = %s", (code,)).fetchone())

    def list(self, state: Optional[str] = None, limit: int = 100) -> list[Job]:
        """Newest first, optionally only jobs in `state`."""
        check_list_state(state)
        where, args = ("WHERE state = %s", (state,)) if state else ("", ())
        with self._conn() as conn:
            rows = conn.execute(f"{_SELECT} {where} ORDER BY id DESC LIMIT %s", (*args, limit)).fetchall()
        return [Job(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._conn() as conn:
            found = dict(conn.execute("SELECT state, count(*) FROM heygem_jobs GROUP BY state").fetchall())
        return {s: found.get(s, 0) for s in STATES}

    def stats(self, now: Optional[float] = None) -> StoreStats:
        """Counts, the oldest queued job's wait (the server's clock), running jobs per host: one
        statement, one snapshot."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT 'count', state, count(*)::float8 FROM heygem_jobs GROUP BY state"
                " UNION ALL SELECT 'oldest', NULL, extract(epoch from now() - min(created_at))::float8"
                "   FROM heygem_jobs WHERE state = 'queued'"
                " UNION ALL SELECT 'held', COALESCE(host, ''), count(*)::float8 FROM heygem_jobs"
                "   WHERE state = 'running' GROUP BY host").fetchall()
        counts = {s: 0 for s in STATES}
        oldest, held = None, {}
        for kind, key, value in rows:
            if kind == "count":
                counts[key] = int(value)
            elif kind == "oldest":
                oldest = None if value is None else max(0.0, value)
            else:
                held[key] = int(value)
        return StoreStats(counts, oldest, held)

    def cancelled(self, job_id: int) -> bool:
        with self._conn() as conn:
            row = conn.execute("SELECT state FROM heygem_jobs WHERE id = %s", (job_id,)).fetchone()
        return row is not None and row[0] == "cancelled"

    def clock(self) -> float:
        """The server's now(), epoch seconds (what every lease is measured with)."""
        with self._conn() as conn:
            return conn.execute("SELECT extract(epoch from now())::float8").fetchone()[0]

    # ---- writes ------------------------------------------------------------------------------

    def submit(self, audio: str, video: str, output: Optional[str] = None, code: Optional[str] = None,
               *, now: Optional[float] = None) -> Job:
        """Queue a job; committed when this returns. `code` defaults to a UUID."""
        from psycopg import errors

        check_submit(audio, video, output)
        code = code or uuid.uuid4().hex
        try:
            with self._conn() as conn:
                row = conn.execute(
                    f"INSERT INTO heygem_jobs (code, audio, video, output, state) VALUES (%s, %s, %s, %s, 'queued')"
                    f" {_RETURNING}", (code, str(audio), str(video), None if output is None else str(output))).fetchone()
        except errors.UniqueViolation:
            raise DuplicateCode(f"a job with code {code!r} exists already") from None
        return Job(*row)

    def claim(self, worker: str, lease_s: float, now: Optional[float] = None) -> Optional[Job]:
        """Take the oldest queued job for `worker`: one statement; concurrent claimers skip the
        rows others are taking. A job this worker's host released waits for its `retry_at`."""
        transition("queued", "claim")
        with self._conn() as conn:
            row = conn.execute(
                f"UPDATE heygem_jobs SET state = 'running', worker = %(worker)s, host = %(host)s, lease_until = {_LEASE},"
                " lease_s = %(lease_s)s, attempts = attempts + 1, progress = 0, stage = 'claimed', retry_at = NULL,"
                " updated_at = now()"
                " WHERE id = (SELECT id FROM heygem_jobs WHERE state = 'queued'"
                "   AND (host IS DISTINCT FROM %(host)s OR retry_at IS NULL OR retry_at <= now())"
                "   ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                f" {_RETURNING}", {"worker": worker, "host": worker_host(worker), "lease_s": float(lease_s)}).fetchone()
        return _job(row)

    def _explain(self, conn, job_id: int, worker: str) -> None:
        """A worker's update matched no row: raise why (no such job, or who holds it now)."""
        check_held(_job(conn.execute(f"{_SELECT} WHERE id = %s", (job_id,)).fetchone()), job_id, worker)
        raise StoreUnavailable(f"job {job_id}: held by {worker} but the update did not apply")  # pragma: no cover

    def _held_update(self, sets: str, job_id: int, worker: str, params: dict, returning: bool = False) -> Optional[Job]:
        with self._conn() as conn:
            row = conn.execute(
                f"UPDATE heygem_jobs SET {sets}, updated_at = now() WHERE id = %(id)s AND state = 'running'"
                f" AND worker = %(worker)s {_RETURNING if returning else 'RETURNING id'}",
                {**params, "id": job_id, "worker": worker}).fetchone()
            if row is None:
                self._explain(conn, job_id, worker)
        return Job(*row) if returning else None

    def renew(self, job_id: int, worker: str, lease_s: float, now: Optional[float] = None) -> None:
        """Extend the lease (the server's clock); `LeaseLost` when the worker no longer holds the job."""
        self._held_update(f"lease_until = {_LEASE}, lease_s = %(lease_s)s", job_id, worker, {"lease_s": float(lease_s)})

    def progress(self, job_id: int, worker: str, pct: int, stage: str, lease_s: Optional[float] = None,
                 now: Optional[float] = None) -> None:
        """Record progress (never lower than before) and the stage; optionally renew the lease."""
        check_progress(pct)
        sets = "progress = GREATEST(progress, %(pct)s), stage = %(stage)s"
        params = {"pct": int(pct), "stage": stage}
        if lease_s is not None:
            sets += f", lease_until = {_LEASE}, lease_s = %(lease_s)s"
            params["lease_s"] = float(lease_s)
        self._held_update(sets, job_id, worker, params)

    def succeed(self, job_id: int, worker: str, result_path: str, now: Optional[float] = None) -> Job:
        """Mark done with the output file; `LeaseLost` if the worker no longer holds the job."""
        transition("running", "succeed")
        return self._held_update("state = 'succeeded', lease_until = NULL, result = %(result)s, progress = 100,"
                                 " stage = 'done'", job_id, worker, {"result": str(result_path)}, returning=True)

    def fail(self, job_id: int, worker: str, reason: str, now: Optional[float] = None) -> Job:
        """Mark failed with the stage's reason; `LeaseLost` if the worker no longer holds the job."""
        transition("running", "fail")
        return self._held_update("state = 'failed', lease_until = NULL, reason = %(reason)s", job_id, worker,
                                 {"reason": reason}, returning=True)

    def cancel(self, job_id: int, now: Optional[float] = None) -> bool:
        """Cancel a queued or running job. False when it had already finished."""
        with self._conn() as conn:
            row = conn.execute(
                "UPDATE heygem_jobs SET state = 'cancelled', lease_until = NULL, reason = 'cancelled', updated_at = now()"
                " WHERE id = %s AND state IN ('queued', 'running') RETURNING id", (job_id,)).fetchone()
            if row is not None:
                return True
            found = conn.execute("SELECT state FROM heygem_jobs WHERE id = %s", (job_id,)).fetchone()
        if found is None:
            raise JobNotFound(f"no job {job_id}")
        assert found[0] in TERMINAL
        return False

    def _give_back(self, conn, job: Job, reason: str, max_attempts: int, retry_after_s: Optional[float] = None) -> Job:
        state, reason = give_back(job, reason, max_attempts)
        if state == "failed":
            sql = "state = 'failed', lease_until = NULL, reason = %(reason)s"
        else:
            retry = "now() + make_interval(secs => %(retry)s)" if retry_after_s is not None else "NULL"
            sql = ("state = 'queued', worker = NULL, lease_until = NULL, progress = 0, stage = 'queued',"
                   f" reason = %(reason)s, retry_at = {retry}")
        row = conn.execute(f"UPDATE heygem_jobs SET {sql}, updated_at = now() WHERE id = %(id)s {_RETURNING}",
                           {"reason": reason, "id": job.id, "retry": retry_after_s}).fetchone()
        return Job(*row)

    def requeue(self, job_id: int, reason: str, worker: Optional[str] = None, max_attempts: Optional[int] = None,
                now: Optional[float] = None) -> Optional[Job]:
        """A dead worker's job: queued again, or failed with `reason` when attempts are used up.
        With `worker`, only if that worker still holds it. None when there was nothing to requeue."""
        with self._conn() as conn, conn.transaction():
            job = _job(conn.execute(f"{_SELECT} WHERE id = %s FOR UPDATE", (job_id,)).fetchone())
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            if job.state != "running" or (worker is not None and job.worker != worker):
                return None
            return self._give_back(conn, job, reason, max_attempts or self.max_attempts)

    def release(self, job_id: int, worker: str, reason: str, retry_after_s: float = RELEASE_RETRY_S,
                max_attempts: Optional[int] = None, now: Optional[float] = None) -> Job:
        """The holder gives the job back (e.g. its input is not on this host's storage): queued
        with `reason`, for other hosts at once and this one after `retry_after_s`; failed when
        its attempts are used up. `LeaseLost` if not held."""
        with self._conn() as conn, conn.transaction():
            job = check_held(_job(conn.execute(f"{_SELECT} WHERE id = %s FOR UPDATE", (job_id,)).fetchone()),
                             job_id, worker)
            return self._give_back(conn, job, reason, max_attempts or self.max_attempts, float(retry_after_s))

    def expire_leases(self, now: Optional[float] = None, max_attempts: Optional[int] = None) -> list[Job]:
        """Requeue (or fail) every running job whose lease has passed on the server's clock, and
        that has had a lease's length since the server (re)started; returns them after the
        change. Rows another daemon is expiring right now are skipped, not waited for."""
        with self._conn() as conn, conn.transaction():
            expired = [Job(*r) for r in conn.execute(
                f"{_SELECT} WHERE state = 'running' AND lease_until < now()"
                " AND now() >= pg_postmaster_start_time() + make_interval(secs => COALESCE(lease_s, 0))"
                " ORDER BY id FOR UPDATE SKIP LOCKED").fetchall()]
            return [self._give_back(conn, job, f"lease expired (worker {job.worker})", max_attempts or self.max_attempts)
                    for job in expired]


def _check_if_idle(conn) -> None:
    """The pool's check on taking a connection: one round trip, only for a connection that sat
    idle (a server restarted meanwhile leaves it broken); one in steady use goes straight on. A
    connection broken in between fails its call (StoreUnavailable) and is replaced."""
    if time.monotonic() - getattr(conn, "_heygem_used", 0.0) >= CHECK_IDLE_S:
        from psycopg_pool import ConnectionPool

        ConnectionPool.check_connection(conn)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    text = text.removeprefix("connection failed: ")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:300] or type(err).__name__
