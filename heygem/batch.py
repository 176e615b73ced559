"""The generator's batch: uint8 crops in, generated uint8 crops out, through buffers it reuses.

Converting four 256x256 crops to NCHW float32 and back the plain way (stack, mask copies,
astype, scale, repeat, clip, transpose) makes a dozen multi-MB temporaries per batch; with the
demo generator, a batch done that way took 2.3x as long as with a `Batch` (benchmarks/
bench_conversions.py). A `Batch` owns its float buffers, takes the reference crop once per job,
and writes results straight into the caller's arrays (the ring slots): a batch allocates nothing
but ONNX Runtime's output.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from heygem.models import CROP, FEATURE_DIM, FEATURE_STEPS, MASK_REGION

_SCALE = np.float32(1 / 255)


class Batch:
    """Input and output buffers for batches of up to `size` crops (see heygem.models.SPECS)."""

    def __init__(self, size: int, crop: int = CROP):
        self.size = size
        self.masked = np.empty((size, 3, crop, crop), np.float32)
        self.reference = np.empty_like(self.masked)
        self.audio = np.empty((size, FEATURE_DIM, FEATURE_STEPS), np.float32)
        self._pixels = np.empty((crop, crop, 3), np.float32)
        # face.mask's region: the lower face the generator must draw.
        self._mouth = tuple(int(round(v * crop)) for v in MASK_REGION)

    def set_reference(self, crop_img: np.ndarray) -> None:
        """The job's reference crop ([H,W,3] uint8), in every row; once per job."""
        _to_chw(crop_img, self.reference[0])
        self.reference[1:] = self.reference[0]

    def inputs(self, crops: Sequence[np.ndarray], features: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The generator's inputs for these crops ([H,W,3] uint8) and their audio windows."""
        n = len(crops)
        if not 0 < n <= self.size:
            raise ValueError(f"a batch holds 1 to {self.size} crops, not {n}")
        y0, y1, x0, x1 = self._mouth
        for i, (crop_img, window) in enumerate(zip(crops, features)):
            _to_chw(crop_img, self.masked[i])
            self.masked[i, :, y0:y1, x0:x1] = 0
            self.audio[i] = window
        return {"masked": self.masked[:n], "reference": self.reference[:n], "audio": self.audio[:n]}

    def outputs(self, generated: np.ndarray, into: Sequence[np.ndarray]) -> None:
        """Generated [n,3,H,W] floats in [0, 1] -> each array of `into` ([H,W,3] uint8, written
        in place), clipped and rounded to nearest (as heygem.face.from_nchw, within 1 level)."""
        import cv2

        hwc = self._pixels
        for chw, dest in zip(generated, into):
            cv2.merge(list(chw), hwc)
            np.clip(hwc, 0, 1, out=hwc)
            cv2.convertScaleAbs(hwc, dest, 255.0)  # |x| * 255, rounded and saturated: x >= 0 here


def _to_chw(img: np.ndarray, out: np.ndarray) -> None:
    """[H,W,3] uint8 -> `out` [3,H,W] float32 in [0, 1], exactly as heygem.face.to_nchw."""
    import cv2

    for plane, channel in zip(cv2.split(img), out):
        np.multiply(plane, _SCALE, out=channel)
