"""The frame ring: full-resolution frames in shared memory, small descriptors in queues.

Upstream pickled batches of 1080p frames through `multiprocessing.Queue(10)`: every hop copied
~25 MB through a pipe, and a full queue made the producer log "queue full" and give up. Here the
frames stay in one `SharedMemory` block of `slots` fixed-size slots; a stage writes a frame into a
slot it acquired and sends a `FrameRef` (slot, job, frame index, shape) downstream; the last
reader releases the slot. The number of slots is the backpressure: a producer that finds none
free waits, in bounded slices, and checks for shutdown and cancellation between them.

Parent (replica supervisor)::

    ring = FrameRing.create(slots=8, shape=(1080, 1920, 3))    # spawn context by default
    ctx.Process(target=decode, args=(ring, out_q)).start()     # the ring pickles into children

Producer stage (child)::

    slot = ring.acquire(job_id, timeout=1.0, should_stop=stop.is_set)
    if slot is None: ...                      # timed out or told to stop: beat, check cancel, retry
    frame = ring.view(slot, (h, w, 3)); frame[:] = decoded     # no copy through any pipe
    put_bounded(out_q, FrameRef(slot, job_id, i, (h, w, 3)), timeout=1.0, should_stop=stop.is_set)

Consumer stage::

    ref = get_bounded(in_q, timeout=1.0, should_stop=stop.is_set)   # None: nothing yet / stop
    use(ring.view(ref.slot, ref.shape)); ring.release(ref.slot)

Failed or cancelled job: its frames may sit in any slot of any stage, and in the queues between
them. A slot belongs to whoever holds its `FrameRef`: each stage that takes one of the job's refs
(from its input queue, or its own batch) releases that slot as it drops the ref, so the job's
slots come back one by one as its refs reach a stage, and the next job starts with a full ring.
No stage frees slots it does not hold: a slot freed early could be acquired for another job while
a stale ref to it still travels. A stage process that dies holding slots takes them out of
service (each slot records its job id: `in_use()` shows them); the replica is then restarted with
a fresh ring. Slots are a counted resource (`BoundedSemaphore` = free slots, a lock
guards the owner table in the segment). Every lock and semaphore wait has a timeout; the lock is
held for a few array reads and writes only. If a process is killed inside that window the lock
stays taken: `acquire`/`release` then raise `RingError` after `LOCK_TIMEOUT_S`, and the replica
is restarted with a fresh ring.

Sharing: pass the ring to children through `Process(args=...)` (it pickles its segment name and
its semaphore and lock, which multiprocessing allows only while spawning a process). Create it
with the same context as the processes (`ctx=`, default spawn).

Segment life: the creator unlinks in `close()` (or leaving its `with` block). Children attach
untracked (`heygem.board.attach_segment`), so a child's exit, clean or killed, never unlinks the
segment and the resource tracker never warns about it; if the creator itself is killed, its
resource tracker unlinks the segment once the creator's process tree is gone.
"""

from __future__ import annotations

import multiprocessing
import queue
import secrets
import time
from contextlib import contextmanager
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np

from heygem.board import attach_segment
from heygem.segments import segment_name

FREE = -1
LOCK_TIMEOUT_S = 5.0
_ALIGN = 64


class RingError(Exception):
    """Misuse of the ring (double release, bad shape) or a lock left taken by a dead process."""


class FrameRef(NamedTuple):
    """What travels through queues instead of the frame: a few dozen bytes when pickled."""

    slot: int
    job: int
    index: int
    shape: tuple


def bounded(attempt: Callable[[float], Any], timeout: float, should_stop: Optional[Callable[[], bool]] = None,
            poll: float = 0.1) -> Any:
    """Call `attempt(slice_s)` in slices of at most `poll` s until it returns non-None.

    Returns None when `timeout` passes or `should_stop()` turns true (checked before every slice),
    so every wait in a stage loop is bounded and cancellable.
    """
    deadline = time.monotonic() + timeout
    while True:
        if should_stop is not None and should_stop():
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        result = attempt(min(poll, left))
        if result is not None:
            return result


def put_bounded(q, item: Any, timeout: float, should_stop: Optional[Callable[[], bool]] = None,
                poll: float = 0.1) -> bool:
    """`q.put(item)` that gives up (False) on timeout or stop instead of blocking forever."""

    def attempt(t: float) -> Optional[bool]:
        try:
            q.put(item, timeout=t)
            return True
        except queue.Full:
            return None

    return bool(bounded(attempt, timeout, should_stop, poll))


