"""Subreaper and reaping with real processes, in a script of its own.

The script becomes a subreaper and reaps every child it has, which must not happen to the test
runner itself (pytest's other subprocess.Popen children would lose their exit codes), so all of
it runs in a separate Python process that prints its observations as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, os, signal, subprocess, sys, tempfile, time
import psutil
from watchdog.reaper import ChildWatch, become_subreaper, reap

def until(what, pred, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")

def is_zombie(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

def fork_exit(code=0, sig=None):
    pid = os.fork()
    if pid == 0:
        if sig:
            os.kill(os.getpid(), sig)
        os._exit(code)
    until("zombie", lambda: is_zombie(pid))
    return pid

def exits_of(exits):
    return {str(e.pid): [e.code, e.signal] for e in exits}

out = {}
watch = ChildWatch()
watch.install()
out["subreaper"] = become_subreaper()

# 1. A child starts a grandchild and exits: the grandchild is re-parented to us, and reaped.
flag = os.path.join(tempfile.mkdtemp(), "go")
grandchild = (
    "import os, sys, time\n"
    "deadline = time.monotonic() + 15\n"
    f"while not os.path.exists({flag!r}) and time.monotonic() < deadline:\n"
    "    time.sleep(0.01)\n"
    "sys.exit(5)\n"
)
middle = (
    "import os, subprocess, sys\n"
    f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}], stdout=subprocess.DEVNULL)\n"
    "print(p.pid, flush=True)\n"
    "os._exit(0)\n"
)
mid = subprocess.Popen([sys.executable, "-c", middle], stdout=subprocess.PIPE, text=True)
gpid = int(mid.communicate(timeout=30)[0])
out["middle_rc"] = mid.returncode
out["orphan_ppid_is_us"] = until("re-parenting", lambda: psutil.Process(gpid).ppid() == os.getpid())
watch.wait(0)  # drain the middle child's SIGCHLD
open(flag, "w").close()
out["sigchld_woke"] = watch.wait(15)
got = []
until("orphan reaped", lambda: got.extend(reap()) or any(e.pid == gpid for e in got))
out["orphan_exit"] = exits_of(got)[str(gpid)]
out["orphan_gone"] = not psutil.pid_exists(gpid)

# 2. Zombies of our own, one exited and one killed by a signal.
z1, z2 = fork_exit(7), fork_exit(sig=signal.SIGKILL)
out["own"] = exits_of(reap())
out["own_pids"] = [z1, z2]
out["nothing_left"] = reap()

# 3. A tracked child (first in the kernel's child list) is left for its own wait().
a = fork_exit(4)
tracked = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
until("tracked zombie", lambda: is_zombie(tracked.pid))
b = fork_exit(6)
out["excluded_round"] = exits_of(reap(exclude={tracked.pid}))
out["excluded_pids"] = [a, b]
out["tracked_still_zombie"] = is_zombie(tracked.pid)
out["tracked_rc"] = tracked.wait(timeout=15)
out["excluded_again"] = exits_of(reap(exclude={tracked.pid}))

# 4. The hazard exclude avoids: reaping a Popen child behind its back.
victim = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
until("victim zombie", lambda: is_zombie(victim.pid))
out["victim_reaped"] = exits_of(reap()).get(str(victim.pid))
out["victim_popen_rc"] = victim.wait(timeout=15)

watch.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def observed() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=90, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_orphan_is_reparented_and_reaped(observed):
    assert observed["subreaper"] is True
    assert observed["middle_rc"] == 0
    assert observed["orphan_ppid_is_us"] is True
    assert observed["sigchld_woke"] is True
    assert observed["orphan_exit"] == [5, None]
    assert observed["orphan_gone"] is True


def test_own_zombies_reaped_with_code_or_signal(observed):
    z1, z2 = observed["own_pids"]
    assert observed["own"] == {str(z1): [7, None], str(z2): [None, 9]}
    assert observed["nothing_left"] == []


def test_excluded_children_are_left_for_their_owner(observed):
    a, b = observed["excluded_pids"]
    assert observed["excluded_round"] == {str(a): [4, None], str(b): [6, None]}
    assert observed["tracked_still_zombie"] is True
    assert observed["tracked_rc"] == 3
    assert observed["excluded_again"] == {}


def test_reaping_a_popen_child_hides_its_exit_code(observed):
    """Why `exclude` exists: Popen.wait() after someone else reaped reports 0, not 3."""
    assert observed["victim_reaped"] == [3, None]
    assert observed["victim_popen_rc"] == 0
