"""The daemon in front of upstream's job API (watchdog.front), against a stand-in upstream
(benchmarks/support/standin_upstream.py: the same API, one task at a time, `<code>-r.mp4` in its
data folder, told to hang, die, block its queue or fail; it forgets everything when it restarts).

The fast tests drive one `Front` pass by pass (`step()`) against a stand-in served in this
process; the slow one runs a real daemon with the stand-in as its external command and a
client polling like upstream's desktop client.
"""

from __future__ import annotations

import json
import posixpath
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.support import standin_upstream as standin
from benchmarks.support.standin_upstream import write_wav
from heygem.jobs import JobStore
from tests.daemon_helpers import Daemon, wait_for
from watchdog.front import WORKER, Front, Pace
from watchdog.upstream_api import UpstreamApi

STANDIN = Path(standin.__file__)
QUEUE_FULL_LINE = standin.QUEUE_FULL


def body(code: str, audio: str = "a.wav", video: str = "v.mp4", **extras) -> bytes:
    return json.dumps({"audio_url": audio, "video_url": video, "code": code,
                       **(extras or {"chaofen": 0, "watermark_switch": 0, "pn": 1})}).encode()


def node_path_join(*parts: str) -> str:
    """Node's path.join, as the desktop client opens `data.result` (tests/test_official_client.py)."""
    return posixpath.normpath("/".join(p for p in parts if p)) or "."


# ---- the learned pace (pure) ----------------------------------------------------------------------

def test_the_deadline_is_the_floor_until_this_host_has_measured_something():
    pace = Pace(margin=3.0, floor_s=60.0)
    assert pace.expected_s(10.0) is None and pace.deadline_s(10.0) == 60.0


def test_the_deadline_is_learned_per_second_of_audio_times_the_margin_never_below_the_floor():
    pace = Pace(margin=3.0, floor_s=5.0)
    for seconds, audio in ((20.0, 10.0), (40.0, 10.0), (30.0, 10.0)):  # 2, 4, 3 s per second of audio
        pace.record(seconds, audio)
    assert pace.rate(Pace.AUDIO) == 3.0  # the median: one slow task does not move it
    assert pace.deadline_s(60.0) == 3.0 * 3.0 * 60.0  # a long task gets a long deadline
    assert pace.deadline_s(0.2) == 5.0  # a short one: the floor
    assert pace.deadline_s(None) == 3.0 * 30.0  # audio unknown here: per task
    assert Pace(3.0, 5.0, pace.to_dict()).rate(Pace.AUDIO) == 3.0  # survives the daemon's restart


def test_upstream_url_is_checked_at_load():
    from watchdog.config import ConfigError, parse

    external = {"mode": "external", "command": ["python", "app.py"]}
    assert parse({"daemon": {**external, "upstream_url": "http://127.0.0.1:8384"}}).daemon.upstream_concurrency == 1
    for keys, says in (({"upstream_url": "http://127.0.0.1:8384"}, 'needs mode = "external"'),
                       ({**external, "upstream_url": "ftp://host/x"}, "is not http://HOST:PORT"),
                       ({**external, "upstream_url": "http://127.0.0.1:8383"}, "the daemon's own http_port"),
                       ({**external, "upstream_url": "http://127.0.0.1:8384", "upstream_concurrency": 0}, "upstream_concurrency")):
        with pytest.raises(ConfigError, match=says):
            parse({"daemon": keys})


# ---- one Front against a stand-in in this process -------------------------------------------------

@pytest.fixture
def rig(tmp_path):
    data, control = tmp_path / "data", tmp_path / "control"
    data.mkdir()
    write_wav(data / "a.wav", 0.5)
    (data / "v.mp4").write_bytes(b"template")
    args = standin.parse(["--port", "0", "--data", str(data), "--control", str(control), "--per-audio-s", "0.3",
                          "--base-s", "0.02", "--startup-s", "0"])
    server = standin.serve(args)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    api_store = JobStore(tmp_path / "jobs.sqlite3", max_attempts=2)

    def make(**kw) -> Front:
        settings = dict(state_dir=tmp_path / "state", data_dir=data, concurrency=1, poll_s=0.05, lease_s=30.0,
                        max_attempts=2, margin=3.0, floor_s=0.6)
        settings.update(kw)
        return Front(UpstreamApi(f"http://127.0.0.1:{server.server_address[1]}", 1.0),
                     JobStore(api_store.path, max_attempts=2, busy_timeout_s=1.0), api_store, **settings)

    up = server.upstream
    yield SimpleNamespace(front=make(), make=make, up=up, data=data, control=control, store=api_store, server=server)
    up.stopped.set()
    server.shutdown()
    server.server_close()


