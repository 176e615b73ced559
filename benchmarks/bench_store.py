"""The job store, SQLite vs PostgreSQL side by side: claims per second under concurrency, the
latency of each store call, and what a shared store adds to one job.

    .venv/bin/python benchmarks/bench_store.py                     # 2000 jobs; 1, 4, 16 claimers; 3 rounds
    .venv/bin/python benchmarks/bench_store.py --pg-url postgresql://u:p@db/x   # a real server

1. Claims per second: N processes (each its own connection, as replicas have) claim and complete
   (`claim` then `succeed`) a pre-filled queue until it is empty, all starting at one barrier.
   Reported: completed claims / wall time.
2. Call latency, one process, the calls a job's life makes (median and p99 of `--calls` each).
3. A job's store time on its critical path: submit, claim, progress 10 / 20 / 90, the renewal
   before publishing, succeed (the calls that run between a job's start and its end, not
   overlapped by frames); the rest (progress every 0.5 s, cancel polls, renewals) runs beside
   the frames and is reported per minute of job.
4. Pickup: submit -> claimed by an idle replica that polls as decode does (every CLAIM_POLL_S).

PostgreSQL: without --pg-url, a throwaway cluster (benchmarks/support/pg.py) on this machine,
durable like the SQLite store (fsync on, synchronous_commit on; SQLite runs synchronous=FULL).
Both stores are on the same disk. Without PostgreSQL here, its column says why.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from heygem.jobs import JobStore, open_store  # noqa: E402

WORKER = "replica-{}.1@bench:{}"


def _claimer(store, index: int, start, out) -> None:
    worker = WORKER.format(index, index)
    store.counts()  # connected before the start
    start.wait(timeout=120)
    n = 0
    while (job := store.claim(worker, lease_s=60)) is not None:
        store.succeed(job.id, worker, f"/out/{job.id}.mp4")
        n += 1
    out.put((index, n, time.perf_counter()), timeout=30)


def claims_per_second(make_store, claimers: int, jobs: int) -> float:
    store = make_store()
    for i in range(jobs):
        store.submit("/in/a.wav", "/in/v.mp4", f"/out/{i}.mp4")
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(claimers + 1), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(store, i, start, out)) for i in range(claimers)]
    for p in procs:
        p.start()
    start.wait(timeout=120)
    began = time.perf_counter()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    done = sum(n for _, n, _ in results)
    assert done == jobs and store.counts()["succeeded"] == jobs, (done, store.counts())
    store.dispose()
    return jobs / (max(t for _, _, t in results) - began)


def latencies(store, calls: int) -> dict[str, list[float]]:
    """Seconds per call, by call, over `calls` jobs' lives (one process)."""
    out: dict[str, list[float]] = {k: [] for k in ("submit", "claim", "progress", "renew", "succeed", "cancelled",
                                                   "claim (empty)")}

    def timed(name, fn):
        t = time.perf_counter()
        value = fn()
        out[name].append(time.perf_counter() - t)
        return value

    worker = WORKER.format(0, 0)
    for i in range(calls):
        job = timed("submit", lambda: store.submit("/in/a.wav", "/in/v.mp4", f"/out/l{i}.mp4"))
        timed("claim", lambda: store.claim(worker, 30))
        for pct in (10, 20, 90):
            timed("progress", lambda: store.progress(job.id, worker, pct, "frames"))
        timed("renew", lambda: store.renew(job.id, worker, 30))
        timed("cancelled", lambda: store.cancelled(job.id))
        timed("succeed", lambda: store.succeed(job.id, worker, "/out/x.mp4"))
        timed("claim (empty)", lambda: store.claim(worker, 30))
    return out


def _poller(store, ready, stop, out) -> None:
    from heygem.stages import CLAIM_POLL_S

    worker = WORKER.format(9, 9)
    store.counts()
    ready.set()
    while not stop.is_set():
        job = store.claim(worker, 30)
        if job is None:
            time.sleep(CLAIM_POLL_S)
            continue
        out.put((job.id, time.time()))
        store.succeed(job.id, worker, "/out/p.mp4")


def pickups(make_store, n: int) -> list[float]:
    """Seconds from submit (returned) to claimed, by an idle replica polling as decode does."""
    store = make_store()
    ctx = multiprocessing.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_poller, args=(store, ready, stop, out))
    proc.start()
    ready.wait(timeout=60)
    waits = []
    try:
        for i in range(n):
            time.sleep(0.137)  # off the poll's phase
            submitted = time.time()
            job = store.submit("/in/a.wav", "/in/v.mp4", f"/out/p{i}.mp4")
            got, claimed = out.get(timeout=30)
            assert got == job.id
            waits.append(claimed - submitted)
    finally:
        stop.set()
        proc.join(timeout=30)
    store.dispose()
    return waits


def ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000, help="jobs each claims-per-second run empties")
    ap.add_argument("--claimers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=3, help="runs of each case, the backends taking turns; the median")
    ap.add_argument("--calls", type=int, default=300, help="jobs' lives timed call by call")
    ap.add_argument("--pickups", type=int, default=40)
    ap.add_argument("--pg-url", help="an existing PostgreSQL database (default: a throwaway local cluster)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    cluster, pg_why = None, None
    counter = iter(range(1_000_000))
    if args.pg_url is None:
        from benchmarks.support.pg import Cluster, unavailable

        pg_why = unavailable()
        if pg_why is None:
            cluster = Cluster.create(settings={"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"})

    def sqlite():
        return JobStore(tmp / f"jobs-{next(counter)}.sqlite3")

    def postgresql():
        url = args.pg_url or cluster.fresh_database()
        store = open_store(url, pool_size=2)
        store.prepare(migrate=True)
        if args.pg_url:
            import psycopg

            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("TRUNCATE heygem_jobs RESTART IDENTITY")
        return store

    backends = {"sqlite": sqlite}
    if cluster is not None or args.pg_url:
        backends["postgresql"] = postgresql
    where = args.pg_url and "given server" or (cluster and "throwaway local cluster, fsync on")
    print(f"job store benchmark: {args.jobs} jobs per run; PostgreSQL: {where or 'n/a: ' + str(pg_why)}")
    try:
        print(f"\n{'claims/s (claim + succeed)':<30}{'sqlite':>12}{'postgresql':>12}   (median of {args.rounds})")
        for n in args.claimers:
            runs: dict[str, list[float]] = {name: [] for name in backends}
            for _ in range(args.rounds):  # side by side: the machine's load changes under both alike
                for name, make in backends.items():
                    runs[name].append(claims_per_second(make, n, args.jobs))
            row = {name: statistics.median(v) for name, v in runs.items()}
            label = f"claims/s, {n} claimer{'s' if n > 1 else ''}"
            print(f"{label:<30}{row['sqlite']:>12.1f}{row.get('postgresql', float('nan')):>12.1f}", flush=True)

        lat = {name: latencies(make(), args.calls) for name, make in backends.items()}
        print(f"\n{'call latency, ms':<30}{'sqlite p50':>12}{'p99':>8}{'postgresql p50':>16}{'p99':>8}")
        for call in lat["sqlite"]:
            s, p = lat["sqlite"][call], lat.get("postgresql", {}).get(call, [])
            print(f"{call:<30}{ms(s, 0.5):>12.2f}{ms(s, 0.99):>8.2f}{ms(p, 0.5):>16.2f}{ms(p, 0.99):>8.2f}")
        # critical path: submit, claim, 3 progress, the renewal before publishing, succeed
        path = {name: sum(statistics.median(v[c]) * k for c, k in (("submit", 1), ("claim", 1), ("progress", 3),
                                                                     ("renew", 1), ("succeed", 1)))
                for name, v in lat.items()}
        # beside the frames, per minute of job: progress every 0.5 s (encode), cancel polls every
        # 0.5 s in each of 3 stages, renewals every lease/3 = 10 s in decode and encode
        beside = {name: 60 * (2 * statistics.median(v["progress"]) + 6 * statistics.median(v["cancelled"])
                              + 0.2 * statistics.median(v["renew"])) for name, v in lat.items()}
        pg_path = path.get("postgresql", float("nan"))
        print(f"\n{'a job, critical path (ms)':<30}{path['sqlite'] * 1000:>12.2f}{pg_path * 1000:>12.2f}"
              f"   shared store adds {1000 * (pg_path - path['sqlite']):+.2f} ms per job")
        print(f"{'beside frames, ms per job-min':<30}{beside['sqlite'] * 1000:>12.1f}"
              f"{beside.get('postgresql', float('nan')) * 1000:>12.1f}   (spread over the stage processes)")

        picks = {name: pickups(make, args.pickups) for name, make in backends.items()}
        p = picks.get("postgresql", [])
        print(f"{'pickup p50 / p90 (ms)':<30}{ms(picks['sqlite'], 0.5):>6.1f} /{ms(picks['sqlite'], 0.9):>5.1f}"
              f"{ms(p, 0.5):>6.1f} /{ms(p, 0.9):>5.1f}   (an idle replica polls every 50 ms)")
    finally:
        if cluster is not None:
            cluster.destroy()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
