"""
Tests for L{edgeproxy.upstream.client} and the modules of one backend
connection (L{edgeproxy.upstream.protocol}, L{edgeproxy.upstream.response},
L{edgeproxy.upstream.sending}): the lean HTTP/1.1 backend client, over
in-memory connections (StringTransport) and a deterministic clock, driven
through C{send} with a recording receiver as the pool drives it.  What is
asserted is what a backend sees on the wire and what the proxy gets back
(interim responses, responses, bodies, failures, connection reuse).

The sending tests also run over real TCP sockets (L{tests.wire}), with the
fast paths (a request head straight to the socket) and without.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from edgeproxy.config.model import Server
from edgeproxy.h1 import Fields, LocalProtocolError, RemoteProtocolError
from edgeproxy.upstream.backend import Backend
from edgeproxy.upstream.client import SURPLUS_LINGER, UpstreamClient
from edgeproxy.upstream.failures import attemptOutcome
from edgeproxy.upstream.protocol import EXPECT_TIMEOUT, RequestNotSent
from edgeproxy.upstream.retry import Attempt
from tests.fastpaths import SHOW_DEPRECATIONS, using
from tests.wire import SocketWire

pytestmark = SHOW_DEPRECATIONS


class CountingTransport(StringTransport):
    """A StringTransport that counts its writes."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects every factory to a fresh transport, or fails."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self.pending: Deferred[Any] | None = None
        self.hold = False
        self.connections: list[tuple[Any, CountingTransport]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.failure is not None:
            return fail(self.failure)
        protocol = factory.buildProtocol(None)
        transport = CountingTransport()
        if self.hold:
            self.pending = Deferred()
            self.pending.addCallback(lambda _: (protocol.makeConnection(transport), protocol)[1])
            self.connections.append((protocol, transport))
            return self.pending
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


@implementer(IStreamClientEndpoint)
class SocketEndpoint:
    """Connects every factory over a TCP socket on 127.0.0.1 (L{SocketWire})."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.connections: list[tuple[Any, Any]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        # tcp.Server stands for the tcp.Client of a backend connection:
        # the same transport code writes for both.
        wire = SocketWire(factory, self.reactor, transportClass=tcp.Server)
        self.connections.append((wire.protocol, wire))
        return succeed(wire.protocol)

    def close(self) -> None:
        for _, wire in self.connections:
            wire.close()


class Endpoints:
    """The pool's side: one endpoint for every backend, and who asked."""

    def __init__(self) -> None:
        self.endpoint = MemoryEndpoint()
        self.asked: list[Backend] = []

    def endpointFor(self, backend: Backend) -> MemoryEndpoint:
        self.asked.append(backend)
        return self.endpoint


class Receiver:
    """Records what a request's receiver hears, in order."""

    def __init__(self) -> None:
        self.interim: list[tuple[int, bytes, Fields]] = []
        self.outcomes: list[Any] = []
        self.handle: Any = None

    def upstreamInterim(self, status: int, reason: bytes, fields: Fields) -> None:
        assert not self.outcomes, "interim response after the outcome"
        self.interim.append((status, reason, fields))

    def upstreamResponded(self, response: Any) -> None:
        self.outcomes.append(response)

    def upstreamFailed(self, failure: Failure) -> None:
        self.outcomes.append(failure)

    @property
    def called(self) -> bool:
        return bool(self.outcomes)

    def cancel(self) -> None:
        self.handle.abandon(self)


class Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason


class Producer:
    """A body producer the test drives."""

    def __init__(self, length: Any) -> None:
        self.length = length
        self.consumer: Any = None
        self.done: Deferred[None] = Deferred()
        self.stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        return self.done

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


BACKEND = Backend(Server("10.0.0.1", 8080), "10.0.0.1", 8080)
FIELDS = Fields([(b"Host", b"backend.test"), (b"X-A", b"1"), (b"X-A", b"2")])


WIRES = ["memory", "tcp-fast", "tcp-public"]
"""How the backend connections of a L{Harness} carry bytes."""


@pytest.fixture(params=WIRES)
def wire(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each of L{WIRES}, with the process's fast paths as it says."""
    if request.param == "memory":
        yield request.param
        return
    with using(request.param == "tcp-fast"):
        try:
            yield request.param
        finally:
            SocketWire.closeAll()


class Harness:
    def __init__(self, keepalive: int = 2, timeout: float = 60, wire: str = "memory") -> None:
        self.reactor = MemoryReactorClock()
        self.endpoints = Endpoints()
        if wire != "memory":
            self.endpoints.endpoint = SocketEndpoint(self.reactor)  # type: ignore[assignment]
        self.client = UpstreamClient(
            self.reactor,
            self.endpoints,
            maxPersistentPerHost=keepalive,
            cachedConnectionTimeout=timeout,
        )

    def request(
        self,
        method: bytes = b"GET",
        target: bytes = b"/p?q=1",
        body: Any = None,
        fields: Fields = FIELDS,
        backend: Backend = BACKEND,
    ) -> Receiver:
        receiver = Receiver()
        receiver.handle = self.client.send(backend, method, target, fields, body, receiver)
        return receiver

    @property
    def connections(self) -> list[tuple[Any, CountingTransport]]:
        return self.endpoints.endpoint.connections

    def respond(self, data: bytes, index: int = -1) -> None:
        protocol, transport = self.connections[index]
        if isinstance(transport, SocketWire):
            transport.send(data)
            return
        protocol.dataReceived(data)

    def wire(self, index: int = -1) -> bytes:
        transport = self.connections[index][1]
        if isinstance(transport, SocketWire):
            return transport.received()
        return transport.value()


def result(receiver: Receiver) -> Any:
    assert receiver.outcomes, "no outcome yet"
    [outcome] = receiver.outcomes
    return outcome


def refusal(receiver: Receiver) -> RemoteProtocolError:
    """The h1 refusal a request failed with (inside a ResponseFailed)."""
    failure = result(receiver)
    assert isinstance(failure, Failure) and failure.check(ResponseFailed), failure
    [reason] = failure.value.reasons
    assert reason.check(RemoteProtocolError), reason
    return reason.value


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: s\r\n\r\nhello"


def test_requestHeadOnTheWireInOneWrite() -> None:
    h = Harness()
    receiver = h.request()
    assert h.wire() == (
        b"GET /p?q=1 HTTP/1.1\r\nHost: backend.test\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    )
    assert h.connections[0][1].writes == 1
    assert not receiver.called
    h.respond(OK)
    response = result(receiver)
    assert (response.status, response.reason, response.length) == (200, b"OK", 5)
    assert response.backend == "10.0.0.1:8080"
    assert list(response.fields.pairs()) == [(b"server", b"s")]
    # Framing is the length, not a field.
    assert b"content-length" not in response.fields
    body = Body()
    response.deliverBody(body)
    assert body.data == b"hello"
    assert body.reason is not None and body.reason.check(ResponseDone)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "public"])
def test_requestHeadSentWithoutAReactorTurn(fast: bool) -> None:
    """
    With the fast paths, a request head reaches the backend's socket as it
    is sent, before the reactor's next turn; without them it waits for
    that turn (Twisted's own write), and arrives the same.
    """
    with using(fast):
        h = Harness(wire="tcp-fast" if fast else "tcp-public")
        h.request()
        [(_, wire)] = h.connections
        immediately = wire.peek()
        head = h.wire()
        wire.close()
    assert head == b"GET /p?q=1 HTTP/1.1\r\nHost: backend.test\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    assert immediately == (head if fast else b"")


def test_connectionReusedAndEndpointAskedOnce(wire: str) -> None:
    h = Harness(wire=wire)
    for _ in range(3):
        receiver = h.request()
        h.respond(OK)
        result(receiver).deliverBody(Body())
    assert len(h.connections) == 1
    assert h.endpoints.asked == [BACKEND]
    assert h.wire().count(b"GET /p?q=1 HTTP/1.1") == 3


def test_connectionsAreKeptPerBackendObject() -> None:
    # Two backends with one address (two names resolving to it) have
    # connections of their own: their TLS names may differ.
    h = Harness()
    twin = Backend(Server("b.example", 8080), "10.0.0.1", 8080)
    for backend in (BACKEND, twin, BACKEND, twin):
        receiver = h.request(backend=backend)
        h.respond(OK, 0 if backend is BACKEND else 1)
        result(receiver).deliverBody(Body())
    assert len(h.connections) == 2
    assert h.endpoints.asked == [BACKEND, twin]


def test_responseInPiecesAndBareLF() -> None:
    h = Harness()
    receiver = h.request()
    for piece in (b"HTTP/1.1 200 OK\n", b"Content-Length: 3\n", b"X: y\n", b"\nab", b"c"):
        h.respond(piece)
    response = result(receiver)
    body = Body()
    response.deliverBody(body)
    assert body.data == b"abc" and body.reason.check(ResponseDone)
    assert response.fields.getAll(b"x") == [b"y"]


def test_chunkedResponse(wire: str) -> None:
    h = Harness(wire=wire)
    receiver = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n")
    response = result(receiver)
    assert response.length is None
    assert b"transfer-encoding" not in response.fields
    body = Body()
    response.deliverBody(body)
    h.respond(b"0\r\nTrailer: x\r\n\r\n")
    assert body.data == b"abcde" and body.reason.check(ResponseDone)
    # Reused afterwards.
    h.request()
    assert len(h.connections) == 1


def test_badChunkedBodyFailsTheBodyAndClosesTheConnection() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    body = Body()
    result(receiver).deliverBody(body)
    h.respond(b"zz\r\n")
    assert body.reason.check(ResponseFailed)
    assert body.reason.value.reasons[0].check(RemoteProtocolError)
    assert h.connections[0][1].disconnecting


def test_bodyUntilCloseIsPotentialDataLossAndNotReused() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\n\r\nsome")
    response = result(receiver)
    assert response.length is None
    body = Body()
    response.deliverBody(body)
    h.respond(b" more")
    protocol, transport = h.connections[0]
    protocol.connectionLost(Failure(ConnectionDone()))
    assert body.data == b"some more"
    assert body.reason.check(PotentialDataLoss)
    h.request()
    assert len(h.connections) == 2


@pytest.mark.parametrize(
    "head, length",
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", None),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", 10),
    ],
)
def test_noBodyCodes(head: bytes, length: int | None) -> None:
    h = Harness()
    receiver = h.request()
    h.respond(head)
    response = result(receiver)
    # The length the full response would have, with no body read.
    assert response.length == length
    body = Body()
    response.deliverBody(body)
    assert body.data == b"" and body.reason.check(ResponseDone)
    h.request()
    assert len(h.connections) == 1


