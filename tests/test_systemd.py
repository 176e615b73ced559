"""The systemd unit and `heygem-ops install-service`, checked by systemd-analyze itself.

`verify` loads the rendered unit the way systemd would (an ExecStart that must exist, known
directives, valid specifiers); `security --offline=yes` scores its sandbox.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ops.install_service import TEMPLATE, data_dir_owner, render
from watchdog.config import Config

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
# The venv's bin directory, where pip installed this checkout's heygem-ops.
BINDIR = Path(sys.executable).parent
MAX_EXPOSURE = 1.6  # issue 13: stays at or below what the unit scored before the IP allow-list


def directives(text: str) -> dict[str, list[str]]:
    """Key -> values of every `Key=value` line (comments and section headers skipped)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def write_unit(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "heygem-ops.service"
    path.write_text(text)
    return path


def verify(unit: Path, tmp_path: Path, user: bool = False) -> None:
    """Fail with systemd-analyze's words if it finds anything wrong with `unit`.

    Lines about other units (a host's own broken units show up in `verify`) are not ours to fix.
    """
    args = [ANALYZE, "verify", "--man=no"]
    env = dict(os.environ)
    if user:
        # A user manager needs a runtime directory; the test's own keeps the host's out of it.
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        args.append("--user")
        env["XDG_RUNTIME_DIR"] = str(runtime)
    proc = subprocess.run([*args, str(unit)], capture_output=True, text=True, timeout=60, env=env)
    if "Failed to initialize manager" in proc.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {proc.stderr.strip()}")
    ours = [line for line in proc.stderr.splitlines() if unit.name in line]
    assert not ours, proc.stderr
    assert proc.returncode == 0 or proc.stderr.strip(), "verify failed without saying why"


def exposure(unit: Path) -> tuple[float, str]:
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1)), proc.stdout


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", value)
    assert match, f"not a plain systemd time span: {value!r}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_rendered_unit_runs_this_installation_and_outlasts_the_drain():
    template = TEMPLATE.read_text()
    text = render(template, BINDIR)
    found = directives(text)
    assert found["ExecStart"] == [f"{BINDIR}/heygem-ops daemon --config %E/heygem-ops/config.toml"]
    assert "@BINDIR@" not in "".join(v for values in found.values() for v in values)
    assert found["Type"] == ["notify"] and found["NotifyAccess"] == ["main"]
    assert found["KillMode"] == ["mixed"] and found["DevicePolicy"] == ["closed"]
    # DeviceAllow= takes exact node paths or /proc/devices groups (globs only work in the latter).
    for spec in (value.split()[0] for value in found["DeviceAllow"]):
        assert spec.startswith(("char-", "block-")) or "*" not in spec, spec
    # SIGKILL must not cut the drain short: the daemon drains, then gives workers their TERM grace.
    defaults = Config()
    assert seconds(found["TimeoutStopSec"][0]) > defaults.daemon.stop_grace_s + defaults.actions.term_grace_s
    assert seconds(found["WatchdogSec"][0]) >= 2 * defaults.daemon.interval_s
    # Only the placeholder changes: the system unit is the shipped file, comments and all.
    assert text == template.replace("@BINDIR@/heygem-ops ", f"{BINDIR}/heygem-ops ")


@needs_analyze
def test_system_unit_passes_verify(tmp_path):
    verify(write_unit(tmp_path, render(TEMPLATE.read_text(), BINDIR)), tmp_path)


@needs_analyze
def test_verify_catches_a_unit_that_cannot_start(tmp_path):
    """The check above can fail: a unit whose ExecStart does not exist is reported."""
    unit = write_unit(tmp_path, render(TEMPLATE.read_text(), tmp_path / "no-such-venv" / "bin"))
    with pytest.raises(AssertionError, match="heygem-ops.service"):
        verify(unit, tmp_path)


@needs_analyze
def test_system_unit_exposure_is_at_most_2(tmp_path):
    score, report = exposure(write_unit(tmp_path, render(TEMPLATE.read_text(), BINDIR)))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE, report


def test_units_allow_only_loopback_and_say_how_to_open_it():
    """The API beyond loopback needs a token (the config) AND the network opened (a drop-in)."""
    for text in (render(TEMPLATE.read_text(), BINDIR), data_dir_unit()):
        found = directives(text)
        assert found["IPAddressDeny"] == ["any"] and found["IPAddressAllow"] == ["localhost"]
        assert "systemctl edit heygem-ops" in text and "#   IPAddressAllow=" in text and "api_token" in text


