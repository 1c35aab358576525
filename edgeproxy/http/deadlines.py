# -*- test-case-name: tests.test_server -*-
"""
L{DeadlineQueue}: one timeout (the idle timeout or the header deadline) of
every connection of a listener, kept with one C{DelayedCall} for all of
them.

A Twisted C{DelayedCall} per idle kept-alive connection (with its
dictionary and bound method) was most of what an idle connection cost
beyond its TLS state; here a connection costs one dictionary entry and a
float per armed timeout.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.runtime import seconds as runtimeSeconds

__all__ = ["DeadlineQueue"]

log = Logger()


class DeadlineQueue:
    """
    The pending deadlines of one timeout of every connection of one
    listener, with one DelayedCall for all of them.

    Every connection of a
    queue has the same timeout, so deadlines set in arrival order are in
    deadline order: an insertion-ordered dictionary (connection to deadline)
    is the whole priority queue.  Arming (or moving) a deadline puts the
    connection at the end; the one DelayedCall is due at the first entry's
    deadline and, when it fires, expires every entry whose deadline has
    passed and is scheduled again for the next one.  When the first entry
    is moved or removed, the call is moved to the new first deadline (or
    cancelled with nothing left), as a connection's own DelayedCall was
    moved or cancelled: no call fires early and none outlives the last
    deadline.  The clock is the one behind the connections' C{callLater} (the
    listener's reactor); a clock set back (the wall clock of a real reactor)
    can make a later-armed deadline fire late, never early.

    @ivar period: the timeout, in seconds.
    @ivar entries: connection to the time its deadline passes, first due first.
    """

    __slots__ = ("period", "entries", "_expire", "_callLater", "_seconds", "_call", "_due")

    def __init__(
        self, period: float, expire: Callable[[Any], None], callLater: Callable[..., IDelayedCall]
    ) -> None:
        """
        @param expire: called with each connection whose deadline passes (it is
            out of the queue by then).
        @param callLater: the clock's C{callLater} (a bound method of a
            reactor or C{Clock}, whose C{seconds} the deadlines are read on).
        """
        self.period = period
        self.entries: dict[Any, float] = {}
        self._expire = expire
        self._callLater = callLater
        self._seconds: Callable[[], float] = getattr(
            getattr(callLater, "__self__", None), "seconds", runtimeSeconds
        )
        self._call: IDelayedCall | None = None
        self._due = 0.0

    def arm(self, connection: Any) -> None:
        """
        Set C{connection}'s deadline to C{period} from now, whether it had one
        or not.
        """
        entries = self.entries
        previous = entries.pop(connection, None)
        now = self._seconds()
        entries[connection] = now + self.period
        call = self._call
        if call is None:
            self._schedule(now)
        elif previous == self._due:
            # The first deadline moved (on a busy site, rarely: the connection
            # idle the longest; with one connection, every time).
            due = next(iter(entries.values()))
            if due != self._due:
                self._due = due
                call.reset(due - now)

    def move(self, connection: Any) -> None:
        """
        Set C{connection}'s deadline to C{period} from now if it has one.
        """
        entries = self.entries
        previous = entries.pop(connection, None)
        if previous is not None:
            now = self._seconds()
            entries[connection] = now + self.period
            if previous == self._due:
                call = self._call
                if call is None:
                    self._schedule(now)
                else:
                    due = next(iter(entries.values()))
                    if due != self._due:
                        self._due = due
                        call.reset(due - now)

    def disarm(self, connection: Any) -> None:
        """
        Forget C{connection}'s deadline, if it has one.
        """
        previous = self.entries.pop(connection, None)
        if previous is not None and (previous == self._due or not self.entries):
            self._schedule(self._seconds())

    def _schedule(self, now: float) -> None:
        # The call is due at the first deadline: moved when that changed,
        # made when there was none, cancelled when no deadline is left.
        entries = self.entries
        call = self._call
        if not entries:
            self._call = None
            if call is not None and call.active():
                call.cancel()
            return
        due = next(iter(entries.values()))
        if call is None:
            self._due = due
            self._call = self._callLater(max(0.0, due - now), self._fire)
        elif due != self._due:
            self._due = due
            call.reset(max(0.0, due - now))

    def _fire(self) -> None:
        self._call = None
        now = self._seconds()
        entries = self.entries
        expired = []
        deadline: float | None
        for connection, deadline in entries.items():
            if deadline > now:
                break
            expired.append(connection)
        expire = self._expire
        for connection in expired:
            # An earlier expiry may have moved or removed it meanwhile.
            deadline = entries.get(connection)
            if deadline is None or deadline > now:
                continue
            del entries[connection]
            try:
                expire(connection)
            except Exception:
                # What the reactor did with an exception from a
                # connection's own DelayedCall; the other connections due now
                # still expire.
                log.failure("deadline expiry of {connection} failed", connection=repr(connection))
        self._schedule(now)
