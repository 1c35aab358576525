"""
Tests for L{edgeproxy.upstream.client}: the lean HTTP/1.1 backend client,
over in-memory connections (StringTransport) and a deterministic clock.
What is asserted is what a backend sees on the wire and what the proxy gets
back (responses, bodies, failures, connection reuse).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import (
    ParseError,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    WrongBodyLength,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from edgeproxy.upstream.client import UpstreamClient, splitURI
from edgeproxy.upstream.pool import fullResponseHeaders


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects every factory to a fresh StringTransport, or fails."""

    def __init__(self) -> None:
        self.failure: Exception | None = None
        self.pending: Deferred[Any] | None = None
        self.hold = False
        self.connections: list[tuple[Any, StringTransport]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.failure is not None:
            return fail(self.failure)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        if self.hold:
            self.pending = Deferred()
            self.pending.addCallback(lambda _: (protocol.makeConnection(transport), protocol)[1])
            self.connections.append((protocol, transport))
            return self.pending
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


class Endpoints:
    def __init__(self) -> None:
        self.endpoint = MemoryEndpoint()
        self.uris: list[Any] = []

    def endpointForURI(self, uri: Any) -> MemoryEndpoint:
        self.uris.append(uri)
        return self.endpoint


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


class Harness:
    def __init__(self, keepalive: int = 2, timeout: float = 60) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoints = Endpoints()
        self.client = UpstreamClient(
            self.reactor,
            self.endpoints,
            maxPersistentPerHost=keepalive,
            cachedConnectionTimeout=timeout,
        )

    def request(self, method: bytes = b"GET", path: bytes = b"/p?q=1", body: Any = None,
                headers: Headers | None = None) -> Deferred[Any]:
        if headers is None:
            headers = Headers({b"Host": [b"backend.test"], b"X-A": [b"1", b"2"]})
        return self.client.request(method, b"http://10.0.0.1:8080" + path, headers, body)

    @property
    def connections(self) -> list[tuple[Any, StringTransport]]:
        return self.endpoints.endpoint.connections

    def respond(self, data: bytes, index: int = -1) -> None:
        self.connections[index][0].dataReceived(data)

    def wire(self, index: int = -1) -> bytes:
        return self.connections[index][1].value()


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: s\r\n\r\nhello"


def test_requestHeadOnTheWireInOneWrite() -> None:
    h = Harness()
    d = h.request()
    assert h.wire() == (
        b"GET /p?q=1 HTTP/1.1\r\nHost: backend.test\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    )
    assert not d.called
    h.respond(OK)
    response = result(d)
    assert (response.code, response.phrase, response.version) == (200, b"OK", (b"HTTP", 1, 1))
    assert response.length == 5
    assert response.headers.getRawHeaders(b"server") == [b"s"]
    # Framing fields are kept apart, as Twisted's client does, and the
    # pool's fullResponseHeaders finds them.
    assert not response.headers.hasHeader(b"content-length")
    assert fullResponseHeaders(response).getRawHeaders(b"content-length") == [b"5"]
    body = Body()
    response.deliverBody(body)
    assert body.data == b"hello"
    assert body.reason is not None and body.reason.check(ResponseDone)


def test_connectionReusedAndEndpointAskedOnce() -> None:
    h = Harness()
    for _ in range(3):
        d = h.request()
        h.respond(OK)
        result(d).deliverBody(Body())
    assert len(h.connections) == 1
    assert len(h.endpoints.uris) == 1
    assert h.endpoints.uris[0].host == b"10.0.0.1" and h.endpoints.uris[0].port == 8080
    assert h.wire().count(b"GET /p?q=1 HTTP/1.1") == 3


def test_responseInPiecesAndBareLF() -> None:
    h = Harness()
    d = h.request()
    for piece in (b"HTTP/1.1 200 OK\n", b"Content-Length: 3\n", b"X: y\n", b"\nab", b"c"):
        h.respond(piece)
    response = result(d)
    body = Body()
    response.deliverBody(body)
    assert body.data == b"abc" and body.reason.check(ResponseDone)
    assert response.headers.getRawHeaders(b"x") == [b"y"]


def test_chunkedResponse() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n")
    response = result(d)
    assert response.length is UNKNOWN_LENGTH
    body = Body()
    response.deliverBody(body)
    h.respond(b"0\r\nTrailer: x\r\n\r\n")
    assert body.data == b"abcde" and body.reason.check(ResponseDone)
    # Reused afterwards.
    h.request()
    assert len(h.connections) == 1


def test_badChunkedBodyFailsTheBodyAndClosesTheConnection() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    body = Body()
    result(d).deliverBody(body)
    h.respond(b"zz\r\n")
    assert body.reason.check(ResponseFailed)
    assert h.connections[0][1].disconnecting


def test_bodyUntilCloseIsPotentialDataLossAndNotReused() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\n\r\nsome")
    response = result(d)
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
    "head",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    ],
)
def test_noBodyCodes(head: bytes) -> None:
    h = Harness()
    d = h.request()
    h.respond(head)
    body = Body()
    result(d).deliverBody(body)
    assert body.data == b"" and body.reason.check(ResponseDone)
    h.request()
    assert len(h.connections) == 1


