"""What every command shares: the config (loaded on first use), output helpers, exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click

OK, PROBLEM, USAGE = 0, 1, 2


class Env:
    """Per-invocation state carried in click's context object."""

    def __init__(self, config_path: Optional[Path], log_json: Optional[bool] = None, log_level: str = "warning"):
        self.config_path = config_path
        self.log_json = log_json
        self.log_level = log_level
        self._config = None
        self._logging = False

    def logger(self, name: str):
        """A structlog logger on stderr; logging is set up on first use to keep cold start small."""
        from heygem import logs

        if not self._logging:
            logs.configure(json=self.log_json, level=self.log_level, stream=sys.stderr)
            self._logging = True
        return logs.get(name)

    @property
    def config(self):
        """The validated config; a bad one ends the command with its message and exit 2."""
        if self._config is None:
            from watchdog.config import ConfigError, load

            try:
                self._config = load(self.config_path)
            except ConfigError as err:
                click.echo(f"error: {err}", err=True)
                raise click.exceptions.Exit(USAGE) from None
        return self._config


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout (the machine-readable face of every read command)."""
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def console():
    """A rich console on stdout; imported lazily to keep cold start small."""
    from rich.console import Console

    return Console(highlight=False)


def age(seconds: float | None) -> str:
    """Two largest units, e.g. 3d 4h, 5m 12s: enough to tell "just started" from "up for weeks"."""
    if seconds is None:
        return "?"
    s = int(seconds)
    parts = [(s // 86400, "d"), (s // 3600 % 24, "h"), (s // 60 % 60, "m"), (s % 60, "s")]
    while len(parts) > 2 and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{n}{unit}" for n, unit in parts[:2])
