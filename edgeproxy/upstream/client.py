# -*- test-case-name: tests.test_client -*-
"""
A lean HTTP/1.1 client for the proxy's backend side: L{UpstreamClient} is a
drop-in for C{Agent.usingEndpointFactory(reactor, endpoints, pool)} with a
keep-alive C{HTTPConnectionPool}, made for the one thing the proxy does with
it: send a request whose head is already built and relay the response.

Why it exists: under the R1 benchmark (kept-alive TLS, 1 KiB responses)
Twisted's client side (C{Agent.request}, C{HTTPConnectionPool},
C{HTTP11ClientProtocol} and its line-by-line C{HTTPClientParser}, and the
Deferred hops between them) was about a third of the proxy's CPU time (see
C{docs/performance.rst}, "Where the time goes").  This client parses a
response head in one pass over the buffer (filling C{Headers} directly),
writes a request head in one C{transport.write}, hands the outcome straight
to the pool's attempt (L{UpstreamClient.send}: no Deferred at all; the
Deferred-returning L{UpstreamClient.request} wraps it), makes the response
its own body transport, and keeps one idle timer per pooled connection that
is re-armed lazily instead of one C{callLater} created and cancelled per
request.

Same behaviour as the Agent where the proxy relies on it:

  - C{request(method, uri, headers, bodyProducer)} returns a Deferred firing
    with an L{IResponse} (C{code}, C{phrase}, C{version}, C{headers},
    C{length}, C{deliverBody}); the backend's connection control fields
    (C{Connection}, C{Content-Length}, C{Transfer-Encoding}, C{Keep-Alive}...)
    are kept out of C{headers}, as Twisted does, and exposed as the
    C{connectionHeaders} attribute (the one
    C{edgeproxy.upstream.pool.CONNECTION_HEADERS_ATTRIBUTE} names), so
    C{fullResponseHeaders} works unchanged;
  - request framing: C{Content-Length} from the producer's length, chunked
    for C{UNKNOWN_LENGTH}, C{Content-Length: 0} for a body-less C{PUT} or
    C{POST}; a producer writing more or fewer bytes than it declared fails
    the request (C{WrongBodyLength}); exactly one C{Host} is required;
  - response framing (RFC 9112 6.3): no body for C{HEAD}, C{204}, C{304};
    C{1xx} heads are skipped; a single C{chunked} coding (strict chunk
    parser, trailers dropped), else C{Content-Length} (repeated equal values
    allowed, conflicting ones refused), else the body ends when the backend
    closes (C{PotentialDataLoss}, connection not reused);
  - failures are Twisted's classes, so C{classifyFailure} and any retry
    policy read them the same way: C{RequestTransmissionFailed} (lost while
    sending the body), C{RequestGenerationFailed} (the producer failed or the
    request was cancelled while sending), C{ResponseNeverReceived} (nothing
    received), C{ResponseFailed} (part of a head, or a body cut short),
    C{ParseError} inside them for a head that is not HTTP; connect failures
    are the endpoint's own;
  - cancelling the request's Deferred before the response head aborts the
    connection (or the connection attempt);
  - backpressure: the body protocol's transport pauses and resumes reading
    from the backend (the proxy pauses it while the client is slow); the
    request body producer is registered with the connection as a streaming
    producer;
  - connection reuse: a connection goes back to the pool once the response
    body was read completely and the request was completely sent, unless
    the response said C{Connection: close}, was HTTP/1.0 without
    C{keep-alive}, was delimited by the close, or was followed by
    unexpected bytes; at most C{maxPersistentPerHost} idle connections per
    backend are kept, each for at most C{cachedConnectionTimeout} seconds;
    no request is ever retried automatically.
"""

from __future__ import annotations

import re
from typing import Any, Callable
from typing import Protocol as _TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    BadHeaders,
    BadResponseVersion,
    ExcessWrite,
    ParseError,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    WrongBodyLength,
)
from twisted.web.client import URI
from twisted.web.http import PotentialDataLoss, _DataLoss
from twisted.web.http_headers import Headers, _nameEncoder
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from edgeproxy import h1 as _h1


class _DecoderShim:
    """Interim: h1 readers behind the old decoder interface."""

    def __init__(self, reader, dataCallback, finishCallback):
        self._reader = reader
        self.dataCallback = dataCallback
        self.finishCallback = finishCallback

    def dataReceived(self, data):
        piece = self._reader.feed(data)
        if piece:
            self.dataCallback(piece)
        if self._reader.done:
            self.finishCallback(self._reader.rest)

    def noMoreData(self):
        self._reader.eof()


def IdentityDecoder(length, dataCallback, finishCallback):
    return _DecoderShim(_h1.LengthReader(length), dataCallback, finishCallback)


def ChunkedDecoder(dataCallback, finishCallback, maxTrailerSize=16384):
    return _DecoderShim(_h1.ChunkedReader(maxTrailerSize), dataCallback, finishCallback)

log = Logger()

CONNECTION_CONTROL = frozenset(
    (
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    )
)
"""The fields Twisted's client files apart from C{response.headers}; kept
the same so code written for the Agent sees the same split."""

_HEAD_CONNECTION_CONTROL = CONNECTION_CONTROL - {b"content-length"}
"""For a C{HEAD} response, C{Content-Length} is an entity field."""

