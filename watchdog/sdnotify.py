"""sd_notify(3) without libsystemd: tell systemd we are ready, what we are doing, that we live.

With `Type=notify` systemd considers the daemon started only on READY=1, shows STATUS= in
`systemctl status`, and with `WatchdogSec=` kills and restarts it when WATCHDOG=1 pings stop,
which catches a daemon whose tick loop hangs. The protocol is one datagram of newline-separated
`KEY=value` lines to the AF_UNIX socket named in $NOTIFY_SOCKET (a path, or `@name` for an
abstract socket).

Outside systemd $NOTIFY_SOCKET is unset and the notifier does nothing. A failed send never
raises: the daemon's health does not depend on systemd hearing it; the caller logs the False.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping, Optional, Union

_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: Optional[str]) -> Union[str, bytes, None]:
    """$NOTIFY_SOCKET -> a sendto() address; None when unset or of a kind we do not speak (vsock)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def _ping_interval(environ: Mapping[str, str]) -> Optional[float]:
    """Half of $WATCHDOG_USEC in seconds, as sd_watchdog_enabled(3) advises; None when off or not ours."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    return usec / 2e6


class Notifier:
    """A handle on systemd's notification socket (or on nothing, outside systemd)."""

    def __init__(self, address: Union[str, bytes, None], ping_interval_s: Optional[float] = None, timeout_s: float = 0.1):
        self.address = address
        self._ping_interval_s = ping_interval_s
        self.timeout_s = timeout_s
        self._sock: Optional[socket.socket] = None

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, unset: bool = False) -> "Notifier":
        """Read $NOTIFY_SOCKET and $WATCHDOG_USEC/$WATCHDOG_PID.

        `unset=True` removes them from os.environ so that workers we spawn do not inherit them
        and talk to systemd on our behalf (only `environ=None`, the real environment, is changed).
        """
        env = os.environ if environ is None else environ
        notifier = cls(_address(env.get("NOTIFY_SOCKET")), _ping_interval(env))
        if unset and environ is None:
            for name in _ENV:
                os.environ.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> Optional[float]:
        """Seconds between WATCHDOG=1 pings (half of systemd's timeout), or None: do not ping."""
        return self._ping_interval_s

    def send(self, *lines: str) -> bool:
        """Send `KEY=value` lines as one datagram. True when sent, or when there is no socket."""
        if self.address is None:
            return True
        data = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full receive queue (systemd busy, or a reader that stopped reading) must not
                # stall the tick: a short bounded send, then the message is dropped and reported.
                self._sock.settimeout(self.timeout_s)
            self._sock.sendto(data, self.address)
        except OSError:
            return False
        return True

    def ready(self) -> bool:
        return self.send("READY=1")

    def status(self, line: str) -> bool:
        return self.send(f"STATUS={line}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
