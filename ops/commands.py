"""The `heygem-ops` click group: global options and a lazily loaded command table."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

import click

from ops.context import Env

# name -> "module:attribute"; a command's module is imported only when that command runs.
COMMANDS = {
    "cancel": "ops.jobs:cancel",
    "clean": "ops.clean:clean",
    "daemon": "ops.daemon:daemon",
    "demo": "ops.demo:demo",
    "doctor": "ops.doctor:doctor",
    "gpu": "ops.gpu:gpu",
    "install-service": "ops.install_service:install_service",
    "jobs": "ops.jobs:jobs",
    "logs": "ops.logs:logs",
    "monitor": "ops.monitor:monitor",
    "restart": "ops.lifecycle:restart",
    "start": "ops.lifecycle:start",
    "status": "ops.lifecycle:status",
    "stop": "ops.lifecycle:stop",
    "submit": "ops.jobs:submit",
    "zombies": "ops.zombies:zombies",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        """A configuration error found after load (the state directory, a token file, an address
        the daemon cannot resolve) ends any command as a bad config does: its message, exit 2."""
        try:
            return super().invoke(ctx)
        except Exception as err:
            config = sys.modules.get("watchdog.config")  # not imported: it cannot be a ConfigError
            if config is not None and isinstance(err, config.ConfigError):
                click.echo(f"error: {err}", err=True)
                raise click.exceptions.Exit(2) from None
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="HEYGEM_OPS_CONFIG",
    help="TOML config file (default: /etc/heygem-ops/config.toml if present, else built-in defaults).",
)
@click.option("--log-json/--log-console", "log_json", default=None, help="Log format (default: JSON unless stderr is a terminal).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning", show_default=True)
@click.version_option(package_name="heygem-ops")
@click.pass_context
def cli(ctx: click.Context, config_path: Optional[Path], log_json: Optional[bool], log_level: str) -> None:
    """Operate a HeyGem lip-sync video service: diagnose, watch, heal.

    \b
    Examples:
      heygem-ops demo              the whole pipeline offline, on embedded defaults
      heygem-ops doctor            is inference really on the GPUs?
      heygem-ops gpu --watch 1     live per-GPU table
      heygem-ops zombies --json    defunct processes, grouped by parent
    """
    ctx.obj = Env(config_path, log_json, log_level)
