"""The three stage processes of one replica: decode -> generate -> encode.

Each stage is a spawned process running one loop. Frames live in the replica's `FrameRing`;
queues carry `JobStart`, `FrameMsg` and `JobEnd` descriptors, in order, one job after another.

    decode    claims a job from the store, reads audio and template, computes audio features,
              finds the face box, writes frame + crop + features into a ring slot.
    generate  batches crops (default 4), runs the generator, writes the new crops into the slots.
    encode    pastes each crop back, writes the video (temp name), muxes audio, marks success.

Rules every loop follows:
- Every wait is bounded (`bounded`, `get_bounded`, `put_bounded`) and re-checks `stop` and the
  job's abort flag between slices; each slice also beats the stage's board row.
- A slot belongs to whoever holds its `FrameMsg`; a stage that drops a message releases it.
- Errors travel: the stage that fails a job marks it failed in the store with its reason and
  adds it to `aborts`; every stage then drops that job's messages. `decode` always closes a job
  with `JobEnd`, so the stages downstream know when the job's messages end.
- A job is finished only through the store, which refuses a worker that lost the lease: a
  replica that was presumed dead cannot complete a job that was handed to another.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np

from heygem import logs
from heygem.board import Board
from heygem.jobs import JobError, JobStore
from heygem.ring import FrameRef, FrameRing, get_bounded, put_bounded

STAGES = ("decode", "generate", "encode")
CROP = 256
FEATURES = (256, 20)
EXIT_FALLBACK = 78  # EX_CONFIG: sessions not on the requested provider and fallback = "fail"
POLL_S = 0.1
CANCEL_CHECK_S = 0.5
# An idle decode asks the store for a job this often: a new job waits 25 ms on average, for
# about 20 empty read transactions a second per replica.
CLAIM_POLL_S = 0.05


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
    supervisor: int = 0  # pid of the process that spawned the stage (read there, not in the child)


class JobStart(NamedTuple):
    job: int
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


class Aborts:
    """The ids of recently failed or cancelled jobs, shared by a replica's stages.

    A small ring of int64 in shared memory; each write is one aligned word, so readers need no
    lock. Eight entries are plenty: a stage only needs to recognise the jobs still in flight.
    """

    SIZE = 8

    def __init__(self, ctx):
        self._ids = ctx.Array("q", [-1] * (self.SIZE + 1), lock=False)  # last word: next index
        self._lock = ctx.Lock()

    def add(self, job: int) -> None:
        if job in self:
            return
        if not self._lock.acquire(timeout=5.0):
            raise RuntimeError("abort list lock held for 5 s")
        try:
            i = self._ids[self.SIZE]
            self._ids[i % self.SIZE] = job
            self._ids[self.SIZE] = (i + 1) % self.SIZE
        finally:
            self._lock.release()

    def __contains__(self, job: int) -> bool:
        return job in self._ids[: self.SIZE]


class Flag:
    """A process-shared boolean that can never wedge its setter.

    `multiprocessing.Event` is built on a Condition: `set()` waits, without a timeout, for each
    sleeping waiter to wake, so a stage killed inside `Event.wait()` makes the supervisor's
    `stop.set()` hang forever, and one killed inside `is_set()` leaves its lock taken. One
    shared byte, written and read without a lock, has neither failure; `wait` polls it.
    """

    def __init__(self, ctx):
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL_S / 2, left))
        return True


class Channels(NamedTuple):
    """The replica's shared plumbing, handed to each stage process at spawn."""

    ring: FrameRing
    to_generate: object  # multiprocessing queue
    to_encode: object
    events: object  # stage -> supervisor: ("session" | "ready" | "fatal" | "job", stage, payload)
    stop: Flag  # leave the loop now
    drain: Flag  # take no new job, finish the current one
    aborts: Aborts


