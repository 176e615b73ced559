"""The configuration file: one TOML document, validated at load.

Lookup order: an explicit path, else /etc/heygem-ops/config.toml when it exists, else the
built-in defaults. Every error names the file and the key (``[daemon] interval_s``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from heygem.config import PipelineConfig, Section

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SYSTEM_CONFIG = Path("/etc/heygem-ops/config.toml")
OPENABLE_PATHS = ("/metrics", "/healthz", "/readyz")  # what `open_paths` may leave without a token
_TOKEN = re.compile(r"[\x21-\x7e]{16,}")  # printable ASCII, no blanks: it travels in a header


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves only this machine: localhost or a loopback address. Any
    other name counts as beyond loopback (it may resolve to anything), as do "" and 0.0.0.0/::."""
    name = host.strip().removeprefix("[").removesuffix("]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _check_token(token: str, where: str) -> str:
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{where} must be at least 16 printable ASCII characters without blanks "
                         f"({len(token)} characters given); e.g. `openssl rand -hex 32`")
    return token


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file and the key."""


class LogPattern(Section):
    """External mode: a log line matching `regex` raises `alert`."""

    regex: str
    alert: str = "log_pattern"
    severity: Literal["info", "warning", "critical"] = "warning"

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        return value


class DaemonConfig(Section):
    mode: Literal["embedded", "external"] = "embedded"
    command: list[str] = Field(default_factory=list, description="external mode: the service to supervise")
    log_file: Optional[Path] = Field(default=None, strict=False)
    log_patterns: list[LogPattern] = Field(default_factory=list, description="add to the built-in signatures")
    log_builtin_patterns: bool = Field(default=True, description=(
        "external mode: upstream's failure lines (queue full, queue.Empty, CPU fallback, GPU out of memory, "
        "failed task, slow warm-up) raise alerts"))
    log_quiet_s: float = Field(default=60.0, gt=0, description="a log-derived alert resolves after this long without a matching line")
    interval_s: float = Field(default=2.0, gt=0, le=3600)
    # Declared before http_host, whose validator reads them.
    api_token: Optional[str] = Field(default=None, repr=False, description=(
        "clients must send `Authorization: Bearer <token>`; required when http_host is beyond loopback"))
    api_token_file: Optional[Path] = Field(default=None, strict=False, description=(
        "a file holding the token, read at start; must not be readable by group or others"))
    open_paths: list[Literal["/metrics", "/healthz", "/readyz"]] = Field(
        default_factory=list, description="with a token: routes served without one (e.g. for a Prometheus scraper)")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8383, ge=0, le=65535)
    state_dir: Optional[Path] = Field(default=None, strict=False)
    data_dir: Optional[Path] = Field(default=None, strict=False, description=(
        "the folder shared with upstream's clients (the desktop client's ~/heygem_data/face2face/temp): "
        "relative audio_url/video_url resolve here and submitted jobs write <code>-r.mp4 here"))
    input_roots: list[Annotated[Path, Field(strict=False)]] = Field(
        default_factory=list, description="more folders that /easy/submit may read inputs from")
    stop_grace_s: float = Field(default=20.0, ge=0)
    host_name: Optional[str] = Field(default=None, description=(
        "this host's name in the fleet (worker names, the job store, logs, metrics); default: the system host name"))
    request_timeout_s: float = Field(default=10.0, gt=0, le=600, description=(
        "the whole request (headers and body) must arrive within this, however slowly it trickles"))
    max_connections: int = Field(default=32, ge=1, le=4096, description=(
        "HTTP requests handled at once (one thread each); beyond it: 503 and the connection closed"))
    max_queued: int = Field(default=1000, ge=1, description=(
        "/easy/submit answers 10001 busy while this many jobs are queued"))

    @field_validator("api_token")
    @classmethod
    def _token(cls, value: Optional[str]) -> Optional[str]:
        return value if value is None else _check_token(value, "the token")

    @field_validator("api_token_file")
    @classmethod
    def _token_file(cls, value: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if value is not None and info.data.get("api_token") is not None:
            raise ValueError("give api_token or api_token_file, not both")
        if value is not None and not value.is_absolute():
            raise ValueError(f"{str(value)!r} is not an absolute path")
        return value

    @field_validator("http_host")
    @classmethod
    def _beyond_loopback_needs_a_token(cls, value: str, info: ValidationInfo) -> str:
        if not is_loopback(value) and info.data.get("api_token") is None and info.data.get("api_token_file") is None:
            raise ValueError(
                "an address beyond loopback needs an API token (none valid is set): set [daemon] api_token (or "
                "api_token_file) so every request must carry `Authorization: Bearer <token>`, or bind 127.0.0.1")
        return value

    def token(self) -> Optional[str]:
        """The API token: api_token, else api_token_file read now (must be a regular file that
        neither group nor others may read or write), else None. Raises ConfigError."""
        if self.api_token is not None or self.api_token_file is None:
            return self.api_token
        path = self.api_token_file
        key = "[daemon] api_token_file"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as err:
            raise ConfigError(f"{key}: cannot open {path}: {err.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{key}: {path} is not a regular file")
            if st.st_mode & 0o077:
                raise ConfigError(f"{key}: {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may read it; "
                                  f"chmod 600 {path} (or pass it with systemd's LoadCredential=)")
            raw = os.read(fd, 4097)
        finally:
            os.close(fd)
        try:
            return _check_token(raw.decode("ascii").strip(), f"the token in {path}")
        except (UnicodeDecodeError, ValueError) as err:
            reason = "not ASCII text" if isinstance(err, UnicodeDecodeError) else str(err)
            raise ConfigError(f"{key}: {reason}") from None
    # external mode: the daemon in front of upstream's API (watchdog.front)
    upstream_url: Optional[str] = Field(default=None, description=(
        "external mode: upstream's API moved off the clients' port (e.g. http://127.0.0.1:8384); the daemon then "
        "serves /easy/submit and /easy/query itself, stores every task and forwards it"))
    upstream_concurrency: int = Field(default=1, ge=1, le=64, description="tasks outstanding at upstream at once")
    upstream_timeout_s: float = Field(default=2.0, gt=0, le=60, description="bound of each call to upstream's API")
    upstream_poll_s: float = Field(default=1.0, gt=0, le=60, description="how often upstream's tasks are followed")
    upstream_stall_margin: float = Field(default=3.0, ge=1, le=100, description=(
        "a task is stalled when its progress has not moved for this many times the time this host needs for it"))
    upstream_stall_floor_s: float = Field(default=300.0, gt=0, description=(
        "the least a task may go without progress (a cold start, before this host has measured anything)"))

    @field_validator("upstream_url")
    @classmethod
    def _upstream_url(cls, value, info):
        if value is None:
            return value
        from urllib.parse import urlsplit

        url = urlsplit(value)
        if url.scheme != "http" or not url.hostname or url.path not in ("", "/") or url.query:
            raise ValueError(f"{value!r} is not http://HOST:PORT (upstream's API, e.g. http://127.0.0.1:8384)")
        try:
            url.port
        except ValueError as err:
            raise ValueError(f"{value!r}: {err}") from None
        if info.data.get("mode") != "external":
            raise ValueError('needs mode = "external" (the daemon fronts the command it supervises)')
        if (url.port or 80) == info.data.get("http_port") and url.hostname in ("127.0.0.1", "localhost", "::1",
                                                                               info.data.get("http_host")):
            raise ValueError(f"{value!r} is the daemon's own http_port: move upstream to another port (e.g. 8384)")
        return value

    @field_validator("data_dir", "input_roots")
    @classmethod
    def _absolute(cls, value):
        for path in value if isinstance(value, list) else [value]:
            if path is not None and not path.is_absolute():
                raise ValueError(f"{str(path)!r} is not an absolute path (no '~': the service may run as another user)")
        return value


class RulesConfig(Section):
    gpu_idle_util_pct: float = Field(default=5.0, ge=0, le=100)
    gpu_busy_mem_mib: float = Field(default=1024.0, ge=0)
    gpu_idle_for_s: float = Field(default=30.0, ge=0)
    zombies_max: int = Field(default=0, ge=0)
    zombies_for_s: float = Field(default=10.0, ge=0)
    heartbeat_timeout_s: float = Field(default=20.0, gt=0)
    start_timeout_s: float = Field(
        default=120.0, gt=0,
        description="a starting worker (loading models, opening sessions: no heartbeat meanwhile) is hung only after "
        "this long; many replicas starting at once on a busy host take far longer than one heartbeat",
    )
    queue_full_for_s: float = Field(default=60.0, ge=0)
    disk_min_free_mib: float = Field(default=1024.0, ge=0)
    repeat_s: float = Field(default=300.0, gt=0, description="re-announce a firing alert this often")


class ActionsConfig(Section):
    reap: bool = True
    restart_workers: bool = True
    restart_parent: bool = Field(default=True, description="external mode: restart a parent whose zombies persist")
    zombie_parent_grace_s: float = Field(default=30.0, ge=0)
    zombie_restart_at: Optional[int] = Field(
        default=None, ge=1,
        description="restart a zombie-keeping parent (after its SIGCHLD grace) once it keeps this many zombies; "
        "default: a quarter of the free pids. A parent whose service is also unhealthy is restarted at any count",
    )
    term_grace_s: float = Field(default=10.0, ge=0)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    crash_loop_restarts: int = Field(default=5, ge=1)
    crash_loop_window_s: float = Field(default=300.0, gt=0)


class StoreConfig(Section):
    """Where the job store lives: unset, SQLite in the state directory (one host); a
    postgresql:// URL, one queue shared by a fleet of hosts (heygem.jobs_pg)."""

    url: Optional[str] = Field(default=None, repr=False, description=(
        "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (a password may also come from ~/.pgpass or $PGPASSFILE)"))
    connect_timeout_s: float = Field(default=5.0, gt=0, le=300, description=(
        "how long a call waits for a connection before the store counts as unreachable"))
    pool_size: int = Field(default=4, ge=1, le=100, description="connections each process keeps at most")

    @field_validator("url")
    @classmethod
    def _url(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return value
        from heygem.jobs_pg import check_url

        return check_url(value)


class Config(Section):
    pipeline: PipelineConfig = PipelineConfig()
    daemon: DaemonConfig = DaemonConfig()
    rules: RulesConfig = RulesConfig()
    actions: ActionsConfig = ActionsConfig()
    store: StoreConfig = StoreConfig()

    def state_dir(self) -> Path:
        """The state directory, created 0700: config, else $STATE_DIRECTORY, else XDG state.

        Checked on every use, since everything in it is trusted (the pidfile names the process
        `stop` signals; the job store says what is read and written): it must be a directory
        owned by this user (or root) that neither group nor others may write. Else ConfigError."""
        if self.daemon.state_dir is not None:
            path, key = self.daemon.state_dir, "[daemon] state_dir"
        elif os.environ.get("STATE_DIRECTORY"):
            path, key = Path(os.environ["STATE_DIRECTORY"].split(":")[0]), "$STATE_DIRECTORY"
        else:
            base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
            path, key = Path(base) / "heygem-ops", "state directory"
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = path.stat()
        except FileExistsError:
            raise ConfigError(f"{key}: {path} exists and is not a directory") from None
        except OSError as err:
            raise ConfigError(f"{key}: cannot create {path}: {err.strerror or err}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{key}: {path} is not a directory")
        me = os.geteuid()
        if st.st_uid not in (me, 0):
            raise ConfigError(f"{key}: {path} is owned by {_user(st.st_uid)}, not by {_user(me)} who runs this: "
                              f"its pidfile and job store are not to be trusted; run as {_user(st.st_uid)}, "
                              f"or chown {_user(me)} {path}")
        if st.st_mode & 0o022:
            raise ConfigError(f"{key}: {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may write "
                              f"in it (plant a pidfile, replace the job store); chmod 700 {path}")
        return path


def _user(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


_SECRETS = ("[daemon] api_token", "[store] url")  # never echoed in an error message


def _key(loc: tuple) -> str:
    """('daemon', 'interval_s') -> '[daemon] interval_s'. Drops pydantic's union-branch tags."""
    parts = [str(p) for p in loc if not re.search(r"[\[(]", str(p))]
    if len(parts) <= 1:
        return "".join(parts) or "(top level)"
    return f"[{parts[0]}] {'.'.join(parts[1:])}"


def parse(data: dict, source: str = "<built-in>") -> Config:
    """Validate a decoded TOML document; raise ConfigError naming `source` and every bad key."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        problems: dict[str, list[str]] = {}
        got: dict[str, str] = {}
        for e in err.errors():
            key = _key(e["loc"])
            if e["type"] == "extra_forbidden":
                problems.setdefault(key, []).append("unknown key")
                continue
            problems.setdefault(key, []).append(e["msg"].removeprefix("Value error, "))
            if not isinstance(e.get("input"), dict) and key not in _SECRETS:
                got[key] = f" (got {e['input']!r})"
        lines = [f"{source}: {key}: {' or '.join(dict.fromkeys(msgs))}{got.get(key, '')}" for key, msgs in problems.items()]
        raise ConfigError("\n".join(lines)) from None


def load(path: Optional[Path] = None) -> Config:
    """Load `path`, else the system file if present, else built-in defaults."""
    if path is None:
        if not SYSTEM_CONFIG.exists():
            return Config()
        path = SYSTEM_CONFIG
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse(data, str(path))
