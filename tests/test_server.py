"""
Tests for L{edgeproxy.http.server} and L{edgeproxy.http.listener}: raw bytes
into an L{HTTP1Connection} built by a real L{ListenerFactory}, whose route
ends in a recording stage; assertions on the bytes the client gets back, on
what reached the stages, and on the connection being closed.

The tests that write responses run on every L{wire}: in memory, and over a
socket as a TCP or TLS listener serves it, with the fast paths
(L{edgeproxy._compat}) and without.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http import PotentialDataLoss

from edgeproxy.config.model import Config, Limits, Listener, ProxySettings, Route, Server, Upstream
from edgeproxy.h1 import Fields
from edgeproxy.http.closing import ABORT_TIMEOUT
from edgeproxy.http.answering import WHOLE_LIMIT
from edgeproxy.http.errorpages import rejection
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.logs import refusals
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.stages import RoutePipeline
from edgeproxy.pipeline.values import BODY_DONE, BytesBody, Response
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime
from tests.certutil import CertificateAuthority
from tests.fastpaths import SHOW_DEPRECATIONS, using
from tests.wireutil import undated
from tests.memorypool import fixedIds
from tests.test_h1 import REJECTED
from tests.wire import SocketWire
from tests.h2util import SendBuffer

pytestmark = SHOW_DEPRECATIONS

H = b"Host: example.com\r\n"

UPSTREAM = Upstream(name="app", servers=(Server("10.0.0.1", 8080),), idle_timeout=30.0)
ROUTE = Route(name="all", hosts=("*",), paths=("/",), upstream="app")


class _Consumer:
    """Collects a request body the echo stage reads."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class Echo:
    """
    The route's only stage: records the request ("head"), reads its whole
    body, records that ("complete"), and answers with the method, target
    and body, as the old recording request did.  With C{hold}, the calls
    wait in C{held} for the test to answer.
    """

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.hold = False
        self.held: list[Call] = []
        self.seen: list[Any] = []

    def handle(self, call: Call) -> None:
        request = call.request
        self.seen.append(request)
        self.events.append(("head", (request.method, request.target, request.version), request.length))
        if self.hold:
            self.held.append(call)
            return
        if call.body is None:
            self._answer(call, b"")
            return
        consumer = _Consumer()
        done = call.body.startProducing(consumer)
        done.addCallback(lambda _: self._answer(call, consumer.data))

    def _answer(self, call: Call, body: bytes) -> None:
        request = call.request
        self.events.append(("complete", request.method, request.target, request.version))
        text = b"%s %s %s" % (request.method, request.target, body)
        call.respond(
            Response(200, b"OK", Fields([(b"content-type", b"text/plain")]), len(text), BytesBody(text))
        )


def makeFactory(limits: Limits, clock: Clock, stage: Any, listener: Listener | None = None) -> ListenerFactory:
    config = Config(
        path="/etc/edge.ini",
        proxy=ProxySettings(),
        tls=None,
        listeners=(),
        upstreams={"app": UPSTREAM},
        routes=(ROUTE,),
    )
    runtime = Runtime(
        config=config,
        router=Router((ROUTE,)),
        pools={},
        pipelines={"all": RoutePipeline((("forward", stage),), 30.0)},
    )
    # Every request's ID is 1111... (fixedIds): refusals' bytes are known.
    object.__setattr__(runtime, "requestIds", fixedIds())
    listener = listener or Listener(name="l", endpoint="tcp:0", tls=False, limits=limits)
    return ListenerFactory(lambda: runtime, listener, clock)


ID_LINE = b"X-Request-ID: " + b"1" * 32
"""The ID field line of every request of L{makeFactory}'s listeners."""


def refusal(status: int) -> bytes:
    """The refusal of a request head (which carries the request's ID)."""
    return undated(rejection(status, None, ID_LINE))


WIRES = ["memory", "tcp-fast", "tcp-public", "tls-fast", "tls-public"]
"""How a L{Connection} reaches its client: a C{StringTransport}, or a socket
as a TCP or TLS listener serves it, with the fast paths or without."""


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, bytes]:
    """A certificate store for C{a.example} (the C{tls-} wires), and its CA."""
    from edgeproxy.config.model import TLSSettings
    from edgeproxy.tls.store import CertificateStore

    directory = tmp_path_factory.mktemp("server-tls")
    ca = CertificateAuthority("server test root")
    ca.issue(["a.example"]).writePEM(directory / "a.pem")
    clock = Clock()
    clock.advance(__import__("time").time())
    store = CertificateStore(TLSSettings(certificates=(str(directory / "a.pem"),), default=None), clock)
    store.load()
    return store, ca.certificatePEM


@pytest.fixture(params=WIRES)
def wire(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each of L{WIRES}, with the process's fast paths as it says."""
    kind = request.param
    if kind.startswith("tls"):
        Connection.certificates = request.getfixturevalue("certificates")
    if kind == "memory":
        yield kind
        return
    with using(kind.endswith("-fast")):
        try:
            yield kind
        finally:
            SocketWire.closeAll()


class Connection:
    certificates: tuple[Any, bytes] | None = None

    def __init__(self, limits: Limits | None = None, wire: str = "memory") -> None:
        self.clock = Clock()
        self.events: list[Any] = []
        self.stage = Echo(self.events)
        self.factory = makeFactory(limits or Limits(), self.clock, self.stage)
        self.wire: SocketWire | None = None
        if wire == "memory":
            self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
            self.transport: Any = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
            self.protocol.makeConnection(self.transport)
            return
        creator = caPEM = None
        if wire.startswith("tls"):
            assert self.certificates is not None
            store, caPEM = self.certificates
            creator = store.serverConnectionCreator((b"http/1.1",))
        self.wire = SocketWire(self.factory, self.clock, tls=creator, caPEM=caPEM)
        self.protocol = self.wire.protocol
        self.transport = self.wire.transport

    def send(self, data: bytes) -> None:
        if self.wire is not None:
            self.wire.send(data)
            return
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        if self.wire is not None:
            return self.wire.received()
        return self.transport.value()

    def closing(self) -> bool:
        """Whether the connection is closed or being closed (or aborted)."""
        if self.wire is None:
            return bool(self.transport.disconnecting)
        self.wire.pump()
        return bool(self.transport.disconnecting or self.wire.tcp.disconnected)

    def kinds(self) -> list[str]:
        return [event[0] for event in self.events]

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


@pytest.mark.parametrize("kind", ["tcp", "tls"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "public"])
def test_completeResponseSentWithoutAReactorTurn(kind: str, fast: bool, certificates: Any) -> None:
    """
    With the fast paths, a complete response reaches the client's socket
    as the request is read, before the reactor's next turn; without them
    it waits for that turn (Twisted's own write path), and arrives the same.
    """
    Connection.certificates = certificates
    with using(fast):
        connection = Connection(wire=f"{kind}-{'fast' if fast else 'public'}")
        assert connection.wire is not None
        before = connection.received()
        immediately = connection.wire.deliver(b"GET /now HTTP/1.1\r\n" + H + b"\r\n")[len(before):]
        response = connection.received()[len(before):]
        connection.wire.close()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b"GET /now ")
    assert immediately == (response if fast else b"")