NO_BODY_CODES = frozenset((204, 304))

_KEEP_ALIVE = [b"keep-alive"]

MAX_HEAD = 64 * 1024
"""A response head longer than this is refused (Twisted's line limit is
16 KiB per line; a whole head over 64 KiB is not a real response)."""

_STATUS_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_VERSIONS = {b"HTTP/1.1": (b"HTTP", 1, 1), b"HTTP/1.0": (b"HTTP", 1, 0)}
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_KNOWN_METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE")
)
_TARGET_FORBIDDEN = bytes(range(0x21)) + b"\x7f"

_CLOSED = Failure(ConnectionDone("connection closed"))
_BODY_DONE = Failure(ResponseDone("Response body fully received"))
"""The end of every complete response body: one shared instance, as
Twisted shares C{connectionDone}, instead of a Failure built per response
(its consumers only read it)."""


class _ResponseHead:
    """
    A parsed response head (status line and fields).

    @ivar fields: the end-to-end fields, as C{Headers._rawHeaders} holds
        them (canonical name to values).
    @ivar control: the connection control fields (L{CONNECTION_CONTROL}),
        the same way.
    """

    __slots__ = ("version", "code", "phrase", "fields", "control")

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        fields: dict[bytes, list[bytes]],
        control: dict[bytes, list[bytes]],
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.fields = fields
        self.control = control


_fieldKeys: dict[bytes, tuple[bytes, bool, bool]] = {}
"""Field names as received to their L{Headers} key and whether they are
connection control fields (for any response, and for a C{HEAD} response):
the token check and the canonical capitalisation of each name are done
once, not once per response."""
_MAX_FIELD_KEYS = 10_000
"""Bound on L{_fieldKeys}: a backend sending endless new names only loses
the cache, not memory."""


def _fieldKey(name: bytes, line: bytes) -> tuple[bytes, bool, bool]:
    """
    The L{Headers} key of the field name C{name}, and whether it is a
    connection control field (L{CONNECTION_CONTROL}) in any response and
    in a C{HEAD} response.

    @raise ParseError: C{name} is empty or not a token (RFC 9110 5.1).
    """
    known = _fieldKeys.get(name)
    if known is not None:
        return known
    if not name:
        raise ParseError("invalid header", line)
    lowered = name.lower()
    try:
        # The same key Headers.addRawHeader would file the field under.
        key = _nameEncoder.encode(lowered)
    except ValueError:
        # InvalidHeaderName: not a token.
        raise ParseError("invalid header name", line)
    known = (key, lowered in CONNECTION_CONTROL, lowered in _HEAD_CONNECTION_CONTROL)
    if len(_fieldKeys) < _MAX_FIELD_KEYS:
        _fieldKeys[name] = known
    return known


def _headersFrom(raw: dict[bytes, list[bytes]]) -> Headers:
    """
    A L{Headers} holding C{raw}, whose keys are already the canonical names
    C{Headers} files fields under (C{_nameEncoder.encode}) and whose values
    are already sanitised.

    Private Twisted surface (C{Headers._rawHeaders}, listed in
    C{docs/architecture.rst}): filling the dict directly skips, per field,
    the name encoding and the value sanitising that C{addRawHeader} repeats
    (about 10% of the in-memory R1 profile).  C{tests/test_client.py}
    fails if C{Headers} stops keeping its fields there.
    """
    headers = Headers.__new__(Headers)
    headers._rawHeaders = raw
    return headers


def parseResponseHead(head: bytes, method: bytes) -> _ResponseHead:
    """
    Parse a response head (without the empty line that ends it).

    Lines end in CRLF or, as Twisted's client also accepts, a bare LF; a
    line starting with whitespace continues the previous field (obs-fold,
    joined as Twisted does).  The fields come out exactly as
    C{Headers.addRawHeader} would have filed them, in one pass.

    @param head: the status line and the field lines.
    @param method: the request's method (a C{HEAD} response's
        C{Content-Length} is an entity field, not a framing one).
    @raise ParseError: the head is not an HTTP/1.x response head.
    """
    if head[-1:] == b"\r":
        # The CR of the last line's CRLF (the head ends before its LF).
        head = head[:-1]
    crlf = head.count(b"\r\n")
    # A head whose every CR and LF is a CRLF (what servers send) splits
    # into lines with nothing left to strip, and no value can hold a line
    # break; anything else (bare LFs, stray CRs) takes the careful path.
    return _parseHead(
        head, method, head.count(b"\n") == crlf and head.count(b"\r") == crlf
    )


