"""Failpoints: make a job fail on purpose at a chosen frame of a chosen stage (tests, drills).

Like etcd's gofail or TiKV's fail-rs, with one action (raise) and one kind of place (a frame of a
job in a stage loop): enough to drive every failure path of the stages from outside, including
those that no bad input reaches (a generator that fails on the last batch, an encoder that fails
in the middle of a file).

    HEYGEM_FAILPOINTS="POINT[;POINT...]"
    POINT = STAGE ":frame=" N [":code=" CODE]

STAGE is decode, generate or encode; N is the frame's index in the job (0 is the first; negative
counts from the end, -1 is the last frame); CODE limits the point to the job with that code
(default: every job; a CODE here cannot contain ':' or ';'). At that frame the stage raises
`FailpointError` where a real error of its own would come from -- decode: after filling the
frame's ring slot, before handing it on; generate: before running the batch that holds the
frame; encode: before writing the frame -- so the job fails through the stage's ordinary error
path, with the reason `<stage>: failpoint <POINT>`.

Read once, when a stage process starts (a new value needs a replica restart). Unset, a stage
holds an empty `Failpoints` and each check is one falsy test. A malformed value is an error at
stage start, reported as the stage's fatal error: a drill never silently does nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

ENV = "HEYGEM_FAILPOINTS"


class FailpointError(RuntimeError):
    """Raised at a failpoint; its message (`failpoint <point>`) becomes the job's reason."""


@dataclass(frozen=True)
class Failpoint:
    stage: str
    frame: int
    code: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.stage}:frame={self.frame}" + (f":code={self.code}" if self.code is not None else "")


class Failpoints:
    """The failpoints of one stage; false when there are none."""

    def __init__(self, points: Iterable[Failpoint] = ()):
        self.points = tuple(points)

    def __bool__(self) -> bool:
        return bool(self.points)

    def check(self, code: str, index: int, frames: int) -> None:
        """Raise `FailpointError` if a point is set at frame `index` of job `code` (`frames` long)."""
        for p in self.points:
            if (p.code is None or p.code == code) and index == (p.frame if p.frame >= 0 else frames + p.frame):
                raise FailpointError(f"failpoint {p}")


def parse(text: str, stages: Iterable[str]) -> list[Failpoint]:
    """Every point in `text` (the variable's syntax); `ValueError` naming the bad part."""
    stages = tuple(stages)
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        stage, _, rest = part.partition(":")
        if stage not in stages:
            raise ValueError(f"{ENV}: {part!r}: the stage must be one of {', '.join(stages)}")
        fields = dict(kv.partition("=")[::2] for kv in rest.split(":") if kv)
        unknown = set(fields) - {"frame", "code"}
        if unknown or "frame" not in fields:
            raise ValueError(f"{ENV}: {part!r}: expected {stage}:frame=N[:code=CODE]")
        try:
            frame = int(fields["frame"])
        except ValueError:
            raise ValueError(f"{ENV}: {part!r}: frame must be an integer") from None
        out.append(Failpoint(stage, frame, fields.get("code") or None))
    return out


def load(stage: str, stages: Iterable[str], environ: Optional[Mapping[str, str]] = None) -> Failpoints:
    """The points of `stage` set in the environment (none when the variable is unset or empty)."""
    text = (os.environ if environ is None else environ).get(ENV, "")
    if not text:
        return Failpoints()
    return Failpoints(p for p in parse(text, stages) if p.stage == stage)
