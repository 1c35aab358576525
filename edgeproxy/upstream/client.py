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
response head in one pass over the buffer, writes a request head in one
C{transport.write}, keeps one Deferred per request, and keeps one idle timer
per pooled connection that is re-armed lazily instead of one C{callLater}
created and cancelled per request.

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
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from edgeproxy.http.channel import ChunkedDecoder, IdentityDecoder

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

NO_BODY_CODES = frozenset((204, 304))

MAX_HEAD = 64 * 1024
"""A response head longer than this is refused (Twisted's line limit is
16 KiB per line; a whole head over 64 KiB is not a real response)."""

_STATUS_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET_FORBIDDEN = bytes(range(0x21)) + b"\x7f"

_CLOSED = Failure(ConnectionDone("connection closed"))


class _ResponseHead:
    """A parsed response head (status line and fields)."""

    __slots__ = ("version", "code", "phrase", "headers", "connHeaders")

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        connHeaders: Headers,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.connHeaders = connHeaders


def parseResponseHead(head: bytes, method: bytes) -> _ResponseHead:
    """
    Parse a response head (without the empty line that ends it).

    Lines end in CRLF or, as Twisted's client also accepts, a bare LF; a
    line starting with whitespace continues the previous field (obs-fold,
    joined as Twisted does).

    @param head: the status line and the field lines.
    @param method: the request's method (a C{HEAD} response's
        C{Content-Length} is an entity field, not a framing one).
    @raise ParseError: the head is not an HTTP/1.x response head.
    """
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
    match = _STATUS_VERSION.fullmatch(versionText)
    if match is None:
        raise BadResponseVersion("not HTTP/x.y", versionText)
    if len(codeText) != 3 or not codeText.isdigit():
        raise ParseError("non-integer status code", status)
    headers = Headers()
    connHeaders = Headers()
    controlled = CONNECTION_CONTROL
    if method == b"HEAD":
        controlled = CONNECTION_CONTROL - {b"content-length"}
    pending: bytes | None = None
    for line in lines[1:]:
        if line[-1:] == b"\r":
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            if pending is None:
                raise ParseError("continuation line without a field", line)
            pending += line
            continue
        if pending is not None:
            _addField(pending, headers, connHeaders, controlled)
        pending = line
    if pending is not None:
        _addField(pending, headers, connHeaders, controlled)
    return _ResponseHead(
        (b"HTTP", int(match.group(1)), int(match.group(2))),
        int(codeText),
        phrase,
        headers,
        connHeaders,
    )


def _addField(
    line: bytes, headers: Headers, connHeaders: Headers, controlled: frozenset[bytes]
) -> None:
    name, colon, value = line.partition(b":")
    if not colon or not name:
        raise ParseError("invalid header", line)
    lowered = name.lower()
    try:
        (connHeaders if lowered in controlled else headers).addRawHeader(
            lowered, value.strip()
        )
    except ValueError:
        # Headers refuses names that are not tokens (InvalidHeaderName).
        raise ParseError("invalid header name", line)


def _contentLength(connHeaders: Headers) -> int | None:
    """
    The response's C{Content-Length}: L{None} when absent; repeated equal
    values (C{42, 42} or two fields) allowed, as in Twisted.

    @raise ParseError: conflicting or malformed values.
    """
    values = connHeaders.getRawHeaders(b"content-length")
    if values is None:
        return None
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


def _listTokens(connHeaders: Headers, name: bytes) -> list[bytes]:
    return [
        token.strip(b" \t").lower()
        for value in connHeaders.getRawHeaders(name, ())
        for token in value.split(b",")
    ]


@implementer(IPushProducer)
class _BodyTransport:
    """
    What the body protocol of a response sees as its transport: pausing and
    resuming reads from the backend, or giving up on the body
    (C{stopProducing} closes the connection, which then cannot be reused).
    Inert once the response is over.
    """

    __slots__ = ("_connection",)

    disconnecting = False

    def __init__(self, connection: UpstreamConnection | None) -> None:
        self._connection = connection

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