def _parseHead(head: bytes, method: bytes, clean: bool) -> _ResponseHead:
    """
    L{parseResponseHead}, once it knows whether C{head} is C{clean}: only
    CRLF line ends, no other CR or LF.
    """
    if clean:
        lines = head.split(b"\r\n")
        status = lines[0]
    else:
        lines = head.split(b"\n")
        status = lines[0]
        if status[-1:] == b"\r":
            status = status[:-1]
    parts = status.split(b" ", 2)
    if len(parts) == 3:
        versionText, codeText, phrase = parts
    elif len(parts) == 2:
        # Some servers omit the reason phrase; Twisted accepts that too.
        versionText, codeText = parts
        phrase = b""
    else:
        raise ParseError("wrong number of parts", status)
    version = _VERSIONS.get(versionText)
    if version is None:
        match = _STATUS_VERSION.fullmatch(versionText)
        if match is None:
            raise BadResponseVersion("not HTTP/x.y", versionText)
        version = (b"HTTP", int(match.group(1)), int(match.group(2)))
    if len(codeText) != 3 or not codeText.isdigit():
        raise ParseError("non-integer status code", status)
    if not clean:
        lines = _unfold(lines)
    fields: dict[bytes, list[bytes]] = {}
    control: dict[bytes, list[bytes]] = {}
    which = 2 if method == b"HEAD" else 1
    fieldKeys = _fieldKeys
    for index in range(1, len(lines)):
        line = lines[index]
        name, colon, value = line.partition(b":")
        known = fieldKeys.get(name) if colon else None
        if known is None:
            if clean and line[:1] in (b" ", b"\t"):
                # obs-fold (RFC 9112 5.2): rare; the careful path joins it.
                return _parseHead(head, method, False)
            if not colon:
                raise ParseError("invalid header", line)
            known = _fieldKey(name, line)
        value = value.strip()
        if not clean and b"\r" in value:
            # What Headers does to a value with a line break in it.
            value = b" ".join(value.splitlines())
        target = control if known[which] else fields
        key = known[0]
        values = target.get(key)
        if values is None:
            target[key] = [value]
        else:
            values.append(value)
    return _ResponseHead(version, int(codeText), phrase, fields, control)


def _unfold(lines: list[bytes]) -> list[bytes]:
    """
    The lines of a head (status line first) with their CR ends stripped and
    obs-fold continuations (RFC 9112 5.2) joined to the line they
    continue, as Twisted's client joins them.

    @raise ParseError: a continuation with no field before it.
    """
    out = [lines[0]]
    for line in lines[1:]:
        if line[-1:] == b"\r":
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            if len(out) == 1:
                raise ParseError("continuation line without a field", line)
            out[-1] += line
            continue
        out.append(line)
    return out


def _contentLength(values: list[bytes] | None) -> int | None:
    """
    The response's C{Content-Length} from its values: L{None} when absent;
    repeated equal values (C{42, 42} or two fields) allowed, as in Twisted.

    @raise ParseError: conflicting or malformed values.
    """
    if values is None:
        return None
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and value.isascii() and len(value) <= 18:
            return int(value)
    lengths = set()
    for value in values:
        for element in value.split(b","):
            element = element.strip(b" \t")
            if not element.isdigit() or not element.isascii() or len(element) > 18:
                raise ParseError("invalid Content-Length", element)
            lengths.add(int(element))
    if len(lengths) != 1:
        raise ParseError("conflicting Content-Length values", b",".join(values))
    return lengths.pop()


def _listTokens(values: list[bytes] | None) -> list[bytes]:
    if values is None:
        return []
    return [token.strip(b" \t").lower() for value in values for token in value.split(b",")]


@implementer(IResponse, IPushProducer)
class UpstreamResponse:
    """
    A backend response (L{IResponse}); the body is delivered to one
    protocol through L{deliverBody}.

    The response is also what that protocol sees as its transport
    (L{IPushProducer}): pausing and resuming reads from the backend, or
    giving up on the body (C{stopProducing} closes the connection, which
    then cannot be reused); inert once the response is over.  One object
    per response instead of two.

    @ivar connectionHeaders: the backend's connection control fields.
    @ivar whenDelivered: called once, just before the body protocol's
        C{connectionLost} (the end of the body, complete or not); the pool
        ends the request's in-flight count there.
    """

    request = None
    previousResponse = None
    disconnecting = False

    def __init__(
        self, head: _ResponseHead, length: int | object, connection: UpstreamConnection
    ) -> None:
        self.version = head.version
        self.code = head.code
        self.phrase = head.phrase
        self.headers = _headersFrom(head.fields)
        self.connectionHeaders = _headersFrom(head.control)
        self.length = length
        self.whenDelivered: Callable[[], None] | None = None
        self._protocol: Any = None
        self._buffer: list[bytes] | None = []
        self._outcome: Failure | None = None
        self._connection: UpstreamConnection | None = connection
        self._delivered = False

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        """
        Deliver the body to C{protocol}: C{makeConnection} with a transport
        that pauses, resumes or stops reading it, C{dataReceived} for each
        part, and C{connectionLost} once with C{ResponseDone} (complete),
        C{PotentialDataLoss} (ended by the backend's close) or a
        C{ResponseFailed}.

        @raise RuntimeError: if called more than once.
        """
        if self._delivered:
            raise RuntimeError("deliverBody already called")
        self._delivered = True
        self._protocol = protocol
        protocol.makeConnection(self)
        buffered, self._buffer = self._buffer, None
        if buffered:
            for data in buffered:
                protocol.dataReceived(data)
        if self._outcome is not None:
            outcome, self._outcome = self._outcome, None
            self._protocol = None
            self._lose(protocol, outcome)
            return
        connection = self._connection
        if connection is not None:
            connection._delivering()

    def _lose(self, protocol: Any, reason: Failure) -> None:
        whenDelivered, self.whenDelivered = self.whenDelivered, None
        if whenDelivered is not None:
            whenDelivered()
        protocol.connectionLost(reason)

    # The body protocol's transport ------------------------------------------

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection._pauseBody()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection._resumeBody()

    def stopProducing(self) -> None:
        if self._connection is not None:
            self._connection._stopBody()

    def loseConnection(self) -> None:
        self.stopProducing()

    # From the connection ---------------------------------------------------

    def _data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        elif self._buffer is not None:
            self._buffer.append(data)

    def _finished(self, reason: Failure) -> None:
        # The connection may be back in the pool: pausing or stopping
        # through this response must no longer reach it.
        self._connection = None
        protocol = self._protocol
        if protocol is not None:
            self._protocol = None
            self._lose(protocol, reason)
        elif not self._delivered:
            self._outcome = reason


