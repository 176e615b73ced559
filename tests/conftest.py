"""Shared fixtures. Tests start real processes and only ever signal the ones they started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `heygem-ops ARGS` in a subprocess with this interpreter; capture text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT,
    )


@pytest.fixture
def cli():
    return run_cli


# PostgreSQL (the shared job store): one throwaway cluster per session, tests/pg_helpers.py.
from pg_helpers import pg_fresh_url, pg_jobs_url, postgres  # noqa: E402,F401


# The fast inner loop (`pytest -m "not slow"`) leaves out every test that starts real processes:
# a daemon, a pipeline, CLI subprocesses, a compiler, systemd-analyze, a PostgreSQL cluster.
# One list here rather than a mark in each module, so a module's place in it is seen at a glance.
PROCESS_MODULES = frozenset({
    "test_bad_inputs", "test_batch", "test_benchmarks", "test_board", "test_chaos", "test_clean", "test_daemon",
    "test_doctor", "test_failed_jobs", "test_fleet", "test_front", "test_gpu", "test_gpu_check", "test_heal",
    "test_input_formats", "test_jobs_cli", "test_lifecycle", "test_monitor", "test_official_client",
    "test_pipeline", "test_procs", "test_prometheus_rules", "test_reaper", "test_ring", "test_systemd",
    "test_zombies",
})


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        fixtures = getattr(item, "fixturenames", ())
        if module in PROCESS_MODULES or "[postgresql" in item.nodeid or any(f == "postgres" or f.startswith("pg_") for f in fixtures):
            item.add_marker(pytest.mark.slow)
