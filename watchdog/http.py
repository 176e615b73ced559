"""The daemon's HTTP server: /metrics, /healthz, /readyz and upstream's job API.

Why the standard library and not a framework: five routes, JSON in and out, bound to 127.0.0.1.
`http.server.ThreadingHTTPServer` does that with no new dependency in the daemon (which must
stay lean), and a slow client only holds its own daemon thread. We drive the accept loop
ourselves (`handle_request` with a short timeout) so that `stop` is bounded, which
`serve_forever`/`shutdown` (an untimed wait) is not.

Upstream's API, kept so existing clients (the official desktop client polls /easy/query every
2 s) work unchanged. Every answer is HTTP 200 with a JSON body
`{"code", "success", "msg", "data"}`, as upstream's Flask app answers; clients branch on
`code`: 10000 success, 10001 busy, 10002 bad parameter, 10004 task not found, 9999 system error.
`success` is true for 10000 and, as upstream has it, for 10004 too. Only what is not API
(unknown route 404, wrong method 405, body over 1 MiB 413) uses another HTTP status.

    POST /easy/submit  {"audio_url", "video_url", "code", ...}; other fields (chaofen, pn,
                       watermark_switch, digital_auth) are accepted and ignored, as upstream
                       does. The URLs are local files, as in upstream's deployment: a name
                       relative to the data folder (what upstream's clients send), an absolute
                       path or a file:// URL; see `JobFiles` for which files may be read.
                       http(s) URLs are refused: this deployment fetches nothing from the
                       network. The job is committed to the store before the answer. The code
                       names the output (`<code>-r.mp4` in the data folder, upstream's naming
                       and place), so it must be a plain name. A code already used is refused
                       with 10002 (upstream overwrote its in-memory entry; our store keeps every
                       job, and a code is the task's id for good). While the daemon drains:
                       10001 busy.
    GET /easy/query    ?code=...  -> data {code, status, progress, result, msg}; status 1 while
                       queued or running (upstream has no queued state: progress 0 then), 2
                       succeeded, 3 failed or cancelled; msg is the stage, or the reason on
                       failure; result names the output as upstream does, relative to the data
                       folder with a leading '/' ("/<code>-r.mp4": the desktop client opens
                       Node's path.join(<data folder>, result)); without a data folder, and for
                       an output outside it, the absolute path. Unlike upstream, a finished task
                       can be queried again (upstream forgot it after the first answer).

An exception in a handler never reaches the client as a traceback: it is logged and answered
with JSON (500, or 200 with code 9999 on the API routes, which is what upstream sends and what
its clients handle). A bad input is never an exception: text that is not Unicode (a lone
surrogate), a path longer than PATH_MAX, a file the service may not read, a Content-Length that is
not ASCII digits: each is answered 10002 (or 400) with what was wrong.

Hostile clients (`Access`, `Limits`; [daemon] keys of the same names, all in /metrics):
- Beyond loopback only with a token. With `api_token`, every request but `open_paths` needs
  `Authorization: Bearer <token>` (compared in constant time): 401 otherwise. The configuration
  refuses a non-loopback `http_host` without one (watchdog.config).
- DNS rebinding. A server bound to loopback answers only requests whose `Host` is a loopback name
  (localhost, 127.0.0.1, [::1], with any port): 421 otherwise (a request with no Host at all, as
  HTTP/1.0 allows, is answered: a browser always sends one). A browser page on another site
  cannot make that header (nor set Authorization), and POST needs `Content-Type:
  application/json` (415 otherwise, body code 10002), which a page cannot send across sites
  without a CORS preflight that this server never grants.
- Bounds. The whole request (line, headers, body) must arrive within `request_timeout_s`, however
  slowly it trickles (each read waits only for what is left); `max_connections` requests are
  handled at once, one thread each, and a connection beyond that is answered 503 (body code 10001)
  and closed at once by the accept loop, so threads stay bounded; /easy/submit answers 10001 busy
  while `max_queued` jobs are queued.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import os
import re
import socket
import socketserver
import stat
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from heygem import logs
from heygem.jobs import NAME_MAX, DuplicateCode, Job, JobStore
from watchdog.config import ConfigError, is_loopback
from watchdog.metrics import CONTENT_TYPE_LATEST

MAX_BODY = 1024 * 1024
POLL_S = 0.2
CLIENT_TIMEOUT_S = 10.0  # the default whole-request deadline (Limits.request_timeout_s)
PATH_MAX = 4096  # bytes, as Linux counts a path
CODE_MAX = 1024  # bytes of a queried code (codes the CLI gave may be longer than the API's 128 characters)
WRITE_MIN_S = 1.0  # an answer gets at least this long to leave, even past the request's deadline
_DIGITS = re.compile(r"[0-9]{1,15}")  # str.isdigit() takes '²', which int() refuses

SUCCESS, BUSY, BAD_PARAMETER, NOT_FOUND, SYSTEM_ERROR = 10000, 10001, 10002, 10004, 9999
RUN, DONE, ERROR = 1, 2, 3
UPSTREAM_STATUS = {"queued": RUN, "running": RUN, "succeeded": DONE, "failed": ERROR, "cancelled": ERROR}

ROUTES = {"/healthz": "GET", "/readyz": "GET", "/metrics": "GET", "/easy/query": "GET", "/easy/submit": "POST"}
_CODE = re.compile(r"[\w-][\w.-]{0,127}")
_JSON = "application/json; charset=utf-8"

log = logs.get("http")


class BindError(RuntimeError):
    """The server could not listen on its address (most often: the port is in use)."""


class BadParameter(ValueError):
    """A submit field that upstream would answer with 10002; the message names the field."""


class Response(NamedTuple):
    status: int
    body: bytes
    content_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, data: dict, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    # backslashreplace: a lone surrogate a client sent, echoed in a message, becomes the JSON escape
    # \udXXX instead of an encoding error
    return Response(status, json.dumps(data, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace"),
                    _JSON, headers)


class Access(NamedTuple):
    """Who may talk to the server: `token` (bytes) needed on every route but `open_paths`;
    `loopback`: the server is bound to loopback, so only loopback Host names are answered."""

    token: Optional[bytes] = None
    open_paths: frozenset = frozenset()
    loopback: bool = True

    @classmethod
    def from_config(cls, daemon) -> "Access":
        """From a watchdog.config.DaemonConfig; reads api_token_file (raises ConfigError)."""
        token = daemon.token()
        return cls(None if token is None else token.encode("ascii"), frozenset(daemon.open_paths),
                   is_loopback(daemon.http_host))


class Limits(NamedTuple):
    """The server's bounds ([daemon] request_timeout_s, max_connections, max_queued)."""

    request_timeout_s: float = CLIENT_TIMEOUT_S
    max_connections: int = 32
    max_queued: int = 1000

    @classmethod
    def from_config(cls, daemon) -> "Limits":
        return cls(daemon.request_timeout_s, daemon.max_connections, daemon.max_queued)


