"""Job store: one contract, two backends (SQLite, PostgreSQL): the state machine, leases,
durability, claims from real concurrent processes; then what only one backend has.

Every contract test runs on both (`store` is parametrized). Time: the SQLite store takes the
caller's `now` (a pure clock the test moves); the PostgreSQL store runs every lease on the
database's clock, so there the test's clock moves by waiting, with leases of a fraction of a
second (`Clock`).
"""

from __future__ import annotations

import multiprocessing
import pickle
import sqlite3
import time

import pytest

from heygem.jobs import (
    STATES, TRANSITIONS, UNAVAILABLE, DuplicateCode, IllegalTransition, JobNotFound, JobStore, LeaseLost,
    StoreConfigError, StoreUnavailable, open_store, transition, worker_host,
)
from pg_helpers import empty

BACKENDS = ["sqlite", "postgresql"]
A, B = "replica-0.1@host-a:100", "replica-0.1@host-b:200"  # workers on two hosts


class Clock:
    """SQLite: a pure clock (`now` passed to every call). PostgreSQL: the server's clock (`now`
    is None and `advance` waits)."""

    def __init__(self, pure: bool):
        self.pure = pure
        self.t = 1000.0

    @property
    def now(self):
        return self.t if self.pure else None

    def advance(self, seconds: float) -> None:
        if self.pure:
            self.t += seconds
        else:
            time.sleep(seconds)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    if request.param == "sqlite":
        store = JobStore(tmp_path / "jobs.db", max_attempts=2)
        yield store, Clock(pure=True)
        store.close()
        return
    url = request.getfixturevalue("pg_jobs_url")
    empty(url)
    store = open_store(url, max_attempts=2)
    yield store, Clock(pure=False)
    store.dispose()


@pytest.fixture
def store(backend):
    return backend[0]


LEGAL = {
    ("queued", "claim"): "running",
    ("queued", "cancel"): "cancelled",
    ("running", "requeue"): "queued",
    ("running", "succeed"): "succeeded",
    ("running", "fail"): "failed",
    ("running", "cancel"): "cancelled",
}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", ["claim", "requeue", "succeed", "fail", "cancel"])
def test_transition_table(state, event):
    if (state, event) in LEGAL:
        assert transition(state, event) == LEGAL[(state, event)]
    else:
        with pytest.raises(IllegalTransition, match=f"cannot {event} a job that is {state}"):
            transition(state, event)


def test_terminal_states_have_no_way_out():
    assert not [k for k in TRANSITIONS if k[0] in ("succeeded", "failed", "cancelled")]


@pytest.mark.parametrize("worker, host", [
    ("replica-0.3@gpu-07:4242", "gpu-07"), ("replica-1.1@gpu-07.example.com:1", "gpu-07.example.com"),
    ("replica-0.1@12345", "12345"), ("gpu0", None), ("upstream", None), (None, None),
])
def test_worker_names_carry_the_host(worker, host):
    assert worker_host(worker) == host


# ---- the contract, on both backends -----------------------------------------------------------

def test_submit_claim_progress_succeed(backend):
    store, clock = backend
    job = store.submit("in/a.wav", "in/v.mp4", output="out/r.mp4", code="task-1", now=clock.now)
    assert (job.state, job.progress, job.attempts, job.code, job.host) == ("queued", 0, 0, "task-1", None)
    claimed = store.claim(A, lease_s=30, now=clock.now)
    assert (claimed.id, claimed.state, claimed.worker, claimed.attempts, claimed.host) == (job.id, "running", A, 1, "host-a")
    assert claimed.lease_until == pytest.approx(claimed.updated_at + 30)
    assert store.claim(B, lease_s=30, now=clock.now) is None
    store.progress(job.id, A, 20, "features", now=clock.now)
    store.progress(job.id, A, 10, "late report", now=clock.now)
    assert store.get(job.id).progress == 20  # never backwards
    clock.advance(0.2)
    store.renew(job.id, A, lease_s=30, now=clock.now)
    renewed = store.get(job.id)
    assert renewed.lease_until == pytest.approx(renewed.updated_at + 30)
    assert renewed.lease_until >= claimed.lease_until + 0.2 - 1e-3
    done = store.succeed(job.id, A, "out/r.mp4", now=clock.now)
    assert (done.state, done.progress, done.result, done.lease_until, done.host) == ("succeeded", 100, "out/r.mp4", None, "host-a")
    assert store.by_code("task-1") == done
    assert store.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0}


