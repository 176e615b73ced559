"""Real zombies and real process trees for tests and benchmarks, cleaned up without leftovers.

Run as a script, `procs_helpers.py ZOMBIES DEPTH` forks ZOMBIES children that exit at once and are
never waited for (real zombies), and, if DEPTH > 0, one sleeping child that does the same with
DEPTH - 1 (no zombies of its own), so a chain parent -> child -> grandchild exists. Every process
prints `LEVEL PID ZOMBIE_PIDS...` on the shared stdout, then sleeps. On SIGTERM (or after LIFETIME_S,
should the test die) each process stops its child, reaps every child it has and exits: nothing is
orphaned, because the init of a container may never reap.

Imported, it offers `ZombieMaker`, which starts such a tree, waits until it is ready and stops it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

LIFETIME_S = 300
SCRIPT = Path(__file__).resolve()


def _run(zombies: int, depth: int, level: int = 0) -> None:
    zombie_pids = []
    for _ in range(zombies):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        zombie_pids.append(pid)
    child = 0
    if depth > 0:
        child = os.fork()
        if child == 0:
            _run(0, depth - 1, level + 1)
            os._exit(0)

    def stop(*_):
        """Reap everything; TERM the sleeping child (ours, unreaped: its pid cannot be reused), KILL after 10 s."""
        if child:
            os.kill(child, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    if time.monotonic() > deadline and child:
                        os.kill(child, signal.SIGKILL)
                    time.sleep(0.01)
            except ChildProcessError:
                os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    os.write(1, (" ".join(map(str, [level, os.getpid(), *zombie_pids])) + "\n").encode())
    time.sleep(LIFETIME_S)
    stop()


def proc_state(pid: int) -> str | None:
    """The state letter from /proc/PID/stat, or None if the pid is gone (independent of watchdog.procs)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()[0].decode()


class ZombieMaker:
    """A started helper tree: `.pid` (top), `.pids` (top, child, grandchild...), `.zombie_pids` (the top's)."""

    def __init__(self, zombies: int, depth: int = 0, timeout_s: float = 30):
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), str(zombies), str(depth)], stdout=subprocess.PIPE)
        self.pid = self.proc.pid
        self.cmdline = f"{sys.executable} {SCRIPT} {zombies} {depth}"
        lines = self._read_lines(depth + 1, timeout_s)
        rows = sorted([int(n) for n in line.split()] for line in lines)  # by level: top first
        self.pids = [row[1] for row in rows]
        self.zombie_pids = rows[0][2:]
        deadline = time.monotonic() + timeout_s
        while any(proc_state(p) != "Z" for p in self.zombie_pids):
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("helper children did not become zombies")
            time.sleep(0.01)

    def _read_lines(self, n: int, timeout_s: float) -> list[str]:
        buf, deadline = b"", time.monotonic() + timeout_s
        while buf.count(b"\n") < n:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                self.stop()
                raise TimeoutError(f"helper printed {buf!r}, expected {n} lines")
            buf += chunk
        return buf.decode().splitlines()

    def stop(self, timeout_s: float = 10) -> None:
        """TERM our own child (it reaps its tree), KILL if it does not exit, and reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        self.proc.stdout.close()


if __name__ == "__main__":
    _run(int(sys.argv[1]), int(sys.argv[2]))
