"""The process model: zombies on the host or in one tree, and signals that cannot hit a stranger.

Two needs shape this module:

- `zombies()` backs a cold-start CLI command that replaces `ps aux | grep defunct | wc -l`, so it
  reads /proc/[pid]/stat itself (one small read per process) and imports nothing beyond the
  standard library; importing psutil alone costs about as long as the whole `ps` pipeline.
- Killing must target exactly the processes we looked at. A pid alone can be reused by an
  unrelated process, so every signal goes through a `ProcRef` (pid + start time), verified right
  before sending, through a pidfd where the kernel has them so the check and the signal cannot race.
  The start time is the kernel's own, in clock ticks since boot (/proc/PID/stat field 22): an
  integer no clock step changes. psutil's `create_time()` float is boot time (read from the wall
  clock at some moment) plus those ticks, so two processes that read boot time on either side of
  a clock step (NTP, a VM resumed) disagree about the same process, and `stop` would call a live
  daemon's pidfile stale.

psutil is imported inside the functions that need it, to keep `zombies()` free of its import cost,
and the records are namedtuples (as in psutil): `dataclasses` and `typing` cost a cold start more
than the whole scan of a few hundred processes.
Linux only (reads /proc), like the service and systemd units it supervises.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict, namedtuple
from collections.abc import Iterable

_PROC = "/proc"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcRef(namedtuple("ProcRef", "pid start_ticks")):
    """A process identity that survives pid reuse: pid + the kernel's start time in clock ticks."""

    __slots__ = ()

    @classmethod
    def of(cls, pid: int) -> "ProcRef":
        """The process running as `pid` now; raises psutil.NoSuchProcess if there is none (or it
        is hidden from us: another user's under hidepid)."""
        ticks = start_ticks(pid)
        if ticks is None:
            import psutil

            raise psutil.NoSuchProcess(pid)
        return cls(pid, ticks)

    def matches(self) -> bool:
        """True while the very process we captured still exists (a zombie still counts)."""
        return start_ticks(self.pid) == self.start_ticks


def start_ticks(pid: int) -> int | None:
    """The kernel's start time of `pid` in clock ticks since boot; None when there is no such
    process we can see."""
    st = _read_stat(str(pid))
    return None if st is None else st.start_ticks