def test_headResponseKeepsContentLengthAsEntityField() -> None:
    h = Harness()
    d = h.request(method=b"HEAD")
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    response = result(d)
    assert response.length == 0
    assert response.headers.getRawHeaders(b"content-length") == [b"100"]
    body = Body()
    response.deliverBody(body)
    assert body.reason.check(ResponseDone)


def test_informationalResponsesSkipped() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n" + OK)
    response = result(d)
    assert response.code == 200
    assert not response.headers.hasHeader(b"link")


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
    d = h.request()
    h.respond(head)
    result(d).deliverBody(Body())
    assert h.connections[0][1].disconnecting
    h.request()
    assert len(h.connections) == 2


def test_http10KeepAliveReused() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    result(d).deliverBody(Body())
    h.request()
    assert len(h.connections) == 1


def test_bytesAfterTheResponseMeanNoReuse() -> None:
    h = Harness()
    d = h.request()
    h.respond(OK + b"HTTP/1.1 200 OK\r\n")
    result(d).deliverBody(Body())
    assert h.connections[0][1].disconnecting
    h.request()
    assert len(h.connections) == 2


def test_unsolicitedBytesOnAnIdleConnectionCloseIt() -> None:
    h = Harness()
    d = h.request()
    h.respond(OK)
    result(d).deliverBody(Body())
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
    ],
)
def test_unparseableHeadsAreParseErrors(head: bytes) -> None:
    h = Harness()
    d = h.request()
    h.respond(head)
    failure = result(d)
    assert isinstance(failure, Failure) and failure.check(ResponseFailed)
    assert failure.value.reasons[0].check(ParseError)
    assert h.connections[0][1].disconnecting


def test_headTooLong() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70000)
    failure = result(d)
    assert failure.check(ResponseFailed) and failure.value.reasons[0].check(ParseError)


def test_repeatedEqualContentLengthAccepted() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok")
    body = Body()
    result(d).deliverBody(body)
    assert body.data == b"ok"


def test_lostBeforeAnyResponse() -> None:
    h = Harness()
    d = h.request()
    h.connections[0][0].connectionLost(Failure(ConnectionDone()))
    failure = result(d)
    assert failure.check(ResponseNeverReceived)


def test_lostAfterPartOfTheHead() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\n")
    h.connections[0][0].connectionLost(Failure(ConnectionDone()))
    failure = result(d)
    assert failure.check(ResponseFailed) and not failure.check(ResponseNeverReceived)


