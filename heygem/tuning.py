"""Process settings for the stage processes' hot loops: thread pools, malloc, scheduling priority.

Why a module of its own: these are measured performance decisions (BENCHMARKS.md,
benchmarks/bench_conversions.py, benchmarks/bench_pipeline.py), not stage logic, and the
benchmarks' single-process baselines apply the very same settings so that their rows compare
like with like. They are the only process-wide knobs the pipeline turns; none changes results.
"""

from __future__ import annotations

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_KEEP_BYTES = 64 << 20

# Decode and encode run this much nicer than generate. The generator is the bottleneck (the
# stage that feeds the GPU): a time slice it loses is throughput lost, while the other two have
# the ring's slots as slack. On a busy CPU the scheduler then serves generate first (measured on
# 2 cores, generator-bound: +5 % to +15 % fps, BENCHMARKS.md).
HELPER_NICE = 5


def tune_process() -> None:
    """Settings for a stage's hot loop, applied in each stage process (and in the benchmarks'
    single-process baselines, so they compare like with like).

    - OpenCV's thread pool goes to 1: a replica's parallelism is its three stage processes (and
      the generator's ONNX Runtime pool); a pool per process sized to every core oversubscribes
      them, and each parallel loop then waits on its slowest, preempted, thread.
    - numpy's OpenBLAS pool goes to 1 as well (`blas_threads`), for a worse reason: after each
      matrix product its idle workers spin. The audio features' mel filterbank is one product
      per chunk of frames, and decode's spinning worker burned 1.5 ms of CPU per frame on a core
      the generator needed (issue 16: decode 4.7 -> 3.2 ms of CPU per frame, 2 cores).
    - glibc malloc keeps blocks below 64 MiB on the heap and lets 64 MiB of free heap stay
      mapped. Frames and batches are megabytes, allocated and freed at video rate; by default
      glibc hands freed ones back to the kernel and the next use page-faults fresh zeroed pages:
      measured 3,400 faults and 11 ms of kernel time per batch of four crops, about the demo
      generator's own compute (benchmarks/bench_conversions.py). Not glibc (musl): left as is.
    """
    import ctypes

    import cv2

    cv2.setNumThreads(1)
    blas_threads(1)
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    mallopt(_M_MMAP_THRESHOLD, HEAP_KEEP_BYTES)
    mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP_BYTES)


# OpenBLAS's setter, under the names its builds export (numpy's wheels: scipy_openblas64_).
_BLAS_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                 "scipy_openblas_set_num_threads", "openblas_set_num_threads64_")


def blas_threads(n: int) -> list[str]:
    """Set the thread count of every OpenBLAS this process has loaded (numpy's, once numpy is
    imported), as threadpoolctl does, without the dependency. Returns the libraries set."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(maxsplit=5)[5].strip() for line in maps
                     if "openblas" in line.lower() and len(line.split(maxsplit=5)) == 6}
    except OSError:
        return []
    done = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, name) for name in _BLAS_SETTERS if hasattr(lib, name)), None)
        if setter is not None:
            setter(int(n))
            done.append(path)
    return done
