"""watchdog.procs against real processes: real zombies, real trees, real signals.

Every process here is started by the test and stopped (and reaped) at teardown.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from procs_helpers import ZombieMaker, proc_state
from watchdog import procs


@pytest.fixture
def makers():
    started: list[ZombieMaker] = []

    def make(zombies: int, depth: int = 0) -> ZombieMaker:
        started.append(ZombieMaker(zombies, depth))
        return started[-1]

    yield make
    for maker in started:
        maker.stop()
    for maker in started:
        assert all(proc_state(pid) is None for pid in maker.zombie_pids), "a test zombie was left behind"


@pytest.fixture
def children():
    """Start `python -c CODE` children that print `ready` once set up; kill and reap them at teardown."""
    started: list[subprocess.Popen] = []

    def start(code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code + "\nprint('ready', flush=True)\nimport time; time.sleep(120)"],
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_zombies_found_with_parent_and_grouped(makers):
    a, b = makers(3), makers(2)
    found = {z.pid: z for z in procs.zombies()}
    for maker in (a, b):
        for pid in maker.zombie_pids:
            z = found[pid]
            assert z.ppid == maker.pid
            assert z.parent_cmdline == maker.cmdline
            assert z.parent_name and z.parent_name.startswith("python")
            assert z.parent_user == psutil.Process().username()
            assert 0 <= z.parent_age_s < 120
    groups = {g.ppid: g for g in procs.by_parent(found.values())}
    assert [z.pid for z in groups[a.pid].zombies] == a.zombie_pids
    assert [z.pid for z in groups[b.pid].zombies] == b.zombie_pids
    assert groups[a.pid].parent_cmdline == a.cmdline


def test_by_parent_orders_largest_group_first(makers):
    small, big = makers(1), makers(4)
    groups = procs.by_parent(procs.zombies(small.pid) + procs.zombies(big.pid))
    assert [g.ppid for g in groups] == [big.pid, small.pid]


def test_zombies_limited_to_a_tree(makers):
    inside, outside = makers(3, depth=1), makers(2)
    assert [z.pid for z in procs.zombies(inside.pid)] == inside.zombie_pids
    assert procs.zombies(outside.pid) and not set(outside.zombie_pids) & {z.pid for z in procs.zombies(inside.pid)}
    # The sleeping child of `inside` has no zombies of its own; its parent's are outside its tree.
    assert procs.zombies(inside.pids[1]) == []


def test_zombies_of_missing_root_raise():
    with pytest.raises(ProcessLookupError):
        procs.zombies(999_999_999)


def test_tree_includes_grandchildren(makers):
    chain = makers(2, depth=2)
    pids = {ref.pid for ref in procs.tree(chain.pid)}
    assert pids == {*chain.pids, *chain.zombie_pids}
    assert len(chain.pids) == 3
    assert all(ref.matches() for ref in procs.tree(chain.pids[2]))


def test_procref_after_exit_does_not_match_and_send_refuses(children):
    proc = children("")
    ref = procs.ProcRef.of(proc.pid)
    assert ref.matches()
    assert procs.send(ref, 0)
    proc.kill()
    proc.wait(timeout=10)  # reaped: the pid is free for reuse
    assert not ref.matches()
    assert procs.send(ref, signal.SIGTERM) is False
    with pytest.raises(psutil.NoSuchProcess):
        procs.ProcRef.of(proc.pid)


def test_procref_with_other_start_time_is_refused(children):
    proc = children("")
    real = procs.ProcRef.of(proc.pid)
    reused = procs.ProcRef(proc.pid, real.start_ticks - 1)  # what a reused pid looks like
    assert not reused.matches()
    assert procs.send(reused, signal.SIGKILL) is False
    assert proc.poll() is None


def test_terminate_kills_what_ignores_term(children):
    polite = children("")
    stubborn = children("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    exited = children("")
    exited_ref = procs.ProcRef.of(exited.pid)
    exited.kill()
    exited.wait(timeout=10)
    polite_ref, stubborn_ref = procs.ProcRef.of(polite.pid), procs.ProcRef.of(stubborn.pid)

    result = procs.terminate([polite_ref, stubborn_ref, exited_ref], grace_s=0.5)

    assert result == {"terminated": [polite_ref], "killed": [stubborn_ref], "gone": [exited_ref], "alive": []}
    # Our own children: terminate's wait reaped them, else they would still match as zombies.
    assert not polite_ref.matches() and not stubborn_ref.matches()


def test_terminate_does_not_wait_for_zombies_it_cannot_reap(makers):
    """The helper's children are already zombies: nothing to TERM-wait for, and nothing to KILL."""
    maker = makers(2)
    refs = [procs.ProcRef.of(pid) for pid in maker.zombie_pids]
    started = time.monotonic()
    result = procs.terminate(refs, grace_s=30)
    assert result["terminated"] == refs and result["killed"] == []
    assert time.monotonic() - started < 20


