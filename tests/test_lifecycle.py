"""`heygem-ops start | stop | restart | status` against real daemons that `start` itself launches.

Every daemon is started by the CLI under test in the test's own state directory (HTTP on a free
port, 0.5 s ticks), and the fixture remembers each daemon's process tree (pid + create time) so
that teardown can stop whatever a failing test left behind, and nothing else.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import psutil
import pytest

from watchdog.procs import ProcRef, terminate, tree
from watchdog.state import StatePaths, read_pidfile

pytestmark = pytest.mark.timeout(180)


class Service:
    """One test's config and state directory, and every daemon process seen running in it."""

    def __init__(self, tmp_path, cli, extra: str = ""):
        self.cli = cli
        self.paths = StatePaths(tmp_path / "state")
        self.config = tmp_path / "config.toml"
        self.config.write_text(f'[daemon]\nstate_dir = "{self.paths.root}"\nhttp_port = 0\ninterval_s = 0.5\n'
                               f'stop_grace_s = 5.0\n{extra}')
        self.env = {"HEYGEM_OPS_CONFIG": str(self.config), "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "120"}
        self.seen: set[ProcRef] = set()

    def run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        result = self.cli(*args, env=self.env, timeout=timeout)
        self.tree()
        return result

    def record(self):
        return read_pidfile(self.paths)

    def tree(self) -> list[ProcRef]:
        """The recorded daemon and its descendants now (remembered for teardown)."""
        record = self.record()
        if record is None or not record.alive():
            return []
        try:
            refs = tree(record.pid)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(refs)
        return refs

    def cleanup(self) -> None:
        terminate([ref for ref in self.seen if ref.matches()], grace_s=5.0)


def running(refs) -> list[int]:
    """Those still running: a zombie has exited (only its parent can reap it)."""
    out = []
    for ref in refs:
        try:
            if ref.matches() and psutil.Process(ref.pid).status() != psutil.STATUS_ZOMBIE:
                out.append(ref.pid)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture
def service(tmp_path, cli):
    s = Service(tmp_path, cli)
    yield s
    s.cleanup()


def test_start_status_second_start_stop(service):
    started = service.run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "is ready at http://127.0.0.1:" in started.stdout
    record = service.record()
    refs = service.tree()
    assert len(refs) >= 4, refs  # the daemon, its stage processes and multiprocessing's tracker

    status = service.run("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["healthy"] and report["problems"] == []
    assert report["daemon"]["up"] and report["daemon"]["pid"] == record.pid and report["daemon"]["healthz"]["http_status"] == 200
    assert report["ready"] and report["manager"] == "pidfile"
    [replica] = report["replicas"]
    assert replica["active"] == ["CPUExecutionProvider"] and replica["requested"] == ["CPUExecutionProvider"]
    assert not replica["cpu_fallback"]
    assert {s["stage"] for s in report["stages"]} == {"decode", "generate", "encode"}
    assert {s["stage"]: s["queue_capacity"] for s in report["stages"]}["generate"] > 0
    assert report["snapshot"]["age_s"] < 5 and not report["snapshot"]["stale"]
    assert report["jobs"]["queued"] == 0 and report["alerts"] == []

    human = service.run("status")
    assert human.returncode == 0
    assert f"pid {record.pid}" in human.stdout and "CPUExecutionProvider" in human.stdout
    assert "healthy" in human.stdout.splitlines()[-1]

    again = service.run("start")
    assert again.returncode == 1
    assert f"already running: pid {record.pid}" in again.stderr
    assert service.record() == record

    stopped = service.run("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"daemon pid {record.pid} exited after SIGTERM" in stopped.stdout
    assert not service.paths.pidfile.exists()
    assert running(refs) == [], "stop left processes of the daemon's tree"

    down = service.run("status")
    assert down.returncode == 1
    assert "not running" in down.stdout


def test_no_wait_then_restart_replaces_the_whole_tree(service):
    started = service.run("start", "--no-wait")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "not waiting for readiness" in started.stdout
    old = service.record()
    assert old is not None and old.alive()
    old_tree = service.tree()  # the stage processes start before the pidfile is written
    assert len(old_tree) >= 4, old_tree

    restarted = service.run("restart")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "is ready at" in restarted.stdout
    new = service.record()
    assert new.pid != old.pid and new.alive()
    assert running(old_tree) == []
    assert service.run("status").returncode == 0

    refs = service.tree()
    assert service.run("stop").returncode == 0
    assert running(refs) == []


def test_status_fails_on_a_cpu_fallback_and_shows_it(tmp_path, cli):
    """Asking for GPU 0 on a machine without CUDA: ONNX Runtime silently builds CPU sessions. With
    fallback = "warn" the daemon is ready, but the critical cpu_fallback alert fails `status`."""
    service = Service(tmp_path, cli, '[pipeline]\ndevices = [0]\nfallback = "warn"\n')
    try:
        assert service.run("start").returncode == 0
        for _ in range(40):
            result = service.run("status", "--json")
            report = json.loads(result.stdout)
            if report["alerts"]:
                break
            time.sleep(0.25)
        assert result.returncode == 1
        [replica] = report["replicas"]
        assert replica["cpu_fallback"] and replica["active"] == ["CPUExecutionProvider"]
        assert "CUDAExecutionProvider" in replica["requested"]
        assert [a["alert"] for a in report["alerts"]] == ["cpu_fallback"]
        assert report["ready"] and report["problems"][0].startswith("critical alert cpu_fallback replica-0:")
        human = service.run("status")
        assert human.returncode == 1
        assert "CPU fallback" in row(human.stdout, "│       0 │ 0 ")
        assert service.run("stop").returncode == 0
    finally:
        service.cleanup()


def row(output: str, *cells: str) -> str:
    """The one line of `output` that holds all `cells`."""
    found = [line for line in output.splitlines() if all(c in line for c in cells)]
    assert len(found) == 1, (cells, output)
    return found[0]


def test_stale_pidfiles_are_removed_and_signal_nothing(service):
    """A pidfile naming a process that is not the daemon (pid reused, or gone) must not get it
    signalled: `stop` says the file is stale and removes it."""
    service.paths.root.mkdir(parents=True, exist_ok=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    try:
        me = psutil.Process(bystander.pid)
        for pid, create_time in ((bystander.pid, me.create_time() - 100.0), (gone.pid, me.create_time())):
            service.paths.pidfile.write_text(json.dumps({"pid": pid, "create_time": create_time,
                                                         "http": "http://127.0.0.1:9", "started": 0.0}))
            result = service.run("stop")
            assert result.returncode == 0, result.stderr
            assert "pidfile was stale" in result.stdout
            assert not service.paths.pidfile.exists()
            assert bystander.poll() is None, "stop signalled a process that only shares the pid"
    finally:
        bystander.kill()
        bystander.wait(timeout=10)


def test_status_and_stop_without_a_daemon(service):
    status = service.run("status", "--json")
    assert status.returncode == 1
    report = json.loads(status.stdout)
    assert not report["healthy"] and not report["daemon"]["up"] and report["daemon"]["pidfile"] == "absent"
    assert report["problems"] == ["daemon not running"]
    assert report["jobs"] == {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    human = service.run("status")
    assert human.returncode == 1 and "daemon   not running: heygem-ops start" in human.stdout
    stopped = service.run("stop")
    assert stopped.returncode == 0 and "no daemon is running" in stopped.stdout


def test_start_reports_a_daemon_that_dies_with_its_log(tmp_path, cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        service = Service(tmp_path, cli)
        service.config.write_text(service.config.read_text().replace("http_port = 0", f"http_port = {taken.getsockname()[1]}"))
        try:
            result = service.run("start")
        finally:
            service.cleanup()
    assert result.returncode == 1, result.stdout
    assert "exited with code 1 before it was ready" in result.stderr
    assert "Address already in use" in result.stderr  # the daemon's own log line, shown
    assert not service.paths.pidfile.exists()


def test_bad_config_is_a_usage_error(tmp_path, cli):
    config = tmp_path / "config.toml"
    config.write_text('[daemon]\ninterval_s = "soon"\n')
    for command in ("start", "stop", "status"):
        result = cli(command, env={"HEYGEM_OPS_CONFIG": str(config)}, timeout=30)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "[daemon] interval_s" in result.stderr
