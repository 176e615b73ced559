"""Names of a supervisor's shared-memory segments, and the sweep of those a dead one left.

A supervisor (the daemon, or any process running a Pipeline) creates a stage board and one frame
ring per replica incarnation in /dev/shm. It unlinks them when it stops, and multiprocessing's
resource tracker does when it dies. When both die at once (systemd SIGKILLs the service's whole
cgroup, the OOM killer picks it) every ring, hundreds of MB of RAM, stays until reboot: the next
supervisor sweeps them. Names carry the pid namespace as well as the pid, so where containers
share /dev/shm (`--ipc=host`) but not their pids, a sweep never mistakes another container's
live supervisor for a dead one of its own.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import psutil

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
    namespace = _pid_namespace()
    for name in names:
        match = _NAME.fullmatch(name)
        if match is None or int(match.group(1)) != namespace or psutil.pid_exists(int(match.group(2))):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
        except FileNotFoundError:
            continue
        removed.append(name)
    return removed


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: one namespace is all there is
        return 0

