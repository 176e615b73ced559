"""The daemon's HTTP server over real sockets: upstream's job API as its clients use it, probes, errors."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from heygem.jobs import JobStore
from watchdog.http import MAX_BODY, ApiServer, BindError, JobFiles
from watchdog.metrics import Metrics

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for 127.0.0.1


class World:
    """The daemon's side of the server: callables the test flips, a real store, real metrics."""

    def __init__(self, tmp_path: Path, data_dir: bool = True, input_roots: tuple = ()):
        self.state = tmp_path / "state"
        self.state.mkdir()
        self.files = JobFiles(self.state, tmp_path / "data" if data_dir else None, input_roots)
        self.data = self.files.base  # the data folder, or <state>/inputs without one
        self.data.mkdir(exist_ok=True)
        self.outputs = self.files.outputs
        self.audio = self.data / "speech.wav"
        self.video = self.data / "face.mp4"
        self.audio.write_bytes(b"RIFF")
        self.video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
        self.store = JobStore(self.state / "jobs.sqlite3")
        self.metrics = Metrics(version="test", mode="embedded")
        self.healthy, self.ready, self.accepting = True, True, True
        self.fail_with: Exception | None = None
        self.api = ApiServer(
            "127.0.0.1", 0, self.store, self.metrics.render, self.health, self.readiness, self.is_accepting, self.files,
        )

    def health(self) -> dict:
        if self.fail_with:
            raise self.fail_with
        return {"healthy": self.healthy, "ticks": 7}

    def readiness(self) -> tuple[bool, dict]:
        return self.ready, {} if self.ready else {"replica-0": "starting or restarting"}

    def is_accepting(self) -> bool:
        if self.fail_with:
            raise self.fail_with
        return self.accepting

    def call(self, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, object, dict]:
        """(HTTP status, JSON body or raw bytes, headers) of one request."""
        req = urllib.request.Request(self.api.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with OPENER.open(req, timeout=10) as resp:
                status, raw, headers = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            status, raw, headers = err.code, err.read(), dict(err.headers)
        if headers.get("Content-Type", "").startswith("application/json"):
            return status, json.loads(raw), headers
        return status, raw, headers

    def link(self, name: str, target: str) -> str:
        """A symlink in the data folder; returns its name, as a client would pass it."""
        (self.data / name).symlink_to(target)
        return name

    def submit(self, **fields) -> dict:
        status, body, _ = self.call("/easy/submit", "POST", json.dumps(fields).encode())
        assert status == 200
        return body

    def query(self, code: str) -> dict:
        status, body, _ = self.call(f"/easy/query?code={code}")
        assert status == 200
        return body


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    w.api.start()
    yield w
    w.api.stop(timeout=5)


def bad(msg: str) -> dict:
    return {"code": 10002, "success": False, "msg": msg, "data": {}}


REFUSED = f"audio_url: {JobFiles.REFUSED}"


def test_submit_then_poll_like_the_official_client(world):
    reply = world.submit(audio_url=str(world.audio), video_url=str(world.video), code="a1b2-c3",
                         chaofen=0, watermark_switch=0, digital_auth=0, pn=1)
    assert reply == {"code": 10000, "success": True, "msg": "success", "data": {"code": "a1b2-c3"}}
    job = world.store.by_code("a1b2-c3")  # committed before the answer, visible to another connection
    assert (job.state, job.audio, job.video) == ("queued", str(world.audio), str(world.video))
    assert job.output == str(world.data / "a1b2-c3-r.mp4")  # upstream's name, in the data folder

    seen: list[dict] = []
    done = threading.Event()

    def client():  # the desktop client's loop, 10x faster
        while not done.is_set():
            data = world.query("a1b2-c3")["data"]
            seen.append(data)
            if data["status"] != 1:
                return
            done.wait(0.2)

    def wait_seen(progress: int) -> None:
        deadline = time.monotonic() + 10
        while not any(d["progress"] == progress for d in seen):
            assert time.monotonic() < deadline, f"the client never saw progress {progress}: {seen}"
            time.sleep(0.02)

    poller = threading.Thread(target=client)
    poller.start()
    try:
        wait_seen(0)
        job = world.store.claim("replica-0", lease_s=30)
        for pct, stage in ((10, "normalised"), (20, "features"), (55, "generate"), (90, "generated")):
            world.store.progress(job.id, "replica-0", pct, stage)
            wait_seen(pct)
        world.store.succeed(job.id, "replica-0", job.output)
        poller.join(10)
    finally:
        done.set()
    assert not poller.is_alive()

    statuses = [d["status"] for d in seen]
    assert statuses == sorted(statuses) and (statuses[0], statuses[-1]) == (1, 2)  # 1 ... 1, 2: never 3
    progress = [d["progress"] for d in seen]
    assert progress == sorted(progress) and progress[0] == 0 and progress[-1] == 100
    assert {10, 20, 55, 90} <= set(progress)
    # relative to the data folder, as upstream gives it: the client opens path.join(<data folder>, result)
    assert seen[-1] == {"code": "a1b2-c3", "status": 2, "progress": 100, "result": "/a1b2-c3-r.mp4", "msg": "done"}
    assert world.query("a1b2-c3")["data"]["status"] == 2  # asked again: still there (upstream forgot it)


def test_queued_and_requeued_jobs_report_running_at_zero(world):
    world.submit(audio_url="speech.wav", video_url=f"file://{world.video}", code="q")  # relative; file URL
    assert world.store.by_code("q").audio == str(world.audio)
    assert world.query("q")["data"] == {"code": "q", "status": 1, "progress": 0, "result": "", "msg": "queued"}
    job = world.store.claim("replica-0", lease_s=30)
    world.store.progress(job.id, "replica-0", 20, "features")
    world.store.requeue(job.id, "worker died")
    assert world.query("q")["data"]["status"] == 1
    assert world.query("q")["data"]["progress"] == 0


def test_failed_and_cancelled_jobs_report_error_with_the_reason(world):
    for code in ("f", "c"):
        world.submit(audio_url=str(world.audio), video_url=str(world.video), code=code)
    job = world.store.claim("replica-0", lease_s=30)
    world.store.progress(job.id, "replica-0", 20, "features")
    world.store.fail(job.id, "replica-0", "face: no face in the first 100 frames")
    world.store.cancel(world.store.by_code("c").id)

    assert world.query("f") == {
        "code": 10000, "success": True, "msg": "",
        "data": {"code": "f", "status": 3, "progress": 20, "result": "", "msg": "face: no face in the first 100 frames"},
    }
    assert world.query("c")["data"]["status"] == 3
    assert world.query("c")["data"]["msg"] == "cancelled"


def test_bad_submits_are_refused_naming_the_problem(world):
    a, v = str(world.audio), str(world.video)
    assert world.submit(video_url=v, code="x") == bad("audio_url is missing")
    assert world.submit(audio_url=a, video_url="", code="x") == bad("video_url is missing")
    assert world.submit(audio_url=a, video_url=v) == bad("code is missing")
    assert world.submit(audio_url=a, video_url=v, code=7) == bad("code must be a string, got int")
    missing = world.data / "nope.wav"
    assert world.submit(audio_url=str(missing), video_url=v, code="x") == bad(REFUSED)
    assert world.submit(audio_url=a, video_url="http://cdn.example/face.mp4", code="x") == bad(
        "video_url: http://cdn.example/face.mp4 is an http URL, but this deployment does not fetch from the"
        " network; pass a local path or a file:// URL"
    )
    assert world.submit(audio_url="ftp://h/a.wav", video_url=v, code="x") == bad(
        "audio_url: unsupported URL scheme 'ftp'; pass a local path or a file:// URL"
    )
    assert world.submit(audio_url=f"file://otherhost{a}", video_url=v, code="x") == bad(
        f"audio_url: file://otherhost{a} names host 'otherhost'; only local files can be read"
    )
    assert world.submit(audio_url=a, video_url=v, code="../etc") == bad(
        "code '../etc' must be 1 to 128 letters, digits, '_', '-' or '.', not starting with '.' (it names the output file)"
    )
    for n in (128, 84):  # CJK: 3 bytes each in UTF-8; '<code>-r.mp4' must fit a 255-byte file name
        code = "视" * n
        assert world.submit(audio_url=a, video_url=v, code=code) == bad(
            f"code {code!r} is {3 * n} bytes in UTF-8; it names the output file '<code>-r.mp4', which must fit"
            " 255 bytes: a code of at most 249 bytes"
        )
    assert world.store.counts()["queued"] == 0

    for n in (80, 83):  # 240 or 249 bytes, + 6: the output name fits
        code = "视" * n
        assert world.submit(audio_url=a, video_url=v, code=code)["code"] == 10000
        assert world.store.by_code(code).output == str(world.outputs / f"{code}-r.mp4")
    assert world.submit(audio_url=a, video_url=v, code="dup")["code"] == 10000
    assert world.submit(audio_url=a, video_url=v, code="dup") == bad(
        "code dup is taken: a code is a task's id and cannot be reused"
    )

    status, body, _ = world.call("/easy/submit", "POST", b"{not json")
    assert (status, body) == (200, bad("the body is not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"))
    status, body, _ = world.call("/easy/submit", "POST", b"[1, 2]")
    assert (status, body) == (200, bad("the body must be a JSON object"))


def test_query_errors(world):
    assert world.query("nope") == {"code": 10004, "success": True, "msg": "task nope not found", "data": {}}
    status, body, _ = world.call("/easy/query")
    assert (status, body) == (200, bad("code is missing"))


def test_oversize_body_is_refused_unread(world):
    conn = http.client.HTTPConnection("127.0.0.1", world.api.port, timeout=10)
    try:
        conn.putrequest("POST", "/easy/submit")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(MAX_BODY + 1))
        conn.endheaders()  # the server must answer from the header alone
        resp = conn.getresponse()
        assert resp.status == 413
        assert json.loads(resp.read()) == {
            "code": 10002, "success": False, "data": {},
            "msg": f"the body is {MAX_BODY + 1} bytes; the limit is {MAX_BODY}",
        }
    finally:
        conn.close()


