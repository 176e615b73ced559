"""Names of a supervisor's shared-memory segments, and the sweep of those a dead one left.

A supervisor (the daemon, or any process running a Pipeline) creates a stage board and one frame
ring per replica incarnation in /dev/shm. It unlinks them when it stops, and multiprocessing's
resource tracker does when it dies. When both die at once (systemd SIGKILLs the service's whole
cgroup, the OOM killer picks it) every ring, hundreds of MB of RAM, stays until reboot: the next
supervisor sweeps them. Names carry the pid namespace as well as the pid, so where containers
share /dev/shm (`--ipc=host`) but not their pids, a sweep never mistakes another container's
live supervisor for a dead one of its own.

What a sweep can know, and what it does with the rest:
- Owner. /dev/shm is world-writable (sticky): anyone can create a file named like ours. Only
  segments owned by our own effective user are candidates; another user's are theirs to sweep
  (and the sticky bit would refuse the unlink anyway). An error on any one segment (EPERM, EBUSY,
  a read-only mount) skips that segment: a sweep never stops a start.
- Liveness. kill(pid, 0) asks the kernel whether a pid exists in our namespace: 0 (ours) or EPERM
  (another user's) means it does, ESRCH that it does not. /proc is not asked: with hidepid=2
  (systemd's ProtectProc=invisible) another user's live process has no /proc entry, and
  psutil.pid_exists, which consults /proc, calls it dead. kill cannot tell a reused pid (or a
  thread id) from the supervisor that named the segment: such a segment is kept, a leak until
  that pid is free again, never a live supervisor's ring unlinked.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Optional

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"heygem_(?:board|ring)_(\d+)_(\d+)(?:_.*)?")


def segment_name(kind: str, *parts: object, pid: Optional[int] = None) -> str:
    """`heygem_<kind>_<pid namespace>_<pid>[_<part>...]`, `kind` being "board" or "ring"."""
    return "_".join(map(str, ("heygem", kind, _pid_namespace(), os.getpid() if pid is None else pid, *parts)))


def sweep(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink the segments of supervisors of this pid namespace that no longer run; their names.

    A pid that runs again (reused) keeps its segments: a live process's are never touched.
    """
    removed = []
    try:
        names = sorted(os.listdir(shm_dir))
    except OSError:
        return removed
    namespace, me = _pid_namespace(), os.geteuid()
    for name in names:
        match = _NAME.fullmatch(name)
        if match is None or int(match.group(1)) != namespace or pid_alive(int(match.group(2))):
            continue
        path = os.path.join(shm_dir, name)
        try:
            if os.lstat(path).st_uid != me:
                continue  # another user's (or a planted) file: not ours to judge or remove
            os.unlink(path)
        except OSError:  # gone meanwhile, or not removable here: skipped, never fatal
            continue
        removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether `pid` exists in this pid namespace, as kill(pid, 0) says: EPERM is alive (another
    user's process), only ESRCH is dead. Never /proc, which hidepid hides other users' pids from."""
    if pid <= 0:
        return False  # 0 and negative pids name process groups, not a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as err:
        return err.errno != errno.ESRCH
    except OverflowError:  # beyond pid_t: no process has it
        return False
    return True


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: one namespace is all there is
        return 0

