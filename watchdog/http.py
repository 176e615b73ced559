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
its clients handle).
"""

from __future__ import annotations

import json
import os
import re
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from heygem import logs
from heygem.jobs import NAME_MAX, DuplicateCode, Job, JobStore
from watchdog.metrics import CONTENT_TYPE_LATEST

MAX_BODY = 1024 * 1024
POLL_S = 0.2
CLIENT_TIMEOUT_S = 10.0

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
    return Response(status, json.dumps(data, ensure_ascii=False, default=str).encode(), _JSON, headers)


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
            real = os.path.realpath(os.path.join(self.base, value))  # an absolute value replaces the base
            why = self._refusal(real)
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
    the daemon drains. `files` says which inputs may be read and where outputs go.
    """

    def __init__(
        self, host: str, port: int, store: JobStore, metrics_render: Callable[[], bytes],
        health: Callable[[], dict], readiness: Callable[[], tuple[bool, dict]], accepting: Callable[[], bool],
        files: JobFiles,
    ):
        self.host, self.port = host, port
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

    def start(self) -> None:
        """Bind (port 0 picks a free port, then `.port` is the real one) and serve in a thread."""
        cls = _Server6 if ":" in self.host else _Server
        try:
            self._server = cls((self.host, self.port), _Handler)
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
        if path == "/easy/query":
            return json_response(200, self.query(params.get("code", [""])[0]))
        return json_response(200, self.submit(body))

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
            request = json.loads(body)
        except ValueError as err:
            return upstream(BAD_PARAMETER, f"the body is not JSON: {err}")
        if not isinstance(request, dict):
            return upstream(BAD_PARAMETER, "the body must be a JSON object")
        try:
            audio_url, video_url, code = (_field(request, name) for name in ("audio_url", "video_url", "code"))
            if not _CODE.fullmatch(code):
                raise BadParameter(
                    f"code {code!r} must be 1 to 128 letters, digits, '_', '-' or '.', not starting with '.'"
                    " (it names the output file)"
                )
            if len(f"{code}-r.mp4".encode()) > NAME_MAX:
                raise BadParameter(
                    f"code {code!r} is {len(code.encode())} bytes in UTF-8; it names the output file"
                    f" '<code>-r.mp4', which must fit {NAME_MAX} bytes: a code of at most {NAME_MAX - 6} bytes"
                )
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


def _field(request: dict, name: str) -> str:
    value = request.get(name)
    if value is None or value == "":
        raise BadParameter(f"{name} is missing")
    if not isinstance(value, str):
        raise BadParameter(f"{name} must be a string, got {type(value).__name__}")
    return value


class _Server(ThreadingHTTPServer):
    timeout = POLL_S
    api: ApiServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall without DNS; not needed
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        """socketserver prints a traceback to stderr here; a log line instead."""
        log.warning("http_connection_error", client=client_address[0], exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Turns a request into `ApiServer.route` and its Response into bytes; owns errors."""

    server: _Server
    timeout = CLIENT_TIMEOUT_S
    server_version = "heygem-ops"

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
        method = ROUTES.get(path)
        if method is None:
            return self._error(404, f"no route {path}; routes: {', '.join(ROUTES)}")
        if method != self.command:
            return self._error(405, f"{path} takes {method} only", (("Allow", method),))
        body = b""
        if self.command == "POST":
            length = self.headers.get("Content-Length", "0")
            if not length.isdigit():
                self.close_connection = True
                return self._error(400, f"bad Content-Length {length!r}")
            if int(length) > MAX_BODY:
                self.close_connection = True  # the body is left unread
                return self._error(413, f"the body is {length} bytes; the limit is {MAX_BODY}")
            body = self.rfile.read(int(length))
        return api.route(path, params, body)

    def _error(self, status: int, msg: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        """Upstream's envelope on its routes (so its clients can read it), else {"error": ...}."""
        if urlsplit(self.path).path.startswith("/easy/"):
            return json_response(status, upstream(BAD_PARAMETER, msg), headers)
        return json_response(status, {"error": msg}, headers)

    def _send(self, response: Response) -> None:
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
