"""The three stage processes of one replica: decode -> generate -> encode.

Each stage is a spawned process running one loop. Frames live in the replica's `FrameRing`;
queues carry `JobStart`, `FrameMsg` and `JobEnd` descriptors, in order, one job after another.

    decode    claims a job from the store, reads audio and template, finds the face box, writes
              frame + crop + audio features (computed a chunk of frames at a time) into a slot.
    generate  batches crops (default 4), runs the generator, writes the new crops into the slots.
    encode    pastes each crop back and writes the frame (to ffmpeg, which encodes it with the
              audio as it comes; without ffmpeg to a silent video); a thread completes each job
              (the encoder's last frames, the store) while the loop goes on with the next one.

Jobs follow each other without a drain: decode claims the next job as soon as it has handed on
the last frame of the current one, while generate and encode are still on that job's frames.
Each stage splits its wall time on the board (`heygem.board.TIMES`: frames, or waiting for
input, output, a slot, a job, a job's start or end) and logs it per job (`job_times`).

Rules every loop follows:
- Every wait is bounded (`bounded`, `get_bounded`, `put_bounded`) and re-checks `stop` and the
  job's abort flag between slices; each slice also beats the stage's board row.
- A slot belongs to whoever holds its `FrameMsg`; a stage that drops a message releases it.
- Every frame a stage takes leaves its hands once, counted on its board row: handed on
  (`row.gave`) or dropped (`row.drop`: its job failed or was cancelled, or the stage is
  stopping). So a stage that holds nothing shows `items_in == items_out`, and a failed job
  leaves no "items in hand" behind for the watchdog's stall rule to find. A `FrameMsg` a stage
  gets from its input queue is taken (`row.took`) as soon as it arrives, even if it is dropped
  at once; decode takes a frame when it has a ring slot for it.
- Errors travel: the stage that fails a job marks it failed in the store with its reason and
  adds it to `aborts`; every stage then drops that job's messages. `decode` always closes a job
  with `JobEnd`, so the stages downstream know when the job's messages end.
- A job is finished only through the store, which refuses a worker that lost the lease: a
  replica that was presumed dead cannot complete a job that was handed to another.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Union

import numpy as np

from heygem import failpoints, logs
from heygem.board import TIMES, Board
from heygem.channels import Channels, release_queues
from heygem.jobs import NAME_MAX, JobError, JobStore, worker_host
from heygem.ring import FrameRef, FrameRing, get_bounded, put_bounded
from heygem.tuning import HELPER_NICE, tune_process
from heygem.video import Encoding

STAGES = ("decode", "generate", "encode")
CROP = 256
FEATURES = (256, 20)
EXIT_FALLBACK = 78  # EX_CONFIG: sessions not on the requested provider and fallback = "fail"
POLL_S = 0.1
CANCEL_CHECK_S = 0.5
# An idle decode asks the store for a job this often: a new job waits 25 ms on average, for
# about 20 empty read transactions a second per replica.
CLAIM_POLL_S = 0.05
# How long a stopping encode stage still waits for a job completion under way (mux, store).
COMPLETE_GRACE_S = 10.0
# heygem.video names its own temp file after the file it is given, adding "." + "." + pid (at
# most 7 digits on Linux) + ".partial" (".mux" for the muxer): the most a name grows there.
WRITER_ROOM = len("." + ".4194304" + ".partial")


@dataclass(frozen=True)
class StageSpec:
    """Everything a stage process needs, picklable for spawn."""

    replica: int
    device: Union[int, str]
    worker: str  # lease holder name, unique per replica incarnation
    store: JobStore
    board_name: str
    models: dict  # role -> model path (str)
    fallback: str
    batch_size: int
    lease_s: float
    max_width: int
    max_height: int
    face_box: Optional[tuple]
    output_dir: str
    threads: Optional[int] = None  # the generator's intra-op threads (CPU replicas share the cores)
    encoding: Encoding = Encoding()  # the outputs' H.264: x264 preset, crf, threads
    supervisor: int = 0  # pid of the process that spawned the stage (read there, not in the child)


class JobStart(NamedTuple):
    job: int
    code: str  # the job's client code (failpoints may name it)
    fps: float
    size: tuple  # (width, height)
    frames: int
    audio: str
    output: str
    reference: np.ndarray  # the reference crop, [256, 256, 3] uint8, once per job


class FrameMsg(NamedTuple):
    ref: FrameRef
    placement: object  # heygem.face.Placement


class JobEnd(NamedTuple):
    job: int
    frames: int  # frames decode sent; fewer than planned means the job was aborted


def slot_bytes(max_width: int, max_height: int) -> int:
    """One ring slot: a full frame, then the crop, then the frame's audio features."""
    return max_width * max_height * 3 + CROP * CROP * 3 + FEATURES[0] * FEATURES[1] * 4


