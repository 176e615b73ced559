"""External mode with `[daemon] upstream_url`: the daemon in front of upstream's job API, durably.

Upstream (the `guiji2025/heygem.ai` container, the Linux Python port) keeps its tasks in process
memory: when it dies, hangs or blocks and is restarted, every task it held is gone. With
`upstream_url` set, the daemon serves `/easy/submit` and `/easy/query` on the clients' port
itself, stores every task in the job store before it answers, forwards tasks to upstream (moved
to another port) and answers queries from the store, which a follower keeps current from
upstream's own `/easy/query`. The client sees upstream's protocol unchanged; nothing is lost.

Threads. HTTP handler threads: `submit` (validate, store, wake the follower; never a call to
upstream) and `query` (one store read). One follower thread (`front`): every `upstream_poll_s`,
or at once when woken, it probes upstream, follows the tasks it holds there, and forwards the
next ones. Every call to upstream is bounded by `upstream_timeout_s`, so one pass takes at most
(held + 2) timeouts. The daemon's tick never calls upstream: it reads what the follower last
published (`ready`, `conditions`, `view`) and tells it about restarts (`on_action`), all
in-memory and lock-guarded, so the tick stays short whatever upstream does.

A forwarded task (the job store's claim is the task's one ticket: worker `upstream`, a lease the
follower renews every pass; if the follower stops renewing, the tick's lease expiry requeues)::

    queued --claim--> FORWARD --upstream 10000--> AT_UPSTREAM --status 2--> succeeded (result as given)
              (held)    |  10001 busy: retry          |  status 1: progress, lease renewed
                        |  no answer: unsure, query   |  status 3 / 9999: requeue (reason)
                        |    before submitting again  |  10004: upstream forgot it -> requeue
                        |  10002: failed (bad input)  |  no progress past the deadline: task_stalled
                        +------------- upstream restarted (TERM) -> requeue ----------+

`requeue` puts the task back at the head of the queue (claims take the oldest first), so after a
restart the tasks go again in their order, once upstream answers; it fails the task only after
`[pipeline] max_attempts` claims, with the last reason (upstream's own `msg` when it gave one).
A task is `succeeded` only on upstream's status 2 and stays so: the client never sees 2 then 1.

Flow control: at most `upstream_concurrency` tasks held at upstream; the rest wait in the store
with their position (`/metrics`, `snapshot.json`, `heygem-ops jobs`, `monitor`, and the `msg` of
`/easy/query`).

Stalls come from progress: when no task held at upstream has moved (progress or `msg`) for longer
than `Pace.deadline_s` (upstream runs them one after another, so one waiting in its own queue
behind a running one is not stalled), that is `task_stalled` (key "external"), which the
daemon's supervisor of the external unit turns into a restart on the unit's one budget. A queue
full line in upstream's log (`queue_full`, read since its current start) restarts it too, at
once: with the front its tasks are not lost by a restart. The deadline is learned on this
host: the median seconds per second of audio (or per task, when the audio cannot be read here)
of the tasks that succeeded, times `upstream_stall_margin`, never below `upstream_stall_floor_s`
(a cold start: model loading and upstream's warm-up come before the first progress).

Readiness: upstream is ready when it answers its API (a probe query; 10004 is an answer) since
its last start, not when its process exists. An upstream that stops answering for
`[rules] heartbeat_timeout_s` while it runs is `worker_hung` (key "external").
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import threading
import time
import wave
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from heygem import logs
from heygem.jobs import DuplicateCode, JobError, JobStore, LeaseLost
from watchdog.alerts import Condition
from watchdog.http import (BAD_PARAMETER, BUSY, NOT_FOUND, SUCCESS, SYSTEM_ERROR, BadParameter, parse_submit, query_data,
                           upstream)
from watchdog.upstream_api import Answer, Unreachable, UpstreamApi

WORKER = "upstream"  # worker names of tasks held at upstream: `upstream@<host>:<daemon pid>`
PROBE_CODE = "heygem-ops-readiness-probe"  # a code no client uses: upstream answers 10004
OFFICIAL_EXTRAS = {"chaofen": 0, "watermark_switch": 0, "pn": 1}  # what the desktop client sends
FIELDS = ("audio_url", "video_url", "code")
FORWARD, AT_UPSTREAM, DONE = "forward", "at_upstream", "done"
PACE_WINDOW = 20  # successes the learned pace is the median of
POSITIONS_SHOWN = 20  # waiting tasks listed by position in /metrics and the snapshot
MANY = 1 << 30

log = logs.get("front")


# ---- the learned pace (pure) -------------------------------------------------------------------

class Pace:
    """Seconds upstream needs on this host, per second of audio and per task, from the last
    `PACE_WINDOW` tasks that succeeded; and the deadline that makes a task stalled."""

    AUDIO, TASK = "s_per_audio_second", "s_per_task"

    def __init__(self, margin: float, floor_s: float, samples: Optional[dict] = None):
        self.margin, self.floor_s = margin, floor_s
        samples = samples or {}
        self.samples = {k: deque((float(x) for x in samples.get(k, ()) if x and x > 0), maxlen=PACE_WINDOW)
                        for k in (self.AUDIO, self.TASK)}

    def record(self, seconds: float, audio_s: Optional[float]) -> None:
        if seconds <= 0:
            return
        self.samples[self.TASK].append(seconds)
        if audio_s:
            self.samples[self.AUDIO].append(seconds / audio_s)

    def rate(self, unit: str) -> Optional[float]:
        values = self.samples[unit]
        return statistics.median(values) if values else None

    def expected_s(self, audio_s: Optional[float]) -> Optional[float]:
        """What a task of `audio_s` seconds of audio takes here, or None before any success."""
        per_audio = self.rate(self.AUDIO)
        if audio_s and per_audio:
            return per_audio * audio_s
        return self.rate(self.TASK)

    def deadline_s(self, audio_s: Optional[float]) -> float:
        """How long the task's progress may stand still: margin x expected, at least the floor."""
        expected = self.expected_s(audio_s)
        return self.floor_s if expected is None else max(self.floor_s, self.margin * expected)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in self.samples.items()}

    def view(self) -> dict:
        return {self.AUDIO: self.rate(self.AUDIO), self.TASK: self.rate(self.TASK),
                "samples": len(self.samples[self.TASK]), "margin": self.margin, "floor_s": self.floor_s}