class Stage:
    """Shared behaviour of the three stage loops: board row, bounded queue I/O, job failure."""

    name = ""

    def __init__(self, spec: StageSpec, ch: Channels):
        self.spec, self.ch = spec, ch
        self.log = logs.get("pipeline").bind(replica=spec.replica, stage=self.name, worker=spec.worker)
        self.board = Board.attach(spec.board_name)
        self.row = self.board.row(spec.replica, self.name)
        self.store = spec.store
        # The spawner's pid, not getppid(): a stage born after its supervisor died already has
        # a new parent and would never notice.
        self.parent = spec.supervisor or os.getppid()
        self._renewed = 0.0
        self._checked = 0.0

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

    def put(self, q, item, job: Optional[int] = None) -> bool:
        """Put until it fits; False when stopping or the job was aborted meanwhile.

        Waiting here is backpressure, not a stall: the row says so, and keeps beating."""
        while not self.stopping():
            if job is not None and self.gone(job):
                return False
            if put_bounded(q, item, timeout=1.0, should_stop=self.ch.stop.is_set, poll=POLL_S):
                self.row.set_depth(q.qsize())
                return True
            self.row.set_state("backpressure")
        return False

    def get(self, q, timeout: float = 1.0):
        return get_bounded(q, timeout, should_stop=self.stopping, poll=POLL_S)

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
            if self.ch.drain.is_set():
                self.row.set_state("idle")
                self.ch.stop.wait(POLL_S)
                continue
            job = self.store.claim(self.spec.worker, self.spec.lease_s)
            if job is None:
                self.row.set_state("idle")
                self.ch.stop.wait(CLAIM_POLL_S)
                continue
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

    def decode(self, job) -> int:
        from heygem import audio, face, video

        spec = self.spec
        self.store.progress(job.id, spec.worker, 10, "features")
        info = video.probe(job.video, spec.max_width, spec.max_height)
        samples, sr = audio.load_audio(job.audio)
        try:
            plan = audio.frame_plan(len(samples) / sr, info.frames, info.fps)
        except audio.AudioError as err:
            raise audio.AudioError(f"{job.audio}: {err}") from None
        feats = audio.features(self.encoder, audio.windows(audio.mel(samples, sr), len(plan), info.fps))
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
                start = JobStart(job.id, info.fps, (info.width, info.height), len(plan), job.audio, output, crop)
                if not self.put(self.ch.to_generate, start, job.id):
                    break
            slot = self.acquire(job.id)
            if slot is None:
                break
            part = views(self.ch.ring, slot, info.height, info.width)
            part.frame[:] = frame
            part.crop[:] = crop
            part.features[:] = feats[i]
            msg = FrameMsg(FrameRef(slot, job.id, i, frame.shape), placement)
            self.row.took(1)
            if not self.put(self.ch.to_generate, msg, job.id):
                self.release(msg)
                break
            self.row.gave(1)
            self.row.set_state("busy")
            sent += 1
        return sent

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
        while not self.stopping():
            if self.gone(job):
                return None
            slot = self.ch.ring.acquire(job, timeout=1.0, should_stop=self.ch.stop.is_set, poll=POLL_S)
            if slot is not None:
                return slot
            self.row.set_state("backpressure")
        return None


class Generate(Stage):
    """Runs the generator on batches of crops, in place in the ring slots."""

    name = "generate"

    def setup(self) -> None:
        from heygem.batch import Batch

        self.session = self.open("generator", threads=self.spec.threads)
        self.buffers = Batch(self.spec.batch_size)
        self.reference_of: Optional[int] = None  # the job whose reference crop the buffers hold

    def loop(self) -> None:
        batch: list[FrameMsg] = []
        while not self.stopping():
            msg = self.get(self.ch.to_generate, timeout=0.02 if batch else 1.0)
            if msg is None:
                batch = self.flush(batch)
                self.row.set_state("idle")
                continue
            if isinstance(msg, FrameMsg):
                if self.gone(msg.ref.job):
                    self.release(msg)
                    continue
                self.row.took(1)
                batch.append(msg)
                if len(batch) >= self.spec.batch_size:
                    batch = self.flush(batch)
                continue
            batch = self.flush(batch)
            if isinstance(msg, JobStart):
                self.buffers.set_reference(msg.reference)
                self.reference_of = msg.job
                self.row.set_job(msg.job)
            elif isinstance(msg, JobEnd):
                self.row.set_job(None)
            self.put(self.ch.to_encode, msg)
        for msg in batch:
            self.release(msg)

    def flush(self, batch: list[FrameMsg]) -> list[FrameMsg]:
        """Generate the batch's crops and hand them on; returns the (empty) new batch."""
        from heygem.models import infer

        for m in [m for m in batch if m.ref.job in self.ch.aborts]:
            self.release(m)
            batch.remove(m)
        if not batch:
            return []
        job = batch[0].ref.job
        self.row.set_state("busy")
        try:
            h, w = batch[0].ref.shape[:2]
            if job != self.reference_of:
                raise RuntimeError(f"frames of job {job} arrived without the job's start")
            parts = [views(self.ch.ring, m.ref.slot, h, w) for m in batch]
            crops = [p.crop for p in parts]
            out = infer(self.session, "generator", self.buffers.inputs(crops, [p.features for p in parts]))
            self.buffers.outputs(out, crops)
        except Exception as err:
            for m in batch:
                self.release(m)
            self.fail(job, _reason(err))
            return []
        for i, m in enumerate(batch):
            if not self.put(self.ch.to_encode, m, job):
                for rest in batch[i:]:
                    self.release(rest)
                break
            self.row.gave(1)
        return []


