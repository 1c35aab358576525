"""
Tests for L{edgeproxy.http.tunnel} and L{edgeproxy.http.websocket}.

The tunnel runs in memory on two transports.  The whole handshake runs in
memory too: the client side is a real L{ListenerFactory} and
L{HTTP1Connection} on a C{StringTransport}, whose route (WebSockets on)
ends in the real forward stage over an in-memory pool
(L{tests.memorypool}); the backend side is a C{StringTransport} handed out
by an in-memory endpoint, the clock a L{MemoryReactorClock}.  Assertions
are on the bytes each side sees, on connections being closed or aborted,
and on what the access log gets.  Parsing the backend's head is
L{edgeproxy.h1}'s (tests.test_h1); deciding what is a handshake is the
forward stage's (tests.test_forward).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import error as netError
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from edgeproxy.config.model import Route, Server, Upstream
from edgeproxy.h1 import Fields
from edgeproxy.http.server import HTTP1Connection
from edgeproxy.http.tunnel import ABORT_TIMEOUT, Tunnel
from edgeproxy.http.websocket import MAX_REFUSAL_BODY
from tests.memorypool import MemoryPool, ProxyClient

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


# Taking over the connection ---------------------------------------------------


class TakingOver:
    """A stage that takes the connection over at once with C{protocol}."""

    def __init__(self) -> None:
        self.protocol = Recorder()
        self.buffered: bytes | None = None
        self.calls: list[Any] = []

    def handle(self, call: Any) -> None:
        self.calls.append(call)

    def takeOver(self, fields: Fields | None = None) -> None:
        call = self.calls[-1]
        self.buffered = call.client.takeOver(call, fields or Fields(), self.protocol)


class Recording:
    def __init__(self) -> None:
        self.logged: list[tuple[int, int, bytes]] = []

    def log(self, call: Any) -> None:
        self.logged.append((call.status, call.sent, call.request.target))


def takenOver(**limits: Any) -> tuple[ProxyClient, TakingOver, Recording]:
    from edgeproxy.config.model import Limits, Listener
    from edgeproxy.pipeline.stages import RoutePipeline

    stage = TakingOver()
    log = Recording()
    client = ProxyClient(
        Listener(name="l", endpoint="tcp:0", tls=False, limits=Limits(**limits)),
        transport=SocketLikeTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234)),
        accessLog=log,
    )
    client.runtime.pipelines["app"] = RoutePipeline((("forward", stage),), 30.0)
    head = b"GET /ws HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    # Frames pipelined right behind the head, then more before the switch.
    client.send(head + b"frame-1")
    client.send(b"frame-2")
    return client, stage, log


class TestTakeOver:
    """
    L{HTTP1Connection.takeOver}: what the WebSocket switch needs of the
    connection (it replaced the private Twisted API the channel used).
    """

    def test_bufferedBytesAndDelivery(self) -> None:
        client, stage, log = takenOver()
        stage.takeOver(Fields([(b"upgrade", b"websocket")]))
        assert stage.buffered == b"frame-1frame-2"
        assert stage.protocol.transport is client.transport
        # Every byte from now on is the protocol's.
        client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
        assert stage.protocol.data == b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n"
        # The head given was written, and HTTP wrote nothing else.
        assert client.wire() == b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        assert client.transport.producer is None
        # No HTTP timeout (idle, header) is left to fire.
        assert client.clock.getDelayedCalls() == []
        client.clock.advance(3600)
        assert not client.transport.disconnecting

    def test_callEndsWithTheConnection(self) -> None:
        client, stage, log = takenOver()
        stage.takeOver()
        call = stage.calls[-1]
        call.status = 101
        assert client.protocol.busy()
        assert log.logged == []
        client.lose(netError.ConnectionDone())
        assert stage.protocol.lost is not None
        assert log.logged == [(101, 0, b"/ws")]
        assert client.factory.inflight == set() and client.factory.channels == set()
        assert client.wire() == b"HTTP/1.1 101 Switching Protocols\r\n\r\n"

    def test_pausedTransportResumed(self) -> None:
        client, stage, _ = takenOver(max_header_size=1024)
        # Past the head limit the connection stops reading the pipelined bytes.
        client.send(b"x" * 2000)
        assert client.transport.producerState == "paused"
        stage.takeOver()
        assert stage.buffered == b"frame-1frame-2" + b"x" * 2000
        assert client.transport.producerState == "producing"


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

HANDSHAKE = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
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


CHAT = Route(name="chat", hosts=("app.example",), paths=("/",), upstream="chat")


class Flow:
    """A client connection to a listener whose route forwards WebSockets
    to the C{chat} upstream, its backend, and the clock."""

    def __init__(self, outcome: str = "connect", failure: Exception | None = None, **timeouts: float) -> None:
        self.endpoint = MemoryEndpoint(outcome, failure)
        upstream = Upstream(
            name="chat",
            servers=(Server("127.0.0.1", 8080),),
            response_timeout=timeouts.get("response", 5.0),
            idle_timeout=timeouts.get("idle", 30.0),
        )
        self.log = Recording()
        self.proxy = ProxyClient(
            pool=MemoryPool(upstream, endpoint=self.endpoint),
            routes=(CHAT,),
            accessLog=self.log,
            transport=SocketLikeTransport(lenient=True, peerAddress=IPv4Address("TCP", "127.0.0.1", 1234)),
            peer=IPv4Address("TCP", "127.0.0.1", 1234),
        )
        self.clock = self.proxy.clock
        self.client = self.proxy.transport
        self.pool = self.proxy.pool

    @property
    def backend(self) -> StringTransport:
        return self.endpoint.transport

    @property
    def logged(self) -> list[tuple[int, int, bytes]]:
        return self.log.logged

    def send(self, data: bytes) -> None:
        self.proxy.send(data)

    def answer(self, data: bytes) -> None:
        self.endpoint.protocol.dataReceived(data)

    def open(self, extra: bytes = b"") -> None:
        self.send(UPGRADE_REQUEST + extra)
        self.clock.advance(0)

    def clientLost(self) -> None:
        self.proxy.lose(netError.ConnectionDone())

    def backendLost(self) -> None:
        self.endpoint.protocol.connectionLost(Failure(netError.ConnectionDone()))


def statusOf(raw: bytes) -> bytes:
    return raw.split(b"\r\n", 1)[0]


def test_handshakeAndTunnel() -> None:
    flow = Flow()
    flow.open(extra=b"\x81\x85early")
    # The backend gets the head as rewritten, then the pipelined frame.
    head, _, after = flow.backend.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /chat?x=1 HTTP/1.1"
    assert b"Host: app.example" in lines
    assert b"Sec-Websocket-Key: dGhlIHNhbXBsZSBub25jZQ==" in lines
    assert b"X-Forwarded-For: 127.0.0.1" in lines
    assert b"Upgrade: websocket" in lines and b"Connection: upgrade" in lines
    assert after == b""  # not before the 101
    assert flow.pool.sent == []  # the tunnel, not an exchange
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
    assert flow.logged == []
    flow.clientLost()
    # Finished (and logged) once the client connection is gone: 101, bytes
    # sent to the client through the tunnel.
    assert flow.logged == [(101, 4 + 2, b"/chat?x=1")]
    assert flow.clock.getDelayedCalls() == []
    # Finishing wrote nothing on the connection after the tunnel's bytes.
    assert flow.client.value().endswith(b"\x88\x00")


def test_switchingFields() -> None:
    """
    The 101 the client gets carries the backend's end-to-end fields (the
    WebSocket ones, cookies) and the proxy's own Connection: upgrade and
    Upgrade; hop-by-hop fields, the fields the backend's Connection names,
    its framing and Server / X-Powered-By stay behind.
    """
    flow = Flow()
    flow.open()
    flow.answer(
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
    head = flow.client.value().partition(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    assert sorted(line.split(b": ", 1)[0].lower() for line in lines[1:]) == sorted(
        [
            b"upgrade", b"connection", b"sec-websocket-accept", b"sec-websocket-protocol",
            b"sec-websocket-extensions", b"set-cookie",
        ]
    )
    assert b"Upgrade: WebSocket" in lines and b"Connection: upgrade" in lines
    assert b"Sec-Websocket-Extensions: permessage-deflate" in lines and b"Set-Cookie: a=b" in lines


def test_clientClosesTunnel() -> None:
    flow = Flow()
    flow.open()
    flow.answer(HANDSHAKE)
    flow.clientLost()
    assert flow.backend.disconnecting
    assert flow.logged == [(101, 0, b"/chat?x=1")]
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
    assert flow.logged == [(403, 6, b"/chat?x=1")]


def test_refusalCarriesTheRequestsOwnId() -> None:
    """
    A relayed refusal carries the request's ID, the one the backend was
    sent, once: a backend's own copy is dropped as for other responses.
    """
    flow = Flow()
    flow.open()
    sent = [line for line in flow.backend.value().split(b"\r\n") if line.startswith(b"X-Request-ID: ")]
    assert len(sent) == 1
    flow.answer(b"HTTP/1.1 403 Forbidden\r\nX-Request-ID: backend-own\r\nContent-Length: 0\r\n\r\n")
    head = flow.client.value().partition(b"\r\n\r\n")[0]
    assert statusOf(head) == b"HTTP/1.1 403 Forbidden"
    assert [line for line in head.split(b"\r\n") if line.startswith(b"X-Request-ID")] == sent


def test_refusalChunked() -> None:
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n")
    raw = flow.client.value()
    assert statusOf(raw) == b"HTTP/1.1 404 Not Found"
    assert raw.endswith(b"4\r\nnope\r\n0\r\n\r\n")
    assert flow.client.disconnecting
    assert flow.logged == [(404, 4, b"/chat?x=1")]


def test_refusalChunkedAcrossReads() -> None:
    flow = Flow()
    flow.open()
    body = b"3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"
    flow.answer(b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(len(body)):
        flow.answer(body[i : i + 1])
    assert flow.logged == [(403, 5, b"/chat?x=1")]
    assert flow.client.disconnecting and not flow.backend.disconnected


def test_refusalChunkedMalformed() -> None:
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    # Cut short: no terminating chunk on the wire, connection closed.
    assert not flow.client.value().endswith(b"0\r\n\r\n")
    assert flow.client.disconnecting and flow.backend.disconnected
    # Logged once, when the connection is gone, as cut short.
    flow.clientLost()
    assert [status for status, _, _ in flow.logged] == [403]


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
    assert flow.client.disconnected  # aborted: the response is incomplete


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


def test_interimResponsesPassedOnBeforeThe101() -> None:
    """RFC 9110 15.2: a 1xx before the switch reaches the client, then the 101."""
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\nServer: x\r\n\r\n" + HANDSHAKE)
    raw = flow.client.value()
    assert raw.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n")
    assert b"Server" not in raw


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
    assert raw.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" in raw.lower()
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
        b"HTTP/2 101 Switching\r\n\r\n",
        b"HTTP/1.1 1O1 x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nNo colon\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nX: a\x00b\r\n\r\n",
    ],
)
def test_badHandshakeResponse(answer: bytes) -> None:
    flow = Flow()
    flow.open()
    flow.answer(answer)
    assert statusOf(flow.client.value()) == b"HTTP/1.1 502 Bad Gateway"
    assert flow.backend.disconnected


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 3\r\nTransfer-Encoding: chunked",
        b"Content-Length: 1\r\nContent-Length: 2",
        b"Content-Length: -1",
        b"Content-Length: 0x10",
        # h1's one policy for backends: exactly chunked (the tunnel's own
        # parser read these as chunked or close-delimited).
        b"Transfer-Encoding: gzip, chunked\r\nContent-Length: 3",
        b"Transfer-Encoding: gzip",
    ],
)
def test_refusalWithAmbiguousFraming(framing: bytes) -> None:
    flow = Flow()
    flow.open()
    flow.answer(b"HTTP/1.1 403 Forbidden\r\n" + framing + b"\r\n\r\n")
    assert statusOf(flow.client.value()) == b"HTTP/1.1 502 Bad Gateway"
    assert flow.backend.disconnected


def test_refusalFraming() -> None:
    """No body for 204 and 304 whatever their Content-Length says; a
    repeated equal Content-Length is one length."""
    for answer, body in (
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b""),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", b""),
        (b"HTTP/1.1 403 F\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", b"abc"),
    ):
        flow = Flow()
        flow.open()
        flow.answer(answer)
        assert flow.client.value().partition(b"\r\n\r\n")[2] == body
        assert flow.client.disconnecting
        assert [status for status, _, _ in flow.logged] == [int(answer[9:12])]


def test_foldedFieldIsTheSamePolicyAsForAnyResponse() -> None:
    """
    An obs-folded field from the backend is unfolded, as on any other
    response (h1's one policy), where the tunnel's own parser refused it
    with 502.
    """
    flow = Flow()
    flow.open()
    flow.answer(HANDSHAKE[:-2] + b"X-Long: a\r\n b\r\n\r\n")
    head = flow.client.value().partition(b"\r\n\r\n")[0]
    assert statusOf(head) == b"HTTP/1.1 101 Switching Protocols"
    assert b"X-Long: a b" in head.split(b"\r\n")


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


def test_failureKnownAtOnceIsOneAnswer() -> None:
    """
    A failure known before the handshake was even sent (the connect
    refused at once) is answered once, with a whole response, and the
    connection closed (frames may follow the head).
    """
    flow = Flow("fail", netError.ConnectionRefusedError())
    flow.send(UPGRADE_REQUEST)
    raw = flow.client.value()
    assert statusOf(raw) == b"HTTP/1.1 502 Bad Gateway"
    assert raw.count(b"HTTP/1.1 ") == 1 and raw.endswith(b"502 Bad Gateway\n")
    assert flow.client.disconnecting
    assert flow.logged == [(502, len(b"502 Bad Gateway\n"), b"/chat?x=1")]


def test_unwritableHandshakeIs400WithoutDialling() -> None:
    """
    A target or field that cannot be written on an HTTP/1.1 request line
    (which the parser and the target normalisation never let through: a
    stage's rewrite could) is refused with 400, no backend dialled.
    """

    class BadTarget:
        def handle(self, call: Any) -> None:
            call.client.tunnel(call, pool, Fields([(b"host", b"a")]), b"/a b", None)

    from edgeproxy.pipeline.stages import RoutePipeline

    endpoint = MemoryEndpoint()
    pool = MemoryPool(Upstream(name="chat", servers=(Server("127.0.0.1", 8080),)), endpoint=endpoint)
    client = ProxyClient(pool=pool, routes=(CHAT,))
    client.runtime.pipelines["chat"] = RoutePipeline((("forward", BadTarget()),), 30.0)
    client.send(UPGRADE_REQUEST)
    assert statusOf(client.wire()) == b"HTTP/1.1 400 Bad Request"
    assert client.transport.disconnecting
    assert endpoint.protocol is None


def test_internalErrorAbortsBoth(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A bug while switching (here: the connection's takeOver raising) aborts
    both connections instead of leaving the client hanging with its
    timeouts off.
    """

    def broken(self: Any, call: Any, head: bytes, protocol: Any) -> bytes:
        raise AttributeError("takeOver")

    monkeypatch.setattr(HTTP1Connection, "takeOver", broken)
    flow = Flow()
    flow.open()
    flow.answer(HANDSHAKE)
    assert flow.client.disconnected and flow.backend.disconnected


def test_hashBalancedHandshakeGoesWhereTheUsersRequestsGo() -> None:
    """
    With C{balance = hash}, a WebSocket handshake is placed with the same
    key as the user's ordinary requests (the pool's pickServer gets the key
    the pool's send gets), so sticky sessions hold for WebSockets too; the
    server it picks is the one dialled.
    """
    servers = tuple(Server(f"10.0.0.{n}", 8080) for n in range(1, 6))
    upstream = Upstream(name="chat", servers=servers, balance="hash", hash_key="cookie:user")
    dialled: list[Server] = []

    class HashingPool(MemoryPool):
        def pickServer(self, hashKey: bytes | None = None) -> Server:
            self.picked.append(hashKey)
            return servers[hash(hashKey) % len(servers)]

        def endpointFor(self, server: Server) -> Any:
            dialled.append(server)
            return MemoryEndpoint()

    pool = HashingPool(upstream)
    for user in [b"alice", b"bob", b"carol"]:
        cookie = b"Cookie: theme=dark; user=" + user + b"\r\n"
        ProxyClient(pool=pool, routes=(CHAT,)).send(b"GET /page HTTP/1.1\r\nHost: app.example\r\n" + cookie + b"\r\n")
        ProxyClient(pool=pool, routes=(CHAT,)).send(UPGRADE_REQUEST[:-2] + cookie + b"\r\n")
        assert pool.sent[-1].hashKey == pool.picked[-1] == user
        assert dialled[-1] == servers[hash(user) % len(servers)]
    assert len(pool.picked) == 3