class _Receiver(_TypingProtocol):
    """
    Who learns the outcome of one request on an L{UpstreamConnection}:
    exactly one of its methods is called, once.  The pool's attempt is one
    (no Deferred between the connection and the pool);
    L{UpstreamClient.request} wraps a Deferred in one.
    """

    def upstreamResponded(self, response: UpstreamResponse) -> None:
        """The response head arrived."""

    def upstreamFailed(self, failure: Failure) -> None:
        """The request failed before its response head (Twisted's classes)."""


class UpstreamConnection(Protocol):
    """
    One HTTP/1.1 connection to a backend, one request at a time.

    @ivar key: the pool key of the backend it is connected to.
    """

    _log = log

    def __init__(self, client: UpstreamClient, key: Any) -> None:
        self._client = client
        self.key = key
        self._state = "IDLE"
        # Per request:
        self._receiver: _Receiver | None = None
        self._method = b""
        self._persistent = True
        self._buffer = b""
        self._received = False
        self._response: UpstreamResponse | None = None
        self._decoder: Any = None
        self._untilClose = False
        self._reusable = True
        self._sending = False
        self._producer: Any = None
        self._bodyDone: Deferred[None] | None = None
        self._heldResponse: UpstreamResponse | None = None
        self._readPaused = False
        self._bodyPaused = False
        # Idle-pool bookkeeping:
        self.idleSince = 0.0
        self.idleTimer: Any = None
        self.closeWaiters: list[Deferred[None]] = []
        self._lost = False

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    # Sending -----------------------------------------------------------------

    def send(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        bodyProducer: Any,
        persistent: bool,
        receiver: _Receiver,
    ) -> None:
        """
        Send one request; see L{UpstreamClient.request}.  Its outcome goes
        to C{receiver} (possibly before this returns, for a request that
        cannot be sent); L{abandon} cancels it.
        """
        if self._state != "IDLE" or self._lost:
            receiver.upstreamFailed(Failure(RequestNotSent()))
            return
        self._state = "SENDING"
        self._method = method
        self._persistent = persistent
        self._buffer = b""
        self._received = False
        self._response = None
        self._decoder = None
        self._untilClose = False
        self._reusable = persistent
        self._heldResponse = None
        self._receiver = receiver
        try:
            head = _requestHead(method, target, headers, bodyProducer, persistent)
        except Exception:
            self._state = "FAILED"
            self._receiver = None
            self.transport.abortConnection()
            receiver.upstreamFailed(Failure(RequestGenerationFailed([Failure()])))
            return
        transport = self.transport
        _writeNow(transport, head)
        if bodyProducer is None:
            self._state = "WAITING"
            return
        self._sending = True
        self._producer = bodyProducer
        if bodyProducer.length is UNKNOWN_LENGTH:
            consumer: Any = _ChunkedConsumer(transport, bodyProducer)
        else:
            consumer = _LengthConsumer(transport, bodyProducer)
        transport.registerProducer(bodyProducer, True)
        try:
            producing = bodyProducer.startProducing(consumer)
        except Exception:
            producing = fail()
        self._bodyDone = producing
        producing.addCallbacks(
            self._bodySent, self._bodyFailed, callbackArgs=(consumer,), errbackArgs=(consumer,)
        )

    def _bodySent(self, _: object, consumer: Any) -> None:
        if not self._sending:
            return
        try:
            consumer.finish()
        except Exception:
            self._bodyFailed(Failure(), consumer)
            return
        self._sending = False
        self._producer = None
        self._bodyDone = None
        self.transport.unregisterProducer()
        if self._state == "SENDING":
            self._state = "WAITING"
        held, self._heldResponse = self._heldResponse, None
        if held is not None:
            self._fire(held)

    def _bodyFailed(self, reason: Failure, consumer: Any) -> None:
        if not self._sending:
            return
        consumer.stop()
        self._sending = False
        self._producer = None
        self._bodyDone = None
        self.transport.unregisterProducer()
        self._reusable = False
        if self._state == "SENDING":
            # Twisted's Agent: the request could not be generated.
            self._state = "FAILED"
            self.transport.abortConnection()
            self._failRequest(RequestGenerationFailed([reason]))
        else:
            self.transport.abortConnection()

    def abandon(self, receiver: _Receiver) -> None:
        """
        The caller of the request whose outcome goes to C{receiver} gave up
        before the response head: abort the connection and fail the
        request with a C{CancelledError} inside Twisted's class for how far
        it got.  Nothing happens when C{receiver}'s request is over (this
        connection may be serving another one by now).
        """
        if receiver is not self._receiver:
            return
        self._reusable = False
        if self._sending:
            self._stopSending()
            self._state = "FAILED"
            self.transport.abortConnection()
            self._failRequest(RequestGenerationFailed([Failure(CancelledError())]))
            return
        self._state = "FAILED"
        self.transport.abortConnection()
        cls = ResponseFailed if self._received else ResponseNeverReceived
        self._failRequest(cls([Failure(CancelledError())]))

    def _stopSending(self) -> None:
        producer, self._producer = self._producer, None
        self._sending = False
        self._bodyDone = None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                self._log.failure("stopping a request body producer failed")
            self.transport.unregisterProducer()

    def _failRequest(self, failure: Any) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            try:
                receiver.upstreamFailed(
                    failure if isinstance(failure, Failure) else Failure(failure)
                )
            except Exception:
                # What a Deferred callback's error would have been: logged,
                # and not this connection's problem.
                self._log.failure("handling a failed upstream request failed")

    # Receiving ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                self._decoder.dataReceived(data)
            except Exception:
                self._bodyError(Failure())
            return
        if self._untilClose:
            self._response._data(data)  # type: ignore[union-attr]
            return
        if self._state not in ("SENDING", "WAITING"):
            # Bytes nobody asked for (idle in the pool, or after a
            # response): the connection's framing is lost.
            self._reusable = False
            self.transport.loseConnection()
            return
        self._received = True
        buffer = self._buffer + data if self._buffer else data
        while True:
            # The head ends at the first empty line; lines end in CRLF or,
            # as Twisted's client also accepts, a bare LF.
            crlf = buffer.find(b"\n\r\n")
            if crlf != -1:
                # A bare LF end before it is rare: look for it only up to
                # there.
                bare = buffer.find(b"\n\n", 0, crlf + 1)
            else:
                bare = buffer.find(b"\n\n")
            if bare == -1 and crlf == -1:
                if len(buffer) > MAX_HEAD:
                    self._headError(ParseError("response head too long", buffer[:64]))
                    return
                self._buffer = buffer
                return
            if bare != -1:
                end, bodyStart = bare, bare + 2
            else:
                end, bodyStart = crlf, crlf + 3
            if end > MAX_HEAD:
                self._headError(ParseError("response head too long", buffer[:64]))
                return
            rest = buffer[bodyStart:]
            try:
                parsed = parseResponseHead(buffer[:end], self._method)
            except ParseError:
                self._headError(Failure())
                return
            if 100 <= parsed.code < 200:
                # RFC 9110 15.2: an unexpected 1xx may be ignored; Twisted
                # does the same (101 included: tunnels do not come here).
                buffer = rest
                if not buffer:
                    self._buffer = b""
                    return
                continue
            self._buffer = b""
            self._headReceived(parsed, rest)
            return

    def _headError(self, failure: Any) -> None:
        if not isinstance(failure, Failure):
            failure = Failure(failure)
        self._reusable = False
        if self._sending:
            self._stopSending()
        self._state = "FAILED"
        self.transport.loseConnection()
        self._failRequest(ResponseFailed([failure]))

    def _headReceived(self, head: _ResponseHead, rest: bytes) -> None:
        control = head.control
        connection = control.get(b"Connection")
        if connection is not None:
            if connection == _KEEP_ALIVE:
                # What nginx and most servers send: no list to split.
                tokens = _KEEP_ALIVE
            else:
                tokens = _listTokens(connection)
            if b"close" in tokens or (
                head.version[1:] == (1, 0) and b"keep-alive" not in tokens
            ):
                self._reusable = False
        elif head.version[1:] == (1, 0):
            self._reusable = False
        try:
            length: int | object
            if head.code in NO_BODY_CODES or self._method == b"HEAD":
                length = 0
                framing = "none"
            else:
                codings = control.get(b"Transfer-Encoding")
                if codings is not None:
                    if _listTokens(codings) != [b"chunked"]:
                        raise ParseError(
                            "unsupported Transfer-Encoding", b",".join(codings)
                        )
                    length = UNKNOWN_LENGTH
                    framing = "chunked"
                else:
                    contentLength = _contentLength(control.get(b"Content-Length"))
                    if contentLength is None:
                        length = UNKNOWN_LENGTH
                        framing = "close"
                    else:
                        length = contentLength
                        framing = "length" if contentLength else "none"
        except ParseError:
            self._headError(Failure())
            return
        response = UpstreamResponse(head, length, self)
        self._response = response
        # Like Twisted's client, stop reading until the body has a reader
        # (deliverBody resumes).  Besides bounding what is buffered, this
        # takes the backend off the poller and back on after the client's
        # response head was queued, so a backend closing right after its
        # head is seen after that head went out (a reset client connection
        # would hide the head).  A body that is already complete in the
        # bytes at hand is not paused for: _afterResponse would resume
        # before the response is handed over, so the pause would change
        # nothing but cost two epoll_ctl calls per response (about 4% of
        # the R1 profile).
        if framing == "none":
            self._bodyComplete(rest)
        elif framing == "length" and len(rest) >= length:  # type: ignore[operator]
            # The whole body came with its head (most small responses): no
            # decoder for it.
            response._buffer.append(rest[:length])  # type: ignore[union-attr, index]
            self._bodyComplete(rest[length:])  # type: ignore[index]
        elif framing == "close":
            self._pauseRead()
            self._reusable = False
            self._untilClose = True
            if rest:
                response._data(rest)
        else:
            if framing == "chunked":
                self._decoder = ChunkedDecoder(response._data, self._bodyComplete)
            else:
                self._decoder = IdentityDecoder(
                    length, response._data, self._bodyComplete  # type: ignore[arg-type]
                )
            if rest:
                try:
                    self._decoder.dataReceived(rest)
                except Exception:
                    self._pauseRead()
                    self._bodyError(Failure())
                    return
            if self._decoder is not None:
                self._pauseRead()
        if self._receiver is None:
            return
        if self._sending:
            # The backend answered before the request body was sent: like
            # the Agent, hand the response over only once it is complete
            # (or the body is sent), never while the request is still
            # being written to the same connection.
            self._heldResponse = response
            if response._buffer is not None and self._response is response:
                self._pauseRead()
            return
        self._fire(response)

    def _fire(self, response: UpstreamResponse) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is None:
            return
        try:
            receiver.upstreamResponded(response)
        except Exception:
            # What a Deferred callback's error would have been: logged, and
            # not this connection's problem.
            self._log.failure("handing an upstream response over failed")

    def _delivering(self) -> None:
        if self._readPaused and not self._bodyPaused:
            self._readPaused = False
            self.transport.resumeProducing()

    def _pauseRead(self) -> None:
        if not self._readPaused:
            self._readPaused = True
            self.transport.pauseProducing()

    def _pauseBody(self) -> None:
        self._bodyPaused = True
        if not self._readPaused:
            self._readPaused = True
            self.transport.pauseProducing()

    def _resumeBody(self) -> None:
        self._bodyPaused = False
        if self._readPaused and (self._response is None or self._response._delivered):
            self._readPaused = False
            self.transport.resumeProducing()

    def _stopBody(self) -> None:
        self._reusable = False
        self.transport.loseConnection()

    def _bodyComplete(self, rest: bytes) -> None:
        self._decoder = None
        if rest:
            # Bytes after a complete response: the backend's framing is not
            # what it said; never reuse this connection.
            self._reusable = False
        response, self._response = self._response, None
        if self._sending:
            # Complete response while the request body is still being sent:
            # hand it over now (the Agent does the same), stop sending, and
            # close the connection: what the backend does with the rest of
            # the body is unknown.
            self._stopSending()
            self._reusable = False
            self._state = "DONE"
            self.transport.loseConnection()
            held, self._heldResponse = self._heldResponse, None
            if held is not None:
                self._fire(held)
        else:
            self._afterResponse()
        if response is not None:
            response._finished(_BODY_DONE)

    def _afterResponse(self) -> None:
        self._state = "IDLE"
        if self._readPaused:
            self._readPaused = False
            self.transport.resumeProducing()
        self._bodyPaused = False
        if self._reusable and not self._lost:
            self._client._release(self)
        else:
            self._state = "DONE"
            self.transport.loseConnection()

    def _bodyError(self, failure: Failure) -> None:
        self._decoder = None
        self._reusable = False
        self._state = "FAILED"
        self.transport.loseConnection()
        response, self._response = self._response, None
        held, self._heldResponse = self._heldResponse, None
        if self._sending:
            self._stopSending()
        if self._receiver is not None:
            # Still held (request body in progress): the caller gets the
            # failure instead of a broken response.
            self._failRequest(ResponseFailed([failure], response))
            return
        if response is not None and held is not response:
            response._finished(
                Failure(ResponseFailed([failure, Failure(_DataLoss())], response))
            )

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        self._lost = True
        self._client._lost(self)
        response, self._response = self._response, None
        decoder, self._decoder = self._decoder, None
        held, self._heldResponse = self._heldResponse, None
        untilClose, self._untilClose = self._untilClose, False
        sending = self._sending
        if sending:
            self._stopSending()
        if self._receiver is not None:
            if sending:
                self._failRequest(RequestTransmissionFailed([reason]))
            else:
                cls = ResponseFailed if self._received else ResponseNeverReceived
                self._failRequest(cls([reason]))
            return
        if response is None or held is response:
            return
        if untilClose:
            # RFC 9112 6.3 item 8: the close is the end of such a body.
            response._finished(Failure(PotentialDataLoss()))
            return
        if decoder is not None:
            response._finished(
                Failure(ResponseFailed([reason, Failure(_DataLoss())], response))
            )
            return
        response._finished(Failure(ResponseFailed([reason], response)))


