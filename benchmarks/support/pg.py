"""A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` into a temporary folder, one
`postgres` server on a free 127.0.0.1 port, removed at the end. No system service, no root.

PostgreSQL refuses to run as root: when this process is root, the cluster belongs to an
unprivileged account (`postgres` from the Debian package if it exists, else `nobody`) and its
programs run as that account (`subprocess` `user=`/`group=`, nothing setuid). The server is this
process's own child (not `pg_ctl start`, which would leave it to init to reap), so `stop()` signals
only the process this harness started and waits for it.

    with Cluster.create() as pg:        # or Cluster.create() ... pg.destroy()
        url = pg.url                     # postgresql://heygem:<password>@127.0.0.1:<port>/heygem
        pg.stop(); pg.start()            # a database outage, data kept

`find_bindir()` looks in $HEYGEM_PG_BINDIR, then on PATH, then in Debian's
/usr/lib/postgresql/<version>/bin; `unavailable()` says why a cluster cannot be made here (None
when it can).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

USER = "heygem"
DATABASE = "heygem"


def find_bindir() -> Optional[Path]:
    """The folder holding initdb and postgres, or None."""
    env = os.environ.get("HEYGEM_PG_BINDIR")
    candidates = [Path(env)] if env else []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versions)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


def _account() -> Optional[pwd.struct_passwd]:
    """Whom the cluster runs as: None (this user) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists")


def unavailable() -> Optional[str]:
    """Why no throwaway cluster can be made here, or None."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as err:
        return f"psycopg is not installed ({err}): pip install 'psycopg[binary,pool]'"
    if find_bindir() is None:
        return ("PostgreSQL server programs (initdb, postgres) not found: apt-get install postgresql, or set "
                "HEYGEM_PG_BINDIR")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path, bindir: Path, port: int, password: str, account):
        self.root, self.bindir, self.port, self.password, self.account = root, bindir, port, password, account
        self.data = root / "data"
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"

    def url_for(self, database: str) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    # ---- making one ---------------------------------------------------------------------------
    @classmethod
    def create(cls, start: bool = True, settings: Optional[dict] = None) -> "Cluster":
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError(unavailable() or "no PostgreSQL")
        account = _account()
        # /tmp, not a pytest folder: those are 0700 root's, which the cluster's account cannot enter.
        root = Path(tempfile.mkdtemp(prefix="heygem-pg-"))
        cluster = cls(root, bindir, free_port(), secrets.token_hex(12), account)
        try:
            if account is not None:
                os.chown(root, account.pw_uid, account.pw_gid)
            pwfile = root / "pw"
            pwfile.write_text(cluster.password + "\n")
            if account is not None:
                os.chown(pwfile, account.pw_uid, account.pw_gid)
            pwfile.chmod(0o600)
            cluster._run(["initdb", "-D", str(cluster.data), "-U", USER, "--pwfile", str(pwfile), "-E", "UTF8",
                          "--locale", "C", "--auth-host", "scram-sha-256", "--auth-local", "trust", "--no-sync"])
            pwfile.unlink()
            conf = {"listen_addresses": "'127.0.0.1'", "port": str(cluster.port), "unix_socket_directories": f"'{root}'",
                    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200",
                    "shared_buffers": "64MB", "log_min_messages": "warning", **(settings or {})}
            with open(cluster.data / "postgresql.conf", "a") as f:
                f.write("".join(f"{k} = {v}\n" for k, v in conf.items()))
            if start:
                cluster.start()
                cluster.sql(f"CREATE DATABASE {DATABASE}", database="postgres")
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _kwargs(self) -> dict:
        env = {"PATH": f"{self.bindir}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}
        if self.account is None:
            return {"env": env, "cwd": str(self.root)}
        return {"env": env, "cwd": str(self.root), "user": self.account.pw_uid, "group": self.account.pw_gid,
                "extra_groups": []}

    def _run(self, argv: list[str]) -> None:
        argv = [str(self.bindir / argv[0]), *argv[1:]]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, **self._kwargs())
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    # ---- the server ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server (this process's child) and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.root / "server.log", "ab")
        try:
            self.proc = subprocess.Popen([str(self.bindir / "postgres"), "-D", str(self.data)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, **self._kwargs())
        finally:
            log.close()
        self.starts += 1
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.url_for("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as err:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"postgres exited ({self.proc.returncode}): {self.log_tail()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not accept connections within {timeout_s:g} s: {err}") from None
                time.sleep(0.05)

    def stop(self, mode: str = "fast", timeout_s: float = 30.0) -> None:
        """Stop the server: "fast" (SIGINT: clients are disconnected, clean shutdown) or
        "immediate" (SIGQUIT: as a crash). Data stays; `start()` brings it back."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sql(self, statement: str, database: str = DATABASE):
        import psycopg

        with psycopg.connect(self.url_for(database), autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else None

    def fresh_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{secrets.token_hex(6)}"
        self.sql(f"CREATE DATABASE {name}", database="postgres")
        return self.url_for(name)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()