def test_lostMidBody() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    body = Body()
    result(d).deliverBody(body)
    h.connections[0][0].connectionLost(Failure(ConnectionDone()))
    assert body.data == b"abc"
    assert body.reason.check(ResponseFailed)
    h.request()
    assert len(h.connections) == 2


def test_bodyBufferedUntilDeliverBodyAndReadingPaused() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    response = result(d)
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
    d = h.request()
    calls = recordFlowControl(h.connections[0][1])
    h.respond(OK)
    response = result(d)
    assert calls == []
    body = Body()
    response.deliverBody(body)
    assert body.data == b"hello" and body.reason.check(ResponseDone)
    assert calls == []
    h.request()
    assert len(h.connections) == 1


def test_chunkedBodyCompleteWithItsHeadNeverPausesTheBackend() -> None:
    h = Harness()
    d = h.request()
    calls = recordFlowControl(h.connections[0][1])
    h.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    body = Body()
    result(d).deliverBody(body)
    assert body.data == b"abc" and body.reason.check(ResponseDone)
    assert calls == []


def test_bodyIncompleteWithItsHeadPausesUntilDelivered() -> None:
    h = Harness()
    d = h.request()
    calls = recordFlowControl(h.connections[0][1])
    h.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert calls == ["pause"]
    body = Body()
    result(d).deliverBody(body)
    assert calls == ["pause", "resume"]
    h.respond(b"0\r\n\r\n")
    assert body.data == b"abc" and body.reason.check(ResponseDone)


def test_bodyTransportPausesResumesAndStops() -> None:
    h = Harness()
    d = h.request()
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")

    class Pausing(Body):
        def connectionMade(self) -> None:
            self.transport.pauseProducing()

    body = Pausing()
    result(d).deliverBody(body)
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
    d = h.request()
    h.respond(OK)
    body = Body()
    result(d).deliverBody(body)
    body.transport.stopProducing()
    body.transport.pauseProducing()
    transport = h.connections[0][1]
    assert not transport.disconnecting
    assert transport.producerState == "producing"


def test_contentLengthBody() -> None:
    h = Harness()
    producer = Producer(5)
    d = h.request(method=b"POST", body=producer)
    assert b"Content-Length: 5\r\n" in h.wire()
    producer.consumer.write(b"hel")
    producer.consumer.write(b"lo")
    producer.done.callback(None)
    assert h.wire().endswith(b"\r\n\r\nhello")
    h.respond(OK)
    assert result(d).code == 200


def test_chunkedRequestBody() -> None:
    h = Harness()
    producer = Producer(UNKNOWN_LENGTH)
    h.request(method=b"POST", body=producer)
    assert b"Transfer-Encoding: chunked\r\n" in h.wire()
    producer.consumer.write(b"abc")
    producer.done.callback(None)
    assert h.wire().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")


def test_emptyPostSaysContentLengthZero() -> None:
    h = Harness()
    h.request(method=b"POST")
    assert b"Content-Length: 0\r\n" in h.wire()
    h2 = Harness()
    h2.request(method=b"GET")
    assert b"Content-Length" not in h2.wire()


@pytest.mark.parametrize("written", [b"abc", b"abcdefgh"])
def test_wrongBodyLengthFailsTheRequest(written: bytes) -> None:
    h = Harness()
    producer = Producer(5)
    d = h.request(method=b"PUT", body=producer)
    try:
        producer.consumer.write(written)
    except Exception:
        pass
    producer.done.callback(None)
    failure = result(d)
    assert failure.check(RequestGenerationFailed)
    assert failure.value.reasons[0].check(WrongBodyLength)


def test_producerFailureIsRequestGenerationFailed() -> None:
    h = Harness()
    producer = Producer(5)
    d = h.request(method=b"PUT", body=producer)
    producer.done.errback(Failure(ValueError("client went away")))
    failure = result(d)
    assert failure.check(RequestGenerationFailed)
    assert h.connections[0][1].disconnecting or h.connections[0][1].disconnected


