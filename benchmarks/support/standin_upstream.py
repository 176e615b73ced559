"""A stand-in for upstream's service (`app_local.py` of the heygem.ai container): its job API, its
log lines, its failures; for tests and benchmarks of the daemon in front of it (watchdog.front).

    python standin_upstream.py --port 8384 --data DIR [--log dh.log] [--control DIR]
                               [--per-audio-s 0.3] [--base-s 0.05] [--startup-s 0.2]

Like upstream: `POST /easy/submit {audio_url, video_url, code, ...}` (names relative to the data
folder) queues the task in memory and answers 10000; one worker runs tasks one at a time
(progress 0 -> 10 -> 20 .. 90 -> 100, a time of `base_s + per_audio_s x seconds of audio`),
writes `<code>-r.mp4` in the data folder and logs upstream's lines to `--log`; `GET
/easy/query?code=` answers {code, data: {status 1|2|3, progress, result "/<code>-r.mp4", msg}},
and forgets a finished task once it has answered it; an unknown code is 10004. Everything is in
memory: a restart forgets every task. `--startup-s` delays listening (models loading).

Faults, told through files in `--control` (each is taken once, by the task that reaches its
middle, and removed):
    hang   the worker stops mid-task for good; the API keeps answering status 1, progress frozen
    die    the process exits at once (code 3), mid-task
    block  upstream's queue-full line goes to the log and the worker stops, as upstream's does
    fail   (kept while it exists) the task fails: status 3, the file's text as `msg`
`--control` also gets `events.log`: one line per event, `<time.time()> <event> <code>`
(listening, submit, start, hang, die, block, write, done), and `writes.log`: one code per output
written.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import wave
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

QUEUE_FULL = "任务视频驱动队列满，严重阻塞，下游队列异常"


def write_wav(path: Path, seconds: float, rate: int = 8000) -> Path:
    """A silent mono 16-bit WAV: an input whose length the stand-in reads as the task's speech."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * int(seconds * rate))
    return path


