"""Moved to benchmarks/support/procs_helpers.py (benchmarks import nothing from tests/); this
module keeps the tests' imports working."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # bare imports (`from procs_helpers import ...`) put only tests/ on the path
    sys.path.append(_ROOT)

from benchmarks.support.procs_helpers import LIFETIME_S, SCRIPT, ZombieMaker, proc_state  # noqa: E402,F401