def drive(front: Front, until, timeout_s: float = 20.0, seen: dict | None = None):
    """Step the follower until `until()` is truthy; records every client-visible status per code."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        front.step()
        if seen is not None:
            for code in list(seen):
                seen[code].append(front.query(code)["data"]["status"])
        value = until()
        if value:
            return value
        time.sleep(0.03)
    raise AssertionError(f"not reached in {timeout_s} s; view {front.view()}")


def writes(control: Path) -> list[str]:
    path = control / "writes.log"
    return path.read_text().split() if path.exists() else []


def test_tasks_are_stored_first_sent_one_at_a_time_and_answered_as_upstream_gives_them(rig):
    front, up = rig.front, rig.up
    codes = [str(uuid.uuid4()) for _ in range(3)]
    for code in codes[:2]:
        assert front.submit(body(code), True)["code"] == 10000
    assert front.submit(body(codes[2], chaofen=1, watermark_switch=0, pn=1), True)["code"] == 10000
    # in the store before the answer; nothing at upstream until the follower's pass
    assert rig.store.counts()["queued"] == 3 and not up.payloads
    assert front.query(codes[0])["data"] == {"code": codes[0], "status": 1, "progress": 0, "result": "", "msg": "waiting for upstream"}

    front.step()  # probe, then one task forwarded (upstream_concurrency 1); the rest wait with a position
    assert list(up.payloads) == codes[:1]
    view = front.view()
    assert view["outstanding"] == 1 and view["waiting"] == 2 and view["ready"]
    assert [p["code"] for p in view["positions"]] == codes[1:]
    assert front.query(codes[2])["data"]["msg"] == "waiting for upstream: position 2"
    from ops.monitor import front_text  # what `heygem-ops monitor` shows of it

    screen = front_text(view, time.time()).plain
    assert "answers; 1/1 at upstream, 2 waiting" in screen and f"1. {codes[1]}, 2. {codes[2]}" in screen, screen
    assert f"{codes[0]}: 0 % sent to upstream, attempt 1" in screen, screen

    seen = {code: [] for code in codes}
    drive(front, lambda: rig.store.counts()["succeeded"] == 3, seen=seen)
    assert list(up.payloads) == codes  # in order
    assert up.payloads[codes[0]]["chaofen"] == 0 and up.payloads[codes[2]]["chaofen"] == 1  # the client's fields travel
    for code in codes:
        answer = front.query(code)
        assert answer["code"] == 10000 and answer["data"]["status"] == 2, answer
        assert answer["data"]["result"] == f"/{code}-r.mp4"  # as upstream gives it: relative to its data folder
        assert Path(node_path_join(str(rig.data), answer["data"]["result"])).is_file()
        assert front.query(code)["data"]["status"] == 2  # asked again: still there (upstream forgot it)
        statuses = seen[code]
        assert 2 not in statuses[:statuses.index(2)] and set(statuses[statuses.index(2):]) == {2}, statuses
    assert sorted(writes(rig.control)) == sorted(codes)
    pace = front.view()["pace"]
    assert pace["samples"] == 3 and pace[Pace.AUDIO] > 0  # learned per second of audio (0.5 s WAVs)
    extras = rig.data.parent / "state" / "upstream-extras"  # chaofen 1 was kept there until the task ended
    assert extras.is_dir() and not list(extras.iterdir())


def test_upstream_forgetting_a_task_means_send_it_again_not_failed(rig):
    front, up = rig.front, rig.up
    code = str(uuid.uuid4())
    front.submit(body(code), True)
    drive(front, lambda: front.query(code)["data"]["progress"] >= 20)
    up.forget()  # what a restart does to upstream's memory
    drive(front, lambda: rig.store.by_code(code).state == "succeeded")
    job = rig.store.by_code(code)
    assert job.attempts == 2 and job.result == f"/{code}-r.mp4"
    assert writes(rig.control) == [code]  # the forgotten run never wrote


def test_a_restart_sends_the_held_task_again_first_once_the_new_upstream_answers(rig):
    front, up = rig.front, rig.up
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    front.submit(body(first), True)
    front.submit(body(second), True)
    drive(front, lambda: first in up.payloads)
    front.on_action("term", "worker_dead", time.time())  # the supervisor stops upstream
    assert not front.ready() and "worker_dead" in front.not_ready_reason()
    up.forget()
    up.payloads.clear()
    front.step()
    assert rig.store.by_code(first).state == "queued" and rig.store.by_code(first).reason.startswith("upstream was restarted")
    assert front.query(first)["data"]["status"] == 1  # the client sees a task that goes on
    front.step()
    assert not up.payloads, "nothing goes to an upstream being restarted"
    front.on_action("start", "worker_dead", time.time())
    drive(front, lambda: rig.store.counts()["succeeded"] == 2)
    assert list(up.payloads) == [first, second]  # in their order
    assert rig.store.by_code(first).attempts == 2 and rig.store.by_code(second).attempts == 1


def test_a_task_fails_only_after_max_attempts_with_upstreams_last_reason(rig):
    front = rig.front
    rig.control.mkdir(exist_ok=True)
    (rig.control / "fail").write_text("CUDA out of memory")
    code = str(uuid.uuid4())
    front.submit(body(code), True)
    statuses = {code: []}
    drive(front, lambda: rig.store.by_code(code).state == "failed", seen=statuses)
    job = rig.store.by_code(code)
    assert job.attempts == 2 and "CUDA out of memory" in job.reason and "gave up after 2 attempts" in job.reason
    answer = front.query(code)
    assert answer["data"]["status"] == 3 and "CUDA out of memory" in answer["data"]["msg"]
    assert set(statuses[code][:-1]) <= {1, 3}


def test_a_task_whose_progress_stands_still_past_the_deadline_is_stalled(rig):
    front = rig.front  # floor 0.6 s
    rig.control.mkdir(exist_ok=True)
    (rig.control / "hang").write_text("")
    code = str(uuid.uuid4())
    front.submit(body(code), True)
    drive(front, lambda: (rig.control / "events.log").exists() and " hang " in (rig.control / "events.log").read_text())
    frozen_at = time.time()
    stalled = drive(front, lambda: [c for c in front.conditions(time.time(), True, 60.0) if c.alert == "task_stalled" and c.active])
    assert time.time() - frozen_at >= 0.6 - 0.3  # not before the deadline (one progress step may be in flight)
    assert stalled[0].key == "external" and stalled[0].evidence["code"] == code
    assert stalled[0].evidence["deadline_s"] == 0.6
    assert not [c for c in front.conditions(time.time(), False, 60.0) if c.active], "only while upstream runs"


def test_ready_only_when_upstream_answers_since_its_start_and_hung_when_it_goes_silent(rig):
    front = rig.front
    assert not front.ready()
    front.step()
    assert front.ready()
    front.on_action("term", "worker_hung", time.time())
    front.on_action("start", "worker_hung", time.time())
    assert not front.ready()  # an answer from before the start does not count
    front.step()
    assert front.ready()
    rig.up.stopped.set()
    rig.server.shutdown()
    rig.server.server_close()
    front.step()
    assert not front.ready() and "does not answer" in front.not_ready_reason()
    time.sleep(0.3)
    hung = [c for c in front.conditions(time.time(), True, 0.2) if c.alert == "worker_hung"]
    assert hung[0].active and hung[0].key == "external"


def test_the_fronts_api_answers_like_upstreams(rig):
    front = rig.front
    assert front.submit(body("dup"), True)["code"] == 10000
    assert front.submit(body("dup"), True)["code"] == 10002  # a code is a task's id
    assert front.submit(body("dup", chaofen=1), True)["code"] == 10002
    assert front.submit(b"{nope", True)["code"] == 10002
    assert front.submit(json.dumps({"audio_url": "a.wav", "code": "x"}).encode(), True)["code"] == 10002
    assert front.submit(body("../escape"), True)["code"] == 10002
    assert front.submit(body("later"), False)["code"] == 10001  # draining
    assert front.query("nope")["code"] == 10004 and front.query("")["code"] == 10002


def test_claims_of_a_previous_daemon_on_this_host_go_back_to_the_queue(rig):
    front = rig.front
    job = rig.store.submit("a.wav", "v.mp4", code="orphan")
    rig.store.claim(f"{WORKER}@{front.host}:1", 30.0)  # a daemon before this one, same host
    theirs = rig.store.submit("a.wav", "v.mp4", code="theirs")
    rig.store.claim(f"{WORKER}@another-host:77", 30.0)  # a shared store: another host's upstream holds it
    front.start()
    try:
        assert wait_for(lambda: rig.store.by_code("orphan").state == "succeeded", 20)
    finally:
        assert front.stop(5.0)
    assert rig.store.get(job.id).attempts == 2
    assert rig.store.get(theirs.id).state == "running" and rig.store.get(theirs.id).worker == f"{WORKER}@another-host:77"


# ---- a real daemon in front of a real stand-in process ---------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client(threading.Thread):
    """Upstream's desktop client for many tasks: polls every code, records each status change."""

    def __init__(self, d: Daemon, codes: list[str]):
        super().__init__(daemon=True)
        self.d, self.codes = d, codes
        self.history: dict[str, list[int]] = {c: [] for c in codes}
        self.answers: dict[str, dict] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for code in self.codes:
                try:
                    status, res = self.d.http(f"/easy/query?code={code}", timeout=5)
                except OSError:
                    continue
                if status != 200 or res.get("code") != 10000:
                    self.history[code].append(-res.get("code", status) if isinstance(res, dict) else -status)
                    continue
                st = res["data"]["status"]
                if not self.history[code] or self.history[code][-1] != st:
                    self.history[code].append(st)
                self.answers[code] = res
            self.stop.wait(0.3)

    def done(self) -> int:
        return sum(1 for h in self.history.values() if h and h[-1] == 2)


