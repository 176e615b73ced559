"""ops.context.to_json writes what json.dumps(indent=2, ensure_ascii=False, default=str) writes."""

from __future__ import annotations

import enum
import json
import random
from pathlib import Path

import pytest

from ops.context import to_json


class Level(enum.IntEnum):
    HIGH = 3


def _dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, default=str)


@pytest.mark.parametrize("doc", [
    {"total": 0, "groups": []},
    {},
    [],
    [[], {}, [[]], {"a": {}}],
    {"cmdline": 'python "app.py" --in C:\\tmp\n\t\b\f\r\x00\x1f\x7f', "name": "spawn_main 🙂 é 中"},
    {"age": 1.0, "small": 1e-7, "big": 1e16, "neg": -0.0, "nan": float("nan"), "inf": float("inf"), "minf": float("-inf")},
    {"flags": [True, False, None], "n": -12, "huge": 2**80, "level": Level.HIGH},
    {1: "int key", 2.5: "float key", False: "bool key", None: "none key"},
    {"path": Path("/var/lib/heygem-ops"), "set": {3}, "bytes": b"\x00"},
    ("tuple", ("nested",)),
    "plain string",
    42,
])
def test_same_text_as_json_dumps(doc):
    assert to_json(doc) == _dumps(doc)


def test_random_documents_match_json_dumps():
    rng = random.Random(20261128)
    alphabet = [chr(c) for c in range(0x30)] + list('"\\/aZé中🙂\u2028\x7f')

    def value(depth: int):
        kind = rng.randrange(8 if depth < 4 else 5)
        if kind == 0:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
        if kind == 1:
            return rng.randint(-10**12, 10**12)
        if kind == 2:
            return rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-12, 12)
        if kind == 3:
            return rng.choice([None, True, False])
        if kind == 4:
            return rng.random()
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {value(5) if rng.random() < 0.8 else rng.randint(0, 9): value(depth + 1) for _ in range(rng.randrange(4))}

    for _ in range(2000):
        doc = value(0)
        assert to_json(doc) == _dumps(doc)


def test_unsupported_key_is_the_same_type_error():
    with pytest.raises(TypeError):
        _dumps({(1, 2): "x"})
    with pytest.raises(TypeError, match="keys must be str"):
        to_json({(1, 2): "x"})
