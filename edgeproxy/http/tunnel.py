# -*- test-case-name: tests.test_tunnel -*-
"""
WebSocket upgrades (RFC 6455 §4) through the proxy.

This module owns everything that happens to a request once
L{edgeproxy.http.request} has decided it is a WebSocket opening handshake:

  - L{isWebSocketUpgrade}: the (pure) decision itself;
  - the raw upstream connection: Twisted's C{Agent} cannot hand a
    connection over after a C{101}, so the request head is written
    (L{formatRequestHead}) and the response head parsed
    (L{ResponseHeadParser}) here, bounded in size and time;
  - the relay of the backend's C{101} to the client (L{switchingHeaders}),
    or of its refusal as an ordinary response (L{refusalHeaders},
    L{bodyFraming}), or of a failure as an error page;
  - the taking over of the client's HTTP/1.1 connection (L{_takeOverChannel},
    the one place that relies on Twisted private API);
  - L{Tunnel}: the two-way byte pipe between client and backend, with
    backpressure, closed together, bounded by an idle timeout.

Upgrade over HTTP/2 (RFC 8441 extended CONNECT) is not supported (a stream
handed in anyway gets a 400).  Any other upgrade token (C{h2c} included)
never reaches this module: the request layer strips C{Upgrade} unless
L{isWebSocketUpgrade} holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from edgeproxy.errors import (
    BackendUnavailable,
    BadRequest,
    ProxyError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from edgeproxy.http.channel import ChunkedDecoder, MalformedBody
from edgeproxy.http.errorpages import isHTTP2, writeError
from edgeproxy.http.headers import checkResponseHeaders, clientResponseHeaders
from edgeproxy.upstream.pool import classifyFailure

log = Logger()

MAX_RESPONSE_HEAD = 16 * 1024
"""Bytes of status line plus header lines accepted from a backend."""

MAX_REFUSAL_BODY = 64 * 1024
"""Bytes of a refused handshake's body relayed to the client; past this the
client connection is closed, so the client sees an incomplete response."""

ABORT_TIMEOUT = 15.0
"""Seconds a closing connection gets to flush before it is aborted (the
same grace Twisted's C{HTTPChannel.abortTimeout} gives)."""

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
"""RFC 9110 §5.6.2 token: what a field name must be."""

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")

_STATUS_LINE = re.compile(rb"^(HTTP/1\.[01]) ([0-9]{3})(?: ([^\r\n]*))?$")


# Pure: the handshake on the wire ----------------------------------------


def headerTokens(headers: Headers, name: bytes) -> list[bytes]:
    """
    @return: the comma-separated, lower-cased, non-empty tokens of every
        C{name} field in C{headers} (RFC 9110 §5.6.1 list syntax).
    """
    tokens = []
    for value in headers.getRawHeaders(name, []):
        for part in value.split(b","):
            token = part.strip(b" \t").lower()
            if token:
                tokens.append(token)
    return tokens


def isWebSocketUpgrade(method: bytes, headers: Headers) -> bool:
    """
    Is this request a WebSocket opening handshake the proxy may forward?

    RFC 6455 §4.1: a C{GET} whose C{Upgrade} lists C{websocket} and whose
    C{Connection} lists C{upgrade} (both case-insensitive).  A request with a
    body (C{Transfer-Encoding}, or a C{Content-Length} other than 0) is not
    one: its body would have to be read before the connection could switch,
    and the handshake has none.

    @param method: the request method as received.
    @param headers: the client's request headers, before any rewriting.
    """
    if method != b"GET":
        return False
    if b"websocket" not in headerTokens(headers, b"upgrade"):
        return False
    if b"upgrade" not in headerTokens(headers, b"connection"):
        return False
    if headers.hasHeader(b"transfer-encoding"):
        return False
    return all(value.strip() == b"0" for value in headers.getRawHeaders(b"content-length", []))


def _checkValue(what: str, value: bytes) -> None:
    # RFC 9110 §5.5: CR, LF and NUL are never allowed in a field value; a
    # value that contained them would let a client smuggle a second header
    # or request to the backend.
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        raise BadRequest(f"{what} contains CR, LF or NUL: {value[:80]!r}")


def formatRequestHead(path: bytes, headers: Headers) -> bytes:
    """
    Write the upstream handshake request head.

    @param path: the origin-form request target (starts with C{/}).
    @param headers: the complete upstream header set (C{Host} included).
    @return: C{GET path HTTP/1.1}, the header lines and the empty line.
    @raise BadRequest: a target or field that cannot be written safely.
    """
    if not path.startswith(b"/") or any(byte <= 0x20 or byte == 0x7F for byte in path):
        # RFC 9112 §3.2: the origin form has no whitespace or controls; a
        # space would end the target and a CR/LF the request line.
        raise BadRequest(f"request target not writable: {path[:80]!r}")
    lines = [b"GET ", path, b" HTTP/1.1\r\n"]
    for name, values in headers.getAllRawHeaders():
        if not _TOKEN.match(name):
            raise BadRequest(f"header name not a token: {name[:80]!r}")
        for value in values:
            _checkValue(f"header {name.decode('ascii')}", value)
            lines.extend((name, b": ", value, b"\r\n"))
    lines.append(b"\r\n")
    return b"".join(lines)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed response status line and header section."""

    version: bytes
    status: int
    reason: bytes
    fields: tuple[tuple[bytes, bytes], ...]
    """(name, value) in arrival order, names as received."""

    def headers(self) -> Headers:
        """@return: the fields as a new L{Headers}."""
        result = Headers()
        for name, value in self.fields:
            result.addRawHeader(name, value)
        return result

    def tokens(self, name: bytes) -> list[bytes]:
        """@return: L{headerTokens} of the field C{name}."""
        return headerTokens(self.headers(), name)


def _parseHead(raw: bytes) -> ResponseHead:
    lines = [line.rstrip(b"\r") for line in raw.split(b"\n")]
    match = _STATUS_LINE.match(lines[0])
    if match is None:
        raise UpstreamProtocolError(f"bad status line: {lines[0][:80]!r}")
    version, status, reason = match.group(1), int(match.group(2)), match.group(3) or b""
    fields = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 §5.2: obs-fold is deprecated; refusing it is simpler
            # and safer than unfolding.
            raise UpstreamProtocolError("obsolete line folding in response head")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise UpstreamProtocolError(f"bad header line: {line[:80]!r}")
        value = value.strip(b" \t")
        if b"\x00" in value or b"\r" in value:
            raise UpstreamProtocolError(f"bad header value: {line[:80]!r}")
        fields.append((name, value))
    return ResponseHead(version, status, reason, tuple(fields))


class ResponseHeadParser:
    """
    Bytes in, one L{ResponseHead} out.  Bare LF line ends are accepted
    (RFC 9112 §2.2).

    @ivar rest: once a head has been returned, the bytes that followed it.
    """

    def __init__(self, maxSize: int = MAX_RESPONSE_HEAD) -> None:
        self._maxSize = maxSize
        self._buffer = b""
        self.rest = b""

    def feed(self, data: bytes) -> ResponseHead | None:
        """
        @return: the head once it is complete, else L{None}.
        @raise UpstreamProtocolError: a malformed head, or one larger than
            C{maxSize}.
        """
        # Only the last 3 bytes already seen can start the terminator.
        start = max(0, len(self._buffer) - 3)
        self._buffer += data
        match = _END_OF_HEAD.search(self._buffer, start)
        if match is None:
            if len(self._buffer) > self._maxSize:
                raise UpstreamProtocolError(f"response head over {self._maxSize} bytes")
            return None
        if match.start() > self._maxSize:
            raise UpstreamProtocolError(f"response head over {self._maxSize} bytes")
        self.rest = self._buffer[match.end():]
        raw, self._buffer = self._buffer[: match.start()], b""
        return _parseHead(raw)


def switchingHeaders(head: ResponseHead) -> Headers:
    """
    @return: the headers of the C{101} the client gets: the backend's
        end-to-end fields (C{Sec-WebSocket-Accept}, C{-Protocol},
        C{-Extensions}, cookies...) filtered as every response is
        (L{edgeproxy.http.headers.clientResponseHeaders}: no C{Server},
        C{X-Powered-By} or hop-by-hop fields), its C{Upgrade}, and
        C{Connection: upgrade}.
    """
    result = clientResponseHeaders(head.headers(), upgrade=True)
    # RFC 9110 §8.6: no Content-Length in a 1xx; after a 101 the bytes that
    # follow are the new protocol's, not a body.
    result.removeHeader(b"content-length")
    return result


def refusalHeaders(head: ResponseHead) -> Headers:
    """
    @return: the headers relayed with a refused handshake (any status but
        C{101}): filtered as every response is, without C{Content-Length}
        (set from the framing by the relay).
    """
    result = clientResponseHeaders(head.headers())
    result.removeHeader(b"content-length")
    return result


@dataclass(frozen=True, slots=True)
class BodyFraming:
    """How a refusal's body ends (RFC 9112 §6.3)."""

    kind: str
    """C{"none"}, C{"length"}, C{"chunked"} or C{"close"}."""
    length: int = 0
    """For C{"length"}: the C{Content-Length}."""


def bodyFraming(head: ResponseHead) -> BodyFraming:
    """
    @return: the framing of the body that follows C{head} (a response to a
        C{GET}).
    @raise UpstreamProtocolError: conflicting or invalid C{Content-Length}.
    """
    if head.status in (204, 304) or 100 <= head.status < 200:
        return BodyFraming("none")
    codings = head.tokens(b"transfer-encoding")
    if codings:
        # §6.3 item 4: chunked last means chunked; any other coding means
        # the body runs to the end of the connection.
        return BodyFraming("chunked" if codings[-1] == b"chunked" else "close")
    lengths = {value.strip() for name, value in head.fields if name.lower() == b"content-length"}
    if not lengths:
        return BodyFraming("close")
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        raise UpstreamProtocolError(f"bad Content-Length: {sorted(lengths)!r}")
    return BodyFraming("length", int(next(iter(lengths))))


# The tunnel ---------------------------------------------------------------


class TunnelEnd(Protocol):
    """
    One side of a L{Tunnel}: what it receives is written to the other side.
    """

    def __init__(self, tunnel: Tunnel, name: str) -> None:
        self._tunnel = tunnel
        self.name = name
        """C{"client"} or C{"backend"}."""
        self.lost = False
        """Its connection is gone."""
        self.closing = False
        """The tunnel asked its connection to close."""
        self.received = 0
        """Bytes received from this side (and relayed to the other)."""

    def dataReceived(self, data: bytes) -> None:
        self._tunnel._relay(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._tunnel._endLost(self, reason)


class Tunnel:
    """
    Two connections joined into one byte pipe.

    Each transport is registered as the streaming producer of the other, so
    when one side reads slowly its send buffer fills, its transport pauses
    the other transport, and the kernel's window pushes back on the fast
    peer: memory stays bounded by the transports' buffers.  When either side
    goes away the other is closed after its pending bytes are flushed (and
    aborted if it has not gone within L{ABORT_TIMEOUT}).  When no byte has
    moved in either direction for C{idleTimeout} seconds, both are closed
    (an C{idleTimeout} of 0 or less: never).

    Connect L{client} and L{backend} (C{makeConnection}), then L{start}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idleTimeout: float,
        abortTimeout: float = ABORT_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._abortTimeout = abortTimeout
        self.client = TunnelEnd(self, "client")
        self.backend = TunnelEnd(self, "backend")
        self.closedBy: str | None = None
        """What ended the tunnel: C{"client"}, C{"backend"} or C{"idle"}."""
        self._lastActivity = 0.0
        self._idleCall: IDelayedCall | None = None
        self._abortCall: IDelayedCall | None = None
        self._started = False
        self._joined = False
        self._clientLost: list[Deferred[Tunnel]] = []
        self.clientLostReason: Failure | None = None
        """Why the client's connection ended, once it has."""
        self._closed: list[Deferred[Tunnel]] = []

    def _other(self, end: TunnelEnd) -> TunnelEnd:
        return self.backend if end is self.client else self.client

    def whenClientLost(self) -> Deferred[Tunnel]:
        """
        @return: fires with this tunnel once the client's connection is gone
            (the backend is closing by then); the reason is in
            L{clientLostReason}.
        """
        d: Deferred[Tunnel] = Deferred()
        self._clientLost.append(d)
        return d

    def whenClosed(self) -> Deferred[Tunnel]:
        """@return: fires with this tunnel once both connections are gone."""
        d: Deferred[Tunnel] = Deferred()
        self._closed.append(d)
        return d

    def start(self, toBackend: bytes = b"", toClient: bytes = b"") -> None:
        """
        Join the two connected ends.

        @param toBackend: bytes the client sent before the tunnel existed;
            written to the backend first.
        @param toClient: bytes the backend sent after its response head;
            written to the client first.
        """
        self._started = True
        self._lastActivity = self._clock.seconds()
        for end in (self.client, self.backend):
            if end.lost:
                self._close(end.name)
                return
        clientTransport, backendTransport = self.client.transport, self.backend.transport
        clientTransport.registerProducer(backendTransport, True)
        backendTransport.registerProducer(clientTransport, True)
        self._joined = True
        if toBackend:
            self.client.received += len(toBackend)
            backendTransport.write(toBackend)
        if toClient:
            self.backend.received += len(toClient)
            clientTransport.write(toClient)
        if self._idleTimeout > 0:
            self._idleCall = self._clock.callLater(self._idleTimeout, self._checkIdle)

    def _relay(self, end: TunnelEnd, data: bytes) -> None:
        self._lastActivity = self._clock.seconds()
        end.received += len(data)
        other = self._other(end)
        if not other.lost and not other.closing:
            other.transport.write(data)

    def _checkIdle(self) -> None:
        # Re-arming a timer on every chunk is costly on a busy tunnel; the
        # chunk only records the time and the timer checks it when it fires.
        self._idleCall = None
        idle = self._clock.seconds() - self._lastActivity
        if idle >= self._idleTimeout:
            log.info(
                "websocket tunnel idle for {idle:.1f}s, closing both sides",
                idle=idle,
            )
            self._close("idle")
        else:
            self._idleCall = self._clock.callLater(self._idleTimeout - idle, self._checkIdle)

    def _close(self, cause: str) -> None:
        if self.closedBy is None:
            self.closedBy = cause
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None
        for end in (self.client, self.backend):
            if not end.lost and not end.closing and end.transport is not None:
                end.closing = True
                # A TLS transport only sends its close_notify once no
                # producer is registered, and a TCP one resumes a paused
                # producer instead of closing: unregister first.
                if self._joined:
                    end.transport.unregisterProducer()
                    # It may have been paused by the other side's full
                    # buffer; a paused transport never sees its peer's FIN
                    # or TLS close_notify, which a TLS close waits for.
                    # From here what it reads is dropped.
                    end.transport.resumeProducing()
                end.transport.loseConnection()
        if self._abortCall is None and not (self.client.lost and self.backend.lost):
            self._abortCall = self._clock.callLater(self._abortTimeout, self._abort)

    def _abort(self) -> None:
        self._abortCall = None
        for end in (self.client, self.backend):
            if not end.lost and end.transport is not None:
                log.info("websocket tunnel {side} did not close in time, aborting", side=end.name)
                end.transport.abortConnection()

    def _endLost(self, end: TunnelEnd, reason: Failure) -> None:
        if end.lost:
            return
        end.lost = True
        if self._started:
            self._close(end.name)
        if end is self.client:
            self.clientLostReason = reason
            clientLost, self._clientLost = self._clientLost, []
            for d in clientLost:
                d.callback(self)
        if self.client.lost and self.backend.lost:
            if self._abortCall is not None and self._abortCall.active():
                self._abortCall.cancel()
            self._abortCall = None
            closed, self._closed = self._closed, []
            for d in closed:
                d.callback(self)


# Taking over the client connection ----------------------------------------


@dataclass(frozen=True, slots=True)
class _TakenOver:
    buffered: bytes
    """What the client sent after its request head, before the switch."""
    channelLost: Callable[[Failure], None]
    """The channel's own C{connectionLost}, for its bookkeeping at the end."""


def _takeOverChannel(channel: Any, protocol: Protocol) -> _TakenOver:
    """
    Detach the HTTP/1.1 connection under C{channel} from HTTP and hand its
    bytes to C{protocol}.

    This is the ONE place that relies on Twisted private API (Twisted
    26.10; C{tests.test_tunnel.TestTakeOverChannel} fails if it changes):

      - C{HTTPChannel._protocolUpgradeForWebsockets(protocol)}, the hook
        C{twisted.web.websocket} uses: it rebinds the channel's
        C{dataReceived}/C{connectionLost} on the instance and connects
        C{protocol} to the transport.  That is more robust than swapping
        C{transport.protocol}: under TLS the transport's protocol is the
        C{TLSMemoryBIOProtocol}'s C{wrappedProtocol}, and the channel sits
        inside C{_GenericHTTPChannelProtocol._channel}; both forward to the
        channel instance, so rebinding there catches every path.
      - C{HTTPChannel._dataBuffer}: while a request is handled the channel
        is in raw mode and buffers whatever the client sends next; for a
        WebSocket client that is its first frames, sent right after the
        head (RFC 6455 allows no such thing before the 101, but clients do
        it), so it must go to the backend, first.
      - the channel paused its transport if that buffer grew past
        C{_optimisticEagerReadSize}; the transport is resumed here.

    Also: the channel's timeouts are turned off (the tunnel has its own),
    and it is marked not persistent so that finishing the request closes
    rather than goes back to reading HTTP (and re-arming the idle timeout).
    """
    transport = channel.transport
    channel.setTimeout(None)
    channel.persistent = False
    buffered = b"".join(channel._dataBuffer)
    channel._dataBuffer = []
    channelLost = channel.connectionLost
    # The channel registered itself as the transport's producer; the tunnel
    # registers the backend's transport instead.
    transport.unregisterProducer()
    channel._protocolUpgradeForWebsockets(protocol)
    transport.resumeProducing()
    return _TakenOver(buffered, channelLost)


# The handshake --------------------------------------------------------------


class _BackendProtocol(Protocol):
    """
    The upstream connection: reads the handshake response for L{_Upgrade},
    then hands every byte to the tunnel.  (Delegating is simpler than
    swapping C{transport.protocol}, which under TLS is not this object.)
    """

    def __init__(self, upgrade: _Upgrade) -> None:
        self._upgrade = upgrade
        self._delegate: Protocol | None = None

    def delegateTo(self, protocol: Protocol) -> None:
        self._delegate = protocol
        protocol.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.dataReceived(data)
        else:
            self._upgrade._backendData(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
        else:
            self._upgrade._backendLost(reason)


class _Upgrade:
    """
    One WebSocket handshake through the proxy, from the request head to the
    tunnel (or to the relayed refusal, or to the error page).

    States: C{starting} (waiting for the channel to finish with the head),
    C{connecting}, C{head} (request written, reading the response head),
    C{refusing} (relaying a non-101 response), C{tunnel}, C{done}.
    """

    def __init__(
        self,
        request: Any,
        pool: Any,
        headers: Headers,
        path: bytes,
        clock: IReactorTime,
        hashKey: bytes | None = None,
    ) -> None:
        self._request = request
        self._hashKey = hashKey
        self._pool = pool
        self._upstream = pool.upstream
        self._headers = headers
        self._path = path
        self._clock = clock
        self._state = "starting"
        self._backend = _BackendProtocol(self)
        self._backendGone = False
        self._clientGone = False
        self._server: Any = None
        self._head = b""
        self._parser = ResponseHeadParser()
        self._connecting: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._framing = BodyFraming("none")
        self._remaining = 0
        self._chunked = ChunkedDecoder(self._chunkedPiece, self._chunkedEnd)
        self._pieces: list[bytes] = []
        self._chunkedDone = False
        self._relayed = 0
        self._tunnel: Tunnel | None = None
        self._channelLost: Callable[[Failure], None] | None = None

    # Timers and teardown ----------------------------------------------------

    def _setTimer(self, seconds: float, call: Callable[[], None]) -> None:
        self._cancelTimer()
        self._timer = self._clock.callLater(seconds, call)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _closeBackend(self, abort: bool) -> None:
        transport = self._backend.transport
        if transport is not None and not self._backendGone:
            if abort:
                transport.abortConnection()
            else:
                transport.loseConnection()

    def _where(self) -> dict[str, object]:
        return {
            "upstream": self._upstream.name,
            "backend": self._server.address if self._server is not None else None,
        }

    def _fail(self, error: ProxyError) -> None:
        log.warn(
            "websocket upgrade via upstream {upstream} backend {backend} failed:"
            " {status} {why}",
            status=error.status,
            why=str(error),
            **self._where(),
        )
        self._state = "done"
        self._cancelTimer()
        self._closeBackend(abort=True)
        if not self._clientGone:
            # Whatever the client pipelined after its head (frames) must not
            # be read as HTTP: the error closes the connection.
            self._request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            writeError(self._request, error)

    # Client side ------------------------------------------------------------

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._clientLost)
        # startTunnel runs inside gotLength, while the channel is still
        # parsing the head: nothing may be written on the request until the
        # channel has handed it over (requestReceived), or the channel's
        # bookkeeping breaks.  The next reactor turn is after that.
        self._timer = self._clock.callLater(0, self._begin)

    def _clientLost(self, reason: Failure) -> None:
        self._clientGone = True
        if self._state in ("tunnel", "done"):
            return
        log.info(
            "client left during websocket handshake via upstream {upstream}",
            **self._where(),
        )
        state, self._state = self._state, "done"
        self._cancelTimer()
        if state == "connecting" and self._connecting is not None:
            self._connecting.cancel()
        self._closeBackend(abort=True)

    # Request --------------------------------------------------------------

    def _begin(self) -> None:
        self._timer = None
        if self._state != "starting":
            return
        if isHTTP2(self._request):
            # RFC 8441 (extended CONNECT) is not supported, and an HTTP/2
            # stream has no connection to take over; an Upgrade field there
            # is malformed anyway (RFC 9113 §8.2.2).
            self._fail(BadRequest("WebSocket upgrade over HTTP/2"))
            return
        try:
            self._server = self._pool.pickServer(self._hashKey)
            headers = self._headers
            if not headers.hasHeader(b"host"):
                # RFC 9112 §3.2: an HTTP/1.1 request always carries Host.
                headers = headers.copy()
                headers.setRawHeaders(b"host", [self._server.address.encode("idna")])
            self._head = formatRequestHead(self._path, headers)
            endpoint = self._pool.endpointFor(self._server)
        except ProxyError as error:
            self._fail(error)
            return
        self._state = "connecting"
        self._connecting = connectProtocol(endpoint, self._backend)
        self._connecting.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, protocol: _BackendProtocol) -> None:
        self._connecting = None
        if self._state != "connecting":
            protocol.transport.abortConnection()
            return
        self._state = "head"
        protocol.transport.write(self._head)
        self._setTimer(self._upstream.response_timeout, self._timedOut)

    def _connectFailed(self, failure: Failure) -> None:
        self._connecting = None
        if self._state != "connecting":
            return  # cancelled because the client left
        self._backendGone = True
        # The pool owns the mapping of connection failures to statuses.
        self._fail(classifyFailure(failure, False))

    # Response -------------------------------------------------------------

    def _timedOut(self) -> None:
        self._timer = None
        if self._state == "head":
            self._fail(
                UpstreamTimeout(
                    f"no handshake response within {self._upstream.response_timeout}s"
                )
            )
        elif self._state == "refusing":
            log.warn(
                "websocket refusal body from upstream {upstream} backend {backend}"
                " stalled",
                **self._where(),
            )
            self._refusalEnded(complete=False)

    def _backendData(self, data: bytes) -> None:
        try:
            self._handleBackendData(data)
        except Exception:
            # A bug, not a backend problem; without this net Twisted would
            # drop only the backend connection, and a client whose channel
            # timeouts are already off would be left hanging.
            log.failure("websocket upgrade relay failed")
            self._state = "done"
            self._cancelTimer()
            self._closeBackend(abort=True)
            channel = getattr(self._request, "channel", None)
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()

    def _handleBackendData(self, data: bytes) -> None:
        if self._state == "head":
            try:
                head = self._parser.feed(data)
                # RFC 9110 §15.2: interim responses (100, 103...) are not the
                # answer; 101 is, and is handled below.
                while head is not None and 100 <= head.status < 200 and head.status != 101:
                    rest, self._parser = self._parser.rest, ResponseHeadParser()
                    head = self._parser.feed(rest)
            except UpstreamProtocolError as error:
                self._fail(error)
                return
            if head is None:
                return
            if head.status != 101:
                self._refuse(head, self._parser.rest)
            elif b"websocket" not in head.tokens(b"upgrade"):
                self._fail(UpstreamProtocolError(f"backend switched to {head.tokens(b'upgrade')!r}"))
            else:
                self._switch(head, self._parser.rest)
        elif self._state == "refusing":
            self._refusalData(data)

    def _backendLost(self, reason: Failure) -> None:
        self._backendGone = True
        if self._state == "head":
            described = f"{type(reason.value).__name__}: {reason.value}"
            self._fail(BackendUnavailable(f"closed before a handshake response: {described}"))
        elif self._state == "refusing":
            self._refusalEnded(complete=self._framing.kind == "close")

    # 101 -> tunnel ----------------------------------------------------------

    def _switch(self, head: ResponseHead, rest: bytes) -> None:
        self._cancelTimer()
        request = self._request
        channel = request.channel
        headers = switchingHeaders(head)
        request.setResponseCode(101, b"Switching Protocols")
        request.responseHeaders = headers
        channel.writeHeaders(b"HTTP/1.1", b"101", b"Switching Protocols", headers)
        # The head went out behind Request.write's back (which would have
        # added chunked framing to a 101); finish() must write nothing more.
        request.startedWriting = 1
        tunnel = self._tunnel = Tunnel(self._clock, self._upstream.idle_timeout)
        self._backend.delegateTo(tunnel.backend)
        taken = _takeOverChannel(channel, tunnel.client)
        self._channelLost = taken.channelLost
        tunnel.whenClientLost().addCallback(self._tunnelClientLost)
        tunnel.whenClosed().addCallback(self._tunnelClosed)
        self._state = "tunnel"
        log.info(
            "websocket tunnel open via upstream {upstream} backend {backend}",
            **self._where(),
        )
        tunnel.start(toBackend=taken.buffered, toClient=rest)

    def _tunnelClientLost(self, tunnel: Tunnel) -> None:
        assert self._channelLost is not None and tunnel.clientLostReason is not None
        reason = tunnel.clientLostReason
        request = self._request
        # The access log reads sentLength as the bytes sent to the client.
        request.sentLength = tunnel.backend.received
        try:
            request.finish()
        except Exception:
            log.failure("finishing a tunnelled request")
        # The channel's own connectionLost was replaced by the tunnel's; the
        # channel (and whatever tracks it, e.g. for draining) still needs it.
        self._channelLost(reason)

    def _tunnelClosed(self, tunnel: Tunnel) -> None:
        self._state = "done"
        log.info(
            "websocket tunnel via upstream {upstream} backend {backend} closed"
            " by {cause}: {toBackend} bytes up, {toClient} bytes down",
            cause=tunnel.closedBy,
            toBackend=tunnel.client.received,
            toClient=tunnel.backend.received,
            **self._where(),
        )

    # Anything else -> relayed as a plain response ---------------------------

    def _refuse(self, head: ResponseHead, rest: bytes) -> None:
        try:
            # Ambiguous framing is refused as for any proxied response.
            checkResponseHeaders(head.headers())
            framing = bodyFraming(head)
        except UpstreamProtocolError as error:
            self._fail(error)
            return
        log.info(
            "websocket upgrade refused by upstream {upstream} backend {backend}:"
            " {status}",
            status=head.status,
            **self._where(),
        )
        request = self._request
        request.setResponseCode(head.status, head.reason or None)
        responseHeaders = request.responseHeaders
        for name, _ in list(responseHeaders.getAllRawHeaders()):
            responseHeaders.removeHeader(name)
        for name, values in refusalHeaders(head).getAllRawHeaders():
            responseHeaders.setRawHeaders(name, values)
        # The client may already have sent frames after its head: close
        # rather than parse them as the next request.
        responseHeaders.setRawHeaders(b"connection", [b"close"])
        request.channel.persistent = False
        if framing.kind == "length":
            # Kept even past MAX_REFUSAL_BODY, so that a cut body is seen
            # as cut.
            responseHeaders.setRawHeaders(b"content-length", [b"%d" % (framing.length,)])
        self._framing = framing
        self._remaining = framing.length
        self._state = "refusing"
        if framing.kind == "none" or (framing.kind == "length" and framing.length == 0):
            self._refusalEnded(complete=True)
            return
        if self._upstream.idle_timeout > 0:
            self._setTimer(self._upstream.idle_timeout, self._timedOut)
        if rest:
            self._refusalData(rest)

    def _refusalData(self, data: bytes) -> None:
        if self._upstream.idle_timeout > 0:
            self._setTimer(self._upstream.idle_timeout, self._timedOut)
        kind = self._framing.kind
        if kind == "chunked":
            if self._chunkedDone:
                return  # bytes after the last chunk: not part of the body
            try:
                self._chunked.dataReceived(data)
            except MalformedBody as error:
                log.warn("websocket refusal body: {why}", why=str(error))
                self._refusalEnded(complete=False)
                return
            piece, self._pieces = b"".join(self._pieces), []
            complete = self._chunkedDone
        elif kind == "length":
            piece = data[: self._remaining]
            self._remaining -= len(piece)
            complete = self._remaining == 0
        else:
            piece, complete = data, False
        room = MAX_REFUSAL_BODY - self._relayed
        if len(piece) > room:
            piece, complete = piece[:room], False
            self._writeRefusal(piece)
            self._refusalEnded(complete=False)
            return
        self._writeRefusal(piece)
        if complete:
            self._refusalEnded(complete=True)

    def _chunkedPiece(self, piece: bytes) -> None:
        self._pieces.append(piece)

    def _chunkedEnd(self, rest: bytes) -> None:
        self._chunkedDone = True

    def _writeRefusal(self, piece: bytes) -> None:
        if piece and not self._clientGone:
            self._request.write(piece)
            self._relayed += len(piece)

    def _refusalEnded(self, complete: bool) -> None:
        self._state = "done"
        self._cancelTimer()
        self._closeBackend(abort=not complete)
        if self._clientGone:
            return
        if complete:
            self._request.finish()
        else:
            # The response started; the only way left to say it is cut
            # short is to close without its end (RFC 9112 §8).
            self._request.loseConnection()


def _clockFor(request: Any) -> IReactorTime:
    # HTTPFactory.reactor: the reactor the listening site was built with
    # (a test's clock in tests), reached through the channel's factory.
    return request.channel.factory.reactor  # type: ignore[no-any-return]


def startTunnel(
    request: Any,
    pool: Any,
    headers: Headers,
    path: bytes,
    clock: IReactorTime | None = None,
    hashKey: bytes | None = None,
) -> None:
    """
    Take over an HTTP/1.1 request that L{isWebSocketUpgrade} accepted.

    Call it from C{gotLength}.  From then on the tunnel owns the request: the
    caller must write nothing on it (its C{process} must do nothing).  The
    outcome is one of:

      - the backend answers C{101} with C{Upgrade: websocket}: the client
        gets C{101 Switching Protocols} with the backend's WebSocket fields,
        then the two connections are joined (L{Tunnel}); the request is
        finished (and so access-logged, status 101, C{sentLength} the bytes
        sent to the client) when the client's connection closes;
      - the backend answers anything else: that response is relayed (body
        up to L{MAX_REFUSAL_BODY} bytes) and the client connection closed;
      - no usable answer: an error page (502; 504 on a connect or response
        timeout; 400 for a target or header that cannot be written, or an
        HTTP/2 request) via L{edgeproxy.http.errorpages.writeError}, and the
        client connection closed (it may hold pipelined frames).

    @param request: the client's L{twisted.web.http.Request} on an
        C{HTTPChannel}, with no body.
    @param pool: the route's L{edgeproxy.upstream.pool.UpstreamPool}
        (C{pickServer}, C{endpointFor}, C{upstream}).
    @param headers: the upstream request headers, already rewritten, with
        C{Connection: upgrade} and C{Upgrade: websocket}.
    @param path: the origin-form target to send.
    @param clock: the reactor's clock; by default the site's reactor.
    @param hashKey: the request's key for C{balance = hash} upstreams, so a
        WebSocket lands on the same server as the user's other requests.
    """
    _Upgrade(
        request, pool, headers, path, clock if clock is not None else _clockFor(request), hashKey
    ).start()
