# -*- test-case-name: tests.test_channel -*-
"""
The HTTP/1.x edge: Twisted's L{HTTPChannel} held to RFC 9112 strictly.

L{EdgeHTTPChannel} owns the request head.  It replaces Twisted's head parser
(C{lineReceived}/C{headerReceived}) with one that rejects everything a
front-end and a back-end could disagree about, before the request object's
C{gotLength} runs, so a rejected request never reaches a backend:

  - framing: C{Content-Length} together with C{Transfer-Encoding}, several
    or malformed C{Content-Length} fields, any C{Transfer-Encoding} other than
    a single final C{chunked} (C{501} when C{chunked} is final but preceded by
    codings we do not implement, C{400} otherwise), C{Transfer-Encoding} in
    HTTP/1.0, strict chunk sizes, extensions and trailers (L{ChunkedDecoder});
  - syntax: obs-fold, NUL/CR/LF and other controls in fields, whitespace
    before the colon, names that are not RFC 9110 tokens, garbage or unknown
    versions in the request line (C{505} for a well formed C{HTTP/x.y} other
    than 1.0 and 1.1), request-target forms;
  - C{Host}: required on HTTP/1.1, exactly one, syntactically valid; an
    absolute-form target is accepted only when its authority equals C{Host}
    and is then rewritten to origin-form (RFC 9112 3.2.2);
  - limits: head bytes and field count (C{431}; C{414} for a request line
    alone over the limit), and a header-read deadline that a slowloris cannot
    push back by trickling bytes (C{408}).

Every rejection goes through L{EdgeHTTPChannel.rejectAndClose}: a short
generic response with C{Connection: close} and no C{Server} header, then the
connection is closed, so nothing after the bad request can be misread as a
new request.

Policy on timers (nginx semantics, see L{EdgeHTTPChannel.connectionMade}):
the header deadline (C{client_header_timeout}) runs from connection open for
the first request and from the first byte of each later request; between
requests on a kept-alive connection Twisted's idle timeout
(C{client_idle_timeout}, C{timeOut}) applies and closes silently.  Each is
a deadline in a queue the site's connections share (L{_DeadlineQueue}: one
DelayedCall per site and timeout, none per connection), moved rather than
re-armed per request.

A head that is already whole in the buffer (the usual case: it comes in one
read) is parsed in one pass (L{EdgeHTTPChannel._wholeHead}); any other goes
line by line.  Both apply the same checks in the same order, and the fields
go straight into the request's C{Headers} (L{edgeproxy.http.headers.rawFields}).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.runtime import seconds as runtimeSeconds
from twisted.web import http  # module access is slow (deprecation proxy): only off the hot path
from twisted.web.http import HTTPChannel
from twisted.web.iweb import INonQueuedRequestFactory

from edgeproxy.config.model import Limits
from edgeproxy.http.errorpages import phraseFor
from edgeproxy.http.headers import canonicalName, rawFields

log = Logger()

SUPPORTED_VERSIONS = frozenset((b"HTTP/1.0", b"HTTP/1.1"))

_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)", re.DOTALL)

# Field values: RFC 9110 5.5 allows VCHAR, obs-text, SP and HTAB.  NUL, CR
# and LF MUST be rejected (or replaced); we reject every other control too.
_CONTROLS_EXCEPT_HTAB = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"
# Request-target: RFC 9112 3.2 leaves no room for SP, controls or non-ASCII.
_TARGET_FORBIDDEN = bytes(range(0x21)) + bytes(range(0x7F, 0x100))
_HOST_REGNAME = re.compile(rb"[A-Za-z0-9\-._~]+")

_MAX_CONTENT_LENGTH_DIGITS = 18
"""Anything longer cannot be a real body and may overflow other parsers."""

_MAX_CHUNK_SIZE_DIGITS = 16
_MAX_CHUNK_LINE = 1024
_MAX_CHUNK_EXTENSION_BYTES = 4096
"""Total chunk-extension bytes one message may carry.  No client we serve
uses extensions; a cap stops tiny chunks with huge extensions from turning
a small body into a lot of parsing work."""

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_EXTENSIONS = re.compile(
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_TOKEN_ONLY = re.compile(_TOKEN)

_SPECIAL_FIELDS = frozenset((b"content-length", b"transfer-encoding", b"host"))
_checkedNames: dict[bytes, tuple[bytes, bytes]] = {}
"""Field names already found to be tokens, to their lower-case form and the
key C{Headers} files them under (L{canonicalName}).  Real traffic uses a few
dozen names; the cap keeps a client inventing names from growing it."""
_MAX_CHECKED_NAMES = 10_000

_KNOWN_METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT")
)
"""Tokens all (no regular expression needed for them)."""

_nonQueuedFactories: dict[Any, bool] = {}
"""Request factories to whether they provide L{INonQueuedRequestFactory}
(an interface lookup per request otherwise).  Factories are classes: a
handful per process."""

def _istoken(value: bytes) -> bool:
    """RFC 9110 5.6.2 C{token}."""
    return _TOKEN_ONLY.fullmatch(value) is not None


def errorResponse(status: int) -> bytes:
    """
    The complete response the channel sends when it refuses a request: a
    status line, C{Connection: close}, a tiny plain-text body, and nothing
    that identifies the software.

    @param status: An HTTP status code with a registered reason phrase.
    """
    cached = _errorResponses.get(status)
    if cached is not None:
        return cached
    reason = phraseFor(status)
    body = reason + b"\n"
    response = b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % (len(body),),
            b"Connection: close\r\n",
            b"\r\n",
            body,
        ]
    )
    _errorResponses[status] = response
    return response


_errorResponses: dict[int, bytes] = {}


# ---------------------------------------------------------------------------
# Twisted private surface.
#
# HTTPChannel keeps the request line in _command/_path/_version between the
# request line and allContentReceived (which reads and deletes them), feeds
# the body through _transferDecoder with _finishRequestBody as the end
# callback, and turns _MalformedChunkedDataError from a decoder into a call
# to _respondToBadRequestAndDisconnect (overridden below).  HTTPFactory wraps
# channels in _GenericHTTPChannelProtocol, which switches to HTTP/2 after
# ALPN.  EdgeHTTPChannel.dataReceived replaces LineReceiver.dataReceived
# (to parse a head that is all in the buffer in one pass) and keeps its
# state where LineReceiver does (_buffer, line_mode), which HTTPChannel's
# setLineMode/setRawMode calls rely on.  None of this is public API.  Every
# use of it is in this block or in dataReceived;
# TwistedPrivateSurfaceTests in tests/test_channel.py fails if Twisted
# changes any of it.
# ---------------------------------------------------------------------------

MalformedBody = http._MalformedChunkedDataError
"""The exception HTTPChannel.rawDataReceived maps to a 400 (private)."""


def requestLineOf(channel: Any) -> tuple[bytes, bytes, bytes]:
    """
    The method, request-target and version of the request whose head was
    just parsed, for use from C{Request.gotLength} (the request object only
    learns them in C{requestReceived}, after the body).

    Works for L{http.HTTPChannel} (and so L{EdgeHTTPChannel}, whose target
    is already origin-form here) and for Twisted's HTTP/2 C{H2Stream}, whose
    version is reported as C{b"HTTP/2"} like C{H2Stream.requestComplete}
    does.

    @raise AttributeError: outside the window between the end of the head
        and C{allContentReceived}.
    """
    if isinstance(channel, HTTPChannel):
        # Private: see the block comment above.
        return channel._command, channel._path, channel._version
    command, path = channel.command, channel.path
    if command is None or path is None:
        raise AttributeError("stream has no request line yet")
    return command, path, b"HTTP/2"


def _storeRequestLine(
    channel: http.HTTPChannel, method: bytes, target: bytes, version: bytes
) -> None:
    # Private: allContentReceived passes these to requestReceived.
    channel._command = method  # type: ignore[attr-defined]
    channel._path = target  # type: ignore[attr-defined]
    channel._version = version  # type: ignore[attr-defined]


def _installBodyDecoder(
    channel: http.HTTPChannel, build: Callable[[Callable[[bytes], None]], Any]
) -> None:
    """
    Give C{channel} the body decoder C{build(finishCallback)} returns.
    """
    # Private: rawDataReceived feeds body bytes to _transferDecoder and
    # allContentReceived resets it; _finishRequestBody is the finish callback
    # that queues pipelined bytes and completes the request.
    channel._transferDecoder = build(channel._finishRequestBody)  # type: ignore[attr-defined]


_GenericHTTPChannelProtocol = http._GenericHTTPChannelProtocol
"""Looked up once: an attribute of twisted.web.http costs a deprecation
check per access (the module is a proxy)."""


def _wrapForALPN(channel: http.HTTPChannel) -> Any:
    # Private: what HTTPFactory.protocol builds around an HTTPChannel; it
    # replaces the channel with an H2Connection when ALPN selected h2.
    return _GenericHTTPChannelProtocol(channel)


# ---------------------------------------------------------------------------


class IncompleteBody(Exception):
    """The connection ended before the body did."""


class IdentityDecoder:
    """
    A body of known length (C{Content-Length}); the same interface as
    Twisted's decoders.
    """

    __slots__ = ("remaining", "dataCallback", "finishCallback")

    def __init__(
        self,
        length: int,
        dataCallback: Callable[[bytes], None],
        finishCallback: Callable[[bytes], None],
    ) -> None:
        self.remaining = length
        self.dataCallback = dataCallback
        self.finishCallback = finishCallback

    def dataReceived(self, data: bytes) -> None:
        if len(data) < self.remaining:
            self.remaining -= len(data)
            self.dataCallback(data)
            return
        remaining, self.remaining = self.remaining, 0
        self.dataCallback(data[:remaining])
        self.finishCallback(data[remaining:])

    def noMoreData(self) -> None:
        if self.remaining:
            raise IncompleteBody(f"{self.remaining} body bytes missing")


class ChunkedDecoder:
    """
    The chunked transfer coding (RFC 9112 7.1), stricter than Twisted's
    C{_ChunkedTransferDecoder} where parsers disagree: every line must end in
    CRLF (a bare LF is refused, not treated as an end of line); the chunk size
    is 1 to 16 hex digits with no sign, prefix or whitespace; extensions must
    match the RFC grammar (no unbalanced quotes) and total at most
    L{_MAX_CHUNK_EXTENSION_BYTES} per message; trailer fields are checked like
    header fields (no obs-fold, valid names, no controls) and then dropped.

    Errors raise L{MalformedBody}, which L{http.HTTPChannel} answers with
    L{EdgeHTTPChannel._respondToBadRequestAndDisconnect}.
    """

    def __init__(
        self,
        dataCallback: Callable[[bytes], None],
        finishCallback: Callable[[bytes], None],
        maxTrailerSize: int = 16 * 1024,
    ) -> None:
        self.dataCallback = dataCallback
        self.finishCallback = finishCallback
        self.maxTrailerSize = maxTrailerSize
        self.state = "SIZE"
        self._buffer = bytearray()
        self._scan = 0
        self._remaining = 0
        self._extensionBytes = 0
        self._trailerBytes = 0

    def _takeLine(self, limit: int) -> bytes | None:
        buffer = self._buffer
        end = buffer.find(b"\n", self._scan)
        if end == -1:
            if len(buffer) > limit:
                raise MalformedBody("chunk line too long")
            self._scan = len(buffer)
            return None
        if end == 0 or buffer[end - 1] != 0x0D:
            raise MalformedBody("bare LF in chunked body")
        if end - 1 > limit:
            raise MalformedBody("chunk line too long")
        line = bytes(buffer[: end - 1])
        del buffer[: end + 1]
        self._scan = 0
        return line

    def _sizeLine(self, line: bytes) -> None:
        size, semicolon, extensions = line.partition(b";")
        if not 0 < len(size) <= _MAX_CHUNK_SIZE_DIGITS or not _HEX_DIGITS.issuperset(size):
            raise MalformedBody("invalid chunk size")
        if semicolon:
            self._extensionBytes += len(extensions) + 1
            if self._extensionBytes > _MAX_CHUNK_EXTENSION_BYTES:
                raise MalformedBody("too many chunk-extension bytes")
            if _CHUNK_EXTENSIONS.fullmatch(b";" + extensions) is None:
                raise MalformedBody("invalid chunk extension")
        self._remaining = int(size, 16)
        self.state = "BODY" if self._remaining else "TRAILER"

    def _trailerLine(self, line: bytes) -> bool:
        if not line:
            return True
        self._trailerBytes += len(line) + 2
        if self._trailerBytes > self.maxTrailerSize:
            raise MalformedBody("trailer section too large")
        name, colon, value = line.partition(b":")
        if not colon or not _istoken(name):
            raise MalformedBody("invalid trailer field")
        if len(value.translate(None, _CONTROLS_EXCEPT_HTAB)) != len(value):
            raise MalformedBody("control character in trailer field")
        return False

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        if self.state == "BODY" and not buffer:
            # Fast path: body bytes straight through, no copy into the buffer.
            remaining = self._remaining
            if len(data) <= remaining:
                self._remaining = remaining - len(data)
                if not self._remaining:
                    self.state = "CRLF"
                self.dataCallback(data)
                return
            self._remaining = 0
            self.state = "CRLF"
            self.dataCallback(data[:remaining])
            data = data[remaining:]
        buffer += data
        while buffer:
            state = self.state
            if state == "BODY":
                if len(buffer) > self._remaining:
                    chunk = bytes(buffer[: self._remaining])
                    del buffer[: self._remaining]
                    self._remaining = 0
                    self.state = "CRLF"
                else:
                    chunk = bytes(buffer)
                    del buffer[:]
                    self._remaining -= len(chunk)
                    if not self._remaining:
                        self.state = "CRLF"
                self.dataCallback(chunk)
            elif state == "CRLF":
                if len(buffer) < 2:
                    if buffer[0] != 0x0D:
                        raise MalformedBody("chunk data not followed by CRLF")
                    return
                if buffer[0] != 0x0D or buffer[1] != 0x0A:
                    raise MalformedBody("chunk data not followed by CRLF")
                del buffer[:2]
                self.state = "SIZE"
            elif state == "SIZE":
                line = self._takeLine(_MAX_CHUNK_LINE)
                if line is None:
                    return
                self._sizeLine(line)
            elif state == "TRAILER":
                line = self._takeLine(self.maxTrailerSize)
                if line is None:
                    return
                if self._trailerLine(line):
                    self.state = "FINISHED"
                    rest = bytes(buffer)
                    del buffer[:]
                    self.finishCallback(rest)
                    return
            else:
                raise RuntimeError("chunked body already finished")

    def noMoreData(self) -> None:
        if self.state != "FINISHED":
            raise IncompleteBody("chunked body incomplete")


class _Rejected(Exception):
    """A head that must not be processed; carries the status to send."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _parseContentLength(value: bytes) -> int:
    # RFC 9110 8.6: Content-Length = 1*DIGIT.  A list ("5, 5"), a sign or
    # inner whitespace is refused rather than interpreted (RFC 9112 6.3 5).
    if not value.isdigit() or not value.isascii() or len(value) > _MAX_CONTENT_LENGTH_DIGITS:
        raise _Rejected(400, "invalid Content-Length")
    return int(value)


