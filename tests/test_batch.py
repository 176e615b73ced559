"""The generator batch's reused buffers, and the stage processes' tuning."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from heygem import face
from heygem.batch import Batch

RNG = np.random.default_rng(7)


def crops(n: int) -> list[np.ndarray]:
    return [RNG.integers(0, 256, (256, 256, 3), np.uint8) for _ in range(n)]


def windows(n: int) -> list[np.ndarray]:
    return [RNG.standard_normal((256, 20)).astype(np.float32) for _ in range(n)]


def test_inputs_are_exactly_the_plain_conversions():
    batch, cut, feats = Batch(4), crops(4), windows(4)
    batch.set_reference(cut[0])
    for n in (4, 3, 1):  # the last batch of a job may be partial
        got = batch.inputs(cut[:n], feats[:n])
        assert (got["masked"] == face.to_nchw(np.stack([face.mask(c) for c in cut[:n]]))).all()
        assert (got["reference"] == face.to_nchw(np.stack([cut[0]] * n))).all()
        assert (got["audio"] == np.stack(feats[:n])).all()
        assert all(a.flags.c_contiguous for a in got.values())  # ONNX Runtime takes them without a copy


def test_reference_changes_with_the_job():
    batch, (a, b) = Batch(2), crops(2)
    batch.set_reference(a)
    batch.set_reference(b)
    assert (batch.inputs([a], windows(1))["reference"] == face.to_nchw(b)).all()


def test_outputs_round_clip_and_write_in_place():
    batch = Batch(4)
    generated = RNG.uniform(-0.3, 1.3, (3, 3, 256, 256)).astype(np.float32)
    generated[0, :, 0, 0] = (0.5 / 255, 1.5 / 255, 254.5 / 255)  # halves: rounding, not truncation
    ring = np.zeros((3, 256 * 256 * 3 + 16), np.uint8)  # slots whose crop part is a view
    views = [slot[:256 * 256 * 3].reshape(256, 256, 3) for slot in ring]
    batch.outputs(generated, views)
    assert np.abs(np.stack(views).astype(int) - face.from_nchw(generated)).max() <= 1
    assert views[1].max() == 255 and views[1].min() == 0
    assert (ring[:, 256 * 256 * 3:] == 0).all()


@pytest.mark.parametrize("n", [0, 5])
def test_wrong_batch_size_is_refused(n):
    with pytest.raises(ValueError, match="1 to 4 crops"):
        Batch(4).inputs(crops(n), windows(n))


FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from heygem.tuning import tune_process
    tune_process()
    import cv2
    assert cv2.getNumThreads() == 1
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # a batch's worth of frame-sized temporaries, written, then all freed
    blocks = [np.ones(3 << 20, np.uint8) for _ in range(6)]
    del blocks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_tuned_process_reuses_frame_sized_blocks():
    """Untuned, glibc gives the freed batch back to the kernel (heap trim) and the next batch
    page-faults all of it in again: 18 MB, ~4,600 faults, every time."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                       timeout=60, check=True).stdout) for mode in ("plain", "tuned")}
    assert faults["plain"] > 50 * 1000
    assert faults["tuned"] < faults["plain"] / 10


SPIN = """
import sys, time
import numpy as np
if sys.argv[1] == "tuned":
    from heygem.tuning import tune_process
    tune_process()
a, b = np.ones((256, 1024), np.float32), np.ones((1024, 80), np.float32)
for _ in range(2):  # the first round pays for imports' own threads starting
    cpu, main = time.process_time(), time.thread_time()
    for _ in range(20):  # a mel filterbank product, then the stage waits for its next frame
        a @ b
        time.sleep(0.01)
print(time.process_time() - cpu - (time.thread_time() - main))
"""


def test_tuned_process_has_no_spinning_blas_workers():
    """numpy's OpenBLAS workers spin after each product: CPU burned outside the stage's thread
    while it waits (issue 16: 1.5 ms per frame in decode). Tuned, the pool is one thread."""
    other = {mode: float(subprocess.run([sys.executable, "-c", SPIN, mode], capture_output=True, text=True,
                                        timeout=60, check=True).stdout) for mode in ("plain", "tuned")}
    assert other["tuned"] < 0.01, other
    if (os.cpu_count() or 1) > 1:  # a one-core machine's OpenBLAS has no workers to spin
        assert other["plain"] > 0.02, other
