"""`[store]` and `[daemon] host_name`: which job store a configuration opens, refused URLs, and
the host in worker names. No server needed."""

from __future__ import annotations

import pytest

from heygem.jobs import JobStore, host_name, worker_host
from watchdog.config import ConfigError, parse
from watchdog.store import open_job_store


def test_no_url_is_sqlite_in_the_state_directory(tmp_path):
    config = parse({"daemon": {"state_dir": str(tmp_path / "state")}})
    store = open_job_store(config)
    assert isinstance(store, JobStore) and store.path == tmp_path / "state" / "jobs.sqlite3" and not store.shared


def test_a_postgresql_url_is_the_shared_store_opened_lazily(tmp_path):
    url = "postgresql://heygem:s3cret-pw@db.invalid:5432/heygem"
    config = parse({"daemon": {"state_dir": str(tmp_path)}, "store": {"url": url, "connect_timeout_s": 1.5},
                    "pipeline": {"max_attempts": 4}})
    store = open_job_store(config)  # no connection yet: nothing to reach here
    assert (store.backend, store.shared, store.max_attempts, store.connect_timeout_s) == ("postgresql", True, 4, 1.5)
    assert store.describe() == "postgresql://heygem@db.invalid:5432/heygem"
    assert "s3cret-pw" not in repr(config)


@pytest.mark.parametrize("url, why", [
    ("mysql://u:s3cret-pw@db/x", "is not a postgresql:// URL"),
    ("postgresql://u:s3cret-pw@db/x?bogus=1", "invalid URI query parameter"),
    ("sqlite:////var/lib/x.db", "is not a postgresql:// URL"),
])
def test_a_bad_url_is_refused_naming_the_key_not_the_password(url, why):
    with pytest.raises(ConfigError) as err:
        parse({"store": {"url": url}}, "fleet.toml")
    assert "fleet.toml: [store] url:" in str(err.value) and why in str(err.value)
    assert "s3cret-pw" not in str(err.value)


def test_store_keys_are_checked():
    with pytest.raises(ConfigError, match=r"\[store\] pool_size"):
        parse({"store": {"pool_size": 0}})
    with pytest.raises(ConfigError, match=r"\[store\] where: unknown key"):
        parse({"store": {"where": "x"}})


def test_host_name_names_the_workers(monkeypatch):
    from heygem.jobs import HOST_ENV
    from heygem.replica import Replica

    monkeypatch.setenv(HOST_ENV, "gpu-07")
    assert host_name() == "gpu-07"
    replica = Replica.__new__(Replica)
    replica.index, replica.generation = 2, 3
    assert replica.worker.startswith("replica-2.3@gpu-07:") and worker_host(replica.worker) == "gpu-07"
    monkeypatch.delenv(HOST_ENV)
    assert host_name()  # the system's host name
    assert parse({"daemon": {"host_name": "gpu-08"}}).daemon.host_name == "gpu-08"
