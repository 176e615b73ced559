"""Upstream's text log (`log/dh.log`) and its failure lines: one pure catalogue.

Upstream's service (the `guiji2025/heygem.ai` container, the Linux Python port) logs one record
per line,

    [2025-03-18 12:52:07,922] [run.py[line:147]] [INFO] [[1002] -> 预处理耗时:0.359s]

with its `print` output, Python tracebacks and ONNX Runtime's own log lines in between. `Reader`
turns such a stream -- mixed with our own JSON records, the format is decided line by line -- into
entries: a record, a whole traceback, or a bare line, each with the task it belongs to (its own
code, else the task running then; a traceback or a bare line belongs to the record before it).
`SIGNATURES` names upstream's failure lines; `TaskBook` collects the timings upstream logs per
task and each task's outcome.

`heygem-ops logs`, `heygem-ops doctor --log` and the daemon's `LogWatch` all read logs through
this module, so a line means the same everywhere. Nothing here reads a file or a clock.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

from watchdog.alerts import FIXES

# upstream's `drivered_queue.put(..., timeout=60)`: a warm-up longer than this fills the queue first
UPSTREAM_QUEUE_TIMEOUT_S = 60.0
LINE_MAX = 300  # characters of a line kept as evidence

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# [2025-03-18 12:52:07,646] [run.py[line:147]] [INFO] [message]  (the closing `]` may come lines later)
DH_LINE = re.compile(
    r"^\[(?P<ts>\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)?)\]\s*"
    r"\[(?P<file>[^\[\]]*?)(?:\[line:(?P<lineno>\d+)\])?\]\s*"
    r"\[(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\]\s?"
    r"(?:\[(?P<msg>.*))?$")
# ONNX Runtime's default logger: 2025-03-18 12:40:05.220119384 [E:onnxruntime:Default, file.cc:12 Func] message
ORT_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) "
    r"\[(?P<sev>[VIWEF]):onnxruntime:(?P<logid>[^,\]]*),\s*(?P<where>[^\]]*)\]\s?(?P<msg>.*)$")
ORT_LEVELS = {"V": "debug", "I": "info", "W": "warning", "E": "error", "F": "critical"}
TRACEBACK = "Traceback (most recent call last)"
FRAME = re.compile(r'^\s*File "[^"]*", line \d+')

# a task code: `[1002] -> ...`, `[1002]init_wh ...`, `[<uuid>]任务...`, `任务:1002 -> ...`, `>>> 任务:1002 耗时:...`
CODE_PREFIX = re.compile(r"^\[(?P<code>[^\[\]\s%]+)\]")
CODE_TASK = re.compile(r"任务[:：]\s*(?P<code>[^\s,，\[\]]+)")

# what upstream logs along one task (trans_dh_service.TransDhTask.work and its processes)
START = re.compile(r"任务[:：]\s*(?P<code>[^\s,，]+?)\s*->\s*audio_url")
PREPROCESS = re.compile(r"预处理耗时[:：]\s*(?P<s>\d+(?:\.\d+)?)\s*s")
AUDIO = re.compile(r"get_aud_feat1 cost[:：]\s*(?P<s>\d+(?:\.\d+)?)\s*s")
WARMUP = re.compile(r"init_wh result\s*[:：]\s*\[(?P<wh>[^\]]*)\]\s*[，,]?\s*cost[:：]\s*(?P<value>\d+(?:\.\d+)?)\s*s")
FRAMES = re.compile(r"任务视频驱动队列启动\s*batch_size[:：]\s*(?P<batch>\d+)(?:\s*[,，]\s*len[:：]\s*(?P<len>\d+))?")
PROGRESS = re.compile(r"(?:current_idx|frameId)[:：]\s*(?P<n>\d+)")
TOTAL = re.compile(r"任务[:：]\s*(?P<code>[^\s,，]+?)\s+耗时[:：]\s*(?P<s>\d+(?:\.\d+)?)")
FAILED = re.compile(r"任务执行失败[，,]?\s*(?:异常信息[:：]\s*)?(?P<reason>.*)$")
RESULT = re.compile(r"任务最终合成结果[:：]\s*(?P<path>.+?)\s*$")
LIFECYCLE = (START, PREPROCESS, AUDIO, WARMUP, FRAMES, TOTAL, FAILED, RESULT)
JOB_LINES = (START, TOTAL, FAILED, RESULT)

# categories of upstream's lines, as `heygem-ops logs --category` knows them for our JSON records
ERROR_WORDS = re.compile(r"异常|失败")
QUEUE_WORDS = re.compile(r"队列|阻塞|\bEmpty\b")
GPU_WORDS = re.compile(r"cuda|gpu|显存|provider", re.IGNORECASE)
WORKER_WORDS = re.compile(r"进程(?:启动|结束)|TransDhTask init")


# ---- the catalogue -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Signature:
    """A failure line of upstream's log: which alert it raises, what it means, what to do."""

    alert: str
    severity: str  # "info" | "warning" | "critical"
    pattern: str
    summary: str  # `{value:g}`: the number the pattern captured (group `value`)
    categories: frozenset = frozenset()
    fix: Optional[str] = None  # None: the alert's entry in FIXES
    failure: bool = True  # `doctor --log`: a failure (exit 1), else a warning
    min_value: Optional[float] = None  # the captured `value` must exceed this
    builtin: bool = True

    @property
    def regex(self) -> re.Pattern:
        return _compiled(self.pattern)

    def fix_text(self) -> str:
        return self.fix or FIXES.get(self.alert, "")

    def find(self, line: str) -> Optional[re.Match]:
        match = self.regex.search(line)
        if match is None or self.min_value is None:
            return match
        return match if float(match.group("value")) > self.min_value else None