def test_headResponseKeepsItsDeclaredLength() -> None:
    h = Harness()
    receiver = h.request(method=b"HEAD")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    response = result(receiver)
    assert response.length == 100
    body = Body()
    response.deliverBody(body)
    assert body.data == b"" and body.reason.check(ResponseDone)
    h.request()
    assert len(h.connections) == 1


def test_interimResponsesArePassedOn() -> None:
    # RFC 9110 15.2: a proxy forwards the 1xx it gets (but a 101 nobody
    # asked for, which is ignored).
    h = Harness()
    receiver = h.request()
    h.respond(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n"
    )
    assert [(s, r) for s, r, _ in receiver.interim] == [(100, b"Continue")]
    assert not receiver.called
    h.respond(b"Link: </a.js>; rel=preload\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n" + OK)
    assert [(s, r) for s, r, _ in receiver.interim] == [
        (100, b"Continue"), (103, b"Early Hints"), (102, b"Processing"),
    ]
    hints = receiver.interim[1][2]
    assert hints.getAll(b"link") == [b"</s.css>; rel=preload", b"</a.js>; rel=preload"]
    response = result(receiver)
    assert response.status == 200 and b"link" not in response.fields
    body = Body()
    response.deliverBody(body)
    assert body.data == b"hello"
    h.request()
    assert len(h.connections) == 1


