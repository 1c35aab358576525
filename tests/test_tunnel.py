"""
Tests for L{edgeproxy.http.tunnel}.

The pure parts (upgrade detection, request head, response head parser,
header filtering, chunked bodies) are fed bytes and checked on the result.
The tunnel and the whole handshake run in memory: the client side is a real
C{Site} with the production L{EdgeHTTPChannel} on a C{StringTransport}, the
backend side a C{StringTransport} handed out by an in-memory endpoint, the
clock a L{MemoryReactorClock}.  Assertions are on the bytes each side sees,
on connections being closed or aborted, and on what the access log gets.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import error as netError
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from edgeproxy.config.model import Server, Upstream
from edgeproxy.errors import BadRequest, UpstreamProtocolError
from edgeproxy.http.channel import edgeChannelProtocolFactory, requestLineOf
from edgeproxy.http.tunnel import (
    ABORT_TIMEOUT,
    MAX_REFUSAL_BODY,
    BodyFraming,
    ResponseHeadParser,
    Tunnel,
    _takeOverChannel,
    bodyFraming,
    formatRequestHead,
    isWebSocketUpgrade,
    refusalHeaders,
    startTunnel,
    switchingHeaders,
)


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    result = Headers()
    for name, value in pairs:
        result.addRawHeader(name, value)
    return result


def parseHead(raw: bytes) -> Any:
    parser = ResponseHeadParser()
    head = parser.feed(raw)
    assert head is not None
    return head


# isWebSocketUpgrade ---------------------------------------------------------


@pytest.mark.parametrize(
    "method, pairs, expected",
    [
        (b"GET", [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], True),
        (b"GET", [(b"Upgrade", b"WebSocket"), (b"Connection", b"keep-alive, UPGRADE")], True),
        (b"GET", [(b"Upgrade", b"foo, websocket"), (b"Connection", b"upgrade")], True),
        (b"GET", [(b"Upgrade", b"websocket"), (b"Connection", b"x"), (b"Connection", b"upgrade")], True),
        (b"GET", [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade"), (b"Content-Length", b"0")], True),
        (b"POST", [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], False),
        (b"get", [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], False),
        (b"GET", [(b"Upgrade", b"h2c"), (b"Connection", b"Upgrade, HTTP2-Settings")], False),
        (b"GET", [(b"Upgrade", b"websocket")], False),
        (b"GET", [(b"Upgrade", b"websocket"), (b"Connection", b"keep-alive")], False),
        (b"GET", [(b"Connection", b"Upgrade")], False),
        (b"GET", [(b"Upgrade", b"websocketx"), (b"Connection", b"Upgrade")], False),
        (b"GET", [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Content-Length", b"5")], False),
        (b"GET", [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Transfer-Encoding", b"chunked")], False),
    ],
)
def test_isWebSocketUpgrade(method: bytes, pairs: list[tuple[bytes, bytes]], expected: bool) -> None:
    assert isWebSocketUpgrade(method, headers(*pairs)) is expected


# formatRequestHead ----------------------------------------------------------


def test_formatRequestHead() -> None:
    head = formatRequestHead(
        b"/chat?room=1",
        headers((b"Host", b"app.example"), (b"Upgrade", b"websocket"), (b"X-A", b"1"), (b"X-A", b"2")),
    )
    assert head == (
        b"GET /chat?room=1 HTTP/1.1\r\n"
        b"Host: app.example\r\n"
        b"Upgrade: websocket\r\n"
        b"X-A: 1\r\n"
        b"X-A: 2\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    "path, pairs",
    [
        (b"/a b", []),
        (b"/a\r\nX: y", []),
        (b"/a\x00", []),
        (b"http://other/", []),
        (b"", []),
        (b"/", [(b"X-Evil", b"a\x00b")]),
    ],
)
def test_formatRequestHeadRefusesUnsafe(path: bytes, pairs: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadRequest):
        formatRequestHead(path, headers(*pairs))


def test_formatRequestHeadNoInjection() -> None:
    # Headers itself turns CR/LF in values into spaces: still one line.
    head = formatRequestHead(b"/", headers((b"X-Evil", b"a\r\nInjected: 1")))
    assert head == b"GET / HTTP/1.1\r\nX-Evil: a Injected: 1\r\n\r\n"


class RawFields:
    """Fields as something other than Headers could hand them over."""

    def __init__(self, *pairs: tuple[bytes, bytes]) -> None:
        self.pairs = pairs

    def getAllRawHeaders(self) -> Any:
        return [(name, [value]) for name, value in self.pairs]


@pytest.mark.parametrize(
    "pair",
    [(b"Bad Name", b"x"), (b"Bad:Name", b"x"), (b"", b"x"), (b"X", b"a\r\nY: 1"), (b"X", b"a\nb")],
)
def test_formatRequestHeadRefusesUnsafeFields(pair: tuple[bytes, bytes]) -> None:
    with pytest.raises(BadRequest):
        formatRequestHead(b"/", RawFields(pair))  # type: ignore[arg-type]


# ResponseHeadParser ---------------------------------------------------------

HANDSHAKE = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"\r\n"
)


def test_parserWholeHeadAndRest() -> None:
    parser = ResponseHeadParser()
    head = parser.feed(HANDSHAKE + b"\x81\x02hi")
    assert head is not None
    assert (head.version, head.status, head.reason) == (b"HTTP/1.1", 101, b"Switching Protocols")
    assert head.fields == (
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    )
    assert parser.rest == b"\x81\x02hi"


@given(st.lists(st.integers(min_value=0, max_value=len(HANDSHAKE) + 4), max_size=8))
def test_parserAnySplit(cuts: list[int]) -> None:
    data = HANDSHAKE + b"tail"
    points = sorted(set(cuts)) + [len(data)]
    parser = ResponseHeadParser()
    head, start = None, 0
    for point in points:
        if head is None:
            head = parser.feed(data[start:point])
            start = point
    assert head is not None and head.status == 101
    assert parser.rest + data[start:] == b"tail"


def test_parserBareLF() -> None:
    head = parseHead(b"HTTP/1.1 403 Forbidden\nServer: x\n\nbody")
    assert head.status == 403 and head.fields == ((b"Server", b"x"),)


def test_parserEmptyReason() -> None:
    assert parseHead(b"HTTP/1.0 404\r\n\r\n").reason == b""


def test_parserTooLarge() -> None:
    parser = ResponseHeadParser(maxSize=64)
    assert parser.feed(b"HTTP/1.1 200 OK\r\n") is None
    with pytest.raises(UpstreamProtocolError):
        parser.feed(b"X: " + b"a" * 80)


def test_parserTooLargeEvenWhenComplete() -> None:
    with pytest.raises(UpstreamProtocolError):
        ResponseHeadParser(maxSize=32).feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 40 + b"\r\n\r\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 101 Switching\r\n\r\n",
        b"HTTP/1.1 1O1 x\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    ],
)
def test_parserRejects(raw: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        ResponseHeadParser().feed(raw)


# Header filtering and framing -------------------------------------------------


def test_switchingHeaders() -> None:
    head = parseHead(
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: WebSocket\r\n"
        b"Connection: Upgrade, X-Hop\r\n"
        b"X-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Server: nginx/1.2\r\n"
        b"X-Powered-By: PHP\r\n"
        b"Content-Length: 0\r\n"
        b"Sec-WebSocket-Accept: abc=\r\n"
        b"Sec-WebSocket-Protocol: chat\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
        b"Set-Cookie: a=b\r\n"
        b"\r\n"
    )
    result = dict(switchingHeaders(head).getAllRawHeaders())
    assert result == {
        b"Upgrade": [b"WebSocket"],
        b"Connection": [b"upgrade"],
        b"Sec-Websocket-Accept": [b"abc="],
        b"Sec-Websocket-Protocol": [b"chat"],
        b"Sec-Websocket-Extensions": [b"permessage-deflate"],
        b"Set-Cookie": [b"a=b"],
    }


def test_refusalHeaders() -> None:
    head = parseHead(
        b"HTTP/1.1 403 Forbidden\r\nServer: x\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    assert dict(refusalHeaders(head).getAllRawHeaders()) == {b"Content-Type": [b"text/plain"]}


@pytest.mark.parametrize(
    "raw, framing",
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", BodyFraming("none")),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", BodyFraming("none")),
        (b"HTTP/1.1 403 F\r\nContent-Length: 12\r\n\r\n", BodyFraming("length", 12)),
        (b"HTTP/1.1 403 F\r\nContent-Length: 12\r\nContent-Length: 12\r\n\r\n", BodyFraming("length", 12)),
        (b"HTTP/1.1 403 F\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n", BodyFraming("chunked")),
        (b"HTTP/1.1 403 F\r\nTransfer-Encoding: gzip\r\n\r\n", BodyFraming("close")),
        (b"HTTP/1.1 403 F\r\n\r\n", BodyFraming("close")),
    ],
)
def test_bodyFraming(raw: bytes, framing: BodyFraming) -> None:
    assert bodyFraming(parseHead(raw)) == framing


@pytest.mark.parametrize("values", [b"Content-Length: 1\r\nContent-Length: 2", b"Content-Length: -1", b"Content-Length: 0x10"])
def test_bodyFramingBadLength(values: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        bodyFraming(parseHead(b"HTTP/1.1 400 B\r\n" + values + b"\r\n\r\n"))


# Tunnel -----------------------------------------------------------------------


class SocketLikeTransport(StringTransport):
    """
    A StringTransport that, like TCP and TLS transports, lets a producer be
    unregistered twice (Twisted's channel does so when a request finishes
    on a connection whose producer was already taken away).
    """

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


def makeTunnel(idle: float = 30.0) -> tuple[Tunnel, StringTransport, StringTransport, MemoryReactorClock]:
    clock = MemoryReactorClock()
    tunnel = Tunnel(clock, idle)
    clientTransport, backendTransport = StringTransport(), StringTransport()
    tunnel.client.makeConnection(clientTransport)
    tunnel.backend.makeConnection(backendTransport)
    return tunnel, clientTransport, backendTransport, clock


def lose(end: Protocol) -> None:
    end.connectionLost(Failure(netError.ConnectionDone()))


def test_tunnelRelaysInitialBytesFirstThenBothWays() -> None:
    tunnel, client, backend, _ = makeTunnel()
    tunnel.start(toBackend=b"early-frame", toClient=b"after-head")
    tunnel.client.dataReceived(b"+up")
    tunnel.backend.dataReceived(b"+down")
    assert backend.value() == b"early-frame+up"
    assert client.value() == b"after-head+down"
    assert (tunnel.client.received, tunnel.backend.received) == (11 + 3, 10 + 5)


def test_tunnelBackpressure() -> None:
    """
    Each transport is the producer of the other: a full client send buffer
    (the client transport pausing its producer) stops reading the backend,
    and the other way round.
    """
    tunnel, client, backend, _ = makeTunnel()
    tunnel.start()
    assert client.producer is backend and client.streaming
    assert backend.producer is client and backend.streaming
    client.producer.pauseProducing()
    assert backend.producerState == "paused"
    client.producer.resumeProducing()
    assert backend.producerState == "producing"
    backend.producer.pauseProducing()
    assert client.producerState == "paused"


@pytest.mark.parametrize("side", ["client", "backend"])
def test_tunnelClosesTogether(side: str) -> None:
    tunnel, client, backend, clock = makeTunnel()
    closed: list[Tunnel] = []
    clientLost: list[Tunnel] = []
    tunnel.whenClosed().addCallback(closed.append)
    tunnel.whenClientLost().addCallback(clientLost.append)
    tunnel.start()
    first, other = (tunnel.client, tunnel.backend) if side == "client" else (tunnel.backend, tunnel.client)
    otherTransport = backend if side == "client" else client
    lose(first)
    # The survivor is closed (after flushing: loseConnection, not abort)
    # with no producer left registered, which a TLS close needs.
    assert otherTransport.disconnecting and not otherTransport.disconnected
    assert otherTransport.producer is None
    assert tunnel.closedBy == side
    assert closed == []
    assert bool(clientLost) == (side == "client")
    # Bytes still arriving from the closing side go nowhere.
    first.dataReceived(b"late")
    lose(other)
    assert closed == [tunnel]
    assert clientLost == [tunnel]
    assert tunnel.clientLostReason is not None
    assert clock.getDelayedCalls() == []


def test_tunnelClosingResumesPausedSide() -> None:
    """
    A side paused by the other's full buffer is resumed when the tunnel
    closes (a paused socket never sees its peer's FIN or TLS close_notify),
    and what it still sends is dropped.
    """
    tunnel, client, backend, clock = makeTunnel()
    tunnel.start()
    backend.producer.pauseProducing()  # backend buffer full: client paused
    assert client.producerState == "paused"
    lose(tunnel.backend)
    assert client.producerState == "producing" and client.disconnecting
    tunnel.client.dataReceived(b"nowhere to go")
    assert backend.value() == b""


def test_tunnelIdleDropsLateBytes() -> None:
    tunnel, client, backend, clock = makeTunnel(idle=5.0)
    tunnel.start()
    clock.advance(5)
    tunnel.client.dataReceived(b"late")
    tunnel.backend.dataReceived(b"late")
    assert client.value() == b"" and backend.value() == b""


def test_tunnelAbortsWhatDoesNotClose() -> None:
    tunnel, client, backend, clock = makeTunnel()
    tunnel.start()
    lose(tunnel.client)
    assert not backend.disconnected
    clock.advance(ABORT_TIMEOUT)
    assert backend.disconnected  # StringTransport's mark of abortConnection


def test_tunnelIdleTimeout() -> None:
    tunnel, client, backend, clock = makeTunnel(idle=10.0)
    tunnel.start()
    clock.advance(6)
    tunnel.client.dataReceived(b"x")
    clock.advance(6)
    tunnel.backend.dataReceived(b"y")
    clock.advance(6)
    assert not client.disconnecting and not backend.disconnecting
    clock.advance(4)
    assert client.disconnecting and backend.disconnecting
    assert client.producer is None and backend.producer is None
    assert tunnel.closedBy == "idle"
    lose(tunnel.client)
    lose(tunnel.backend)
    assert clock.getDelayedCalls() == []


def test_tunnelNoIdleTimeout() -> None:
    tunnel, client, backend, clock = makeTunnel(idle=0)
    tunnel.start()
    assert clock.getDelayedCalls() == []
    clock.advance(86400)
    assert not client.disconnecting and not backend.disconnecting


def test_tunnelEndLostBeforeStart() -> None:
    tunnel, client, backend, clock = makeTunnel()
    lose(tunnel.client)
    tunnel.start(toBackend=b"x")
    assert backend.disconnecting and backend.value() == b""


# Taking over the channel (Twisted private API) --------------------------------


class IdleRequest(server.Request):
    """A request that never answers: the channel stays handling it."""

    def process(self) -> None:
        pass


def channelSites(clock: MemoryReactorClock) -> list[server.Site]:
    plain = server.Site(Resource(), reactor=clock, timeout=60)
    plain.requestFactory = IdleRequest

    class EdgeLike(server.Site):
        protocol = edgeChannelProtocolFactory

    edge = EdgeLike(Resource(), reactor=clock, timeout=60)
    edge.requestFactory = IdleRequest
    return [plain, edge]


@pytest.mark.parametrize("which", [0, 1], ids=["HTTPChannel", "EdgeHTTPChannel"])
class TestTakeOverChannel:
    """
    Regression tests for the one function that uses Twisted private API
    (C{_protocolUpgradeForWebsockets}, C{_dataBuffer}): if Twisted changes
    either, these fail.
    """

    def connect(self, which: int) -> tuple[Any, Any, StringTransport, MemoryReactorClock]:
        clock = MemoryReactorClock()
        site = channelSites(clock)[which]
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = SocketLikeTransport(lenient=True)
        protocol.makeConnection(transport)
        head = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        # Frames pipelined right behind the head, then more before the switch.
        protocol.dataReceived(head + b"frame-1")
        protocol.dataReceived(b"frame-2")
        channel = protocol._channel
        return protocol, channel, transport, clock

    def test_bufferedBytesAndDelivery(self, which: int) -> None:
        protocol, channel, transport, clock = self.connect(which)
        recorder = Recorder()
        taken = _takeOverChannel(channel, recorder)
        assert taken.buffered == b"frame-1frame-2"
        assert recorder.transport is transport
        # Data arrives the way the reactor delivers it: to the protocol the
        # transport knows, which is the ALPN switcher around the channel.
        protocol.dataReceived(b"frame-3")
        assert recorder.data == b"frame-3"
        assert transport.value() == b""  # HTTP wrote nothing
        assert transport.producer is None
        # No HTTP timeout (idle, header-read) is left to fire.
        assert clock.getDelayedCalls() == []
        protocol.connectionLost(Failure(netError.ConnectionDone()))
        assert recorder.lost is not None
        assert channel.persistent is False

    def test_channelLostStillCallable(self, which: int) -> None:
        protocol, channel, transport, clock = self.connect(which)
        taken = _takeOverChannel(channel, Recorder())
        request = channel.requests[0]
        finished: list[object] = []
        request.notifyFinish().addBoth(finished.append)
        request.startedWriting = 1
        request.finish()
        taken.channelLost(Failure(netError.ConnectionDone()))
        assert finished == [None]
        assert channel.requests == []
        assert transport.value() == b""

    def test_pausedTransportResumed(self, which: int) -> None:
        protocol, channel, transport, clock = self.connect(which)
        # Past Twisted's eager-read allowance the channel pauses the socket.
        protocol.dataReceived(b"x" * 70000)
        assert transport.producerState == "paused"
        taken = _takeOverChannel(channel, Recorder())
        assert taken.buffered == b"frame-1frame-2" + b"x" * 70000
        assert transport.producerState == "producing"


# The whole handshake, in memory ------------------------------------------------

UPGRADE_REQUEST = (
    b"GET /chat?x=1 HTTP/1.1\r\n"
    b"Host: app.example\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


class MemoryEndpoint:
    """Hands out connections to StringTransports, or fails, or hangs."""

    def __init__(self, outcome: str = "connect", failure: Exception | None = None) -> None:
        self.outcome = outcome
        self.failure = failure
        self.protocol: Any = None
        self.transport = StringTransport()
        self.pending: Deferred[Any] | None = None
        self.cancelled = False

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.outcome == "fail":
            assert self.failure is not None
            return fail(self.failure)
        if self.outcome == "hang":
            self.pending = Deferred(lambda d: setattr(self, "cancelled", True))
            return self.pending
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class MemoryPool:
    def __init__(self, endpoint: MemoryEndpoint, **timeouts: float) -> None:
        self.endpoint = endpoint
        self.upstream = Upstream(
            name="chat",
            servers=(Server("127.0.0.1", 8080),),
            response_timeout=timeouts.get("response", 5.0),
            idle_timeout=timeouts.get("idle", 30.0),
        )

    def pickServer(self, key: bytes | None = None) -> Server:
        return self.upstream.servers[0]

    def endpointFor(self, server: Server) -> MemoryEndpoint:
        return self.endpoint


class TunnelRequest(server.Request):
    """
    What ProxyRequest does for an upgrade, minus routing: decide in
    gotLength, hand over to startTunnel, then stay out of the way.
    """

    tunnelled = False

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        method, target, version = requestLineOf(self.channel)
        self.method, self.uri, self.clientproto = method, target, version
        if isWebSocketUpgrade(method, self.requestHeaders):
            self.tunnelled = True
            upstreamHeaders = self.requestHeaders.copy()
            upstreamHeaders.addRawHeader(b"X-Forwarded-For", b"127.0.0.1")
            startTunnel(self, self.channel.site.pool, upstreamHeaders, target)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self.tunnelled:
            super().requestReceived(command, path, version)


class TunnelSite(server.Site):
    protocol = edgeChannelProtocolFactory

    def __init__(self, pool: MemoryPool, clock: MemoryReactorClock) -> None:
        super().__init__(Resource(), requestFactory=TunnelRequest, reactor=clock, timeout=60)
        self.pool = pool
        self.logged: list[tuple[int, int, bytes]] = []

    def log(self, request: Any) -> None:
        self.logged.append((request.code, request.sentLength, request.uri))


class Flow:
    """A client connection to a TunnelSite, its backend, and the clock."""

    def __init__(self, outcome: str = "connect", failure: Exception | None = None, **timeouts: float) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = MemoryEndpoint(outcome, failure)
        self.site = TunnelSite(MemoryPool(self.endpoint, **timeouts), self.clock)
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        self.client = SocketLikeTransport(lenient=True)
        self.protocol.makeConnection(self.client)

    @property
    def backend(self) -> StringTransport:
        return self.endpoint.transport

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def answer(self, data: bytes) -> None:
        self.endpoint.protocol.dataReceived(data)

    def open(self, extra: bytes = b"") -> None:
        self.send(UPGRADE_REQUEST + extra)
        self.clock.advance(0)

    def clientLost(self) -> None:
        self.protocol.connectionLost(Failure(netError.ConnectionDone()))

    def backendLost(self) -> None:
        self.endpoint.protocol.connectionLost(Failure(netError.ConnectionDone()))


def statusOf(raw: bytes) -> bytes:
    return raw.split(b"\r\n", 1)[0]


def test_handshakeAndTunnel() -> None:
    flow = Flow()
    flow.open(extra=b"\x81\x85early")
    # The backend gets the head as rewritten, then the pipelined frame.
    head, _, after = flow.backend.value().partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"GET /chat?x=1 HTTP/1.1"
    assert b"Sec-Websocket-Key: dGhlIHNhbXBsZSBub25jZQ==" in head
    assert b"X-Forwarded-For: 127.0.0.1" in head
    assert after == b""  # not before the 101
    assert flow.client.value() == b""
    flow.answer(HANDSHAKE[:-2] + b"Server: secret/1.0\r\n\r\n" + b"\x81\x02hi")
    assert flow.backend.value().endswith(b"\r\n\r\n\x81\x85early")
    response = flow.client.value()
    head, _, rest = response.partition(b"\r\n\r\n")
    assert statusOf(head) == b"HTTP/1.1 101 Switching Protocols"
    assert b"Sec-Websocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    assert b"Upgrade: websocket" in head and b"Connection: upgrade" in head
    assert b"Server" not in head and b"chunked" not in head.lower()
    assert rest == b"\x81\x02hi"
    # Now it is a byte pipe: nothing is parsed as HTTP any more.
    flow.backend.clear()
    flow.send(b"GET / HTTP/1.1\r\n\r\n")
    assert flow.backend.value() == b"GET / HTTP/1.1\r\n\r\n"
    flow.answer(b"\x88\x00")
    assert flow.client.value().endswith(b"\x88\x00")
    # Backend closes: the client is closed after flushing.
    flow.backendLost()
    assert flow.client.disconnecting and not flow.client.disconnected
    assert flow.site.logged == []
    flow.clientLost()
    # Finished (and logged) once the client connection is gone: 101, bytes
    # sent to the client through the tunnel.
    assert flow.site.logged == [(101, 4 + 2, b"/chat?x=1")]
    assert flow.clock.getDelayedCalls() == []
    # Finishing wrote nothing on the connection after the tunnel's bytes.
    assert flow.client.value().endswith(b"\x88\x00")


def test_clientClosesTunnel() -> None:
    flow = Flow()
    flow.open()
    flow.answer(HANDSHAKE)
    flow.clientLost()
    assert flow.backend.disconnecting
    assert flow.site.logged == [(101, 0, b"/chat?x=1")]
    flow.backendLost()
    assert flow.clock.getDelayedCalls() == []


def test_tunnelIdleClosesBoth() -> None:
    flow = Flow(idle=20.0)
    flow.open()
    flow.answer(HANDSHAKE)
    flow.clock.advance(19)
    flow.send(b"ping")
    flow.clock.advance(19)
    assert not flow.backend.disconnecting
    flow.clock.advance(1)
    assert flow.backend.disconnecting and flow.client.disconnecting


def test_refusalRelayed() -> None:
    flow = Flow()
    flow.open(extra=b"\x81\x85early")
    flow.answer(
        b"HTTP/1.1 403 Forbidden\r\nServer: secret\r\nX-Powered-By: PHP\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 6\r\n\r\nno"
    )
    flow.answer(b"pe!!extra")
    raw = flow.client.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert statusOf(head) == b"HTTP/1.1 403 Forbidden"
    assert b"Content-Length: 6" in head and b"Connection: close" in head
    assert b"Content-Type: text/plain" in head
    assert b"secret" not in head and b"PHP" not in head
    assert body == b"nope!!"
    # Closed, and the pipelined frame was never read as a request.
    assert flow.client.disconnecting
    assert flow.backend.disconnecting and not flow.backend.disconnected
    assert flow.site.logged == [(403, 6, b"/chat?x=1")]


def test_refusalChunked() -> None:
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n")
    raw = flow.client.value()
    assert statusOf(raw) == b"HTTP/1.1 404 Not Found"
    assert raw.endswith(b"4\r\nnope\r\n0\r\n\r\n")
    assert flow.client.disconnecting
    assert flow.site.logged == [(404, 4, b"/chat?x=1")]


def test_refusalChunkedAcrossReads() -> None:
    flow = Flow()
    flow.open()
    body = b"3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"
    flow.answer(b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(len(body)):
        flow.answer(body[i : i + 1])
    assert flow.site.logged == [(403, 5, b"/chat?x=1")]
    assert flow.client.disconnecting and not flow.backend.disconnected


def test_refusalChunkedMalformed() -> None:
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    # Cut short: no terminating chunk on the wire, connection closed.
    assert not flow.client.value().endswith(b"0\r\n\r\n")
    assert flow.client.disconnecting and flow.backend.disconnected
    assert flow.site.logged == []


def test_refusalCloseDelimited() -> None:
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.0 400 Bad Request\r\n\r\nbad")
    flow.backendLost()
    raw = flow.client.value()
    assert statusOf(raw) == b"HTTP/1.1 400 Bad Request"
    assert raw.endswith(b"3\r\nbad\r\n0\r\n\r\n")
    assert flow.client.disconnecting


def test_refusalBodyCapped() -> None:
    flow = Flow()
    flow.open()
    size = MAX_REFUSAL_BODY + 10
    flow.answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % size + b"a" * size)
    raw = flow.client.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    # The length promised is the backend's, the body cut: the client sees a
    # short response on a closed connection, never a complete-looking one.
    assert b"Content-Length: %d" % size in head
    assert body == b"a" * MAX_REFUSAL_BODY
    assert flow.client.disconnecting
    assert flow.backend.disconnected


def test_refusalBodyCutByBackend() -> None:
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\n\r\nabc")
    flow.backendLost()
    assert flow.client.value().endswith(b"\r\n\r\nabc")
    assert flow.client.disconnecting
    assert flow.site.logged == []


def test_refusalBodyStalls() -> None:
    flow = Flow(idle=7.0)
    flow.open()
    flow.answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\n\r\nabc")
    flow.clock.advance(6)
    flow.answer(b"d")
    flow.clock.advance(6)
    assert not flow.client.disconnecting
    flow.clock.advance(1)
    assert flow.client.value().endswith(b"\r\n\r\nabcd")
    assert flow.client.disconnecting and flow.backend.disconnected


def test_interimResponseSkipped() -> None:
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + HANDSHAKE)
    raw = flow.client.value()
    assert statusOf(raw) == b"HTTP/1.1 101 Switching Protocols"
    assert b"Link" not in raw


@pytest.mark.parametrize(
    "failure, status",
    [
        (netError.ConnectionRefusedError(), b"502"),
        (netError.DNSLookupError("nope"), b"502"),
        (netError.TimeoutError(), b"504"),
    ],
)
def test_connectFailure(failure: Exception, status: bytes) -> None:
    flow = Flow("fail", failure)
    flow.open(extra=b"\x81\x85early")
    raw = flow.client.value()
    assert statusOf(raw).startswith(b"HTTP/1.1 " + status)
    assert b"Connection: close" in raw or b"connection: close" in raw.lower()
    assert b"127.0.0.1" not in raw  # never the backend's address
    assert flow.client.disconnecting


def test_responseTimeout() -> None:
    flow = Flow(response=5.0)
    flow.open()
    flow.clock.advance(4.9)
    assert flow.client.value() == b""
    flow.clock.advance(0.1)
    assert statusOf(flow.client.value()) == b"HTTP/1.1 504 Gateway Timeout"
    assert flow.backend.disconnected
    assert flow.client.disconnecting


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n" + b"X: " + b"a" * 20000,
    ],
)
def test_badHandshakeResponse(answer: bytes) -> None:
    flow = Flow()
    flow.open()
    flow.answer(answer)
    assert statusOf(flow.client.value()) == b"HTTP/1.1 502 Bad Gateway"
    assert flow.backend.disconnected


def test_refusalWithAmbiguousFraming() -> None:
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert statusOf(flow.client.value()) == b"HTTP/1.1 502 Bad Gateway"
    assert flow.backend.disconnected


def test_backendClosesBeforeHead() -> None:
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.1 101 Swi")
    flow.backendLost()
    assert statusOf(flow.client.value()) == b"HTTP/1.1 502 Bad Gateway"


def test_clientLeavesWhileConnecting() -> None:
    flow = Flow("hang")
    flow.open()
    flow.clientLost()
    assert flow.endpoint.cancelled
    assert flow.clock.getDelayedCalls() == []


def test_clientLeavesWhileWaitingForHead() -> None:
    flow = Flow()
    flow.open()
    flow.clientLost()
    assert flow.backend.disconnected
    assert flow.clock.getDelayedCalls() == []
    flow.answer(HANDSHAKE)  # too late: nothing happens
    assert flow.client.value() == b""


def test_nothingWrittenFromInsideGotLength() -> None:
    """
    Even a failure known at once is answered only after the channel has
    finished with the head (answering from inside gotLength would break the
    channel's bookkeeping).
    """
    flow = Flow("fail", netError.ConnectionRefusedError())
    flow.send(UPGRADE_REQUEST)
    assert flow.client.value() == b""
    flow.clock.advance(0)
    assert statusOf(flow.client.value()) == b"HTTP/1.1 502 Bad Gateway"


def test_http2RequestRefused() -> None:
    """
    An HTTP/2 stream cannot be taken over: refused with a 400, no backend
    connection attempted (the request layer should not even call in).
    """
    from twisted.web.test.requesthelper import DummyChannel, DummyRequest

    clock = MemoryReactorClock()
    endpoint = MemoryEndpoint()
    request = DummyRequest([b"ws"])
    request.channel = DummyChannel()
    request.channel.streamID = 1
    startTunnel(request, MemoryPool(endpoint), headers((b"Host", b"a")), b"/ws", clock=clock)
    clock.advance(0)
    assert request.responseCode == 400
    assert request.finished
    assert endpoint.protocol is None


def test_internalErrorAbortsBoth(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A bug while switching (here: the channel hook gone, as if Twisted
    dropped it) aborts both connections instead of leaving the client
    hanging with its timeouts off.
    """
    from edgeproxy.http import tunnel as tunnelModule

    def broken(channel: Any, protocol: Any) -> Any:
        raise AttributeError("_protocolUpgradeForWebsockets")

    monkeypatch.setattr(tunnelModule, "_takeOverChannel", broken)
    flow = Flow()
    flow.open()
    flow.answer(HANDSHAKE)
    assert flow.client.disconnected and flow.backend.disconnected


def test_hashBalancedHandshakeGoesWhereTheUsersRequestsGo() -> None:
    """
    With C{balance = hash}, a WebSocket handshake with a user's key is sent
    to the server the same key picks for that user's ordinary requests, so
    sticky sessions hold for WebSockets too.
    """
    from twisted.web.test.requesthelper import DummyChannel, DummyRequest

    from edgeproxy.upstream.pool import UpstreamPool

    servers = tuple(Server(f"10.0.0.{n}", 8080) for n in range(1, 6))
    dialled: list[Server] = []

    class RecordingPool(UpstreamPool):
        def endpointFor(self, server: Server) -> Any:
            dialled.append(server)
            return MemoryEndpoint()

    clock = MemoryReactorClock()
    pool = RecordingPool(
        clock, Upstream(name="chat", servers=servers, balance="hash"), None
    )
    for user in [b"alice", b"bob", b"carol", b"dave"]:
        request = DummyRequest([b"ws"])
        request.channel = DummyChannel()
        startTunnel(request, pool, headers((b"Host", b"a")), b"/ws", clock=clock, hashKey=user)
        clock.advance(0)
        assert dialled[-1] == pool.pickServer(user)
    assert len(set(dialled)) > 1