def _writeNow(transport: Any, data: bytes) -> None:
    """
    Write C{data}, straight to the socket when nothing is queued before it.

    Twisted's TCP transport never sends in C{write}: it queues, registers
    the socket for writability and sends on the next reactor turn, which
    costs two C{epoll_ctl} calls and one more event per request head (about
    4% of the R1 profile).  When the transport's buffers are empty the bytes
    can go out at once through its own C{writeSomeData} (what C{doWrite}
    would call), and whatever the kernel does not take is queued as usual.
    Only a plain TCP connection qualifies: a TLS wrapper forwards unknown
    attributes to the TCP transport beneath it, so duck typing would send
    plain text under TLS.
    """
    if (
        type(transport) is tcp.Client
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "TLS", False)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # else: an error instance; queue the bytes, doWrite reports it.
    transport.write(data)


def _requestHead(
    method: bytes, target: bytes, headers: Headers, bodyProducer: Any, persistent: bool
) -> bytes:
    """
    The request head as one string, with the framing field the body needs.

    @raise ValueError: an invalid method or target.
    @raise BadHeaders: not exactly one C{Host}.
    """
    if method not in _KNOWN_METHODS and _METHOD.fullmatch(method) is None:
        raise ValueError(f"Invalid method {method!r}")
    if not target or len(target.translate(None, _TARGET_FORBIDDEN)) != len(target):
        raise ValueError(f"Invalid URI {target!r}")
    hosts = headers.getRawHeaders(b"Host")
    if hosts is None or len(hosts) != 1:
        raise BadHeaders("Exactly one Host header required")
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    if not persistent:
        lines.append(b"Connection: close\r\n")
    if bodyProducer is None:
        # RFC 9110 8.6: a body-less PUT or POST still says its length.
        if method in (b"PUT", b"POST"):
            lines.append(b"Content-Length: 0\r\n")
    elif bodyProducer.length is UNKNOWN_LENGTH:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    else:
        lines.append(b"Content-Length: %d\r\n" % (bodyProducer.length,))
    for name, values in headers.getAllRawHeaders():
        for value in values:
            lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