@implementer(IResponse)
class UpstreamResponse:
    """
    A backend response (L{IResponse}); the body is delivered to one
    protocol through L{deliverBody}.

    @ivar connectionHeaders: the backend's connection control fields.
    """

    request = None
    previousResponse = None

    def __init__(self, head: _ResponseHead, length: int | object) -> None:
        self.version = head.version
        self.code = head.code
        self.phrase = head.phrase
        self.headers = head.headers
        self.connectionHeaders = head.connHeaders
        self.length = length
        self._protocol: Any = None
        self._buffer: list[bytes] | None = []
        self._outcome: Failure | None = None
        self._transport: _BodyTransport | None = None
        self._delivered = False
        self._onDeliver: Callable[[], None] | None = None

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
        transport = self._transport
        if transport is None:
            # Finished before anyone asked: a transport nobody can use.
            transport = _BodyTransport(None)
        protocol.makeConnection(transport)
        buffered, self._buffer = self._buffer, None
        if buffered:
            for data in buffered:
                protocol.dataReceived(data)
        if self._outcome is not None:
            outcome, self._outcome = self._outcome, None
            protocol.connectionLost(outcome)
            self._protocol = None
            return
        onDeliver, self._onDeliver = self._onDeliver, None
        if onDeliver is not None:
            onDeliver()

    # From the connection ---------------------------------------------------

    def _data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        elif self._buffer is not None:
            self._buffer.append(data)

    def _finished(self, reason: Failure) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            # The connection may be back in the pool: pausing or stopping
            # through this response must no longer reach it.
            transport._connection = None
        protocol = self._protocol
        if protocol is not None:
            self._protocol = None
            protocol.connectionLost(reason)
        elif not self._delivered:
            self._outcome = reason


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
        self._finished: Deferred[IResponse] | None = None
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

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        bodyProducer: Any,
        persistent: bool = True,
    ) -> Deferred[IResponse]:
        """
        Send one request; see L{UpstreamClient.request}.
        """
        if self._state != "IDLE" or self._lost:
            return fail(RequestNotSent())
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
        finished: Deferred[IResponse] = Deferred(self._cancel)
        self._finished = finished
        try:
            head = _requestHead(method, target, headers, bodyProducer, persistent)
        except Exception:
            self._state = "FAILED"
            self._finished = None
            self.transport.abortConnection()
            finished.errback(RequestGenerationFailed([Failure()]))
            return finished
        transport = self.transport
        _writeNow(transport, head)
        if bodyProducer is None:
            self._state = "WAITING"
            return finished
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
        return finished

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

    def _cancel(self, finished: Deferred[IResponse]) -> None:
        # The caller gave up before the response head.
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
        finished, self._finished = self._finished, None
        if finished is not None:
            finished.errback(failure if isinstance(failure, Failure) else Failure(failure))

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
            bare = buffer.find(b"\n\n")
            crlf = buffer.find(b"\n\r\n")
            if bare == -1 and crlf == -1:
                if len(buffer) > MAX_HEAD:
                    self._headError(ParseError("response head too long", buffer[:64]))
                    return
                self._buffer = buffer
                return
            if crlf == -1 or (bare != -1 and bare < crlf):
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
        connHeaders = head.connHeaders
        tokens = _listTokens(connHeaders, b"connection")
        if b"close" in tokens or (
            head.version[1:] == (1, 0) and b"keep-alive" not in tokens
        ):
            self._reusable = False
        try:
            length: int | object
            if head.code in NO_BODY_CODES or self._method == b"HEAD":
                length = 0
                framing = "none"
            elif connHeaders.getRawHeaders(b"transfer-encoding") is not None:
                if _listTokens(connHeaders, b"transfer-encoding") != [b"chunked"]:
                    raise ParseError(
                        "unsupported Transfer-Encoding",
                        b",".join(connHeaders.getRawHeaders(b"transfer-encoding")),
                    )
                length = UNKNOWN_LENGTH
                framing = "chunked"
            else:
                contentLength = _contentLength(connHeaders)
                if contentLength is None:
                    length = UNKNOWN_LENGTH
                    framing = "close"
                else:
                    length = contentLength
                    framing = "length" if contentLength else "none"
        except ParseError:
            self._headError(Failure())
            return
        response = UpstreamResponse(head, length)
        self._response = response
        response._transport = _BodyTransport(self)
        response._onDeliver = self._delivering
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
        if self._finished is None:
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
        finished, self._finished = self._finished, None
        if finished is None:
            return
        finished.callback(response)

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
            response._finished(Failure(ResponseDone("Response body fully received")))

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
        if self._finished is not None:
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
        if self._finished is not None:
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
    if _METHOD.fullmatch(method) is None:
        raise ValueError(f"Invalid method {method!r}")
    if not target or len(target.translate(None, _TARGET_FORBIDDEN)) != len(target):
        raise ValueError(f"Invalid URI {target!r}")
    hosts = headers.getRawHeaders(b"host", ())
    if len(hosts) != 1:
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
            return connection.request(method, target, headers, bodyProducer, self.persistent)
        return self._connectAndRequest(key, uri, method, target, headers, bodyProducer)

    def _connectAndRequest(
        self,
        key: bytes,
        uri: bytes,
        method: bytes,
        target: bytes,
        headers: Headers,
        bodyProducer: Any,
    ) -> Deferred[IResponse]:
        try:
            endpoint = self._endpointFactory.endpointForURI(URI.fromBytes(uri))
            connecting = endpoint.connect(_ConnectionFactory(self, key))
        except Exception:
            return fail(Failure())
        inner: list[Deferred[IResponse]] = []

        def cancel(_: object) -> None:
            if inner:
                inner[0].cancel()
            else:
                connecting.cancel()

        result: Deferred[IResponse] = Deferred(cancel)

        def connected(connection: UpstreamConnection) -> None:
            self._all.add(connection)
            if connection._lost:
                result.errback(Failure(RequestNotSent()))
                return
            requested = connection.request(
                method, target, headers, bodyProducer, self.persistent
            )
            inner.append(requested)
            requested.chainDeferred(result)

        def failed(reason: Failure) -> None:
            if not result.called:
                result.errback(reason)

        connecting.addCallbacks(connected, failed)
        return result

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
