"""PostgreSQL for the tests: one throwaway cluster per session (benchmarks/support/pg.py), a
database per use.

Where PostgreSQL cannot be had (no server programs, no psycopg) the tests that need it skip and
say why; on CI (`CI=true`) they fail instead, since CI installs it (.ci/run).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from benchmarks.support.pg import Cluster, unavailable  # noqa: E402


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def need(what: str, why: str | None) -> None:
    """Skip (fail on CI) when `why` says what is missing."""
    if why:
        if on_ci():
            pytest.fail(f"CI must run the {what} tests, but: {why}")
        pytest.skip(f"{what} not available: {why}")


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL cluster (started once; its data folder removed at the end)."""
    need("PostgreSQL", unavailable())
    cluster = Cluster.create()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_jobs_url(postgres):
    """A database of the session with the job store's schema (tests empty its table first)."""
    from heygem.jobs_pg import PgJobStore

    url = postgres.fresh_database()
    store = PgJobStore(url)
    store.prepare(migrate=True)
    return url


@pytest.fixture
def pg_fresh_url(postgres):
    """A new empty database (no schema yet)."""
    return postgres.fresh_database()


def empty(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE heygem_jobs RESTART IDENTITY")
