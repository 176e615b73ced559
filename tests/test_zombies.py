"""`heygem-ops zombies` end to end: a real subprocess CLI against real zombies made by the test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ops.cli import _zombies_args
from conftest import ROOT
from procs_helpers import ZombieMaker, proc_state


@pytest.fixture
def maker():
    """A parent (started by the test) with 3 unreaped children and one sleeping child; reaped at teardown."""
    m = ZombieMaker(3, depth=1)
    yield m
    m.stop()
    assert all(proc_state(pid) is None for pid in m.zombie_pids)


@pytest.fixture
def other():
    m = ZombieMaker(2)
    yield m
    m.stop()


def test_json_lists_the_tree_zombies_and_exits_1(cli, maker, other):
    result = cli("zombies", "--json", "--pid", str(maker.pid))
    assert result.returncode == 1, result.stderr
    doc = json.loads(result.stdout)
    assert doc["total"] == 3
    [group] = doc["groups"]
    assert group["ppid"] == maker.pid
    assert group["parent_cmdline"] == maker.cmdline
    assert group["count"] == 3
    assert [z["pid"] for z in group["zombies"]] == maker.zombie_pids
    assert {z["state"] for z in group["zombies"]} == {"Z"}
    assert 0 <= group["parent_age_s"] < 120


def test_json_host_wide_groups_every_parent(cli, maker, other):
    result = cli("zombies", "--json")
    assert result.returncode == 1, result.stderr
    doc = json.loads(result.stdout)
    groups = {g["ppid"]: g for g in doc["groups"]}
    assert [z["pid"] for z in groups[maker.pid]["zombies"]] == maker.zombie_pids
    assert [z["pid"] for z in groups[other.pid]["zombies"]] == other.zombie_pids
    assert doc["total"] == sum(g["count"] for g in doc["groups"]) >= 5


def test_table_shows_parent_and_total(cli, maker, other):
    result = cli("zombies", "--pid", str(maker.pid), env={"COLUMNS": "200"})
    assert result.returncode == 1, result.stderr
    assert "3 zombie process(es) in the tree of pid" in result.stdout
    assert str(maker.pid) in result.stdout and "procs_helpers.py 3 1" in result.stdout
    assert all(str(pid) in result.stdout for pid in maker.zombie_pids)
    assert not any(str(pid) in result.stdout for pid in other.zombie_pids)


def test_tree_without_zombies_exits_0(cli, maker):
    sleeper = maker.pids[1]  # its parent's zombies are siblings, not descendants
    result = cli("zombies", "--pid", str(sleeper))
    assert result.returncode == 0, result.stderr
    assert "no zombies in the tree of pid" in result.stdout
    result = cli("zombies", "--json", "--pid", str(sleeper))
    assert (result.returncode, json.loads(result.stdout)) == (0, {"total": 0, "groups": []})


def test_missing_pid_exits_2(cli):
    result = cli("zombies", "--pid", "999999999")
    assert result.returncode == 2
    assert "no process with pid 999999999" in result.stderr
    assert result.stdout == ""


def test_help_shows_an_example(cli):
    result = cli("zombies", "--help")
    assert result.returncode == 0
    assert "heygem-ops zombies --pid" in result.stdout


def test_cold_start_does_not_import_heavy_modules(cli, maker):
    """It must beat `ps aux | grep defunct | wc -l`: on --json, not even click, json or re."""
    code = (
        "import sys, runpy; sys.argv = ['heygem-ops', 'zombies', '--json', '--pid', sys.argv[1]]\n"
        "try:\n    runpy.run_module('ops.cli', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('click', 'json', 're', 'typing', 'psutil', 'rich', 'onnxruntime', 'cv2', 'numpy', 'pydantic') if m in sys.modules), file=sys.stderr)"
    )
    # -S: without site, so what the editable install's finder imports (re, pathlib) does not count.
    result = subprocess.run([sys.executable, "-S", "-c", code, str(maker.pid)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert json.loads(result.stdout)["total"] == 3
    assert result.stderr.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("args, parsed", [
    (["zombies"], (False, None)),
    (["zombies", "--json"], (True, None)),
    (["zombies", "--pid", "42", "--json"], (True, 42)),
    (["zombies", "--pid=42"], (False, 42)),
    # Everything else goes to click, for its help and its error messages.
    (["zombies", "--pid", "0"], None),
    (["zombies", "--pid", "-3"], None),
    (["zombies", "--pid", "x"], None),
    (["zombies", "--pid"], None),
    (["zombies", "--json", "--json"], None),
    (["zombies", "--help"], None),
    (["zombies", "--jsn"], None),
    (["--log-json", "zombies"], None),
    (["gpu", "--json"], None),
    ([], None),
])
def test_fast_path_takes_only_well_formed_invocations(args, parsed):
    assert _zombies_args(args) == parsed


def test_malformed_invocation_gets_clicks_message(cli):
    result = cli("zombies", "--pid", "0")
    assert result.returncode == 2
    assert "Invalid value for '--pid'" in result.stderr