_REGEXES: dict[str, re.Pattern] = {}


def _compiled(pattern: str) -> re.Pattern:
    if pattern not in _REGEXES:
        _REGEXES[pattern] = re.compile(pattern)
    return _REGEXES[pattern]


SIGNATURES: tuple[Signature, ...] = (
    Signature(
        "queue_full", "critical", r"队列满",
        "upstream's driving queue stayed full for its 60 s put timeout: the task is lost and the queue blocks",
        frozenset({"queue", "error"}),
        fix="upstream's drivered_queue (10 batches of frames) stayed full for 60 s: the generator "
        "downstream is slow or dead, the task is lost and the next ones block. Find the cause in the "
        "same log (`heygem-ops doctor --log`: a slow warm-up, a CPU fallback, GPU out of memory); "
        "`heygem-ops restart` clears the stuck children. Bigger queues or longer timeouts only hide it",
    ),
    Signature(
        "queue_empty", "critical", r"_queue\.Empty|\braise Empty\b",
        "a stage of upstream got nothing from its input queue within its timeout (queue.Empty)",
        frozenset({"queue", "error"}),
    ),
    Signature(
        # ONNX Runtime's own texts when the CUDA provider does not load (provider_bridge_ort.cc,
        # onnxruntime_pybind_state.cc, onnxruntime_inference_collection.py); older releases
        # spell "wasnt".
        "cpu_fallback", "critical",
        r"Failed to load library \S*onnxruntime_providers_cuda\.(?:so|dll)"
        r"|Failed to create CUDAExecutionProvider"
        r"|CUDA_PATH is set but CUDA wasn'?t able to be loaded"
        r"|Falling back to \[[^\]]*CPUExecutionProvider[^\]]*\] and retrying",
        "ONNX Runtime could not load its CUDA provider: upstream's sessions run on CPU",
        frozenset({"gpu"}),
        fix="ONNX Runtime could not load its CUDA provider, so upstream runs on CPU (its warm-up "
        "and queues then time out): run `heygem-ops doctor` on that host or in that container; it "
        "names the CUDA/cuDNN library that does not load and the command that installs it",
    ),
    Signature(
        "gpu_oom", "critical",
        r"CUDA out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED"
        r"|CUDA failure 2: out of memory|cudaErrorMemoryAllocation"
        r"|Failed to allocate memory for requested buffer of size"
        r"|Available memory of \d+ is smaller than requested bytes of \d+",
        "the GPU ran out of memory",
        frozenset({"gpu", "error"}),
    ),
    Signature(
        "job_failed", "warning", r"任务执行失败",
        "an upstream task failed (the client gets status 3 from /easy/query)",
        frozenset({"job", "error"}),
        fix="the task failed with the reason on the line (an empty reason: see the traceback before "
        "it, `heygem-ops logs --task CODE`); the client was told status 3 and must resubmit",
    ),
    Signature(
        "warmup_slow", "warning", WARMUP.pattern,
        "upstream's warm-up (init_wh) took {value:g} s, longer than its 60 s queue timeout",
        frozenset({"queue"}),
        failure=False, min_value=UPSTREAM_QUEUE_TIMEOUT_S,
    ),
)
BY_ALERT = {s.alert: s for s in SIGNATURES}