class Upstream:
    def __init__(self, args):
        self.data = Path(args.data)
        self.log_path = Path(args.log) if args.log else None
        self.control = Path(args.control) if args.control else None
        self.per_audio_s, self.base_s = args.per_audio_s, args.base_s
        self.tasks: dict[str, dict] = {}
        self.payloads: dict[str, dict] = {}  # every submit as it came (tests read it in process)
        self.queue: deque[str] = deque()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        if self.control:
            self.control.mkdir(parents=True, exist_ok=True)

    # ---- what upstream writes -------------------------------------------------------------
    def log(self, level: str, message: str) -> None:
        if self.log_path is None:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"[{stamp}] [run.py[line:147]] [{level}] [{message}]\n")

    def event(self, what: str, code: str = "-") -> None:
        if self.control is None:
            return
        with open(self.control / "events.log", "a") as f:
            f.write(f"{time.time():.6f} {what} {code} {os.getpid()}\n")

    def take_fault(self) -> str:
        """A fault file, taken (removed) by whoever gets it first; '' when none."""
        if self.control is None:
            return ""
        for name in ("die", "hang", "block"):
            try:
                (self.control / name).unlink()
                return name
            except FileNotFoundError:
                continue
        return ""

    # ---- the API ------------------------------------------------------------------------------
    def submit(self, body: dict) -> dict:
        for name in ("audio_url", "video_url", "code"):
            if not isinstance(body.get(name), str) or not body[name]:
                return {"code": 10002, "success": False, "msg": f"{name} is missing", "data": {}}
        audio = self.data / body["audio_url"].lstrip("/")
        if not audio.is_file():
            return {"code": 10002, "success": False, "msg": f"no such file {body['audio_url']}", "data": {}}
        code = body["code"]
        with self.lock:
            self.payloads[code] = dict(body)
            self.tasks[code] = {"status": 1, "progress": 0, "msg": "queued", "audio": audio, "result": ""}
            self.queue.append(code)
        self.event("submit", code)
        self.log("INFO", f"任务:{code} -> audio_url:{body['audio_url']}  video_url:{body['video_url']}")
        return {"code": 10000, "success": True, "msg": "success", "data": {}}

    def query(self, code: str) -> dict:
        with self.lock:
            task = self.tasks.get(code)
            if task is None:
                return {"code": 10004, "success": True, "msg": "任务不存在", "data": {}}
            data = {"code": code, "status": task["status"], "progress": task["progress"], "result": task["result"],
                    "msg": task["msg"]}
            if task["status"] in (2, 3):  # answered once, forgotten, as upstream does
                del self.tasks[code]
        return {"code": 10000, "success": True, "msg": "", "data": data}

    # ---- the worker ---------------------------------------------------------------------------
    def forget(self) -> None:
        """What a restart does to upstream's tasks (tests in process)."""
        with self.lock:
            self.tasks.clear()
            self.queue.clear()

    def work(self) -> None:
        while not self.stopped.is_set():
            with self.lock:
                code = self.queue.popleft() if self.queue else None
            if code is None:
                self.stopped.wait(0.01)
                continue
            with self.lock:
                known = code in self.tasks
            if known:
                self.run(code)

    def set(self, code: str, **fields) -> None:
        with self.lock:
            if code in self.tasks:
                self.tasks[code].update(fields)

    def run(self, code: str) -> None:
        began = time.time()
        self.event("start", code)
        with self.lock:
            task = self.tasks.get(code)
        if task is None:
            return
        audio = task["audio"]
        with wave.open(str(audio), "rb") as w:
            seconds = w.getnframes() / w.getframerate()
        total = self.base_s + self.per_audio_s * seconds
        frames = max(1, int(seconds * 25))
        self.set(code, progress=10, msg="preprocess")
        self.log("INFO", f"[{code}] -> 预处理耗时:{total * 0.05:.3f}s")
        time.sleep(total * 0.1)
        self.set(code, progress=20, msg="driving")
        self.log("INFO", f"[{code}]任务视频驱动队列启动 batch_size:4, len:{frames}")
        steps = 10
        for i in range(steps):
            time.sleep(total * 0.8 / steps)
            pct = 20 + (i + 1) * 70 // steps
            with self.lock:
                if self.tasks.get(code) is not task:  # forgotten (in process: a restart)
                    return
            self.set(code, progress=pct)
            if i == steps // 2 - 1:
                fault = self.take_fault()
                if fault:
                    self.event(fault, code)
                failing = self.control / "fail" if self.control else None
                if not fault and failing is not None and failing.exists():
                    reason = failing.read_text().strip() or "任务执行失败"
                    self.log("ERROR", f"[{code}]任务执行失败，异常信息:[{reason}]")
                    self.set(code, status=3, msg=reason)
                    self.event("fail", code)
                    return
                if fault == "die":
                    os._exit(3)
                if fault == "block":
                    self.log("ERROR", f"[{code}]{QUEUE_FULL}")
                if fault in ("hang", "block"):
                    self.stopped.wait()  # stuck for good, as upstream's writer waiting on a queue
                    return
        out = self.data / f"{code}-r.mp4"
        out.write_bytes(b"stand-in output of " + code.encode() + b"\n")
        if self.control:
            with open(self.control / "writes.log", "a") as f:
                f.write(code + "\n")
        self.event("write", code)
        time.sleep(total * 0.1)
        self.set(code, status=2, progress=100, msg="success", result=f"/{code}-r.mp4")
        self.log("INFO", f">>> 任务:{code} 耗时:{time.time() - began:.2f} ")
        self.event("done", code)


class Handler(BaseHTTPRequestHandler):
    server_version = "standin-upstream"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/easy/query":
            return self._send(404, {"error": "no route"})
        self._send(200, self.server.upstream.query(parse_qs(url.query).get("code", [""])[0]))

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/easy/submit":
            return self._send(404, {"error": "no route"})
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(200, {"code": 10002, "success": False, "msg": "not JSON", "data": {}})
        self._send(200, self.server.upstream.submit(body if isinstance(body, dict) else {}))

    def _send(self, status: int, doc: dict) -> None:
        raw = json.dumps(doc, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format, *args) -> None:
        pass


def serve(args) -> ThreadingHTTPServer:
    """Listen (after the start-up delay) and run the worker; the caller runs `serve_forever`."""
    up = Upstream(args)
    up.log("INFO", "TransDhTask init")
    time.sleep(args.startup_s)  # loading models: the port is not open yet
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.upstream = up
    threading.Thread(target=up.work, name="worker", daemon=True).start()
    up.event("listening")
    return server


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--log")
    parser.add_argument("--control")
    parser.add_argument("--per-audio-s", type=float, default=0.3)
    parser.add_argument("--base-s", type=float, default=0.05)
    parser.add_argument("--startup-s", type=float, default=0.2)
    return parser.parse_args(argv)


def main() -> None:
    serve(parse()).serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
