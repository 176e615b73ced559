"""Shared-memory segments a dead supervisor left behind are swept; nobody else's are."""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

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