@pytest.mark.slow
@pytest.mark.timeout(240)
def standin_upstream(tmp_path: Path, template: str, per_audio_s: float, startup_s: float) -> tuple:
    """A stand-in upstream's folders (data with speech.wav and `template`, control, its dh.log),
    its port and its command line."""
    data, control, dh_log = tmp_path / "data", tmp_path / "control", tmp_path / "dh.log"
    data.mkdir()
    control.mkdir()
    dh_log.write_text("")
    write_wav(data / "speech.wav", 0.4)
    (data / template).write_bytes(b"template")
    port = _free_port()
    command = [sys.executable, str(STANDIN), "--port", str(port), "--data", str(data), "--log", str(dh_log), "--control",
               str(control), "--per-audio-s", str(per_audio_s), "--base-s", "0.05", "--startup-s", str(startup_s)]
    return data, control, dh_log, port, command


def test_fifty_tasks_through_the_front_survive_a_hang_a_crash_and_a_blocked_queue(tmp_path):
    data, control, dh_log, port, command = standin_upstream(tmp_path, "20250325085726279.mp4", 0.25, 0.3)
    d = Daemon(tmp_path, "[rules]\nheartbeat_timeout_s = 10.0\n[pipeline]\nmax_attempts = 3\n"
               "[actions]\nterm_grace_s = 1.0\nbackoff_initial_s = 0.2\nbackoff_max_s = 0.5\ncrash_loop_restarts = 20\n",
               daemon_keys=f'mode = "external"\ncommand = {json.dumps(command)}\nlog_file = "{dh_log}"\n'
                           f'data_dir = "{data}"\nupstream_url = "http://127.0.0.1:{port}"\nupstream_poll_s = 0.2\n'
                           'upstream_timeout_s = 1.0\nupstream_stall_floor_s = 2.0\nupstream_stall_margin = 3.0\n',
               input_roots=())
    client = None
    try:
        assert d.wait_notify("READY=1", 60), d.log_path.read_text()[-3000:]
        codes = []
        for _ in range(50):  # the desktop client's submit, exactly
            code = str(uuid.uuid4())
            status, res = d.http("/easy/submit", {"audio_url": "speech.wav", "video_url": "20250325085726279.mp4",
                                                  "code": code, "chaofen": 0, "watermark_switch": 0, "pn": 1})
            assert status == 200 and res["code"] == 10000, res
            codes.append(code)
        waiting = wait_for(lambda: (q := d.http(f"/easy/query?code={codes[-1]}")[1]["data"])["msg"].startswith(
            "waiting for upstream: position") and q, 5, every_s=0.05)  # the follower's next pass numbers them
        assert waiting and waiting["status"] == 1, waiting
        client = Client(d, codes)
        client.start()
        metrics = wait_for(lambda: (m := d.http("/metrics")[1]) and "heygem_upstream_queue_position{" in m and m, 10)
        assert metrics and "heygem_upstream_waiting" in metrics

        events = control / "events.log"
        for at, fault in ((8, "hang"), (20, "die"), (32, "block")):
            assert wait_for(lambda: client.done() >= at, 60), (fault, client.done(), d.log_path.read_text()[-3000:])
            (control / fault).write_text("")
            assert wait_for(lambda: f" {fault} " in events.read_text(), 30), fault
        assert wait_for(lambda: client.done() == 50, 90), (client.done(), d.log_path.read_text()[-3000:])
        client.stop.set()
        client.join(10)

        for code in codes:
            history = client.history[code]
            assert history[-1] == 2 and history.count(2) == 1 and set(history) <= {1, 2}, (code, history)  # 2 is for good
            result = client.answers[code]["data"]["result"]
            assert result == f"/{code}-r.mp4" and Path(node_path_join(str(data), result)).is_file()
        written = (control / "writes.log").read_text().split()
        assert sorted(written) == sorted(codes), "each task's output written once"

        # each fault: upstream restarted, and the task it held ran again first, in the new incarnation
        lines = [line.split() for line in events.read_text().splitlines()]
        for fault in ("hang", "die", "block"):
            i, hit = next((i, line) for i, line in enumerate(lines) if line[1] == fault)
            after = next(line for line in lines[i + 1:] if line[1] == "start")
            assert after[2] == hit[2] and after[3] != hit[3], (fault, hit, after)
        assert d.alerts("task_stalled") and "stopping the command" in d.alerts("task_stalled")[0]["action"]
        assert d.alerts("worker_dead")
        blocked = d.alerts("queue_full")
        assert blocked and "stopping the command" in blocked[0]["action"], blocked
        restarts = [r for r in d.records() if r.get("event") == "external_restarted"]
        assert len(restarts) == 3, [r["why"] for r in restarts]
        snap = wait_for(lambda: (s := d.snapshot()) and s["jobs"]["succeeded"] == 50 and s, 5)  # the next tick's
        assert snap and snap["front"]["pace"]["s_per_audio_second"] > 0 and snap["front"]["waiting"] == 0
        assert snap["front"]["resubmitted"] == 3
    finally:
        if client is not None:
            client.stop.set()
        d.stop_and_clear()