def test_interimReceiverMayCancel() -> None:
    h = Harness()

    class Leaving(Receiver):
        def upstreamInterim(self, status: int, reason: bytes, fields: Fields) -> None:
            super().upstreamInterim(status, reason, fields)
            self.cancel()

    receiver = Leaving()
    receiver.handle = h.client.send(BACKEND, b"GET", b"/", FIELDS, None, receiver)
    h.respond(b"HTTP/1.1 103 Early Hints\r\n\r\n" + OK)
    assert len(receiver.interim) == 1
    failure = result(receiver)
    assert failure.check(ResponseFailed)
    assert any(r.check(CancelledError) for r in failure.value.reasons)
    assert h.connections[0][1].disconnecting or h.connections[0][1].disconnected


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_notReusedWhenTheBackendSaysSo(head: bytes) -> None:
    h = Harness()
    receiver = h.request()
    h.respond(head)
    result(receiver).deliverBody(Body())
    assert h.connections[0][1].disconnecting
    h.request()
    assert len(h.connections) == 2


def test_http10KeepAliveReused() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    result(receiver).deliverBody(Body())
    h.request()
    assert len(h.connections) == 1


def test_bytesAfterTheResponseMeanNoReuse() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(OK + b"HTTP/1.1 200 OK\r\n")
    result(receiver).deliverBody(Body())
    assert h.connections[0][1].disconnecting
    h.request()
    assert len(h.connections) == 2


