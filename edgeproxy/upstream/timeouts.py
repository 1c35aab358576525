# -*- test-case-name: tests.test_pool -*-
"""
L{ResponseDeadlines}: the response timeout of every attempt of one pool,
kept by one timer.

Every attempt of a pool has the same C{response_timeout}, so deadlines come
in the order attempts are watched: one insertion-ordered dict and one
timer, re-armed for the oldest deadline when it fires, do the work of a
C{callLater} created and cancelled per request.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["ResponseDeadlines", "Watched"]

log = Logger()

_SWEEPING = object()
"""L{ResponseDeadlines._timer} while the due deadlines are handled."""


class Watched(Protocol):
    """An attempt waiting for its response head."""

    deadline: float | None
    """When the head is due; set by L{ResponseDeadlines.watch}."""

    def timeOut(self) -> None:
        """The head is overdue."""


class ResponseDeadlines:
    """
    The attempts of one pool waiting for their response head, oldest
    deadline first.
    """

    def __init__(self, clock: IReactorTime, timeout: float, upstream: str) -> None:
        """
        @param timeout: the upstream's C{response_timeout}.
        @param upstream: its name, for the log.
        """
        self._clock = clock
        self._timeout = timeout
        self._upstream = upstream
        self._watched: dict[Watched, None] = {}
        self._timer: Any = None

    def watch(self, attempt: Watched) -> None:
        """
        Time C{attempt} out C{timeout} seconds from now (its C{deadline})
        unless L{unwatch} comes first.
        """
        attempt.deadline = self._clock.seconds() + self._timeout
        self._watched[attempt] = None
        if self._timer is None:
            self._timer = self._clock.callLater(self._timeout, self._due)

    def unwatch(self, attempt: Watched) -> None:
        self._watched.pop(attempt, None)

    def close(self) -> None:
        """With nothing watched, leave nothing scheduled."""
        if not self._watched and self._timer not in (None, _SWEEPING):
            timer, self._timer = self._timer, None
            timer.cancel()

    def _due(self) -> None:
        # Attempts watched while this runs (retries of those timed out
        # here) join the end of the line: the timer armed below for the
        # oldest deadline left covers them, so none is armed meanwhile.
        self._timer = _SWEEPING
        watched = self._watched
        clock = self._clock
        while watched:
            attempt = next(iter(watched))
            left = attempt.deadline - clock.seconds()  # type: ignore[operator]
            # A millisecond early is on time: the reactor's own timers are
            # no finer, and float rounding must not re-arm for 1e-16 s.
            if left > 0.001:
                self._timer = clock.callLater(left, self._due)
                return
            del watched[attempt]
            try:
                attempt.timeOut()
            except Exception:
                # The next deadlines must still be kept.
                log.failure(
                    "upstream {upstream}: timing out a request failed", upstream=self._upstream
                )
        self._timer = None