@pytest.mark.parametrize("raw,status", [(r, s) for _, r, s in REJECTED], ids=[i for i, _, _ in REJECTED])
def test_rejectedBeforeReachingTheStages(raw: bytes, status: int, wire: str) -> None:
    """
    Malformed and ambiguous heads get the exact error response, the
    connection is closed, and no stage ever saw the request (so no backend
    was contacted).
    """
    connection = Connection(wire=wire)
    connection.send(raw)
    assert undated(connection.received()) == refusal(status)
    assert connection.received().startswith(b"HTTP/1.1 %d " % (status,))
    assert connection.kinds() == []
    assert connection.transport.disconnecting


@pytest.mark.parametrize("raw,status", [(r, s) for _, r, s in REJECTED], ids=[i for i, _, _ in REJECTED])
def test_rejectedByteByByte(raw: bytes, status: int) -> None:
    """Splitting the same bytes at every position changes nothing."""
    connection = Connection()
    for i in range(len(raw)):
        connection.send(raw[i : i + 1])
    assert undated(connection.received()) == refusal(status)
    assert connection.kinds() == []
    assert connection.transport.disconnecting


def test_rejectionShape() -> None:
    """
    The one refusal: status line, Connection: close, a short plain body
    with the right length, no Server field.
    """
    response = refusal(431)
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b"Connection: close" in lines
    assert b"Content-Length: %d" % (len(body),) in lines
    assert not any(line.lower().startswith(b"server:") for line in lines)
    assert body == b"Request Header Fields Too Large\n"


def test_garbageRefusedBeforeTheHeadEnds(wire: str) -> None:
    """A request line that cannot be one is refused as soon as it is complete."""
    connection = Connection(wire=wire)
    connection.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\nmore bytes of a TLS hello")
    assert undated(connection.received()) == refusal(400)
    assert connection.transport.disconnecting


def test_lineWithoutColonRejectedEvenIfNameSeenBefore() -> None:
    connection = Connection()
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"X-Seen: 1\r\n\r\n")
    assert connection.kinds() == ["head", "complete"]
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"X-Seen\r\n\r\n")
    assert undated(connection.received()).endswith(refusal(400))
    assert connection.kinds() == ["head", "complete"]


def test_nothingAfterRejectionIsParsed() -> None:
    """A valid request pipelined after a rejected one is never seen."""
    connection = Connection()
    connection.send(
        b"GET / HTTP/1.1\r\n" + H + b"X A: 1\r\n\r\n" + b"GET /second HTTP/1.1\r\n" + H + b"\r\n"
    )
    connection.send(b"GET /third HTTP/1.1\r\n" + H + b"\r\n")
    assert undated(connection.received()) == refusal(400)
    assert connection.kinds() == []


# Body-level errors: the head was fine, so the request reached its stages
# (a proxy has started the upstream request), but its body is refused: the
# body pipe fails (the backend request is aborted), 400, closed.

from tests.test_h1 import BAD_BODIES  # noqa: E402