def signatures(patterns: Iterable = (), builtins: bool = True) -> list[Signature]:
    """The built-in catalogue (unless `builtins` is off) plus configured patterns (objects with
    `regex`, `alert`, `severity`: watchdog.config.LogPattern)."""
    out = list(SIGNATURES) if builtins else []
    for p in patterns:
        out.append(Signature(p.alert, p.severity, p.regex, f"log line matched /{p.regex}/",
                             failure=p.severity == "critical", builtin=False))
    return out


@dataclass(frozen=True)
class Hit:
    """One signature found on one entry."""

    signature: Signature
    line: str
    lineno: int
    task: Optional[str] = None
    timestamp: Optional[str] = None
    value: Optional[float] = None
    where: Optional[str] = None  # a traceback's innermost frame

    @property
    def alert(self) -> str:
        return self.signature.alert

    def what(self) -> str:
        """What the line means (the signature's summary with its number)."""
        return self.signature.summary.format(value=self.value if self.value is not None else 0.0)

    def summary(self) -> str:
        return f"{self.what()} (task {self.task})" if self.task else self.what()

    def evidence(self) -> dict:
        out = {"line": self.line, "lineno": self.lineno, "task": self.task, "timestamp": self.timestamp}
        if self.value is not None:
            out["value"] = self.value
        if self.where:
            out["where"] = self.where
        return out


# ---- reading -----------------------------------------------------------------------------------

@dataclass
class Entry:
    """One unit of a log: a record (ours in JSON, upstream's text, ONNX Runtime's), a whole
    traceback, or a bare line (`print` output)."""

    kind: str  # "json" | "dh" | "ort" | "traceback" | "text"
    lines: list[str]  # as read; ANSI colour codes removed except from JSON lines
    lineno: int  # of the first line, from 1
    record: dict = field(default_factory=dict)  # json: the object; dh/ort: timestamp, level, source, message
    task: Optional[str] = None
    hits: list[Hit] = field(default_factory=list)
    categories: frozenset = frozenset()  # upstream's entries only; ours have fields for that
    continues: bool = False  # a bare line that continues the record before (a JSON record's
    # traceback, a multi-line upstream message), not some process's `print`
    after: Optional[str] = None  # a traceback's or bare line's: the kind of the record before it

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def message(self) -> str:
        return self.record.get("message", self.text) if self.kind in ("dh", "ort") else self.text

    @property
    def timestamp(self) -> Optional[str]:
        return self.record.get("timestamp") if self.kind in ("dh", "ort") else None

    def to_dict(self) -> dict:
        """The entry as one JSON object (`logs --json`); our own JSON records are printed as read."""
        out: dict = {"format": self.kind, "lineno": self.lineno}
        if self.kind in ("dh", "ort"):
            out.update(self.record)
        else:
            out["text"] = self.text
            if self.kind == "traceback":
                out.update(self.record)
        out["task"] = self.task
        out["categories"] = sorted(self.categories)
        out["signatures"] = [h.alert for h in self.hits]
        return out


