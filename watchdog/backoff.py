"""When to restart a worker that exited, and when to stop trying.

A worker that dies at once and is restarted at once burns CPU, floods the log and can hold a GPU
in a loop of model loads. So each quick exit doubles the wait before the next start (from
`initial_s` up to `max_s`), a run that lasted `stable_s` resets the wait, and more than
`crash_loop_restarts` exits within `crash_loop_window_s` stops restarts altogether: the daemon
then raises `crash_loop` and leaves the fix to a person (systemd's StartLimitBurst, per worker).

Pure: one instance per worker, fed `now` by the caller; no clock, no process.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from watchdog.config import ActionsConfig


class RestartPolicy:
    """Back-off and crash-loop bookkeeping for one worker.

    `stable_s` defaults to `max_s`: a run longer than the longest back-off is no longer part of a
    tight crash cycle, so the next exit starts again from `initial_s`.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        crash_loop_restarts: int,
        crash_loop_window_s: float,
        stable_s: Optional[float] = None,
    ):
        self.initial_s = initial_s
        self.max_s = max_s
        self.crash_loop_restarts = crash_loop_restarts
        self.crash_loop_window_s = crash_loop_window_s
        self.stable_s = max_s if stable_s is None else stable_s
        self.restarts = 0  # starts after the first; feeds heygem_worker_restarts_total
        self._started_at: Optional[float] = None
        self._ever_started = False
        self._exited_at: Optional[float] = None
        self._quick_exits = 0  # consecutive exits that came before `stable_s`
        self._exits: deque[float] = deque()

    @classmethod
    def from_config(cls, actions: "ActionsConfig") -> "RestartPolicy":
        return cls(actions.backoff_initial_s, actions.backoff_max_s, actions.crash_loop_restarts, actions.crash_loop_window_s)

    @property
    def running(self) -> bool:
        """Started and not yet recorded as exited."""
        return self._started_at is not None

    def record_start(self, now: float) -> None:
        if self._ever_started:
            self.restarts += 1
        self._ever_started = True
        self._started_at = now

    def record_stop(self) -> None:
        """Stopped on purpose (an operator's restart, a unit that refuses to serve): not an exit
        that counts toward back-off or the crash loop."""
        self._started_at = None

    def record_exit(self, now: float) -> None:
        stable = self._started_at is not None and now - self._started_at >= self.stable_s
        self._quick_exits = 1 if stable else self._quick_exits + 1
        self._started_at = None
        self._exited_at = now
        self._exits.append(now)
        while self._exits and self._exits[0] <= now - self.crash_loop_window_s:
            self._exits.popleft()

    def delay(self) -> float:
        """The wait after the latest exit: initial_s, doubled per consecutive quick exit, capped."""
        if self._quick_exits == 0:
            return 0.0
        return min(self.initial_s * 2 ** (self._quick_exits - 1), self.max_s)

    def next_start_at(self, now: float) -> float:
        """The earliest time >= now at which the worker may start again (start when it is <= now).

        Does not look at crash loops: ask `crash_looping` first.
        """
        if self._exited_at is None:
            return now
        return max(now, self._exited_at + self.delay())

    def crash_looping(self, now: float) -> bool:
        """More than `crash_loop_restarts` exits within the last `crash_loop_window_s`."""
        recent = sum(1 for t in self._exits if t > now - self.crash_loop_window_s)
        return recent > self.crash_loop_restarts

    def reset(self) -> None:
        """Forget the history (an operator's explicit restart after fixing the cause)."""
        self._quick_exits = 0
        self._exited_at = None
        self._exits.clear()
