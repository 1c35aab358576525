# -*- test-case-name: tests.test_logs -*-
"""
The process log: what an operator reads in the terminal or the journal.

This module owns three things, and L{formatAddress} (how a line names an
address).

L{LogPolicy} and L{ProcessLogObserver}
    C{[edgeproxy] log_level} (C{debug}, C{info}, C{warn}, C{error}) and
    C{log_format} (C{auto}, C{text}, C{journald}), changeable on reload: the
    observer reads the one L{policy} at every event.  It writes one line per
    event, never a Python C{b''} repr (byte strings in an event's fields are
    shown as text), and demotes to C{debug} the start-up chatter Twisted
    writes for every port and factory (C{Starting factory <... object at
    0x...>}, C{ListenerFactory starting on 8443}, C{(TCP Port 8443 Closed)}):
    edgeproxy logs the listeners itself, by name.

    Under systemd (C{log_format = journald}, or C{auto} with standard
    output connected to the journal as C{$JOURNAL_STREAM} says, see
    C{sd_journal_stream_fd(3)}), every line starts with its syslog priority
    as C{<N>} (C{sd-daemon(3)}), so that C{journalctl -p warning} shows the
    warnings and errors alone; the journal adds the time itself.  A message
    of several lines (a traceback) has the prefix on each line, since the
    journal reads each line as an entry.

    C{twistd edgeproxy} uses it when it runs in the foreground (the tap sets
    twistd's C{--logger} to L{makeObserver} unless one is given).

L{RefusalSummary}
    Requests the proxy refuses itself (unknown host, bad request...) are
    per-request outcomes: their place is the access log.  The process log
    gets at most one line per interval about them::

        refused 16,724 requests in the last 10s: 421 misdirected request x 16,700, 400 malformed request x 24

    Call L{RefusalSummary.note} once per refusal.

L{Repeats}
    Notes an operator needs once, not once per request or connection: a
    backend failing every request sent to it, a request not retried, a
    client's HTTP/2 errors.  The first of each kind in an interval is
    logged in full at its level, the others at C{debug}, and one line at
    the end of the interval counts them::

        upstream app backend 10.0.0.1:8080 failed: 502 connect failed: ConnectionRefusedError: ...
        repeated in the last 10s: upstream app backend 10.0.0.1:8080 failed (502 connect_failed) x 1,086; upstream app: GET not retried (retry budget spent) x 898

    Call L{Repeats.emit} instead of the logger's method.

Nothing here imports the global reactor: clocks are passed in.
"""

from __future__ import annotations

import io
import os
import re
import sys
import weakref
from collections.abc import Mapping
from typing import Any, TextIO

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    ILogObserver,
    LogLevel,
    Logger,
    formatEvent,
    formatTime,
)
from zope.interface import implementer

__all__ = [
    "LEVELS",
    "FORMATS",
    "LogPolicy",
    "policy",
    "ProcessLogObserver",
    "makeObserver",
    "journalPriority",
    "isJournal",
    "levelOf",
    "shown",
    "RefusalSummary",
    "refusals",
    "Repeats",
    "repeats",
    "reasonOf",
    "formatAddress",
]

LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
"""C{log_level} values."""

FORMATS = ("auto", "text", "journald")
"""C{log_format} values."""

# sd-daemon(3) / syslog(3) priorities.
_PRIORITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}

# What Twisted logs for every port and factory: useful when debugging
# Twisted, noise for an operator (and "object at 0x..." says nothing).
_CHATTER = re.compile(
    r"(Starting|Stopping) factory "
    # "<the port's log prefix> starting on <port>": a prefix may hold
    # spaces ("EdgeSite (TLS)", "supervisor (for the workers)").
    r"|.+ starting on \S+\Z"
    r"|\((TCP|UDP|UNIX) Port \S+ Closed\)\Z"
    r"|\(Port \S+ Closed\)\Z"
    r"|reactor class: "
    r"|Main loop terminated\.\Z"
)


def journalPriority(level: LogLevel) -> int:
    """The syslog priority of a Twisted log level (C{warn} -> 4)."""
    return _PRIORITIES.get(level, 6)


class LogPolicy:
    """
    The process log's level and format; one instance, L{policy}, set from
    the configuration at start and at every reload.
    """

    def __init__(self) -> None:
        self.level: LogLevel = LogLevel.info
        self.format: str = "auto"

    def configure(self, level: str, format: str) -> None:
        """
        @param level: a key of L{LEVELS}.
        @param format: one of L{FORMATS}.
        @raise ValueError: for anything else (the configuration checks both).
        """
        if level not in LEVELS or format not in FORMATS:
            raise ValueError(f"log_level {level!r} / log_format {format!r}")
        self.level = LEVELS[level]
        self.format = format


policy = LogPolicy()
"""The process's log policy."""


