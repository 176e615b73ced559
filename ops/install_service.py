"""`heygem-ops install-service`: write the systemd unit that runs this installation's daemon.

The shipped unit (systemd/heygem-ops.service) is a template: its ExecStart must name the
heygem-ops of the environment the operator really installed, and a --user unit must leave out
what a user manager cannot apply. This command renders it, writes one file, and prints the
systemctl commands to run; it never runs systemctl itself, so the result can be reviewed first
(--dry-run) and packagers can render into any directory (--unit-dir).

With a data folder (`[daemon] data_dir`, or --data-dir), the folder upstream's desktop client
shares with the service (in a home directory, which the shipped unit hides), the system unit is
rendered to run as that folder's owner with only that folder of the home directories visible:
see `share_data_dir`.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import click

from ops.context import PROBLEM, USAGE

UNIT_NAME = "heygem-ops.service"
# A source checkout (editable install) has systemd/; a wheel installs the file under share/.
_SOURCE_TEMPLATE = Path(__file__).resolve().parent.parent / "systemd" / UNIT_NAME
TEMPLATE = _SOURCE_TEMPLATE if _SOURCE_TEMPLATE.exists() else Path(sys.prefix) / "share" / "heygem-ops" / UNIT_NAME
PLACEHOLDER = "@BINDIR@"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")

# What a user manager (systemctl --user) cannot apply, and why. Each is dropped from --user
# units with the comment lines that explain it, so the file does not promise what it cannot do.
USER_DROPS = {
    "a user manager cannot switch identity": ("DynamicUser", "User", "Group", "SupplementaryGroups"),
    "attaching the cgroup device filter needs privileges": ("DevicePolicy", "DeviceAllow"),
    "an IP address filter is a cgroup BPF program, which a user manager cannot attach": ("IPAddressDeny", "IPAddressAllow"),
    "reducing the capability bounding set needs CAP_SETPCAP": ("CapabilityBoundingSet",),
    # Depending on the systemd version these are silently ignored in user units, or they force
    # PrivateUsers= and fail the start where unprivileged user namespaces are disabled; and
    # ProtectHome= would hide a virtual environment that lives in the user's home.
    "they need a mount or UTS namespace, which an unprivileged manager cannot create reliably": (
        "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateMounts", "PrivateUsers",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
        "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset", "ReadWritePaths",
    ),
}
# Characters systemd would interpret in an ExecStart path even inside quotes.
_UNSAFE_PATH = re.compile(r'["\\$\x00-\x1f\x7f]')
# What ProtectHome= hides: a data folder or input root under one of these must be bound back in.
HIDDEN_HOMES = ("/home", "/root", "/run/user")


def unit_path(path: Path) -> str:
    """`path` written for ExecStart=: quoted when it has blanks, '%' escaped from specifier expansion."""
    text = str(path)
    if not path.is_absolute() or _UNSAFE_PATH.search(text):
        raise ValueError(f"cannot be written into a unit file (must be absolute, no quotes, backslashes, '$' or control characters): {text!r}")
    text = text.replace("%", "%%")
    return f'"{text}"' if re.search(r"\s", text) else text


def bind_path(path: Path) -> str:
    """`path` written for BindPaths=/BindReadOnlyPaths=, where ':' would separate source and target."""
    if ":" in str(path):
        raise ValueError(f"cannot be bound into the service (BindPaths= splits at ':'): {str(path)!r}")
    return unit_path(path)


def hidden_by_protect_home(path: Path) -> bool:
    return any(Path(path).is_relative_to(home) for home in HIDDEN_HOMES)


def data_dir_owner(path: Path) -> tuple[str, str]:
    """(user, primary group) owning the data folder, whom the service then runs as.

    Raises ValueError when it does not exist, is not a folder, or belongs to root."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError(f"data folder {path} does not exist; start the desktop client once (it creates it) "
                         "or create it as the user who runs the client") from None
    if not path.is_dir():
        raise ValueError(f"data folder {path} is not a folder")
    if st.st_uid == 0:
        raise ValueError(f"data folder {path} belongs to root, and the service will not run as root; "
                         "chown it to the user who runs the desktop client")
    try:
        account = pwd.getpwuid(st.st_uid)
    except KeyError:
        raise ValueError(f"data folder {path} belongs to uid {st.st_uid}, which has no account") from None
    try:
        group = grp.getgrgid(account.pw_gid).gr_name
    except KeyError:
        group = str(account.pw_gid)
    return account.pw_name, group