def _checkTransferEncoding(values: list[bytes]) -> None:
    codings = [c.strip(b" \t").lower() for v in values for c in v.split(b",")]
    if codings.count(b"chunked") != 1 or codings[-1] != b"chunked":
        # RFC 9112 6.3 4: chunked not final (or repeated, or absent) means
        # the length cannot be determined: 400 and close.
        raise _Rejected(400, "Transfer-Encoding is not a single final chunked")
    if len(codings) > 1:
        if all(_istoken(c) for c in codings):
            # RFC 9112 6.1: a transfer coding we do not implement gets 501.
            raise _Rejected(501, "unsupported transfer coding")
        raise _Rejected(400, "invalid Transfer-Encoding")


_validHosts: dict[bytes, bool] = {}
"""C{Host} values already checked, to the answer (the same few values come
on every request); bounded."""


def validHost(value: bytes) -> bool:
    """
    Whether C{value} is an acceptable C{Host} field value: C{uri-host
    [":" port]} (RFC 9110 7.2) where the host is a bracketed IPv6 literal, or
    a non-empty name of unreserved characters (which includes IPv4
    addresses).  Percent-encoding and sub-delims, legal in reg-name but never
    used by real clients, are refused so that routing compares plain names;
    an empty host is invalid for http(s) URIs (RFC 9110 4.2.1).
    """
    known = _validHosts.get(value)
    if known is None:
        known = _checkHost(value)
        if len(_validHosts) >= 4096:
            _validHosts.clear()
        _validHosts[value] = known
    return known


