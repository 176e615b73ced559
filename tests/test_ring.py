"""Frame ring: frames cross real spawned processes through shared memory; waits are bounded;
no segment is left in /dev/shm whatever the children do."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from heygem.ring import FrameRef, FrameRing, RingError, get_bounded, put_bounded

SHAPE = (6, 8, 3)
ROOT = Path(__file__).resolve().parent.parent
ctx = multiprocessing.get_context("spawn")


def shm_path(ring: FrameRing) -> Path:
    return Path("/dev/shm") / ring.name


@pytest.fixture
def ring():
    r = FrameRing.create(slots=2, shape=SHAPE)
    yield r
    r.close()
    assert not shm_path(r).exists()


def _invert(ring: FrameRing, inq, outq) -> None:
    """A stage: read each frame, write its inverse into a new slot, free the input slot."""
    while (ref := get_bounded(inq, timeout=30)) is not None and ref != "stop":
        slot = ring.acquire(ref.job, timeout=30)
        ring.view(slot, ref.shape)[:] = 255 - ring.view(ref.slot, ref.shape)
        ring.release(ref.slot)
        assert put_bounded(outq, ref._replace(slot=slot), timeout=30)


def test_frames_round_trip_through_a_spawned_stage(ring):
    inq, outq = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_invert, args=(ring, inq, outq))
    child.start()
    try:
        rng = np.random.default_rng(0)
        for i in range(6):  # more frames than slots: the producer waits for the child's releases
            frame = rng.integers(0, 256, SHAPE, dtype=np.uint8)
            slot = ring.acquire(job=3, timeout=30)
            assert slot is not None
            ring.view(slot)[:] = frame
            assert put_bounded(inq, FrameRef(slot, 3, i, SHAPE), timeout=10)
            out = get_bounded(outq, timeout=30)
            assert (out.job, out.index) == (3, i)
            assert np.array_equal(ring.view(out.slot, out.shape), 255 - frame)
            ring.release(out.slot)
        assert ring.in_use() == {}
        put_bounded(inq, "stop", timeout=10)
        child.join(timeout=30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(timeout=10)


def test_acquire_times_out_with_none(ring):
    assert ring.acquire(1, timeout=1) is not None
    assert ring.acquire(1, timeout=1) is not None
    start = time.monotonic()
    assert ring.acquire(1, timeout=0.3) is None
    assert 0.25 <= time.monotonic() - start < 5


def test_acquire_honours_should_stop(ring):
    ring.acquire(1, timeout=1), ring.acquire(1, timeout=1)
    asked = []
    start = time.monotonic()
    assert ring.acquire(1, timeout=60, should_stop=lambda: asked.append(1) or len(asked) > 3, poll=0.05) is None
    assert time.monotonic() - start < 10
    assert len(asked) == 4


def test_release_and_views(ring):
    slot = ring.acquire(7, timeout=1)
    small = ring.view(slot, (2, 2, 3))
    small[:] = 9
    assert ring.view(slot).reshape(-1)[:12].tolist() == [9] * 12
    with pytest.raises(RingError, match="does not fit"):
        ring.view(slot, (10, 8, 3))
    ring.release(slot)
    with pytest.raises(RingError, match="not held"):
        ring.release(slot)
    with pytest.raises(ValueError):
        ring.acquire(-1, timeout=1)


def _hold_and_hang(ring: FrameRing, job: int, ready) -> None:
    for _ in range(2):
        ring.acquire(job, timeout=10)
    ready.set()
    time.sleep(60)


def test_a_dead_holders_slots_stay_held_and_named(ring):
    """Only a ref's holder frees its slot: a killed stage's slots stay out of service (named by
    job in `in_use`) until the replica replaces its ring; the others keep working."""
    ready = ctx.Event()
    child = ctx.Process(target=_hold_and_hang, args=(ring, 5, ready))
    child.start()
    try:
        assert ready.wait(timeout=60)
        assert ring.in_use() == {0: 5, 1: 5}
        assert ring.acquire(6, timeout=0.2) is None
    finally:
        child.kill()  # the process this test started
        child.join(timeout=10)
    assert shm_path(ring).exists()  # a child's death does not take the segment with it
    assert ring.in_use() == {0: 5, 1: 5}
    ring.release(1)  # the holder of slot 1's ref (here: the test) lets go
    assert ring.acquire(6, timeout=1) == 1


def _run(tmp_path: Path, script: str) -> subprocess.Popen:
    """A separate Python program (its own resource tracker), as the service's processes are."""
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.Popen(
        [sys.executable, str(path)], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_no_leftovers_and_no_tracker_warnings(tmp_path):
    """Create, hand to a child that exits, close: /dev/shm is clean and nobody warns of a leak."""
    proc = _run(tmp_path, """
        import multiprocessing
        from heygem.ring import FrameRing

        def touch(ring):
            ring.release(ring.acquire(1, timeout=5))

        if __name__ == "__main__":
            ring = FrameRing.create(2, (4, 4, 3))
            print(ring.name, flush=True)
            p = multiprocessing.get_context("spawn").Process(target=touch, args=(ring,))
            p.start(); p.join(timeout=60)
            assert p.exitcode == 0, p.exitcode
            ring.close()
    """)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert "resource_tracker" not in err and "leaked" not in err, err
    assert not (Path("/dev/shm") / out.strip()).exists()


def test_killed_creator_leaves_no_segment(tmp_path):
    """SIGKILL of the creator: its resource tracker still unlinks the segment."""
    proc = _run(tmp_path, """
        import time
        from heygem.ring import FrameRing
        ring = FrameRing.create(2, (4, 4, 3))
        print(ring.name, flush=True)
        time.sleep(60)
    """)
    try:
        path = Path("/dev/shm") / proc.stdout.readline().strip()
        assert path.exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not path.exists()
