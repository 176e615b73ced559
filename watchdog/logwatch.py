"""External mode: the supervised service's log, read each tick for upstream's failure lines.

`LogWatch` follows one file from where it was last read (surviving truncation and rotation) and
reads it through `watchdog.upstream_log`: upstream's failure signatures are on by default,
configured `[[daemon.log_patterns]]` add to them. A log line is evidence of something that already
happened, so its alert fires at the first tick that reads it (`for_s=0`, whatever the book's `for`
duration of the same alert from a probe) and resolves once no matching line has come for the
quiet period (`[daemon] log_quiet_s`). One alert instance per alert and task code ("log" for
lines without one), so a second task that fails the same way is news of its own.

Lines written before the watch was created are history, not alerts (`heygem-ops doctor --log`
reads them): the watch starts at the end of an existing file, and at the start of one that
appears or replaces it later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from watchdog.alerts import Condition
from watchdog import upstream_log
from watchdog.upstream_log import Hit, Reader, Signature

LOG_QUIET_S = 60.0
PENDING_FLUSH_S = 5.0  # a traceback still open after this long without new lines is read as it is


@dataclass
class LogWatch:
    path: Path
    signatures: list[Signature]
    quiet_s: float = LOG_QUIET_S
    offset: int = 0
    inode: Optional[int] = None
    last_match: dict = field(default_factory=dict)  # (alert, key) -> (time read, Hit)
    reader: Optional[Reader] = None
    last_data: float = float("-inf")  # when a read last brought lines

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.reader is None:
            self.reader = Reader(self.signatures)

    @classmethod
    def from_config(cls, path, patterns=(), builtins: bool = True, quiet_s: float = LOG_QUIET_S,
                    from_end: bool = True) -> "LogWatch":
        """Upstream's signatures (unless `builtins` is off) plus `patterns` (LogPattern)."""
        watch = cls(Path(path), upstream_log.signatures(patterns, builtins), quiet_s)
        if from_end:
            watch.skip_existing()
        return watch

    @classmethod
    def of(cls, daemon) -> "LogWatch":
        """From `[daemon]` (DaemonConfig): log_file, log_patterns, log_builtin_patterns, log_quiet_s."""
        return cls.from_config(daemon.log_file, daemon.log_patterns, daemon.log_builtin_patterns, daemon.log_quiet_s)

    def skip_existing(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        self.inode, self.offset = st.st_ino, st.st_size

    def read(self, now: float, max_bytes: int = 4 << 20) -> int:
        """Scan lines added since the last call (at most `max_bytes`); returns signatures found."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return 0
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.inode, self.offset = st.st_ino, 0
            self.reader = Reader(self.signatures)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(max_bytes)
        complete = chunk.rfind(b"\n") + 1
        self.offset += complete
        lines = [raw.decode("utf-8", "replace").rstrip("\r") for raw in chunk[:complete].split(b"\n")[:-1]]
        entries = list(self.reader.feed(lines))
        if lines:
            self.last_data = now
        elif now - self.last_data >= PENDING_FLUSH_S:  # a traceback cut off (its writer died)
            entries += self.reader.flush()
        found = 0
        for entry in entries:
            for hit in entry.hits:
                self.last_match[(hit.alert, hit.task or "log")] = (now, hit)
                found += 1
        return found

    def conditions(self, now: float) -> list[Condition]:
        """One condition per alert and task seen: active until `quiet_s` without a new matching
        line; reported inactive once (so the book resolves it with this evidence), then forgotten."""
        out = []
        for (alert, key), (seen, hit) in list(self.last_match.items()):
            active = now - seen < self.quiet_s
            out.append(self._condition(key, hit, active))
            if not active:
                del self.last_match[(alert, key)]
        return out

    def _condition(self, key: str, hit: Hit, active: bool) -> Condition:
        summary = hit.summary()
        if not active:
            summary += f"; no such line for {self.quiet_s:g} s"
        evidence = {"file": str(self.path), **hit.evidence()}
        if hit.signature.builtin:
            evidence["fix"] = hit.signature.fix_text()
        return Condition(hit.alert, key, active, hit.signature.severity, summary, evidence, for_s=0.0)