def test_claims_oldest_first_and_lists_newest_first(store):
    ids = [store.submit("a", "v").id for _ in range(3)]
    assert store.claim("w", 10).id == ids[0]
    assert [j.id for j in store.list()] == ids[::-1]
    assert [j.id for j in store.list(state="queued")] == ids[:0:-1]
    assert [j.id for j in store.list(limit=1)] == ids[-1:]
    with pytest.raises(ValueError, match="unknown state"):
        store.list(state="done")


def test_duplicate_code_is_a_clear_error(store):
    store.submit("a", "v", code="abc")
    with pytest.raises(DuplicateCode, match="'abc' exists already"):
        store.submit("a2", "v2", code="abc")
    assert store.counts()["queued"] == 1


def test_submit_refuses_what_cannot_run(store):
    with pytest.raises(ValueError, match="both an audio and a video"):
        store.submit("", "v")
    with pytest.raises(ValueError, match="file name holds at most 255 bytes"):
        store.submit("a", "v", output="/out/" + "語" * 90 + ".mp4")
    assert store.counts()["queued"] == 0


def test_lease_expiry_requeues_then_fails_with_reason(backend):
    store, clock = backend
    job = store.submit("a", "v", now=clock.now)
    store.claim("w1", lease_s=0.3, now=clock.now)
    assert store.expire_leases(now=clock.now) == []
    clock.advance(0.5)
    [requeued] = store.expire_leases(now=clock.now)
    assert (requeued.state, requeued.worker, requeued.reason) == ("queued", None, "lease expired (worker w1)")
    store.claim("w2", lease_s=0.3, now=clock.now)
    clock.advance(0.5)
    [failed] = store.expire_leases(now=clock.now)
    assert failed.state == "failed"
    assert failed.reason == "lease expired (worker w2) (gave up after 2 attempts)"
    assert store.claim("w3", 10, now=clock.now) is None
    assert store.get(job.id).attempts == 2


def test_stale_worker_cannot_complete(backend):
    store, clock = backend
    job = store.submit("a", "v", now=clock.now)
    store.claim("w1", lease_s=0.2, now=clock.now)
    clock.advance(0.4)
    store.expire_leases(now=clock.now)
    store.claim("w2", lease_s=10, now=clock.now)
    for call in (
        lambda: store.succeed(job.id, "w1", "x.mp4"),
        lambda: store.fail(job.id, "w1", "boom"),
        lambda: store.renew(job.id, "w1", 10),
        lambda: store.progress(job.id, "w1", 50, "generate"),
        lambda: store.release(job.id, "w1", "input missing"),
    ):
        with pytest.raises(LeaseLost, match="running by w2, no longer held by w1"):
            call()
    assert store.succeed(job.id, "w2", "y.mp4").result == "y.mp4"
    with pytest.raises(LeaseLost, match="succeeded"):
        store.succeed(job.id, "w2", "again.mp4")
    with pytest.raises(JobNotFound):
        store.renew(999, "w2", 10)


def test_requeue_of_dead_worker_respects_current_holder(store):
    job = store.submit("a", "v")
    store.claim("w1", lease_s=10)
    assert store.requeue(job.id, "worker died", worker="w9") is None
    assert store.requeue(job.id, "worker died", worker="w1").state == "queued"
    assert store.requeue(job.id, "again") is None  # not running: nothing to do
    with pytest.raises(JobNotFound):
        store.requeue(999, "gone")


def test_cancel_queued_and_running(store):
    a, b = store.submit("a", "v"), store.submit("b", "v")
    assert store.cancel(a.id) and store.cancelled(a.id)
    store.claim("w", 10)
    assert not store.cancelled(b.id)
    assert store.cancel(b.id) and store.cancelled(b.id)
    with pytest.raises(LeaseLost, match="cancelled"):
        store.succeed(b.id, "w", "r.mp4")
    assert not store.cancel(b.id)
    assert store.get(b.id).reason == "cancelled"
    with pytest.raises(JobNotFound):
        store.cancel(999)