@implementer(IConsumer)
class _LengthConsumer:
    """The producer must write exactly the length it declared."""

    def __init__(self, transport: Any, producer: Any) -> None:
        self._transport: Any = transport
        self._producer = producer
        self._remaining = producer.length

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if self._transport is None:
            self._producer.stopProducing()
            raise ExcessWrite()
        if len(data) > self._remaining:
            self._transport = None
            self._producer.stopProducing()
            raise WrongBodyLength("too many bytes written")
        self._remaining -= len(data)
        self._transport.write(data)

    def finish(self) -> None:
        if self._transport is None:
            raise WrongBodyLength("too many bytes written")
        self._transport = None
        if self._remaining:
            raise WrongBodyLength("too few bytes written")

    def stop(self) -> None:
        self._transport = None


@implementer(IConsumer)
class _ChunkedConsumer:
    """The chunked transfer coding (RFC 9112 7.1) for a body of unknown length."""

    def __init__(self, transport: Any, producer: Any) -> None:
        self._transport: Any = transport
        self._producer = producer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if self._transport is None:
            raise ExcessWrite()
        if data:
            self._transport.writeSequence((b"%x\r\n" % (len(data),), data, b"\r\n"))

    def finish(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.write(b"0\r\n\r\n")

    def stop(self) -> None:
        self._transport = None


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, client: UpstreamClient, key: Any) -> None:
        self._client = client
        self._key = key

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._client, self._key)