def _checkHost(value: bytes) -> bool:
    if value.startswith(b"["):
        end = value.find(b"]")
        if end == -1:
            return False
        try:
            ipaddress.IPv6Address(value[1:end].decode("ascii"))
        except ValueError:
            return False
        rest = value[end + 1 :]
    else:
        host, colon, port = value.partition(b":")
        if _HOST_REGNAME.fullmatch(host) is None:
            return False
        rest = colon + port
    if not rest:
        return True
    if rest[:1] != b":":
        return False
    port = rest[1:]
    return port == b"" or (port.isdigit() and port.isascii() and len(port) <= 5 and int(port) <= 65535)


class _DeadlineQueue:
    """
    The pending deadlines of one timeout (the idle timeout or the header
    deadline) of every channel of one site, with one DelayedCall for all of
    them.

    Two Twisted DelayedCalls per idle kept-alive connection (with their
    dictionaries and bound methods, 0.6-0.8 KiB) were most of what an idle
    connection cost beyond its TLS state (R4); here a connection costs one
    dictionary entry and a float per armed timeout.  Every channel of a
    queue has the same timeout, so deadlines set in arrival order are in
    deadline order: an insertion-ordered dictionary (channel to deadline)
    is the whole priority queue.  Arming (or moving) a deadline puts the
    channel at the end; the one DelayedCall is due at the first entry's
    deadline and, when it fires, expires every entry whose deadline has
    passed and is scheduled again for the next one.  When the first entry
    is moved or removed, the call is moved to the new first deadline (or
    cancelled with nothing left), as a connection's own DelayedCall was
    moved or cancelled: no call fires early and none outlives the last
    deadline.  The clock is the one behind the channels' C{callLater} (the
    site's reactor); a clock set back (the wall clock of a real reactor)
    can make a later-armed deadline fire late, never early.

    @ivar period: the timeout, in seconds.
    @ivar entries: channel to the time its deadline passes, first due first.
    """

    __slots__ = ("period", "entries", "_expire", "_callLater", "_seconds", "_call", "_due")

    def __init__(
        self, period: float, expire: Callable[[Any], None], callLater: Callable[..., IDelayedCall]
    ) -> None:
        """
        @param expire: called with each channel whose deadline passes (it is
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

    def arm(self, channel: Any) -> None:
        """
        Set C{channel}'s deadline to C{period} from now, whether it had one
        or not.
        """
        entries = self.entries
        previous = entries.pop(channel, None)
        now = self._seconds()
        entries[channel] = now + self.period
        call = self._call
        if call is None:
            self._schedule(now)
        elif previous == self._due:
            # The first deadline moved (on a busy site, rarely: the channel
            # idle the longest; with one connection, every time).
            due = next(iter(entries.values()))
            if due != self._due:
                self._due = due
                call.reset(due - now)

    def move(self, channel: Any) -> None:
        """
        Set C{channel}'s deadline to C{period} from now if it has one.
        """
        entries = self.entries
        previous = entries.pop(channel, None)
        if previous is not None:
            now = self._seconds()
            entries[channel] = now + self.period
            if previous == self._due:
                call = self._call
                if call is None:
                    self._schedule(now)
                else:
                    due = next(iter(entries.values()))
                    if due != self._due:
                        self._due = due
                        call.reset(due - now)

    def disarm(self, channel: Any) -> None:
        """
        Forget C{channel}'s deadline, if it has one.
        """
        previous = self.entries.pop(channel, None)
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
        for channel, deadline in entries.items():
            if deadline > now:
                break
            expired.append(channel)
        expire = self._expire
        for channel in expired:
            # An earlier expiry may have moved or removed it meanwhile.
            deadline = entries.get(channel)
            if deadline is None or deadline > now:
                continue
            del entries[channel]
            try:
                expire(channel)
            except Exception:
                # What the reactor did with an exception from a
                # connection's own DelayedCall; the other channels due now
                # still expire.
                log.failure("deadline expiry of {channel} failed", channel=repr(channel))
        self._schedule(now)


def _deadlineQueue(channel: Any, kind: str, period: float, expire: Callable[[Any], None]) -> _DeadlineQueue:
    """
    The queue of C{kind} deadlines with timeout C{period} that C{channel}'s
    site keeps for its channels on C{channel}'s clock (made on first use).
    A channel without a factory (built bare) gets a queue of its own.
    """
    callLater = channel.callLater
    factory = channel.factory
    queues = getattr(factory, "_edgeDeadlineQueues", None) if factory is not None else None
    if queues is None:
        if factory is None:
            return _DeadlineQueue(period, expire, callLater)
        queues = {}
        factory._edgeDeadlineQueues = queues
    key = (kind, period, callLater)
    queue = queues.get(key)
    if queue is None:
        queue = queues[key] = _DeadlineQueue(period, expire, callLater)
    return queue


class EdgeHTTPChannel(HTTPChannel):
    """
    Twisted's HTTP/1.1 channel with a strict head parser, head size and count
    limits, and a header-read deadline.

    Configure by setting L{limits} after construction and before
    C{connectionMade}; C{callLater} comes from C{TimeoutMixin} (the factory
    sets it to its reactor's).  The idle timeout C{timeOut} is set from
    C{limits.client_idle_timeout} at C{connectionMade}.
    """

    limits: Limits
    """The listener's limits (L{Limits}() until the factory sets them)."""

    _headQueue: _DeadlineQueue | None
    _headArmed: bool
    _abortCall: IDelayedCall | None
    _rejected: bool
    _awaitingHead: bool
    _expectingRequestLine: bool
    _skippedEmptyLine: bool
    _headSize: int
    _fieldCount: int
    _contentLengths: list[bytes] | None
    _transferEncodings: list[bytes] | None
    _hostCount: int
    _absoluteAuthority: bytes | None
    _hostAddress: Any
    _peerAddress: Any
    _secure: bool | None
    # The starting values of these, and of _idleQueue and _suspendingIdle
    # below, are in _OWN_DEFAULTS (they are slots: see __slots__).

    # --- memory of an idle connection (R4) ---------------------------------

    # CPython 3.11 keeps an instance's attributes in a compact table shared
    # with its class (about 0.35 KiB here) only while the class has seen at
    # most 29 attribute names; from the 30th on, every instance gets a
    # combined dictionary of its own (1.6 KiB).  Twisted's HTTPChannel,
    # LineReceiver, TimeoutMixin and Protocol set about 30 per connection
    # by themselves and this class about 20 more, so they live in slots
    # instead (8 bytes each): R4 measured 26.7 -> 25.7 KiB per idle TLS
    # connection.  Ours are all slots too, so that what is left in the
    # instance dictionary (callLater, set by the factory, and whatever
    # other code hangs on a channel) stays far below 29 names whichever
    # paths the process has served.  A slot shadows a class attribute of
    # the same name in the base classes, so __init__ starts each slot at
    # that value (_SLOT_DEFAULTS) or at ours (_OWN_DEFAULTS); a slot with
    # neither stays unset, as the instance attribute was.  An attribute
    # added to this class later belongs here, with its starting value in
    # _OWN_DEFAULTS.
    __slots__ = (
        # Protocol, TimeoutMixin, LineReceiver
        "connected",
        "transport",
        "factory",
        "timeOut",
        "MAX_LENGTH",
        "line_mode",
        "_buffer",
        "_busyReceiving",
        # HTTPChannel
        "site",
        "requests",
        "maxHeaders",
        "totalHeadersSize",
        "length",
        "persistent",
        "_handlingRequest",
        "_dataBuffer",
        "_transferDecoder",
        "_networkProducer",
        "_command",
        "_path",
        "_version",
        "_receivedHeaderCount",
        "_receivedHeaderSize",
        "_HTTPChannel__first_line",
        "_HTTPChannel__header",
        "_HTTPChannel__content",
        "_savedTimeOut",
        "_requestProducer",
        "_requestProducerStreaming",
        "_waitingForTransport",
        "_abortingCall",
        "requestFactory",
        # EdgeHTTPChannel
        "limits",
        "_headQueue",
        "_headArmed",
        "_abortCall",
        "_rejected",
        "_awaitingHead",
        "_expectingRequestLine",
        "_skippedEmptyLine",
        "_headSize",
        "_fieldCount",
        "_contentLengths",
        "_transferEncodings",
        "_hostCount",
        "_absoluteAuthority",
        "_hostAddress",
        "_peerAddress",
        "_secure",
        "_idleQueue",
        "_suspendingIdle",
    )

    def __init__(self) -> None:
        for name, value in _SLOT_DEFAULTS:
            setattr(self, name, value)
        super().__init__()

    # --- per-connection facts, asked for on every request ------------------

    def getHost(self) -> Any:
        # Twisted's Request.__init__ asks for both addresses on every
        # request; on TCP getHost() is a getsockname() system call each
        # time (about 2% of the R1 profile), and neither changes while the
        # connection lives.
        # The local address is one of a few (a listener's own, or one per
        # local interface for a wildcard bind): one shared object for each,
        # not one per connection (about 0.2 KiB per idle connection, R4).
        address = self._hostAddress
        if address is None:
            address = self.transport.getHost()
            try:
                address = _localAddresses.setdefault(address, address)
            except TypeError:  # an address type that is not hashable
                pass
            else:
                if len(_localAddresses) > 1024:
                    _localAddresses.clear()
            self._hostAddress = address
        return address

    def getPeer(self) -> Any:
        address = self._peerAddress
        if address is None:
            address = self._peerAddress = self.transport.getPeer()
        return address

    def isSecure(self) -> bool:
        # An interface adaptation per call in Twisted; fixed per connection.
        secure = self._secure
        if secure is None:
            secure = self._secure = super().isSecure()
        return secure

    # --- connection lifecycle -------------------------------------------

    def connectionMade(self) -> None:
        limits = self.limits
        idle = limits.client_idle_timeout
        self.timeOut = idle if idle and idle > 0 else None
        self.MAX_LENGTH = limits.max_header_size
        self.maxHeaders = limits.max_headers
        self.totalHeadersSize = limits.max_header_size
        super().connectionMade()
        # The first head is timed from connection open: a client that
        # connects and sends nothing, or trickles, is cut at the deadline.
        self._startHeadTimer()

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            # After a rejection nothing the client sends is meaningful.
            return
        if self._awaitingHead and not self._headArmed:
            # First byte of the next request on a kept-alive connection:
            # from here the whole head must arrive within the deadline,
            # however slowly the bytes trickle in (they reset the idle
            # timeout, not this one).
            self._startHeadTimer()
        # HTTPChannel.dataReceived, then LineReceiver.dataReceived with one
        # addition: a head whose end is already in the buffer (nearly every
        # head: it arrives in one read) is parsed in one pass (_wholeHead)
        # instead of line by line through lineReceived.  Both apply the same
        # checks in the same order; a head that is incomplete, over the size
        # budget, or preceded by an empty line goes line by line.
        self.resetTimeout()
        if self._busyReceiving:
            self._buffer += data
            return
        try:
            self._busyReceiving = True
            self._buffer += data
            while self._buffer and not self.paused:
                if self.line_mode:
                    buffer = self._buffer
                    if self._expectingRequestLine and self.persistent and buffer[:2] != b"\r\n":
                        end = buffer.find(b"\r\n\r\n")
                        if end != -1 and self._headSize + end + 4 <= self.limits.max_header_size:
                            self._buffer = buffer[end + 4 :]
                            self._wholeHead(buffer[:end])
                            transport = self.transport
                            if transport is not None and transport.disconnecting:
                                return
                            continue
                    try:
                        line, self._buffer = buffer.split(b"\r\n", 1)
                    except ValueError:
                        if len(buffer) >= self.MAX_LENGTH + 2:
                            self._buffer = b""
                            self.lineLengthExceeded(buffer)
                        return
                    if len(line) > self.MAX_LENGTH:
                        exceeded = line + b"\r\n" + self._buffer
                        self._buffer = b""
                        self.lineLengthExceeded(exceeded)
                        return
                    self.lineReceived(line)
                    transport = self.transport
                    if transport is not None and transport.disconnecting:
                        return
                else:
                    data = self._buffer
                    self._buffer = b""
                    self.rawDataReceived(data)
        finally:
            self._busyReceiving = False

    def connectionLost(self, reason: Any) -> None:
        self._cancelHeadTimer()
        self._cancelIdleTimer()
        if self._abortCall is not None and self._abortCall.active():
            self._abortCall.cancel()
        self._abortCall = None
        super().connectionLost(reason)

    def requestDone(self, request: Any) -> None:
        # Set before super() replays pipelined bytes through dataReceived.
        if self.persistent:
            self._awaitingHead = True
        super().requestDone(request)

    # --- the idle timeout ------------------------------------------------

    # TimeoutMixin's setTimeout/resetTimeout, with two differences.  The
    # deadline is an entry in a queue the site's channels share
    # (L{_DeadlineQueue}), not a DelayedCall of the connection's own (R4).
    # And Twisted turns the idle timeout off (setTimeout(None)) for every
    # request it answers and on again (setTimeout(period)) when the
    # response is done, which cancelled the deadline and made a new one per
    # request (with the header deadline's, 2 callLater and 2 cancel per
    # request: about 5% of the in-memory R1 profile).  Here a request only
    # suspends it: the deadline stays, does nothing if it passes while
    # suspended, and is moved when the timeout is on again.  Every other
    # setTimeout(None) cancels it, and the header deadline: the channel
    # gives up the connection (lost, rejected, handed to HTTP/2 after ALPN
    # or to a WebSocket tunnel).

    _idleQueue: _DeadlineQueue | None
    """The queue of the idle timeout C{timeOut} (the channel has a deadline
    while it is one of the queue's entries)."""
    _suspendingIdle: bool
    """Set just before Twisted's allContentReceived, whose setTimeout(None)
    then suspends the idle timeout for the request."""

    def setTimeout(self, period: float | None) -> float | None:
        previous = self.timeOut
        self.timeOut = period
        queue = self._idleQueue
        if period is None:
            if self._suspendingIdle:
                # Once: whatever the request does next (a rejection, a
                # tunnel taking the connection over) cancels.
                self._suspendingIdle = False
            else:
                # The header deadline must not outlive this channel's use of
                # the connection either.
                self._cancelHeadTimer()
                self._cancelIdleTimer()
            return previous
        if queue is None or queue.period != period:
            if queue is not None:
                queue.disarm(self)
            queue = self._idleQueue = _deadlineQueue(self, "idle", period, _idleExpired)
        queue.arm(self)
        return previous

    def resetTimeout(self) -> None:
        queue = self._idleQueue
        if queue is not None and self.timeOut is not None:
            queue.move(self)

    def _idleTimedOut(self) -> None:
        if self.timeOut is not None:
            self.timeoutConnection()

    def _cancelIdleTimer(self) -> None:
        queue = self._idleQueue
        if queue is not None:
            queue.disarm(self)

    # --- the header-read deadline ----------------------------------------

    # One deadline per connection serves every head: it is disarmed (not
    # removed) when a head is complete and moved when the next one starts.
    # Cancelling it and creating a new one for every request on a kept-alive
    # connection was 1.2% of the R1 profile (about 1.5 us per request with
    # the epoll reactor; 2.5-3.5 us in benchmarks/inproc.py); a disarmed
    # deadline that passes just goes away, and the next head arms a new one.
    # A connection gone idle after a request keeps its entry in the site's
    # queue (L{_DeadlineQueue}: a dictionary entry and a float) until
    # client_header_timeout after that request's first byte.

    _headQueue: _DeadlineQueue | None
    """The queue of the header deadline (made on first use)."""

    def _startHeadTimer(self) -> None:
        deadline = self.limits.client_header_timeout
        if deadline and deadline > 0:
            self._headArmed = True
            queue = self._headQueue
            if queue is None or queue.period != deadline:
                if queue is not None:
                    queue.disarm(self)
                queue = self._headQueue = _deadlineQueue(self, "head", deadline, _headExpired)
            queue.arm(self)

    def _disarmHeadTimer(self) -> None:
        self._headArmed = False

    def _cancelHeadTimer(self) -> None:
        self._headArmed = False
        queue = self._headQueue
        if queue is not None:
            queue.disarm(self)

    def _headTimedOut(self) -> None:
        if not self._headArmed:
            return
        self._headArmed = False
        if self.transport is None or self.transport.disconnecting:
            return
        self.rejectAndClose(408, "request head not received in time")

    # --- rejection -------------------------------------------------------

    def rejectAndClose(self, status: int, reason: str = "malformed request") -> None:
        """
        Refuse the request being read: send L{errorResponse} unless a
        response is already on the wire, close the connection, and abort it
        if the client does not let the close complete within
        C{abortTimeout} seconds.  Idempotent.

        @param status: The status to send.
        @param reason: For the log only.
        """
        if self._rejected:
            return
        self._rejected = True
        self._awaitingHead = False
        self._cancelHeadTimer()
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info(
            "refusing request from {peer}: {status} ({reason})",
            peer=str(peer),
            status=status,
            reason=reason,
        )
        if not any(getattr(r, "startedWriting", False) for r in self.requests):
            self.transport.write(errorResponse(status))
        self.setTimeout(None)
        if self.abortTimeout is not None:
            self._abortCall = self.callLater(self.abortTimeout, self._abort)
        self.loseConnection()

    def _abort(self) -> None:
        self._abortCall = None
        self.transport.abortConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted calls this when a body decoder raises MalformedBody.
        self.rejectAndClose(400, "malformed body framing")

    def lineLengthExceeded(self, line: bytes) -> None:
        # MAX_LENGTH is kept at the head budget still left (see lineReceived),
        # so this fires as soon as the head cannot fit, before buffering more.
        if self._expectingRequestLine:
            self.rejectAndClose(414, "request line too long")
        else:
            self.rejectAndClose(431, "request head too large")

    # --- the head parser -------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._rejected:
            return
        try:
            self._headSize += len(line) + 2
            budget = self.limits.max_header_size - self._headSize
            if budget < 0:
                raise _Rejected(
                    414 if self._expectingRequestLine else 431, "request head too large"
                )
            self.MAX_LENGTH = budget

            if not self._expectingRequestLine:
                if line:
                    self.headerReceived(line)
                else:
                    self._endOfHead()
            elif not self.persistent:
                # Bytes after a request that ends the connection are ignored.
                return
            elif not line and not self._skippedEmptyLine:
                # RFC 9112 2.2: tolerate one empty line before a request.
                self._skippedEmptyLine = True
            else:
                self._requestLine(line)
        except _Rejected as rejection:
            self.rejectAndClose(rejection.status, rejection.reason)

    def _requestLine(self, line: bytes) -> None:
        parts = line.split(b" ")
        if len(parts) != 3:
            raise _Rejected(400, "malformed request line")
        method, target, version = parts
        if version not in SUPPORTED_VERSIONS:
            if _VERSION.fullmatch(version):
                raise _Rejected(505, "unsupported HTTP version")
            raise _Rejected(400, "malformed HTTP version")
        if method not in _KNOWN_METHODS and not _istoken(method):
            raise _Rejected(400, "invalid method")
        if not target or len(target.translate(None, _TARGET_FORBIDDEN)) != len(target):
            raise _Rejected(400, "invalid request-target")
        if method == b"CONNECT":
            # A reverse proxy does not tunnel to arbitrary authorities.
            raise _Rejected(501, "CONNECT not implemented")

        self._absoluteAuthority = None
        if target[:1] == b"/":
            pass
        elif target == b"*":
            # RFC 9112 3.2.4: asterisk-form is only for server-wide OPTIONS.
            if method != b"OPTIONS":
                raise _Rejected(400, "asterisk-form target without OPTIONS")
        else:
            target = self._absoluteForm(target)

        self._expectingRequestLine = False
        self._fieldCount = 0
        self._contentLengths = None
        self._transferEncodings = None
        self._hostCount = 0
        factory = self.requestFactory
        nonQueued = _nonQueuedFactories.get(factory)
        if nonQueued is None:
            nonQueued = INonQueuedRequestFactory.providedBy(factory)
            if len(_nonQueuedFactories) >= 64:
                _nonQueuedFactories.clear()
            _nonQueuedFactories[factory] = nonQueued
        if nonQueued:
            request = factory(self)
        else:
            request = factory(self, len(self.requests))
        self.requests.append(request)
        _storeRequestLine(self, method, target, version)

    def _absoluteForm(self, target: bytes) -> bytes:
        """
        Check an absolute-form target and return its origin-form.  RFC 9112
        3.2.2 makes the target's authority win over C{Host}; we only accept
        the two when they agree (checked at the end of the head) so that no
        component ever sees two different hosts for one request.
        """
        match = _ABSOLUTE_FORM.fullmatch(target)
        if match is None:
            raise _Rejected(400, "request-target is not origin, absolute or asterisk form")
        scheme, authority, rest = match.groups()
        if scheme.lower() not in (b"http", b"https"):
            raise _Rejected(400, "absolute-form target with unsupported scheme")
        if b"@" in authority or not validHost(authority):
            raise _Rejected(400, "invalid authority in absolute-form target")
        self._absoluteAuthority = authority.lower()
        if not rest:
            return b"/"
        if rest[:1] == b"?":
            return b"/" + rest
        return rest

    def _wholeHead(self, head: bytes) -> None:
        """
        A complete head (without the empty line that ends it) that fits the
        size budget: the request line, then the fields, then the end of the
        head, with exactly the checks and in the order L{lineReceived} would
        apply them one line at a time.
        """
        if self._rejected:
            return
        # What lineReceived would have counted, line by line.
        self._headSize += len(head) + 4
        self.MAX_LENGTH = self.limits.max_header_size - self._headSize
        lines = head.split(b"\r\n")
        # One look for controls in the whole head: if the only ones are the
        # CRLFs between lines, no field value has any and the per-value
        # check can be skipped.
        clean = len(head) - len(head.translate(None, _CONTROLS_EXCEPT_HTAB)) == 2 * (
            len(lines) - 1
        )
        try:
            self._requestLine(lines[0])
            if len(lines) > 1:
                del lines[0]
                self._fieldLines(lines, clean)
            self._endOfHead()
        except _Rejected as rejection:
            self.rejectAndClose(rejection.status, rejection.reason)

    def headerReceived(self, line: bytes) -> bool:
        """
        Validate one field line and add it to the request's headers.

        @return: C{True}; a bad line raises L{_Rejected} (caught by
            L{lineReceived}).
        """
        self._fieldLines((line,))
        return True

    def _fieldLines(self, lines: Any, clean: bool = False) -> None:
        """
        Validate field lines (none empty) and add them to the request's
        headers.

        The fields go straight into the dict C{Headers} keeps them in
        (L{rawFields}), under the name C{Headers} would file them under:
        the values have just been checked to hold no CR or LF, which is all
        C{addRawHeader} would change, so the result is the same.

        @param clean: the lines are known to hold no control character
            other than HTAB (no value needs checking).
        @raise _Rejected: on the first bad line, or one too many fields.
        """
        fields = rawFields(self.requests[-1].requestHeaders)
        checked = _checkedNames
        count = self._fieldCount
        maxHeaders = self.limits.max_headers
        try:
            for line in lines:
                if line[0] in b" \t":
                    # RFC 9112 5.2: obs-fold is refused, not unfolded.
                    raise _Rejected(400, "obsolete line folding")
                name, colon, value = line.partition(b":")
                known = checked.get(name) if colon else None
                if known is None:
                    if not colon or not _istoken(name):
                        # Also catches whitespace before the colon (RFC 9112 5.1).
                        raise _Rejected(400, "invalid field name")
                    known = (name.lower(), canonicalName(name))
                    if len(checked) < _MAX_CHECKED_NAMES:
                        checked[name] = known
                lowered, key = known
                value = value.strip(b" \t")
                if not clean and len(value.translate(None, _CONTROLS_EXCEPT_HTAB)) != len(value):
                    raise _Rejected(400, "control character in field value")
                count += 1
                if count > maxHeaders:
                    raise _Rejected(431, "too many header fields")
                if lowered in _SPECIAL_FIELDS:
                    self._specialField(lowered, value)
                values = fields.get(key)
                if values is None:
                    fields[key] = [value]
                else:
                    values.append(value)
        finally:
            self._fieldCount = count

    def _specialField(self, lowered: bytes, value: bytes) -> None:
        if lowered == b"content-length":
            if self._contentLengths is None:
                self._contentLengths = [value]
            else:
                raise _Rejected(400, "several Content-Length fields")
            _parseContentLength(value)
        elif lowered == b"transfer-encoding":
            if self._transferEncodings is None:
                self._transferEncodings = [value]
            else:
                self._transferEncodings.append(value)
        else:
            self._hostCount += 1
            if self._hostCount > 1:
                raise _Rejected(400, "several Host fields")
            if not validHost(value):
                raise _Rejected(400, "invalid Host")

    def _endOfHead(self) -> None:
        request = self.requests[-1]
        version = requestLineOf(self)[2]
        authority = self._absoluteAuthority
        if self._hostCount == 0:
            if version == b"HTTP/1.1":
                # RFC 9112 3.2: a 1.1 request without Host MUST get a 400.
                raise _Rejected(400, "missing Host")
            if authority is not None:
                request.requestHeaders.setRawHeaders(b"Host", [authority])
        elif authority is not None:
            host = request.requestHeaders.getRawHeaders(b"Host")[0].lower()
            if host != authority:
                raise _Rejected(400, "absolute-form authority differs from Host")

        transferEncodings = self._transferEncodings
        contentLengths = self._contentLengths
        if transferEncodings is not None:
            if version != b"HTTP/1.1":
                # RFC 9112 6.1: Transfer-Encoding in 1.0 means faulty framing.
                raise _Rejected(400, "Transfer-Encoding in HTTP/1.0")
            if contentLengths is not None:
                # RFC 9112 6.1: a request smuggling vector; refuse it.
                raise _Rejected(400, "both Content-Length and Transfer-Encoding")
            _checkTransferEncoding(transferEncodings)
            self.length = None
            maxTrailerSize = self.limits.max_header_size
            _installBodyDecoder(
                self,
                lambda finish: ChunkedDecoder(
                    request.handleContentChunk, finish, maxTrailerSize=maxTrailerSize
                ),
            )
        elif contentLengths is not None:
            length = _parseContentLength(contentLengths[0])
            self.length = length
            if length:
                _installBodyDecoder(
                    self,
                    lambda finish: IdentityDecoder(length, request.handleContentChunk, finish),
                )
        else:
            self.length = 0

        self.allHeadersReceived()
        if self._rejected or self.transport is None or self.transport.disconnecting:
            # The request object refused it from gotLength and is closing
            # the connection: the rest of the body must not be parsed as the
            # next head.
            self._rejected = True
            self._cancelHeadTimer()
            return
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()

    def allHeadersReceived(self) -> None:
        self._headArmed = False  # _disarmHeadTimer
        self._awaitingHead = False
        request = self.requests[-1]
        request.parseCookies()
        version = requestLineOf(self)[2]
        self.persistent = self.checkPersistence(request, version)
        request.gotLength(self.length)
        # Twisted answers Expect: 100-continue itself; never after the request
        # object already started (or finished) a response of its own, such as
        # a 413 decided in gotLength.
        if (
            version == b"HTTP/1.1"
            and not request.startedWriting
            and not self._rejected
            and self.transport is not None
            and not self.transport.disconnecting
        ):
            expect = rawFields(request.requestHeaders).get(b"Expect")
            if expect and expect[0].lower() == b"100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def allContentReceived(self) -> None:
        self._expectingRequestLine = True
        self._skippedEmptyLine = False
        self._headSize = 0
        self.MAX_LENGTH = self.limits.max_header_size
        self._suspendingIdle = True
        try:
            super().allContentReceived()
        finally:
            self._suspendingIdle = False

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        RFC 9112 9.3: HTTP/1.1 persists unless a C{Connection} field (any of
        them, any list member) says C{close}.  HTTP/1.0 connections close
        after one request, as in Twisted.
        """
        if version != b"HTTP/1.1":
            return False
        for value in rawFields(request.requestHeaders).get(b"Connection", ()):
            for token in value.split(b","):
                if token.strip(b" \t").lower() == b"close":
                    request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
                    return False
        return True


def _idleExpired(channel: EdgeHTTPChannel) -> None:
    channel._idleTimedOut()


def _headExpired(channel: EdgeHTTPChannel) -> None:
    channel._headTimedOut()


_localAddresses: dict[Any, Any] = {}
"""The local addresses connections were accepted on, each kept once
(L{EdgeHTTPChannel.getHost})."""

_OWN_DEFAULTS: dict[str, Any] = {
    "limits": Limits(),
    "_headQueue": None,
    "_headArmed": False,
    "_abortCall": None,
    "_rejected": False,
    "_awaitingHead": True,
    "_expectingRequestLine": True,
    "_skippedEmptyLine": False,
    "_headSize": 0,
    "_fieldCount": 0,
    "_contentLengths": None,
    "_transferEncodings": None,
    "_hostCount": 0,
    "_absoluteAuthority": None,
    "_hostAddress": None,
    "_peerAddress": None,
    "_secure": None,
    "_idleQueue": None,
    "_suspendingIdle": False,
}
"""The starting values of L{EdgeHTTPChannel}'s own slots."""

_SLOT_DEFAULTS: tuple[tuple[str, Any], ...] = tuple(
    (name, getattr(HTTPChannel, name))
    for name in EdgeHTTPChannel.__slots__
    if hasattr(HTTPChannel, name) and name not in _OWN_DEFAULTS
) + tuple(_OWN_DEFAULTS.items())
"""What L{EdgeHTTPChannel}'s slots start at: the class attributes of
Twisted's they shadow, then ours."""


def edgeChannelProtocolFactory(factory: Any) -> Any:
    """
    A C{protocol} for an L{http.HTTPFactory}/C{Site} subclass: an
    L{EdgeHTTPChannel} configured from C{factory.limits} (when the factory
    has that attribute) inside Twisted's ALPN switcher, so that a TLS
    connection negotiating C{h2} still becomes an HTTP/2 connection.  Use as
    C{protocol = edgeChannelProtocolFactory} on the factory class.

    Relies on Twisted's private ALPN switcher (see L{_wrapForALPN}).
    """
    channel = EdgeHTTPChannel()
    limits = getattr(factory, "limits", None)
    if isinstance(limits, Limits):
        channel.limits = limits
    return _wrapForALPN(channel)
