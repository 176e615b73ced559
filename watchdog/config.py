"""The configuration file: one TOML document, validated at load.

Lookup order: an explicit path, else /etc/heygem-ops/config.toml when it exists, else the
built-in defaults. Every error names the file and the key (``[daemon] interval_s``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, ValidationError, field_validator

from heygem.config import PipelineConfig, Section

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SYSTEM_CONFIG = Path("/etc/heygem-ops/config.toml")


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
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8383, ge=0, le=65535)
    state_dir: Optional[Path] = Field(default=None, strict=False)
    data_dir: Optional[Path] = Field(default=None, strict=False, description=(
        "the folder shared with upstream's clients (the desktop client's ~/heygem_data/face2face/temp): "
        "relative audio_url/video_url resolve here and submitted jobs write <code>-r.mp4 here"))
    input_roots: list[Annotated[Path, Field(strict=False)]] = Field(
        default_factory=list, description="more folders that /easy/submit may read inputs from")
    stop_grace_s: float = Field(default=20.0, ge=0)

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


class Config(Section):
    pipeline: PipelineConfig = PipelineConfig()
    daemon: DaemonConfig = DaemonConfig()
    rules: RulesConfig = RulesConfig()
    actions: ActionsConfig = ActionsConfig()

    def state_dir(self) -> Path:
        """The state directory, created 0700: config, else $STATE_DIRECTORY, else XDG state."""
        if self.daemon.state_dir is not None:
            path = self.daemon.state_dir
        elif os.environ.get("STATE_DIRECTORY"):
            path = Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        else:
            base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
            path = Path(base) / "heygem-ops"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path


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
            if not isinstance(e.get("input"), dict):
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