def test_lostWhileSendingTheBody() -> None:
    h = Harness()
    producer = Producer(5)
    d = h.request(method=b"PUT", body=producer)
    h.connections[0][0].connectionLost(Failure(ConnectionDone()))
    assert result(d).check(RequestTransmissionFailed)
    assert producer.stopped


def test_completeResponseBeforeTheBodyIsSent() -> None:
    h = Harness()
    producer = Producer(100)
    d = h.request(method=b"POST", body=producer)
    h.respond(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
    response = result(d)
    assert response.code == 413
    body = Body()
    response.deliverBody(body)
    assert body.data == b"no" and body.reason.check(ResponseDone)
    assert producer.stopped
    assert h.connections[0][1].disconnecting


def test_responseHeadHeldWhileTheBodyIsBeingSent() -> None:
    h = Harness()
    producer = Producer(3)
    d = h.request(method=b"POST", body=producer)
    h.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert not d.called
    producer.consumer.write(b"xyz")
    producer.done.callback(None)
    response = result(d)
    body = Body()
    response.deliverBody(body)
    h.respond(b"cd")
    assert body.data == b"abcd" and body.reason.check(ResponseDone)


def test_cancelWhileWaitingAbortsTheConnection() -> None:
    h = Harness()
    d = h.request()
    d.cancel()
    failure = result(d)
    assert any(r.check(CancelledError) for r in failure.value.reasons)
    assert h.connections[0][1].disconnected or h.connections[0][1].disconnecting


def test_cancelWhileConnecting() -> None:
    h = Harness()
    h.endpoints.endpoint.hold = True
    d = h.request()
    d.cancel()
    assert result(d).check(CancelledError)


def test_connectFailurePropagatesUnchanged() -> None:
    h = Harness()
    h.endpoints.endpoint.failure = ConnectionRefusedError("no")
    assert result(h.request()).check(ConnectionRefusedError)


def test_exactlyOneHostRequired() -> None:
    h = Harness()
    headers = Headers({b"Host": [b"a", b"b"]})
    failure = result(h.request(headers=headers))
    assert failure.check(RequestGenerationFailed)
    # Added from the URI when missing, as the Agent does.
    h2 = Harness()
    h2.request(headers=Headers())
    assert b"Host: 10.0.0.1:8080\r\n" in h2.wire()


def test_idleConnectionsLimitedAndTimedOut() -> None:
    h = Harness(keepalive=1, timeout=10)
    first, second = h.request(), h.request()
    assert len(h.connections) == 2
    h.respond(OK, 0)
    h.respond(OK, 1)
    result(first).deliverBody(Body())
    result(second).deliverBody(Body())
    # Only one kept idle.
    assert [t.disconnecting for _, t in h.connections] == [False, True]
    h.reactor.advance(5)
    d = h.request()
    h.respond(OK, 0)
    result(d).deliverBody(Body())
    # Idle again from t=5: still open at t=14, closed at t=15.
    h.reactor.advance(9)
    assert not h.connections[0][1].disconnecting
    h.reactor.advance(1.5)
    assert h.connections[0][1].disconnecting


def test_closeCachedConnections() -> None:
    h = Harness()
    d = h.request()
    h.respond(OK)
    result(d).deliverBody(Body())
    closed = h.client.closeCachedConnections()
    protocol, transport = h.connections[0]
    assert transport.disconnecting
    assert not closed.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert closed.called
    h.request()
    assert len(h.connections) == 2


def test_splitURI() -> None:
    assert splitURI(b"http://[::1]:80/a?b") == (b"http://[::1]:80", b"/a?b")
    assert splitURI(b"https://h?x=1") == (b"https://h", b"/?x=1")
    assert splitURI(b"http://h") == (b"http://h", b"/")
    with pytest.raises(ValueError):
        splitURI(b"/relative")


def test_notPersistentSaysCloseAndKeepsNothing() -> None:
    """keepalive = 0: C{Connection: close} on the wire, nothing pooled."""
    h = Harness(keepalive=0)
    h.client.persistent = False
    d = h.request()
    assert b"\r\nConnection: close\r\n" in h.wire()
    h.respond(OK)
    result(d).deliverBody(Body())
    assert h.connections[0][1].disconnecting
    h.request()
    assert len(h.connections) == 2


def test_zeroIdleConnectionsKeptEvenWhenPersistent() -> None:
    h = Harness(keepalive=0)
    d = h.request()
    assert b"Connection: close" not in h.wire()
    h.respond(OK)
    body = Body()
    result(d).deliverBody(body)
    assert body.reason.check(ResponseDone)
    assert h.connections[0][1].disconnecting


def test_responseFieldsFiledExactlyAsAddRawHeaderFilesThem() -> None:
    # The client fills Headers' private dict in one pass (no addRawHeader
    # per field): the result must be what addRawHeader makes of the same
    # fields, and Headers' public methods must read it.  Fails if Twisted
    # changes where or how Headers keeps its fields.
    h = Harness()
    d = h.request()
    h.respond(
        b"HTTP/1.1 200 OK\r\nServer: s\r\netag: \"x\"\r\nX-Two: 1\r\nx-two: 2\r\n"
        b"X-Folded: a\r\n  b\r\nX-CR: c\rd\r\nWWW-authenticate: Basic\r\n"
        b"Set-Cookie:   a=1  \r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    )
    response = result(d)
    expected = Headers()
    for name, value in [
        (b"server", b"s"), (b"etag", b'"x"'), (b"x-two", b"1"), (b"x-two", b"2"),
        (b"x-folded", b"a  b"), (b"x-cr", b"c\rd"), (b"www-authenticate", b"Basic"),
        (b"set-cookie", b"a=1"),
    ]:
        expected.addRawHeader(name, value)
    assert response.headers == expected
    assert list(response.headers.getAllRawHeaders()) == list(expected.getAllRawHeaders())
    assert response.headers.getRawHeaders(b"ETag") == [b'"x"']
    assert response.headers.getRawHeaders(b"x-cr") == [b"c d"]
    assert response.headers.hasHeader(b"www-authenticate")
    control = Headers()
    control.addRawHeader(b"connection", b"keep-alive")
    control.addRawHeader(b"content-length", b"0")
    assert response.connectionHeaders == control
    response.headers.addRawHeader(b"X-New", b"1")
    assert response.headers.getRawHeaders(b"x-new") == [b"1"]


@pytest.mark.parametrize(
    "head, expected",
    [
        # CRLF only, with an obs-fold continuation (RFC 9112 5.2).
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\tmore\r\nX-B: 2\r\n", [(b"x-a", b"1\tmore"), (b"x-b", b"2")]),
        # Bare LF line ends, mixed with CRLF.
        (b"HTTP/1.1 200 OK\nX-A: 1\r\nX-B:  2 \n", [(b"x-a", b"1"), (b"x-b", b"2")]),
        # A stray CR inside a value is a line break to Headers.
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r2\r\n", [(b"x-a", b"1 2")]),
        # Only a status line.
        (b"HTTP/1.0 200 OK\r\n", []),
    ],
)
def test_responseHeadLineEnds(head: bytes, expected: list[tuple[bytes, bytes]]) -> None:
    h = Harness()
    d = h.request()
    h.respond(head + b"Content-Length: 0\r\n\r\n")
    response = result(d)
    assert not isinstance(response, Failure), response
    want = Headers()
    for name, value in expected:
        want.addRawHeader(name, value)
    assert response.headers == want
    assert response.connectionHeaders.getRawHeaders(b"content-length") == [b"0"]


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
    d = h.request()
    h.respond(head)
    failure = result(d)
    assert isinstance(failure, Failure) and failure.check(ResponseFailed)
    assert failure.value.reasons[0].check(ParseError)