def isJournal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Whether C{stream} is the journal: C{$JOURNAL_STREAM} is the
    C{device:inode} of the stream systemd connected, and is inherited by
    children whose output goes elsewhere, hence the comparison.
    """
    value = environ.get("JOURNAL_STREAM", "")
    device, colon, inode = value.partition(":")
    if not colon or not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def _text(value: object) -> object:
    """A field value with byte strings shown as text (never C{b'...'})."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, (list, tuple)) and any(isinstance(v, (bytes, bytearray)) for v in value):
        return type(value)(_text(v) for v in value) if isinstance(value, list) else tuple(
            _text(v) for v in value
        )
    return value


def levelOf(event: Mapping[str, Any]) -> LogLevel:
    """
    The level an event is shown at: its own, except Twisted's start-up
    chatter, which is C{debug} here.
    """
    return _level(event)


def shown(event: Mapping[str, Any], logPolicy: LogPolicy | None = None) -> dict[str, Any] | None:
    """
    C{event} as the process log shows it (byte strings as text), or
    L{None} when L{policy} (or C{logPolicy}) hides it; for processes that
    pass their events on (the workers) instead of writing them.
    """
    if levelOf(event) < (policy if logPolicy is None else logPolicy).level:
        return None
    return {key: _text(value) for key, value in event.items()}


def _level(event: Mapping[str, Any]) -> LogLevel:
    level = event.get("log_level", LogLevel.info)
    if level not in _PRIORITIES:
        level = LogLevel.info
    if level == LogLevel.info:
        format = event.get("log_format") or ""
        text = format if isinstance(format, str) else ""
        if "{" in text or not text:
            text = formatEvent(dict(event))
        if _CHATTER.match(text):
            return LogLevel.debug
    return level


