"""`heygem-ops clean`: the plan as a pure function, and the command against real process trees.

Every process here is started by the test, under a small subreaper of the test's own (`WRAPPER`):
when clean terminates a parent, its zombies are re-parented to that subreaper and reaped, as they
would be by the heygem-ops daemon, instead of piling up under the container's init. The test
runner itself never becomes a subreaper (its other children would lose their exit codes).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ops.clean import Observed, Proc, has_actions, plan
from procs_helpers import proc_state

ROOT = Path(__file__).resolve().parent.parent

# argv[1]: JSON {"parent": [argv...], "orphan": [argv...] or null}. Starts the parent; the orphan,
# if any, is started with the parent's marker in its environment but as OUR child (outside the
# parent's tree), as a worker re-parented to a subreaper would be. Reaps everything until SIGTERM,
# then TERMs its remaining children (its own, unreaped: their pids cannot have been reused).
WRAPPER = r"""
import json, os, signal, subprocess, sys, time
import psutil
from watchdog.reaper import become_subreaper

assert become_subreaper()
spec = json.loads(sys.argv[1])
parent = subprocess.Popen(spec["parent"])
if spec["orphan"]:
    me = psutil.Process(parent.pid)  # its create time is set at fork, unchanged by exec
    marker = f"{me.pid}:{me.create_time()}"  # as versions before start ticks wrote it: still recognised
    subprocess.Popen(spec["orphan"], env={**os.environ, "HEYGEM_OPS_DAEMON": marker})
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

def reap_all():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if not pid:
            return False

deadline = time.monotonic() + 300
while not stop and time.monotonic() < deadline:
    reap_all()
    time.sleep(0.02)
signalled, deadline = set(), time.monotonic() + 10
while not reap_all():  # re-parented grandchildren show up as children on the way: TERM them too
    for child in psutil.Process().children():
        if time.monotonic() > deadline:
            child.kill()
        elif child.pid not in signalled:
            child.terminate()
            signalled.add(child.pid)
    time.sleep(0.02)
"""

# argv: ZOMBIES never|reaps [worker] [anything else, e.g. multiprocessing.spawn]. Forks ZOMBIES
# children that exit unreaped; "reaps": then installs a SIGCHLD handler that reaps (so the zombies
# stay until a SIGCHLD arrives); "worker": starts a sleeping child marked as its worker. Prints one
# JSON line {pid, zombies, worker}, sleeps; SIGTERM kills it (default action, no reaping).
PARENT = r"""
import json, os, signal, subprocess, sys, time
n, mode = int(sys.argv[1]), sys.argv[2]
zombies = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    zombies.append(pid)

def state(pid):
    data = open(f"/proc/{pid}/stat", "rb").read()
    return data[data.rindex(b")") + 2:].split()[0]

deadline = time.monotonic() + 30
while any(state(z) != b"Z" for z in zombies) and time.monotonic() < deadline:
    time.sleep(0.01)
worker = None
if "worker" in sys.argv[3:]:
    ticks = open("/proc/self/stat", "rb").read().rsplit(b")", 1)[1].split()[19].decode()  # start time, clock ticks
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                              env={**os.environ, "HEYGEM_OPS_DAEMON": f"{os.getpid()}:{ticks}"}).pid
if mode == "reaps":
    def reap(*_):
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
    signal.signal(signal.SIGCHLD, reap)
