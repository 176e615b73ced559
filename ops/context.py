"""What every command shares: the config (loaded on first use), output helpers, exit codes.

Standard library only at import time, and little of it: `heygem-ops zombies` uses these helpers on
its click-free cold-start path (ops/cli.py), where `typing`, `pathlib` and `json` show up in the
timing.
"""

from __future__ import annotations

import os
import sys

OK, PROBLEM, USAGE = 0, 1, 2


class Env:
    """Per-invocation state carried in click's context object."""

    def __init__(self, config_path: os.PathLike | None, log_json: bool | None = None, log_level: str = "warning"):
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
            import click

            from watchdog.config import ConfigError, load

            try:
                self._config = load(self.config_path)
            except ConfigError as err:
                click.echo(f"error: {err}", err=True)
                raise click.exceptions.Exit(USAGE) from None
        return self._config


def emit_json(obj: object) -> None:
    """Print one JSON document on stdout (the machine-readable face of every read command)."""
    sys.stdout.write(to_json(obj) + "\n")


# json.dumps(ensure_ascii=False) escapes exactly these: quote, backslash, control characters.
_ESCAPES = {c: f"\\u{c:04x}" for c in range(0x20)} | {
    0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"}
_CONSTANTS = {None: "null", True: "true", False: "false"}


def to_json(obj: object, indent: str = "") -> str:
    """The text `json.dumps(obj, indent=2, ensure_ascii=False, default=str)` writes, to the byte.

    Written out because importing `json` costs a cold start ~17 ms (it compiles its regular
    expressions at import): more than the whole `ps aux | grep defunct | wc -l` that `heygem-ops
    zombies` must beat. tests/test_context.py holds it to json.dumps.
    """
    if isinstance(obj, str):
        return '"' + obj.translate(_ESCAPES) + '"'
    if obj is None or isinstance(obj, bool):
        return _CONSTANTS[obj]
    if isinstance(obj, int):
        return int.__repr__(obj)
    if isinstance(obj, float):
        return _float(obj)
    inner = indent + "  "
    if isinstance(obj, dict):
        items = [f"{inner}{to_json(_key(k))}: {to_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}" if items else "{}"
    if isinstance(obj, (list, tuple)):
        items = [inner + to_json(v, inner) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]" if items else "[]"
    return to_json(str(obj), indent)


def _float(x: float) -> str:
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "Infinity" if x > 0 else "-Infinity"
    return float.__repr__(x)


def _key(k: object) -> str:
    """Keys as json coerces them (a number, bool or None becomes its JSON text); anything else is
    the TypeError json raises."""
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, (bool, int, float)):
        return to_json(k)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(k).__name__}")


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
