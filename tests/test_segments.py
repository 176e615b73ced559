"""Shared-memory segments a dead supervisor left behind are swept; nobody else's are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import pytest

from heygem import segments
from heygem.board import attach_segment


def dead_pid() -> int:
    """The pid of a child this test started and reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


def left_behind(name: str) -> None:
    """A segment as a supervisor SIGKILLed with its resource tracker leaves it."""
    SharedMemory(name=name, create=True, size=64).close()
    resource_tracker.unregister(f"/{name}", "shared_memory")  # nothing here may unlink it


def test_names_carry_pid_namespace_and_pid():
    namespace = os.stat("/proc/self/ns/pid").st_ino
    assert segments.segment_name("ring", "r0", "g1") == f"heygem_ring_{namespace}_{os.getpid()}_r0_g1"
    assert segments.segment_name("board", pid=42) == f"heygem_board_{namespace}_42"


def test_sweep_frees_only_segments_of_dead_supervisors_of_this_namespace():
    gone = dead_pid()
    dead = [segments.segment_name("board", pid=gone), segments.segment_name("ring", "r0", "g1", pid=gone)]
    kept = [
        segments.segment_name("ring", "r0", "g1"),  # this live process
        f"heygem_ring_1_{gone}_r0_g1",  # another pid namespace, sharing /dev/shm
        f"heygem_ringx_{gone}",  # not a supervisor's segment
    ]
    for name in dead + kept:
        left_behind(name)
    try:
        assert segments.sweep() == sorted(dead)
        assert sorted(n for n in os.listdir(segments.SHM_DIR) if n in dead + kept) == sorted(kept)
        attach_segment(kept[0]).close()  # a live supervisor's ring is untouched
    finally:
        for name in kept:
            os.unlink(os.path.join(segments.SHM_DIR, name))


# ---- other users, hidepid: what a sweep may not judge ---------------------------------------------
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making files of another user needs root")
SWEEP = "import json, sys; sys.path.insert(0, sys.argv[1]); from heygem import segments; print(json.dumps(segments.sweep()))"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def planted(name: str, uid: int) -> str:
    """An empty file in /dev/shm named like a supervisor's segment, owned by `uid`."""
    path = os.path.join(segments.SHM_DIR, name)
    with open(path, "x"):
        pass
    os.chown(path, uid, uid)
    return path


def as_nobody(code: str, *args: str, hidepid: bool = False) -> subprocess.CompletedProcess:
    """`python -c code args` as user nobody; with `hidepid`, in a mount namespace whose /proc hides
    other users' processes (as systemd's ProtectProc=invisible does)."""
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", code, *args]
    if hidepid:
        script = 'mount -t proc -o hidepid=2 proc /proc && exec "$@"'
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@needs_root
def test_sweep_skips_another_users_segment_and_never_fails():
    gone = dead_pid()
    theirs = planted(segments.segment_name("ring", "r0", pid=gone), NOBODY)
    ours = planted(segments.segment_name("ring", "r1", pid=gone), 0)
    try:
        # the daemon (root here) leaves the other user's file alone
        assert segments.sweep() == [os.path.basename(ours)] and os.path.exists(theirs)
        # the daemon as that other user, where root's file (which it may not unlink from sticky
        # /dev/shm) is planted: no EPERM, it sweeps only its own, and a start goes on
        ours = planted(segments.segment_name("ring", "r2", pid=gone), 0)
        done = as_nobody(SWEEP, ROOT)
        assert done.returncode == 0, done.stderr
        swept = json.loads(done.stdout)  # (and any dead segment of nobody's this host may have)
        assert os.path.basename(theirs) in swept and os.path.basename(ours) not in swept, swept
        assert os.path.exists(ours)
    finally:
        for path in (theirs, ours):
            if os.path.exists(path):
                os.unlink(path)


@needs_root
def test_liveness_is_kill_0_where_hidepid_hides_proc():
    """Under hidepid=2 this (root) process has no /proc entry for user nobody: psutil.pid_exists
    calls it dead; kill(pid, 0) answers EPERM, so it is alive and its segments stay."""
    mine, gone = os.getpid(), dead_pid()
    live = planted(segments.segment_name("ring", "r0", pid=mine), NOBODY)  # a live supervisor's (ours, as nobody sees it)
    dead = planted(segments.segment_name("ring", "r0", pid=gone), NOBODY)
    try:
        probe = ("import json, os, sys, psutil; sys.path.insert(0, sys.argv[1]); from heygem import segments; "
                 "pid = int(sys.argv[2]); print(json.dumps([os.path.exists(f'/proc/{pid}'), psutil.pid_exists(pid), "
                 "segments.pid_alive(pid), segments.sweep()]))")
        done = as_nobody(probe, ROOT, str(mine), hidepid=True)
        if done.returncode != 0 and "mount" in done.stderr:
            pytest.skip(f"cannot mount a hidepid /proc here: {done.stderr.strip()}")
        visible, psutil_says, alive, swept = json.loads(done.stdout)
        assert (visible, psutil_says, alive) == (False, False, True), done.stdout
        assert swept == [os.path.basename(dead)] and os.path.exists(live)
    finally:
        for path in (live, dead):
            if os.path.exists(path):
                os.unlink(path)


def test_pid_alive_answers_as_kill_does():
    assert segments.pid_alive(os.getpid()) and not segments.pid_alive(dead_pid())
    assert not segments.pid_alive(0) and not segments.pid_alive(2**40)  # a group, beyond pid_t