class SlotViews(NamedTuple):
    frame: np.ndarray
    crop: np.ndarray
    features: np.ndarray


def views(ring: FrameRing, slot: int, height: int, width: int) -> SlotViews:
    """Zero-copy views of one slot's three parts."""
    raw = ring.view(slot, (ring.slot_bytes,))
    f_end = height * width * 3
    c_end = f_end + CROP * CROP * 3
    return SlotViews(
        raw[:f_end].reshape(height, width, 3),
        raw[f_end:c_end].reshape(CROP, CROP, 3),
        raw[c_end : c_end + FEATURES[0] * FEATURES[1] * 4].view(np.float32).reshape(FEATURES),
    )


class Clock:
    """Splits a stage's wall time into `heygem.board.TIMES`. Each span is charged as it ends
    (`lap(kind)`: the time since the previous lap was spent on `kind`), to the board row (since
    the process started) and to the job in hand (`job_times`, logged when the job ends)."""

    def __init__(self, row):
        self.row = row
        self.at = time.perf_counter()
        self.job: dict[str, float] = {}

    def lap(self, kind: str) -> None:
        now = time.perf_counter()
        spent, self.at = now - self.at, now
        self.row.spend(kind, spent)
        self.job[kind] = self.job.get(kind, 0.0) + spent

    def job_times(self) -> dict[str, float]:
        """The job's seconds per kind so far; the count starts again for the next job."""
        out, self.job = self.job, {}
        return {kind: round(out[kind], 4) for kind in TIMES if kind in out}