@pytest.mark.parametrize("body", [b for _, b in BAD_BODIES], ids=[i for i, _ in BAD_BODIES])
def test_badChunkedBody(body: bytes) -> None:
    connection = Connection()
    connection.stage.hold = True
    connection.send(b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    assert connection.kinds() == ["head"]
    [call] = connection.stage.held
    failed: list[Any] = []
    call.body.whenFinished().addErrback(failed.append)
    connection.send(body)
    assert undated(connection.received()) == refusal(400)
    assert connection.transport.disconnecting
    assert len(failed) == 1
    assert call.over
    connection.lose()


def test_contentLengthBody(wire: str) -> None:
    connection = Connection(wire=wire)
    connection.send(b"POST /x?y=1 HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhel")
    assert connection.events == [("head", (b"POST", b"/x?y=1", b"HTTP/1.1"), 5)]
    connection.send(b"lo")
    assert connection.events[1] == ("complete", b"POST", b"/x?y=1", b"HTTP/1.1")
    assert connection.received().startswith(b"HTTP/1.1 200 OK\r\n")
    assert connection.received().endswith(b"\r\n\r\nPOST /x?y=1 hello")
    assert not connection.transport.disconnecting


def test_chunkedBody(wire: str) -> None:
    """A chunked body with a valid extension and a trailer passes; the
    declared length is L{None}."""
    connection = Connection(wire=wire)
    connection.send(
        b"PUT /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\n"
        b"5;name=value;q=\"a \\\" b\"\r\nhello\r\n"
        b"000006\r\n world\r\n"
        b"0\r\nX-Checksum: abc\r\n\r\n"
    )
    assert connection.events[0] == ("head", (b"PUT", b"/c", b"HTTP/1.1"), None)
    assert connection.kinds() == ["head", "complete"]
    assert connection.received().endswith(b"PUT /c hello world")
    assert not connection.transport.disconnecting


def test_chunkedBodyByteByByte() -> None:
    connection = Connection()
    raw = b"PUT /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\na\r\n0123456789\r\n0\r\n\r\n"
    for i in range(len(raw)):
        connection.send(raw[i : i + 1])
    assert connection.received().endswith(b"PUT /c hello0123456789")


def test_pipelinedAnsweredInOrder(wire: str) -> None:
    connection = Connection(wire=wire)
    connection.send(
        b"GET /one HTTP/1.1\r\n" + H + b"\r\n"
        b"POST /two HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"
        b"GET /three HTTP/1.1\r\n" + H + b"\r\n"
    )
    received = connection.received()
    one, two, three = (received.index(b"GET /one "), received.index(b"POST /two abc"), received.index(b"GET /three "))
    assert one < two < three
    assert received.count(b"HTTP/1.1 200 OK") == 3
    assert connection.kinds() == ["head", "complete"] * 3
    assert not connection.transport.disconnecting


def test_pipelinedWaitsForTheAnswerBefore(wire: str) -> None:
    """
    A request pipelined behind one still being answered is not looked at
    until that answer is complete; then it is, without another byte.
    """
    connection = Connection(wire=wire)
    connection.stage.hold = True
    connection.send(b"GET /one HTTP/1.1\r\n" + H + b"\r\nGET /two HTTP/1.1\r\n" + H + b"\r\n")
    assert [request.target for request in connection.stage.seen] == [b"/one"]
    connection.stage.hold = False
    connection.stage._answer(connection.stage.held.pop(), b"")
    assert [request.target for request in connection.stage.seen] == [b"/one", b"/two"]
    received = connection.received()
    assert received.index(b"GET /one ") < received.index(b"GET /two ")


def test_pipelinedBadRequestAfterGoodOne(wire: str) -> None:
    """The good request is answered first, then the 400, then the close."""
    connection = Connection(wire=wire)
    connection.send(b"GET /one HTTP/1.1\r\n" + H + b"\r\n" + b"GET /two HTTP/1.1\r\n" + H + H + b"\r\n")
    received = connection.received()
    assert undated(received).endswith(refusal(400))
    assert b"GET /one " in undated(received)[: -len(refusal(400))]
    assert connection.kinds() == ["head", "complete"]
    assert connection.transport.disconnecting


def test_pipelineBoundedWhileAnswering() -> None:
    """
    Bytes pipelined behind a request being answered are held up to the
    head limit; past it the connection stops reading until the answer is
    out.
    """
    connection = Connection(Limits(max_header_size=1024))
    connection.stage.hold = True
    connection.send(b"GET /one HTTP/1.1\r\n" + H + b"\r\n")
    connection.send(b"GET /two HTTP/1.1\r\n" + H + b"X-Pad: " + b"p" * 2000)
    assert connection.transport.producerState == "paused"
    connection.stage.hold = False
    connection.stage._answer(connection.stage.held.pop(), b"")
    assert connection.transport.producerState == "producing"


def test_absoluteFormMatchingHost() -> None:
    """An absolute-form target whose authority equals Host (case aside)
    reaches the stages as origin-form."""
    connection = Connection()
    connection.send(b"GET HTTP://Example.COM?q=1 HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.events[0] == ("head", (b"GET", b"/?q=1", b"HTTP/1.1"), 0)
    connection2 = Connection()
    connection2.send(b"GET http://example.com/a/b HTTP/1.0\r\n\r\n")
    assert connection2.events[0] == ("head", (b"GET", b"/a/b", b"HTTP/1.0"), 0)
    assert connection2.received().endswith(b"GET /a/b ")


def test_oneLeadingEmptyLineTolerated() -> None:
    connection = Connection()
    connection.send(b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.kinds() == ["head", "complete"]


def test_headerTooLarge() -> None:
    connection = Connection(Limits(max_header_size=1024))
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 90) for i in range(12)))
    assert undated(connection.received()) == refusal(431)
    assert connection.kinds() == []
    assert connection.transport.disconnecting


def test_singleHugeLineWithoutEnd() -> None:
    """A header line that never ends is refused once it cannot fit, without
    waiting for (or buffering past) its end."""
    connection = Connection(Limits(max_header_size=1024))
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"X-Big: ")
    for _ in range(20):
        connection.send(b"v" * 100)
    assert undated(connection.received()) == refusal(431)
    assert connection.kinds() == []


def test_requestLineTooLong() -> None:
    connection = Connection(Limits(max_header_size=1024))
    connection.send(b"GET /" + b"a" * 2000)
    assert undated(connection.received()) == refusal(414)
    assert connection.transport.disconnecting


def test_headExactlyAtLimitPasses() -> None:
    head = b"GET / HTTP/1.1\r\n" + H + b"X-Pad: "
    padding = 200 - len(head) - 4
    raw = head + b"p" * padding + b"\r\n\r\n"
    assert len(raw) == 200
    connection = Connection(Limits(max_header_size=200))
    connection.send(raw)
    assert connection.kinds() == ["head", "complete"]
    connection = Connection(Limits(max_header_size=199))
    connection.send(raw)
    assert undated(connection.received()) == refusal(431)


def test_tooManyHeaders() -> None:
    limits = Limits(max_headers=10)
    connection = Connection(limits)
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % (i,) for i in range(9)) + b"\r\n")
    assert connection.kinds() == ["head", "complete"]
    connection = Connection(limits)
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % (i,) for i in range(10)) + b"\r\n")
    assert undated(connection.received()) == refusal(431)
    assert connection.kinds() == []


def test_limitsResetBetweenRequests() -> None:
    """The size and count budgets are per request head, not per connection."""
    connection = Connection(Limits(max_header_size=200, max_headers=3))
    one = b"GET / HTTP/1.1\r\n" + H + b"A: 1\r\nB: 2\r\n\r\n"
    connection.send(one * 5)
    assert connection.kinds() == ["head", "complete"] * 5


