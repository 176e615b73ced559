"""The stage board: heartbeats and progress counters of every pipeline stage, in shared memory.

This is the interface the watchdog daemon samples. Upstream gave it nothing to look at: a stage
that stopped moving looked exactly like one waiting for work. Here each (replica, stage) has a row
that its stage process updates as it works, and any process can read all rows by name, cheaply,
without a lock and without importing anything beyond the standard library.

Writers (stage processes)::

    board = Board.attach("heygem-board")           # or receive a Board through Process(args=...)
    row = board.row(replica=0, stage="generate")
    row.start()                                    # pid, state "starting", counters at 0, heartbeat
    row.set_state("idle"); row.beat()              # waiting for input, still alive
    row.took(4); row.set_job(17); row.set_state("busy")
    row.gave(3)                                    # items out, progress time, heartbeat
    row.drop(1)                                    # items out and dropped (its job failed), heartbeat
    row.set_depth(out_queue.qsize())               # items waiting downstream of this stage
    row.spend("input", 0.004)                      # wall seconds spent on one of `TIMES`

Readers (the daemon, `heygem-ops monitor`)::

    with Board.attach("heygem-board") as board:
        for r in board.snapshot(): ...             # one dict per row, see `FIELDS`

Row fields (`FIELDS`): `pid`, `state` (a name from `STAGE_STATES`), `heartbeat` (last sign of
life, epoch seconds), `items_in` (items taken), `items_out` (items that left the stage: handed on
or dropped), `dropped` (the part of `items_out` let go without being handed on, because its job
failed or was cancelled or the stage was stopping), `progress_at` (when an item was last handed
on: a drop is not progress), `depth` (the stage's output queue depth as the writer last saw it),
`job` (current job id or None), and the seven `TIMES` counters below. The three item counters
only grow while the stage process lives, and `start()` sets them to 0 for a new one. `items_in -
items_out` is what the stage holds right now, so a stage that failed a job and let go of its
frames holds nothing; `items_out - dropped` is the work handed on. A stall is a row whose
`progress_at` is old while it has input (`items_in > items_out`, or upstream depth > 0) and whose
state is not "backpressure": a stage blocked on a full downstream queue is waiting, not stalled;
the stage downstream is the one to look at. The rules live in the daemon; the board only records.

Where the stage's wall time went (`TIMES`), seconds since the stage process started, one field
`<kind>_s` each: `work_s` (frames: decode reads, detects, crops and fills a slot; generate runs a
batch; encode pastes and writes), `input_s` (waiting on its input queue inside a job: the stage
upstream is slower; for generate also a batch waiting to fill), `output_s` (waiting for room in
its output queue: the stage downstream is slower), `slot_s` (decode waiting for a free ring slot:
every slot is in flight), `claim_s` (holding no job: decode asking the store for one, generate
and encode waiting for the next job's first message), `start_s` (a job's start: decode's probe,
audio and first features; generate taking the reference crop; encode opening the writer),
`end_s` (a job's end: encode handing the job to its completion thread, or waiting for the
previous job's completion, the encoder's last frames and the store, still under way).
A stage charges each span as it ends, and a wait at least once per poll slice, so the seven add
up to the stage's wall time within one slice. Differences of two snapshots say why a stage, the
generator above all, is not busy 100 % of the time: `input_s` waits for decode, `output_s` for
encode, `claim_s` and `start_s` are job boundaries. They only grow, and `start()` zeroes them.

Consistency model: every field is one naturally aligned 8-byte word written with a single store,
and each row has exactly one writer (its stage process), so a reader never sees a torn value and
counters never go backwards within one stage process. A snapshot is not atomic across fields or
rows: `items_in` may be one update ahead of `items_out`. Freshness is judged by `heartbeat`, never
by consistency.

Layout (version 3, little-endian, all offsets multiples of 8; version 1 had no `dropped`,
version 2 no `TIMES`)::

    header  magic b"HGBOARD1" | version u32 | replicas u32 | stages u32 | name_size u32
            | created f64 | creator pid i64 | stage names, name_size bytes each, NUL padded
    rows    replicas * stages rows of len(FIELDS) 8-byte words, row = replica * stages + stage

so `Board.attach(name)` needs only the segment's name.

Segment ownership: the creator unlinks (`close()`, or leaving its `with` block). Other
processes attach *untracked* (`attach_segment`): in Python < 3.13 a plain
`SharedMemory(name)` registers the segment with the attaching process's resource tracker, which
unlinks it when that process exits (and warns about a "leaked" segment) -- a `monitor` command
would destroy the live board on exit. The creator stays tracked, so if it is SIGKILLed its resource
tracker still removes the segment once the creator's process tree is gone.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Optional, Union

MAGIC = b"HGBOARD1"
VERSION = 3
NAME_SIZE = 32
# Where a stage's wall time goes (see the module's docstring); row field `<kind>_s` each.
TIMES = ("work", "input", "output", "slot", "claim", "start", "end")
FIELDS = ("pid", "state", "heartbeat", "items_in", "items_out", "dropped", "progress_at", "depth", "job",
          *(f"{kind}_s" for kind in TIMES))
_FLOATS = frozenset({"heartbeat", "progress_at", *(f"{kind}_s" for kind in TIMES)})
_INDEX = {f: i for i, f in enumerate(FIELDS)}
STAGE_STATES = ("absent", "starting", "idle", "busy", "backpressure", "stopped", "failed")
_HEADER = struct.Struct("<8sIIIIdq")  # magic, version, replicas, stages, name_size, created, pid
_NO_JOB = -1

_untrack_lock = threading.Lock()


class BoardError(Exception):
    """No board under that name, or a segment that is not a board of this version."""


def attach_segment(name: str) -> SharedMemory:
    """Open an existing shared-memory segment without letting this process's exit unlink it.

    Python 3.13 has `track=False` for this. Before it, `SharedMemory.__init__` always calls
    `resource_tracker.register`; for the duration of the open we filter out exactly this one
    registration (other threads' registrations still pass through), so the creator keeps sole
    ownership of the segment's life.
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    with _untrack_lock:
        original = resource_tracker.register

        def register(rname: str, rtype: str) -> None:
            if rtype == "shared_memory" and rname.lstrip("/") == name.lstrip("/"):
                return
            original(rname, rtype)

        resource_tracker.register = register
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = original


class Row:
    """One (replica, stage) row; written by that stage's process only (see the consistency model)."""

    def __init__(self, board: "Board", index: int):
        self._board = board
        self._base = index * len(FIELDS)

    def _set(self, field: str, value: Union[int, float]) -> None:
        i = self._base + _INDEX[field]
        if field in _FLOATS:
            self._board._f[i] = float(value)
        else:
            self._board._q[i] = int(value)

    def _get(self, field: str) -> Union[int, float]:
        i = self._base + _INDEX[field]
        return self._board._f[i] if field in _FLOATS else self._board._q[i]

    def start(self, pid: Optional[int] = None, now: Optional[float] = None) -> None:
        """Claim the row for this process: pid, then as `reset`. What a previous process of the
        stage left (items it held when it was killed) is not this one's."""
        self._set("pid", os.getpid() if pid is None else pid)
        self.reset(now)

    def reset(self, now: Optional[float] = None) -> None:
        """Counters at 0, no progress yet, no job, depth 0, state "starting", a heartbeat.

        `items_in` goes first, so a reader in between sees a row that holds nothing rather than
        one holding the previous process's items."""
        for field in ("items_in", "items_out", "dropped", "depth"):
            self._set(field, 0)
        for kind in TIMES:
            self._set(f"{kind}_s", 0.0)
        self._set("progress_at", 0.0)
        self._set("job", _NO_JOB)
        self.set_state("starting", now)

    def beat(self, now: Optional[float] = None) -> None:
        """Still alive (call at least once per poll of a bounded wait)."""
        self._set("heartbeat", time.time() if now is None else now)

    def set_state(self, state: str, now: Optional[float] = None) -> None:
        """One of `STAGE_STATES`; also a heartbeat."""
        self._set("state", STAGE_STATES.index(state))
        self.beat(now)

    def took(self, n: int = 1) -> None:
        """Counted `n` items taken from the input."""
        self._set("items_in", self._get("items_in") + n)

    def gave(self, n: int = 1, now: Optional[float] = None) -> None:
        """Handed `n` items on: progress. Also a heartbeat."""
        now = time.time() if now is None else now
        self._set("items_out", self._get("items_out") + n)
        self._set("progress_at", now)
        self._set("heartbeat", now)

    def drop(self, n: int = 1, now: Optional[float] = None) -> None:
        """Let go of `n` taken items without handing them on (their job failed or was cancelled,
        or the stage is stopping): they leave the stage (`items_out`) as `dropped`. Not progress;
        a heartbeat. `dropped` goes first, so `items_out - dropped` never overstates the work."""
        self._set("dropped", self._get("dropped") + n)
        self._set("items_out", self._get("items_out") + n)
        self.beat(now)

    def spend(self, kind: str, seconds: float) -> None:
        """Add `seconds` of wall time to `kind` (one of `TIMES`)."""
        i = self._base + _INDEX[f"{kind}_s"]
        self._board._f[i] += seconds

    def set_job(self, job_id: Optional[int]) -> None:
        self._set("job", _NO_JOB if job_id is None else job_id)

    def set_depth(self, depth: int) -> None:
        self._set("depth", depth)

    def read(self) -> dict:
        """This row's fields as a dict (what `Board.snapshot` returns per row)."""
        out = {f: self._get(f) for f in FIELDS}
        out["state"] = STAGE_STATES[out["state"]] if 0 <= out["state"] < len(STAGE_STATES) else "unknown"
        out["job"] = None if out["job"] == _NO_JOB else out["job"]
        return out


class Board:
    """A table of `replicas` x `stages` rows in one named segment. Pickles as its name."""

    def __init__(self, shm: SharedMemory, owner: bool):
        self._shm = shm
        self._owner = owner
        head = bytes(shm.buf[: _HEADER.size])
        magic, version, replicas, stages, name_size, created, pid = _HEADER.unpack(head)
        if magic != MAGIC or version != VERSION:
            shm.close()
            raise BoardError(f"shared memory {shm.name!r} is not a version {VERSION} stage board")
        self.name = shm.name.lstrip("/")
        self.replicas, self.created, self.creator_pid = replicas, created, pid
        names_at = _HEADER.size
        raw = bytes(shm.buf[names_at : names_at + stages * name_size])
        self.stages = tuple(
            raw[i * name_size : (i + 1) * name_size].rstrip(b"\0").decode() for i in range(stages)
        )
        rows_at = _rows_offset(stages)
        words = replicas * stages * len(FIELDS)
        self._q = shm.buf[rows_at : rows_at + words * 8].cast("q")
        self._f = shm.buf[rows_at : rows_at + words * 8].cast("d")

    @classmethod
    def create(cls, name: str, replicas: int, stages: "list[str] | tuple[str, ...]", now: Optional[float] = None) -> "Board":
        """Create the segment (it must not exist yet); every row starts "absent"."""
        if replicas < 1 or not stages:
            raise ValueError("a board needs at least one replica and one stage")
        encoded = [s.encode() for s in stages]
        if any(not 0 < len(s) < NAME_SIZE for s in encoded) or len(set(encoded)) != len(encoded):
            raise ValueError(f"stage names must be distinct, 1..{NAME_SIZE - 1} bytes: {stages}")
        size = _rows_offset(len(stages)) + replicas * len(stages) * len(FIELDS) * 8
        try:
            shm = SharedMemory(name=name, create=True, size=size)
        except FileExistsError:
            raise BoardError(f"a shared-memory segment named {name!r} exists already (another pipeline?)") from None
        created = time.time() if now is None else now
        shm.buf[: _HEADER.size] = _HEADER.pack(MAGIC, VERSION, replicas, len(stages), NAME_SIZE, created, os.getpid())
        for i, s in enumerate(encoded):
            at = _HEADER.size + i * NAME_SIZE
            shm.buf[at : at + NAME_SIZE] = s.ljust(NAME_SIZE, b"\0")
        board = cls(shm, owner=True)
        for r in range(replicas):
            for s in range(len(stages)):
                board.row(r, s).set_job(None)
        return board

    @classmethod
    def attach(cls, name: str) -> "Board":
        """Open an existing board by name alone (untracked: this process's exit leaves it alone)."""
        try:
            shm = attach_segment(name)
        except FileNotFoundError:
            raise BoardError(f"no stage board named {name!r}: is the pipeline running?") from None
        if shm.size < _HEADER.size:
            shm.close()
            raise BoardError(f"shared memory {name!r} is too small to be a stage board")
        return cls(shm, owner=False)

    def __reduce__(self):
        return (Board.attach, (self.name,))

    def row(self, replica: int, stage: Union[int, str]) -> Row:
        s = self.stages.index(stage) if isinstance(stage, str) else stage
        if not (0 <= replica < self.replicas and 0 <= s < len(self.stages)):
            raise IndexError(f"no row ({replica}, {stage}) on a {self.replicas} x {len(self.stages)} board")
        return Row(self, replica * len(self.stages) + s)

    def snapshot(self) -> list[dict]:
        """Every row as a dict: `replica`, `stage` and the `FIELDS` (state as its name)."""
        return [
            {"replica": r, "stage": stage, **self.row(r, s).read()}
            for r in range(self.replicas)
            for s, stage in enumerate(self.stages)
        ]

    def close(self) -> None:
        """Unmap; the creator also unlinks the segment. Rows of this board stop working."""
        self._q.release()
        self._f.release()
        self._shm.close()
        if self._owner:
            self._shm.unlink()

    def __enter__(self) -> "Board":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rows_offset(stages: int) -> int:
    end = _HEADER.size + stages * NAME_SIZE
    return (end + 7) // 8 * 8