def get_bounded(q, timeout: float, should_stop: Optional[Callable[[], bool]] = None, poll: float = 0.1) -> Any:
    """`q.get()` that returns None on timeout or stop (so None is never a valid item)."""

    def attempt(t: float) -> Any:
        try:
            return q.get(timeout=t)
        except queue.Empty:
            return None

    return bounded(attempt, timeout, should_stop, poll)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class FrameRing:
    """`slots` frames of `shape`/`dtype` in one shared-memory segment, with owner accounting."""

    def __init__(self, shm: SharedMemory, slots: int, shape: tuple, dtype: np.dtype, owner: bool, free, lock):
        self._shm, self._owner, self._free, self._lock = shm, owner, free, lock
        self.name = shm.name.lstrip("/")
        self.slots, self.shape, self.dtype = slots, tuple(shape), np.dtype(dtype)
        self.slot_bytes = _aligned(int(np.prod(self.shape)) * self.dtype.itemsize)
        self._owners = np.ndarray((slots,), np.int64, buffer=shm.buf)
        self._data = np.ndarray((slots, self.slot_bytes), np.uint8, buffer=shm.buf, offset=_aligned(slots * 8))

    @classmethod
    def create(cls, slots: int, shape: tuple, dtype=np.uint8, name: Optional[str] = None, ctx=None) -> "FrameRing":
        """A new ring; every slot free. `name` defaults to heygem.segments' ring name + a random part."""
        if slots < 1 or not shape or min(shape) < 1:
            raise ValueError(f"a ring needs >= 1 slot and a positive shape, got {slots} x {shape}")
        ctx = ctx or multiprocessing.get_context("spawn")
        slot_bytes = _aligned(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        name = name or segment_name("ring", secrets.token_hex(4))
        shm = SharedMemory(name=name, create=True, size=_aligned(slots * 8) + slots * slot_bytes)
        np.ndarray((slots,), np.int64, buffer=shm.buf)[:] = FREE
        return cls(shm, slots, shape, dtype, True, ctx.BoundedSemaphore(slots), ctx.Lock())

    def __getstate__(self) -> dict:
        return {"name": self.name, "slots": self.slots, "shape": self.shape, "dtype": self.dtype.str,
                "free": self._free, "lock": self._lock}

    def __setstate__(self, s: dict) -> None:
        self.__init__(attach_segment(s["name"]), s["slots"], s["shape"], s["dtype"], False, s["free"], s["lock"])

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise RingError(f"ring {self.name}: lock held > {LOCK_TIMEOUT_S}s (a process died holding it?)")
        try:
            yield
        finally:
            self._lock.release()

    def acquire(self, job: int, timeout: float, should_stop: Optional[Callable[[], bool]] = None,
                poll: float = 0.1) -> Optional[int]:
        """A free slot, now owned by `job` (>= 0); None on timeout or when `should_stop()`."""
        if job < 0:
            raise ValueError(f"job ids are >= 0, got {job}")
        if not bounded(lambda t: self._free.acquire(timeout=t) or None, timeout, should_stop, poll):
            return None
        with self._locked():
            slot = int(np.flatnonzero(self._owners == FREE)[0])
            self._owners[slot] = job
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back; releasing a free slot is a bug and raises `RingError`."""
        with self._locked():
            if self._owners[slot] == FREE:
                raise RingError(f"ring {self.name}: slot {slot} is not held")
            self._owners[slot] = FREE
        self._free.release()

    def in_use(self) -> dict[int, int]:
        """Held slots and their job ids (a consistent copy, taken under the lock)."""
        with self._locked():
            return {int(s): int(self._owners[s]) for s in np.flatnonzero(self._owners != FREE)}

    def view(self, slot: int, shape: Optional[tuple] = None) -> np.ndarray:
        """The slot as an array of `shape` (default: the ring's; smaller frames fit), no copy."""
        shape = self.shape if shape is None else tuple(shape)
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        if nbytes > self.slot_bytes:
            raise RingError(f"a {shape} frame does not fit a slot of {self.shape}")
        return self._data[slot, :nbytes].view(self.dtype).reshape(shape)

    def close(self) -> None:
        """Unmap (the creator also unlinks). Views must not be used after this.

        If views are still alive the mapping stays until they are gone (the name is unlinked all
        the same), rather than pulling memory from under them.
        """
        self._owners = self._data = None
        try:
            self._shm.close()
        except BufferError:
            pass
        if self._owner:
            self._shm.unlink()
            self._owner = False

    def __enter__(self) -> "FrameRing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