def test_slowlorisGets408() -> None:
    """
    A client trickling one header byte every two seconds is cut at
    client_header_timeout even though every byte resets the idle timeout.
    """
    connection = Connection(Limits(client_header_timeout=10, client_idle_timeout=60))
    trickle = b"GET / HTTP/1.1\r\n" + H + b"X-Slow: " + b"a" * 100
    for i in range(4):
        connection.send(trickle[i : i + 1])
        connection.clock.advance(2)
    assert connection.received() == b""
    assert not connection.transport.disconnecting
    for i in range(4, 8):
        connection.send(trickle[i : i + 1])
        connection.clock.advance(2)
    assert undated(connection.received()) == refusal(408)
    assert connection.transport.disconnecting
    assert connection.kinds() == []


def test_slowlorisAbortedWhenCloseStalls() -> None:
    """A client that stops reading cannot keep the connection open after the
    rejection: it is aborted ABORT_TIMEOUT seconds later."""
    aborted: list[bool] = []
    connection = Connection(Limits(client_header_timeout=5))
    connection.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    connection.send(b"GET")
    connection.clock.advance(5)
    assert connection.transport.disconnecting
    assert not aborted
    connection.clock.advance(ABORT_TIMEOUT)
    assert aborted == [True]


def test_silentConnectionGets408() -> None:
    connection = Connection(Limits(client_header_timeout=3))
    connection.clock.advance(3)
    # No byte, no request: no request ID either (see the access log's tests).
    assert undated(connection.received()) == undated(rejection(408))
    assert connection.transport.disconnecting


def test_headerDeadlineDoesNotCoverTheBody() -> None:
    """Once the head is complete the header deadline is gone; a slow body is
    the idle timeout's business."""
    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=60))
    connection.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\n")
    for i in range(10):
        connection.clock.advance(2)
        connection.send(b"x")
    assert connection.kinds() == ["head", "complete"]
    assert not connection.transport.disconnecting


def test_stalledBodyCutAtTheIdleTimeout() -> None:
    """A body that stops arriving is cut at client_idle_timeout, and the
    request's stage learns it is over."""
    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=20))
    connection.stage.hold = True
    connection.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nabc")
    [call] = connection.stage.held
    connection.clock.advance(19)
    assert not connection.transport.disconnecting
    connection.clock.advance(1)
    assert call.over


def test_keepAliveIdleThenSlowHead() -> None:
    """Between requests the idle timeout applies (silent close); the header
    deadline restarts at the first byte of the next request."""
    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=20))
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    first = connection.received()
    connection.clock.advance(15)
    assert not connection.transport.disconnecting
    connection.send(b"G")
    connection.clock.advance(2)
    connection.send(b"E")
    assert not connection.transport.disconnecting
    connection.clock.advance(1)
    assert undated(connection.received()) == undated(first) + refusal(408)
    assert connection.transport.disconnecting


def test_nextHeadStartedBeforeThePreviousDeadlineGetsAFullDeadline() -> None:
    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=20))
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    first = connection.received()
    connection.clock.advance(1)
    connection.send(b"GET / HT")
    connection.clock.advance(2.5)  # past the first head's deadline (t=3)
    assert not connection.transport.disconnecting
    assert connection.received() == first
    connection.clock.advance(0.4)  # t=3.9: still within 3 s of t=1
    assert not connection.transport.disconnecting
    connection.clock.advance(0.2)  # t=4.1
    assert undated(connection.received()) == undated(first) + refusal(408)
    assert connection.transport.disconnecting


def test_keepAliveIdleTimeout(wire: str) -> None:
    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=20), wire=wire)
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    first = connection.received()
    connection.clock.advance(20)
    assert connection.transport.disconnecting
    assert connection.received() == first


def test_connectionClose(wire: str) -> None:
    """Connection: close anywhere in any Connection field ends the connection
    after the response."""
    connection = Connection(wire=wire)
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"Connection: foo\r\nConnection: bar,close\r\n\r\n")
    assert b"Connection: close" in connection.received()
    assert connection.transport.disconnecting


def test_http10ClosesAfterResponse(wire: str) -> None:
    connection = Connection(wire=wire)
    connection.send(b"GET / HTTP/1.0\r\n\r\nGET /ignored HTTP/1.0\r\n\r\n")
    assert connection.kinds() == ["head", "complete"]
    assert connection.received().startswith(b"HTTP/1.0 200 OK\r\n")
    assert connection.transport.disconnecting


