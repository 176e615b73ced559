"""`heygem-ops monitor`: one frame (--once) against a real daemon and without one, and the live
loop's exits: `q` on a real pseudo-terminal (whose settings must come back) and Ctrl-C without one.

Column content is checked, not colours (NO_COLOR, fixed COLUMNS).
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from heygem.jobs import JobStore
from tests.conftest import ROOT
from tests.test_lifecycle import row, service  # noqa: F401  (service: the fixture)

pytestmark = pytest.mark.timeout(120)


def test_once_against_a_running_daemon(service):  # noqa: F811
    assert service.run("start").returncode == 0
    pid = service.record().pid
    shown = service.run("monitor", "--once")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"daemon pid {pid}" in out and "ready" in out
    assert "GPUs: n/a" in out  # no NVML on the test machine: said, not hidden
    assert "CPUExecutionProvider" in row(out, "│       0 │ cpu")
    assert "│ -" in row(out, "│ decode ")  # the first stage has no input queue
    for stage in ("generate", "encode"):
        line = row(out, f"│ {stage} ")
        assert "░░░░░░░░░░ 0/4" in line, line  # an empty queue of 4 slots
        assert " s ago" in line  # heartbeat age
    assert "zombies in the service tree: 0" in out and "no alerts firing" in out
    assert "jobs: queued 0 · running 0 · succeeded 0 · failed 0 · cancelled 0" in out
    assert "not running" not in out
    assert service.run("stop").returncode == 0


def test_once_without_a_daemon_still_shows_jobs(service):  # noqa: F811
    store = JobStore(service.paths.store)
    running = store.submit("/in/a.wav", "/in/a.mp4", None, "job-running")
    assert store.claim("test-worker", lease_s=600).id == running.id
    store.submit("/in/b.wav", "/in/b.mp4", None, "job-queued")
    store.progress(running.id, "test-worker", 40, "generate")
    # a snapshot left behind by a dead daemon must not be shown as the live service
    service.paths.snapshot.write_text(json.dumps({"pid": 1, "time": time.time(), "ready": True, "replicas": []}))
    shown = service.run("monitor", "--once")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "daemon not running: heygem-ops start" in out
    assert "replicas" not in out and "GPUs" not in out
    assert "jobs: queued 1 · running 1 · succeeded 0 · failed 0 · cancelled 0" in out
    line = row(out, "job-running")
    assert "generate" in line and "test-worker" in line
    assert "████████░░░░░░░░░░░░  40 %" in line, line  # 40 % of a 20-cell bar
    assert "job-queued" not in out  # only running jobs get a progress row


def _read_until(fd: int, text: bytes, timeout_s: float, seen: bytearray) -> bool:
    deadline = time.monotonic() + timeout_s
    while text not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return text in seen


def test_q_quits_and_the_terminal_is_restored(service):  # noqa: F811
    leader, follower = pty.openpty()
    before = termios.tcgetattr(follower)
    env = {**os.environ, **service.env, "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "monitor", "--interval", "0.2"], stdin=follower,
                            stdout=follower, stderr=follower, cwd=ROOT, env=env)
    seen = bytearray()
    try:
        assert _read_until(leader, b"daemon not running", 30, seen), seen.decode(errors="replace")
        during = termios.tcgetattr(follower)
        assert not during[3] & termios.ICANON, "keys must arrive without Enter (cbreak)"
        os.write(leader, b"q")
        assert proc.wait(timeout=10) == 0
        after = termios.tcgetattr(follower)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(leader)
        os.close(follower)
    assert after == before, "the terminal's settings were not restored"


def test_ctrl_c_exits_cleanly_without_a_terminal(service):  # noqa: F811
    env = {**os.environ, **service.env}
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "monitor", "--interval", "0.2"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    try:
        time.sleep(2.0)  # past start-up, into the redraw loop
        assert proc.poll() is None, proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()
    assert b"daemon not running" in out  # the last frame is left on the screen


def test_stage_time_is_shown_since_the_last_frame_or_since_start():
    """Issue 16: why a GPU's stage is not at 100 %: the board's time split, per stage process."""
    from rich.console import Console

    from ops.monitor import time_text

    def rows(t: float, pid: int, work: float, waiting: float) -> dict:
        zero = {f"{k}_s": 0.0 for k in ("work", "input", "output", "slot", "claim", "start", "end")}
        return {"time": t, "stages": [{"replica": 0, "stage": "generate", "pid": pid, **zero, "work_s": work,
                                       "input_s": waiting}]}

    def shown(snap, before=None) -> str:
        console = Console(width=120, record=True, no_color=True)
        console.print(time_text(snap, before))
        return console.export_text()

    assert "(since start):\n  0 generate  work 50% · input 50%" in shown(rows(100.0, 7, 5.0, 5.0))
    assert "(last 10 s):\n  0 generate  work 90% · input 10%" in shown(rows(110.0, 7, 14.0, 6.0), rows(100.0, 7, 5.0, 5.0))
    # a restarted stage (another pid) starts its count again: no window across two processes
    assert "(since start):\n  0 generate  work 70% · input 30%" in shown(rows(110.0, 8, 7.0, 3.0), rows(100.0, 7, 5.0, 5.0))