class Encode(Stage):
    """Pastes crops back, writes the video, muxes the audio and completes the job."""

    name = "encode"

    def setup(self) -> None:
        self.writer = None
        self.start: Optional[JobStart] = None
        self._progress_at = 0.0

    def loop(self) -> None:
        while not self.stopping():
            msg = self.get(self.ch.to_encode)
            if msg is None:
                self.row.set_state("idle")
                continue
            try:
                self.handle(msg)
            except Exception as err:  # handle() has released the message's slot already
                self.abort_writer()
                self.fail(msg.ref.job if isinstance(msg, FrameMsg) else msg.job, _reason(err))
        self.abort_writer()

    def handle(self, msg) -> None:
        from heygem import face, video

        if isinstance(msg, JobStart):
            self.abort_writer()
            self.start = msg
            self.row.set_job(msg.job)
            video.make_output_folder(msg.output)
            silent = Path(msg.output).with_name(f".{Path(msg.output).stem}.video.mp4")
            self.writer = video.VideoWriter(silent, msg.fps, msg.size)
            return
        if isinstance(msg, FrameMsg):
            job = msg.ref.job
            try:
                if self.gone(job) or self.start is None or self.start.job != job:
                    return
                self.row.took(1)
                self.row.set_state("busy")
                h, w = msg.ref.shape[:2]
                part = views(self.ch.ring, msg.ref.slot, h, w)
                self.writer.write(face.paste(part.frame, part.crop, msg.placement))
            finally:
                self.release(msg)
            self.row.gave(1)
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
        from heygem import video

        self.row.set_job(None)
        start, writer = self.start, self.writer
        self.start = self.writer = None
        if writer is None or start is None or start.job != end.job or self.gone(end.job):
            if writer is not None:
                writer.abort()
            return
        if writer.frames != start.frames:
            writer.abort()
            if not self.store.cancelled(end.job) and not self.ch.stop.is_set():
                self.fail(end.job, f"only {writer.frames} of {start.frames} frames arrived")
            return
        self.store.progress(end.job, self.spec.worker, 90, "mux")
        final = Path(start.output)
        staged = final.with_name(f".{final.stem}.done{final.suffix or '.mp4'}")
        muxed = video.mux(writer.close(), start.audio, staged)
        try:  # the job may have been cancelled or handed elsewhere meanwhile: then no output
            self.store.renew(end.job, self.spec.worker, self.spec.lease_s)
        except JobError:
            staged.unlink(missing_ok=True)
            raise
        os.replace(staged, final)
        self.store.succeed(end.job, self.spec.worker, str(final))
        self.log.info("job_succeeded", job=end.job, frames=start.frames, output=str(final), muxed=muxed)
        self.event("job", {"job": end.job, "state": "succeeded", "frames": start.frames, "muxed": muxed})

    def abort_writer(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def release_queues(ch: Channels, orphaned: bool) -> None:
    """Let the stage process exit without waiting for its queues' readers.

    At exit, multiprocessing joins each queue's feeder thread, which blocks for good writing a
    message larger than the pipe's buffer (a JobStart carries a 196 KB crop) to a stage that
    has already left: after its supervisor was SIGKILLed, a stage then outlived it forever.
    Frames in flight are abandoned on stop anyway. Events still go out to a living supervisor
    (a fatal event carries the reason), and are dropped only when it is gone.
    """
    for q in (ch.to_generate, ch.to_encode):
        q.cancel_join_thread()
    if orphaned:
        ch.events.cancel_join_thread()


def _reason(err: BaseException) -> str:
    """One line for the job's `reason`: the error's own message, which names the culprit."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


KINDS = {cls.name: cls for cls in (Decode, Generate, Encode)}


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_KEEP_BYTES = 64 << 20


def tune_process() -> None:
    """Settings for a stage's hot loop, applied in each stage process (and in the benchmarks'
    single-process baselines, so they compare like with like).

    - OpenCV's thread pool goes to 1: a replica's parallelism is its three stage processes (and
      the generator's ONNX Runtime pool); a pool per process sized to every core oversubscribes
      them, and each parallel loop then waits on its slowest, preempted, thread.
    - glibc malloc keeps blocks below 64 MiB on the heap and lets 64 MiB of free heap stay
      mapped. Frames and batches are megabytes, allocated and freed at video rate; by default
      glibc hands freed ones back to the kernel and the next use page-faults fresh zeroed pages:
      measured 3,400 faults and 11 ms of kernel time per batch of four crops, about the demo
      generator's own compute (benchmarks/bench_conversions.py). Not glibc (musl): left as is.
    """
    import ctypes

    import cv2

    cv2.setNumThreads(1)
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    mallopt(_M_MMAP_THRESHOLD, HEAP_KEEP_BYTES)
    mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP_BYTES)


# Decode and encode run this much nicer than generate. The generator is the bottleneck (the
# stage that feeds the GPU): a time slice it loses is throughput lost, while the other two have
# the ring's slots as slack. On a busy CPU the scheduler then serves generate first (measured on
# 2 cores, generator-bound: +5 % to +15 % fps, BENCHMARKS.md).
HELPER_NICE = 5


def main(stage: str, spec: StageSpec, ch: Channels, log_json: bool = True, log_level: str = "info") -> None:
    """Entry point of a stage process (the target given to `Process`)."""
    import sys

    logs.configure(json=log_json, level=log_level, stream=sys.stderr)
    tune_process()
    if stage != "generate":
        os.nice(HELPER_NICE)
    sys.exit(KINDS[stage](spec, ch).run())
