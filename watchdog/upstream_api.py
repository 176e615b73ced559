"""A small client of upstream's job API (`POST /easy/submit`, `GET /easy/query`), every call bounded.

`http.client` rather than `urllib.request`: no proxy from the environment (`http_proxy` would
send calls to 127.0.0.1 through a proxy), no redirects, one connection per call (upstream's Flask
server closes it anyway), and one timeout that bounds connect, send and every read. A call that
cannot get an answer in time raises `Unreachable`; an answer is returned as it came, whatever its
`code`: what a code means for a task is the caller's to decide (`watchdog.front`).
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import NamedTuple, Optional
from urllib.parse import quote, urlsplit

MAX_ANSWER = 1 << 20  # bytes read of one answer


class Unreachable(Exception):
    """No usable answer within the timeout: refused, reset, timed out, or not upstream's JSON."""


class Answer(NamedTuple):
    code: int  # upstream's code: 10000 success, 10001 busy, 10002 bad parameter, 10004 not found, 9999 error
    msg: str
    data: dict


class UpstreamApi:
    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout_s = timeout_s

    def submit(self, payload: dict) -> Answer:
        return self._call("POST", "/easy/submit", json.dumps(payload, ensure_ascii=False).encode())

    def query(self, code: str) -> Answer:
        return self._call("GET", f"/easy/query?code={quote(code, safe='')}")

    def _call(self, method: str, path: str, body: Optional[bytes] = None) -> Answer:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_ANSWER)
        except (OSError, http.client.HTTPException) as err:  # socket.timeout is an OSError
            raise Unreachable(f"{method} {self.url}{path}: {type(err).__name__}: {err or 'timed out'}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw)
            code = int(doc["code"])
        except (ValueError, TypeError, KeyError):
            raise Unreachable(f"{method} {self.url}{path}: HTTP {resp.status}, not upstream's JSON: {raw[:120]!r}") from None
        data = doc.get("data")
        return Answer(code, str(doc.get("msg") or ""), data if isinstance(data, dict) else {})


__all__ = ["Answer", "Unreachable", "UpstreamApi", "socket"]
