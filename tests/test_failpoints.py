"""The failpoint facility's syntax and matching (the pipeline cases are in test_failed_jobs.py)."""

from __future__ import annotations

import pytest

from heygem import failpoints
from heygem.failpoints import ENV, Failpoint, FailpointError, Failpoints, load, parse

STAGES = ("decode", "generate", "encode")


def test_parse_points_with_and_without_a_code():
    assert parse("decode:frame=0; generate:frame=-1:code=job-7;;", STAGES) == [
        Failpoint("decode", 0), Failpoint("generate", -1, "job-7")]
    assert str(Failpoint("generate", -1, "job-7")) == "generate:frame=-1:code=job-7"


@pytest.mark.parametrize("text, words", [
    ("paste:frame=1", "the stage must be one of decode, generate, encode"),
    ("decode", "expected decode:frame=N[:code=CODE]"),
    ("decode:every=2", "expected decode:frame=N[:code=CODE]"),
    ("encode:frame=last", "frame must be an integer"),
])
def test_a_malformed_value_is_an_error_naming_the_part(text, words):
    with pytest.raises(ValueError, match=f"{ENV}: .*{words}".replace("[", r"\[").replace("]", r"\]")):
        parse(text, STAGES)


def test_load_keeps_the_stage_s_points_and_is_empty_when_unset():
    env = {ENV: "decode:frame=1;encode:frame=2"}
    assert load("encode", STAGES, env).points == (Failpoint("encode", 2),)
    assert not load("generate", STAGES, env)
    assert not load("decode", STAGES, {})
    assert not load("decode", STAGES, {ENV: ""})


def test_check_fires_at_its_frame_counting_from_either_end():
    points = Failpoints([Failpoint("encode", 3), Failpoint("encode", -1, "b")])
    points.check("a", 2, 10)
    with pytest.raises(FailpointError, match=r"^failpoint encode:frame=3$"):
        points.check("a", 3, 10)
    points.check("a", 9, 10)  # the last-frame point is job b's only
    with pytest.raises(FailpointError, match="encode:frame=-1:code=b"):
        points.check("b", 9, 10)
    assert failpoints.Failpoints().points == ()