def test_unknown_routes_and_methods(world):
    status, body, _ = world.call("/nope")
    assert (status, body) == (404, {"error": "no route /nope; routes: /healthz, /readyz, /metrics, /easy/query, /easy/submit"})
    status, body, headers = world.call("/easy/submit")
    assert (status, body["msg"], headers["Allow"]) == (405, "/easy/submit takes POST only", "POST")
    status, body, headers = world.call("/metrics", "DELETE")
    assert (status, body, headers["Allow"]) == (405, {"error": "method DELETE is not allowed; GET or POST"}, "GET, POST")


def test_busy_while_draining(world):
    world.accepting = False
    assert world.submit(audio_url=str(world.audio), video_url=str(world.video), code="late") == {
        "code": 10001, "success": False, "data": {},
        "msg": "busy: the service is stopping and takes no new tasks; submit again later",
    }
    assert world.store.by_code("late") is None


def test_handler_errors_are_json_never_tracebacks(world):
    world.fail_with = RuntimeError("boom")
    status, body, _ = world.call("/healthz")
    assert (status, body) == (500, {"error": "internal error: RuntimeError: boom"})
    assert world.submit(audio_url="a", video_url="v", code="x") == {  # upstream's clients read code 9999
        "code": 9999, "success": False, "msg": "system error: RuntimeError: boom", "data": {},
    }
    world.fail_with = None
    assert world.call("/healthz")[0] == 200  # the server lives on