def test_noContinueFromTheEdge() -> None:
    """
    The edge does not answer Expect: 100-continue itself (the backend
    does, through interim responses); an interim 100 reaches a client that
    asked for one, not one that did not.
    """
    connection = Connection()
    connection.stage.hold = True
    connection.send(b"PUT / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert connection.received() == b""
    [call] = connection.stage.held
    call.interim(100, b"Continue", Fields())
    assert connection.received() == b"HTTP/1.1 100 Continue\r\n\r\n"
    other = Connection()
    other.stage.hold = True
    other.send(b"PUT / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\n")
    other.stage.held[0].interim(100, b"Continue", Fields())
    assert other.received() == b""


def test_earlyHintsPassedOn(wire: str) -> None:
    """RFC 9110 15.2: 103 (and other 1xx but 101) reach HTTP/1.1 clients, not
    HTTP/1.0 ones, before the final response."""
    connection = Connection(wire=wire)
    connection.stage.hold = True
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    [call] = connection.stage.held
    call.interim(103, b"Early Hints", Fields([(b"link", b"</s.css>; rel=preload")]))
    call.interim(101, b"Switching Protocols", Fields())
    connection.stage._answer(call, b"")
    received = connection.received()
    assert received.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n")
    old = Connection(wire=wire)
    old.stage.hold = True
    old.send(b"GET / HTTP/1.0\r\n\r\n")
    old.stage.held[0].interim(103, b"Early Hints", Fields())
    assert old.received() == b""


def test_earlyAnswerWhileTheBodyArrivesDropsTheRest(wire: str) -> None:
    """
    An answer decided while the body is still arriving is sent at once; the
    rest of the body is read and dropped, never read as a request, and the
    connection serves the request after it.
    """
    connection = Connection(wire=wire)
    connection.stage.hold = True
    smuggled = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
    connection.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\nGET /smug" % len(smuggled))
    [call] = connection.stage.held
    call.respond(Response(403, b"Forbidden", Fields(), 0, None))
    received = connection.received()
    assert received.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"Connection: close" not in received
    connection.stage.hold = False
    connection.send(b"gled HTTP/1.1\r\n" + H + b"\r\n" + b"GET /next HTTP/1.1\r\n" + H + b"\r\n")
    assert [request.target for request in connection.stage.seen] == [b"/", b"/next"]
    assert connection.received().count(b"HTTP/1.1 ") == 2
    assert not connection.transport.disconnecting


def test_declaredBodyOverTheLimitNeverReachesTheStages() -> None:
    connection = Connection(Limits(max_body_size=10))
    connection.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 11\r\n\r\n" + b"GET /x HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.received().startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"Connection: close" in connection.received()
    assert connection.kinds() == []
    assert connection.transport.disconnecting


def test_streamedBodyOverTheLimit() -> None:
    """A chunked body that grows past the limit: the stage's hold is stopped,
    its body pipe fails, the client gets 413 and a close."""
    connection = Connection(Limits(max_body_size=10))
    connection.stage.hold = True
    connection.send(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    [call] = connection.stage.held
    stopped: list[bool] = []
    call.cancelHook = lambda: stopped.append(True)
    failed: list[Any] = []
    call.body.whenFinished().addErrback(failed.append)
    connection.send(b"8\r\n12345678\r\n8\r\n12345678\r\n")
    assert stopped == [True]
    assert len(failed) == 1
    assert connection.received().startswith(b"HTTP/1.1 413 ")
    assert connection.transport.disconnecting


def test_routingErrors(wire: str) -> None:
    """404 for a host no route serves, answered without closing; 400 for a
    target that cannot be normalised."""
    connection = Connection(wire=wire)
    object.__setattr__(connection.factory.currentRuntime(), "router", Router(()))
    connection.send(b"GET /x HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.received().startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert not connection.transport.disconnecting
    other = Connection(wire=wire)
    other.send(b"GET /a%2Fb HTTP/1.1\r\n" + H + b"\r\n")
    assert other.received().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert other.transport.disconnecting


def test_responseFraming(wire: str) -> None:
    """Content-Length when known, chunked when not (HTTP/1.1), the close on
    HTTP/1.0; nothing after the head of HEAD, 204 and 304; Date added."""

    class Streaming:
        def __init__(self) -> None:
            self.protocol: Any = None

        def deliverBody(self, protocol: Any) -> None:
            self.protocol = protocol
            protocol.makeConnection(StringTransport())

    connection = Connection(wire=wire)
    connection.stage.hold = True
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    body = Streaming()
    connection.stage.held.pop().respond(Response(200, b"OK", Fields(), None, body))
    assert b"Transfer-Encoding: chunked\r\n" in connection.received()
    assert b"\r\nDate: " in connection.received()
    body.protocol.dataReceived(b"abc")
    from edgeproxy.pipeline.values import BODY_DONE

    body.protocol.connectionLost(BODY_DONE)
    assert connection.received().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert not connection.transport.disconnecting

    for method, status in ((b"HEAD", 200), (b"GET", 204), (b"GET", 304)):
        connection = Connection(wire=wire)
        connection.stage.hold = True
        connection.send(method + b" / HTTP/1.1\r\n" + H + b"\r\n")
        connection.stage.held.pop().respond(Response(status, b"X", Fields(), 5, BytesBody(b"hello")))
        head, _, rest = connection.received().partition(b"\r\n\r\n")
        assert rest == b""
        assert (b"Content-Length: 5" in head) == (status != 204)


def test_headersAsReceived() -> None:
    """Field values reach the stages with surrounding whitespace trimmed and
    repeated fields in order."""
    connection = Connection()
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"X-A:  1 \r\nx-a:\t2\r\nX-B: a\tb\r\n\r\n")
    [request] = connection.stage.seen
    assert request.fields.getAll(b"x-a") == [b"1", b"2"]
    assert request.fields.get(b"x-b") == b"a\tb"


def test_idleTimeoutSuspendedWhileAnsweringAndRestartedAfter() -> None:
    """The idle timeout does not cut a request that takes longer than it to
    answer; once the response is done it counts again from then."""
    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=20))
    connection.stage.hold = True
    timers = set(connection.clock.getDelayedCalls())
    for answering in (1, 2, 1, 50):
        connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        connection.clock.advance(answering)
        assert not connection.transport.disconnecting
        connection.stage._answer(connection.stage.held.pop(), b"")
        if answering < 3:
            assert set(connection.clock.getDelayedCalls()) <= timers
    connection.clock.advance(19)
    assert not connection.transport.disconnecting
    connection.clock.advance(1)
    assert connection.transport.disconnecting
    assert connection.received().count(b"HTTP/1.1 200 OK") == 4


def test_idleConnectionHasNoInstanceDictionary() -> None:
    """An idle connection is its slots: no dictionary that grows per
    connection."""
    connection = Connection()
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert not hasattr(connection.protocol, "__dict__")


class SiteConnections:
    """Several connections of one listener on one clock."""

    def __init__(self, limits: Limits) -> None:
        self.clock = Clock()
        self.events: list[Any] = []
        self.factory = makeFactory(limits, self.clock, Echo(self.events))
        self.transports: list[StringTransport] = []
        self.protocols: list[Any] = []

    def open(self) -> int:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        self.transports.append(transport)
        return len(self.protocols) - 1

    def closed(self) -> list[int]:
        return [i for i, transport in enumerate(self.transports) if transport.disconnecting]

    def lose(self, index: int) -> None:
        self.protocols[index].connectionLost(Failure(ConnectionDone()))