class Stage:
    """Shared behaviour of the three stage loops: board row, bounded queue I/O, job failure."""

    name = ""

    def __init__(self, spec: StageSpec, ch: Channels):
        self.spec, self.ch = spec, ch
        self.log = logs.get("pipeline").bind(replica=spec.replica, stage=self.name, worker=spec.worker)
        self.board = Board.attach(spec.board_name)
        self.row = self.board.row(spec.replica, self.name)
        self.clock = Clock(self.row)
        self.doing = "claim"  # what the stage does between waits: "claim", "start", "work" or "end"
        # A shared store (PostgreSQL) is seen through a view that rides out its outages: the job in
        # hand is finished, no new one is claimed (heygem.jobs.WorkerStore). SQLite: the store itself.
        self.store = spec.store.for_worker(self.stopping, self.log)
        # The spawner's pid, not getppid(): a stage born after its supervisor died already has
        # a new parent and would never notice.
        self.parent = spec.supervisor or os.getppid()
        self._renewed = 0.0
        self._checked = 0.0
        self.failpoints = failpoints.Failpoints()  # loaded in run(): a bad value is a fatal error

    # -- loop helpers -------------------------------------------------------------------------
    def stopping(self) -> bool:
        """Beat, and say whether to leave the loop: told to stop, or orphaned. A supervisor that
        was SIGKILLed cannot set the flag; a stage that outlived it would go on claiming jobs
        and holding the GPU, so a new parent (re-parenting) means stop."""
        self.row.beat()
        if os.getppid() != self.parent:
            self.ch.stop.set()
        return self.ch.stop.is_set()

    def gone(self, job: int) -> bool:
        """Has `job` failed in another stage or been cancelled? The store is asked at most every
        CANCEL_CHECK_S; a cancellation found there is shared with the other stages."""
        if job in self.ch.aborts:
            return True
        now = time.monotonic()
        if now - self._checked < CANCEL_CHECK_S:
            return False
        self._checked = now
        if self.store.cancelled(job):
            self.ch.aborts.add(job)
            self.log.info("job_cancelled", job=job)
            return True
        return False

    def now_doing(self, doing: str) -> None:
        """Charge the time since the last lap to what the stage was doing, and switch."""
        self.clock.lap(self.doing)
        self.doing = doing

    def waiting(self, kind: str):
        """A `should_stop` for a bounded wait that charges every slice of it to `kind`."""

        def check() -> bool:
            self.clock.lap(kind)
            return self.stopping()

        return check

    def put(self, q, item, job: Optional[int] = None) -> bool:
        """Put until it fits; False when stopping or the job was aborted meanwhile.

        Waiting here is backpressure, not a stall: the row says so, and keeps beating. The time
        is charged to "output"."""
        self.clock.lap(self.doing)
        check = self.waiting("output")
        try:
            while not self.stopping():
                if job is not None and self.gone(job):
                    return False
                if put_bounded(q, item, timeout=1.0, should_stop=check, poll=POLL_S):
                    self.row.set_depth(q.qsize())
                    return True
                self.row.set_state("backpressure")
            return False
        finally:
            self.clock.lap("output")

    def get(self, q, timeout: float = 1.0, kind: str = "input"):
        """The next message or None (timeout, stop); the wait is charged to `kind`."""
        self.clock.lap(self.doing)
        try:
            return get_bounded(q, timeout, should_stop=self.waiting(kind), poll=POLL_S)
        finally:
            self.clock.lap(kind)

    def log_times(self, job: int, **extra) -> None:
        """Log where this stage's time went for `job` (and start counting the next one)."""
        self.clock.lap(self.doing)
        self.log.info("job_times", job=job, **self.clock.job_times(), **extra)

    def event(self, kind: str, payload=None) -> None:
        put_bounded(self.ch.events, (kind, self.name, payload), timeout=5.0)

    def renew(self, job: int) -> None:
        """Keep the job's lease while working on it (every third of the lease)."""
        now = time.time()
        if now - self._renewed >= self.spec.lease_s / 3:
            self.store.renew(job, self.spec.worker, self.spec.lease_s, now=now)
            self._renewed = now

    def fail(self, job: int, reason: str) -> None:
        """Fail `job` everywhere: the store (with the reason), and every stage of this replica."""
        self.ch.aborts.add(job)
        try:
            self.store.fail(job, self.spec.worker, f"{self.name}: {reason}")
        except JobError as err:  # already failed, cancelled or requeued elsewhere
            self.log.info("job_fail_ignored", job=job, reason=reason, why=str(err))
            return
        self.log.warning("job_failed", job=job, reason=reason)
        self.event("job", {"job": job, "state": "failed", "reason": reason})

    def release(self, msg: FrameMsg) -> None:
        self.ch.ring.release(msg.ref.slot)

    def drop(self, msgs: Iterable[FrameMsg]) -> None:
        """Let go of taken frames that will not be handed on: free their slots, count them dropped."""
        for msg in msgs:
            self.release(msg)
            self.row.drop(1)

    def open(self, role: str, threads: Optional[int] = 1):
        """A verified session for `role`, reported to the supervisor. Stage processes share the
        cores, so pools do not spin, and only the generator (the heavy model) gets more threads."""
        from heygem.providers import ProviderFallback, open_session

        try:
            session, check = open_session(self.spec.models[role], self.spec.device, fallback=self.spec.fallback,
                                          threads=threads, spinning=False)
        except ProviderFallback as err:  # report what the session really ran on, then refuse
            self.event("session", {"role": role, **err.check.to_dict()})
            raise
        self.event("session", {"role": role, **check.to_dict()})
        if check.fallback:
            self.log.warning("cpu_fallback", role=role, **check.to_dict())
        return session

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> int:
        from heygem.providers import ProviderFallback

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
        self.row.start()
        try:
            self.failpoints = failpoints.load(self.name, STAGES)
            self.setup()
            self.event("ready")
            self.row.set_state("idle")
            self.loop()
            self.row.set_state("stopped")
            return 0
        except ProviderFallback as err:
            self.event("fatal", {"kind": "cpu_fallback", "reason": str(err), "check": err.check.to_dict()})
            self.row.set_state("failed")
            return EXIT_FALLBACK
        except Exception as err:  # a bug or a broken model: report it, let the supervisor restart
            self.event("fatal", {"kind": "crash", "reason": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()})
            self.row.set_state("failed")
            return 1
        finally:
            self.board.close()
            release_queues(self.ch, orphaned=os.getppid() != self.parent)

    def setup(self) -> None:
        """Open sessions; runs before the stage reports ready."""

    def loop(self) -> None:
        raise NotImplementedError


