"""External mode: supervise a service the daemon did not build, such as upstream's `app.py`.

The daemon starts the command in its own session (so a Ctrl-C on the daemon's terminal does not
reach it), marks its environment with `HEYGEM_OPS_DAEMON=<pid>:<start ticks>` (how `heygem-ops
clean` recognises the service's orphans without matching command lines), restarts it with
back-off when it dies; `watchdog.logwatch.LogWatch` reads its log for upstream's failure lines.
"""

from __future__ import annotations

import os
import subprocess
from typing import Optional

from watchdog.procs import ProcRef, send, terminate, tree, wait_exit

MARKER = "HEYGEM_OPS_DAEMON"


def marker_value() -> str:
    """This daemon's identity as the workers' environment carries it: `<pid>:<start ticks>` (an
    integer; earlier versions wrote psutil's create time, a float, which `clean` still reads)."""
    from watchdog.procs import start_ticks

    pid = os.getpid()
    return f"{pid}:{start_ticks(pid)}"


class External:
    """One external command: start, watch, stop, restart."""

    def __init__(self, command: list[str], env: Optional[dict] = None, cwd: Optional[str] = None):
        if not command:
            raise ValueError("[daemon] command: external mode needs the command to run")
        self.command = list(command)
        self.env = {**os.environ, **(env or {}), MARKER: marker_value()}
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None
        self.ref: Optional[ProcRef] = None
        self.stopping: list[ProcRef] = []  # the tree as it was when TERM went out

    def start(self) -> None:
        self.stopping = []
        self.proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, start_new_session=True,
                                     stdin=subprocess.DEVNULL)
        self.ref = ProcRef.of(self.proc.pid)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def exit_code(self) -> Optional[int]:
        """None while running (or never started); the exit code (negative: signal) once it ended."""
        return None if self.proc is None else self.proc.poll()

    def refs(self) -> list[ProcRef]:
        """The command's whole process tree, pinned by start time."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return tree(self.proc.pid)
        except Exception:  # gone between poll and scan
            return []

    def signal_stop(self) -> int:
        """TERM the whole tree at once (children first would race their parent's own cleanup);
        returns at once with the number signalled. The tree is pinned: `kill` reaches the same
        processes, never a pid reused meanwhile."""
        import signal

        self.stopping = self.refs() or self.stopping
        return sum(send(ref, signal.SIGTERM) for ref in self.stopping)

    def kill(self) -> int:
        import signal

        return sum(send(ref, signal.SIGKILL) for ref in self.stopping)

    def gone(self) -> bool:
        """The command has exited (collected) and nothing of its pinned tree still runs."""
        return self.exit_code() is not None and not wait_exit(self.stopping, 0.0)

    def stop(self, grace_s: float) -> dict:
        """Blocking stop (daemon shutdown): TERM the tree, KILL what outlives the grace, and
        collect the command's exit status."""
        result = terminate(self.refs(), grace_s)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=max(1.0, grace_s))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5.0)
        return result