print(json.dumps({"pid": os.getpid(), "zombies": zombies, "worker": worker}), flush=True)
time.sleep(300)
"""

ORPHAN = r"""
import json, os, time
print(json.dumps({"orphan": os.getpid()}), flush=True)
time.sleep(300)
"""


class Family:
    """A subreaper (ours) with a parent under it, optionally a marked orphan; read their lines."""

    def __init__(self, *parent_args: str, orphan: bool = False, timeout_s: float = 30):
        spec = {"parent": [sys.executable, "-c", PARENT, *parent_args],
                "orphan": [sys.executable, "-c", ORPHAN] if orphan else None}
        self.proc = subprocess.Popen([sys.executable, "-c", WRAPPER, json.dumps(spec)], stdout=subprocess.PIPE,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.info: dict = {}
        buf, deadline = b"", time.monotonic() + timeout_s
        while buf.count(b"\n") < (2 if orphan else 1):
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                self.stop()
                raise TimeoutError(f"family printed {buf!r}")
            buf += chunk
        # Two processes share the pipe: one's line can land inside the other's ({...}{...}\n\n).
        text, at, decoder = buf.decode(), 0, json.JSONDecoder()
        while at < len(text):
            if text[at].isspace():
                at += 1
                continue
            found, at = decoder.raw_decode(text, at)
            self.info.update(found)
        self.pid, self.zombies, self.worker = self.info["pid"], self.info["zombies"], self.info["worker"]
        self.orphan = self.info.get("orphan")
        mine = [self.pid, *filter(None, [self.worker, self.orphan])]
        self.identity = {pid: psutil.Process(pid).create_time() for pid in mine}

    def same(self, pid: int) -> bool:
        """Still the very process we started, and not a zombie."""
        try:
            p = psutil.Process(pid)
            return p.create_time() == self.identity[pid] and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stdout.close()


@pytest.fixture
def families():
    started = []

    def start(*args, **kwargs) -> Family:
        started.append(Family(*args, **kwargs))
        return started[-1]

    yield start
    for family in started:
        family.stop()
    for family in started:
        assert all(proc_state(z) is None for z in family.zombies)


@pytest.fixture
def state_env(tmp_path):
    """A config whose state directory is tmp_path: no daemon pidfile unless a test writes one."""
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n\n[actions]\nterm_grace_s = 5\n')
    return {"HEYGEM_OPS_CONFIG": str(config)}


# ---- the plan ----------------------------------------------------------------------------------

def _p(pid: int, ppid: int = 1, command: str = "python app.py") -> Proc:
    return Proc(pid, 1000 + pid, ppid, command)


def test_plan_nudges_then_conditionally_restarts_each_unreaping_parent():
    scope = {10: _p(10), 11: _p(11, 10), 12: _p(12, 10)}
    zombies = (_p(20, 11), _p(21, 11), _p(22, 12))
    steps = plan(Observed(scope, zombies, ()), grace_s=7)
    assert [(s.pid, s.what, s.signal) for s in steps] == [
        (11, "nudge", "SIGCHLD"), (11, "restart", "SIGTERM, SIGKILL after 7 s"),
        (12, "nudge", "SIGCHLD"), (12, "restart", "SIGTERM, SIGKILL after 7 s"),
    ]
    assert steps[0].zombies == (20, 21) and steps[2].zombies == (22,)
    assert steps[1].start_ticks == 1011
    assert "only be reaped by its parent" in steps[1].why and "only if" in steps[1].why
    assert has_actions(steps)


def test_plan_restarts_a_parent_with_its_live_descendants_not_its_zombies():
    scope = {10: _p(10), 11: _p(11, 10), 12: _p(12, 11), 20: _p(20, 10)}
    steps = plan(Observed(scope, (scope[20],), ()), grace_s=1)
    assert [(s.what, s.zombies, s.descendants) for s in steps] == [
        ("nudge", (20,), ()), ("restart", (20,), ((11, 1011.0), (12, 1012.0)))]
    assert "with its 2 live descendant(s)" in steps[1].why


def test_plan_leaves_the_daemons_zombies_to_the_daemon():
    scope = {10: _p(10), 11: _p(11, 10)}
    steps = plan(Observed(scope, (_p(20, 10), _p(21, 11)), (), daemon_pid=10), grace_s=1)
    assert [(s.pid, s.what) for s in steps] == [(10, "leave"), (11, "nudge"), (11, "restart")]
    only_daemon = plan(Observed(scope, (_p(20, 10),), (), daemon_pid=10), grace_s=1)
    assert [s.what for s in only_daemon] == ["leave"] and not has_actions(only_daemon)


def test_plan_terminates_orphans_and_their_zombies_go_with_them():
    scope = {10: _p(10), 30: _p(30, 1, "python -m multiprocessing.spawn")}
    orphans = (scope[30],)
    steps = plan(Observed(scope, (_p(31, 30), _p(32, 30)), orphans), grace_s=2)
    assert [(s.pid, s.what, s.zombies) for s in steps] == [(30, "terminate", (31, 32))]
    assert "orphaned worker" in steps[0].why and "2 zombie(s) go with it" in steps[0].why


def test_plan_is_empty_for_a_healthy_tree():
    steps = plan(Observed({10: _p(10), 11: _p(11, 10)}, (), ()), grace_s=2)
    assert steps == [] and not has_actions(steps)


def test_plan_ignores_zombies_whose_parent_is_out_of_scope():
    assert plan(Observed({10: _p(10)}, (_p(20, 99),), ()), grace_s=2) == []


# ---- the command -------------------------------------------------------------------------------

def test_restarts_only_the_parent_sigchld_did_not_help(cli, families, state_env):
    parent = families("3", "never", "worker")
    bystander = families("1", "never", "multiprocessing.spawn")
    assert "multiprocessing.spawn" in " ".join(psutil.Process(bystander.pid).cmdline())

    dry = cli("clean", "--pid", str(parent.pid), "--dry-run", "--json", env=state_env)
    assert dry.returncode == 1, dry.stderr
    steps = json.loads(dry.stdout)["plan"]
    assert [(s["pid"], s["what"]) for s in steps] == [(parent.pid, "nudge"), (parent.pid, "restart")]
    assert steps[0]["zombies"] == parent.zombies
    assert [pid for pid, _ in steps[1]["descendants"]] == [parent.worker]  # stopped with its parent
    assert all(z == "Z" for z in map(proc_state, parent.zombies))  # dry run: nothing changed
    assert parent.same(parent.pid)

    table = cli("clean", "--pid", str(parent.pid), "--dry-run", env={**state_env, "COLUMNS": "200"})
    assert table.returncode == 1 and "SIGCHLD" in table.stdout and str(bystander.pid) not in table.stdout

    result = cli("clean", "--pid", str(parent.pid), "--yes", "--json", env=state_env)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    actions = [(d["pid"], d["action"]) for d in doc["done"]]
    assert actions == [(parent.pid, "nudge"), (parent.pid, "restart")]
    assert "0 reaped, 3 remain" in doc["done"][0]["result"]
    assert doc["done"][1]["result"].startswith("terminated with 1 descendant(s)")
    assert doc["clean"] is True and doc["unreaped"] == []
    assert not parent.same(parent.pid) and not parent.same(parent.worker)
    assert all(proc_state(z) is None for z in parent.zombies)  # re-parented to the subreaper, reaped
    # the bystander matches the runbook's pkill pattern, but is not in the tree: untouched
    assert bystander.same(bystander.pid)
    assert proc_state(bystander.zombies[0]) == "Z"
    assert psutil.Process(bystander.zombies[0]).ppid() == bystander.pid


def test_a_parent_that_reaps_on_sigchld_gets_only_the_nudge(cli, families, state_env):
    parent = families("3", "reaps")
    result = cli("clean", "--pid", str(parent.pid), "--yes", "--json", env=state_env)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert [(d["action"], d["result"]) for d in doc["done"]] == [("nudge", "SIGCHLD sent; 3 reaped, 0 remain")]
    assert parent.same(parent.pid)
    assert all(proc_state(z) is None for z in parent.zombies)


def test_without_yes_and_no_terminal_the_parent_is_left_and_exit_is_1(families, state_env):
    parent = families("2", "never")
    result = subprocess.run([sys.executable, "-m", "ops.cli", "clean", "--pid", str(parent.pid), "--nudge-wait", "0.3"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**os.environ, **state_env, "COLUMNS": "200"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rerun with --yes" in result.stdout and "problems remain" in result.stdout
    assert parent.same(parent.pid) and all(proc_state(z) == "Z" for z in parent.zombies)


def test_orphans_carrying_the_daemons_marker_are_terminated(cli, families, state_env, tmp_path):
    """Default scope: the daemon named by the pidfile. Its marked worker (in its tree) stays; a
    marked process outside its tree is an orphan; an unmarked bystander is never looked at."""
    daemon = families("0", "never", "worker", orphan=True)
    bystander = families("0", "never", "multiprocessing.spawn")
    (tmp_path / "daemon.json").write_text(json.dumps(
        {"pid": daemon.pid, "create_time": daemon.identity[daemon.pid], "http": None, "started": time.time()}))

    dry = cli("clean", "--dry-run", "--json", env=state_env)
    assert dry.returncode == 1, dry.stderr
    doc = json.loads(dry.stdout)
    assert f"daemon {daemon.pid}" in doc["target"]
    assert [(s["pid"], s["what"]) for s in doc["plan"]] == [(daemon.orphan, "terminate")]

    result = cli("clean", "--json", env=state_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["done"] == [{"pid": daemon.orphan, "action": "terminate", "result": "terminated"}]
    assert not daemon.same(daemon.orphan)
    assert daemon.same(daemon.pid) and daemon.same(daemon.worker) and bystander.same(bystander.pid)

    again = cli("clean", "--dry-run", env=state_env)
    assert again.returncode == 0 and "nothing to clean" in again.stdout


def test_missing_pid_exits_2(cli, state_env):
    result = cli("clean", "--pid", "999999999", env=state_env)
    assert result.returncode == 2
    assert "no process with pid 999999999" in result.stderr and result.stdout == ""


def test_no_pidfile_and_no_target_exits_2(cli, state_env):
    result = cli("clean", "--dry-run", env=state_env)
    assert result.returncode == 2
    assert "no daemon pidfile" in result.stderr and "--pid" in result.stderr


def test_unit_without_systemctl_exits_2(cli, state_env, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = cli("clean", "--unit", "heygem-ops", "--dry-run", env={**state_env, "PATH": str(empty)})
    assert result.returncode == 2
    assert "systemctl not found" in result.stderr


@pytest.mark.parametrize("answer, message", [
    ("MainPID=0\nControlGroup=/\n", "is not one service's"),
    ("MainPID=0\nControlGroup=/system.slice\n", "is not one service's"),
    ("MainPID=0\nControlGroup=\n", "has no control group"),
    ("MainPID=7\nControlGroup=/system.slice/no-such-test.service\n", "cgroup.procs not found"),
])
def test_unit_scope_must_be_one_services_cgroup(cli, state_env, tmp_path, answer, message):
    """A stand-in `systemctl` answers `show`; a slice or the root cgroup would hold everything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({answer!r})\n")
    fake.chmod(0o755)
    result = cli("clean", "--unit", "heygem-ops", "--dry-run", env={**state_env, "PATH": str(bin_dir)})
    assert result.returncode == 2
    assert message in result.stderr and result.stdout == ""


def test_help_shows_an_example(cli):
    result = cli("clean", "--help")
    assert result.returncode == 0 and "heygem-ops clean --pid" in result.stdout