class HttpStats:
    """What /metrics says of the server: requests in progress and refusals by reason."""

    REASONS = ("busy", "deadline", "unauthorized", "host", "content_type", "queue_full")

    def __init__(self, limits: Limits):
        self.limits = limits
        self.active = 0
        self.rejected: Counter = Counter({reason: 0 for reason in self.REASONS})
        self._lock = threading.Lock()

    def enter(self) -> bool:
        """Count one more request in progress; False (nothing counted) when at the limit."""
        with self._lock:
            if self.active >= self.limits.max_connections:
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.active -= 1

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def view(self) -> dict:
        with self._lock:
            return {"active": self.active, "rejected": dict(self.rejected), "limits": self.limits._asdict()}


def bind_address(host: str, port: int) -> tuple[int, str]:
    """(address family, address) to bind `host` to: an IP literal as it is, a name resolved now.
    An unresolvable name is a configuration error (ConfigError, exit 2), not a failed start."""
    literal = host.removeprefix("[").removesuffix("]")
    if literal == "":
        return socket.AF_INET, ""
    try:
        return (socket.AF_INET6 if ipaddress.ip_address(literal).version == 6 else socket.AF_INET), literal
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(literal, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"[daemon] http_host: cannot resolve {host!r}: {getattr(err, 'strerror', None) or err}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr[0]


def loopback_host(value: str) -> bool:
    """Whether a Host header names this machine's loopback: localhost, 127.x.y.z or [::1], with or
    without a port."""
    value = value.strip()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit())):
            return False
    else:
        name, _, port = value.partition(":")
        if port and not (port.isascii() and port.isdigit()):
            return False
    return is_loopback(name)


