"""A real `heygem-ops daemon` subprocess for tests and benchmarks: config in, log lines, snapshot and
sd_notify out.

The test owns the daemon (it started it) and stops it with SIGTERM, then SIGKILL after a bound.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]  # the repository


def wait_for(predicate: Callable[[], object], timeout_s: float, every_s: float = 0.1):
    """Poll until `predicate()` is truthy (returned) or the time is up (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    return None


class Daemon:
    def __init__(self, tmp: Path, config: str = "", env: Optional[dict] = None, watchdog_usec: Optional[int] = None,
                 daemon_keys: str = "", root: Path = ROOT, input_roots: Optional[tuple] = None,
                 interval_s: float = 0.5):
        self.tmp = tmp
        self.state = tmp / "state"
        self.config = tmp / "config.toml"
        # Inputs may come from anywhere under the folder of the test's temporary folders (media are
        # made beside it), unless the caller says otherwise.
        roots = (tmp.parent,) if input_roots is None else input_roots
        daemon_keys += f"input_roots = {json.dumps([str(r) for r in roots])}\n" if roots else ""
        self.config.write_text(
            f'[daemon]\nstate_dir = "{self.state}"\nhttp_port = 0\ninterval_s = {interval_s}\nstop_grace_s = 5.0\n{daemon_keys}' + config
        )
        self.log_path = tmp / "daemon.log"
        self.notify_path = str(tmp / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        full_env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": self.notify_path}
        if watchdog_usec:
            full_env["WATCHDOG_USEC"] = str(watchdog_usec)
        self._log = open(self.log_path, "w")
        # `root`: the source tree to run (cwd comes first on sys.path); a benchmark passes an
        # older checkout to measure it side by side with this one.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "--config", str(self.config), "daemon"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=root, env=full_env,
        )

    # ---- what the daemon says ---------------------------------------------------------------
    def read_notify(self) -> list[str]:
        while self.notify.fileno() != -1:
            try:
                data = self.notify.recv(4096).decode()
            except (socket.timeout, BlockingIOError):
                break
            for line in data.splitlines():
                self.messages.append((time.monotonic(), line))
        return [m for _, m in self.messages]

    def listen(self, seconds: float) -> list[tuple[float, str]]:
        """Read datagrams for `seconds`, stamping each as it arrives; returns those."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.read_notify()
        return self.messages[start:]

    def wait_notify(self, message: str, timeout_s: float = 60) -> bool:
        return bool(wait_for(lambda: message in self.read_notify() or self._died(), timeout_s)) and message in self.read_notify()

    def records(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def alerts(self, name: str, state: str = "firing") -> list[dict]:
        return [r for r in self.records() if r.get("event") == "alert" and r.get("alert") == name and r.get("state") == state]

    def snapshot(self) -> Optional[dict]:
        try:
            return json.loads((self.state / "snapshot.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def url(self) -> str:
        data = wait_for(lambda: _read_json(self.state / "daemon.json"), 60)
        assert data, f"daemon wrote no pidfile; log:\n{self.log_path.read_text()[-3000:]}"
        return data["http"]

    def http(self, path: str, body: Optional[dict] = None, timeout: float = 10) -> tuple[int, dict | str]:
        req = urllib.request.Request(self.url() + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read().decode()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def stage_pid(self, stage: str, replica: int = 0) -> int:
        snap = wait_for(lambda: (s := self.snapshot()) and s["replicas"] and s["replicas"][replica]["pids"].get(stage) and s, 60)
        return snap["replicas"][replica]["pids"][stage]

    def _died(self) -> bool:
        return self.proc.poll() is not None

    # ---- stopping ----------------------------------------------------------------------------
    def stop(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()
            self.read_notify()
            self.notify.close()
        return self.proc.returncode

    def stop_and_clear(self) -> list[int]:
        """Stop the daemon, then SIGKILL what it left of its own tree (pids captured before the
        stop, so only this daemon's processes); returns the pids that had to be killed."""
        import psutil

        pids = self.descendants()
        self.stop()
        left = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    os.kill(pid, signal.SIGKILL)
                    left.append(pid)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        return left

    def descendants(self) -> list[int]:
        import psutil

        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