def test_connectionsOfOneListenerShareTheirTimers() -> None:
    """One timer per timeout however many connections, and each still gets
    its own header deadline."""
    connections = SiteConnections(Limits(client_header_timeout=3, client_idle_timeout=20))
    for index in range(3):
        if index:
            connections.clock.advance(1)
        connections.open()
    assert len(connections.clock.getDelayedCalls()) == 2
    connections.clock.advance(0.5)
    assert connections.closed() == []
    connections.clock.advance(0.5)
    assert connections.closed() == [0]
    assert undated(connections.transports[0].value()) == undated(rejection(408))
    connections.clock.advance(1)
    assert connections.closed() == [0, 1]
    connections.clock.advance(1)
    assert connections.closed() == [0, 1, 2]
    assert all(undated(transport.value()) == undated(rejection(408)) for transport in connections.transports)
    for index in range(3):
        connections.lose(index)
    # The refusals' summary in the process log is the last thing left.
    refusals(connections.clock).flush()
    assert connections.clock.getDelayedCalls() == []


def test_idleTimeoutPerConnectionWithSharedTimer() -> None:
    connections = SiteConnections(Limits(client_header_timeout=30, client_idle_timeout=10))
    request = b"GET / HTTP/1.1\r\n" + H + b"\r\n"
    for index in range(3):
        if index:
            connections.clock.advance(1)
        connections.open()
        connections.protocols[index].dataReceived(request)
    assert all(transport.value().startswith(b"HTTP/1.1 200 ") for transport in connections.transports)
    connections.clock.advance(1)
    connections.protocols[0].dataReceived(b"G")  # t=3: moves 0's to t=13
    connections.clock.advance(7.5)
    assert connections.closed() == []
    connections.clock.advance(0.5)
    assert connections.closed() == [1]
    connections.clock.advance(1)
    assert connections.closed() == [1, 2]
    connections.clock.advance(1)
    assert connections.closed() == [0, 1, 2]
    assert all(transport.value().count(b"HTTP/1.1 ") == 1 for transport in connections.transports)
    for index in range(3):
        connections.lose(index)
    assert connections.clock.getDelayedCalls() == []


def test_sharedTimerSurvivesAConnectionLost() -> None:
    connections = SiteConnections(Limits(client_header_timeout=4, client_idle_timeout=30))
    connections.open()
    connections.clock.advance(1)
    connections.open()
    connections.lose(0)
    connections.clock.advance(3.5)
    assert connections.closed() == []
    connections.clock.advance(0.5)
    assert connections.closed() == [1]
    assert undated(connections.transports[1].value()) == undated(rejection(408))


def test_drainHooks() -> None:
    """busy / closeAfterResponse / closeIdle, as the service drains."""
    connection = Connection()
    assert not connection.protocol.busy()
    connection.stage.hold = True
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.protocol.busy()
    connection.protocol.closeAfterResponse()
    connection.stage._answer(connection.stage.held.pop(), b"")
    assert b"Connection: close" in connection.received()
    assert connection.transport.disconnecting
    idle = Connection()
    idle.protocol.closeIdle()
    assert idle.transport.disconnecting
    assert idle.received() == b""


_VALID = [
    b"GET / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /a?b=c HTTP/1.1\r\n" + H + b"User-Agent: x\r\nAccept: */*\r\nx-a: 1\r\nX-A:  2 \r\netag: e\r\n\r\n",
    b"\r\nGET / HTTP/1.0\r\n\r\n",
    b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nCookie: a=b\r\n\r\nabc",
    b"PUT /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET http://example.com/x HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"\r\n" + b"GET /2 HTTP/1.1\r\n" + H + b"X-B: b\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Connection: keep-alive, close\r\n\r\nGET /ignored HTTP/1.1\r\n\r\n",
]


def _served(pieces: list[bytes], limits: Limits) -> tuple[Any, ...]:
    connection = Connection(limits)
    for piece in pieces:
        connection.send(piece)
    received = connection.received()
    # The Date field and the request ID are the only things allowed to
    # differ between runs.
    lines = [
        line
        for line in received.split(b"\r\n")
        if not line.startswith((b"Date: ", b"X-Request-ID: "))
    ]
    fields = [list(request.fields.pairs()) for request in connection.stage.seen]
    return lines, connection.events, fields, connection.transport.disconnecting


@settings(max_examples=300, deadline=None)
@given(
    raw=st.sampled_from(_VALID + [raw for _, raw, _ in REJECTED]),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=4),
    maxHeaderSize=st.sampled_from([60, 100, 16384]),
)
def test_cutAnywhereSameOutcome(raw: bytes, cuts: list[int], maxHeaderSize: int) -> None:
    """
    The same bytes whole, cut anywhere, or byte by byte give the same
    response bytes, the same stage events, the same fields and the same
    connection state, within and over the size limit.
    """
    points = sorted({min(cut, len(raw)) for cut in cuts} | {0, len(raw)})
    pieces = [raw[a:b] for a, b in zip(points, points[1:])]
    limits = Limits(max_header_size=maxHeaderSize)
    whole = _served([raw], limits)
    assert _served(pieces, limits) == whole
    assert _served([bytes([b]) for b in raw], limits) == whole


# Response bodies (what ResponseRelay did for HTTPChannel) -------------------


class BackendProducer:
    """The backend connection as a response body's producer."""

    def __init__(self) -> None:
        self.producerState = "producing"

    def pauseProducing(self) -> None:
        self.producerState = "paused"

    def resumeProducing(self) -> None:
        self.producerState = "producing"

    def stopProducing(self) -> None:
        self.producerState = "stopped"