# ---- identity: the kernel's start time in clock ticks ---------------------------------------------

def _field_22(pid: int) -> int:
    data = open(f"/proc/{pid}/stat", "rb").read()
    return int(data[data.rindex(b")") + 2:].split()[19])


def test_procref_is_the_kernels_start_time_in_ticks(children):
    proc = children("")
    ref = procs.ProcRef.of(proc.pid)
    assert ref == (proc.pid, _field_22(proc.pid)) and isinstance(ref.start_ticks, int)
    # psutil's float is boot time + these ticks: the conversion for old pidfiles is exact while
    # the clock has not been stepped
    assert procs.ticks_of_create_time(psutil.Process(proc.pid).create_time()) == ref.start_ticks
    assert [r.pid for r in procs.tree(proc.pid)] == [proc.pid]


def test_a_pidfile_names_its_daemon_whatever_the_wall_clock_says(tmp_path, children):
    """A stepped clock changes psutil's create_time (boot time is read from the wall clock), not
    the ticks: a pidfile whose create_time is an hour off still names the live process."""
    import json

    from watchdog.state import StatePaths, read_pidfile

    proc = children("")
    paths = StatePaths(tmp_path)
    created = psutil.Process(proc.pid).create_time()
    paths.pidfile.write_text(json.dumps({"pid": proc.pid, "start_ticks": _field_22(proc.pid),
                                         "create_time": created + 3600, "http": None, "started": 0}))
    record = read_pidfile(paths)
    assert record.alive() and not record.legacy and record.ref() == procs.ProcRef.of(proc.pid)
    # written by an earlier version: create_time only, matched within a second
    paths.pidfile.write_text(json.dumps({"pid": proc.pid, "create_time": created, "http": None, "started": 0}))
    record = read_pidfile(paths)
    assert record.legacy and record.alive() and record.ref() == procs.ProcRef.of(proc.pid)
    paths.pidfile.write_text(json.dumps({"pid": proc.pid, "create_time": created - 100, "http": None, "started": 0}))
    assert not read_pidfile(paths).alive()  # another process that once had this pid


def test_a_pidfile_owned_by_another_user_is_not_trusted(tmp_path, children):
    import json
    import os

    from watchdog.state import StatePaths, read_pidfile

    proc = children("")  # runs as us
    paths = StatePaths(tmp_path)
    paths.pidfile.write_text(json.dumps({"pid": proc.pid, "start_ticks": _field_22(proc.pid), "http": None, "started": 0}))
    assert read_pidfile(paths).untrusted() is None
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    os.chown(paths.pidfile, 65534, 65534)  # planted by another user, naming our process
    why = read_pidfile(paths).untrusted()
    assert why == (f"the pidfile is owned by uid 65534, but pid {proc.pid} runs as uid {os.getuid()}: a pidfile the daemon's "
                   "own user did not write is not trusted; nothing was signalled")
