"""`heygem-ops submit / jobs / cancel` end to end: a real CLI subprocess against a real job store.

A "worker" thread in the test drives jobs through the store's own worker calls (claim, progress,
succeed/fail), as a replica would, while `submit --wait` polls the same SQLite file.
"""

from __future__ import annotations

import json
import os
import threading
import time

import psutil
import pytest

from heygem.jobs import JobStore


@pytest.fixture
def env(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    return {"HEYGEM_OPS_CONFIG": str(config), "COLUMNS": "200"}


@pytest.fixture
def inputs(tmp_path):
    audio, video = tmp_path / "speech.wav", tmp_path / "face.mp4"
    audio.write_bytes(b"RIFF")
    video.write_bytes(b"\0\0\0\x18ftyp")
    return str(audio), str(video)


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "state" / "jobs.sqlite3")


class Worker(threading.Thread):
    """Claims the first job that appears and drives it to success or failure (bounded: 30 s)."""

    def __init__(self, store: JobStore, fail_reason: str | None = None):
        super().__init__(daemon=True)
        self.store, self.fail_reason = store, fail_reason
        self.seen: list[int] = []

    def run(self) -> None:
        deadline = time.monotonic() + 30
        job = None
        while job is None and time.monotonic() < deadline:
            job = self.store.claim("test-worker", lease_s=60)
            time.sleep(0.05)
        if job is None:
            return
        for pct, stage in ((10, "normalised"), (20, "features"), (55, "generate")):
            self.store.progress(job.id, "test-worker", pct, stage)
            self.seen.append(pct)
            time.sleep(0.3)
        if self.fail_reason:
            self.store.fail(job.id, "test-worker", self.fail_reason)
        else:
            self.store.succeed(job.id, "test-worker", "/tmp/out/result.mp4")


def test_submit_list_cancel(cli, env, inputs):
    submitted = cli("submit", *inputs, "--code", "task-1", "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert (job["code"], job["state"], job["audio"], job["video"]) == ("task-1", "queued", *inputs)
    assert "no heygem-ops daemon is running" in submitted.stderr

    second = cli("submit", *inputs, env=env)
    assert second.returncode == 0 and "job 2 queued (code " in second.stdout

    listed = cli("jobs", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [(j["id"], j["state"]) for j in json.loads(listed.stdout)] == [(2, "queued"), (1, "queued")]
    assert [j["position"] for j in json.loads(listed.stdout)] == [2, 1]  # its place in line: oldest first

    assert cli("cancel", "1", env=env).returncode == 0
    again = cli("cancel", "1", env=env)
    assert again.returncode == 1 and "already ended: cancelled" in again.stdout
    missing = cli("cancel", "99", env=env)
    assert missing.returncode == 2 and "no job 99" in missing.stderr

    only = cli("jobs", "--state", "cancelled", "--json", env=env)
    assert [(j["id"], j["reason"]) for j in json.loads(only.stdout)] == [(1, "cancelled")]
    table = cli("jobs", env=env)
    assert table.returncode == 0 and "task-1" in table.stdout and "cancelled" in table.stdout
    assert "2 job(s), newest first" in table.stdout and "queued, position 1" in table.stdout
    assert json.loads(cli("jobs", "--limit", "1", "--json", env=env).stdout)[0]["id"] == 2


def test_unknown_state_exits_2(cli, env):
    result = cli("jobs", "--state", "done", env=env)
    assert result.returncode == 2 and "'done'" in result.stderr and "succeeded" in result.stderr


def test_submit_wait_follows_the_job_to_success(cli, env, inputs, store):
    worker = Worker(store)
    worker.start()
    result = cli("submit", *inputs, "--wait", "--timeout", "60", env=env)
    worker.join(timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job 1 succeeded: /tmp/out/result.mp4" in result.stdout
    assert worker.seen == [10, 20, 55]
    assert store.get(1).state == "succeeded"


def test_submit_wait_reports_the_failure_reason(cli, env, inputs, store):
    worker = Worker(store, fail_reason="detect: no face found in the first 100 frames")
    worker.start()
    result = cli("submit", *inputs, "--wait", "--json", env=env)
    worker.join(timeout=30)
    assert result.returncode == 1
    job = json.loads(result.stdout)
    assert (job["state"], job["reason"]) == ("failed", "detect: no face found in the first 100 frames")
    table = cli("jobs", "--state", "failed", env=env)
    assert "no face found" in table.stdout


def test_submit_wait_gives_up_at_the_timeout(cli, env, inputs):
    result = cli("submit", *inputs, "--wait", "--timeout", "0.5", env=env)
    assert result.returncode == 1
    assert "still queued" in result.stdout and "keeps going" in result.stdout


def test_missing_input_exits_2_naming_the_file(cli, env, inputs, tmp_path):
    result = cli("submit", inputs[0], str(tmp_path / "nope.mp4"), env=env)
    assert result.returncode == 2
    assert "nope.mp4" in result.stderr and "does not exist" in result.stderr
    bad_out = cli("submit", *inputs, "--out", str(tmp_path / "no" / "dir" / "x.mp4"), env=env)
    assert bad_out.returncode == 2 and "does not exist" in bad_out.stderr
    assert not (tmp_path / "state" / "jobs.sqlite3").exists() or JobStore(tmp_path / "state" / "jobs.sqlite3").list() == []


def test_duplicate_code_exits_2(cli, env, inputs):
    assert cli("submit", *inputs, "--code", "same", env=env).returncode == 0
    result = cli("submit", *inputs, "--code", "same", env=env)
    assert result.returncode == 2 and "'same' exists already" in result.stderr


def test_no_warning_when_the_daemon_runs(cli, env, inputs, tmp_path):
    """The pidfile names a live process (this test runner stands in for the daemon)."""
    me = psutil.Process()
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "daemon.json").write_text(json.dumps(
        {"pid": os.getpid(), "create_time": me.create_time(), "http": None, "started": time.time()}))
    result = cli("submit", *inputs, env=env)
    assert result.returncode == 0 and result.stderr == ""


def test_help_shows_examples(cli):
    for command, example in (("submit", "heygem-ops submit speech.wav"), ("jobs", "heygem-ops jobs --state"),
                             ("cancel", "heygem-ops cancel 42")):
        result = cli(command, "--help")
        assert result.returncode == 0 and example in result.stdout