def test_unsolicitedBytesOnAnIdleConnectionCloseIt() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(OK)
    result(receiver).deliverBody(Body())
    h.respond(b"garbage")
    assert h.connections[0][1].disconnecting


@pytest.mark.parametrize(
    "head",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-CR: c\rd\r\n\r\n",
    ],
)
def test_unparseableHeadsAreRefused(head: bytes) -> None:
    # The head is read by edgeproxy.h1 with its one policy for backends:
    # what it refuses fails the request (a 502 for the client).
    h = Harness()
    receiver = h.request()
    h.respond(head)
    refusal(receiver)
    assert h.connections[0][1].disconnecting


def test_headTooLong() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70000)
    assert "too long" in str(refusal(receiver))


def test_repeatedEqualContentLengthAccepted() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok")
    response = result(receiver)
    assert response.length == 2
    body = Body()
    response.deliverBody(body)
    assert body.data == b"ok"


def test_lostBeforeAnyResponse() -> None:
    h = Harness()
    receiver = h.request()
    h.connections[0][0].connectionLost(Failure(ConnectionDone()))
    assert result(receiver).check(ResponseNeverReceived)


def test_lostAfterPartOfTheHead() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\n")
    h.connections[0][0].connectionLost(Failure(ConnectionDone()))
    failure = result(receiver)
    assert failure.check(ResponseFailed) and not failure.check(ResponseNeverReceived)


def test_lostAfterAnInterimResponseIsAStartedResponse() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(b"HTTP/1.1 103 Early Hints\r\n\r\n")
    h.connections[0][0].connectionLost(Failure(ConnectionDone()))
    failure = result(receiver)
    assert failure.check(ResponseFailed) and not failure.check(ResponseNeverReceived)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ],
)
def test_lostMidBody(head: bytes) -> None:
    h = Harness()
    receiver = h.request()
    h.respond(head)
    body = Body()
    result(receiver).deliverBody(body)
    h.connections[0][0].connectionLost(Failure(ConnectionDone()))
    assert body.data == b"abc"
    assert body.reason.check(ResponseFailed)
    h.request()
    assert len(h.connections) == 2


def test_bodyBufferedUntilDeliverBodyAndReadingPaused() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    response = result(receiver)
    transport = h.connections[0][1]
    assert transport.producerState == "paused"
    body = Body()
    response.deliverBody(body)
    assert transport.producerState == "producing"
    h.respond(b"def")
    assert body.data == b"abcdef" and body.reason.check(ResponseDone)
    with pytest.raises(RuntimeError):
        response.deliverBody(Body())


def recordFlowControl(transport: StringTransport) -> list[str]:
    """Every pause and resume asked of C{transport}, in order."""
    calls: list[str] = []
    pause, resume = transport.pauseProducing, transport.resumeProducing

    def pauseProducing() -> None:
        calls.append("pause")
        pause()

    def resumeProducing() -> None:
        calls.append("resume")
        resume()

    transport.pauseProducing = pauseProducing  # type: ignore[method-assign]
    transport.resumeProducing = resumeProducing  # type: ignore[method-assign]
    return calls


def test_bodyCompleteWithItsHeadNeverPausesTheBackend() -> None:
    # Head and whole body in one read (most small responses): reading is
    # never paused and resumed around it (two epoll_ctl calls per response
    # for nothing), the body is still delivered, and the connection is
    # back in the pool for the next request.
    h = Harness()
    receiver = h.request()
    calls = recordFlowControl(h.connections[0][1])
    h.respond(OK)
    response = result(receiver)
    assert calls == []
    body = Body()
    response.deliverBody(body)
    assert body.data == b"hello" and body.reason.check(ResponseDone)
    assert calls == []
    h.request()
    assert len(h.connections) == 1


def test_chunkedBodyCompleteWithItsHeadNeverPausesTheBackend() -> None:
    h = Harness()
    receiver = h.request()
    calls = recordFlowControl(h.connections[0][1])
    h.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    body = Body()
    result(receiver).deliverBody(body)
    assert body.data == b"abc" and body.reason.check(ResponseDone)
    assert calls == []


def test_bodyIncompleteWithItsHeadPausesUntilDelivered() -> None:
    h = Harness()
    receiver = h.request()
    calls = recordFlowControl(h.connections[0][1])
    h.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert calls == ["pause"]
    body = Body()
    result(receiver).deliverBody(body)
    assert calls == ["pause", "resume"]
    h.respond(b"0\r\n\r\n")
    assert body.data == b"abc" and body.reason.check(ResponseDone)


