"""Per-frame face geometry: find the face, cut the generator's crop, paste its output back.

A crop is a square of side max(w, h) * (1 + 2 * margin) centred on the face box, resampled to
`size` x `size` by one affine warp (edge pixels replicated where the square leaves the frame).
`Placement` keeps that warp, so `paste` can put the generated crop back exactly where it came
from, blended through a feathered square so no seam shows. Images are OpenCV's BGR uint8;
models see float32 NCHW in [0, 1] (`to_nchw` / `from_nchw`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from heygem.models import DETECTOR_SIZE, MASK_REGION, infer

Box = tuple[int, int, int, int]  # x, y, w, h in pixels, as config `face_box`

CROP_SIZE = 256
MARGIN = 0.15
FEATHER = 0.08  # share of the crop side over which the pasted crop fades into the frame
MIN_FACE_PX = 4


class FaceError(ValueError):
    """A face box that cannot be used."""


@dataclass(frozen=True)
class Placement:
    """Where a crop came from: `matrix` maps frame pixels to crop pixels (2x3 affine)."""

    matrix: np.ndarray
    size: int


def to_nchw(images: np.ndarray) -> np.ndarray:
    """[H,W,3] or [N,H,W,3] uint8 -> [N,3,H,W] float32 in [0, 1]."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) * np.float32(1 / 255)


def from_nchw(x: np.ndarray) -> np.ndarray:
    """[N,3,H,W] float in [0, 1] -> [N,H,W,3] uint8, clipped and rounded."""
    y = np.clip(np.asarray(x, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(y.transpose(0, 2, 3, 1))


def crop(frame: np.ndarray, box: Sequence[float], size: int = CROP_SIZE, margin: float = MARGIN) -> tuple[np.ndarray, Placement]:
    """(crop [size,size,3], placement) for the face `box` (x, y, w, h) in `frame`."""
    import cv2

    x, y, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0):
        raise FaceError(f"face box {tuple(box)} has no area")
    side = max(w, h) * (1 + 2 * margin)
    scale = size / side
    x0, y0 = x + w / 2 - side / 2, y + h / 2 - side / 2
    matrix = np.array([[scale, 0.0, -x0 * scale], [0.0, scale, -y0 * scale]], np.float64)
    out = cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out, Placement(matrix, size)


def mask(crop_img: np.ndarray, region: tuple[float, float, float, float] = MASK_REGION) -> np.ndarray:
    """A copy of the crop with the mouth region (rows y0..y1, columns x0..x1, as shares of the
    side) set to zero, as DINet's masked source image: the generator must draw that part."""
    out = crop_img.copy()
    y0, y1, x0, x1 = _region_px(region, out.shape[0])
    out[y0:y1, x0:x1] = 0
    return out


def _region_px(region: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
    return tuple(int(round(v * size)) for v in region)  # type: ignore[return-value]


@lru_cache(maxsize=8)
def _feather(size: int) -> np.ndarray:
    """[size,size] float32 alpha: 1 in the middle, a smooth ramp to 0 at the crop's edges."""
    ramp = max(1, int(round(FEATHER * size)))
    edge = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32)
    line = np.clip((edge + 0.5) / ramp, 0.0, 1.0)
    line = line * line * (3 - 2 * line)  # smoothstep: no visible kink where the ramp ends
    return np.outer(line, line).astype(np.float32)


def paste(frame: np.ndarray, crop_img: np.ndarray, placement: Placement) -> np.ndarray:
    """Blend `crop_img` back into `frame` where it was cut from; modifies and returns `frame`.

    Only the crop's bounding rectangle in the frame is touched (a few hundred pixels square,
    whatever the frame size), so the cost does not grow with the frame's resolution.
    """
    import cv2

    inverse = cv2.invertAffineTransform(placement.matrix)
    corners = inverse @ np.array([[0, 0, 1], [placement.size, placement.size, 1]], np.float64).T
    fh, fw = frame.shape[:2]
    x0, y0 = max(0, math.floor(corners[0].min())), max(0, math.floor(corners[1].min()))
    x1, y1 = min(fw, math.ceil(corners[0].max())), min(fh, math.ceil(corners[1].max()))
    if x1 <= x0 or y1 <= y0:
        return frame
    local = inverse.copy()
    local[:, 2] -= (x0, y0)
    roi_size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(crop_img, local, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(_feather(placement.size), local, roi_size, flags=cv2.INTER_LINEAR, borderValue=0)
    roi = frame[y0:y1, x0:x1]
    # One pass in C: alpha * warped + (1 - alpha) * roi, rounded; a numpy blend makes five
    # float copies of the region and costs twice as much.
    roi[:] = cv2.blendLinear(warped, roi, alpha, 1.0 - alpha)
    return frame


def detect(model, frame: np.ndarray) -> Optional[Box]:
    """The face box (x, y, w, h) in `frame` pixels, or None when the detector finds no face.

    `model` is an ONNX Runtime session (or a callable taking {"image": ...}) with the
    "detector" spec: the frame, resized to the model's input size, in; a normalised
    (x0, y0, x1, y1) box out.
    """
    import cv2

    height, width = _input_size(model)
    # INTER_LINEAR, as common detectors' own preprocessing does: INTER_AREA at these
    # non-integer ratios costs 1.3 ms per 640x360 frame and ~10 ms per 1080p frame.
    small = cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR)
    x0, y0, x1, y1 = (float(v) for v in np.asarray(infer(model, "detector", {"image": to_nchw(small)})).reshape(4))
    fh, fw = frame.shape[:2]
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    left, top = max(0, round(x0 * fw)), max(0, round(y0 * fh))
    right, bottom = min(fw, round(x1 * fw)), min(fh, round(y1 * fh))
    if right - left < MIN_FACE_PX or bottom - top < MIN_FACE_PX:
        return None
    return (left, top, right - left, bottom - top)


def _input_size(model) -> tuple[int, int]:
    """The detector's fixed input H, W when it declares them, else DETECTOR_SIZE."""
    get_inputs = getattr(model, "get_inputs", None)
    if get_inputs is not None:
        shape = get_inputs()[0].shape
        if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:]):
            return shape[2], shape[3]
    return DETECTOR_SIZE, DETECTOR_SIZE


def fixed_box(face_box: Sequence[int], frame_shape: Sequence[int]) -> Box:
    """Config `face_box` (x, y, w, h), checked against the frame it will be used on."""
    x, y, w, h = (int(v) for v in face_box)
    fh, fw = frame_shape[:2]
    if w < MIN_FACE_PX or h < MIN_FACE_PX:
        raise FaceError(f"face_box {tuple(face_box)}: width and height must be at least {MIN_FACE_PX} px")
    if x < 0 or y < 0 or x + w > fw or y + h > fh:
        raise FaceError(f"face_box {tuple(face_box)} does not fit in the {fw}x{fh} video")
    return (x, y, w, h)