def test_fail_keeps_stage_reason(store):
    job = store.submit("a", "v")
    store.claim("w", 10)
    assert store.fail(job.id, "w", "generate: CUDA out of memory").reason == "generate: CUDA out of memory"


def test_release_goes_to_other_hosts_first_and_fails_when_every_attempt_saw_the_same(backend):
    """A job whose input this host cannot see: back to the queue with the reason, at once for
    another host, for this host only after the delay; failed once the attempts are used up."""
    store, clock = backend
    job = store.submit("/shared/a.wav", "/shared/v.mp4", now=clock.now)
    store.claim(A, lease_s=30, now=clock.now)
    back = store.release(job.id, A, "input missing on host-a: /shared/a.wav", retry_after_s=0.4, now=clock.now)
    assert (back.state, back.worker, back.host, back.reason) == ("queued", None, "host-a", "input missing on host-a: /shared/a.wav")
    assert store.claim("replica-1.1@host-a:100", lease_s=30, now=clock.now) is None  # same host: not yet
    other = store.claim(B, lease_s=30, now=clock.now)  # another host: at once
    assert (other.id, other.attempts, other.host) == (job.id, 2, "host-b")
    last = store.release(job.id, B, "input missing on host-b: /shared/a.wav", retry_after_s=0.4, now=clock.now)
    assert last.state == "failed"
    assert last.reason == "input missing on host-b: /shared/a.wav (gave up after 2 attempts)"


def test_a_released_job_comes_back_to_its_host_after_the_delay(backend):
    store, clock = backend
    job = store.submit("a", "v", now=clock.now)
    store.claim(A, lease_s=30, now=clock.now)
    store.release(job.id, A, "input missing on host-a", retry_after_s=0.3, now=clock.now)
    later = store.submit("b", "v", now=clock.now)
    assert store.claim(A, lease_s=30, now=clock.now).id == later.id  # the next job meanwhile
    clock.advance(0.5)
    assert store.claim(A, lease_s=30, now=clock.now).id == job.id  # alone in the fleet: it comes back