def upstream(code: int, msg: str, data: Optional[dict] = None) -> dict:
    """Upstream's answer envelope."""
    return {"code": code, "success": code in (SUCCESS, NOT_FOUND), "msg": msg, "data": {} if data is None else data}


def query_data(job: Job, name_result: Callable[[str], str] = str) -> dict:
    """A job as upstream's /easy/query `data` (a queued job's progress is 0: the store resets it).

    `name_result` turns the output's path into what `result` says (JobFiles.result)."""
    status = UPSTREAM_STATUS[job.state]
    return {
        "code": job.code,
        "status": status,
        "progress": job.progress,
        "result": name_result(job.result or "") if status == DONE else "",
        "msg": (job.reason or job.state) if status == ERROR else job.stage,
    }


def _under(path: str, root: str) -> bool:
    """`path` is `root` or inside it; both absolute real paths (symlinks resolved)."""
    return os.path.commonpath([path, root]) == root


class JobFiles:
    """Which files /easy/submit may read, where its jobs write, and how /easy/query names a result.

    `data_dir` is the folder shared with upstream's clients ([daemon] data_dir; the desktop
    client's ~/heygem_data/face2face/temp): relative input names resolve there, jobs write
    `<code>-r.mp4` there (upstream's name and place) and `result` is given relative to it.
    Without one, relative names resolve under `<state_dir>/inputs` (created 0700) and outputs go
    to `<state_dir>/outputs`, with absolute results, as before.

    Inputs are read only from the roots: the data folder (or `<state_dir>/inputs`) and
    `input_roots`. Containment is checked on the real path (symlinks and '..' resolved, then
    commonpath), so a link inside a root that points outside is outside. The state directory
    (job store, snapshot, pidfile, models) is never an input, even under a root; only a root
    inside it (the default `inputs/`) is. Every refusal, whether the file exists or not, gives
    the same answer (`REFUSED`): the API is no oracle for the host's files. The log line
    `input_refused` tells the operator the real reason.
    """

    REFUSED = ("no such input file (inputs are files in the service's data folder or its [daemon] input_roots;"
               " pass a name relative to the data folder)")

    def __init__(self, state_dir: Path, data_dir: Optional[Path] = None, input_roots: Sequence[Path] = ()):
        self.state_dir = Path(state_dir)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        if self.data_dir is None:
            self.base = self.state_dir / "inputs"
            self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.outputs = self.state_dir / "outputs"
        else:
            self.base = self.outputs = self.data_dir
            data, state = os.path.realpath(self.data_dir), os.path.realpath(self.state_dir)
            if _under(state, data):
                log.warning("data_dir_holds_state_dir", data_dir=data, state_dir=state,
                            why="the state directory is never an input; give the service a state directory of its own")
        self.roots = [self.base, *(Path(r) for r in input_roots)]

    @classmethod
    def from_config(cls, daemon, state_dir: Path) -> "JobFiles":
        """From a watchdog.config.DaemonConfig and the state directory in use."""
        return cls(state_dir, daemon.data_dir, daemon.input_roots)

    def output(self, code: str) -> Path:
        return self.outputs / f"{code}-r.mp4"

    def result(self, path: str) -> str:
        """`path` as /easy/query's `result`: "/<relative path>" inside the data folder, else as is."""
        if self.data_dir is None or not path:
            return path
        real, base = os.path.realpath(path), os.path.realpath(self.data_dir)
        if real != base and _under(real, base):
            return "/" + os.path.relpath(real, base)
        return path

    def input(self, name: str, value: str) -> Path:
        """The real path of the input file `value` names (raises BadParameter with REFUSED)."""
        if "://" in value:
            scheme = value.split("://", 1)[0].lower()
            if scheme in ("http", "https"):
                raise BadParameter(
                    f"{name}: {value} is an {scheme} URL, but this deployment does not fetch from the network;"
                    " pass a local path or a file:// URL"
                )
            if scheme != "file":
                raise BadParameter(f"{name}: unsupported URL scheme {scheme!r}; pass a local path or a file:// URL")
            url = urlsplit(value)
            if url.netloc not in ("", "localhost"):
                raise BadParameter(f"{name}: {value} names host {url.netloc!r}; only local files can be read")
            value = unquote(url.path)
        real, why = None, "NUL byte in the name"
        if "\x00" not in value:
            try:
                real = os.path.realpath(os.path.join(self.base, value))  # an absolute value replaces the base
                why = self._refusal(real)
            except (OSError, ValueError) as err:  # permission, a name too long, not encodable: the same answer
                why = f"cannot resolve: {getattr(err, 'strerror', None) or err}"
        if why:
            log.info("input_refused", field=name, value=value, path=real, reason=why)
            raise BadParameter(f"{name}: {self.REFUSED}")
        return Path(real)

    def _refusal(self, real: str) -> Optional[str]:
        """Why the file at `real` may not be read, or None."""
        inside = [root for root in (os.path.realpath(r) for r in self.roots) if _under(real, root)]
        if not inside:
            return "outside the input folders"
        state = os.path.realpath(self.state_dir)
        if _under(real, state) and not any(root != state and _under(root, state) for root in inside):
            return "in the state directory"
        try:
            mode = os.stat(real).st_mode
        except (OSError, ValueError) as err:
            return f"cannot stat: {getattr(err, 'strerror', None) or err}"
        if not stat.S_ISREG(mode):
            return "not a regular file"
        if not os.access(real, os.R_OK):
            return "not readable by the service"
        return None