def splitURI(uri: bytes) -> tuple[bytes, bytes]:
    """
    C{(b"scheme://authority", b"/path?query")} of an absolute URI; the
    target is at least C{/}.
    """
    scheme, sep, rest = uri.partition(b"://")
    if not sep:
        raise ValueError(f"not an absolute URI: {uri!r}")
    cut = len(rest)
    for delimiter in (b"/", b"?"):
        index = rest.find(delimiter)
        if index != -1 and index < cut:
            cut = index
    authority, target = rest[:cut], rest[cut:]
    if not target.startswith(b"/"):
        target = b"/" + target
    return scheme + b"://" + authority, target


class _DeferredReceiver:
    """A request's outcome as a Deferred (L{UpstreamClient.request})."""

    __slots__ = ("deferred", "handle")

    def __init__(self) -> None:
        self.deferred: Deferred[IResponse] = Deferred(self._cancel)
        self.handle: _Handle | None = None

    def upstreamResponded(self, response: UpstreamResponse) -> None:
        self.deferred.callback(response)

    def upstreamFailed(self, failure: Failure) -> None:
        self.deferred.errback(failure)

    def _cancel(self, _: object) -> None:
        if self.handle is not None:
            self.handle.abandon(self)


class _Handle(_TypingProtocol):
    """What cancels a request before its response head."""

    def abandon(self, receiver: _Receiver) -> None:
        ...


class _Connecting:
    """
    A request waiting for a new connection to its backend; the connection
    once it is there.
    """

    __slots__ = (
        "_client", "_method", "_target", "_headers", "_body", "_receiver",
        "_connecting", "_connection",
    )

    def __init__(
        self,
        client: UpstreamClient,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: Any,
        receiver: _Receiver,
    ) -> None:
        self._client = client
        self._method = method
        self._target = target
        self._headers = headers
        self._body = body
        self._receiver: _Receiver | None = receiver
        self._connecting: Deferred[UpstreamConnection] | None = None
        self._connection: UpstreamConnection | None = None

    def start(self, key: bytes, uri: bytes) -> None:
        client = self._client
        try:
            endpoint = client._endpointFactory.endpointForURI(URI.fromBytes(uri))
            connecting = endpoint.connect(_ConnectionFactory(client, key))
        except Exception:
            self._failed(Failure())
            return
        self._connecting = connecting
        connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, connection: UpstreamConnection) -> None:
        self._connecting = None
        receiver, self._receiver = self._receiver, None
        client = self._client
        client._all.add(connection)
        if receiver is None:
            return
        if connection._lost:
            receiver.upstreamFailed(Failure(RequestNotSent()))
            return
        self._connection = connection
        connection.send(
            self._method, self._target, self._headers, self._body, client.persistent, receiver
        )

    def _failed(self, reason: Failure) -> None:
        self._connecting = None
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.upstreamFailed(reason)

    def abandon(self, receiver: _Receiver) -> None:
        if self._connection is not None:
            self._connection.abandon(receiver)
        elif self._connecting is not None and receiver is self._receiver:
            # Fails the attempt through _failed, with the endpoint's
            # CancelledError, as cancelling the Agent's request does.
            self._connecting.cancel()