_DYNAMIC_USER = re.compile(r"^(?:#.*\n)*DynamicUser=yes\n", re.M)  # with the comments that explain it
_PROTECT_HOME = "ProtectHome=yes\n"


def share_data_dir(text: str, data_dir: Path, owner: tuple[str, str], read_roots: Sequence[Path] = ()) -> str:
    """The system unit, changed so the service can share `data_dir` with the desktop client.

    Runs as the folder's owner instead of a DynamicUser=, and replaces the hidden home
    directories with an empty read-only tmpfs into which only the data folder (read-write) and
    input roots under a home (read-only) are bound back. Everything else stays as shipped.
    """
    user, group = owner
    if not _DYNAMIC_USER.search(text) or _PROTECT_HOME not in text:
        raise ValueError(f"the unit template has no 'DynamicUser=yes' or '{_PROTECT_HOME.strip()}' line to replace")
    identity = (
        f"# Identity: rendered for the data folder {str(data_dir).replace('%', '%%')}\n"
        "# ([daemon] data_dir), shared with upstream's desktop client. The service runs as the folder's\n"
        "# owner, not as a DynamicUser=: the client, as that user, reads and deletes the videos the\n"
        "# service writes there (a transient uid's files, with UMask=0077, would be unreadable to it),\n"
        "# and the service reads what the client writes and writes into a folder the user owns.\n"
        "# No RemoveIPC=yes (DynamicUser= implied it): for a real user it would remove the user's other\n"
        "# shared memory, a desktop session's, at every stop; the daemon sweeps the segments its own\n"
        "# workers leaked when it starts.\n"
        f"User={user}\n"
        f"Group={group}\n"
    )
    binds = [f"BindPaths={bind_path(data_dir)}\n"]
    binds += [f"BindReadOnlyPaths={bind_path(root)}\n" for root in read_roots if hidden_by_protect_home(root)]
    homes = (
        "# Home directories: an empty read-only tmpfs over /home, /root and /run/user, with only the data\n"
        "# folder (read-write) and input roots (read-only) bound back in at their own paths.\n"
        "ProtectHome=tmpfs\n" + "".join(binds)
    )
    return _DYNAMIC_USER.sub(lambda _: identity, text, count=1).replace(_PROTECT_HOME, homes, 1)


def _directive(line: str) -> Optional[str]:
    """The key of a `Key=value` line; None for comments, section headers and blank lines."""
    if "=" not in line or line.startswith(("#", ";", "[")):
        return None
    return line.split("=", 1)[0].strip()


def _drop_directives(text: str, keys: set[str]) -> str:
    """Remove `Key=` lines in `keys`, plus the comment block above them when nothing else is left.

    A block is an optional blank line, a run of comments, and the directives that follow it.
    """
    blocks: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        after_directive = bool(blocks) and _directive(blocks[-1][-1]) is not None
        if not blocks or not line.strip() or (line.startswith("#") and after_directive):
            blocks.append([])
        blocks[-1].append(line)
    out = []
    for block in blocks:
        kept = [line for line in block if _directive(line) not in keys]
        if len(kept) < len(block) and not any(_directive(line) for line in kept):
            continue
        out.extend(kept)
    return "".join(out)