def task_code(message: str) -> Optional[str]:
    """The task code a message names: `[1002] -> ...`, `[<uuid>]...`, `任务:1002 ...`."""
    match = CODE_PREFIX.match(message) or CODE_TASK.search(message)
    return match.group("code") if match else None


def _iso(ts: str) -> str:
    return ts.replace(",", ".").replace(" ", "T", 1)


def parse_line(line: str) -> tuple[str, dict]:
    """(kind, fields) of one line without context: "json", "dh", "ort" or "text"."""
    if line.lstrip().startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            return "json", obj
    clean = ANSI.sub("", line)
    match = DH_LINE.match(clean)
    if match:
        msg = match.group("msg") or ""
        if msg.endswith("]"):
            msg = msg[:-1]
        lineno = match.group("lineno")
        level = match.group("level").lower()
        return "dh", {"timestamp": _iso(match.group("ts")), "level": "warning" if level == "warn" else level,
                      "source": match.group("file") + (f":{lineno}" if lineno else ""), "message": msg}
    match = ORT_LINE.match(clean)
    if match:
        ts = match.group("ts")
        if "." in ts:  # nanoseconds: keep microseconds, what datetime reads
            head, frac = ts.split(".")
            ts = f"{head}.{frac[:6]}"
        return "ort", {"timestamp": _iso(ts), "level": ORT_LEVELS[match.group("sev")],
                       "source": f"onnxruntime {match.group('where')}".strip(), "message": match.group("msg")}
    return "text", {}


def categories(entry: Entry) -> frozenset:
    """Categories of one of upstream's entries, from what it says (it has no fields)."""
    cats = set()
    text = entry.message
    if entry.kind == "traceback" or entry.record.get("level") in ("error", "critical") or ERROR_WORDS.search(text):
        cats.add("error")
    if QUEUE_WORDS.search(text):
        cats.add("queue")
    if GPU_WORDS.search(text):
        cats.add("gpu")
    if WORKER_WORDS.search(text):
        cats.add("worker")
    if entry.kind == "dh" and any(r.search(text) for r in JOB_LINES):
        cats.add("job")
    for hit in entry.hits:
        cats |= hit.signature.categories
    return frozenset(cats)


def find(entry: Entry, sigs: Sequence[Signature]) -> list[Hit]:
    """The signatures on an entry, one hit each (a traceback's last matching line: its exception)."""
    if entry.kind == "json":
        return []
    where = None
    if entry.kind == "traceback":
        frames = [line.strip() for line in entry.lines if FRAME.match(line)]
        where = frames[-1] if frames else None
    hits = []
    for sig in sigs:
        found = None
        for offset, line in enumerate(entry.lines):
            match = sig.find(line)
            if match:
                found = (offset, line, match)
        if found:
            offset, line, match = found
            value = float(match.group("value")) if "value" in match.re.groupindex and match.group("value") else None
            hits.append(Hit(sig, excerpt(line, match), entry.lineno + offset, entry.task, entry.timestamp, value, where))
    return hits