def test_metrics_parse_as_prometheus_text(world):
    world.submit(audio_url=str(world.audio), video_url=str(world.video), code="m")
    world.metrics.update_from(jobs=world.store.counts(), zombies=3)
    status, raw, headers = world.call("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(raw.decode())
        for s in family.samples
    }
    assert samples[("heygem_jobs", (("state", "queued"),))] == 1
    assert samples[("heygem_zombie_processes", ())] == 3


def test_health_and_readiness_follow_the_daemon(world):
    assert world.call("/healthz")[:2] == (200, {"healthy": True, "ticks": 7, "status": "ok"})
    assert world.call("/readyz")[:2] == (200, {"status": "ready", "reasons": {}})
    world.healthy, world.ready = False, False
    assert world.call("/healthz")[:2] == (503, {"healthy": False, "ticks": 7, "status": "unhealthy"})
    assert world.call("/readyz")[:2] == (503, {"status": "not ready", "reasons": {"replica-0": "starting or restarting"}})


def test_start_on_a_port_in_use_names_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        w = World(tmp_path)
        w.api.port = port
        with pytest.raises(BindError, match=rf"cannot serve HTTP on 127\.0\.0\.1:{port}: Address already in use"):
            w.api.start()


def test_stop_is_bounded_and_closes_the_port(world):
    idle = socket.create_connection(("127.0.0.1", world.api.port), timeout=10)  # holds a handler thread
    try:
        assert world.call("/healthz")[0] == 200
        port, started = world.api.port, time.monotonic()
        assert world.api.stop(timeout=2) is True
        assert time.monotonic() - started < 5  # the idle client would hold it 10 s if it were waited for
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        idle.close()


