# -*- test-case-name: tests.test_accesslog -*-
"""
Access logging: one structured event per finished request, formatted at the
edge as a Combined Log Format line or a JSON object.

L{AccessLog.log} reads a finished request (an
L{edgeproxy.pipeline.call.Call}) and emits one
C{twisted.logger} event in the C{edgeproxy.access} namespace on the access
log's own L{LogPublisher} (not the global one: under C{twistd --nodaemon} the
global log goes to standard output too, and every request would be written
twice).  The writer observer formats the event as one line.  Other observers
(metrics, tests) can be added to L{AccessLog.publisher}.

Fields of the event (all strings are C{str}, bytes decoded as UTF-8 with
undecodable bytes kept as C{\\xHH}):

  - C{client}: the peer's IP address (the connection's, not a forwarded one)
  - C{method}, C{target}, C{protocol}: the request line; for a head
    the parser refused, as far as it was read (bounded) and cut at its
    spaces, L{None} for what never came
  - C{status}: the response status code (int)
  - C{bytes}: response body bytes written (int)
  - C{referer}, C{user_agent}, C{host}: request fields (the last value),
    or L{None}
  - C{duration}: seconds from the end of the request head to now
  - C{route}, C{upstream}: the names the request was routed and forwarded
    to, or L{None}
  - C{request_id}: the request's ID (L{edgeproxy.headers.requestid}), or
    L{None} with C{request_id = off}
  - C{backend}: C{host:port} of the backend that answered or, when the
    request failed on the upstream side (a 502, a 504), the last one
    tried; L{None} when no backend had a part in it (a refusal, a cache
    hit, a 503 with none available); only ever written here, never sent
    to a client
  - C{ttfb}: seconds from the end of the request head to the backend's
    response head (queueing, connecting and retries included), or L{None}
  - C{tls_version} (C{"1.3"}), C{sni}: the connection's TLS version and
    SNI name, or L{None}
  - C{finished}: when the request finished, from the injected clock
    (C{log_time} is the wall clock C{Logger} stamps itself)
  - C{user}: the subject authentication at the edge established (never
    a credential), or L{None}; the Combined format's remote-user field
  - C{rule}: what refused the request at the edge (C{deny 10.0.0.0/8},
    C{allow}, C{methods}, C{client_certificate}, C{ratelimit NAME},
    C{auth NAME: why}), or L{None}

The C{combined} format is the Combined Log Format followed by the fields
above as C{key=value} pairs (nginx style: C{-} when unknown, no value
holding a space or a quote unescaped), and C{ rule="..."} at the end of a
refused request's line; C{combined_plain} is the Combined Log Format
alone, for parsers that want nothing after the user agent.

Lines are safe to parse: in Combined format every byte outside printable
ASCII, C{"} and C{\\} are escaped as C{\\xHH}/C{\\"}/C{\\\\} (the nginx
convention), so a request can neither forge a log line nor a field.  JSON
lines are written by L{json.dumps} with C{ensure_ascii}.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from zope.interface import implementer

from edgeproxy.config.model import AccessLogFormat, ProxySettings

log = Logger()

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_SAFE = frozenset(range(0x20, 0x7F)) - {ord('"'), ord("\\")}


def escapeField(value: str | bytes) -> str:
    """
    Escape C{value} for use inside a double-quoted Combined Log Format
    field: printable ASCII is kept, C{"} and C{\\} get a backslash, anything
    else (control characters, DEL, non-ASCII) becomes C{\\xHH} per UTF-8
    byte.
    """
    if isinstance(value, str):
        if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
            # Nothing to escape (the usual case): printable ASCII is 0x20-0x7E.
            return value
        raw = value.encode("utf-8", "surrogateescape")
    else:
        raw = value
    out = []
    for byte in raw:
        if byte in _SAFE:
            out.append(chr(byte))
        elif byte in (0x22, 0x5C):
            out.append("\\" + chr(byte))
        else:
            out.append(f"\\x{byte:02X}")
    return "".join(out)


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        # surrogateescape keeps invalid bytes recoverable: escapeField turns
        # them back into the exact bytes, JSON shows them as \udcXX.
        return value.decode("utf-8", "surrogateescape")
    return value


def requestFields(call: Any, now: float) -> dict[str, Any]:
    """
    The access-log fields of a finished request (an
    L{edgeproxy.pipeline.call.Call}), as described in the module docstring.
    """
    request = call.request
    fields = request.fields.raw()
    referer = fields.get(b"referer")
    userAgent = fields.get(b"user-agent")
    host = fields.get(b"host")
    route = request.route
    connection = request.connection
    upstreamHead = call.upstreamHead
    return {
        "client": request.connection.peer or None,
        # Empty only for a head refused before its request line was whole.
        "method": _text(request.method) or None,
        "target": _text(request.target) or None,
        "protocol": _text(request.version) or None,
        "status": int(call.status),
        "bytes": int(call.sent),
        "referer": _text(referer[-1]) if referer else None,
        "user_agent": _text(userAgent[-1]) if userAgent else None,
        "host": _text(host[-1]) if host else None,
        "duration": max(0.0, now - call.started),
        "route": None if route is None else route.name,
        "upstream": call.upstreamName,
        "user": call.identity,
        "rule": call.refusedBy,
        "request_id": _text(request.requestId) if request.requestId else None,
        "backend": call.backend,
        "ttfb": None if upstreamHead is None else max(0.0, upstreamHead - call.started),
        "tls_version": connection.tlsVersion,
        "sni": _text(connection.serverName),
    }


def clfTimestamp(when: float) -> str:
    """C{[27/Nov/2026:19:05:01 +0000]}, always UTC, independent of locale."""
    second = int(when)
    cached = _clfCache
    if cached[0] != second:
        t = time.gmtime(when)
        cached[1] = "[%02d/%s/%04d:%02d:%02d:%02d +0000]" % (
            t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec,
        )
        cached[0] = second
    return cached[1]


def isoTimestamp(when: float) -> str:
    """C{2026-11-27T19:05:01.123Z}: UTC with milliseconds."""
    second = int(when)
    millis = int((when - second) * 1000)
    cached = _isoCache
    if cached[0] != second:
        t = time.gmtime(when)
        cached[1] = "%04d-%02d-%02dT%02d:%02d:%02d." % (
            t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec,
        )
        cached[0] = second
    return "%s%03dZ" % (cached[1], millis)


# The text of the last second each timestamp was made for: every line of a
# busy second shares it (time.gmtime and the formatting were a fifth of the
# cost of a Combined line).
_clfCache: list[Any] = [None, ""]
_isoCache: list[Any] = [None, ""]


def formatCombinedPlain(event: dict[str, Any]) -> str:
    """
    The Combined Log Format line (no newline) of an access event::

        203.0.113.9 - - [27/Nov/2026:19:05:01 +0000] "GET / HTTP/1.1" 200 612 "-" "curl/8.5.0"
    """
    quoted = _quoted
    return '%s - %s %s "%s %s %s" %d %s "%s" "%s"' % (
        quoted(event["client"]),
        _user(event.get("user")),
        clfTimestamp(event["finished"]),
        quoted(event["method"]),
        quoted(event["target"]),
        quoted(event["protocol"]),
        event["status"],
        event["bytes"] or "-",
        quoted(event["referer"]),
        quoted(event["user_agent"]),
    )


def formatCombined(event: dict[str, Any]) -> str:
    """
    The extended Combined line (no newline) of an access event: the
    Combined Log Format line, then the request's C{key=value} pairs, then
    C{rule="..."} on a refused request's::

        203.0.113.9 - - [27/Nov/2026:19:05:01 +0000] "GET / HTTP/1.1" 200 612 "-" "curl/8.5.0" request_id=4bf92f3577b34da6a3ce929d0e0e4736 route=app upstream=app backend=10.0.1.10:8080 ttfb=0.012 duration=0.015 tls_version=1.3 sni=app.example.com
    """
    bare = _bare
    line = formatCombinedPlain(event) + (
        " request_id=%s route=%s upstream=%s backend=%s ttfb=%s duration=%s tls_version=%s sni=%s"
        % (
            bare(event.get("request_id")),
            bare(event.get("route")),
            bare(event.get("upstream")),
            bare(event.get("backend")),
            _seconds(event.get("ttfb")),
            _seconds(event.get("duration")),
            bare(event.get("tls_version")),
            bare(event.get("sni")),
        )
    )
    rule = event.get("rule")
    if rule is not None:
        line += ' rule="%s"' % (escapeField(rule),)
    return line


def _user(user: str | None) -> str:
    # The remote-user field is unquoted: a space in it would split it.
    return "-" if not user else escapeField(user).replace(" ", "\\x20")


def _bare(value: str | None) -> str:
    """An unquoted C{key=value} value: C{-} for none, never a space."""
    return "-" if not value else escapeField(value).replace(" ", "\\x20")


def _seconds(value: float | None) -> str:
    # Milliseconds, as nginx's $request_time.
    return "-" if value is None else "%.3f" % (value,)


def _quoted(value: str | None) -> str:
    return "-" if value is None else escapeField(value)


_JSON_KEYS = ("client", "method", "target", "protocol", "status", "bytes",
              "referer", "user_agent", "host", "duration", "route", "upstream",
              "request_id", "backend", "ttfb", "tls_version", "sni")
_JSON_OPTIONAL = ("user", "rule")
"""Written only when set (most requests have neither)."""


def formatJSON(event: dict[str, Any]) -> str:
    """One JSON object (no newline), keys in a fixed order, C{time} first."""
    record: dict[str, Any] = {"time": isoTimestamp(event["finished"])}
    for key in _JSON_KEYS:
        record[key] = event[key]
    for key in _JSON_OPTIONAL:
        value = event.get(key)
        if value is not None:
            record[key] = value
    if record["duration"] is not None:
        record["duration"] = round(record["duration"], 6)
    if record["ttfb"] is not None:
        record["ttfb"] = round(record["ttfb"], 6)
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


_FORMATTERS: dict[AccessLogFormat, Callable[[dict[str, Any]], str]] = {
    AccessLogFormat.COMBINED: formatCombined,
    AccessLogFormat.COMBINED_PLAIN: formatCombinedPlain,
    AccessLogFormat.JSON: formatJSON,
}


@implementer(ILogObserver)
class LineWriter:
    """
    The observer that writes access events as lines to a text stream, or to
    a file it opens (and can reopen after rotation).
    """

    def __init__(
        self,
        formatter: Callable[[dict[str, Any]], str],
        stream: TextIO | None = None,
        path: str | None = None,
    ) -> None:
        self._formatter = formatter
        self._path = path
        self._ownsStream = stream is None
        self._stream: TextIO = stream if stream is not None else self._open()

    def _open(self) -> TextIO:
        assert self._path is not None
        # Line buffered: a line reaches the file when the request finishes.
        return open(self._path, "a", buffering=1, encoding="utf-8", newline="\n")

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") != AccessLog.namespace:
            return
        try:
            self._stream.write(self._formatter(event) + "\n")
        except Exception:
            log.failure("Cannot write the access log line")

    def reopen(self) -> None:
        """Open the path again (after C{logrotate} moved the file)."""
        if not self._ownsStream:
            return
        fresh = self._open()
        old, self._stream = self._stream, fresh
        old.close()

    def close(self) -> None:
        if self._ownsStream:
            self._stream.close()
        else:
            self._stream.flush()


_FORMAT = '{client} "{method} {target} {protocol}" {status} {bytes}'
"""The access event's C{log_format}, for observers that render events."""


class AccessLog:
    """
    Emits one access event per finished request and writes it where the
    configuration says.

    @ivar publisher: The L{LogPublisher} access events are sent to.
    """

    namespace = "edgeproxy.access"

    def __init__(self, clock: IReactorTime, writer: LineWriter | None = None) -> None:
        self._clock = clock
        self.publisher = LogPublisher()
        self._log = Logger(namespace=self.namespace, observer=self.publisher)
        self._writer = writer
        if writer is not None:
            self.publisher.addObserver(writer)

    @classmethod
    def fromSettings(
        cls,
        settings: ProxySettings,
        clock: IReactorTime,
        stdout: TextIO | None = None,
    ) -> AccessLog | None:
        """
        The access log C{[edgeproxy] access_log} asks for: L{None} when
        C{off}; standard output for C{-} (the process's real one,
        C{sys.__stdout__}, as twistd replaces C{sys.stdout} with a logger);
        else the file, opened now so that an unwritable path stops the start.
        """
        if settings.access_log is None:
            return None
        formatter = _FORMATTERS[settings.access_log_format]
        if settings.access_log == "-":
            stream = stdout if stdout is not None else (sys.__stdout__ or sys.stdout)
            return cls(clock, LineWriter(formatter, stream=stream))
        return cls(clock, LineWriter(formatter, path=settings.access_log))

    def log(self, call: Any) -> None:
        """Emit the access event of the finished request C{call}; never raises."""
        try:
            now = self._clock.seconds()
            event: dict[str, Any] = {"finished": now}
            event.update(requestFields(call, now))
            # The event self._log.info(_FORMAT, finished=now, **fields)
            # makes, built here: Logger.emit's check of the level against
            # LogLevel.iterconstants() alone cost more than the rest of the
            # event.  Same keys, same values, same publisher.
            logger = self._log
            event["log_logger"] = logger
            event["log_level"] = LogLevel.info
            event["log_namespace"] = logger.namespace
            event["log_source"] = logger.source
            event["log_format"] = _FORMAT
            event["log_time"] = time.time()
            self.publisher(event)
        except Exception:
            log.failure("Cannot build the access log event")

    def reopen(self) -> None:
        """Reopen the log file (SIGHUP, after rotation)."""
        if self._writer is not None:
            self._writer.reopen()

    def close(self) -> None:
        if self._writer is not None:
            self.publisher.removeObserver(self._writer)
            self._writer.close()
            self._writer = None
