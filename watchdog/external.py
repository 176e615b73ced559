"""External mode: supervise a service the daemon did not build, such as upstream's `app.py`.

The daemon starts the command in its own session (so a Ctrl-C on the daemon's terminal does not
reach it), marks its environment with `HEYGEM_OPS_DAEMON=<pid>:<create time>` (how `heygem-ops
clean` recognises the service's orphans without matching command lines), restarts it with
back-off when it dies, and reads its log for configured patterns (upstream's `队列满` line).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from watchdog.alerts import Condition
from watchdog.procs import ProcRef, terminate, tree

MARKER = "HEYGEM_OPS_DAEMON"
LOG_MATCH_WINDOW_S = 60.0


def marker_value() -> str:
    """This daemon's identity as the workers' environment carries it."""
    import psutil

    me = psutil.Process()
    return f"{me.pid}:{me.create_time()}"


class External:
    """One external command: start, watch, stop, restart."""

    def __init__(self, command: list[str], env: Optional[dict] = None, cwd: Optional[str] = None):
        if not command:
            raise ValueError("[daemon] command: external mode needs the command to run")
        self.command = list(command)
        self.env = {**os.environ, **(env or {}), MARKER: marker_value()}
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None
        self.ref: Optional[ProcRef] = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, start_new_session=True,
                                     stdin=subprocess.DEVNULL)
        self.ref = ProcRef.of(self.proc.pid)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def exit_code(self) -> Optional[int]:
        """None while running (or never started); the exit code (negative: signal) once it ended."""
        return None if self.proc is None else self.proc.poll()

    def refs(self) -> list[ProcRef]:
        """The command's whole process tree, pinned by create time."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return tree(self.proc.pid)
        except Exception:  # gone between poll and scan
            return []

    def stop(self, grace_s: float) -> dict:
        """TERM the whole tree (children first would race their parent's own cleanup, so all at
        once), KILL what outlives the grace, and collect the command's exit status."""
        result = terminate(self.refs(), grace_s)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=max(1.0, grace_s))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5.0)
        return result


@dataclass
class LogWatch:
    """Follows a log file from where it was last read; survives truncation and rotation."""

    path: Path
    patterns: list  # [(compiled regex, alert name, severity)]
    offset: int = 0
    inode: Optional[int] = None
    last_match: dict = field(default_factory=dict)  # alert -> (time, line)

    @classmethod
    def from_config(cls, path: Path, patterns) -> "LogWatch":
        return cls(Path(path), [(re.compile(p.regex), p.alert, p.severity) for p in patterns])

    def read(self, now: float, max_bytes: int = 4 << 20) -> int:
        """Scan lines added since the last call (at most `max_bytes`); returns lines matched."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return 0
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.inode, self.offset = st.st_ino, 0
        matched = 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(max_bytes)
        complete = chunk.rfind(b"\n") + 1
        self.offset += complete
        for raw in chunk[:complete].splitlines():
            line = raw.decode("utf-8", "replace")
            for regex, alert, _ in self.patterns:
                if regex.search(line):
                    self.last_match[alert] = (now, line.strip()[:300])
                    matched += 1
        return matched

    def conditions(self, now: float) -> list[Condition]:
        """One condition per pattern: active while its last match is recent. A log line is
        evidence that already happened, so it fires at once (`for_s=0`), whatever the book's
        `for` duration of the same alert from a probe."""
        out = []
        for regex, alert, severity in self.patterns:
            seen = self.last_match.get(alert)
            active = seen is not None and now - seen[0] <= LOG_MATCH_WINDOW_S
            out.append(Condition(alert, "log", active, severity, f"log line matched /{regex.pattern}/",
                                 {"file": str(self.path), "line": seen[1] if seen else None}, for_s=0.0))
        return out