class Decode(Stage):
    """Claims jobs and turns (audio, template) into ring slots of frame + crop + features."""

    name = "decode"

    def setup(self) -> None:
        self.encoder = self.open("audio_encoder")
        self.detector = self.open("detector") if self.spec.models.get("detector") else None

    def loop(self) -> None:
        while not self.stopping():
            self.now_doing("claim")
            if self.ch.drain.is_set():
                self.row.set_state("idle")
                self.ch.stop.wait(POLL_S)
                continue
            job = self.store.claim(self.spec.worker, self.spec.lease_s)
            if job is None:
                self.row.set_state("idle")
                self.ch.stop.wait(CLAIM_POLL_S)
                continue
            self.now_doing("start")
            self._renewed = time.time()
            self.row.set_job(job.id)
            self.row.set_state("busy")
            self.log.info("job_claimed", job=job.id, attempt=job.attempts)
            sent = 0
            try:
                sent = self.decode(job)
            except Exception as err:  # any error in this job fails this job alone
                self.fail(job.id, _reason(err))
            finally:
                self.put(self.ch.to_generate, JobEnd(job.id, sent))
                self.row.set_job(None)
                self.log_times(job.id)

    def decode(self, job) -> int:
        from heygem import audio, face, video

        spec = self.spec
        if self.elsewhere(job):
            return 0
        self.store.progress(job.id, spec.worker, 10, "features")
        info = video.probe(job.video, spec.max_width, spec.max_height)
        samples, sr = audio.load_audio(job.audio)
        try:
            plan = audio.frame_plan(len(samples) / sr, info.frames, info.fps)
        except audio.AudioError as err:
            raise audio.AudioError(f"{job.audio}: {err}") from None
        feats = audio.FeatureStream(self.encoder, samples, sr, len(plan), info.fps)  # a chunk at a time
        self.store.progress(job.id, spec.worker, 20, "frames")
        box = None
        output = job.output or str(Path(spec.output_dir) / f"job-{job.id}.mp4")
        sent = 0
        for i, (index, frame) in enumerate(zip(plan, video.read_frames(job.video, plan))):
            if self.gone(job.id) or self.stopping():
                break
            self.renew(job.id)
            if box is None or self.detector is not None:
                box = self.face_box(job, frame, index)
            crop, placement = face.crop(frame, box)
            if i == 0:
                start = JobStart(job.id, job.code, info.fps, (info.width, info.height), len(plan), job.audio, output,
                                 crop)
                if not self.put(self.ch.to_generate, start, job.id):
                    break
                self.doing = "work"
            slot = self.acquire(job.id)
            if slot is None:
                break
            msg = FrameMsg(FrameRef(slot, job.id, i, frame.shape), placement)
            self.row.took(1)
            try:
                part = views(self.ch.ring, slot, info.height, info.width)
                part.frame[:] = frame
                part.crop[:] = crop
                part.features[:] = feats[i]
                if self.failpoints:
                    self.failpoints.check(job.code, i, len(plan))
                handed = self.put(self.ch.to_generate, msg, job.id)
            except BaseException:
                self.drop([msg])
                raise
            if not handed:
                self.drop([msg])
                break
            self.row.gave(1)
            self.row.set_state("busy")
            sent += 1
        return sent

    def elsewhere(self, job) -> bool:
        """A shared store: a job whose input this host cannot see goes back to the queue for
        another host, the reason recorded (it fails only once its attempts are used up). On one
        host (SQLite) a missing input fails the job as any unreadable input does."""
        missing = self.store.shared and [p for p in (job.audio, job.video) if not os.path.exists(p)]
        if not missing:
            return False
        reason = f"input missing on {worker_host(self.spec.worker)}: {', '.join(missing)}"
        after = self.store.release(job.id, self.spec.worker, reason)
        self.log.warning("job_released", job=job.id, reason=reason, state=after.state, attempts=after.attempts)
        self.event("job", {"job": job.id, "state": "released" if after.state == "queued" else "failed",
                           "reason": after.reason})
        return True

    def face_box(self, job, frame, index: int) -> tuple:
        from heygem import face

        if self.detector is not None:
            box = face.detect(self.detector, frame)
            if box is None:
                raise face.FaceError(f"{job.video}: no face found in frame {index}")
            return box
        if self.spec.face_box is None:
            raise face.FaceError("no detector model and no [pipeline] face_box configured")
        try:
            return face.fixed_box(self.spec.face_box, frame.shape)
        except face.FaceError as err:
            raise face.FaceError(f"{job.video}: {err}") from None

    def acquire(self, job: int) -> Optional[int]:
        """A free slot; waits (as backpressure, beating) while the ring is full."""
        self.clock.lap(self.doing)
        check = self.waiting("slot")
        try:
            while not self.stopping():
                if self.gone(job):
                    return None
                slot = self.ch.ring.acquire(job, timeout=1.0, should_stop=check, poll=POLL_S)
                if slot is not None:
                    return slot
                self.row.set_state("backpressure")
            return None
        finally:
            self.clock.lap("slot")


