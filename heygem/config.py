"""The pipeline's section of the configuration: devices, fallback policy, models, batching.

Validated with pydantic so that a bad value is refused at load with the key that holds it;
`watchdog.config` embeds this section in the full file schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# x264's presets, fastest first (`ffmpeg -h encoder=libx264`).
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


class Section(BaseModel):
    """Base for every config section: unknown keys and silent type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelPaths(Section):
    """ONNX model files. Unset paths mean the demo models built by `heygem-ops demo`."""

    audio_encoder: Optional[Path] = Field(default=None, strict=False)
    generator: Optional[Path] = Field(default=None, strict=False)
    detector: Optional[Path] = Field(default=None, strict=False)


class PipelineConfig(Section):
    devices: Union[list[int], Literal["cpu"]] = Field(
        default="cpu", description='GPU indices, one replica each, or "cpu"'
    )
    cpu_replicas: int = Field(default=1, ge=1, le=64, description='replicas when devices = "cpu"')
    cpu_threads: Optional[int] = Field(
        default=None, ge=1, le=256,
        description="ONNX Runtime threads of each CPU replica's generator (default: the cores shared among the CPU replicas)",
    )
    fallback: Literal["fail", "warn"] = Field(
        default="fail", description="what a replica does when CUDA was asked for and is not active"
    )
    batch_size: int = Field(default=4, ge=1, le=64)
    ring_slots: int = Field(default=8, ge=2, le=256, description="shared-memory frame slots per replica")
    stall_after_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=20, description="claims of one job before it fails")
    lease_s: float = Field(default=30.0, gt=0)
    max_width: int = Field(default=3840, ge=16)
    max_height: int = Field(default=2160, ge=16)
    face_box: Optional[tuple[int, int, int, int]] = Field(
        default=None, strict=False, description="fixed face box x, y, w, h when no detector model is set"
    )
    encoder_preset: Literal[PRESETS] = Field(
        default="veryfast",
        description="x264 preset of the outputs: faster costs less CPU and latency per frame, slower gives smaller files",
    )
    encoder_crf: int = Field(default=20, ge=0, le=51, description="x264 constant rate factor (lower: better, larger)")
    encoder_threads: Optional[int] = Field(
        default=None, ge=1, le=64,
        description="x264 threads per job (default: the cores the replicas' CPU generators leave, shared among replicas)",
    )
    models: ModelPaths = ModelPaths()

    @field_validator("devices")
    @classmethod
    def _devices_distinct(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError('must list at least one GPU index, or be "cpu"')
            if any(i < 0 for i in v):
                raise ValueError("GPU indices are >= 0")
            if len(set(v)) != len(v):
                raise ValueError("GPU indices must be distinct")
        return v