# ---- inputs only from the configured roots -------------------------------------------------------
# Each row is refused with 10002 and the SAME message, whether the file exists, is unreadable or
# is missing: the API must not tell a client which files the host has.
OUTSIDE_ROOTS = [
    pytest.param(lambda w: "/etc/shadow", id="etc-shadow"),
    pytest.param(lambda w: "/etc/passwd", id="etc-passwd"),
    pytest.param(lambda w: "../../../../etc/passwd", id="dot-dot-passwd"),
    pytest.param(lambda w: "jobs.sqlite3", id="jobs-sqlite3-relative"),
    pytest.param(lambda w: "file:///etc/hostname", id="file-url-hostname"),
    pytest.param(lambda w: "/etc/no-such-file-here", id="missing-outside"),
    pytest.param(lambda w: "nope.wav", id="missing-inside"),
    pytest.param(lambda w: str(w.state / "jobs.sqlite3"), id="jobs-sqlite3-absolute"),
    pytest.param(lambda w: "../state/jobs.sqlite3", id="jobs-sqlite3-dot-dot"),
    pytest.param(lambda w: w.link("escape.wav", "/etc/passwd"), id="symlink-out-of-the-root"),
    pytest.param(lambda w: w.link("dangling.wav", "/etc/no-such-file-here"), id="dangling-symlink"),
    pytest.param(lambda w: ".", id="the-data-folder-itself"),
    pytest.param(lambda w: "speech.wav\x00.mp4", id="nul-byte"),
]


@pytest.mark.parametrize("value", OUTSIDE_ROOTS)
def test_inputs_outside_the_roots_are_refused_alike_and_the_next_job_is_served(world, value):
    given = value(world)
    assert world.submit(audio_url=given, video_url=str(world.video), code="bad") == bad(REFUSED)
    assert world.store.by_code("bad") is None
    reply = world.submit(audio_url="speech.wav", video_url="face.mp4", code="good")  # the client's relative names
    assert reply["code"] == 10000, reply
    job = world.store.by_code("good")
    assert (job.audio, job.video) == (str(world.audio), str(world.video))


def test_video_url_is_checked_the_same_way(world):
    assert world.submit(audio_url="speech.wav", video_url="/etc/passwd", code="v") == bad(f"video_url: {JobFiles.REFUSED}")


def test_state_dir_is_never_an_input_even_under_a_root(tmp_path):
    w = World(tmp_path, input_roots=(tmp_path,))  # the state dir and everything else under tmp_path is a root
    w.api.start()
    try:
        (tmp_path / "other.wav").write_bytes(b"RIFF")
        assert w.submit(audio_url=str(tmp_path / "other.wav"), video_url="face.mp4", code="ok")["code"] == 10000
        for path in (w.state / "jobs.sqlite3", w.state / "snapshot.json", w.state):
            if path.name == "snapshot.json":
                path.write_text("{}")
            assert w.submit(audio_url=str(path), video_url="face.mp4", code="x") == bad(REFUSED), path
    finally:
        w.api.stop(timeout=5)


