"""Frames per second from a producer process to a consumer process: shared-memory ring vs pickling.

Upstream pickled full-resolution frames through `multiprocessing.Queue`; the ring sends a
`FrameRef` and the consumer reads the slot in place. Both ways run side by side, alternating, in
one run, with the same frame count, queue bound and consumer work:

- pickle: producer `put(frame)` into `Queue(slots)`; consumer `get()` and touches the frame.
- ring:   producer acquires a slot and copies the frame in (as a decoder writing its output);
          consumer gets the ref, touches the frame in the slot, releases it.
- ring+copy: as ring, but the consumer also copies the frame out (a pessimistic consumer).

"Touch" is a strided checksum of the frame: what a consumer that reads it costs, without
letting the consumer's own compute hide the transport cost.

    .venv/bin/python benchmarks/bench_ring.py --frames 200 --reps 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import numpy as np

from heygem.ring import FrameRef, FrameRing, get_bounded, put_bounded

WAIT_S = 60.0


def produce_pickled(q, go, frames: int, shape: tuple) -> None:
    frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    q.put("ready", timeout=WAIT_S)
    go.wait(timeout=WAIT_S)
    for _ in range(frames):
        if not put_bounded(q, frame, timeout=WAIT_S):
            raise SystemExit("consumer stopped taking frames")


def produce_ring(ring: FrameRing, q, go, frames: int, shape: tuple) -> None:
    frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    q.put("ready", timeout=WAIT_S)
    go.wait(timeout=WAIT_S)
    for i in range(frames):
        slot = ring.acquire(job=1, timeout=WAIT_S)
        if slot is None:
            raise SystemExit("no slot freed within the wait")
        np.copyto(ring.view(slot), frame)
        if not put_bounded(q, FrameRef(slot, 1, i, shape), timeout=WAIT_S):
            raise SystemExit("consumer stopped taking frames")


def touch(frame: np.ndarray) -> int:
    return int(frame[::97, ::97].sum())


def run(way: str, frames: int, shape: tuple, slots: int) -> float:
    """Frames per second for one way, measured in this (the consumer) process."""
    ctx = multiprocessing.get_context("spawn")
    q, go = ctx.Queue(slots), ctx.Event()
    ring = FrameRing.create(slots, shape, ctx=ctx) if way != "pickle" else None
    args = (q, go, frames, shape)
    producer = ctx.Process(target=produce_pickled, args=args) if ring is None else \
        ctx.Process(target=produce_ring, args=(ring, *args))
    producer.start()
    try:
        if get_bounded(q, timeout=WAIT_S) != "ready":
            raise RuntimeError("producer did not start")
        go.set()
        start = time.perf_counter()
        for _ in range(frames):
            item = get_bounded(q, timeout=WAIT_S)
            if item is None:
                raise RuntimeError(f"{way}: producer stalled")
            if ring is None:
                touch(item)
            else:
                view = ring.view(item.slot, item.shape)
                touch(np.array(view) if way == "ring+copy" else view)
                del view
                ring.release(item.slot)
        elapsed = time.perf_counter() - start
        producer.join(timeout=WAIT_S)
        return frames / elapsed
    finally:
        if producer.is_alive():
            producer.terminate()
            producer.join(timeout=10)
        if ring is not None:
            ring.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--shape", default="1080x1920x3", help="HxWxC of uint8 frames")
    opts = parser.parse_args()
    shape = tuple(int(x) for x in opts.shape.split("x"))
    ways = ("pickle", "ring", "ring+copy")
    fps: dict[str, list[float]] = {w: [] for w in ways}
    for rep in range(opts.reps):
        for way in ways if rep % 2 == 0 else ways[::-1]:
            fps[way].append(run(way, opts.frames, shape, opts.slots))
    mb = np.prod(shape) / 1e6
    base = statistics.median(fps["pickle"])
    print(f"{opts.frames} frames of {opts.shape} uint8 ({mb:.1f} MB), {opts.slots} slots, {opts.reps} reps, median")
    print(f"{'way':<10} {'frames/s':>9} {'GB/s':>6} {'vs pickle':>9}   all runs (frames/s)")
    for way in ways:
        med = statistics.median(fps[way])
        runs = " ".join(f"{v:.0f}" for v in fps[way])
        print(f"{way:<10} {med:>9.1f} {med * mb / 1e3:>6.2f} {med / base:>8.1f}x   {runs}")


if __name__ == "__main__":
    main()
