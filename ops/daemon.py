"""`heygem-ops daemon`: the watchdog in the foreground (systemd's ExecStart)."""

from __future__ import annotations

import sys

import click


@click.command()
@click.pass_obj
def daemon(env) -> None:
    """Run the watchdog daemon in the foreground: start the pipeline replicas (or the external
    command), sample GPUs, processes and queues every tick, heal and alert. JSON log lines go
    to stdout; SIGTERM drains and stops, SIGHUP reloads the config.

    \b
    Examples:
      heygem-ops daemon                                  built-in defaults
      heygem-ops --config /etc/heygem-ops/config.toml daemon
    """
    from heygem import logs
    from watchdog.daemon import Daemon

    config = env.config
    logs.configure(json=True if env.log_json is None else env.log_json,
                   level="info" if env.log_level == "warning" else env.log_level, stream=sys.stdout)
    raise SystemExit(Daemon(config, env.config_path).run())