class Generate(Stage):
    """Runs the generator on batches of crops, in place in the ring slots."""

    name = "generate"

    def setup(self) -> None:
        from heygem.batch import Batch

        self.session = self.open("generator", threads=self.spec.threads)
        self.buffers = Batch(self.spec.batch_size)
        self.started: Optional[JobStart] = None  # the job whose reference crop the buffers hold
        self.batches = self.partial = 0  # the job's generator calls, and those on fewer than batch_size crops

    def loop(self) -> None:
        batch: list[FrameMsg] = []
        while not self.stopping():
            msg = self.get(self.ch.to_generate, timeout=0.02 if batch else 1.0,
                           kind="claim" if self.doing == "claim" else "input")
            if msg is None:
                batch = self.flush(batch)
                self.row.set_state("idle")
                continue
            if isinstance(msg, FrameMsg):
                self.row.took(1)
                if self.gone(msg.ref.job):
                    self.drop([msg])
                    continue
                batch.append(msg)
                if len(batch) >= self.spec.batch_size:
                    batch = self.flush(batch)
                continue
            batch = self.flush(batch)
            if isinstance(msg, JobStart):
                self.now_doing("start")
                self.buffers.set_reference(msg.reference)
                self.started = msg
                self.row.set_job(msg.job)
                self.put(self.ch.to_encode, msg)
                self.doing = "work"
            elif isinstance(msg, JobEnd):
                self.now_doing("end")
                self.row.set_job(None)
                self.put(self.ch.to_encode, msg)
                self.log_times(msg.job, batches=self.batches, partial_batches=self.partial)
                self.batches = self.partial = 0
                self.doing = "claim"
            else:
                self.put(self.ch.to_encode, msg)
        self.drop(batch)  # stopping

    def flush(self, batch: list[FrameMsg]) -> list[FrameMsg]:
        """Generate the batch's crops and hand them on; returns the (empty) new batch."""
        from heygem.models import infer

        aborted = [m.ref.job in self.ch.aborts for m in batch]  # one look: another stage may add a job
        self.drop([m for m, gone in zip(batch, aborted) if gone])
        batch = [m for m, gone in zip(batch, aborted) if not gone]
        if not batch:
            return []
        job = batch[0].ref.job
        self.row.set_state("busy")
        try:
            h, w = batch[0].ref.shape[:2]
            start = self.started
            if start is None or job != start.job:
                raise RuntimeError(f"frames of job {job} arrived without the job's start")
            if self.failpoints:
                for m in batch:
                    self.failpoints.check(start.code, m.ref.index, start.frames)
            parts = [views(self.ch.ring, m.ref.slot, h, w) for m in batch]
            crops = [p.crop for p in parts]
            out = infer(self.session, "generator", self.buffers.inputs(crops, [p.features for p in parts]))
            self.buffers.outputs(out, crops)
            self.batches += 1
            self.partial += len(batch) < self.spec.batch_size
        except Exception as err:
            self.drop(batch)
            self.fail(job, _reason(err))
            return []
        for i, m in enumerate(batch):
            try:
                handed = self.put(self.ch.to_encode, m, job)
            except BaseException:
                self.drop(batch[i:])
                raise
            if not handed:
                self.drop(batch[i:])
                break
            self.row.gave(1)
        return []