class StreamedBody:
    """A response body the test feeds: what came with the head, then more."""

    def __init__(self, buffered: bytes = b"", complete: bool = False) -> None:
        self.buffered = buffered
        self.complete = complete
        self.producer = BackendProducer()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.producer)
        if self.buffered:
            protocol.dataReceived(self.buffered)
        if self.complete:
            protocol.connectionLost(BODY_DONE)


def streaming(
    body: StreamedBody, version: bytes = b"HTTP/1.1", length: int | None = None, wire: str = "memory"
) -> Connection:
    connection = Connection(wire=wire)
    connection.stage.hold = True
    connection.send(b"GET / " + version + b"\r\n" + H + b"\r\n")
    connection.stage.held.pop().respond(Response(200, b"OK", Fields(), length, body))
    return connection


def test_closeDelimitedBodyIsComplete(wire: str) -> None:
    """A body ended by its backend's close (RFC 9112 6.3 item 8) is a
    complete body: the last chunk is written and the connection kept."""
    body = StreamedBody(b"abc")
    connection = streaming(body, wire=wire)
    body.protocol.connectionLost(Failure(PotentialDataLoss()))
    assert connection.received().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert not connection.transport.disconnecting


def test_closeDelimitedBodyToAnHTTP10Client(wire: str) -> None:
    """HTTP/1.0 has no chunks: a body of unknown length ends with the
    connection."""
    body = StreamedBody(b"abc")
    connection = streaming(body, b"HTTP/1.0", wire=wire)
    body.protocol.connectionLost(BODY_DONE)
    assert connection.received().endswith(b"\r\n\r\nabc")
    assert b"Transfer-Encoding" not in connection.received()
    assert connection.transport.disconnecting


def test_truncatedBodyAbortsTheClientWithoutTheLastChunk(wire: str) -> None:
    body = StreamedBody(b"partial")
    connection = streaming(body, wire=wire)
    body.protocol.connectionLost(Failure(ResponseFailed([Failure(ValueError("lost"))])))
    assert not connection.received().endswith(b"0\r\n\r\n")
    assert connection.closing()  # aborted
    assert connection.protocol.busy() is False


def test_slowClientPausesTheBackend() -> None:
    """
    The client's socket buffer is full: its transport pauses the producer
    registered on it, which is the body's source, the backend.
    """
    body = StreamedBody(b"x")
    connection = streaming(body)
    producer = connection.transport.producer
    assert producer is not None and connection.transport.streaming
    producer.pauseProducing()
    assert body.producer.producerState == "paused"
    producer.resumeProducing()
    assert body.producer.producerState == "producing"
    body.protocol.connectionLost(BODY_DONE)
    assert connection.transport.producer is None


def _wholeBody(size: int, wire: str = "memory", transport: Any = None) -> tuple[Connection, bytes]:
    """A connection whose request was answered with C{size} bytes held
    whole (what the cache's memory tier, or a converted image, gives)."""
    body = bytes(range(256)) * (size // 256)
    connection = Connection(wire=wire)
    if transport is not None:
        connection.transport = transport
        connection.protocol = connection.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        connection.protocol.makeConnection(transport)
    connection.stage.hold = True
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    connection.stage.held.pop().respond(Response(200, b"OK", Fields(), len(body), BytesBody(body)))
    return connection, body


@pytest.mark.parametrize("size", [1 << 20, 8 << 20])
def test_aLargeWholeBodyWaitsForASlowClient(size: int) -> None:
    """
    A body held whole (1 MiB, a typical large cache hit; 8 MiB), to a
    client that does not read: what is queued for it stays within two
    pieces of L{WHOLE_LIMIT}, not the whole body (a copy per slow client of
    the largest cached objects); as the client takes what was queued, the
    rest follows, and the response ends complete on a connection that is
    kept.
    """
    transport = SendBuffer(64 * 1024)
    connection, body = _wholeBody(size, transport=transport)
    connection.clock.advance(0)
    assert transport.paused
    assert transport.most <= 2 * WHOLE_LIMIT + 1024
    received = b""
    for _ in range(100):
        received += transport.value()
        transport.clear()
        if received.endswith(body):
            break
        transport.paused = False
        transport.producer.resumeProducing()
        connection.clock.advance(0)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.split(b"\r\n\r\n", 1)[1] == body
    assert transport.most <= 2 * WHOLE_LIMIT + 1024
    assert not transport.disconnecting and not connection.factory.inflight
    assert transport.producer is None


def test_aLargeWholeBodyArrivesWhole(wire: str) -> None:
    """Over a socket, plain or TLS: the pieces of a 3 MiB body held whole
    arrive in order, and the connection serves the next request."""
    connection, body = _wholeBody(3 << 20, wire=wire)
    for _ in range(200):
        connection.clock.advance(0)
        received = connection.received()
        if len(received) >= len(body):
            break
    head, rest = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: %d" % len(body) in head
    assert rest == body
    assert not connection.closing() and not connection.factory.inflight


def test_clientGoneDuringALargeWholeBody() -> None:
    """The client goes while pieces of a large body wait: nothing more is
    written or scheduled, and the call ends."""
    transport = SendBuffer(64 * 1024)
    connection, _ = _wholeBody(4 << 20, transport=transport)
    connection.clock.advance(0)
    connection.lose()
    written = len(transport.value())
    transport.paused = False
    connection.clock.advance(1)
    assert len(transport.value()) == written
    assert not connection.clock.getDelayedCalls() or all(
        not call.active() or call.getTime() > connection.clock.seconds() for call in connection.clock.getDelayedCalls()
    )
    assert not connection.factory.inflight


def test_clientDisconnectStopsTheBackend() -> None:
    body = StreamedBody(b"some")
    connection = streaming(body)
    connection.lose()
    assert body.producer.producerState == "stopped"
    # The backend's end after that changes nothing.
    body.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionDone())])))
    assert not connection.factory.inflight


