"""Chaos batch: the incident's batch through a real daemon while its processes are killed and hung.

One daemon subprocess (2 CPU replicas) takes demo jobs over HTTP. Between submissions the test
SIGKILLs a random stage process, SIGSTOPs one (a hang), and SIGKILLs the daemon itself, then
starts a new daemon on the same state directory. Every signal goes to a process this test's
daemon started, found in its snapshot and verified by pid, create time and parent.

At the end: every job succeeded exactly once with a playable video of the audio's length; no
process of ours is left (zombie or orphan); no shared-memory segment of ours is left; and the
alert log shows each fault, named, with the action taken. Detection latencies are printed
(`pytest -s`); benchmarks/bench_batch.py reports them over a larger batch.

`Batch` and `chaos` live in benchmarks/support/chaos.py, shared with the benchmark.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from benchmarks.support.chaos import AUDIO_S, CONFIG, FPS, Batch, alive, chaos, latency_table, log_time, outliving, shm_heygem
from heygem import assets
from tests.daemon_helpers import Daemon, wait_for
from tests.test_pipeline import frame_count

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos-media")
    return {"template": assets.make_template_video(root / "template.mp4", seconds=2.0, fps=FPS),
            "audio": assets.make_speech_audio(root / "speech.wav", seconds=AUDIO_S)}


def test_a_batch_survives_killed_hung_stages_and_a_killed_daemon(tmp_path, media):
    shm_before = shm_heygem()
    batch = Batch(tmp_path, CONFIG, media["audio"], media["template"])
    try:
        batch.start_daemon()
        chaos(batch, before_each=lambda: batch.submit(3))
        assert batch.wait(batch.done, 180, every_s=0.5), [(j.code, j.state, j.stage) for j in batch.jobs()]
    finally:
        left = batch.close()
    print("\n" + latency_table(batch.faults))

    jobs = batch.jobs()
    failed = {j.code: j.reason for j in jobs if j.state != "succeeded"}
    assert not failed, f"jobs that did not succeed: {failed}"
    succeeded = [r["job"] for r in batch.records() if r.get("event") == "job_succeeded"]
    twice = {j for j in succeeded if succeeded.count(j) > 1}
    assert sorted(succeeded) == sorted(j.id for j in jobs) and not twice, f"completed more than once: {twice}"
    for job in jobs:
        assert frame_count(job.result) == round(AUDIO_S * FPS), job.result

    assert len(batch.seen) > 12, "the batch saw too few processes: the leftover check below would prove nothing"
    assert not left, f"processes of ours left behind: {[(p.pid, p.status()) for p in left]}"
    assert batch.segments, "no shared-memory segment seen: the leak check below would prove nothing"
    leaked = (shm_heygem() - shm_before) & batch.segments
    assert not leaked, f"shared-memory segments left behind: {leaked}"

    restarts = [(log_time(r), r["replica"], r["why"]) for r in batch.records() if r.get("event") == "replica_restarted"]
    for fault in batch.faults:
        assert fault.detected is not None, fault
        if fault.kind in ("worker_dead", "worker_hung"):
            replica = fault.target.split("/")[0].replace("-", " ")
            assert replica in fault.action, f"the action must name {replica}: {fault}"
            index = int(replica.split()[1])
            assert any(t >= fault.at and i == index and fault.kind in why for t, i, why in restarts), \
                f"{replica} was never restarted for {fault}: {restarts}"
    assert {f.kind for f in batch.faults} >= {"worker_dead", "worker_hung", "daemon_killed"}


SUPERVISOR = """
import os, signal, sys
from pathlib import Path
from heygem.config import PipelineConfig
from heygem.jobs import TERMINAL, JobStore
from heygem.pipeline import Pipeline

if __name__ == "__main__":
    p = Pipeline(PipelineConfig(), JobStore(sys.argv[1]), models_dir=Path(sys.argv[2]), output_dir=Path(sys.argv[3]))
    p.start()  # spawns the stages and returns while they are still importing
    print(" ".join(str(pid) for pid in p.replicas[0].pids().values()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies before its stages run a line of their own
"""


def test_a_stage_born_after_its_supervisor_died_exits(tmp_path):
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR)
    sup = subprocess.Popen([sys.executable, str(script), str(tmp_path / "jobs.sqlite3"), str(tmp_path / "models"),
                            str(tmp_path / "out")], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        stages = [psutil.Process(int(p)) for p in sup.stdout.readline().split()]
    finally:
        sup.wait(timeout=60)
    assert len(stages) == 3 and sup.returncode == -signal.SIGKILL
    left = outliving(stages, 10)
    for proc in left:  # processes this test started
        proc.kill()
    assert not left, f"stages outlived their supervisor: {[p.pid for p in left]}"


def test_two_replicas_dying_together_each_alert_names_its_own_replica(tmp_path):
    d = Daemon(tmp_path, "[pipeline]\ncpu_replicas = 2\n[actions]\nbackoff_initial_s = 0.2\n")
    try:
        assert d.wait_notify("READY=1", 120), d.log_path.read_text()[-3000:]
        victims = [psutil.Process(d.stage_pid("decode", replica=i)) for i in (0, 1)]
        assert all(v.ppid() == d.proc.pid for v in victims)
        for victim in victims:  # processes of the daemon this test started
            victim.kill()
        fired = wait_for(lambda: len(d.alerts("worker_dead")) >= 2 and d.alerts("worker_dead"), 30)
        assert fired, d.log_path.read_text()[-3000:]
        for alert in fired:
            replica = alert["key"].split("/")[0].replace("-", " ")
            assert replica in alert["action"], (alert["key"], alert["action"])
    finally:
        d.stop()


def test_a_stage_hung_inside_a_store_transaction_is_still_restarted(tmp_path):
    d = Daemon(tmp_path, "[rules]\nheartbeat_timeout_s = 2.0\n[actions]\nbackoff_initial_s = 0.2\nterm_grace_s = 1.0\n")
    victim = None
    try:
        assert d.wait_notify("READY=1", 120), d.log_path.read_text()[-3000:]
        victim = psutil.Process(d.stage_pid("encode"))
        assert victim.ppid() == d.proc.pid
        # The lock a stage SIGSTOPped inside store.renew() would hold: the same SQLite write lock.
        held = sqlite3.connect(d.state / "jobs.sqlite3", isolation_level=None, timeout=1)
        held.execute("BEGIN IMMEDIATE")
        try:
            victim.suspend()
            fired = wait_for(lambda: d.alerts("worker_hung"), 15)
            gone = not outliving([victim], 8)
        finally:
            held.execute("ROLLBACK")
            held.close()
        assert fired, [(r.get("event"), r.get("error")) for r in d.records() if r.get("event") == "tick_failed"][:3]
        assert gone, "the hung stage was not stopped"
    finally:
        if victim is not None and alive(victim):  # a process of the daemon this test started
            victim.kill()
        d.stop()