def excerpt(line: str, match: re.Match) -> str:
    """The line as evidence: whole when short, else `LINE_MAX` characters around what matched."""
    if len(line.strip()) <= LINE_MAX:
        return line.strip()
    start = max(0, min(match.start() - LINE_MAX // 3, len(line) - LINE_MAX))
    return ("…" if start else "") + line[start:start + LINE_MAX].strip() + ("…" if start + LINE_MAX < len(line) else "")


class Reader:
    """Turns lines into entries, keeping what a line needs from the ones before it: the task
    running (a line without a code belongs to it) and a traceback still being read.

    `feed` yields the entries complete so far; `flush` the traceback still open (at the end of the
    input, or when nothing more came for a while).
    """

    def __init__(self, sigs: Sequence[Signature] = SIGNATURES):
        self.sigs = list(sigs)
        self.lineno = 0
        self.current: Optional[str] = None  # started and not yet ended
        self.last_task: Optional[str] = None  # of the record before: what a traceback belongs to
        self.ended: dict[str, None] = {}  # recently ended tasks: a late line of theirs starts nothing
        self.open = False  # a bare line now continues the record before
        self.last_kind: Optional[str] = None  # of the record before
        self.pending: Optional[Entry] = None

    def feed(self, lines: Iterable[str]) -> Iterator[Entry]:
        for raw in lines:
            self.lineno += 1
            if self.pending is not None:
                clean = ANSI.sub("", raw)
                if clean[:1] in (" ", "\t"):
                    self.pending.lines.append(clean)
                    continue
                if clean.strip() and parse_line(raw)[0] == "text" and not clean.startswith(TRACEBACK):
                    self.pending.lines.append(clean)  # the exception line ends it
                    yield self._finish(self._take())
                    continue
                yield self._finish(self._take())  # cut short by a record or a blank line
            yield from self._line(raw)

    def flush(self) -> Iterator[Entry]:
        if self.pending is not None:
            yield self._finish(self._take())

    def _take(self) -> Entry:
        entry, self.pending = self.pending, None
        return entry

    def _line(self, raw: str) -> Iterator[Entry]:
        kind, fields = parse_line(raw)
        clean = raw if kind == "json" else ANSI.sub("", raw)
        if kind == "text" and clean.startswith(TRACEBACK):
            self.pending = Entry("traceback", [clean], self.lineno, task=self.last_task, after=self.last_kind)
            return
        entry = Entry(kind, [clean], self.lineno, fields)
        if kind == "text":
            entry.continues, entry.after = self.open, self.last_kind
        else:  # after our JSON record anything bare is its own output; upstream's message may go on
            self.open = kind == "json" or (kind == "dh" and not clean.rstrip().endswith("]"))
            self.last_kind = kind
        if kind == "json":
            entry.task = next((str(fields[k]) for k in ("task", "code", "job") if fields.get(k) is not None), None)
        elif kind == "dh":
            message = fields["message"]
            code = task_code(message)
            start = START.search(message)
            if start or (code and self.current is None and code not in self.ended):
                self.current = start.group("code") if start else code
            entry.task = code or self.current
            self.last_task = entry.task
            end = TOTAL.search(message)
            if end:
                self.ended[end.group("code")] = None
                while len(self.ended) > 100:
                    self.ended.pop(next(iter(self.ended)))
                if end.group("code") == self.current:
                    self.current = None
        else:  # ONNX Runtime's lines and bare lines: the task of the record before
            entry.task = self.last_task
        yield self._finish(entry)

    def _finish(self, entry: Entry) -> Entry:
        if entry.kind == "traceback":
            self.open = True  # "During handling of the above exception ..."
            exception = next((line for line in reversed(entry.lines) if line.strip() and line[:1] not in " \t"), "")
            entry.record = {"exception": exception if not exception.startswith(TRACEBACK) else ""}
        entry.hits = find(entry, self.sigs)
        if entry.kind != "json":
            entry.categories = categories(entry)
        return entry


# ---- tasks -------------------------------------------------------------------------------------

@dataclass
class Task:
    """One of upstream's tasks as its log tells it."""

    code: str
    started: Optional[str] = None
    last_seen: Optional[str] = None
    preprocess_s: Optional[float] = None
    audio_features_s: Optional[float] = None
    warmup_s: Optional[float] = None
    batch_size: Optional[int] = None
    frames: Optional[int] = None
    frames_done: Optional[int] = None
    total_s: Optional[float] = None
    ended: Optional[str] = None
    result: Optional[str] = None
    failure: Optional[str] = None  # the reason on its 任务执行失败 line (may be empty)
    failed_line: bool = False
    errors: list[str] = field(default_factory=list)  # error records and exceptions, in order
    alerts: list[str] = field(default_factory=list)  # signatures seen on its lines

    @property
    def outcome(self) -> str:
        if self.failed_line:
            return "failed"
        if self.result:
            return "succeeded"
        if self.ended is not None:
            return "failed" if self.errors else "succeeded"
        return "running"

    @property
    def reason(self) -> Optional[str]:
        """Why it failed (its failure line's reason, else the first error: the root cause), or for
        a running task the last error seen."""
        outcome = self.outcome
        if outcome == "failed":
            return self.failure or (self.errors[0] if self.errors else "no reason logged")
        if outcome == "running" and self.errors:
            return self.errors[-1]
        return None

    def to_dict(self) -> dict:
        return {
            "code": self.code, "outcome": self.outcome, "reason": self.reason, "started": self.started,
            "ended": self.ended, "last_seen": self.last_seen, "preprocess_s": self.preprocess_s,
            "audio_features_s": self.audio_features_s, "warmup_s": self.warmup_s,
            "batch_size": self.batch_size, "frames": self.frames, "frames_done": self.frames_done,
            "total_s": self.total_s, "result": self.result, "errors": list(self.errors),
            "alerts": list(dict.fromkeys(self.alerts)),
        }


def strip_code(message: str, code: Optional[str]) -> str:
    """The message without its leading `[code]` (and `->`): for showing next to the code."""
    if code and message.startswith(f"[{code}]"):
        message = message[len(code) + 2:].lstrip()
        if message.startswith("->"):
            message = message[2:].lstrip()
    return message


class TaskBook:
    """Per-task timings and outcome from upstream's entries (`Reader`'s output), in order of
    appearance; the oldest are dropped past `keep`."""

    def __init__(self, keep: int = 10_000):
        self.keep = keep
        self.tasks: dict[str, Task] = {}

    def feed(self, entry: Entry) -> None:
        code = entry.task
        if entry.kind == "json" or code is None:
            return
        message = entry.message
        task = self.tasks.get(code)
        if task is None:
            if not (entry.kind == "dh" and any(r.search(message) for r in LIFECYCLE)):
                return  # a code-like prefix that is no task of ours (e.g. a frame id)
            task = self.tasks[code] = Task(code)
            while len(self.tasks) > self.keep:
                self.tasks.pop(next(iter(self.tasks)))
        ts = entry.timestamp
        if ts:
            task.started = task.started or ts
            task.last_seen = ts
        task.alerts += [h.alert for h in entry.hits]
        if entry.kind == "traceback":
            if entry.record.get("exception"):
                task.errors.append(entry.record["exception"][:LINE_MAX])
            return
        if entry.kind != "dh":
            return
        if START.search(message) and ts:
            task.started = ts
        for regex, attr in ((PREPROCESS, "preprocess_s"), (AUDIO, "audio_features_s")):
            match = regex.search(message)
            if match:
                setattr(task, attr, float(match.group("s")))
        match = WARMUP.search(message)
        if match:
            task.warmup_s = float(match.group("value"))
        match = FRAMES.search(message)
        if match:
            task.batch_size = int(match.group("batch"))
            task.frames = int(match.group("len")) if match.group("len") else task.frames
        match = PROGRESS.search(message)
        if match:
            task.frames_done = max(task.frames_done or 0, int(match.group("n")))
        match = RESULT.search(message)
        if match:
            task.result = match.group("path")
        match = FAILED.search(message)
        if match:
            task.failed_line = True
            reason = match.group("reason").strip()
            if reason.startswith("[") and reason.endswith("]"):
                reason = reason[1:-1].strip()
            task.failure = reason[:LINE_MAX] or task.failure
        elif entry.record.get("level") in ("error", "critical"):
            task.errors.append(strip_code(message, code)[:LINE_MAX])
        match = TOTAL.search(message)
        if match and match.group("code") == code:
            task.total_s = float(match.group("s"))
            task.ended = ts

    def rows(self) -> list[Task]:
        return list(self.tasks.values())
