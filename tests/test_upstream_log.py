"""Upstream's `dh.log`: the reader, the failure catalogue, the per-task book (pure), and the
daemon's LogWatch over a real file feeding a real AlertBook.

The fixture `tests/fixtures/dh.log` is written in upstream's exact format (its logger's records,
bare `print` lines, tracebacks, ONNX Runtime's own log lines): two tasks that succeed, one that
fails on CUDA out of memory, one that fails on `_queue.Empty`, and the public report's incident:
a warm-up of 110 s, then the driving queue full.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from watchdog.alerts import ALERTS, FIXES, AlertBook, for_durations
from watchdog.config import DaemonConfig, LogPattern, RulesConfig, parse
from watchdog.logwatch import LogWatch
from watchdog.upstream_log import SIGNATURES, Reader, TaskBook, parse_line, signatures, task_code

FIXTURE = Path(__file__).parent / "fixtures" / "dh.log"
UUID = "6a1f0c3e-8d2b-4c55-9e0a-2f7b1c9d4e11"
QUEUE_FULL = f"[2025-03-18 12:57:58,930] [trans_dh_service.py[line:151]] [ERROR] [[{UUID}]任务视频驱动队列满，严重阻塞，下游队列异常]"


def _entries(text: str):
    reader = Reader()
    return list(reader.feed(text.splitlines())) + list(reader.flush())


def _fixture_entries():
    return _entries(FIXTURE.read_text(encoding="utf-8"))


# ---- reading -----------------------------------------------------------------------------------

def test_upstream_record_is_parsed():
    kind, rec = parse_line("[2025-03-18 12:52:07,922] [run.py[line:147]] [INFO] [[1002] -> 预处理耗时:0.359s]")
    assert kind == "dh"
    assert rec == {"timestamp": "2025-03-18T12:52:07.922", "level": "info", "source": "run.py:147",
                   "message": "[1002] -> 预处理耗时:0.359s"}
    kind, rec = parse_line("[2025-03-18 12:50:41,790] [run.py[line:158]] [ERROR] [[1002]任务执行失败，异常信息:[[Errno 2] x]]")
    assert kind == "dh" and rec["level"] == "error" and rec["message"] == "[1002]任务执行失败，异常信息:[[Errno 2] x]"
    assert parse_line('{"event": "alert", "alert": "zombies"}') == ("json", {"event": "alert", "alert": "zombies"})
    assert parse_line(">>> 777   25") == ("text", {})
    kind, rec = parse_line("\x1b[0;93m2026-12-01 21:39:49.121351434 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
                           "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider.\x1b[m")
    assert kind == "ort" and rec["level"] == "warning" and rec["timestamp"] == "2026-12-01T21:39:49.121351"
    assert rec["message"] == "Failed to create CUDAExecutionProvider."


def test_task_codes():
    assert task_code("[1002] -> 预处理耗时:0.359s") == "1002"
    assert task_code("[1002]init_wh result :[0.88]， cost: 8.38 s") == "1002"
    assert task_code(f"[{UUID}]任务视频驱动队列满，严重阻塞，下游队列异常") == UUID
    assert task_code("任务:1002 -> audio_url:a.wav  video_url:v.mp4") == "1002"
    assert task_code(">>> 任务:1002 耗时:59.34 ") == "1002"
    assert task_code("[%s] -> video frame shape is 4k, skip chaofen") is None
    assert task_code(">>> 数字人图片处理进程启动") is None


def test_lines_without_a_code_belong_to_the_running_task_and_tracebacks_to_the_record_before():
    entries = {e.lineno: e for e in _fixture_entries()}
    assert entries[1].task is None  # before any task
    assert entries[14].kind == "text" and entries[14].task == "1001"  # a bare print during 1001
    assert entries[21].task == "1001"  # drivered_video's progress line has no code
    tb = entries[49]
    assert tb.kind == "traceback" and tb.task == "1003" and len(tb.lines) == 6
    assert tb.record["exception"].startswith("RuntimeError: CUDA out of memory")
    empty = entries[61]
    assert empty.kind == "traceback" and empty.task == "1004" and empty.record["exception"] == "_queue.Empty"
    assert [h.alert for h in empty.hits] == ["queue_empty"]
    assert empty.hits[0].where == 'File "/opt/conda/envs/py38/lib/python3.8/multiprocessing/queues.py", line 108, in get'
    assert entries[74].task == "1004"  # a late init_wh of an ended task starts nothing
    assert entries[80].task == UUID


def test_signatures_found_on_the_fixture():
    hits = [(h.lineno, h.alert, h.task) for e in _fixture_entries() for h in e.hits]
    assert hits == [
        (2, "cpu_fallback", None), (3, "cpu_fallback", None), (5, "cpu_fallback", None), (6, "cpu_fallback", None),
        (54, "gpu_oom", "1003"), (55, "gpu_oom", "1003"), (56, "gpu_oom", "1003"),
        (65, "queue_empty", "1004"), (72, "job_failed", "1004"),
        (78, "warmup_slow", UUID), (81, "queue_full", UUID),
    ]
    warm = next(h for e in _fixture_entries() for h in e.hits if h.alert == "warmup_slow")
    assert warm.value == 110.42 and "110.42 s" in warm.what()


@pytest.mark.parametrize("line, alert", [
    # ONNX Runtime's own texts (provider_bridge_ort.cc, onnxruntime_pybind_state.cc,
    # onnxruntime_inference_collection.py), old and new spellings
    ("/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
     "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
     "/venv/lib/python3.8/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: "
     "libcublasLt.so.11: cannot open shared object file: No such file or directory", "cpu_fallback"),
    ("CUDA_PATH is set but CUDA wasn't able to be loaded. Please install the correct version of CUDA and cuDNN", "cpu_fallback"),
    ("CUDA_PATH is set but CUDA wasnt able to be loaded. Please install the correct version of CUDA andcuDNN", "cpu_fallback"),
    ("Failed to create CUDAExecutionProvider. Please reference https://onnxruntime.ai/docs/execution-providers/"
     "CUDA-ExecutionProvider.html#requirements to ensure all dependencies are met.", "cpu_fallback"),
    ("Falling back to ['CPUExecutionProvider'] and retrying.", "cpu_fallback"),
    ("torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB", "gpu_oom"),
    ("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", "gpu_oom"),
    ("onnxruntime.capi.onnxruntime_pybind11_state.RuntimeException: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : "
     "Non-zero status code returned while running Conv node. Name:'Conv_0' Status Message: "
     "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* onnxruntime::BFCArena::AllocateRawInternal"
     "(size_t, bool, onnxruntime::Stream*, bool, onnxruntime::WaitNotificationFn) Failed to allocate memory for "
     "requested buffer of size 268435456", "gpu_oom"),
    ("BFCArena::AllocateRawInternal: Available memory of 5513472 is smaller than requested bytes of 20751872", "gpu_oom"),
    ("[2025-03-18 12:52:13,066] [run.py[line:158]] [ERROR] [[1002]任务执行失败，异常信息:[boom]]", "job_failed"),
    ("[2025-03-18 12:52:13,066] [run.py[line:158]] [ERROR] [[1002]任务视频驱动队列满，严重阻塞，下游队列异常]", "queue_full"),
    ("_queue.Empty", "queue_empty"),
])
def test_catalogue_matches_the_real_texts(line, alert):
    (entry,) = _entries(line)
    assert [h.alert for h in entry.hits] == [alert]


def test_not_a_signature():
    assert not _entries("Falling back to default BFCArena with CUDA allocator.")[0].hits
    # a warm-up within upstream's 60 s queue timeout is no finding
    assert not _entries("[2025-03-18 12:52:20,087] [process.py[line:108]] [INFO] [[1002]init_wh result :[0.88]， cost: 59.9 s]")[0].hits
    assert not _entries('{"event": "alert", "alert": "queue_full", "evidence": {"line": "队列满"}}')[0].hits  # ours


def test_catalogue_names_are_alerts_with_fixes():
    for sig in SIGNATURES:
        assert sig.alert in ALERTS and sig.fix_text() and sig.severity in ("warning", "critical")
    assert {"queue_empty", "gpu_oom", "warmup_slow"} <= set(FIXES)


def test_real_onnxruntime_fallback_is_recognised(tmp_path):
    """ONNX Runtime's own stderr when a session asks for CUDA that cannot load (this host or a
    GPU host whose CUDA libraries are missing); skipped where CUDA really works."""
    script = ("import onnxruntime as ort; from tests.onnx_models import conv_model\n"
              "s = ort.InferenceSession(conv_model(), providers=['CUDAExecutionProvider', 'CPUExecutionProvider'])\n"
              "print(s.get_providers())\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    if "CUDAExecutionProvider" in run.stdout:
        pytest.skip("CUDA loads on this host: no fallback to read")
    hits = [h for e in _entries(run.stderr) for h in e.hits]
    assert "cpu_fallback" in {h.alert for h in hits}, run.stderr


# ---- tasks -------------------------------------------------------------------------------------

def test_task_book_on_the_fixture():
    book = TaskBook()
    for entry in _fixture_entries():
        book.feed(entry)
    tasks = {t.code: t for t in book.rows()}
    assert list(tasks) == ["1001", "1002", "1003", "1004", UUID]
    ok = tasks["1001"]
    assert (ok.outcome, ok.preprocess_s, ok.audio_features_s, ok.warmup_s, ok.batch_size, ok.frames, ok.total_s) == \
        ("succeeded", 0.359, 2.24, 8.38, 4, 150, 59.34)
    assert ok.result == "/code/data/temp/1001-r.mp4" and ok.started == "2025-03-18T12:45:00.010" and ok.reason is None
    assert tasks["1002"].outcome == "succeeded" and tasks["1002"].frames == 75
    oom = tasks["1003"]
    assert oom.outcome == "failed" and oom.reason.startswith("RuntimeError: CUDA out of memory")
    assert (oom.frames_done, oom.frames) == (4, 300)
    empty = tasks["1004"]  # 任务执行失败 with an empty reason: the traceback before it says why
    assert empty.outcome == "failed" and empty.reason == "_queue.Empty" and empty.total_s == 13.07
    stuck = tasks[UUID]
    assert stuck.outcome == "running" and stuck.warmup_s == 110.42 and (stuck.frames_done, stuck.frames) == (40, 150)
    assert stuck.reason == "任务视频驱动队列满，严重阻塞，下游队列异常"
    assert stuck.to_dict()["alerts"] == ["warmup_slow", "queue_full"]


def test_failure_reason_from_the_failure_line():
    book = TaskBook()
    for entry in _entries("[2025-03-18 12:50:00,000] [run.py[line:1]] [INFO] [任务:7 -> audio_url:a  video_url:v]\n"
                          "[2025-03-18 12:50:41,790] [run.py[line:158]] [ERROR] [[7]任务执行失败，异常信息:[format video error]]\n"):
        book.feed(entry)
    (task,) = book.rows()
    assert (task.outcome, task.reason) == ("failed", "format video error")


# ---- the daemon's LogWatch ----------------------------------------------------------------------

def _append(path: Path, *lines: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _book() -> AlertBook:
    return AlertBook(for_durations(RulesConfig()), repeat_s=RulesConfig().repeat_s)


def _tick(watch: LogWatch, book: AlertBook, now: float) -> list:
    """What the daemon does each tick with its LogWatch."""
    watch.read(now)
    return book.update(watch.conditions(now), now)


def test_queue_full_fires_at_the_first_read_with_no_patterns_configured(tmp_path):
    log = tmp_path / "dh.log"
    log.write_text("[2025-03-18 12:40:01,112] [trans_dh_service.py[line:611]] [INFO] [TransDhTask init]\n", encoding="utf-8")
    daemon = DaemonConfig(mode="external", command=["python", "app.py"], log_file=log)
    assert daemon.log_patterns == [] and daemon.log_builtin_patterns and daemon.log_quiet_s == 60.0
    watch, book = LogWatch.of(daemon), _book()
    assert _tick(watch, book, 1000.0) == []
    _append(log, QUEUE_FULL)
    events = _tick(watch, book, 1002.0)
    assert [(e.alert, e.key, e.state, e.severity) for e in events] == [("queue_full", UUID, "firing", "critical")]
    evidence = events[0].evidence
    assert evidence["line"] == QUEUE_FULL and evidence["task"] == UUID and evidence["file"] == str(log)
    assert "bigger queues" in evidence["fix"].lower() and events[0].fields()["fix"]
    # RulesConfig().queue_full_for_s (60 s) is for a probe's full queue, not for upstream's line
    assert RulesConfig().queue_full_for_s > 0


def test_log_alert_resolves_after_the_quiet_period(tmp_path):
    log = tmp_path / "dh.log"
    log.touch()
    watch, book = LogWatch.of(DaemonConfig(mode="external", log_file=log, log_quiet_s=30.0)), _book()
    _append(log, QUEUE_FULL)
    assert [e.state for e in _tick(watch, book, 100.0)] == ["firing"]
    assert _tick(watch, book, 110.0) == []  # still firing, no news
    _append(log, QUEUE_FULL)  # the same line again: the quiet period starts over
    assert _tick(watch, book, 125.0) == []
    assert _tick(watch, book, 154.0) == []  # 29 s quiet
    resolved = _tick(watch, book, 155.0)
    assert [(e.alert, e.state) for e in resolved] == [("queue_full", "resolved")]
    assert "no such line for 30 s" in resolved[0].summary and resolved[0].evidence["line"] == QUEUE_FULL
    assert _tick(watch, book, 156.0) == [] and watch.last_match == {}
    _append(log, QUEUE_FULL)  # happens again later: fires again
    assert [e.state for e in _tick(watch, book, 300.0)] == ["firing"]


def test_default_quiet_period_from_config(tmp_path):
    cfg = parse({"daemon": {"mode": "external", "log_file": str(tmp_path / "dh.log")}})
    assert cfg.daemon.log_quiet_s == 60.0
    assert parse({"daemon": {"log_quiet_s": 5}}).daemon.log_quiet_s == 5.0
    with pytest.raises(Exception, match=r"\[daemon\] log_quiet_s"):
        parse({"daemon": {"log_quiet_s": 0}})
    with pytest.raises(Exception, match=r"log_patterns.0.regex: not a regular expression"):
        parse({"daemon": {"log_patterns": [{"regex": "("}]}})


def test_each_task_and_signature_is_its_own_alert(tmp_path):
    log = tmp_path / "dh.log"
    log.touch()
    watch, book = LogWatch.of(DaemonConfig(mode="external", log_file=log)), _book()
    _append(log, *FIXTURE.read_text(encoding="utf-8").splitlines())
    events = _tick(watch, book, 10.0)
    assert sorted((e.alert, e.key) for e in events) == [
        ("cpu_fallback", "log"), ("gpu_oom", "1003"), ("job_failed", "1004"), ("queue_empty", "1004"),
        ("queue_full", UUID), ("warmup_slow", UUID)]
    assert all(e.state == "firing" for e in events)
    empty = next(e for e in events if e.alert == "queue_empty")
    assert empty.evidence["line"] == "_queue.Empty" and empty.evidence["where"].endswith("in get")


def test_traceback_split_across_reads(tmp_path):
    log = tmp_path / "dh.log"
    log.touch()
    watch, book = LogWatch.of(DaemonConfig(mode="external", log_file=log)), _book()
    _append(log, "[2025-03-18 12:52:00,000] [t.py[line:1]] [INFO] [任务:1004 -> audio_url:a  video_url:v]",
             "Traceback (most recent call last):", '  File "/code/service/trans_dh_service.py", line 823, in work')
    assert _tick(watch, book, 1.0) == []
    _append(log, '  File "/usr/lib/python3.8/multiprocessing/queues.py", line 108, in get', "    raise Empty", "_queue.Empty")
    assert [(e.alert, e.key) for e in _tick(watch, book, 3.0)] == [("queue_empty", "1004")]


def test_patterns_add_to_builtins_and_builtins_can_be_off(tmp_path):
    log = tmp_path / "dh.log"
    log.touch()
    custom = [LogPattern(regex="磁盘已满", alert="disk_low", severity="critical")]
    both = LogWatch.of(DaemonConfig(mode="external", log_file=log, log_patterns=custom))
    only = LogWatch.of(DaemonConfig(mode="external", log_file=log, log_patterns=custom, log_builtin_patterns=False))
    _append(log, QUEUE_FULL, "[2025-03-18 12:58:00,000] [x.py[line:1]] [ERROR] [磁盘已满]")
    for watch in (both, only):
        watch.read(5.0)
    assert sorted(c.alert for c in both.conditions(5.0)) == ["disk_low", "queue_full"]
    (custom_only,) = only.conditions(5.0)
    # a line without a code belongs to the task running then (the queue-full task never ended)
    assert (custom_only.alert, custom_only.key, custom_only.severity, custom_only.for_s) == ("disk_low", UUID, "critical", 0.0)
    assert custom_only.summary == f"log line matched /磁盘已满/ (task {UUID})" and "fix" not in custom_only.evidence
    assert [s.alert for s in signatures(custom, builtins=False)] == ["disk_low"]


def test_history_is_not_alerted_but_a_new_or_rotated_file_is_read_whole(tmp_path):
    log = tmp_path / "dh.log"
    log.write_text(QUEUE_FULL + "\n", encoding="utf-8")  # written before the daemon started
    watch, book = LogWatch.from_config(log), _book()
    assert _tick(watch, book, 1.0) == []
    log.rename(tmp_path / "dh.log.1")  # rotated: the new file is read from its start
    log.write_text(QUEUE_FULL + "\n", encoding="utf-8")
    assert [e.state for e in _tick(watch, book, 2.0)] == ["firing"]
    missing = LogWatch.from_config(tmp_path / "later.log")  # appears after the daemon started
    (tmp_path / "later.log").write_text(QUEUE_FULL + "\n", encoding="utf-8")
    assert missing.read(3.0) == 1


def test_traceback_cut_off_is_read_once_quiet(tmp_path):
    log = tmp_path / "dh.log"
    log.touch()
    watch, book = LogWatch.of(DaemonConfig(mode="external", log_file=log)), _book()
    _append(log, "Traceback (most recent call last):", '  File "/usr/lib/python3.8/multiprocessing/queues.py", line 108, in get',
            "    raise Empty")  # and its writer was killed
    assert _tick(watch, book, 10.0) == []
    assert _tick(watch, book, 12.0) == []  # its end may still come
    assert [(e.alert, e.state) for e in _tick(watch, book, 16.0)] == [("queue_empty", "firing")]
