"""Job store: the state machine, leases, durability, and claims from real concurrent processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time

import pytest

from heygem.jobs import (
    STATES, TRANSITIONS, DuplicateCode, IllegalTransition, JobNotFound, JobStore, LeaseLost, transition,
)


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db", max_attempts=2)
    yield s
    s.close()


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


def test_submit_claim_progress_succeed(store):
    job = store.submit("in/a.wav", "in/v.mp4", output="out/r.mp4", code="task-1", now=100.0)
    assert (job.state, job.progress, job.attempts, job.code) == ("queued", 0, 0, "task-1")
    claimed = store.claim("gpu0", lease_s=30, now=101.0)
    assert (claimed.id, claimed.state, claimed.worker, claimed.attempts) == (job.id, "running", "gpu0", 1)
    assert claimed.lease_until == 131.0
    assert store.claim("gpu1", lease_s=30, now=101.0) is None
    store.progress(job.id, "gpu0", 20, "features", now=102.0)
    store.progress(job.id, "gpu0", 10, "late report", now=103.0)
    assert store.get(job.id).progress == 20  # never backwards
    store.renew(job.id, "gpu0", lease_s=30, now=110.0)
    assert store.get(job.id).lease_until == 140.0
    done = store.succeed(job.id, "gpu0", "out/r.mp4", now=120.0)
    assert (done.state, done.progress, done.result, done.lease_until) == ("succeeded", 100, "out/r.mp4", None)
    assert store.by_code("task-1") == done
    assert store.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0}


def test_claims_oldest_first_and_lists_newest_first(store):
    ids = [store.submit("a", "v", now=float(i)).id for i in range(3)]
    assert store.claim("w", 10).id == ids[0]
    assert [j.id for j in store.list()] == ids[::-1]
    assert [j.id for j in store.list(state="queued")] == ids[:0:-1]
    with pytest.raises(ValueError, match="unknown state"):
        store.list(state="done")


def test_duplicate_code_is_a_clear_error(store):
    store.submit("a", "v", code="abc")
    with pytest.raises(DuplicateCode, match="'abc' exists already"):
        store.submit("a2", "v2", code="abc")
    assert store.counts()["queued"] == 1


def test_lease_expiry_requeues_then_fails_with_reason(store):
    job = store.submit("a", "v")
    store.claim("w1", lease_s=10, now=0.0)
    assert store.expire_leases(now=5.0) == []
    [requeued] = store.expire_leases(now=11.0)
    assert (requeued.state, requeued.worker, requeued.reason) == ("queued", None, "lease expired (worker w1)")
    store.claim("w2", lease_s=10, now=12.0)
    [failed] = store.expire_leases(now=30.0)
    assert failed.state == "failed"
    assert failed.reason == "lease expired (worker w2) (gave up after 2 attempts)"
    assert store.claim("w3", 10) is None
    assert store.get(job.id).attempts == 2


def test_stale_worker_cannot_complete(store):
    job = store.submit("a", "v")
    store.claim("w1", lease_s=10, now=0.0)
    store.expire_leases(now=20.0)
    store.claim("w2", lease_s=10, now=21.0)
    for call in (
        lambda: store.succeed(job.id, "w1", "x.mp4"),
        lambda: store.fail(job.id, "w1", "boom"),
        lambda: store.renew(job.id, "w1", 10),
        lambda: store.progress(job.id, "w1", 50, "generate"),
    ):
        with pytest.raises(LeaseLost, match="running by w2, no longer held by w1"):
            call()
    assert store.succeed(job.id, "w2", "y.mp4").result == "y.mp4"
    with pytest.raises(LeaseLost, match="succeeded"):
        store.succeed(job.id, "w2", "again.mp4")


def test_requeue_of_dead_worker_respects_current_holder(store):
    job = store.submit("a", "v")
    store.claim("w1", lease_s=10)
    assert store.requeue(job.id, "worker died", worker="w9") is None
    assert store.requeue(job.id, "worker died", worker="w1").state == "queued"
    assert store.requeue(job.id, "again") is None  # not running: nothing to do


def test_cancel_queued_and_running(store):
    a, b = store.submit("a", "v"), store.submit("b", "v")
    assert store.cancel(a.id) and store.cancelled(a.id)
    store.claim("w", 10)
    assert not store.cancelled(b.id)
    assert store.cancel(b.id) and store.cancelled(b.id)
    with pytest.raises(LeaseLost, match="cancelled"):
        store.succeed(b.id, "w", "r.mp4")
    assert not store.cancel(b.id)
    with pytest.raises(JobNotFound):
        store.cancel(999)


def test_fail_keeps_stage_reason(store):
    job = store.submit("a", "v")
    store.claim("w", 10)
    assert store.fail(job.id, "w", "generate: CUDA out of memory").reason == "generate: CUDA out of memory"


def test_reopen_keeps_data(tmp_path):
    path = tmp_path / "state" / "jobs.db"
    first = JobStore(path)
    job = first.submit("a.wav", "v.mp4", code="keep")
    first.claim("w", 10)
    first.close()
    again = JobStore(path)
    assert again.by_code("keep").state == "running"
    assert again.get(job.id).worker == "w"
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def _claim_all(store: JobStore, worker: str, start, out) -> None:
    store.counts()  # connect, then wait until every process is ready, so all claim at once
    start.wait(timeout=60)
    got = []
    while (job := store.claim(worker, lease_s=60)) is not None:
        got.append(job.id)
        time.sleep(0.005)  # "work" outside any transaction, so the others get their turns
        store.succeed(job.id, worker, f"{job.id}.mp4")
    out.put(got, timeout=10)


def test_concurrent_processes_never_share_a_job(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
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


def test_an_idle_claim_does_not_wait_for_the_write_lock(store, tmp_path):
    """Idle workers poll claim() many times a second; with nothing queued it must not queue up
    behind a writer (a submission, a renewal) for the write lock."""
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