def test_a_link_inside_the_roots_is_followed_to_its_real_path(world):
    (world.data / "sub").mkdir()
    (world.data / "sub" / "alias.wav").symlink_to(world.audio)
    assert world.submit(audio_url="sub/alias.wav", video_url="./sub/../face.mp4", code="l")["code"] == 10000
    job = world.store.by_code("l")
    assert (job.audio, job.video) == (str(world.audio), str(world.video))  # what was checked is what is read


def test_without_a_data_folder_inputs_come_from_state_inputs_and_results_stay_absolute(tmp_path):
    w = World(tmp_path, data_dir=False)
    assert w.data == w.state / "inputs" and oct(w.data.stat().st_mode & 0o777) == "0o700"
    w.api.start()
    try:
        assert w.submit(audio_url="speech.wav", video_url=f"file://{w.video}", code="s")["code"] == 10000
        job = w.store.by_code("s")
        assert (job.audio, job.output) == (str(w.audio), str(w.state / "outputs" / "s-r.mp4"))
        job = w.store.claim("replica-0", lease_s=30)
        w.store.succeed(job.id, "replica-0", job.output)
        assert w.query("s")["data"]["result"] == job.output
        (tmp_path / "outside.wav").write_bytes(b"RIFF")
        assert w.submit(audio_url=str(tmp_path / "outside.wav"), video_url="face.mp4", code="o") == bad(REFUSED)
    finally:
        w.api.stop(timeout=5)


def test_result_outside_the_data_folder_is_given_absolute(world):
    """A job the CLI submitted with --out elsewhere: no relative name exists for it."""
    elsewhere = world.state.parent / "elsewhere.mp4"
    assert world.files.result(str(elsewhere)) == str(elsewhere)
    assert world.files.result(os.path.join(world.data, "x-r.mp4")) == "/x-r.mp4"


# ---- who may ask: Host names, the token --------------------------------------------------------------
@pytest.mark.parametrize("host, ok", [
    ("localhost", True), ("LOCALHOST:8383", True), ("127.0.0.1", True), ("127.0.0.1:8383", True), ("127.1.2.3:1", True),
    ("[::1]", True), ("[::1]:8383", True), ("localhost.", True),
    ("evil.example", False), ("evil.example:8383", False), ("127.0.0.1.nip.io", False), ("localhost.evil.example", False),
    ("[::1]x", False), ("127.0.0.1:80x", False), ("", False), ("0.0.0.0", False), ("10.0.0.1:8383", False),
])
def test_loopback_host_names(host, ok):
    from watchdog.http import loopback_host

    assert loopback_host(host) is ok


def test_beyond_loopback_every_request_needs_the_token_but_open_paths(tmp_path):
    from watchdog.http import Access

    w = World(tmp_path)
    token = "s3cret-token-0123456789"
    w.api = ApiServer("0.0.0.0", 0, w.store, w.metrics.render, w.health, w.readiness, w.is_accepting, w.files,
                      access=Access(token.encode(), frozenset({"/metrics"}), loopback=False))
    w.metrics.watch_http(w.api.stats)
    w.api.start()
    try:
        url = f"http://127.0.0.1:{w.api.port}"

        def get(path: str, **headers) -> tuple[int, dict]:
            req = urllib.request.Request(url + path, headers=headers)
            try:
                with OPENER.open(req, timeout=10) as resp:
                    return resp.status, dict(resp.headers)
            except urllib.error.HTTPError as err:
                return err.code, dict(err.headers)

        status, headers = get("/healthz")
        assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="heygem-ops"')
        assert get("/healthz", Authorization=f"Bearer {token}x")[0] == 401
        assert get("/healthz", Authorization=f"bearer {token}", Host="lan.example:8383")[0] == 200  # any Host beyond loopback
        assert get("/metrics")[0] == 200  # open path
        # the same server, reconfigured (SIGHUP): no token now, so any request is served
        w.api.configure(Access(loopback=False), w.api.limits)
        assert get("/healthz")[0] == 200
    finally:
        w.api.stop(timeout=5)


def test_answers_echoing_a_lone_surrogate_are_still_json(world):
    from watchdog.http import json_response

    body = json_response(200, {"msg": "a \ud800 b"}).body
    assert json.loads(body) == {"msg": "a \ud800 b"}