def test_bodyTransportPausesResumesAndStops() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")

    class Pausing(Body):
        def connectionMade(self) -> None:
            self.transport.pauseProducing()

    body = Pausing()
    result(receiver).deliverBody(body)
    transport = h.connections[0][1]
    assert transport.producerState == "paused"
    body.transport.resumeProducing()
    assert transport.producerState == "producing"
    body.transport.stopProducing()
    assert transport.disconnecting
    h.connections[0][0].connectionLost(Failure(ConnectionDone()))
    assert body.reason.check(ResponseFailed)


def test_bodyTransportInertAfterTheResponse() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(OK)
    body = Body()
    result(receiver).deliverBody(body)
    body.transport.stopProducing()
    body.transport.pauseProducing()
    transport = h.connections[0][1]
    assert not transport.disconnecting
    assert transport.producerState == "producing"


def test_contentLengthBody(wire: str) -> None:
    h = Harness(wire=wire)
    producer = Producer(5)
    receiver = h.request(method=b"POST", body=producer)
    assert b"Content-Length: 5\r\n" in h.wire()
    producer.consumer.write(b"hel")
    producer.consumer.write(b"lo")
    producer.done.callback(None)
    assert h.wire().endswith(b"\r\n\r\nhello")
    h.respond(OK)
    assert result(receiver).status == 200


def test_chunkedRequestBody(wire: str) -> None:
    h = Harness(wire=wire)
    producer = Producer(UNKNOWN_LENGTH)
    h.request(method=b"POST", body=producer)
    assert b"Transfer-Encoding: chunked\r\n" in h.wire()
    producer.consumer.write(b"abc")
    producer.done.callback(None)
    assert h.wire().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")


def test_framingFieldsOfTheCallerAreNotSent(wire: str) -> None:
    # The body frames the request: stray framing fields never reach the
    # wire (a second, disagreeing framing is how requests are smuggled).
    h = Harness(wire=wire)
    fields = FIELDS.withField(b"content-length", b"99").withField(b"transfer-encoding", b"gzip")
    producer = Producer(3)
    h.request(method=b"PUT", body=producer, fields=fields)
    head = h.wire()
    assert head.count(b"Content-Length") == 1 and b"Content-Length: 3\r\n" in head
    assert b"Transfer-Encoding" not in head and b"99" not in head


def test_emptyPostSaysContentLengthZero(wire: str) -> None:
    h = Harness(wire=wire)
    h.request(method=b"POST")
    assert b"Content-Length: 0\r\n" in h.wire()
    h2 = Harness(wire=wire)
    h2.request(method=b"GET")
    assert b"Content-Length" not in h2.wire()


@pytest.mark.parametrize("written", [b"abc", b"abcdefgh"])
def test_wrongBodyLengthFailsTheRequest(written: bytes) -> None:
    h = Harness()
    producer = Producer(5)
    receiver = h.request(method=b"PUT", body=producer)
    try:
        producer.consumer.write(written)
    except Exception:
        pass
    producer.done.callback(None)
    failure = result(receiver)
    assert failure.check(RequestGenerationFailed)
    assert failure.value.reasons[0].check(LocalProtocolError)
    assert "Content-Length" in failure.value.reasons[0].getErrorMessage()


def test_producerFailureIsRequestGenerationFailed() -> None:
    h = Harness()
    producer = Producer(5)
    receiver = h.request(method=b"PUT", body=producer)
    producer.done.errback(Failure(ValueError("client went away")))
    failure = result(receiver)
    assert failure.check(RequestGenerationFailed)
    assert h.connections[0][1].disconnecting or h.connections[0][1].disconnected


def test_lostWhileSendingTheBody() -> None:
    h = Harness()
    producer = Producer(5)
    receiver = h.request(method=b"PUT", body=producer)
    h.connections[0][0].connectionLost(Failure(ConnectionDone()))
    assert result(receiver).check(RequestTransmissionFailed)
    assert producer.stopped


