"""The zombie escalation shared by the daemon and `heygem-ops clean` (pure, plus pid_room on a
fake /proc and cgroup tree)."""

from __future__ import annotations

import pytest

from watchdog.escalation import ALERT, NUDGE, RESTART, WAIT, escalate, pid_room, threatens_pids


@pytest.mark.parametrize("nudged_at, now, restart_ok, expected", [
    (None, 100.0, True, NUDGE),
    (None, 100.0, False, NUDGE),
    (100.0, 129.9, True, WAIT),
    (100.0, 130.0, True, RESTART),
    (100.0, 130.0, False, ALERT),
])
def test_escalate_nudges_waits_then_restarts_only_when_it_pays(nudged_at, now, restart_ok, expected):
    assert escalate(nudged_at, now, grace_s=30.0, restart_ok=restart_ok) == expected


@pytest.mark.parametrize("zombies, room, restart_at, expected", [
    (41, 32000, None, False),     # the incident's 41 zombies: no threat to 32k free pids
    (8000, 32000, None, True),    # a quarter of the free pids
    (7999, 32000, None, False),
    (3, 100, None, False),
    (25, 100, None, True),
    (3, 32000, 3, True),          # configured count wins
    (2, 32000, 3, False),
    (10**6, None, None, False),   # unknown room: never by count alone
])
def test_threatens_pids(zombies, room, restart_at, expected):
    assert threatens_pids(zombies, room, restart_at) is expected


def fake_proc(tmp_path, pid_max="32768\n", loadavg="0.10 0.20 0.30 2/768 4242\n", cgroup="0::/system.slice/heygem.service\n"):
    proc = tmp_path / "proc"
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "self").mkdir()
    (proc / "sys/kernel/pid_max").write_text(pid_max)
    (proc / "loadavg").write_text(loadavg)
    (proc / "self/cgroup").write_text(cgroup)
    return proc


def test_pid_room_from_pid_max_and_tasks(tmp_path):
    assert pid_room(fake_proc(tmp_path), tmp_path / "nocgroup") == 32768 - 768


def test_pid_room_takes_the_cgroups_tasks_max_when_smaller(tmp_path):
    group = tmp_path / "cg/system.slice/heygem.service"
    group.mkdir(parents=True)
    (group / "pids.max").write_text("4915\n")
    (group / "pids.current").write_text("915\n")
    proc = fake_proc(tmp_path)
    assert pid_room(proc, tmp_path / "cg") == 4000
    (group / "pids.max").write_text("max\n")
    assert pid_room(proc, tmp_path / "cg") == 32768 - 768


def test_pid_room_unknown(tmp_path):
    assert pid_room(tmp_path / "nothing", tmp_path / "nothing") is None


def test_pid_room_on_this_host_is_positive():
    room = pid_room()
    assert room is None or room > 0