def test_sighup_with_new_upstream_settings_rebuilds_the_front_with_its_upstream(tmp_path):
    """The front follows upstream's tasks with the settings it was built with: a reload that changes
    them restarts upstream and the front together (as a new command does), and tasks still flow."""
    import signal

    data, _, _, port, command = standin_upstream(tmp_path, "template.mp4", 0.1, 0.2)
    d = Daemon(tmp_path, "", daemon_keys=f'mode = "external"\ncommand = {json.dumps(command)}\ndata_dir = "{data}"\n'
                                         f'upstream_url = "http://127.0.0.1:{port}"\nupstream_poll_s = 0.2\n',
               input_roots=())
    try:
        assert d.wait_notify("READY=1", 60), d.log_path.read_text()[-3000:]
        d.config.write_text(d.config.read_text().replace("upstream_poll_s = 0.2", "upstream_poll_s = 0.3"))
        d.proc.send_signal(signal.SIGHUP)
        record = wait_for(lambda: [r for r in d.records() if r.get("event") == "config_reloaded"], 30)
        assert record and record[0]["service_restarted"] is True, d.log_path.read_text()[-3000:]
        started = [r for r in d.records() if r.get("event") == "front_started"]
        assert len(started) == 2, started
        status, res = d.http("/easy/submit", {"audio_url": "speech.wav", "video_url": "template.mp4", "code": "after"})
        assert status == 200 and res["code"] == 10000, res
        done = wait_for(lambda: (q := d.http("/easy/query?code=after")[1]["data"])["status"] == 2 and q, 30)
        assert done and done["result"] == "/after-r.mp4", d.log_path.read_text()[-3000:]
    finally:
        assert not d.stop_and_clear()