class ApiServer:
    """The HTTP server of one daemon, serving from a background thread.

    `health()` returns a dict whose `healthy` says the daemon's loop ticked recently (/healthz
    answers 503 otherwise); `readiness()` returns (ready, reasons); `accepting()` is False while
    the daemon drains. `files` says which inputs may be read and where outputs go. `access` and
    `limits` (defaults: no token, loopback Host names only when bound to loopback, Limits())
    may be replaced while serving (`configure`, on SIGHUP); `stats` is what /metrics shows of them.
    """

    def __init__(
        self, host: str, port: int, store: JobStore, metrics_render: Callable[[], bytes],
        health: Callable[[], dict], readiness: Callable[[], tuple[bool, dict]], accepting: Callable[[], bool],
        files: JobFiles, front=None, access: Optional[Access] = None, limits: Optional[Limits] = None,
    ):
        self.host, self.port = host, port
        self.access = access if access is not None else Access(loopback=is_loopback(host))
        self.limits = limits if limits is not None else Limits()
        self.stats = HttpStats(self.limits)
        # external mode with [daemon] upstream_url: a watchdog.front.Front answers the /easy/ routes
        self.front = front
        self.store = store
        self.metrics_render = metrics_render
        self.health = health
        self.readiness = readiness
        self.accepting = accepting
        self.files = files
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def configure(self, access: Access, limits: Limits, files: Optional[JobFiles] = None) -> None:
        """New access rules, bounds and input roots for the requests that arrive from now on."""
        self.access, self.limits = access, limits
        self.stats.limits = limits
        if files is not None:
            self.files = files

    def start(self) -> None:
        """Bind (port 0 picks a free port, then `.port` is the real one) and serve in a thread.
        Raises ConfigError for a host name that does not resolve, BindError when binding fails."""
        family, address = bind_address(self.host, self.port)
        cls = _Server6 if family == socket.AF_INET6 else _Server
        try:
            self._server = cls((address, self.port), _Handler)
        except OSError as err:
            raise BindError(f"cannot serve HTTP on {self.host}:{self.port}: {err.strerror or err}") from err
        self._server.api = self
        self.port = self._server.server_address[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._thread.start()
        log.info("http_listening", url=self.url)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            self._server.handle_request()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop accepting and close the port; True when the accept loop ended within `timeout`.

        Requests in flight finish on their own daemon threads; they are not waited for.
        """
        if self._server is None:
            return True
        self._stopping.set()
        self._thread.join(timeout)
        self._server.server_close()
        stopped = not self._thread.is_alive()
        self._server = None
        log.info("http_stopped", url=self.url, clean=stopped)
        return stopped

    # ---- routes: each returns a Response ------------------------------------------------------

    def route(self, path: str, params: dict[str, list[str]], body: bytes) -> Response:
        if path == "/healthz":
            health = self.health()
            ok = bool(health.get("healthy"))
            return json_response(200 if ok else 503, {**health, "status": "ok" if ok else "unhealthy"})
        if path == "/readyz":
            ready, reasons = self.readiness()
            return json_response(200 if ready else 503, {"status": "ready" if ready else "not ready", "reasons": reasons})
        if path == "/metrics":
            return Response(200, self.metrics_render(), CONTENT_TYPE_LATEST)
        front = self.front
        if path == "/easy/query":
            code = params.get("code", [""])[0]
            if (why := _bad_code(code)) is not None:
                return json_response(200, upstream(BAD_PARAMETER, why))
            return json_response(200, front.query(code) if front is not None else self.query(code))
        if (busy := self.queue_full()) is not None:
            return json_response(200, busy)
        return json_response(200, front.submit(body, self.accepting()) if front is not None else self.submit(body))

    def queue_full(self) -> Optional[dict]:
        """Upstream's busy answer while `max_queued` jobs wait in the store, else None. Checked
        before the job is stored: concurrent submits may overshoot by the handlers in flight."""
        queued = self.store.counts().get("queued", 0)
        limit = self.limits.max_queued
        if queued < limit:
            return None
        self.stats.reject("queue_full")
        return upstream(BUSY, f"busy: {queued} tasks are queued, the most this service takes ([daemon] max_queued = {limit});"
                              " submit again later")

    def query(self, code: str) -> dict:
        if not code:
            return upstream(BAD_PARAMETER, "code is missing")
        job = self.store.by_code(code)
        if job is None:
            return upstream(NOT_FOUND, f"task {code} not found")
        return upstream(SUCCESS, "", query_data(job, self.files.result))

    def submit(self, body: bytes) -> dict:
        if not self.accepting():
            return upstream(BUSY, "busy: the service is stopping and takes no new tasks; submit again later")
        try:
            _, audio_url, video_url, code = parse_submit(body)
            audio = self.files.input("audio_url", audio_url)
            video = self.files.input("video_url", video_url)
        except BadParameter as err:
            return upstream(BAD_PARAMETER, str(err))
        try:
            job = self.store.submit(str(audio), str(video), output=str(self.files.output(code)), code=code)
        except DuplicateCode:
            return upstream(BAD_PARAMETER, f"code {code} is taken: a code is a task's id and cannot be reused")
        log.info("job_submitted", code=code, job=job.id, audio=job.audio, video=job.video)
        return upstream(SUCCESS, "success", {"code": code})


def parse_submit(body: bytes) -> tuple[dict, str, str, str]:
    """Upstream's /easy/submit body -> (request, audio_url, video_url, code); BadParameter names
    what is wrong. Shared by the embedded API and the front (watchdog.front)."""
    try:
        request = json.loads(body)
    except ValueError as err:
        raise BadParameter(f"the body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise BadParameter("the body must be a JSON object")
    audio_url, video_url, code = (_field(request, name) for name in ("audio_url", "video_url", "code"))
    if not _CODE.fullmatch(code):
        raise BadParameter(f"code {code!r} must be 1 to 128 letters, digits, '_', '-' or '.', not starting with '.'"
                           " (it names the output file)")
    if len(f"{code}-r.mp4".encode()) > NAME_MAX:
        raise BadParameter(f"code {code!r} is {len(code.encode())} bytes in UTF-8; it names the output file"
                           f" '<code>-r.mp4', which must fit {NAME_MAX} bytes: a code of at most {NAME_MAX - 6} bytes")
    return request, audio_url, video_url, code


def _field(request: dict, name: str) -> str:
    value = request.get(name)
    if value is None or value == "":
        raise BadParameter(f"{name} is missing")
    if not isinstance(value, str):
        raise BadParameter(f"{name} must be a string, got {type(value).__name__}")
    why = _not_text(value)
    if why:
        raise BadParameter(f"{name} {why}")
    size = len(value.encode())
    if size > PATH_MAX:
        raise BadParameter(f"{name} is {size} bytes long; a file name or path is at most {PATH_MAX} bytes")
    return value


def _not_text(value: str) -> Optional[str]:
    """Why `value` cannot be a name (JSON's \\ud800 escapes decode to lone surrogates, which no
    file name or database text can hold), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"is not valid Unicode text: a lone surrogate {ascii(err.object[err.start:err.end])} at character {err.start}"
    return None


def _bad_code(code: str) -> Optional[str]:
    """Why a queried `code` cannot name a task, or None (missing codes are the route's to say)."""
    if not code:
        return None
    why = _not_text(code)
    if why:
        return f"code {why}"
    if len(code.encode()) > CODE_MAX:
        return f"code is {len(code.encode())} bytes long; a task code is at most {CODE_MAX} bytes"
    return None


class _Server(ThreadingHTTPServer):
    timeout = POLL_S
    request_queue_size = 256  # a burst of connects waits in the backlog, to be answered (or refused) in turn
    api: ApiServer

    def process_request(self, request, client_address) -> None:
        """A thread for the request while fewer than max_connections are in progress; else 503
        from this (the accept) thread, at once, and the connection closed."""
        stats = self.api.stats
        if not stats.enter():
            stats.reject("busy")
            _refuse(request, stats.limits.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            stats.leave()  # no thread started: socketserver closes the connection
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.api.stats.leave()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall without DNS; not needed
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        """socketserver prints a traceback to stderr here; a log line instead."""
        log.warning("http_connection_error", client=client_address[0], exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _refuse(request: socket.socket, limit: int) -> None:
    """503 on a connection beyond the limit, without blocking the accept loop: what the client
    sent already is drained (closing on unread data would reset the connection before it reads)."""
    body = json.dumps(upstream(BUSY, f"busy: {limit} requests are in progress, the most this service handles at once "
                                     "([daemon] max_connections); retry shortly")).encode()
    head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: {_JSON}\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
    try:
        request.setblocking(False)
        request.send(head + body)
        for _ in range(4):  # bounded: a client that keeps sending must not hold the accept loop
            if not request.recv(65536):
                break
    except OSError:
        pass


class _DeadlineReader(io.RawIOBase):
    """The request's socket, read against one deadline for the whole request: each read waits
    only for the time that is left, so a client trickling a byte at a time is cut off on time."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self.deadline, self.expired = sock, deadline, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError("the request's deadline passed")
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            self.expired = True
            raise


class _Handler(BaseHTTPRequestHandler):
    """Turns a request into `ApiServer.route` and its Response into bytes; owns errors."""

    server: _Server
    timeout = CLIENT_TIMEOUT_S
    server_version = "heygem-ops"
    responded = False

    def setup(self) -> None:
        super().setup()
        self.deadline = time.monotonic() + self.server.api.limits.request_timeout_s
        self.reader = _DeadlineReader(self.connection, self.deadline)
        self.rfile.close()  # the plain makefile() reader setup() made; the socket stays open
        self.rfile = io.BufferedReader(self.reader)

    def handle(self) -> None:
        """One request; a deadline that passes while it arrives is answered 408 and closed."""
        try:
            super().handle()
        except TimeoutError:
            self.reader.expired = True
        except ConnectionError:
            return
        if self.reader.expired:
            self.close_connection = True
            self.server.api.stats.reject("deadline")
            log.info("http_request_deadline", client=self.client_address[0],
                     timeout_s=self.server.api.limits.request_timeout_s, responded=self.responded)
            if not self.responded:
                self._send_raw(408, "Request Timeout", f"the request did not arrive within "
                               f"{self.server.api.limits.request_timeout_s:g} s ([daemon] request_timeout_s)")

    def _send_raw(self, status: int, reason: str, msg: str) -> None:
        """An answer written directly: the request may not even have a parsed request line."""
        body = json.dumps(upstream(BAD_PARAMETER, msg)).encode()
        head = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: {_JSON}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        try:
            self.connection.settimeout(WRITE_MIN_S)
            self.connection.sendall(head + body)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _not_allowed(self) -> None:
        self._send(self._error(405, f"method {self.command} is not allowed; GET or POST", (("Allow", "GET, POST"),)))

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def _handle(self) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        try:
            self._send(self._respond(api, url.path, parse_qs(url.query)))
        except (ConnectionError, socket.timeout) as err:
            self.close_connection = True
            log.debug("http_client_gone", client=self.client_address[0], path=url.path, error=str(err))
        except Exception as err:
            log.exception("http_handler_failed", method=self.command, path=url.path)
            if url.path.startswith("/easy/"):
                self._send(json_response(200, upstream(SYSTEM_ERROR, f"system error: {type(err).__name__}: {err}")))
            else:
                self._send(json_response(500, {"error": f"internal error: {type(err).__name__}: {err}"}))
        finally:
            api.store.close()  # this request's thread ends now; close its connection deterministically

    def _respond(self, api: ApiServer, path: str, params: dict[str, list[str]]) -> Response:
        refused = self._refused(api, path)
        if refused is not None:
            self.close_connection = True  # a body, if any, is left unread
            return refused
        method = ROUTES.get(path)
        if method is None:
            return self._error(404, f"no route {path}; routes: {', '.join(ROUTES)}")
        if method != self.command:
            return self._error(405, f"{path} takes {method} only", (("Allow", method),))
        body = b""
        if self.command == "POST":
            self.close_connection = True  # unless the body is read whole below
            if self.headers.get("Transfer-Encoding") is not None:
                return self._error(411, "a chunked (Transfer-Encoding) body is not accepted; send Content-Length")
            content_type = self.headers.get_content_type()  # text/plain when the header is missing
            if content_type != "application/json":
                api.stats.reject("content_type")
                return self._error(415, f"Content-Type must be application/json, not {self.headers.get('Content-Type', '(none)')!r}")
            lengths = self.headers.get_all("Content-Length") or ["0"]
            length = lengths[0].strip()
            if len(lengths) > 1 or not _DIGITS.fullmatch(length):
                return self._error(400, f"bad Content-Length {', '.join(lengths)!r}: one decimal number of ASCII digits")
            if int(length) > MAX_BODY:
                return self._error(413, f"the body is {length} bytes; the limit is {MAX_BODY}")
            body = self.rfile.read(int(length))
            if len(body) < int(length):
                raise ConnectionAbortedError(f"the client closed after {len(body)} of {length} bytes")
            self.close_connection = False
        return api.route(path, params, body)

    def _refused(self, api: ApiServer, path: str) -> Optional[Response]:
        """Host names (DNS rebinding) and the token, before anything else is looked at."""
        access = api.access
        if access.loopback:
            hosts = self.headers.get_all("Host") or []
            if len(hosts) > 1 or (hosts and not loopback_host(hosts[0])):
                api.stats.reject("host")
                log.info("http_host_refused", client=self.client_address[0], host=hosts)
                return self._error(421, f"Host {', '.join(hosts)!r} is not this service: bound to loopback, it answers only"
                                        " to localhost, 127.0.0.1 or [::1] (a page on another site, DNS rebinding?)")
        if access.token is not None and path not in access.open_paths:
            scheme, _, credential = self.headers.get("Authorization", "").strip().partition(" ")
            given = credential.strip().encode("latin-1", "replace")  # header text is latin-1 decoded bytes
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, access.token):
                api.stats.reject("unauthorized")
                log.info("http_unauthorized", client=self.client_address[0], path=path,
                         why="no bearer token" if scheme.lower() != "bearer" else "wrong token")
                return self._error(401, "unauthorized: send `Authorization: Bearer <token>` ([daemon] api_token)",
                                   (("WWW-Authenticate", 'Bearer realm="heygem-ops"'),))
        return None

    def _error(self, status: int, msg: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        """Upstream's envelope on its routes (so its clients can read it), else {"error": ...}."""
        if urlsplit(self.path).path.startswith("/easy/"):
            return json_response(status, upstream(BAD_PARAMETER, msg), headers)
        return json_response(status, {"error": msg}, headers)

    def _send(self, response: Response) -> None:
        self.responded = True
        self.connection.settimeout(max(WRITE_MIN_S, self.deadline - time.monotonic()))
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_request(self, code="-", size="-") -> None:
        log.debug("http_request", method=self.command, path=self.path, status=int(code), client=self.client_address[0])

    def log_message(self, format: str, *args) -> None:
        log.debug("http_message", message=format % args, client=self.client_address[0])