def boot_time() -> float:
    """Boot time as the kernel states it now (/proc/stat `btime`, whole seconds of the wall clock)."""
    for line in (_read(f"{_PROC}/stat") or b"").splitlines():
        if line.startswith(b"btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def ticks_of_create_time(create_time: float) -> int:
    """A psutil create time (what pidfiles and markers of earlier heygem-ops versions recorded) as
    start ticks. Exact while the wall clock has not been stepped since that create time was read;
    compare the result with a tolerance (LEGACY_SLACK_TICKS), never for equality."""
    return round((create_time - boot_time()) * _CLOCK_TICKS)


LEGACY_SLACK_TICKS = _CLOCK_TICKS  # one second: btime is whole seconds and may move by one under NTP


Zombie = namedtuple("Zombie", "pid ppid name parent_name parent_cmdline parent_age_s parent_user")
Zombie.__doc__ = "One defunct process and what we know of its parent (None where it is gone or unreadable)."


class ZombieGroup(namedtuple("ZombieGroup", "ppid parent_cmdline parent_age_s zombies")):
    """The zombies of one parent: only that parent can reap them, so it is the unit to fix."""

    __slots__ = ()

    def as_dict(self) -> dict:
        """Plain data for JSON: the group's fields with each zombie as a dict."""
        return self._asdict() | {"zombies": [z._asdict() for z in self.zombies]}


# What one /proc/PID/stat line tells us.
_Stat = namedtuple("_Stat", "name state ppid start_ticks threads")


def children(root: int, tree: dict[int, _Stat]) -> list[int]:
    """Running (not zombie) children of `root` in `tree` (`family(root)`)."""
    return sorted(pid for pid, st in tree.items() if st.ppid == root and pid != root and st.state != "Z")


def subtree(root: int, tree: dict[int, _Stat]) -> set[int]:
    """`root` and its descendants within `tree` (`family` of an ancestor); empty if not in it."""
    return _descendants(root, tree) if root in tree else set()


def _read_stat(pid: str) -> _Stat | None:
    """One /proc/PID/stat line, or None when the process vanished while we looked."""
    data = _read(f"{_PROC}/{pid}/stat")
    if data is None:
        return None
    # comm may itself contain spaces and parentheses: it ends at the LAST ')'.
    left, right = data.index(b"("), data.rindex(b")")
    fields = data[right + 2 :].split()
    # fields[0] is field 3 of proc(5): state; fields[1] ppid; fields[17] num_threads (field 20);
    # fields[19] starttime (field 22).
    return _Stat(data[left + 1 : right].decode(errors="replace"), fields[0].decode(), int(fields[1]), int(fields[19]),
                 int(fields[17]))


def _scan() -> dict[int, _Stat]:
    stats = {}
    for entry in os.listdir(_PROC):
        if entry.isdigit():
            st = _read_stat(entry)
            if st is not None:
                stats[int(entry)] = st
    return stats


def _descendants(root: int, stats: dict[int, _Stat]) -> set[int]:
    children = defaultdict(list)
    for pid, st in stats.items():
        children[st.ppid].append(pid)
    found, todo = {root}, [root]
    while todo:
        for child in children[todo.pop()]:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def family(root: int) -> dict[int, _Stat]:
    """`root` and all its descendants with their stat lines, found through the kernel's per-thread
    `children` lists (/proc/PID/task/TID/children): the cost follows the size of the service's
    tree, not of the host (a GPU server lists thousands of processes). Where the kernel has no
    such lists (built without CONFIG_PROC_CHILDREN), a host-wide scan. Raises ProcessLookupError
    when `root` does not exist."""
    top = _read_stat(str(root))
    if top is None:
        raise ProcessLookupError(f"no process with pid {root}")
    stats, todo = {root: top}, [root]
    while todo:
        pid = todo.pop()
        if stats[pid].threads == 1:
            tasks = [str(pid)]  # most workers: no need to list the task folder
        else:
            try:
                tasks = os.listdir(f"{_PROC}/{pid}/task")
            except OSError:
                continue  # gone, or a zombie whose task list is empty
        for tid in tasks:
            raw = _read(f"{_PROC}/{pid}/task/{tid}/children")
            if raw is None:
                if pid == root and not os.path.exists(f"{_PROC}/{pid}/task/{tid}/children"):
                    stats = _scan()
                    return {p: stats[p] for p in _descendants(root, stats)}
                continue
            for child in raw.split():
                st = _read_stat(child.decode())
                if st is not None and int(child) not in stats:
                    stats[int(child)] = st
                    todo.append(int(child))
    return stats


def _read(path: str) -> bytes | None:
    """A whole small /proc file, or None when the process is gone; os.read rather than open():
    half the cost per process, which is most of a host-wide scan."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = [os.read(fd, 4096)]
        while len(chunks[-1]) == 4096:
            chunks.append(os.read(fd, 4096))
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _cmdline(pid: int) -> str | None:
    raw = _read(f"{_PROC}/{pid}/cmdline")
    if raw is None:
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or None


def _user(pid: int) -> str | None:
    """The real user, as psutil.Process.username() reports it."""
    import pwd

    status = _read(f"{_PROC}/{pid}/status")
    uid = next((int(line.split()[1]) for line in (status or b"").splitlines() if line.startswith(b"Uid:")), None)
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def real_uid(pid: int) -> int | None:
    """The real uid of `pid`, or None when it is gone (or hidden from us)."""
    status = _read(f"{_PROC}/{pid}/status")
    return next((int(line.split()[1]) for line in (status or b"").splitlines() if line.startswith(b"Uid:")), None)


def _uptime_s() -> float:
    return float(_read(f"{_PROC}/uptime").split()[0])


def zombies(root: int | None = None, tree: dict[int, _Stat] | None = None) -> list[Zombie]:
    """Every zombie on the host, or only those in `root`'s tree (root and its descendants; pass
    `tree`, `family(root)`, when it was read already).

    Read-only: never signals anything. Raises ProcessLookupError when `root` does not exist.
    """
    stats = _scan() if root is None else tree if tree is not None else family(root)
    found = [pid for pid, st in stats.items() if st.state == "Z"]
    if not found:
        return []
    uptime = _uptime_s()
    parents = {}
    for ppid in {stats[pid].ppid for pid in found}:
        parent = stats.get(ppid)
        parents[ppid] = (
            parent.name if parent else None,
            _cmdline(ppid),
            uptime - parent.start_ticks / _CLOCK_TICKS if parent else None,
            _user(ppid),
        )
    return [Zombie(pid, stats[pid].ppid, stats[pid].name, *parents[stats[pid].ppid]) for pid in sorted(found)]


def by_parent(zs: Iterable[Zombie]) -> list[ZombieGroup]:
    """Group zombies by parent, the largest group first (ties: lowest parent pid first)."""
    groups: dict[int, list[Zombie]] = defaultdict(list)
    for z in zs:
        groups[z.ppid].append(z)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return [
        ZombieGroup(ppid, members[0].parent_cmdline, members[0].parent_age_s, tuple(sorted(members, key=lambda z: z.pid)))
        for ppid, members in ordered
    ]


def tree(root: int) -> list[ProcRef]:
    """`root` (first) and all its descendants, refs captured now; raises psutil.NoSuchProcess for
    a missing root."""
    try:
        stats = family(root)
    except ProcessLookupError:
        import psutil

        raise psutil.NoSuchProcess(root) from None
    return [ProcRef(root, stats[root].start_ticks), *(ProcRef(pid, st.start_ticks) for pid, st in stats.items() if pid != root)]


def send(ref: ProcRef, sig: int) -> bool:
    """Signal the process only if it is still the one `ref` captured; False if gone or pid reused.

    With a pidfd (Linux >= 5.3) the fd pins the process we verified, so a pid reused between the
    check and the signal cannot receive it. Older kernels (CentOS 7) fall back to kill(2).
    """
    try:
        pidfd = os.pidfd_open(ref.pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        pidfd = None
    try:
        if not ref.matches():
            return False
        if pidfd is None:
            os.kill(ref.pid, sig)
        else:
            import signal  # here, not at the top: it imports enum, a cold-start cost for zombies()

            signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def wait_exit(refs: list[ProcRef], timeout_s: float) -> list[ProcRef]:
    """Wait up to timeout_s for the processes to exit; return those still running.

    A zombie has exited: only its parent can reap it, so it is not waited for (psutil's wait on
    someone else's zombie would block to the deadline). Our own children are reaped by the wait.
    """
    import psutil

    procs = {}
    for ref in refs:
        try:
            proc = psutil.Process(ref.pid)
        except psutil.NoSuchProcess:
            continue
        if start_ticks(ref.pid) == ref.start_ticks:
            procs[proc] = ref
    deadline = time.monotonic() + timeout_s
    alive = list(procs)
    while alive:
        _, alive = psutil.wait_procs(alive, timeout=max(0.0, min(0.1, deadline - time.monotonic())))
        alive = [p for p in alive if not _is_zombie(p)]
        if time.monotonic() >= deadline:
            break
    return [procs[p] for p in alive]


def _is_zombie(proc) -> bool:
    import psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def terminate(refs: Iterable[ProcRef], grace_s: float, kill_wait_s: float = 5.0) -> dict[str, list[ProcRef]]:
    """TERM every process that is still the one captured, wait up to grace_s, KILL the survivors.

    Returns {"terminated": exited after TERM, "killed": needed KILL, "gone": already gone or pid
    reused (never signalled), "alive": still there kill_wait_s after KILL (stuck in the kernel)}.
    """
    import signal

    refs = list(refs)
    signalled = [ref for ref in refs if send(ref, signal.SIGTERM)]
    gone = [ref for ref in refs if ref not in signalled]
    stubborn = wait_exit(signalled, grace_s)
    killed = [ref for ref in stubborn if send(ref, signal.SIGKILL)]
    terminated = [ref for ref in signalled if ref not in killed]
    alive = wait_exit(killed, kill_wait_s)
    return {"terminated": terminated, "killed": killed, "gone": gone, "alive": alive}