def test_downloadIdleTimeoutAbortsBothSides() -> None:
    """
    A body that moves no byte for the route's idle timeout (30 s here)
    stops the backend and aborts the client; every byte, and every resume
    of a paused client, counts as activity.
    """
    body = StreamedBody(b"x")
    connection = streaming(body)
    connection.clock.advance(20)
    body.protocol.dataReceived(b"y")
    connection.clock.advance(20)
    connection.transport.producer.resumeProducing()
    connection.clock.advance(20)
    assert body.producer.producerState == "producing"
    assert not connection.transport.disconnecting
    connection.clock.advance(10)
    assert body.producer.producerState == "stopped"
    assert connection.transport.disconnecting
    assert not connection.factory.inflight


def test_bodyCompleteWithItsHeadNeedsNoTimer(wire: str) -> None:
    """A body that came whole with its head is written and finished within
    respond: no idle timer is scheduled (then cancelled) for it."""
    connection = Connection(wire=wire)
    connection.stage.hold = True
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    before = set(connection.clock.getDelayedCalls())
    connection.stage.held.pop().respond(Response(200, b"OK", Fields(), None, StreamedBody(b"hello", complete=True)))
    assert connection.received().endswith(b"5\r\nhello\r\n0\r\n\r\n")
    assert set(connection.clock.getDelayedCalls()) <= before
    assert connection.transport.producer is None


def test_finishedBodyIsFreedWithoutTheCycleCollector() -> None:
    """
    Once a streamed response is over, nothing keeps its body's source nor
    its idle timer (whose callback is the connection's, which held the
    timer) alive: reference counting frees them.
    """
    import gc
    import weakref

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        body = StreamedBody(b"hello")
        connection = streaming(body)
        timer = connection.transport.producer.idle
        assert timer is not None
        gone = [weakref.ref(timer), weakref.ref(body), weakref.ref(body.producer)]
        del timer
        body.protocol.connectionLost(BODY_DONE)
        assert connection.received().endswith(b"0\r\n\r\n")
        del body
        assert [ref() for ref in gone] == [None, None, None]
    finally:
        if enabled:
            gc.enable()


# ALPN, targets the stages never see ------------------------------------------


def test_headerDeadlineStopsWhenALPNSelectsHTTP2() -> None:
    """
    When ALPN picked h2 the connection hands every byte, the first ones
    too, to the listener's HTTP/2 protocol; its HTTP/1.1 timers are off, so
    no 408 is written into the HTTP/2 connection later.
    """
    received: list[bytes] = []

    class HTTP2:
        def makeConnection(self, transport: Any) -> None:
            self.transport = transport

        def dataReceived(self, data: bytes) -> None:
            received.append(data)

        def connectionLost(self, reason: Any) -> None:
            received.append(b"lost")

    class WithHTTP2(ListenerFactory):
        def buildHTTP2(self, connection: Any) -> Any:
            return HTTP2()

    clock = Clock()
    base = makeFactory(Limits(client_header_timeout=5), clock, Echo([]))
    factory = WithHTTP2(base.currentRuntime, base.listener, clock)
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport()
    transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    protocol.dataReceived(preface)
    protocol.dataReceived(b"more")
    assert received == [preface, b"more"]
    clock.advance(30)
    assert transport.value() == b""
    assert not transport.disconnecting
    assert clock.getDelayedCalls() == []
    protocol.connectionLost(Failure(ConnectionDone()))
    assert received[-1] == b"lost"
    assert factory.channels == set()


def test_optionsAsteriskIsRefusedBeforeTheStages() -> None:
    """
    C{OPTIONS *} is a valid request (h1 reads it) but asks about the server
    itself, which no route serves: 400, and no stage sees it.
    """
    connection = Connection()
    connection.send(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.received().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert connection.kinds() == []


def test_bodyNeverReadDoesNotStallTheNextRequest() -> None:
    """
    A body that arrived whole but that nothing read (a stage answered
    without it, a backend that failed before reading it) paused the
    connection while it waited in its pipe; once the answer is out the
    connection reads again, and the next request is served.
    """
    connection = Connection()
    connection.stage.hold = True
    connection.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc")
    assert connection.transport.producerState == "paused"
    connection.stage.held.pop().respond(Response(403, b"Forbidden", Fields(), 0, None))
    assert connection.received().startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert not connection.transport.disconnecting
    assert connection.transport.producerState == "producing"
    connection.stage.hold = False
    connection.send(b"GET /next HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.received().endswith(b"GET /next ")


def test_answerBeforeTheStagesReadAWholeBodyKeepsTheConnection() -> None:
    """
    A body that came whole with its head is read before the stages run:
    an answer at once (here a 404 on a POST) finds the request complete,
    and the connection serves the next request.  A body still arriving is
    read and dropped after the answer (see
    test_earlyAnswerWhileTheBodyArrivesDropsTheRest), and the connection
    goes on once it is complete.
    """
    connection = Connection()
    object.__setattr__(connection.factory.currentRuntime(), "router", Router(()))
    connection.send(
        b"POST /x HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"
        b"PUT /y HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    received = connection.received()
    assert received.count(b"HTTP/1.1 404 Not Found\r\n") == 2
    assert b"Connection: close" not in received
    assert not connection.transport.disconnecting
    assert connection.transport.producerState == "producing"
    connection.send(b"POST /z HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nab")
    assert connection.received().count(b"HTTP/1.1 404 ") == 3
    assert not connection.transport.disconnecting
    connection.send(b"c" + b"GET /w HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.received().count(b"HTTP/1.1 404 ") == 4


def test_noInterimAfterTheFinalAnswer(wire: str) -> None:
    """An interim response that comes after the final answer began (a
    late 1xx from a stage or backend) is not written into its body."""
    body = StreamedBody(b"abc")
    connection = streaming(body, wire=wire)
    before = connection.received()
    body.protocol.interim(103, b"Early Hints", Fields())
    assert connection.received() == before
    body.protocol.connectionLost(BODY_DONE)
    body.protocol.interim(103, b"Early Hints", Fields())
    assert connection.received().endswith(b"0\r\n\r\n")