class Encode(Stage):
    """Pastes crops back, writes the video, muxes the audio and completes the job.

    A job's completion (the mux, an ffmpeg run over the whole video, and the store's writes)
    runs in a thread of its own while the loop goes on with the next job's frames, so a job's
    end does not stall the replica: the ring and the queues would fill behind it and the
    generator would wait (measured: the mux of a 100-frame 640x360 job took 0.45 s, as long as
    its frames). One completion at a time, in job order; the loop waits (bounded, charged to
    "end") only when the previous one is still running as the next job ends. The thread holds
    no ring slot and writes no counter of the board row (one writer per row; a store waiting for
    its database may beat the row's heartbeat through `stopping`, a lone timestamp)."""

    name = "encode"

    def setup(self) -> None:
        self.writer = None
        self.start: Optional[JobStart] = None
        self._progress_at = 0.0
        self.completing: Optional[threading.Thread] = None

    def loop(self) -> None:
        while not self.stopping():
            msg = self.get(self.ch.to_encode, kind="claim" if self.doing == "claim" else "input")
            if msg is None:
                self.row.set_state("idle")
                continue
            try:
                self.handle(msg)
            except Exception as err:  # handle() has let go of the message's slot already
                self.abort_writer()
                self.fail(msg.ref.job if isinstance(msg, FrameMsg) else msg.job, _reason(err))
            if isinstance(msg, JobEnd):
                self.log_times(msg.job)
                self.doing = "claim"
        self.abort_writer()
        self.completed(COMPLETE_GRACE_S)  # a completion under way may still finish its job

    def handle(self, msg) -> None:
        from heygem import face, video

        if isinstance(msg, JobStart):
            self.now_doing("start")
            self.abort_writer()
            self.start = msg
            self.row.set_job(msg.job)
            video.make_output_folder(msg.output)
            # Named after the job: the previous job's completion may still hold a file of the same output.
            self.writer = video.open_writer(temp_path(Path(msg.output), f"video-{msg.job}"), msg.fps, msg.size,
                                            audio=msg.audio, encoding=self.spec.encoding)
            self.now_doing("work")
            return
        if isinstance(msg, FrameMsg):
            job = msg.ref.job
            self.row.took(1)
            written = False
            try:
                start = self.start
                if self.gone(job) or self.writer is None or start is None or start.job != job:
                    return  # a failed or cancelled job's frame: dropped
                self.row.set_state("busy")
                if self.failpoints:
                    self.failpoints.check(start.code, msg.ref.index, start.frames)
                h, w = msg.ref.shape[:2]
                part = views(self.ch.ring, msg.ref.slot, h, w)
                self.writer.write(face.paste(part.frame, part.crop, msg.placement))
                written = True
            finally:
                self.release(msg)
                if written:
                    self.row.gave(1)
                else:
                    self.row.drop(1)
            self.renew(job)
            self.report(job)
            return
        self.finish(msg)

    def report(self, job: int) -> None:
        now = time.monotonic()
        if now - self._progress_at >= 0.5:
            self._progress_at = now
            pct = 20 + int(70 * self.writer.frames / max(1, self.start.frames))
            self.store.progress(job, self.spec.worker, min(pct, 89), "frames")

    def finish(self, end: JobEnd) -> None:
        self.now_doing("end")
        start, writer = self.start, self.writer
        self.start = self.writer = None
        try:
            if writer is None or start is None or start.job != end.job or self.gone(end.job):
                if writer is not None:
                    writer.abort()
                return
            if writer.frames != start.frames:
                writer.abort()
                if not self.store.cancelled(end.job) and not self.ch.stop.is_set():
                    self.fail(end.job, f"only {writer.frames} of {start.frames} frames arrived")
                return
            if not self.completed():  # the previous job's completion first: stopping
                writer.abort()
                return
            self.completing = threading.Thread(target=self.complete, args=(end.job, start, writer),
                                               name=f"complete-{end.job}", daemon=True)
            self.completing.start()
        finally:  # after a dropped job's writer and its temp file are gone (an encoder takes a moment)
            self.row.set_job(None)

    def completed(self, limit: Optional[float] = None) -> bool:
        """Wait for the completion under way, if any: True once there is none. Bounded: gives
        up (False) when the stage stops, or after `limit` s when given. The wait is "end"."""
        thread, began = self.completing, time.monotonic()
        while thread is not None and thread.is_alive():
            if limit is None and self.stopping() or limit is not None and time.monotonic() - began > limit:
                return False
            self.row.beat()
            thread.join(POLL_S)
            self.clock.lap("end")
        self.completing = None
        return True

    def complete(self, job: int, start: JobStart, writer) -> None:
        """(thread) Close the job's writer (an `EncodedWriter`: ffmpeg's last frames) or mux the
        audio under its silent video, and complete the job in the store. Any error fails the
        job, and nothing of it is left at or beside its output path."""
        from heygem import video

        began = time.perf_counter()
        final = Path(start.output)
        staged = done = temp_path(final, "done")
        try:
            self.store.progress(job, self.spec.worker, 90, "mux")
            done = writer.close()
            if writer.muxed:
                staged, muxed = done, True
            else:
                muxed = video.mux(done, start.audio, staged, encoding=self.spec.encoding)
            took = time.perf_counter() - began
            # the job may have been cancelled or handed elsewhere meanwhile: then no output
            self.store.renew(job, self.spec.worker, self.spec.lease_s)
            os.replace(staged, final)
            self.store.succeed(job, self.spec.worker, str(final))
        except Exception as err:
            writer.abort()
            for leftover in (done, staged):
                leftover.unlink(missing_ok=True)
            try:
                self.fail(job, _reason(err))
            except Exception as why:  # the store itself failing: the lease runs out, the job is requeued
                self.log.error("job_fail_failed", job=job, reason=_reason(err), why=_reason(why))
            return
        self.log.info("job_succeeded", job=job, frames=start.frames, output=str(final), muxed=muxed,
                      mux_s=round(took, 4), complete_s=round(time.perf_counter() - began, 4))
        self.event("job", {"job": job, "state": "succeeded", "frames": start.frames, "muxed": muxed})

    def abort_writer(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def temp_path(final: Path, tag: str) -> Path:
    """A hidden sibling of `final` for encode's intermediate files: `.<stem>.<tag><suffix>`.

    Short enough that heygem.video's own temp name for it (WRITER_ROOM bytes more) still fits a
    file name, so an output whose name fits NAME_MAX bytes (the store refuses longer ones) never
    fails on a name the pipeline made up. A stem too long for that is cut on a character
    boundary and ends in a hash of the whole name, so long names sharing a prefix do not collide.
    """
    suffix = final.suffix or ".mp4"
    room = NAME_MAX - WRITER_ROOM - len(os.fsencode(f".{tag}{suffix}")) - 1  # bytes left for the stem
    stem = final.stem
    if len(os.fsencode(stem)) > room:
        digest = "~" + hashlib.sha256(os.fsencode(final.name)).hexdigest()[:12]
        stem = os.fsencode(stem)[: room - len(digest)].decode("utf-8", "ignore") + digest
    return final.with_name(f".{stem}.{tag}{suffix}")


def _reason(err: BaseException) -> str:
    """One line for the job's `reason`: the error's own message, which names the culprit."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


KINDS = {cls.name: cls for cls in (Decode, Generate, Encode)}


def main(stage: str, spec: StageSpec, ch: Channels, log_json: bool = True, log_level: str = "info") -> None:
    """Entry point of a stage process (the target given to `Process`)."""
    import sys

    logs.configure(json=log_json, level=log_level, stream=sys.stderr)
    tune_process()
    if stage != "generate":
        os.nice(HELPER_NICE)
    sys.exit(KINDS[stage](spec, ch).run())
