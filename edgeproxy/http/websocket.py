# -*- test-case-name: tests.test_tunnel -*-
"""
WebSocket upgrades (RFC 6455 4) through the proxy.

This module owns what happens to a request once the forward stage has
decided it is a WebSocket opening handshake on a route that allows them
(L{edgeproxy.pipeline.forward.isWebSocketUpgrade}):

  - the raw upstream connection: the backend is picked by the pool's
    balancing policy (C{pickServer}) and dialled through its endpoint (same
    TLS, verification and SNI as traffic); the request head is written and
    the response head read with L{edgeproxy.h1}, bounded in size and time;
    interim responses other than C{101} are passed on;
  - the C{101} relayed to the client with the backend's end-to-end fields,
    and the client's HTTP/1.1 connection taken over by a
    L{edgeproxy.http.tunnel.Tunnel} (the connection's own C{takeOver}: no
    private API);
  - any other answer relayed as an ordinary response (body up to
    L{MAX_REFUSAL_BODY} bytes), and a failure as an error page; either way
    the client connection is closed afterwards (it may already hold
    frames).

Over HTTP/2 (RFC 8441 extended CONNECT) the client side is a stream
(L{edgeproxy.http.h2.stream.Stream}) with the same C{takeOver}, given the
fields of the C{101}: it answers C{200} instead, and its C{DATA} frames are
the client end of the tunnel.  Any other C{Upgrade} token never reaches
this module.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http import PotentialDataLoss

from edgeproxy import h1
from edgeproxy.errors import (
    BackendUnavailable,
    BadRequest,
    ProxyError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from edgeproxy.h1.fields import Fields
from edgeproxy.http.tunnel import Tunnel
from edgeproxy.pipeline.forwarded import clientFields
from edgeproxy.pipeline.values import BODY_DONE, Response
from edgeproxy.upstream.failures import classifyFailure

__all__ = ["MAX_REFUSAL_BODY", "MAX_RESPONSE_HEAD", "startTunnel"]

log = Logger()

MAX_RESPONSE_HEAD = 16 * 1024
"""Bytes of status line plus header lines accepted from a backend."""

MAX_REFUSAL_BODY = 64 * 1024
"""Bytes of a refused handshake's body relayed to the client; past this the
client connection is closed, so the client sees an incomplete response."""

# The handshake --------------------------------------------------------------


class _BackendProtocol(Protocol):
    """
    The upstream connection: reads the handshake response for L{_Upgrade},
    then hands every byte to the tunnel.  (Delegating is simpler than
    swapping C{transport.protocol}, which under TLS is not this object.)
    """

    # A TCP or TLS transport, which pauses, resumes and aborts (Twisted
    # declares an optional ITransport).
    transport: Any

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


_SWITCHING = Fields.trusted({b"connection": [b"upgrade"]})


class _Upgrade:
    """
    One WebSocket handshake through the proxy, from the request head to the
    tunnel (or to the relayed refusal, or to the error page).

    States: C{connecting}, C{head} (request written, reading the response
    head), C{refusing} (relaying a non-101 response), C{tunnel}, C{done}.
    It is also the body of a relayed refusal (C{deliverBody}) and that
    body's producer.
    """

    def __init__(
        self,
        connection: Any,
        call: Any,
        pool: Any,
        fields: Fields,
        path: bytes,
        hashKey: bytes | None,
    ) -> None:
        self._connection = connection
        self._call = call
        self._pool = pool
        self._upstream = pool.upstream
        self._fields = fields
        self._path = path
        self._hashKey = hashKey
        self._clock: IReactorTime = connection.factory.clock
        self._state = "connecting"
        self._backend = _BackendProtocol(self)
        self._backendGone = False
        self._server: Any = None
        self._buffer = b""
        self._connecting: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._reader: h1.BodyReader | None = None
        self._relayed = 0
        self._protocol: Any = None
        self._pending: list[bytes] = []
        self._ended: Failure | None = None

    # Timers and teardown ----------------------------------------------------

    def _setTimer(self, seconds: float, call: Any) -> None:
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
        # Whatever the client sent after its head (frames) must not be read
        # as HTTP: the error closes the connection.
        self._connection.closeAfterResponse()
        self._call.fail(error)

    # Client side ------------------------------------------------------------

    def start(self) -> None:
        self._call.cancelHook = self._clientLost
        try:
            self._server = self._pool.pickServer(self._hashKey)
            fields = self._fields
            if b"host" not in fields:
                # RFC 9112 3.2: an HTTP/1.1 request always carries Host.
                fields = fields.withField(b"host", self._server.address.encode("idna"))
            self._head = h1.writeRequestHead(b"GET", self._path, fields, 0)
            endpoint = self._pool.endpointFor(self._server)
        except h1.LocalProtocolError as error:
            self._fail(BadRequest(f"handshake not writable: {error}"))
            return
        except ProxyError as error:
            self._fail(error)
            return
        self._connecting = connectProtocol(endpoint, self._backend)
        self._connecting.addCallbacks(self._connected, self._connectFailed)

    def _clientLost(self) -> None:
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
        # The upstream side owns the mapping of connection failures to
        # statuses.
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
            self._refusalEnded(False)

    def _backendData(self, data: bytes) -> None:
        try:
            self._handleBackendData(data)
        except Exception:
            # A bug, not a backend problem: both sides go.
            log.failure("websocket upgrade relay failed")
            self._state = "done"
            self._cancelTimer()
            self._closeBackend(abort=True)
            self._connection.transport.abortConnection()

    def _handleBackendData(self, data: bytes) -> None:
        if self._state == "refusing":
            self._refusalData(data)
            return
        if self._state != "head":
            return
        buffer = self._buffer + data
        while True:
            try:
                found = h1.splitResponseHead(buffer, MAX_RESPONSE_HEAD)
                if found is None:
                    self._buffer = buffer
                    return
                head = h1.parseResponseHead(found[0])
            except h1.RemoteProtocolError as error:
                self._fail(UpstreamProtocolError(str(error)))
                return
            rest = buffer[found[1]:]
            if head.status == 101:
                if b"websocket" not in h1.listTokens(head.upgrade):
                    self._fail(UpstreamProtocolError(f"backend switched to {head.upgrade!r}"))
                else:
                    self._switch(head, rest)
                return
            if head.status >= 200:
                self._refuse(head, rest)
                return
            # RFC 9110 15.2: an interim response is passed on, then the
            # answer is still to come.
            self._call.interim(head.status, head.reason, clientFields(head.fields))
            buffer = rest

    def _backendLost(self, reason: Failure) -> None:
        self._backendGone = True
        if self._state in ("connecting", "head"):
            described = f"{type(reason.value).__name__}: {reason.value}"
            self._fail(BackendUnavailable(f"closed before a handshake response: {described}"))
        elif self._state == "refusing":
            reader = self._reader
            if reader is not None:
                try:
                    reader.eof()
                except h1.RemoteProtocolError:
                    self._refusalEnded(False)
                    return
            self._refusalEnded(True)

    # 101 -> tunnel ----------------------------------------------------------

    def _switch(self, head: h1.ResponseHead, rest: bytes) -> None:
        self._cancelTimer()
        fields = clientFields(head.fields).withField(b"connection", b"upgrade")
        if head.upgrade:
            fields = fields.withField(b"upgrade", *head.upgrade)
        tunnel = self._tunnel = Tunnel(self._clock, self._upstream.idle_timeout)
        self._backend.delegateTo(tunnel.backend)
        tunnel.whenClosed().addCallback(self._tunnelClosed)
        tunnel.whenClientLost().addCallback(self._tunnelClientLost)
        self._state = "tunnel"
        call = self._call
        call.status = 101
        call.backend = self._server.address
        call.upstreamHead = self._clock.seconds()
        log.info(
            "websocket tunnel open via upstream {upstream} backend {backend}",
            **self._where(),
        )
        buffered = self._connection.takeOver(call, fields, tunnel.client)
        tunnel.start(toBackend=buffered, toClient=rest)

    def _tunnelClientLost(self, tunnel: Tunnel) -> None:
        # Before the connection ends the call (and logs it): the bytes the
        # client got.
        self._call.sent = tunnel.backend.received

    def _tunnelClosed(self, tunnel: Tunnel) -> None:
        self._state = "done"
        self._call.sent = tunnel.backend.received
        log.info(
            "websocket tunnel via upstream {upstream} backend {backend} closed"
            " by {cause}: {toBackend} bytes up, {toClient} bytes down",
            cause=tunnel.closedBy,
            toBackend=tunnel.client.received,
            toClient=tunnel.backend.received,
            **self._where(),
        )

    # Anything else -> relayed as a plain response ---------------------------

    def _refuse(self, head: h1.ResponseHead, rest: bytes) -> None:
        framing = h1.bodyFraming(head, b"GET")
        log.info(
            "websocket upgrade refused by upstream {upstream} backend {backend}:"
            " {status}",
            status=head.status,
            **self._where(),
        )
        if framing == h1.CHUNKED:
            self._reader = h1.ChunkedReader()
        elif framing == h1.CLOSE_DELIMITED:
            self._reader = h1.CloseReader()
        elif framing > 0:
            self._reader = h1.LengthReader(framing)
        self._state = "refusing"
        self._call.backend = self._server.address
        self._call.upstreamHead = self._clock.seconds()
        # The client may already have sent frames after its head: close
        # rather than parse them as the next request.
        self._connection.closeAfterResponse()
        if self._reader is None:
            self._ended = BODY_DONE
            self._state = "done"
            self._cancelTimer()
            self._closeBackend(abort=False)
        elif self._upstream.idle_timeout > 0:
            self._setTimer(self._upstream.idle_timeout, self._timedOut)
        if rest and self._reader is not None:
            self._refusalData(rest)
        fields = clientFields(head.fields)
        ids = self._connection.factory.requestIds
        if ids is not None and self._call.request.requestId:
            # The client side sends the request's own ID (as forwarded's
            # clientFields does for other responses).
            fields = fields.without(ids.name)
        self._call.respond(Response(head.status, head.reason, fields, head.length, self))

    def _refusalData(self, data: bytes) -> None:
        if self._upstream.idle_timeout > 0 and self._state == "refusing":
            self._setTimer(self._upstream.idle_timeout, self._timedOut)
        reader = self._reader
        if reader is None or reader.done:
            return  # bytes after the body: not part of it
        try:
            piece = reader.feed(data)
        except h1.RemoteProtocolError as error:
            log.warn("websocket refusal body: {why}", why=str(error))
            self._refusalEnded(False)
            return
        room = MAX_REFUSAL_BODY - self._relayed
        if len(piece) > room:
            self._relay(piece[:room])
            self._refusalEnded(False)
            return
        self._relay(piece)
        if reader.done:
            self._refusalEnded(True)

    def _relay(self, piece: bytes) -> None:
        if not piece:
            return
        self._relayed += len(piece)
        if self._protocol is not None:
            self._protocol.dataReceived(piece)
        else:
            self._pending.append(piece)

    def _refusalEnded(self, complete: bool) -> None:
        if self._ended is not None:
            return
        self._state = "done"
        self._cancelTimer()
        self._closeBackend(abort=not complete)
        if complete:
            self._ended = (
                BODY_DONE if not isinstance(self._reader, h1.CloseReader)
                else Failure(PotentialDataLoss())
            )
        else:
            self._ended = Failure(ResponseFailed([Failure(BackendUnavailable("refusal body cut"))]))
        protocol = self._protocol
        if protocol is not None:
            self._protocol = None
            protocol.connectionLost(self._ended)

    # The refusal's body, as the client side reads it -----------------------------

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self)
        pending, self._pending = self._pending, []
        for piece in pending:
            protocol.dataReceived(piece)
        if self._ended is not None:
            protocol.connectionLost(self._ended)
            return
        self._protocol = protocol

    def pauseProducing(self) -> None:
        transport = self._backend.transport
        if transport is not None and not self._backendGone:
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport = self._backend.transport
        if transport is not None and not self._backendGone:
            transport.resumeProducing()

    def stopProducing(self) -> None:
        self._protocol = None
        if self._ended is None:
            self._ended = Failure(ResponseFailed([Failure(BackendUnavailable("stopped"))]))
            self._state = "done"
            self._cancelTimer()
            self._closeBackend(abort=True)


def startTunnel(
    connection: Any,
    call: Any,
    pool: Any,
    fields: Fields,
    path: bytes,
    hashKey: bytes | None = None,
) -> None:
    """
    Serve the WebSocket handshake C{call} on the HTTP/1.1 C{connection}.

    The outcome is one of:

      - the backend answers C{101} with C{Upgrade: websocket}: the client
        gets C{101 Switching Protocols} with the backend's WebSocket fields,
        then the two connections are joined (L{Tunnel}); the call ends (and
        is access-logged, status 101, the bytes sent to the client) when
        the client's connection closes;
      - the backend answers anything else: that response is relayed (body
        up to L{MAX_REFUSAL_BODY} bytes) and the client connection closed;
      - no usable answer: an error page (502; 504 on a connect or response
        timeout; 400 for a target or field that cannot be written), and the
        client connection closed (it may hold pipelined frames).

    @param pool: the route's upstream pool (C{pickServer}, C{endpointFor},
        C{upstream}).
    @param fields: the upstream request's fields, already rewritten, with
        C{connection: upgrade} and C{upgrade: websocket}.
    @param path: the origin-form target to send.
    @param hashKey: the request's key for C{balance = hash} upstreams, so a
        WebSocket lands on the same server as the user's other requests.
    """
    _Upgrade(connection, call, pool, fields, path, hashKey).start()