# ---- one task held at upstream ---------------------------------------------------------------

@dataclass
class Held:
    job_id: int
    code: str
    audio: str
    video: str
    attempt: int
    generation: int  # upstream's incarnation (as the front counts them) it was sent to
    claimed_at: float
    last_change: float  # when its progress or msg last moved (or it was claimed / accepted)
    deadline_s: float
    phase: str = FORWARD
    unsure: bool = False  # a submit got no answer: upstream may hold it; query before sending again
    submitted_at: Optional[float] = None
    audio_s: Optional[float] = None
    progress: int = 0
    msg: str = ""
    result: Optional[str] = None  # upstream's status 2 result, while the store has not taken it


class Front:
    """The forwarder and follower of one daemon (see the module docstring)."""

    def __init__(self, api: UpstreamApi, store: JobStore, api_store: JobStore, *, state_dir: Path,
                 data_dir: Optional[Path] = None, concurrency: int = 1, poll_s: float = 1.0, lease_s: float = 30.0,
                 max_attempts: int = 3, margin: float = 3.0, floor_s: float = 300.0):
        self.api = api
        self.store = store  # the follower thread's own connection (short busy timeout)
        self.api_store = api_store  # the HTTP server's (closed after each request by its handler)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.concurrency, self.poll_s, self.lease_s, self.max_attempts = concurrency, poll_s, lease_s, max_attempts
        self.extras_dir = Path(state_dir) / "upstream-extras"
        self.pace_file = Path(state_dir) / "upstream-pace.json"
        self.pace = Pace(margin, floor_s, _read_json(self.pace_file))
        self.host = _host_name()
        self.worker = f"{WORKER}@{self.host}:{os.getpid()}"  # this daemon's claims (a fleet shares a store)
        self.held: dict[int, Held] = {}  # the follower thread's own
        self._lock = threading.Lock()  # guards what the tick and the follower share, below
        self.generation = 0
        self._epoch = time.time()  # answers to calls begun before this do not count (last TERM / START)
        self._down: Optional[str] = None  # why upstream is being restarted (TERM .. START)
        self._answered_at = 0.0  # when the last call that got an answer began
        self._probe_ok = False
        self._probe_error = "not probed yet"
        self._positions: dict[str, int] = {}
        self._view: dict = {}
        self.forwarded = self.resubmitted = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def of(cls, config, state_dir: Path, api_store: JobStore) -> "Front":
        d, p = config.daemon, config.pipeline
        api = UpstreamApi(d.upstream_url, d.upstream_timeout_s)
        busy_s = min(2.0, d.upstream_timeout_s)
        store = api_store.with_options(max_attempts=p.max_attempts, busy_timeout_s=busy_s)
        return cls(api, store, api_store, state_dir=state_dir, data_dir=d.data_dir, concurrency=d.upstream_concurrency,
                   poll_s=d.upstream_poll_s, lease_s=max(p.lease_s, 4 * d.upstream_poll_s + 8 * d.upstream_timeout_s),
                   max_attempts=p.max_attempts, margin=d.upstream_stall_margin, floor_s=d.upstream_stall_floor_s)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="front", daemon=True)
        self._thread.start()
        log.info("front_started", upstream=self.api.url, concurrency=self.concurrency, pace=self.pace.view())

    def stop(self, timeout_s: Optional[float] = None) -> bool:
        """Stop the follower (bounded); the tasks it held go back to the queue (upstream stops too)."""
        if self._thread is None:
            return True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s if timeout_s is not None else (self.concurrency + 3) * self.api.timeout_s + 2.0)
        return not self._thread.is_alive()

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                if first:
                    self._release_stale()
                    first = False
                self.step()
            except Exception as err:  # the follower must outlive any one bad pass
                log.exception("front_step_failed", error=f"{type(err).__name__}: {err}")
            self._wake.wait(self.poll_s)
            self._wake.clear()
        self._release_all("the daemon stopped and upstream with it")
        self.store.close()

    # ---- what the tick reads and tells (in memory, lock-guarded, never a call to upstream) -----
    def on_action(self, kind: str, why: str, now: float) -> None:
        """The supervisor's action on the external unit: TERM (upstream is going away: its tasks are
        lost and go back to the queue), START (a new incarnation: only its answers count)."""
        if kind not in ("term", "start"):
            return
        with self._lock:
            if kind == "term":
                self.generation += 1
                self._down = why or "restart"
            elif kind == "start":
                self._down = None
            self._epoch = now
            self._probe_ok = False
            self._probe_error = f"upstream restarting ({why})" if kind == "term" else "upstream starting"
        self._wake.set()

    def ready(self) -> bool:
        """Upstream answered its API since its last start, and the latest probe got an answer."""
        with self._lock:
            return self._down is None and self._probe_ok and self._answered_at > self._epoch

    def not_ready_reason(self) -> str:
        with self._lock:
            return self._probe_error

    def conditions(self, now: float, running: bool, heartbeat_timeout_s: float) -> list[Condition]:
        """task_stalled and worker_hung of the external unit; inactive unless upstream runs."""
        view = self._view
        with self._lock:
            generation, answered, epoch = self.generation, self._answered_at, self._epoch
        # Upstream runs its tasks one after another: it is stalled when none of those it holds has
        # moved for longer than the most any of them may take (a task waiting in upstream's own
        # queue behind a running one is not stalled).
        current = [h for h in view.get("held", ()) if h["generation"] == generation] if running else []
        idle = now - max((h["last_change"] for h in current), default=now)
        stalled = bool(current) and idle > max(h["deadline_s"] for h in current)
        if stalled:
            h = max(current, key=lambda h: (h["progress"], -h["job"]))
            summary = (f"task {h['code']} at upstream: progress {h['progress']} % ({h['msg'] or h['phase']}) has not moved "
                       f"for {idle:.0f} s; this host's deadline for it is {h['deadline_s']:.0f} s")
            evidence = {"code": h["code"], "job": h["job"], "progress": h["progress"], "msg": h["msg"],
                        "since_progress_s": round(idle, 3), "deadline_s": round(h["deadline_s"], 3),
                        "audio_s": h["audio_s"], "attempt": h["attempt"], "pace": view.get("pace")}
        else:
            summary, evidence = "every task at upstream progresses", {"held": len(view.get("held", ()))}
        silent = now - max(answered, epoch)
        hung = running and answered > epoch and silent > heartbeat_timeout_s
        return [
            Condition("task_stalled", "external", stalled, "critical", summary, evidence),
            Condition("worker_hung", "external", hung, "critical",
                      f"upstream's API at {self.api.url} has not answered for {silent:.0f} s",
                      {"silent_s": round(silent, 3), "timeout_s": heartbeat_timeout_s, "error": self._probe_error}),
        ]

    def fresh_log_line(self, logwatch, alert: str, key: str) -> bool:
        """A log line of `alert`/`key` was read after upstream's current incarnation started (a
        line of the old one, still firing for `log_quiet_s`, must not restart the new one)."""
        seen = logwatch.last_match.get((alert, key)) if logwatch is not None else None
        with self._lock:
            return seen is not None and self._down is None and seen[0] > self._epoch

    def view(self) -> dict:
        """For the snapshot (`front`) and `monitor`."""
        return self._view

    def position(self, code: str) -> Optional[int]:
        return self._positions.get(code)

    # ---- the API on the clients' port (HTTP handler threads) ----------------------------------
    def submit(self, body: bytes, accepting: bool) -> dict:
        """Upstream's /easy/submit: the task is in the store before the answer; forwarded later."""
        if not accepting:
            return upstream(BUSY, "busy: the service is stopping and takes no new tasks; submit again later")
        try:
            request, audio_url, video_url, code = parse_submit(body)
        except BadParameter as err:
            return upstream(BAD_PARAMETER, str(err))
        extras = {k: v for k, v in request.items() if k not in FIELDS}
        wrote = False
        if extras != OFFICIAL_EXTRAS:  # the official client's fields need no file
            try:
                _write_new(self.extras_dir / f"{code}.json", json.dumps(extras, ensure_ascii=False).encode())
                wrote = True
            except FileExistsError:
                return upstream(BAD_PARAMETER, f"code {code} is taken: a code is a task's id and cannot be reused")
        output = str(self.data_dir / f"{code}-r.mp4") if self.data_dir is not None else None
        try:
            job = self.api_store.submit(audio_url, video_url, output=output, code=code)
        except DuplicateCode:
            if wrote:
                (self.extras_dir / f"{code}.json").unlink(missing_ok=True)
            return upstream(BAD_PARAMETER, f"code {code} is taken: a code is a task's id and cannot be reused")
        log.info("job_submitted", code=code, job=job.id, audio=audio_url, video=video_url, to="upstream")
        self._wake.set()
        return upstream(SUCCESS, "success", {"code": code})

    def query(self, code: str) -> dict:
        """Upstream's /easy/query, from the store: `result` as upstream gave it."""
        if not code:
            return upstream(BAD_PARAMETER, "code is missing")
        job = self.api_store.by_code(code)
        if job is None:
            return upstream(NOT_FOUND, f"task {code} not found")
        data = query_data(job)
        if job.state == "queued":
            pos = self._positions.get(code)
            data["msg"] = f"waiting for upstream: position {pos}" if pos else "waiting for upstream"
        return upstream(SUCCESS, "", data)

    # ---- the follower (its own thread) ---------------------------------------------------------
    def step(self) -> None:
        """One pass: probe, drop what a restart lost, follow what upstream holds, forward more."""
        self._probe()
        with self._lock:
            generation, down = self.generation, self._down
        for h in [h for h in self.held.values() if h.generation < generation]:
            if h.phase == FORWARD and not h.unsure:  # never reached upstream: it keeps its turn
                h.generation, h.last_change = generation, time.time()
                continue
            self._requeue(h, f"upstream was restarted ({down or 'restart'}) and forgot the task")
        for h in list(self.held.values()):
            if self._stop.is_set():
                break
            self._follow(h)
        while len(self.held) < self.concurrency and self.ready() and not self._stop.is_set():
            job = self.store.claim(self.worker, self.lease_s)
            if job is None:
                break
            now = time.time()
            h = self.held[job.id] = Held(job.id, job.code, job.audio, job.video, job.attempts, generation, now, now,
                                         self.pace.deadline_s(None))
            self._forward(h)
        self._publish()

    def _probe(self) -> None:
        began = time.time()
        try:
            self.api.query(PROBE_CODE)
        except Unreachable as err:
            with self._lock:
                was, self._probe_ok, self._probe_error = self._probe_ok, False, f"upstream's API does not answer: {err}"
            if was:
                log.warning("upstream_unreachable", error=str(err))
            return
        self._answered(began)
        with self._lock:
            was = self._probe_ok
            self._probe_ok = began > self._epoch and self._down is None
            self._probe_error = "" if self._probe_ok else self._probe_error
            now_ok = self._probe_ok
        if now_ok and not was:
            log.info("upstream_ready", url=self.api.url)

    def _answered(self, began: float) -> None:
        with self._lock:
            self._answered_at = max(self._answered_at, began)

    def _call(self, fn, *args) -> Optional[Answer]:
        began = time.time()
        try:
            answer = fn(*args)
        except Unreachable:
            return None
        self._answered(began)
        return answer

    def _forward(self, h: Held) -> None:
        """Send the task (or, after a submit that got no answer, first ask whether upstream has it)."""
        if not self.ready():  # upstream (re)starting: the task keeps its turn and its lease
            return self._renew(h)
        if h.unsure:
            seen = self._call(self.api.query, h.code)
            if seen is None:
                return self._renew(h)
            if seen.code == SUCCESS:  # the lost answer's submit did arrive
                h.unsure = False
                self._accepted(h)
                return self._take(h, seen)
        payload = {"audio_url": h.audio, "video_url": h.video, "code": h.code, **self._extras(h.code)}
        answer = self._call(self.api.submit, payload)
        if answer is None:
            h.unsure = True
            return self._renew(h)
        h.unsure = False
        if answer.code == SUCCESS:
            self.forwarded += 1
            self.resubmitted += h.attempt > 1
            log.info("upstream_task_forwarded", code=h.code, job=h.job_id, attempt=h.attempt)
            return self._accepted(h)
        if answer.code == BUSY:
            return self._progress(h, 0, f"upstream busy: {answer.msg}" if answer.msg else "upstream busy")
        if answer.code == BAD_PARAMETER:  # upstream refuses the inputs: another try would too
            return self._end(h, "fail", f"upstream refused the task: {answer.msg or 'bad parameter'}")
        self._requeue(h, f"upstream: {answer.msg or f'code {answer.code}'}")

    def _accepted(self, h: Held) -> None:
        now = time.time()
        h.phase, h.submitted_at, h.last_change = AT_UPSTREAM, now, now
        if h.audio_s is None:
            h.audio_s = self._audio_seconds(h.audio)
        h.deadline_s = self.pace.deadline_s(h.audio_s)
        self._progress(h, 0, "sent to upstream")

    def _follow(self, h: Held) -> None:
        if h.phase == DONE:
            return self._succeed(h)
        if h.phase == FORWARD:
            return self._forward(h)
        answer = self._call(self.api.query, h.code)
        if answer is None or answer.code not in (SUCCESS, NOT_FOUND):
            return self._renew(h)  # no answer, or upstream's own trouble (9999): ask again next pass
        self._take(h, answer)

    def _take(self, h: Held, answer: Answer) -> None:
        """Upstream's /easy/query answer (10000 or 10004) for a task it was given."""
        if answer.code == NOT_FOUND:
            if self._output_written(h):  # it finished and told someone else (it answers 2 once)
                h.result = f"/{h.code}-r.mp4"
                return self._succeed(h)
            return self._requeue(h, "upstream no longer knows the task (it was restarted)")
        data = answer.data
        status = data.get("status")
        if status == 2:
            h.result = str(data.get("result") or "")
            h.phase = DONE
            return self._succeed(h)
        if status == 3:
            return self._requeue(h, f"upstream: {data.get('msg') or answer.msg or 'task failed'}")
        progress, msg = _percent(data.get("progress")), str(data.get("msg") or "")
        if (progress, msg) != (h.progress, h.msg):
            h.last_change = time.time()
        self._progress(h, progress, msg)

    def _progress(self, h: Held, pct: int, msg: str) -> None:
        h.progress, h.msg = max(h.progress, pct), msg
        try:
            self.store.progress(h.job_id, self.worker, h.progress, msg or "running at upstream", lease_s=self.lease_s)
        except LeaseLost as err:
            self._lost(h, err)
        except JobError as err:
            log.warning("front_store_error", code=h.code, error=str(err))
        except Exception as err:  # sqlite busy: the lease is long enough for the next pass
            log.warning("front_store_busy", code=h.code, error=str(err))

    def _renew(self, h: Held) -> None:
        try:
            self.store.renew(h.job_id, self.worker, self.lease_s)
        except LeaseLost as err:
            self._lost(h, err)
        except Exception as err:
            log.warning("front_store_busy", code=h.code, error=str(err))

    def _lost(self, h: Held, err: Exception) -> None:
        """Cancelled, or its lease expired and the tick requeued it: no longer ours to report."""
        log.warning("upstream_task_dropped", code=h.code, job=h.job_id, reason=str(err))
        self.held.pop(h.job_id, None)

    def _succeed(self, h: Held) -> None:
        try:
            self.store.succeed(h.job_id, self.worker, h.result or "")
        except LeaseLost as err:
            return self._lost(h, err)
        except Exception as err:  # kept in DONE: written on the next pass, never asked again
            log.warning("front_store_busy", code=h.code, error=str(err))
            return
        self.held.pop(h.job_id, None)
        took = time.time() - (h.submitted_at or h.claimed_at)
        self.pace.record(took, h.audio_s)
        self._save_pace()
        (self.extras_dir / f"{h.code}.json").unlink(missing_ok=True)
        log.info("upstream_task_succeeded", code=h.code, job=h.job_id, attempt=h.attempt, seconds=round(took, 3),
                 audio_s=h.audio_s, result=h.result)

    def _requeue(self, h: Held, reason: str) -> None:
        try:
            job = self.store.requeue(h.job_id, reason, worker=self.worker, max_attempts=self.max_attempts)
        except Exception as err:
            log.warning("front_store_busy", code=h.code, error=str(err))
            return
        self.held.pop(h.job_id, None)
        if job is None:
            log.warning("upstream_task_dropped", code=h.code, job=h.job_id, reason="no longer held")
        elif job.state == "failed":
            (self.extras_dir / f"{h.code}.json").unlink(missing_ok=True)
            log.error("upstream_task_failed", code=h.code, job=h.job_id, attempts=job.attempts, reason=job.reason)
        else:
            log.warning("upstream_task_requeued", code=h.code, job=h.job_id, attempt=h.attempt, reason=reason)

    def _end(self, h: Held, event: str, reason: str) -> None:
        try:
            self.store.fail(h.job_id, self.worker, reason)
        except LeaseLost as err:
            return self._lost(h, err)
        except Exception as err:
            log.warning("front_store_busy", code=h.code, error=str(err))
            return
        self.held.pop(h.job_id, None)
        (self.extras_dir / f"{h.code}.json").unlink(missing_ok=True)
        log.error("upstream_task_failed", code=h.code, job=h.job_id, attempts=h.attempt, reason=reason)

    def _release_stale(self) -> None:
        """Claims of a previous daemon on this host: its upstream is gone, so are the tasks it held
        (another host's claims are its own)."""
        for job in self.store.list("running", MANY):
            name, _, where = (job.worker or "").partition("@")
            if name == WORKER and where.rpartition(":")[0] == self.host and job.worker != self.worker:
                released = self.store.requeue(job.id, "the daemon restarted, and upstream with it", worker=job.worker,
                                              max_attempts=self.max_attempts)
                log.warning("upstream_task_requeued", code=job.code, job=job.id, reason="claim of a previous daemon",
                            state=released.state if released else None)

    def _release_all(self, reason: str) -> None:
        for h in list(self.held.values()):
            self._requeue(h, reason)

    def _publish(self) -> None:
        queued = sorted(self.store.list("queued", MANY), key=lambda j: j.id)
        self._positions = {job.code: i + 1 for i, job in enumerate(queued)}
        self._view = {
            "upstream": self.api.url, "ready": self.ready(), "generation": self.generation,
            "concurrency": self.concurrency, "outstanding": len(self.held), "waiting": len(queued),
            "positions": [{"code": job.code, "job": job.id, "position": i + 1} for i, job in enumerate(queued[:POSITIONS_SHOWN])],
            "held": [{"code": h.code, "job": h.job_id, "attempt": h.attempt, "phase": h.phase, "progress": h.progress,
                      "msg": h.msg, "generation": h.generation, "last_change": h.last_change,
                      "deadline_s": h.deadline_s, "audio_s": h.audio_s} for h in self.held.values()],
            "pace": self.pace.view(), "forwarded": self.forwarded, "resubmitted": self.resubmitted,
            "error": self.not_ready_reason() or None,
        }

    # ---- helpers ---------------------------------------------------------------------------------
    def _extras(self, code: str) -> dict:
        stored = _read_json(self.extras_dir / f"{code}.json")
        return dict(OFFICIAL_EXTRAS) if stored is None else stored

    def _local(self, name: str) -> Optional[Path]:
        """Where a file upstream names can be read here (its data folder is shared as data_dir)."""
        candidates = [Path(name)] if os.path.isabs(name) else []
        if self.data_dir is not None:
            candidates += [self.data_dir / name.lstrip("/"), self.data_dir / Path(name).name]
        return next((p for p in candidates if p.is_file()), None)

    def _audio_seconds(self, audio: str) -> Optional[float]:
        path = self._local(audio)
        if path is None:
            return None
        return audio_seconds(path)

    def _output_written(self, h: Held) -> bool:
        if self.data_dir is None or h.submitted_at is None:
            return False
        try:
            return (self.data_dir / f"{h.code}-r.mp4").stat().st_mtime >= h.submitted_at - 1.0
        except OSError:
            return False

    def _save_pace(self) -> None:
        from watchdog.state import write_json

        try:
            write_json(self.pace_file, self.pace.to_dict())
        except OSError as err:
            log.warning("pace_not_saved", error=str(err))

    # ---- Prometheus (registered on the daemon's registry) ----------------------------------------
    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        view = self._view
        yield GaugeMetricFamily("heygem_upstream_ready", "1 when upstream answers its API since its last start.",
                                value=1.0 if view.get("ready") else 0.0)
        yield GaugeMetricFamily("heygem_upstream_outstanding", "Tasks held at upstream (at most upstream_concurrency).",
                                value=view.get("outstanding", 0))
        yield GaugeMetricFamily("heygem_upstream_waiting", "Tasks waiting in the job store for upstream.",
                                value=view.get("waiting", 0))
        position = GaugeMetricFamily("heygem_upstream_queue_position", f"Position of the first {POSITIONS_SHOWN} waiting tasks.",
                                     labels=["code"])
        for p in view.get("positions", ()):
            position.add_metric([p["code"]], p["position"])
        yield position
        pace = view.get("pace") or {}
        rate = GaugeMetricFamily("heygem_upstream_learned_seconds", "Seconds upstream needs on this host, learned from "
                                 "succeeded tasks (median), per unit.", labels=["per"])
        for unit, label in ((Pace.AUDIO, "audio_second"), (Pace.TASK, "task")):
            if pace.get(unit) is not None:
                rate.add_metric([label], pace[unit])
        yield rate
        deadline = GaugeMetricFamily("heygem_upstream_stall_deadline_seconds", "How long each held task's progress may "
                                     "stand still before it is stalled.", labels=["code"])
        idle = GaugeMetricFamily("heygem_upstream_progress_age_seconds", "Since each held task's progress last moved.",
                                 labels=["code"])
        now = time.time()
        for h in view.get("held", ()):
            deadline.add_metric([h["code"]], h["deadline_s"])
            idle.add_metric([h["code"]], max(0.0, now - h["last_change"]))
        yield deadline
        yield idle
        yield CounterMetricFamily("heygem_upstream_forwarded", "Tasks upstream accepted.", value=view.get("forwarded", 0))
        yield CounterMetricFamily("heygem_upstream_resubmitted", "Tasks sent to upstream again after it lost them.",
                                  value=view.get("resubmitted", 0))


def audio_seconds(path: Path, timeout_s: float = 5.0) -> Optional[float]:
    """Seconds of audio in `path`: a WAV header, else ffprobe (bounded) when installed; None if unknown."""
    try:
        with wave.open(str(path), "rb") as w:
            rate = w.getframerate()
            return w.getnframes() / rate if rate else None
    except (wave.Error, EOFError, OSError):
        pass
    ffprobe = shutil.which("ffprobe")
    if not ffprobe:
        return None
    try:
        out = subprocess.run([ffprobe, "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
                             capture_output=True, text=True, timeout=timeout_s)
        value = float(out.stdout.strip())
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return None
    return value if value > 0 else None


def _host_name() -> str:
    """This host's name as worker names carry it (heygem.jobs' fleet naming, where it has one)."""
    try:
        from heygem.jobs import host_name
    except ImportError:
        import socket

        return socket.gethostname()
    return host_name()


def _percent(value) -> int:
    try:
        return max(0, min(100, int(float(value))))
    except (TypeError, ValueError):
        return 0


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` (FileExistsError if it exists) with `data`, on disk when this returns."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["Front", "Pace", "WORKER", "SYSTEM_ERROR"]
