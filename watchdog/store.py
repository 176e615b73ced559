"""The job store as the configuration names it (`[store]`), and the fleet as the store sees it.

    open_job_store(config)   SQLite in the state directory, or PostgreSQL for `[store] url`
    fleet(store)             which host holds which job (a shared store), for `status` and `jobs`

Imports heygem.jobs lazily: `heygem-ops zombies` and friends never pay for it.
"""

from __future__ import annotations

from typing import Optional


def open_job_store(config, paths=None, *, busy_timeout_s: float = 10.0):
    """The configured job store (not yet connected, for PostgreSQL: `prepare()` checks it)."""
    from heygem.jobs import open_store
    from watchdog.state import StatePaths

    paths = paths or StatePaths(config.state_dir())
    s = config.store
    return open_store(s.url, paths.store, max_attempts=config.pipeline.max_attempts, busy_timeout_s=busy_timeout_s,
                      connect_timeout_s=s.connect_timeout_s, pool_size=s.pool_size)


def fleet(store, limit: int = 1000) -> dict:
    """Running jobs by host: {"hosts": {host: [job ids]}, "running": n}. Hosts are read from the
    worker names; jobs of workers without a host are under ""."""
    hosts: dict[str, list[int]] = {}
    running = store.list(state="running", limit=limit)
    for job in sorted(running, key=lambda j: j.id):
        hosts.setdefault(job.host or "", []).append(job.id)
    return {"hosts": dict(sorted(hosts.items())), "running": len(running)}


def describe(store) -> dict:
    """What `status --json` says of the store: backend, where (no password), shared."""
    return {"backend": store.backend, "where": store.describe(), "shared": store.shared}


def reach(store) -> Optional[str]:
    """None when the store answers; else why not (one line)."""
    from heygem.jobs import UNAVAILABLE, StoreConfigError

    try:
        store.ping()
    except UNAVAILABLE as err:
        return f"unreachable: {err}"
    except StoreConfigError as err:
        return str(err)
    return None


def status_view(config, paths=None) -> tuple[dict, dict, Optional[str]]:
    """What `heygem-ops status` shows of the store: (job counts, the store and, when shared, the
    running jobs of each host, a problem or None). Never raises for a store that is away."""
    from heygem.jobs import STATES, UNAVAILABLE, StoreConfigError

    store = open_job_store(config, paths)
    view = {**describe(store), "error": None, "hosts": None}
    try:
        counts = store.counts()
        if store.shared:
            view["hosts"] = fleet(store)["hosts"]
    except (*UNAVAILABLE, StoreConfigError) as err:
        view["error"] = str(err)
        return dict.fromkeys(STATES, 0), view, f"job store {store.describe()}: {err}"
    finally:
        store.dispose()
    return counts, view, None