def render(template: str, bindir: Path, user: bool = False, data_dir: Optional[Path] = None,
           owner: Optional[tuple[str, str]] = None, read_roots: Sequence[Path] = ()) -> str:
    """The unit file for `bindir`/heygem-ops; for a user manager without what it cannot apply.

    With `data_dir` (and its `owner`), a system unit shares that folder (`share_data_dir`); a
    user unit needs no change: it runs as the user and a user manager cannot hide homes anyway.
    """
    exec_start = f"ExecStart={PLACEHOLDER}/heygem-ops "
    if exec_start not in template:
        raise ValueError(f"the unit template has no '{exec_start}' line")
    text = template.replace(exec_start, f"ExecStart={unit_path(bindir / 'heygem-ops')} ")
    if not user:
        if data_dir is not None:
            text = share_data_dir(text, data_dir, owner, read_roots)
        return text
    present = {_directive(line) for line in text.splitlines()}
    dropped = {why: [key for key in keys if key in present] for why, keys in USER_DROPS.items()}
    notes = "".join(f"#   {', '.join(keys)}: {why}\n" for why, keys in dropped.items() if keys)
    text = _drop_directives(text, {key for keys in dropped.values() for key in keys})
    text = text.replace("WantedBy=multi-user.target", "WantedBy=default.target")
    return f"# Rendered for a user manager (systemctl --user). Left out of this file:\n{notes}#\n{text}"


def this_bindir() -> Optional[Path]:
    """The bin directory of the heygem-ops that belongs to the running interpreter.

    sys.executable's directory first (a virtual environment's bin, symlinks not resolved, so
    the unit keeps running the venv's interpreter); PATH only when no script is installed there.
    """
    here = Path(sys.executable).parent
    if os.access(here / "heygem-ops", os.X_OK):
        return here
    found = shutil.which("heygem-ops")
    return Path(found).absolute().parent if found else None


def _config_home() -> Path:
    """$XDG_CONFIG_HOME: what a user manager's %E specifier expands to."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def default_unit_dir(user: bool) -> Path:
    return _config_home() / "systemd" / "user" if user else SYSTEM_UNIT_DIR


def config_file(user: bool) -> Path:
    """What the unit's `--config %E/heygem-ops/config.toml` resolves to for this manager."""
    if user:
        return _config_home() / "heygem-ops" / "config.toml"
    from watchdog.config import SYSTEM_CONFIG

    return SYSTEM_CONFIG


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step (mode 0644), so systemd never reads a half-written unit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
    try:
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, path)
    except BaseException:
        os.unlink(tmp.name)
        raise


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _shared_folders(config: Path, data_dir: Optional[Path]) -> tuple[Optional[Path], list[Path]]:
    """(data folder, input roots) the unit must make reachable: --data-dir, else the config's."""
    from watchdog.config import ConfigError, load

    daemon = None
    if config.exists():
        try:
            daemon = load(config).daemon
        except ConfigError as err:
            click.echo(f"error: {err}", err=True)
            raise click.exceptions.Exit(USAGE) from None
    if data_dir is not None:
        data_dir = data_dir.absolute()
        if daemon is not None and daemon.data_dir not in (None, data_dir):
            _warn(f"--data-dir {data_dir} differs from [daemon] data_dir = {daemon.data_dir} in {config}, which the daemon uses")
    elif daemon is not None:
        data_dir = daemon.data_dir
    return data_dir, list(daemon.input_roots) if daemon is not None else []


def _next_steps(target: Path, user: bool) -> list[str]:
    systemctl = "systemctl --user" if user else "systemctl"
    unit = "heygem-ops" if target.parent == default_unit_dir(user) else str(target)
    steps = [f"{systemctl} daemon-reload", f"{systemctl} enable --now {unit}"]
    if user:
        steps.append(f"loginctl enable-linger {os.environ.get('USER', '$USER')}   # keep it running after you log out")
    return steps