def test_completeResponseBeforeTheBodyIsSent() -> None:
    h = Harness()
    producer = Producer(100)
    receiver = h.request(method=b"POST", body=producer)
    h.respond(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
    response = result(receiver)
    assert response.status == 413
    body = Body()
    response.deliverBody(body)
    assert body.data == b"no" and body.reason.check(ResponseDone)
    assert producer.stopped
    assert h.connections[0][1].disconnecting


def test_responseHeadHeldWhileTheBodyIsBeingSent() -> None:
    h = Harness()
    producer = Producer(3)
    receiver = h.request(method=b"POST", body=producer)
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert not receiver.called
    producer.consumer.write(b"xyz")
    producer.done.callback(None)
    response = result(receiver)
    body = Body()
    response.deliverBody(body)
    h.respond(b"cd")
    assert body.data == b"abcd" and body.reason.check(ResponseDone)


def test_cancelWhileWaitingAbortsTheConnection() -> None:
    h = Harness()
    receiver = h.request()
    receiver.cancel()
    failure = result(receiver)
    assert any(r.check(CancelledError) for r in failure.value.reasons)
    assert h.connections[0][1].disconnected or h.connections[0][1].disconnecting


def test_cancelWhileConnecting() -> None:
    h = Harness()
    h.endpoints.endpoint.hold = True
    receiver = h.request()
    receiver.cancel()
    assert result(receiver).check(CancelledError)


def test_cancelAfterTheOutcomeChangesNothing() -> None:
    # The connection may serve another request by then.
    h = Harness()
    first = h.request()
    h.respond(OK)
    result(first).deliverBody(Body())
    second = h.request()
    first.cancel()
    assert not second.called
    assert not h.connections[0][1].disconnecting


def test_connectFailurePropagatesUnchanged() -> None:
    h = Harness()
    h.endpoints.endpoint.failure = ConnectionRefusedError("no")
    assert result(h.request()).check(ConnectionRefusedError)


@pytest.mark.parametrize(
    "fields",
    [Fields([(b"host", b"a"), (b"host", b"b")]), Fields([(b"x-a", b"1")])],
)
def test_exactlyOneHostRequired(fields: Fields) -> None:
    h = Harness()
    failure = result(h.request(fields=fields))
    assert failure.check(RequestGenerationFailed)
    assert failure.value.reasons[0].check(LocalProtocolError)


def test_idleConnectionsLimitedAndTimedOut() -> None:
    h = Harness(keepalive=1, timeout=10)
    first, second = h.request(), h.request()
    assert len(h.connections) == 2
    h.respond(OK, 0)
    h.respond(OK, 1)
    result(first).deliverBody(Body())
    result(second).deliverBody(Body())
    # Only one kept idle once the surplus has lingered: the least recently
    # used one is closed.
    assert [t.disconnecting for _, t in h.connections] == [False, False]
    h.reactor.advance(SURPLUS_LINGER)
    assert [t.disconnecting for _, t in h.connections] == [True, False]
    h.reactor.advance(5 - SURPLUS_LINGER)
    receiver = h.request()
    assert len(h.connections) == 2
    h.respond(OK, 1)
    result(receiver).deliverBody(Body())
    # Idle again from t=5: still open at t=14, closed at t=15.
    h.reactor.advance(9)
    assert not h.connections[1][1].disconnecting
    h.reactor.advance(1.5)
    assert h.connections[1][1].disconnecting


def test_surplusOfABurstIsReusedBeforeItIsClosed() -> None:
    """
    More requests in flight than the connections kept idle: the surplus
    freed serves the next burst without a new connection, and only what
    stays unused for L{SURPLUS_LINGER} is closed, the most recently used
    connection kept.
    """
    h = Harness(keepalive=1, timeout=60)

    def burst() -> None:
        receivers = [h.request() for _ in range(3)]
        for index in range(len(h.connections)):
            h.respond(OK, index)
        for receiver in receivers:
            result(receiver).deliverBody(Body())

    burst()
    h.reactor.advance(SURPLUS_LINGER / 2)
    burst()
    assert len(h.connections) == 3
    assert not any(t.disconnecting for _, t in h.connections)
    h.reactor.advance(SURPLUS_LINGER / 2)
    # The second burst freed them again: their linger starts over.
    assert not any(t.disconnecting for _, t in h.connections)
    h.reactor.advance(SURPLUS_LINGER / 2)
    assert sorted(t.disconnecting for _, t in h.connections) == [False, True, True]
    assert not h.reactor.getDelayedCalls() or all(
        call.getTime() >= 60 for call in h.reactor.getDelayedCalls()
    )
    h.request()
    assert len(h.connections) == 3
    assert sum(1 for _, t in h.connections if t.value().count(b"GET ") == 3) == 1


def test_closeCachedConnections() -> None:
    h = Harness()
    receiver = h.request()
    h.respond(OK)
    result(receiver).deliverBody(Body())
    closed = h.client.closeCachedConnections()
    protocol, transport = h.connections[0]
    assert transport.disconnecting
    assert not closed.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert closed.called
    h.request()
    assert len(h.connections) == 2


def test_notPersistentSaysCloseAndKeepsNothing(wire: str) -> None:
    """keepalive = 0: C{Connection: close} on the wire, nothing pooled."""
    h = Harness(keepalive=0, wire=wire)
    h.client.persistent = False
    receiver = h.request()
    assert b"\r\nConnection: close\r\n" in h.wire()
    h.respond(OK)
    result(receiver).deliverBody(Body())
    assert h.connections[0][1].disconnecting
    h.request()
    assert len(h.connections) == 2


def test_zeroIdleConnectionsKeptEvenWhenPersistent() -> None:
    h = Harness(keepalive=0)
    receiver = h.request()
    assert b"Connection: close" not in h.wire()
    h.respond(OK)
    body = Body()
    result(receiver).deliverBody(body)
    assert body.reason.check(ResponseDone)
    assert h.connections[0][1].disconnecting


def test_responseFieldsAreTheMessagesOwn() -> None:
    # What h1 keeps: names in lower case, repeated fields as several
    # values in order, values trimmed, and neither the connection's fields
    # (RFC 9110 7.6.1, those Connection names included) nor the framing.
    h = Harness()
    receiver = h.request()
    h.respond(
        b"HTTP/1.1 200 OK\r\nServer: s\r\netag: \"x\"\r\nX-Two: 1\r\nx-two: 2\r\n"
        b"WWW-authenticate: Basic\r\nSet-Cookie:   a=1  \r\nSet-Cookie: b=2\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    response = result(receiver)
    assert list(response.fields.pairs()) == [
        (b"server", b"s"), (b"etag", b'"x"'), (b"x-two", b"1"), (b"x-two", b"2"),
        (b"www-authenticate", b"Basic"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
    ]
    assert response.length == 0


@pytest.mark.parametrize(
    "head, expected",
    [
        # CRLF only, with an obs-fold continuation (RFC 9112 5.2: replaced
        # by one SP).
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\tmore\r\nX-B: 2\r\n", [(b"x-a", b"1 more"), (b"x-b", b"2")]),
        # Bare LF line ends, mixed with CRLF.
        (b"HTTP/1.1 200 OK\nX-A: 1\r\nX-B:  2 \n", [(b"x-a", b"1"), (b"x-b", b"2")]),
        # Only a status line.
        (b"HTTP/1.0 200 OK\r\n", []),
        # No reason phrase.
        (b"HTTP/1.1 200\r\n", []),
    ],
)
def test_responseHeadLineEnds(head: bytes, expected: list[tuple[bytes, bytes]]) -> None:
    h = Harness()
    receiver = h.request()
    h.respond(head + b"Content-Length: 0\r\n\r\n")
    response = result(receiver)
    assert not isinstance(response, Failure), response
    assert list(response.fields.pairs()) == expected
    assert response.length == 0


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n continued\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nServer\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n: empty name\r\n\r\n",
        b"HTTP/1.1 200 OK\nServer s\n\n",
    ],
)
def test_moreUnparseableFields(head: bytes) -> None:
    h = Harness()
    receiver = h.request()
    h.respond(head)
    refusal(receiver)


# Expect: 100-continue (RFC 9110 10.1.1) ---------------------------------------

EXPECTING = FIELDS.withField(b"expect", b"100-continue")


def expecting(h: Harness, length: Any = 3) -> tuple[Receiver, Producer]:
    producer = Producer(length)
    receiver = h.request(method=b"PUT", body=producer, fields=EXPECTING)
    return receiver, producer


def test_expectHoldsTheBodyUntilTheBackendsContinue(wire: str) -> None:
    h = Harness(wire=wire)
    receiver, producer = expecting(h)
    assert h.wire().endswith(b"Expect: 100-continue\r\n\r\n")
    assert producer.consumer is None  # held
    h.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert [(s, r) for s, r, _ in receiver.interim] == [(100, b"Continue")]
    producer.consumer.write(b"abc")
    producer.done.callback(None)
    assert h.wire().endswith(b"\r\n\r\nabc")
    assert h.reactor.getDelayedCalls() == []  # the wait's timer is gone
    h.respond(OK)
    result(receiver).deliverBody(Body())
    h.request()
    assert len(h.connections) == 1


def test_expectAnsweredWithAFinalStatusSendsNoBody(wire: str) -> None:
    h = Harness(wire=wire)
    receiver, producer = expecting(h)
    head = h.wire()
    h.respond(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 2\r\n\r\nno")
    response = result(receiver)
    assert response.status == 417 and receiver.interim == []
    assert producer.consumer is None and producer.stopped
    assert h.wire() == head
    body = Body()
    response.deliverBody(body)
    assert body.data == b"no" and body.reason.check(ResponseDone)
    # The head announced a body that never came: the connection is done.
    assert h.connections[0][1].disconnecting
    assert h.reactor.getDelayedCalls() == []


def test_expectFinalStatusWithABodyStillToCome() -> None:
    h = Harness()
    receiver, producer = expecting(h)
    h.respond(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nno")
    response = result(receiver)
    body = Body()
    response.deliverBody(body)
    h.respond(b"pe")
    assert body.data == b"nope" and body.reason.check(ResponseDone)
    assert producer.consumer is None
    assert h.connections[0][1].disconnecting


def test_expectWaitIsBounded() -> None:
    h = Harness()
    receiver, producer = expecting(h)
    h.reactor.advance(EXPECT_TIMEOUT - 0.01)
    assert producer.consumer is None
    assert receiver.interim == []
    h.reactor.advance(0.01)
    # RFC 9110 10.1.1: a client need not wait for 100 Continue for ever.
    # The body goes, and the receiver hears a 100 of the proxy's own, so
    # that a client waiting for one sends its body.
    assert producer.consumer is not None
    assert [(s, r) for s, r, _ in receiver.interim] == [(100, b"Continue")]
    producer.consumer.write(b"abc")
    producer.done.callback(None)
    assert h.wire().endswith(b"\r\n\r\nabc")
    # A late 100 is still passed on (the client side sends one 100 at
    # most); the response follows.
    h.respond(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert [s for s, _, _ in receiver.interim] == [100, 100]
    assert result(receiver).status == 200


def test_anyInterimLetsTheBodyGo() -> None:
    h = Harness()
    receiver, producer = expecting(h)
    h.respond(b"HTTP/1.1 102 Processing\r\n\r\n")
    assert producer.consumer is not None
    assert h.reactor.getDelayedCalls() == []


def test_continueAndTheFinalResponseInOneRead(wire: str) -> None:
    # The body goes when the 100 is read; the response read with it is then
    # an early response like any other: held while the body is being sent
    # (or, once complete, handed over and the body abandoned).
    h = Harness(wire=wire)
    receiver, producer = expecting(h)
    h.respond(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
    assert producer.consumer is not None and not receiver.called
    producer.consumer.write(b"abc")
    producer.done.callback(None)
    body = Body()
    result(receiver).deliverBody(body)
    h.respond(b"ok")
    assert body.data == b"okok" and body.reason.check(ResponseDone)
    h2 = Harness(wire=wire)
    receiver, producer = expecting(h2)
    h2.respond(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert result(receiver).status == 200
    assert producer.stopped and h2.connections[0][1].disconnecting


@pytest.mark.parametrize("how", ["lost", "cancel"])
def test_expectEndedWhileWaiting(how: str) -> None:
    h = Harness()
    receiver, producer = expecting(h)
    if how == "lost":
        h.connections[0][0].connectionLost(Failure(ConnectionDone()))
        assert result(receiver).check(ResponseNeverReceived)
    else:
        receiver.cancel()
        failure = result(receiver)
        assert failure.check(ResponseNeverReceived)
        assert any(r.check(CancelledError) for r in failure.value.reasons)
    assert producer.stopped and producer.consumer is None
    assert h.reactor.getDelayedCalls() == []


def test_expectWithoutABodyWaitsForNothing() -> None:
    h = Harness()
    receiver = h.request(fields=EXPECTING)
    assert h.reactor.getDelayedCalls() == []
    h.respond(OK)
    assert result(receiver).status == 200


def test_otherExpectationsAreNotWaitedFor() -> None:
    h = Harness()
    producer = Producer(3)
    h.request(method=b"PUT", body=producer, fields=FIELDS.withField(b"expect", b"x-other"))
    assert producer.consumer is not None


def test_connectionLostBeforeTheRequestIsNotSent() -> None:
    # A new connection the backend closed before the request could be
    # written: nothing reached the backend, which the pool may retry.

    @implementer(IStreamClientEndpoint)
    class Closing:
        def connect(self, factory: Any) -> Deferred[Any]:
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(StringTransport())
            protocol.connectionLost(Failure(ConnectionDone()))
            return succeed(protocol)

    h = Harness()
    h.endpoints.endpointFor = lambda backend: Closing()  # type: ignore[method-assign]
    failure = result(h.request())
    assert failure.check(RequestNotSent)
    assert attemptOutcome(failure, False) == (Attempt.NOT_SENT, "not_sent")
