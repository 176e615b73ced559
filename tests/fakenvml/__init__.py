"""Moved to benchmarks/support/fakenvml/ (benchmarks import nothing from tests/); this
module keeps the tests' imports working."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # bare imports (`from fakenvml import ...`) put only tests/ on the path
    sys.path.append(_ROOT)

from benchmarks.support.fakenvml import MIB, SOURCE, FakeGpu, build_library, fake_env, write_values  # noqa: E402,F401