@needs_analyze
def test_user_unit_leaves_out_what_a_user_manager_cannot_apply(tmp_path):
    text = render(TEMPLATE.read_text(), BINDIR, user=True)
    found = directives(text)
    header = text.split("\n#\n", 1)[0]
    for key in ("DynamicUser", "SupplementaryGroups", "DeviceAllow", "DevicePolicy", "CapabilityBoundingSet", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert key not in found, key
        assert re.search(rf"^#.*\b{key}\b", header, re.M), f"{key} left out without saying so"
    # Seccomp-based hardening works unprivileged (NoNewPrivileges=yes), so it stays.
    for key in ("NoNewPrivileges", "MemoryDenyWriteExecute", "SystemCallFilter", "RestrictAddressFamilies", "StateDirectory"):
        assert key in found, key
    assert found["WantedBy"] == ["default.target"]
    # The comments that explained dropped directives went with them.
    assert "NVreg_DeviceFileMode" not in text and "PrivateDevices=yes is not usable" not in text
    verify(write_unit(tmp_path, text), tmp_path, user=True)


@needs_analyze
def test_exec_path_with_blanks_and_percent_is_quoted(tmp_path):
    bindir = tmp_path / "gpu venv 100%" / "bin"
    bindir.mkdir(parents=True)
    script = bindir / "heygem-ops"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    text = render(TEMPLATE.read_text(), bindir)
    assert directives(text)["ExecStart"][0].startswith(f'"{str(bindir).replace("%", "%%")}/heygem-ops" daemon')
    verify(write_unit(tmp_path, text), tmp_path)


def test_help_shows_an_example(cli):
    proc = cli("install-service", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Examples:" in proc.stdout and "heygem-ops install-service --user" in proc.stdout


@needs_analyze
def test_dry_run_prints_a_unit_that_verifies_and_writes_nothing(cli, tmp_path):
    proc = cli("install-service", "--dry-run", "--unit-dir", str(tmp_path / "units"))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "units").exists()
    unit = write_unit(tmp_path, proc.stdout)
    assert directives(proc.stdout)["ExecStart"][0].startswith(f"{BINDIR}/heygem-ops daemon")
    verify(unit, tmp_path)


def test_install_writes_then_refuses_a_different_file_without_force(cli, tmp_path):
    units = tmp_path / "units"
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    dry = cli("install-service", "--dry-run", env=env).stdout
    target = units / "heygem-ops.service"

    first = cli("install-service", "--unit-dir", str(units), env=env)
    assert first.returncode == 0, first.stderr
    assert target.read_text() == dry
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    # A directory systemd does not search: enable it by path.
    assert f"systemctl enable --now {target}" in first.stdout and "systemctl daemon-reload" in first.stdout

    again = cli("install-service", "--unit-dir", str(units), env=env)
    assert again.returncode == 0 and "already up to date" in again.stdout

    edited = dry.replace("TasksMax=4096", "TasksMax=64")
    target.write_text(edited)
    refused = cli("install-service", "--unit-dir", str(units), env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "--force" in refused.stderr
    assert target.read_text() == edited

    forced = cli("install-service", "--unit-dir", str(units), "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert target.read_text() == dry
    assert [p.name for p in units.iterdir()] == ["heygem-ops.service"]


def test_user_install_goes_to_the_user_unit_dir(cli, tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = cli("install-service", "--user", env=env)
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "config" / "systemd" / "user" / "heygem-ops.service"
    assert "DynamicUser" not in directives(target.read_text())
    assert "systemctl --user enable --now heygem-ops" in proc.stdout
    assert f"{tmp_path}/config/heygem-ops/config.toml does not exist" in proc.stderr


def test_unusable_prefix_is_a_usage_error(cli, tmp_path):
    proc = cli("install-service", "--dry-run", "--prefix", str(tmp_path / "$HOME"))
    assert proc.returncode == 2
    assert "cannot be written into a unit file" in proc.stderr and proc.stdout == ""


def test_worker_stack_runs_without_write_execute_memory():
    """The unit sets MemoryDenyWriteExecute=yes; the pipeline's libraries must live with it.

    The kernel's own MDWE (prctl PR_SET_MDWE, Linux 6.3+; systemd uses it where available)
    refuses the same mappings. Under it: ONNX Runtime builds and runs a session (asking for
    CUDA, as workers do), OpenCV encodes, ctypes makes a callback, NVML bindings import.
    """
    assert directives(TEMPLATE.read_text())["MemoryDenyWriteExecute"] == ["yes"]
    code = textwrap.dedent(
        """
        import ctypes, mmap, sys
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            print("no-mdwe", ctypes.get_errno()); sys.exit(3)
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            sys.exit("W+X mapping was allowed: MDWE is not in force")
        except OSError:
            pass
        import numpy as np, cv2, onnxruntime as ort, psutil, pynvml
        from onnx_models import conv_model
        session = ort.InferenceSession(conv_model(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        out = session.run(None, {"input": np.ones((1, 3, 64, 64), np.float32)})[0]
        assert out.shape == (1, 3, 64, 64)
        assert cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[0]
        assert ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda v: v + 1)(1) == 2
        print("ok", session.get_providers())
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode == 3:
        pytest.skip(f"kernel without PR_SET_MDWE: {proc.stdout.strip()}")
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr


# ---- a data folder shared with upstream's desktop client -----------------------------------------
CLIENT_DATA = Path("/home/alice/heygem_data/face2face/temp")  # the client's folder; rendering reads no disk


def data_dir_unit(**kw) -> str:
    return render(TEMPLATE.read_text(), BINDIR, data_dir=CLIENT_DATA, owner=("alice", "alice"), **kw)


def test_data_dir_unit_runs_as_the_folders_owner_and_shows_only_that_folder_of_the_homes():
    plain, shared = directives(render(TEMPLATE.read_text(), BINDIR)), directives(
        data_dir_unit(read_roots=[Path("/home/alice/clips"), Path("/srv/media")]))
    assert "DynamicUser" not in shared and "RemoveIPC" not in shared
    assert (shared["User"], shared["Group"]) == (["alice"], ["alice"])
    assert shared["ProtectHome"] == ["tmpfs"]
    assert shared["BindPaths"] == [str(CLIENT_DATA)]  # read-write: the service writes <code>-r.mp4 there
    assert shared["BindReadOnlyPaths"] == ["/home/alice/clips"]  # /srv is not hidden: no bind needed
    changed = {"DynamicUser", "User", "Group", "ProtectHome", "BindPaths", "BindReadOnlyPaths"}
    assert {k: v for k, v in shared.items() if k not in changed} == {k: v for k, v in plain.items() if k not in changed}
    # a user unit runs as the user already, and cannot hide homes: nothing to change there
    assert render(TEMPLATE.read_text(), BINDIR, user=True, data_dir=CLIENT_DATA) == render(TEMPLATE.read_text(), BINDIR, user=True)


def test_data_dir_paths_systemd_would_misread_are_refused():
    with pytest.raises(ValueError, match="splits at ':'"):
        render(TEMPLATE.read_text(), BINDIR, data_dir=Path("/home/a:b"), owner=("a", "a"))
    with pytest.raises(ValueError, match="cannot be written into a unit file"):
        render(TEMPLATE.read_text(), BINDIR, data_dir=Path("/home/a$b"), owner=("a", "a"))


@needs_analyze
def test_data_dir_unit_passes_verify_and_keeps_exposure_at_most_2(tmp_path):
    unit = write_unit(tmp_path, data_dir_unit(read_roots=[Path("/home/alice/clips")]))
    verify(unit, tmp_path)
    score, report = exposure(unit)
    print(f"systemd-analyze security exposure (data_dir unit): {score}")
    assert score <= MAX_EXPOSURE, report


def _an_account() -> pwd.struct_passwd:
    """A regular account to own a test folder (as root), or the test's own user."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for account in pwd.getpwall():
        if account.pw_uid >= 1000 and account.pw_name != "nobody" and account.pw_uid != 65534:
            return account
    pytest.skip("no regular account on this host to own the data folder")


@needs_analyze
def test_install_service_renders_the_data_dir_owner(cli, tmp_path):
    account = _an_account()
    data = tmp_path / "heygem_data" / "face2face" / "temp"
    data.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(data, account.pw_uid, account.pw_gid)
    assert data_dir_owner(data)[0] == account.pw_name
    proc = cli("install-service", "--dry-run", "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    found = directives(proc.stdout)
    assert found["User"] == [account.pw_name] and found["BindPaths"] == [str(data)]
    verify(write_unit(tmp_path, proc.stdout), tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's folders belong to root")
def test_a_root_owned_or_missing_data_dir_is_a_usage_error(cli, tmp_path):
    proc = cli("install-service", "--dry-run", "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and "belongs to root, and the service will not run as root" in proc.stderr
    assert proc.stdout == ""
    proc = cli("install-service", "--dry-run", "--data-dir", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "does not exist; start the desktop client once" in proc.stderr


def test_a_bad_config_is_named_before_anything_is_rendered(cli, tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    (tmp_path / "config" / "heygem-ops").mkdir(parents=True)
    (tmp_path / "config" / "heygem-ops" / "config.toml").write_text('[daemon]\ndata_dir = "relative/temp"\n')
    proc = cli("install-service", "--user", "--dry-run", env=env)
    assert proc.returncode == 2 and "[daemon] data_dir: 'relative/temp' is not an absolute path" in proc.stderr
