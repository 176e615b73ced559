"""Stage board: stage processes write their rows, any process reads them by the board's name."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import subprocess
import sys
import textwrap
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest

from heygem.board import FIELDS, TIMES, Board, BoardError

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("decode", "features", "generate", "encode")


@pytest.fixture
def board():
    b = Board.create(f"heygem_test_board_{secrets.token_hex(4)}", replicas=2, stages=STAGES, now=1.0)
    yield b
    b.close()
    assert not (Path("/dev/shm") / b.name).exists()


def _stage(board: Board, replica: int, stage: str) -> None:
    row = board.row(replica, stage)
    row.start(now=10.0)
    row.took(8)
    row.set_job(42)
    row.set_state("busy", now=11.0)
    row.gave(5, now=12.0)
    row.drop(2, now=13.0)
    row.set_depth(3)
    row.spend("work", 1.5)
    row.spend("input", 0.25)
    row.spend("work", 0.5)
    board.close()


def test_spawned_stage_writes_parent_reads(board):
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_stage, args=(board, 1, "generate"))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    rows = {(r["replica"], r["stage"]): r for r in board.snapshot()}
    assert len(rows) == 8
    assert rows[(1, "generate")] == {
        "replica": 1, "stage": "generate", "pid": child.pid, "state": "busy", "heartbeat": 13.0,
        "items_in": 8, "items_out": 7, "dropped": 2, "progress_at": 12.0, "depth": 3, "job": 42,
        **{f"{kind}_s": 0.0 for kind in TIMES}, "work_s": 2.0, "input_s": 0.25,
    }
    untouched = rows[(0, "decode")]
    assert (untouched["state"], untouched["job"], untouched["items_out"], untouched["heartbeat"]) == ("absent", None, 0, 0.0)


def test_separate_program_attaches_by_name_and_leaves_the_board_alive(board):
    """The daemon and the CLI are separate programs: their exit must not unlink the board."""
    prog = textwrap.dedent(f"""
        from heygem.board import Board
        b = Board.attach({board.name!r})
        print(b.replicas, ",".join(b.stages), b.creator_pid, b.created)
        b.row(0, "encode").gave(2, now=5.0)
        b.close()
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["2", ",".join(STAGES), str(os.getpid()), "1.0"]
        assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr, done.stderr
    assert (Path("/dev/shm") / board.name).exists()
    row = board.row(0, "encode").read()
    assert (row["items_out"], row["progress_at"]) == (4, 5.0)


def test_attach_errors_name_the_problem(board):
    with pytest.raises(BoardError, match="no stage board named 'heygem_absent_board'"):
        Board.attach("heygem_absent_board")
    with pytest.raises(BoardError, match="exists already"):
        Board.create(board.name, replicas=1, stages=["x"])
    other = SharedMemory(name=f"heygem_test_notboard_{secrets.token_hex(4)}", create=True, size=4096)
    try:
        with pytest.raises(BoardError, match="is not a version 3 stage board"):
            Board.attach(other.name)
    finally:
        other.close()
        other.unlink()


def test_rows_and_states_are_validated(board):
    with pytest.raises(IndexError):
        board.row(2, "decode")
    with pytest.raises(ValueError):
        board.row(0, "paste")
    with pytest.raises(ValueError):
        board.row(0, 0).set_state("sleeping")
    with pytest.raises(ValueError, match="distinct"):
        Board.create("heygem_bad_board", replicas=1, stages=["a", "a"])


def test_fields_are_8_byte_words(board):
    row = board.row(0, "decode")
    row.took(2**40)
    row.gave(1, now=1234567890.123456)
    got = row.read()
    assert (got["items_in"], got["progress_at"]) == (2**40, 1234567890.123456)
    assert set(got) == set(FIELDS)


def test_dropped_items_leave_the_stage_without_progress(board):
    """A failed job's frames: taken, then let go. They leave the stage's hands (items_out), are
    visible as dropped, and are not progress: the stage holds nothing afterwards."""
    row = board.row(0, "generate")
    row.start(now=1.0)
    row.took(4)
    row.gave(1, now=2.0)
    row.drop(3, now=3.0)
    got = row.read()
    assert (got["items_in"], got["items_out"], got["dropped"]) == (4, 4, 3)
    assert (got["progress_at"], got["heartbeat"]) == (2.0, 3.0)


def test_start_begins_with_clean_counters(board):
    """A stage killed with items in hand must not pass them on to its next process."""
    row = board.row(1, "encode")
    row.start(pid=100, now=1.0)
    row.took(9)
    row.gave(2, now=2.0)
    row.drop(1)
    row.set_depth(4)
    row.set_job(7)
    row.spend("claim", 3.0)
    row.start(pid=200, now=5.0)
    got = row.read()
    assert {k: got[k] for k in ("pid", "state", "heartbeat", "items_in", "items_out", "dropped", "progress_at",
                                "depth", "job")} == {
        "pid": 200, "state": "starting", "heartbeat": 5.0, "items_in": 0, "items_out": 0, "dropped": 0,
        "progress_at": 0.0, "depth": 0, "job": None,
    }
    assert all(got[f"{kind}_s"] == 0.0 for kind in TIMES)
