"""`heygem-ops logs`: field-based categories (pure), and the command on a real log file.

The log is what the daemon writes: structlog JSON lines, alert events with their fields, plus a
non-JSON traceback as a crashing library would print it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ops.logs import Selector, category, parse_since

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.now(timezone.utc)


def _ts(minutes_ago: float) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).isoformat().replace("+00:00", "Z")


def _alert(name: str, state: str = "firing", level: str = "warning", **evidence) -> dict:
    return {"event": "alert", "alert": name, "key": "0", "state": state, "severity": "warning", "level": level,
            "summary": f"{name} summary", "evidence": evidence, "action": "", "component": "daemon"}


# (name for the test, record or raw line, minutes ago)
RECORDS = [
    ("start", {"event": "daemon_starting", "level": "info", "component": "daemon", "pid": 4242}, 130),
    ("queue_full", _alert("queue_full", depth=10, capacity=10), 125),
    ("cpu_fallback", _alert("cpu_fallback", level="error", replica=0), 120),
    ("gpu_probe", {"event": "gpu_probe_unavailable", "level": "warning", "component": "daemon",
                   "reason": "libnvidia-ml.so.1: cannot open shared object file"}, 119),
    ("zombies", _alert("zombies", count=41, parent=3131), 118),
    ("nudged", {"event": "zombie_parent_nudged", "level": "info", "component": "daemon", "parent": 3131}, 117),
    ("restarted", {"event": "replica_restarted", "level": "warning", "component": "daemon", "replica": 0,
                   "why": ["worker_dead"], "requeued": 1}, 116),
    ("crash_loop", _alert("crash_loop", level="error", restarts=5), 10),
    ("claimed", {"event": "job_claimed", "level": "info", "component": "pipeline", "job": 7, "attempt": 1}, 9),
    ("job_failed_event", {"event": "job_failed", "level": "warning", "component": "pipeline", "job": 7,
                          "reason": "detect: no face"}, 8),
    ("job_failed_alert", _alert("job_failed", job=7), 8),
    ("stage_fatal", {"event": "stage_fatal", "level": "error", "component": "daemon", "replica": 0,
                     "stage": "generate", "reason": "CUDA out of memory"}, 7),
    ("traceback", "Traceback (most recent call last):\n  File \"stages.py\", line 3\nRuntimeError: boom", None),
    ("idle", _alert("gpu_idle_busy_queue", gpu=3, util_pct=0, mem_used_mib=45000), 6),
    ("stalled_resolved", _alert("stage_stalled", state="resolved", level="info"), 5),
    ("tick_failed", {"event": "tick_failed", "level": "error", "component": "daemon",
                     "exception": "Traceback ... ValueError"}, 4),
]

EXPECTED = {
    "queue": ["queue_full", "idle", "stalled_resolved"],
    "gpu": ["cpu_fallback", "gpu_probe", "idle"],
    "zombie": ["zombies", "nudged"],
    "worker": ["restarted", "crash_loop", "stage_fatal", "traceback"],
    "job": ["claimed", "job_failed_event", "job_failed_alert"],
    "error": ["cpu_fallback", "crash_loop", "stage_fatal", "traceback", "tick_failed"],
}


def _line(name: str, item, minutes_ago) -> str:
    if isinstance(item, str):
        return item
    record = {"timestamp": _ts(minutes_ago), **item, "test_name": name}
    if item["event"] == "alert":  # an alert's line shows its evidence, not its other fields
        record["evidence"] = {**item["evidence"], "test_name": name}
    return json.dumps(record, ensure_ascii=False)


@pytest.fixture
def logfile(tmp_path) -> Path:
    path = tmp_path / "daemon.log"
    path.write_text("".join(_line(*r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def _names(stdout: str) -> list[str]:
    """Which records a human rendering shows: by test_name, or 'traceback' for its first line."""
    names = []
    for line in stdout.splitlines():
        if "test_name=" in line:
            names.append(line.split("test_name=")[1].split()[0])
        elif line.startswith("Traceback"):
            names.append("traceback")
    return names


# ---- pure functions ----------------------------------------------------------------------------

def test_category_is_field_based():
    assert category({"event": "alert", "alert": "queue_full", "level": "warning"}) == {"queue"}
    assert category({"event": "alert", "alert": "gpu_idle_busy_queue", "level": "warning"}) == {"queue", "gpu"}
    assert category({"event": "alert", "alert": "cpu_fallback", "level": "error"}) == {"gpu", "error"}
    assert category({"event": "alert", "alert": "orphans"}) == {"zombie"}
    assert category({"event": "alert", "alert": "worker_hung"}) == {"worker"}
    assert category({"event": "alert", "alert": "job_failed"}) == {"job"}
    assert category({"event": "job_succeeded", "level": "info"}) == {"job"}
    assert category({"event": "external_restarted"}) == {"worker"}
    assert category({"event": "reaped"}) == {"zombie"}
    assert category({"event": "tick_failed", "level": "CRITICAL"}) == {"error"}
    assert category({"event": "alert", "alert": "disk_low", "level": "warning"}) == set()
    # a message that merely mentions a word is not in its category
    assert category({"event": "daemon_started", "level": "info", "note": "GPU queue zombie job error"}) == set()


def test_parse_since():
    now = 1_700_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1d", now) == now - 86400
    assert parse_since("2023-11-14T22:13:20Z", now) == 1_700_000_000.0
    assert parse_since("2023-11-14T23:13:20+01:00", now) == 1_700_000_000.0
    assert parse_since("2023-11-14 22:13:20", now) == 1_700_000_000.0  # no zone: UTC, like the log
    with pytest.raises(ValueError):
        parse_since("yesterday", now)


def test_non_json_lines_follow_the_record_before_them():
    selector = Selector(["error"])
    assert selector.wants(None) is False  # nothing before it, a filter is active
    assert selector.wants({"event": "tick_failed", "level": "error"}) is True
    assert selector.wants(None) is True
    assert selector.wants({"event": "daemon_started", "level": "info"}) is False
    assert selector.wants(None) is False
    assert Selector().wants(None) is True


# ---- the command -------------------------------------------------------------------------------

@pytest.mark.parametrize("cat", sorted(EXPECTED))
def test_each_category_returns_exactly_its_records(cli, logfile, cat):
    result = cli("logs", "--file", str(logfile), "--category", cat, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert _names(result.stdout) == EXPECTED[cat]


def test_categories_combine(cli, logfile):
    result = cli("logs", "--file", str(logfile), "--category", "zombie", "--category", "job", "--json")
    assert [json.loads(line)["test_name"] for line in result.stdout.splitlines()] == [
        "zombies", "nudged", "claimed", "job_failed_event", "job_failed_alert"]


def test_all_records_and_non_json_lines_as_is(cli, logfile):
    result = cli("logs", "--file", str(logfile), env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert _names(result.stdout) == [name for name, _, _ in RECORDS]
    assert '  File "stages.py", line 3\nRuntimeError: boom\n' in result.stdout
    assert "alert queue_full firing [0]: queue_full summary depth=10 capacity=10 test_name=" in result.stdout
    assert " WARNING  pipeline job_failed job=7 reason=detect: no face" in result.stdout


def test_alerts(cli, logfile):
    result = cli("logs", "--file", str(logfile), "--alerts", "--json")
    expected = [name for name, item, _ in RECORDS if isinstance(item, dict) and item["event"] == "alert"]
    assert [json.loads(line)["test_name"] for line in result.stdout.splitlines()] == expected


def test_since(cli, logfile):
    recent = cli("logs", "--file", str(logfile), "--since", "60m", env={"COLUMNS": "80"})
    assert _names(recent.stdout) == ["crash_loop", "claimed", "job_failed_event", "job_failed_alert", "stage_fatal",
                                     "traceback", "idle", "stalled_resolved", "tick_failed"]
    iso = cli("logs", "--file", str(logfile), "--since", _ts(6.5), "--json")
    assert [json.loads(line)["test_name"] for line in iso.stdout.splitlines()] == ["idle", "stalled_resolved", "tick_failed"]
    bad = cli("logs", "--file", str(logfile), "--since", "last week")
    assert bad.returncode == 2 and "neither a duration" in bad.stderr


def test_json_prints_the_original_lines(cli, logfile):
    result = cli("logs", "--file", str(logfile), "--json")
    original = [line for line in logfile.read_text(encoding="utf-8").splitlines() if line.startswith("{")]
    assert result.stdout.splitlines() == original


def test_missing_file_and_unknown_category_exit_2(cli, tmp_path):
    assert cli("logs", "--file", str(tmp_path / "nope.log")).returncode == 2
    assert cli("logs", "--file", str(tmp_path / "nope.log"), "--category", "disk").returncode == 2


def test_default_source_is_the_state_dirs_log(cli, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    env = {"HEYGEM_OPS_CONFIG": str(config)}
    missing = cli("logs", env=env)
    assert missing.returncode == 2 and "--file" in missing.stderr
    (tmp_path / "state" / "daemon.log").write_text(_line("start", RECORDS[0][1], 1) + "\n")
    result = cli("logs", "--json", env=env)
    assert result.returncode == 0 and json.loads(result.stdout)["test_name"] == "start"


def test_daemon_under_systemd_reads_journald(cli, tmp_path):
    """A daemon stand-in started with systemd's INVOCATION_ID; a stand-in `journalctl` on PATH
    echoes the argv it was given as a log record."""
    import psutil

    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    fake = bin_dir / "journalctl"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    "record = {'timestamp': '2030-01-01T00:00:00Z', 'event': 'job_claimed', 'argv': sys.argv[1:]}\n"
                    "print(json.dumps(record))\n")
    fake.chmod(0o755)
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, "INVOCATION_ID": "0123456789abcdef"})
    try:
        created = psutil.Process(daemon.pid).create_time()
        (state / "daemon.json").write_text(
            json.dumps({"pid": daemon.pid, "create_time": created, "http": None, "started": time.time()}))
        config = tmp_path / "config.toml"
        config.write_text(f'[daemon]\nstate_dir = "{state}"\n')
        env = {"HEYGEM_OPS_CONFIG": str(config), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        result = cli("logs", "--json", "--since", "1970-01-01T00:01:40Z", "--category", "job", env=env)
        assert result.returncode == 0, result.stderr
        argv = json.loads(result.stdout)["argv"]
        assert argv[:2] == ["-u", argv[1]] and argv[1].endswith(".service")
        assert argv[2:] == ["-o", "cat", "--no-pager", "--since", "@100"]
    finally:
        daemon.kill()
        daemon.wait(timeout=10)


def _read_until(proc: subprocess.Popen, needle: str, buf: list[str], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in "".join(buf):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(proc.stdout.fileno(), 65536).decode() if ready else ""
        if not chunk:
            raise AssertionError(f"{needle!r} not seen; output so far: {''.join(buf)!r}")
        buf.append(chunk)


def test_follow_picks_up_appended_truncated_and_rotated_lines(logfile):
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "logs", "--follow", "--file", str(logfile),
                             "--category", "job", "--json"], stdout=subprocess.PIPE, cwd=ROOT)
    buf: list[str] = []
    try:
        _read_until(proc, '"job_failed_alert"', buf)  # the backlog: reader is running
        with open(logfile, "a", encoding="utf-8") as f:
            f.write(_line("later_job", {"event": "job_succeeded", "level": "info"}, 0) + "\n")
            f.write(_line("later_other", {"event": "daemon_ready", "level": "info"}, 0) + "\n")
            f.write('{"event": "job_claimed", "test_name": "half')  # a line still being written
            f.flush()
            _read_until(proc, '"later_job"', buf)
            f.write('_written"}\n')
        _read_until(proc, '"half_written"', buf)
        logfile.write_text(_line("after_truncate", {"event": "job_claimed"}, 0) + "\n")  # copytruncate
        _read_until(proc, '"after_truncate"', buf)
        rotated = logfile.with_suffix(".log.1")
        logfile.rename(rotated)
        logfile.write_text(_line("after_rotate", {"event": "job_cancelled"}, 0) + "\n")
        _read_until(proc, '"after_rotate"', buf)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
    names = [json.loads(line)["test_name"] for line in "".join(buf).splitlines()]
    assert names == ["claimed", "job_failed_event", "job_failed_alert", "later_job", "half_written",
                     "after_truncate", "after_rotate"]


def test_help_shows_an_example(cli):
    result = cli("logs", "--help")
    assert result.returncode == 0 and "heygem-ops logs --follow --category" in result.stdout
