"""The daemon as the parent of last resort: subreaper status and zombie-free child reaping.

The incident's 41 zombies existed because their parent never called wait(). The daemon makes
itself a child subreaper (PR_SET_CHILD_SUBREAPER), so any descendant whose parent dies is
re-parented to the daemon instead of init, and it reaps whatever exits.

Signal handling follows gunicorn's arbiter: the SIGCHLD handler only writes a byte to a
non-blocking self-pipe (no locks, no waitpid inside a handler that can interrupt anything); the
main loop waits on the pipe with a timeout (`ChildWatch.wait`) and calls `reap()`.

Children someone else waits for. `waitpid(-1)` takes *any* exited child, including ones that
`subprocess.Popen` or `multiprocessing.Process` still mean to wait() on. They then see ECHILD:
Popen turns that into `returncode = 0` (a crash reported as success) and multiprocessing's
`exitcode` becomes wrong or None. So `reap(exclude=pids)` leaves the tracked children alone: it
peeks with `waitid(P_ALL, WNOWAIT)`, which shows an exited child without reaping it, reaps it by
pid when it is not excluded, and when the first exited child is an excluded one (the kernel keeps
showing the same one) it checks each other child by pid instead. Pass the pids of every child
whose owner will wait() on it; everything else (re-parented orphans, untracked forks) is ours.

Linux only.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
from dataclasses import dataclass
from typing import Collection, Optional

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; False where prctl refuses."""
    try:
        libc = ctypes.CDLL(None)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Exit:
    """A reaped child: exit `code`, or the `signal` that killed it (the other is None)."""

    pid: int
    code: Optional[int]
    signal: Optional[int]


def _exit(pid: int, status: int) -> Exit:
    rc = os.waitstatus_to_exitcode(status)
    return Exit(pid, None, -rc) if rc < 0 else Exit(pid, rc, None)


def _collect(pid: int) -> Optional[Exit]:
    """Reap `pid` if it has exited; None if it runs, or someone else reaped it first."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return _exit(got, status) if got else None


def _children() -> list[int]:
    """Our children, found by parent pid (includes orphans re-parented to us)."""
    import psutil

    return [p.pid for p in psutil.Process().children()]


def reap(exclude: Collection[int] = ()) -> list[Exit]:
    """Reap every exited child except those in `exclude`, without blocking."""
    exits: list[Exit] = []
    if not exclude:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return exits
            if not pid:
                return exits
            exits.append(_exit(pid, status))
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return exits
        if info is None:
            return exits
        if info.si_pid in exclude:
            break
        found = _collect(info.si_pid)
        if found:
            exits.append(found)
    for pid in _children():
        if pid not in exclude:
            found = _collect(pid)
            if found:
                exits.append(found)
    return exits


class ChildWatch:
    """SIGCHLD -> one byte in a self-pipe; the main loop sleeps on it instead of polling.

    Install from the main thread (Python runs signal handlers there). Use as a context manager to
    restore the previous handler and close the pipe.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous = None
        self._installed = False

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGCHLD, self._on_sigchld)
        self._installed = True

    def _on_sigchld(self, signum, frame) -> None:
        try:
            os.write(self._write_fd, b".")
        except BlockingIOError:  # pipe full: a wake-up is pending already
            pass

    def wake(self) -> None:
        """Wake the loop now (from another signal's handler: TERM should not wait out a poll)."""
        self._on_sigchld(signal.SIGCHLD, None)

    def wait(self, timeout_s: float) -> bool:
        """Sleep until a child changed state or `timeout_s` passed; True if SIGCHLD arrived."""
        poll = select.poll()
        poll.register(self._read_fd, select.POLLIN)
        if not poll.poll(max(timeout_s, 0.0) * 1000):
            return False
        try:
            while os.read(self._read_fd, 512):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        if self._installed:
            # None: the old handler was not set from Python; the default is the safe fallback.
            signal.signal(signal.SIGCHLD, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        os.close(self._read_fd)
        os.close(self._write_fd)

    def __enter__(self) -> "ChildWatch":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
