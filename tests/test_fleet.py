"""A fleet on PostgreSQL: real daemons sharing one job store, real faults.

- Two hosts on one machine (two daemons, each its own state directory and host name, one
  PostgreSQL): both APIs take jobs, both hosts' replicas run any of them; one host is SIGKILLed
  with its workers mid-batch and the other finishes its jobs, each exactly once. A job whose input
  the first host cannot see goes to the second, the reason recorded.
- The database down at the daemon's start (it serves, alerts and starts the pipeline once the
  store answers), lost mid-run (jobs in hand are finished, none is lost or run twice), a bad
  URL or bad credentials (exit 2, no password in any message).

Hosts' storage: "a file only host B has" is a path under /proc/self/cwd, which each process
resolves against its own working directory: the two daemons run in different ones.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from heygem import assets
from heygem.jobs import open_store, worker_host
from tests.daemon_helpers import ROOT, Daemon, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-media")
    return {
        "root": root,
        "template": assets.make_template_video(root / "face.mp4", seconds=1.0, size=(320, 180)),
        "audio": assets.make_speech_audio(root / "speech.wav", seconds=0.8),
        "long": assets.make_speech_audio(root / "long.wav", seconds=6.0, seed=3),
    }


@pytest.fixture
def daemons(tmp_path):
    started: list[Daemon] = []

    def start(name: str, config: str = "", daemon_keys: str = "", cwd: Path | None = None, **kw) -> Daemon:
        (tmp_path / name).mkdir(exist_ok=True)
        # cwd: the daemon's working directory (its "storage" for /proc/self/cwd paths); the
        # editable install finds the code from anywhere.
        kw.setdefault("input_roots", (tmp_path.parent,))  # the session's folders: the media are made there
        d = Daemon(tmp_path / name, config, daemon_keys=f'host_name = "{name}"\n' + daemon_keys, root=cwd or ROOT, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop_and_clear()
    from heygem import segments

    segments.sweep()  # the shared memory of a SIGKILLed daemon's replicas (dead supervisors' only)


def _mkdirs(tmp_path: Path, *names: str) -> None:
    for name in names:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)


def store_config(url: str, lease_s: float, extra: str = "") -> str:
    return (f'[store]\nurl = "{url}"\nconnect_timeout_s = 1.0\n[pipeline]\nlease_s = {lease_s}\n'
            f'max_attempts = 5\nface_box = [96, 40, 128, 128]\n{extra}')


def ready(d: Daemon, timeout_s: float = 120) -> bool:
    return bool(wait_for(lambda: d.http("/readyz")[0] == 200 or d.proc.poll() is not None, timeout_s, 0.2)) \
        and d.proc.poll() is None


def answers(read):
    """`read()`, or None while the store is away (the test's own connections ride out outages too)."""
    from heygem.jobs import UNAVAILABLE

    try:
        return read()
    except UNAVAILABLE:
        return None


def log_events(d: Daemon, event: str) -> list[dict]:
    return [r for r in d.records() if r.get("event") == event]


def scrape(d: Daemon) -> dict:
    status, text = d.http("/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_two_hosts_one_queue_a_dead_host_loses_only_time(daemons, media, tmp_path, pg_fresh_url):
    shared = tmp_path / "shared"  # the fleet's shared storage (NFS in real life), the same path on both hosts
    out = shared / "out"
    _mkdirs(tmp_path, "shared/out", "cwd-a", "cwd-b/only-b")
    for name in ("speech.wav", "face.mp4"):
        (shared / name).write_bytes((media["root"] / name).read_bytes())
        (tmp_path / "cwd-b" / "only-b" / name).write_bytes((media["root"] / name).read_bytes())
    config = store_config(pg_fresh_url, lease_s=5.0)
    keys = f'data_dir = "{shared}"\n'
    a = daemons("host-a", config, keys, cwd=tmp_path / "cwd-a")
    assert ready(a), a.log_path.read_text()[-3000:]
    store = open_store(pg_fresh_url)

    # Inputs only host B can see: host A gives them back, with the reason, for another host.
    elsewhere = [store.submit("/proc/self/cwd/only-b/speech.wav", "/proc/self/cwd/only-b/face.mp4",
                              str(out / f"only-b-{i}.mp4"), code=f"only-b-{i}").id for i in range(2)]
    assert wait_for(lambda: all((j := store.get(i)).reason and j.reason.startswith("input missing on host-a")
                                for i in elsewhere), 30), [store.get(i) for i in elsewhere]
    b = daemons("host-b", config, keys, cwd=tmp_path / "cwd-b")
    assert ready(b), b.log_path.read_text()[-3000:]

    # 60 jobs through both hosts' APIs (the official client's protocol); any host runs any job.
    codes = [f"job-{i:02d}" for i in range(60)]
    for i, code in enumerate(codes):
        status, body = (a if i % 2 else b).http("/easy/submit", {"audio_url": "speech.wav", "video_url": "face.mp4",
                                                                  "code": code})
        assert status == 200 and body["code"] == 10000, body

    # Mid-batch, once host A holds work, the host dies: daemon and workers SIGKILLed at once.
    held_by_a = wait_for(lambda: [j.id for j in store.list("running", 100) if j.host == "host-a"]
                         if store.counts()["succeeded"] >= 8 else None, 120, 0.05)
    assert held_by_a, store.counts()
    victims = [a.proc.pid, *a.descendants()]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    a.proc.wait(timeout=10)
    died_at = time.time()

    done = wait_for(lambda: store.counts()["succeeded"] == 62 or None, 180, 0.5)
    jobs = {j.code: j for j in store.list(limit=200)}
    assert done, collections.Counter(j.state for j in jobs.values())
    assert all(j.state == "succeeded" and Path(j.result).is_file() for j in jobs.values())

    # Exactly once: never two success lines for a job in the two hosts' logs together. A job whose
    # line is missing was completed by host A in the instant it died (committed, not yet logged).
    # (A success is committed before its line is written: give the living host's lines a moment.)
    def logged():
        return collections.Counter(r["job"] for d in (a, b) for r in log_events(d, "job_succeeded"))
    wait_for(lambda: all(j.id in logged() for j in jobs.values() if j.host == "host-b") or None, 10, 0.2)
    succeeded = logged()
    assert set(succeeded.values()) == {1}, succeeded
    unlogged = [j for j in jobs.values() if j.id not in succeeded]
    assert len(unlogged) <= 2 and all(j.host == "host-a" and j.attempts == 1 for j in unlogged), unlogged

    # The survivor took over the dead host's jobs: their leases expired on its watch, it ran them.
    expired = {r["job"]: r for r in log_events(b, "job_lease_expired")}
    taken = [i for i in held_by_a if i in expired]
    assert taken and all(expired[i]["host"] == "host-a" and expired[i]["by"] == "host-b" for i in taken), expired
    for job_id in taken:
        job = store.get(job_id)
        assert (job.host, worker_host(job.worker), job.attempts) == ("host-b", "host-b", 2)
        assert job.updated_at > died_at
    claimed_by_b = {r["job"] for r in log_events(b, "job_claimed")}
    assert set(taken) <= claimed_by_b

    # Both hosts worked; every worker name carries its host.
    hosts = collections.Counter(j.host for j in jobs.values())
    assert set(hosts) == {"host-a", "host-b"} and all(worker_host(j.worker) == j.host for j in jobs.values()), hosts
    for i in elsewhere:  # run by host B, host A's reason kept
        job = store.get(i)
        assert job.host == "host-b" and job.reason.startswith("input missing on host-a: /proc/self/cwd/only-b/"), job
    assert log_events(a, "job_released")

    # What an operator sees: metrics labelled by host, the fleet in `status` and `jobs`.
    held = ("heygem_jobs_held", (("host", "host-b"),))
    samples = wait_for(lambda: (m := scrape(b))[held] == 0 and m, 10)  # /metrics: the last tick's view
    assert samples and samples[("heygem_store_up", (("host", "host-b"),))] == 1
    assert samples[("heygem_job_events_total", (("event", "claimed"), ("host", "host-b")))] >= 1  # as ticks saw them
    store.dispose()


def test_fleet_view_in_jobs_and_status(daemons, cli, media, tmp_path, pg_fresh_url):
    """`jobs` and `status` show which host holds which job (here: a worker of another host)."""
    from urllib.parse import urlsplit

    c = daemons("host-c", store_config(pg_fresh_url, lease_s=30.0))  # creates the schema
    assert ready(c), c.log_path.read_text()[-3000:]
    c.stop()  # before the submit: no replica of ours may claim (and finish) it first
    store = open_store(pg_fresh_url)
    job = store.submit(str(media["audio"]), str(media["template"]), str(tmp_path / "o.mp4"), code="elsewhere")
    held = store.claim("replica-3.1@gpu-09:777", lease_s=600)
    assert held.id == job.id
    env = {"HEYGEM_OPS_CONFIG": str(c.config)}
    listed = cli("jobs", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "host" in listed.stdout and "gpu-09" in listed.stdout
    as_json = json.loads(cli("jobs", "--json", env=env).stdout)
    assert as_json[0]["host"] == "gpu-09"
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["store"]["backend"] == "postgresql" and report["store"]["shared"]
    assert report["store"]["hosts"] == {"gpu-09": [job.id]}
    assert report["store"]["where"].startswith("postgresql://heygem@127.0.0.1:")
    assert urlsplit(pg_fresh_url).password not in json.dumps(report)
    text = cli("status", env=env).stdout
    assert "fleet" in text and "gpu-09 holds 1 (job" in text
    store.dispose()


def test_database_down_at_start_then_up(daemons, media, tmp_path):
    """A down server is an alert and a retrying start, not an exit: /healthz answers, /readyz
    says why, and the pipeline starts (schema created) once the server answers."""
    from benchmarks.support.pg import Cluster

    pg = Cluster.create()
    try:
        pg.stop()
        d = daemons("host-d", store_config(pg.url, lease_s=30.0))
        assert wait_for(lambda: d.alerts("store_unavailable"), 60), d.log_path.read_text()[-3000:]
        assert d.proc.poll() is None
        assert d.http("/healthz")[0] == 200
        status, body = d.http("/readyz")
        assert status == 503 and "job store" in body["reasons"] and "unreachable" in body["reasons"]["job store"]
        assert scrape(d)[("heygem_store_up", (("host", "host-d"),))] == 0
        assert pg.password not in d.log_path.read_text()
        pg.start()
        assert ready(d, 90), d.log_path.read_text()[-3000:]
        assert d.alerts("store_unavailable", "resolved")
        status, body = d.http("/easy/submit", {"audio_url": str(media["audio"]), "video_url": str(media["template"]),
                                               "code": "after"})
        assert body["code"] == 10000, body
        assert wait_for(lambda: d.http("/easy/query?code=after")[1]["data"]["status"] == 2, 90, 0.3)
        assert d.stop() == 0  # while its store is there: a clean stop
    finally:
        pg.destroy()


def test_database_lost_mid_run_finishes_held_jobs_and_runs_none_twice(daemons, media, tmp_path):
    from benchmarks.support.pg import Cluster

    pg = Cluster.create()
    try:
        d = daemons("host-e", store_config(pg.url, lease_s=3.0))
        assert ready(d), d.log_path.read_text()[-3000:]
        store = open_store(pg.url, connect_timeout_s=1)
        ids = [store.submit(str(media["long"]), str(media["template"]), str(tmp_path / f"e{i}.mp4")).id for i in range(3)]
        assert wait_for(lambda: store.get(ids[0]).progress >= 20, 60)
        pg.stop()
        outage = time.monotonic()
        assert wait_for(lambda: (r := d.http("/readyz"))[0] == 503 and "job store" in r[1]["reasons"] and r, 30)
        assert d.alerts("store_unavailable")
        time.sleep(max(0.0, 7.0 - (time.monotonic() - outage)))  # longer than two leases
        pg.start()
        assert wait_for(lambda: answers(lambda: all(store.get(i).state == "succeeded" for i in ids)), 120), \
            [store.get(i) for i in ids]
        assert [store.get(i).attempts for i in ids] == [1, 1, 1]  # none lost, none run twice
        assert ready(d, 30) and d.alerts("store_unavailable", "resolved")
        assert not log_events(d, "job_lease_expired")
        succeeded = collections.Counter(r["job"] for r in log_events(d, "job_succeeded"))
        assert succeeded == {i: 1 for i in ids}
        store.dispose()
        assert d.stop() == 0
    finally:
        pg.destroy()


def test_bad_store_url_or_credentials_exit_2_without_the_password(daemons, cli, tmp_path, postgres):
    bad = tmp_path / "bad.toml"
    bad.write_text('[store]\nurl = "mysql://u:hunter2secret@db/x"\n')
    result = cli("--config", str(bad), "daemon")
    assert result.returncode == 2 and "[store] url" in result.stderr and "not a postgresql:// URL" in result.stderr
    assert "hunter2secret" not in result.stderr + result.stdout
    wrong = postgres.url.replace(postgres.password, "hunter2secret")
    d = daemons("host-f", f'[store]\nurl = "{wrong}"\n')
    assert d.proc.wait(timeout=60) == 2
    log = d.log_path.read_text()
    assert "password authentication failed" in log and "hunter2secret" not in log and postgres.password not in log