@implementer(ILogObserver)
class ProcessLogObserver:
    """
    Writes the events L{policy} lets through to a text stream, one line
    each (see the module docstring).
    """

    def __init__(
        self,
        stream: TextIO,
        logPolicy: LogPolicy | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self._stream = stream
        self._policy = policy if logPolicy is None else logPolicy
        self._journal = isJournal(stream, environ)

    def _prefixed(self) -> bool:
        mode = self._policy.format
        return mode == "journald" or (mode == "auto" and self._journal)

    def __call__(self, event: Mapping[str, Any]) -> None:
        level = _level(event)
        if level < self._policy.level:
            return
        shown = {key: _text(value) for key, value in event.items()}
        text = formatEvent(shown)
        failure = event.get("log_failure")
        if failure is not None:
            try:
                text = f"{text}\n{failure.getTraceback()}".rstrip("\n")
            except Exception:  # a broken failure must not break logging
                pass
        system = event.get("log_system") or f"{event.get('log_namespace', '-')}#{level.name}"
        if self._prefixed():
            priority = journalPriority(level)
            lines = [f"<{priority}>[{system}] {line}" for line in text.split("\n")]
        else:
            when = formatTime(event.get("log_time"), "%Y-%m-%dT%H:%M:%S%z")
            lines = [f"{when} [{system}] {line}" for line in text.split("\n")]
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full output must not stop the proxy


def makeObserver() -> ProcessLogObserver:
    """
    The observer for C{twistd edgeproxy} in the foreground (twistd's
    C{--logger}): standard output, as twistd itself would write.
    """
    return ProcessLogObserver(sys.stdout)


# Refusals ---------------------------------------------------------------

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def reasonOf(error: BaseException) -> str:
    """
    A short, bounded label for a refusal: its exception class in words
    (C{MisdirectedRequest} -> C{"misdirected request"}), never the message,
    which holds client input.
    """
    return _CAMEL.sub(" ", type(error).__name__).lower()


class _Interval:
    """
    What L{RefusalSummary} and L{Repeats} share: the timer of an interval,
    armed by its first note and cancelled when its line is logged early.
    """

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        # Any: mypy reads zope interfaces' methods as taking self.
        self._clock: Any = clock
        self._interval = interval
        self._pending: IDelayedCall | None = None

    def _arm(self) -> None:
        if self._pending is None:
            self._pending = self._clock.callLater(self._interval, self.flush)

    def _disarm(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and pending.active():
            pending.cancel()

    def flush(self) -> None:
        raise NotImplementedError()


class RefusalSummary(_Interval):
    """
    Counts refusals and logs one line per C{interval} about them: how many,
    and how many of each status and reason, most frequent first.  An
    interval without a refusal logs nothing.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = 10.0,
        log: Logger | None = None,
        maxReasons: int = 8,
    ) -> None:
        """
        @param clock: schedules the summary at the end of an interval.
        @param interval: seconds from the first refusal to its summary.
        @param maxReasons: distinct C{(status, reason)} pairs counted per
            interval; the others are counted as C{"other"}, so that a
            client cannot grow the summary (or memory) without bound.
        """
        super().__init__(clock, interval)
        self._log = log if log is not None else Logger(namespace="edgeproxy.refusals")
        self._maxReasons = maxReasons
        self._counts: dict[tuple[int, str], int] = {}
        self._total = 0

    def note(self, status: int, reason: str) -> None:
        """
        Count one refused request.

        @param status: the status it was answered with.
        @param reason: a short label of bounded variety, such as
            L{reasonOf}C{(error)}; never client input.
        """
        key = (status, reason)
        if key not in self._counts and len(self._counts) >= self._maxReasons:
            key = (status, "other")
        self._counts[key] = self._counts.get(key, 0) + 1
        self._total += 1
        self._arm()

    def flush(self) -> None:
        """Log the summary of the refusals counted so far, if any, and start over."""
        self._disarm()
        if not self._total:
            return
        counts, total = self._counts, self._total
        self._counts, self._total = {}, 0
        parts = [
            f"{status} {reason} x {count:,}"
            for (status, reason), count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        ]
        self._log.info(
            "refused {total} {requests} in the last {interval}: {summary}",
            total=f"{total:,}",
            requests="request" if total == 1 else "requests",
            interval=_seconds(self._interval),
            summary=", ".join(parts),
            refused=total,
            reasons={f"{status} {reason}": count for (status, reason), count in counts.items()},
        )


def _seconds(interval: float) -> str:
    return f"{interval:g}s"


_byClock: weakref.WeakKeyDictionary[Any, RefusalSummary] = weakref.WeakKeyDictionary()


def refusals(clock: IReactorTime) -> RefusalSummary:
    """
    The one L{RefusalSummary} of C{clock} (the reactor the listeners run
    on), made at its first use.
    """
    summary = _byClock.get(clock)
    if summary is None:
        summary = _byClock[clock] = RefusalSummary(clock)
    return summary


class Repeats(_Interval):
    """
    Logs the first note of each kind per C{interval} in full, the others
    at C{debug}, and one line per interval with how many there were of
    each kind (see the module docstring).  An interval without a note
    logs nothing; a kind noted once, in full at C{info} or above, is left
    out of the count.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = 10.0,
        log: Logger | None = None,
        maxKinds: int = 64,
    ) -> None:
        """
        @param clock: schedules the count at the end of an interval.
        @param interval: seconds from the first note to the count.
        @param maxKinds: distinct kinds told apart per interval; notes of
            others are logged at C{debug} only and counted as C{"other"}, so
            that neither the line nor memory grows without bound.
        """
        super().__init__(clock, interval)
        self._log = log if log is not None else Logger(namespace="edgeproxy.repeats")
        self._maxKinds = maxKinds
        self._kinds: dict[str, list[Any]] = {}

    def emit(self, logger: Logger, level: LogLevel, kind: str, format: str, **fields: Any) -> None:
        """
        Log C{format} with C{fields} through C{logger} at C{level} when it
        is the first of C{kind} in this interval, else at C{debug}; count
        it either way.

        @param kind: what the count names, of bounded variety (an
            upstream, a backend, a reason label: never client input).
        """
        kinds = self._kinds
        seen = kinds.get(kind)
        if seen is None:
            if len(kinds) >= self._maxKinds:
                kind, level = "other", LogLevel.debug
                seen = kinds.get(kind)
            if seen is None:
                seen = kinds[kind] = [0, level]
                logger.emit(level, format, **fields)
            else:
                logger.emit(LogLevel.debug, format, **fields)
        else:
            logger.emit(LogLevel.debug, format, **fields)
        seen[0] += 1
        self._arm()

    def flush(self) -> None:
        """Log the count of the interval so far, if there is one, and start over."""
        self._disarm()
        kinds, self._kinds = self._kinds, {}
        counted = [
            (kind, count, level)
            for kind, (count, level) in kinds.items()
            if count > 1 or level < LogLevel.info
        ]
        if not counted:
            return
        counted.sort(key=lambda item: -item[1])
        level = max(max(item[2] for item in counted), LogLevel.info)
        self._log.emit(
            level,
            "repeated in the last {interval}: {summary}",
            interval=_seconds(self._interval),
            summary="; ".join(f"{kind} x {count:,}" for kind, count, _ in counted),
            repeated={kind: count for kind, count, _ in counted},
        )


_repeatsByClock: weakref.WeakKeyDictionary[Any, Repeats] = weakref.WeakKeyDictionary()


def repeats(clock: IReactorTime) -> Repeats:
    """
    The one L{Repeats} of C{clock} (the reactor), made at its first use.
    """
    found = _repeatsByClock.get(clock)
    if found is None:
        found = _repeatsByClock[clock] = Repeats(clock)
    return found


def formatAddress(address: Any) -> str:
    """
    How a log line or C{/status} names an address: C{host:port} (IPv6 in
    brackets), a UNIX socket's path, else the address as Twisted writes it.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "replace")
    if isinstance(name, str):
        return name
    return str(address)