def test_stats_count_wait_and_who_holds_what(backend):
    store, clock = backend
    empty_stats = store.stats(now=clock.now)
    assert (empty_stats.counts["queued"], empty_stats.oldest_queued_s, empty_stats.held) == (0, None, {})
    for _ in range(4):
        store.submit("a", "v", now=clock.now)
    clock.advance(0.3)
    store.claim(A, 30, now=clock.now)
    store.claim(A.replace("replica-0", "replica-1"), 30, now=clock.now)
    store.claim(B, 30, now=clock.now)
    stats = store.stats(now=clock.now)
    assert stats.counts == {"queued": 1, "running": 3, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert stats.held == {"host-a": 2, "host-b": 1}
    assert 0.29 <= stats.oldest_queued_s < 30


def test_reopen_keeps_data(store):
    job = store.submit("a.wav", "v.mp4", code="keep")
    store.claim("w", 10)
    store.dispose()
    again = store.with_options(max_attempts=5)
    assert again.by_code("keep").state == "running"
    assert again.get(job.id).worker == "w"
    assert again.max_attempts == 5
    again.dispose()


def test_pickles_as_its_settings(store):
    store.ping()  # connected here
    twin = pickle.loads(pickle.dumps(store))
    assert twin.describe() == store.describe() and twin.max_attempts == store.max_attempts
    assert twin.counts() == store.counts()
    twin.dispose()


def _claim_all(store, worker: str, start, out) -> None:
    store.counts()  # connect, then wait until every process is ready, so all claim at once
    start.wait(timeout=60)
    got = []
    while (job := store.claim(worker, lease_s=60)) is not None:
        got.append(job.id)
        time.sleep(0.005)  # "work" outside any transaction, so the others get their turns
        store.succeed(job.id, worker, f"{job.id}.mp4")
    out.put(got, timeout=10)


def test_concurrent_processes_never_share_a_job(store):
    ids = {store.submit("a", "v").id for _ in range(60)}
    ctx = multiprocessing.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(3)
    procs = [ctx.Process(target=_claim_all, args=(store, f"w{i}", start, out)) for i in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    claimed = [i for r in results for i in r]
    assert len(claimed) == len(set(claimed)) == 60
    assert set(claimed) == ids
    assert store.counts()["succeeded"] == 60


# ---- SQLite only ------------------------------------------------------------------------------

def test_sqlite_file_is_wal(tmp_path):
    path = tmp_path / "state" / "jobs.db"
    JobStore(path).close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2


def test_sqlite_store_of_the_previous_version_is_migrated(tmp_path):
    """A jobs.sqlite3 written by the previous release (schema 1) opens with its jobs, and gains
    the columns the fleet needs."""
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, code TEXT NOT NULL UNIQUE, audio TEXT NOT NULL,"
        " video TEXT NOT NULL, output TEXT, state TEXT NOT NULL, progress INTEGER NOT NULL DEFAULT 0,"
        " stage TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0, worker TEXT, lease_until REAL,"
        " reason TEXT, result TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL);"
        "INSERT INTO jobs (code, audio, video, state, created_at, updated_at) VALUES ('old', 'a', 'v', 'queued', 1, 1);"
        "PRAGMA user_version = 1;")
    db.close()
    store = JobStore(path)
    assert store.by_code("old").host is None
    assert store.claim(A, 10).host == "host-a"


def test_sqlite_schema_newer_than_the_program_is_refused(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    JobStore(path).close()
    sqlite3.connect(path).execute("PRAGMA user_version = 99")
    with pytest.raises(StoreConfigError, match="schema 99 is newer than this program"):
        JobStore(path)


def test_an_idle_claim_does_not_wait_for_the_write_lock(tmp_path):
    """Idle workers poll claim() many times a second; with nothing queued it must not queue up
    behind a writer (a submission, a renewal) for the write lock."""
    store = JobStore(tmp_path / "jobs.db")
    writer = sqlite3.connect(store.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process mid-write
    try:
        began = time.monotonic()
        assert store.claim("idle", lease_s=30) is None
        assert time.monotonic() - began < 1.0  # not the 10 s busy timeout
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    job = store.submit("a.wav", "v.mp4", str(tmp_path / "o.mp4"))
    assert store.claim("busy", lease_s=30).id == job.id


def test_a_local_store_is_its_own_worker_view(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    assert store.for_worker(lambda: False) is store and not store.shared


# ---- PostgreSQL only --------------------------------------------------------------------------

def test_pg_leases_run_on_the_database_clock(pg_jobs_url):
    """A caller whose clock is an hour ahead (or behind) neither expires a lease early nor keeps
    one: the server's now() decides."""
    empty(pg_jobs_url)
    store = open_store(pg_jobs_url)
    server = store.clock()
    job = store.submit("a", "v", now=server - 3600)
    assert abs(job.created_at - server) < 5
    claimed = store.claim(A, lease_s=30, now=server - 3600)
    assert claimed.lease_until == pytest.approx(server + 30, abs=5)
    assert store.expire_leases(now=server + 3600) == []  # a fast clock steals nothing
    store.renew(job.id, A, lease_s=0.2, now=server + 3600)
    assert store.get(job.id).lease_until == pytest.approx(server + 0.2, abs=5)
    time.sleep(0.4)
    assert [j.id for j in store.expire_leases(now=server - 3600)] == [job.id]  # a slow one keeps nothing
    store.dispose()


def test_pg_leases_survive_a_server_restart_for_one_lease(postgres, pg_fresh_url):
    """Workers cannot renew while the server is down; once it is back, every lease holds for a
    lease's length (from the server's start), so workers renew before anyone expires their jobs."""
    store = open_store(pg_fresh_url, connect_timeout_s=2)
    store.prepare(migrate=True)
    job = store.submit("a", "v")
    store.claim(A, lease_s=1.5)
    store.dispose()
    postgres.stop()
    time.sleep(2.0)  # longer than the lease
    postgres.start()
    assert store.expire_leases() == []  # expired by the clock, but the server just came back
    store.renew(job.id, A, lease_s=1.5)  # the worker, back, renews: still its job
    assert store.get(job.id).worker == A
    time.sleep(2.0)
    assert [j.id for j in store.expire_leases()] == [job.id]  # a silent worker's lease does end
    store.dispose()


def test_pg_schema_is_made_once_by_racing_daemons_and_recorded(pg_fresh_url):
    import psycopg

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_prepare, args=(pg_fresh_url,)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    with psycopg.connect(pg_fresh_url) as conn:
        assert conn.execute("SELECT version FROM heygem_schema").fetchall() == [(1,)]
    open_store(pg_fresh_url).prepare()  # a reader finds the schema it knows


def _prepare(url: str) -> None:
    open_store(url).prepare(migrate=True)


def test_pg_schema_missing_or_newer_is_a_config_error(pg_fresh_url):
    import psycopg

    store = open_store(pg_fresh_url)
    with pytest.raises(StoreConfigError, match="no job store schema yet; the daemon creates it"):
        store.prepare()
    with pytest.raises(StoreConfigError, match="no job store schema"):
        store.counts()
    store.prepare(migrate=True)
    with psycopg.connect(pg_fresh_url, autocommit=True) as conn:
        conn.execute("INSERT INTO heygem_schema (version) VALUES (7)")
    for migrate in (False, True):
        with pytest.raises(StoreConfigError, match="schema 7 is newer than this program"):
            store.prepare(migrate=migrate)
    store.dispose()


def test_pg_bad_credentials_and_database_are_config_errors_and_never_leak_the_password(postgres):
    for url, what in ((postgres.url.replace(postgres.password, "wrong-password"), "password authentication failed"),
                      (postgres.url_for("no_such_db"), 'database "no_such_db" does not exist')):
        with pytest.raises(StoreConfigError, match=what) as err:
            open_store(url).prepare()
        assert postgres.password not in str(err.value) and "wrong-password" not in str(err.value)
    with pytest.raises(StoreConfigError, match="not a postgresql:// URL"):
        open_store("mysql://db/x")
    with pytest.raises(StoreConfigError, match="invalid URI query parameter"):
        open_store("postgresql://db/x?bogus=1")


def test_pg_server_down_is_unavailable_not_an_error_of_the_job(pg_jobs_url):
    from benchmarks.support.pg import free_port

    down = open_store(f"postgresql://heygem:x@127.0.0.1:{free_port()}/heygem", connect_timeout_s=1)
    for call in (down.prepare, down.ping, down.counts, lambda: down.claim(A, 10)):
        with pytest.raises(StoreUnavailable):
            call()
    assert StoreUnavailable in UNAVAILABLE
    down.dispose()


def test_pg_worker_view_finishes_the_job_in_hand_across_an_outage(postgres, pg_fresh_url):
    """The store goes away while a worker holds a job: progress is skipped, no new job is claimed,
    and the success is reported once the server is back: the job done once, on its first attempt."""
    import threading

    store = open_store(pg_fresh_url, connect_timeout_s=1)
    store.prepare(migrate=True)
    job = store.submit("a", "v")
    other = store.submit("b", "v")
    beats = []
    view = store.for_worker(lambda: beats.append(1) and False)
    assert view.claim(A, lease_s=30).id == job.id
    postgres.stop()
    try:
        began = time.monotonic()
        view.progress(job.id, A, 50, "frames")  # skipped, not raised
        assert view.down
        assert view.claim(A, lease_s=30) is None  # no new work while away
        assert not view.cancelled(job.id)
        assert time.monotonic() - began < 5
        timer = threading.Timer(1.5, postgres.start)
        timer.start()
        done = view.succeed(job.id, A, "out.mp4")  # waits for the store, beating
        timer.join()
    finally:
        postgres.start()
    assert (done.state, done.attempts, done.result) == ("succeeded", 1, "out.mp4")
    assert beats and view.down is None
    assert view.claim(A, lease_s=30).id == other.id
    store.dispose()
