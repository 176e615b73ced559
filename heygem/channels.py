"""The plumbing between a replica's supervisor and its three stage processes.

Why a module of its own: this is the part of a replica that crosses process boundaries, and each
piece here exists because the obvious `multiprocessing` primitive has a failure mode that wedges
a replica when a process dies at the wrong moment (see `Flag` and `release_queues`). The stage
loops (`heygem.stages`) and the supervisor (`heygem.replica`) both build on it; neither owns it.

    Channels   what a stage gets at spawn: the frame ring, the two descriptor queues, the events
               queue to the supervisor, the stop and drain flags and the abort list.
    Flag       a process-shared boolean whose setter never blocks (unlike `Event.set`).
    Aborts     the ids of recently failed or cancelled jobs, readable without a lock.
    release_queues   lets a stage process exit though nobody reads its queues any more.

Every wait here is bounded: `Flag.wait` takes a timeout, `Aborts.add` gives up on its lock after
5 s, and bounded queue I/O is `heygem.ring.get_bounded` / `put_bounded`.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from heygem.ring import FrameRing

POLL_S = 0.1  # how often `Flag.wait` looks at the flag (it sleeps half this between looks)


class Aborts:
    """The ids of recently failed or cancelled jobs, shared by a replica's stages.

    A small ring of int64 in shared memory; each write is one aligned word, so readers need no
    lock. Eight entries are plenty: a stage only needs to recognise the jobs still in flight.
    """

    SIZE = 8

    def __init__(self, ctx):
        self._ids = ctx.Array("q", [-1] * (self.SIZE + 1), lock=False)  # last word: next index
        self._lock = ctx.Lock()

    def add(self, job: int) -> None:
        if job in self:
            return
        if not self._lock.acquire(timeout=5.0):
            raise RuntimeError("abort list lock held for 5 s")
        try:
            i = self._ids[self.SIZE]
            self._ids[i % self.SIZE] = job
            self._ids[self.SIZE] = (i + 1) % self.SIZE
        finally:
            self._lock.release()

    def __contains__(self, job: int) -> bool:
        return job in self._ids[: self.SIZE]


class Flag:
    """A process-shared boolean that can never wedge its setter.

    `multiprocessing.Event` is built on a Condition: `set()` waits, without a timeout, for each
    sleeping waiter to wake, so a stage killed inside `Event.wait()` makes the supervisor's
    `stop.set()` hang forever, and one killed inside `is_set()` leaves its lock taken. One
    shared byte, written and read without a lock, has neither failure; `wait` polls it.
    """

    def __init__(self, ctx):
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL_S / 2, left))
        return True


class Channels(NamedTuple):
    """The replica's shared plumbing, handed to each stage process at spawn."""

    ring: FrameRing
    to_generate: object  # multiprocessing queue
    to_encode: object
    events: object  # stage -> supervisor: ("session" | "ready" | "fatal" | "job", stage, payload)
    stop: Flag  # leave the loop now
    drain: Flag  # take no new job, finish the current one
    aborts: Aborts


def release_queues(ch: Channels, orphaned: bool) -> None:
    """Let the stage process exit without waiting for its queues' readers.

    At exit, multiprocessing joins each queue's feeder thread, which blocks for good writing a
    message larger than the pipe's buffer (a JobStart carries a 196 KB crop) to a stage that
    has already left: after its supervisor was SIGKILLed, a stage then outlived it forever.
    Frames in flight are abandoned on stop anyway. Events still go out to a living supervisor
    (a fatal event carries the reason), and are dropped only when it is gone.
    """
    for q in (ch.to_generate, ch.to_encode):
        q.cancel_join_thread()
    if orphaned:
        ch.events.cancel_join_thread()
