"""What to do about a parent whose zombies stay: one plan for the daemon and `heygem-ops clean`
(`escalate`; `clean` asks the operator where the daemon weighs the pid space and health).

Only a parent can reap its zombies. A SIGCHLD helps a parent that reaps in its handler; one
that does not keeps them until it exits, when they pass to the subreaper (the daemon) or init.
But restarting a parent kills the work it has in flight (upstream's tasks), while its zombies
cost only pid slots. So: nudge once, alert, and restart only when restarting is worth it: the
zombies threaten the pid space (by default a quarter of the pids still free, counting the
cgroup's `pids.max` under systemd), the parent's service is unhealthy anyway (hung, queue
blocked), or, for `clean`, an operator said yes.

Pure, except `pid_room` (reads /proc and the cgroup).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

NUDGE, WAIT, RESTART, ALERT = "nudge", "wait", "restart", "alert"
PID_ROOM_SHARE = 0.25


def escalate(nudged_at: Optional[float], now: float, grace_s: float, restart_ok: bool) -> str:
    """The next step for one zombie-keeping parent: NUDGE (SIGCHLD) if not yet nudged; WAIT for
    the grace; then RESTART where `restart_ok`, else ALERT (the zombies stay, reported)."""
    if nudged_at is None:
        return NUDGE
    if now - nudged_at < grace_s:
        return WAIT
    return RESTART if restart_ok else ALERT


def threatens_pids(zombies: int, room: Optional[int], restart_at: Optional[int] = None) -> bool:
    """Do `zombies` warrant a restart by count alone? At `restart_at` when configured, else at a
    quarter of the free pids (`room`; unknown room: never by count)."""
    if restart_at is not None:
        return zombies >= restart_at
    return room is not None and zombies >= max(1, int(room * PID_ROOM_SHARE))


def pid_room(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """Pids still free for this service: the kernel's `pid_max` less the tasks that exist (every
    thread takes a pid), and under a cgroup `pids.max` (systemd's TasksMax) less `pids.current`,
    whichever is smaller. None when neither can be read."""
    rooms = []
    try:
        pid_max = int((proc / "sys/kernel/pid_max").read_text())
        tasks = int((proc / "loadavg").read_text().split()[3].split("/")[1])
        rooms.append(pid_max - tasks)
    except (OSError, ValueError, IndexError):
        pass
    try:
        own = (proc / "self/cgroup").read_text().splitlines()
        path = next(line.split(":", 2)[2] for line in own if line.startswith("0::"))
        group = cgroup_root / path.lstrip("/")
        limit = (group / "pids.max").read_text().strip()
        if limit != "max":
            rooms.append(int(limit) - int((group / "pids.current").read_text()))
    except (OSError, ValueError, StopIteration, IndexError):
        pass
    return min(rooms) if rooms else None