@click.command("install-service")
@click.option("--user", "user", is_flag=True, help="A unit for your own user manager (systemctl --user) instead of the system one.")
@click.option("--prefix", type=click.Path(path_type=Path, file_okay=False), help="Installation prefix whose bin/heygem-ops the unit runs (default: the one running this command).")
@click.option("--unit-dir", type=click.Path(path_type=Path, file_okay=False), help="Write here instead of /etc/systemd/system (or ~/.config/systemd/user with --user).")
@click.option("--dry-run", is_flag=True, help="Print the rendered unit on stdout; write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing unit file that differs.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False),
              help="The folder shared with upstream's desktop client (default: [daemon] data_dir of the config the unit runs with).")
def install_service(user: bool, prefix: Optional[Path], unit_dir: Optional[Path], dry_run: bool, force: bool,
                    data_dir: Optional[Path]) -> None:
    """Write the systemd unit that runs `heygem-ops daemon` from this installation.

    Prints the systemctl commands to run next; never runs systemctl itself. Exit codes: 0 written
    (or already identical), 1 refused because a different unit file is there (use --force) or the
    write failed, 2 usage error (no heygem-ops executable found, unusable path).

    \b
    Examples:
      sudo heygem-ops install-service              /etc/systemd/system/heygem-ops.service
      heygem-ops install-service --user            ~/.config/systemd/user/heygem-ops.service
      heygem-ops install-service --dry-run | less  review the unit first, write nothing
      sudo heygem-ops install-service --data-dir /home/alice/heygem_data/face2face/temp
                                                   run as alice, sharing the desktop client's folder
    """
    bindir = (prefix.absolute() / "bin") if prefix else this_bindir()
    if bindir is None:
        click.echo(f"error: no heygem-ops executable next to {sys.executable} or on PATH; pass --prefix", err=True)
        raise click.exceptions.Exit(USAGE)
    config = config_file(user)
    data_dir, read_roots = _shared_folders(config, data_dir)
    owner = None
    try:
        if data_dir is not None and not user:
            owner = data_dir_owner(data_dir)
        text = render(TEMPLATE.read_text(encoding="utf-8"), bindir, user, data_dir, owner, read_roots)
    except OSError as err:
        click.echo(f"error: cannot read the unit template {TEMPLATE}: {err.strerror}", err=True)
        raise click.exceptions.Exit(USAGE) from None
    except ValueError as err:
        click.echo(f"error: {err}", err=True)
        raise click.exceptions.Exit(USAGE) from None

    executable = bindir / "heygem-ops"
    if not os.access(executable, os.X_OK):
        _warn(f"{executable} is not an executable file (yet); the service cannot start until it is")
    if not user and hidden_by_protect_home(executable):
        _warn(f"{executable} is under a home directory, which the system unit hides (ProtectHome=) "
              "from the service: install into e.g. /opt/heygem-ops, or use --user")
    if not user and data_dir is None:
        for root in read_roots:
            if hidden_by_protect_home(root):
                _warn(f"input root {root} is under a home directory, which the system unit hides (ProtectHome=yes)")
    if not config.exists():
        _warn(f"{config} does not exist and the daemon exits 2 without it; create it (an empty file means built-in defaults)")

    if dry_run:
        click.echo(text, nl=False)
        return

    target = (unit_dir or default_unit_dir(user)) / UNIT_NAME
    try:
        current = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = None
    except OSError as err:
        click.echo(f"error: cannot read {target}: {err.strerror}", err=True)
        raise click.exceptions.Exit(PROBLEM) from None
    if current == text:
        click.echo(f"{target} is already up to date")
    elif current is not None and not force:
        click.echo(f"error: {target} exists with different content; review it (--dry-run shows the new one), then use --force", err=True)
        raise click.exceptions.Exit(PROBLEM)
    else:
        try:
            write_atomically(target, text)
        except OSError as err:
            hint = " (run with sudo, or use --user)" if isinstance(err, PermissionError) and not user else ""
            click.echo(f"error: cannot write {target}: {err.strerror}{hint}", err=True)
            raise click.exceptions.Exit(PROBLEM) from None
        click.echo(f"wrote {target}")
    click.echo("next:")
    for step in _next_steps(target, user):
        click.echo(f"  {step}")