class UpstreamClient:
    """
    Requests to backends over pooled keep-alive HTTP/1.1 connections.

    A drop-in for what C{edgeproxy.upstream.pool} builds from Twisted
    (C{Agent.usingEndpointFactory(reactor, endpoints, HTTPConnectionPool)}
    with C{retryAutomatically = False}): the same C{request} signature and
    results, and C{closeCachedConnections}.

    @ivar maxPersistentPerHost: idle connections kept per backend.
    @ivar cachedConnectionTimeout: seconds an idle connection is kept.
    """

    def __init__(
        self,
        reactor: Any,
        endpointFactory: Any,
        maxPersistentPerHost: int = 2,
        cachedConnectionTimeout: float = 240,
        persistent: bool = True,
    ) -> None:
        self._reactor = reactor
        self._endpointFactory = endpointFactory
        self.maxPersistentPerHost = maxPersistentPerHost
        self.cachedConnectionTimeout = cachedConnectionTimeout
        self.persistent = persistent
        self._idle: dict[bytes, list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[IResponse]:
        """
        Send a request and return its response head.

        @param method: the method.
        @param uri: an absolute C{http} or C{https} URI; its scheme and
            authority choose the endpoint (through the endpoint factory's
            C{endpointForURI}) and the pooled connections, its path and query
            are the request-target.
        @param headers: the header fields, including exactly one C{Host}
            (added from the URI when absent, as the Agent does).
        @param bodyProducer: an C{IBodyProducer}, or L{None} for no body.
        @return: fires with an L{IResponse} once its head has arrived;
            cancelling it aborts the request.
        """
        try:
            key, target = splitURI(uri)
        except ValueError:
            return fail(Failure())
        receiver = _DeferredReceiver()
        receiver.handle = self.send(key, target, method, headers, bodyProducer, receiver)
        return receiver.deferred

    def send(
        self,
        key: bytes,
        target: bytes,
        method: bytes,
        headers: Headers | None,
        bodyProducer: Any,
        receiver: _Receiver,
    ) -> _Handle:
        """
        L{request} without a Deferred, for the pool: the outcome goes to
        C{receiver}, possibly before this returns.

        @param key: C{b"scheme://authority"} of the backend.
        @param target: the request-target (origin form).
        @return: what to call C{abandon(receiver)} on to cancel the request
            before its response head.
        """
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            headers = headers.copy()
            headers.addRawHeader(b"host", key.partition(b"://")[2])
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection._lost or connection._state != "IDLE":
                continue
            connection.send(method, target, headers, bodyProducer, self.persistent, receiver)
            return connection
        connecting = _Connecting(self, method, target, headers, bodyProducer, receiver)
        connecting.start(key, key + target)
        return connecting

    # Idle connections ----------------------------------------------------------

    def _release(self, connection: UpstreamConnection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.maxPersistentPerHost:
            connection._state = "DONE"
            connection.transport.loseConnection()
            return
        idle.append(connection)
        now = self._reactor.seconds()
        connection.idleSince = now
        timeout = self.cachedConnectionTimeout
        if timeout is not None and connection.idleTimer is None:
            # One timer per connection, re-armed only when it fires: a
            # connection reused every few milliseconds costs no timer work
            # per request.
            connection.idleTimer = self._reactor.callLater(
                timeout, self._idleCheck, connection
            )

    def _idleCheck(self, connection: UpstreamConnection) -> None:
        connection.idleTimer = None
        if connection._lost:
            return
        idle = self._idle.get(connection.key, ())
        if connection._state != "IDLE" or connection not in idle:
            # In use: the next release re-arms it.
            return
        left = connection.idleSince + self.cachedConnectionTimeout - self._reactor.seconds()
        if left > 0:
            connection.idleTimer = self._reactor.callLater(left, self._idleCheck, connection)
            return
        idle.remove(connection)
        connection._state = "DONE"
        connection.transport.loseConnection()

    def _lost(self, connection: UpstreamConnection) -> None:
        self._all.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        timer, connection.idleTimer = connection.idleTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        waiters, connection.closeWaiters = connection.closeWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    def closeCachedConnections(self) -> Deferred[None]:
        """
        Close every idle connection; requests in flight finish on theirs.

        @return: fires once the idle connections are closed.
        """
        waiting = []
        for idle in self._idle.values():
            for connection in idle:
                if connection._lost:
                    continue
                done: Deferred[None] = Deferred()
                connection.closeWaiters.append(done)
                waiting.append(done)
                connection._state = "DONE"
                connection.transport.loseConnection()
            idle.clear()
        return DeferredList(waiting).addCallback(lambda _: None)
