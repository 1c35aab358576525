"""
Tests for L{edgeproxy.http.request}, L{edgeproxy.http.site} and
L{edgeproxy.http.errorpages}: a real L{EdgeSite} and HTTP/1.1 channel over a
memory transport, with an in-memory upstream pool whose requests the test
answers.  Assertions are on the bytes the client gets and on what the
upstream request carried.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from edgeproxy.config.model import Config, Limits, Listener, ProxySettings, Route, Server, Upstream
from edgeproxy.errors import BackendUnavailable, ServiceUnavailable
from edgeproxy.h1 import Fields
from edgeproxy.http.errorpages import errorBody
from edgeproxy.http.site import EdgeSite
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime

UPSTREAM = Upstream(name="app", servers=(Server("10.0.0.1", 8080),), idle_timeout=30.0)
ROUTES = (
    Route(name="app", hosts=("app.example",), paths=("/",), upstream="app"),
    Route(name="small", hosts=("small.example",), paths=("/",), upstream="app", max_body_size=100),
    Route(name="api", hosts=("api.example",), paths=("/v1",), upstream="app", strip_prefix=True),
)


class UpstreamCall:
    def __init__(self, method: bytes, path: bytes, headers: Headers, body: Any) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.cancelled = False
        self.result: Deferred[Any] = Deferred(lambda d: setattr(self, "cancelled", True))
        self.consumer = StringTransport()

    def startBody(self) -> Deferred[None]:
        return self.body.startProducing(self.consumer)


class MemoryPool:
    """Stands in for UpstreamPool: records requests, the test answers."""

    def __init__(self) -> None:
        self.upstream = UPSTREAM
        self.calls: list[UpstreamCall] = []

    def request(
        self, method: bytes, path: bytes, headers: Headers, body: Any, hashKey: bytes | None = None
    ) -> Deferred[Any]:
        call = UpstreamCall(method, path, headers, body)
        self.calls.append(call)
        return call.result


class BackendTransport(StringTransport):
    def stopProducing(self) -> None:
        self.producerState = "stopped"


class FakeResponse:
    """An IResponse whose body is delivered at once (or cut short)."""

    def __init__(self, code: int, headers: dict[bytes, list[bytes]], body: bytes = b"",
                 length: Any = UNKNOWN_LENGTH, cut: bool = False) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Status"
        self.headers = Headers(headers)
        self.length = length
        self.body = body
        self.cut = cut
        self.transport = BackendTransport()

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self.transport)
        if self.body:
            protocol.dataReceived(self.body)
        if self.cut:
            protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionError("reset"))])))
        else:
            protocol.connectionLost(Failure(ResponseDone()))


class Client:
    def __init__(self, listener: Listener | None = None) -> None:
        self.pool = MemoryPool()
        config = Config(
            path="/etc/edge.ini",
            proxy=ProxySettings(),
            tls=None,
            listeners=(),
            upstreams={"app": UPSTREAM},
            routes=ROUTES,
        )
        self.runtime = Runtime(config=config, router=Router(ROUTES), pools={"app": self.pool})  # type: ignore[dict-item]
        self.listener = listener or Listener(name="l", endpoint="tcp:0", tls=False)
        self.site = EdgeSite(lambda: self.runtime, self.listener, MemoryReactorClock())
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def wire(self) -> bytes:
        return self.transport.value()


def test_bodyReachesUpstreamBeforeItIsComplete() -> None:
    client = Client()
    client.send(b"POST /upload?x=1 HTTP/1.1\r\nHost: app.example\r\nContent-Length: 10\r\n\r\nfour")
    [call] = client.pool.calls
    assert (call.method, call.path) == (b"POST", b"/upload?x=1")
    assert call.headers.getRawHeaders(b"host") == [b"app.example"]
    assert call.headers.getRawHeaders(b"x-forwarded-for") == [b"192.0.2.7"]
    assert call.body.length == 10
    done = call.startBody()
    assert call.consumer.value() == b"four"
    assert not done.called
    client.send(b"sixsix")
    assert call.consumer.value() == b"foursixsix"
    assert done.called


def test_responseRelayedWithoutServerAndWithDate() -> None:
    client = Client()
    client.send(b"GET /page HTTP/1.1\r\nHost: app.example\r\n\r\n")
    [call] = client.pool.calls
    assert call.body is None
    call.result.callback(
        FakeResponse(200, {b"Server": [b"Secret/1"], b"X-Powered-By": [b"x"], b"Content-Type": [b"text/plain"]},
                     b"body", length=4)
    )
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Server:" not in head and b"X-Powered-By" not in head
    assert b"Date: " in head
    assert b"Content-Length: 4" in head
    assert body == b"body"
    assert not client.transport.disconnecting


def test_chunkedWhenLengthUnknownAndNoContentTypeAdded() -> None:
    client = Client()
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.pool.calls[0].result.callback(FakeResponse(200, {}, b"abc"))
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert b"Content-Type" not in head
    assert body == b"3\r\nabc\r\n0\r\n\r\n"


def test_noRouteIs404AndConnectionStaysUsable() -> None:
    client = Client()
    client.send(b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
    assert client.wire().startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert client.wire().endswith(errorBody(404))
    assert b"Cache-Control: no-store" in client.wire()
    assert client.pool.calls == []
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert len(client.pool.calls) == 1


def test_badTargetIs400() -> None:
    client = Client()
    client.send(b"GET /a%2fb HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert client.wire().startswith(b"HTTP/1.1 400 ")
    assert client.pool.calls == []


def test_declaredTooLargeIs413BeforeAnyContinue() -> None:
    client = Client()
    client.send(
        b"PUT /big HTTP/1.1\r\nHost: small.example\r\nContent-Length: 1000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    wire = client.wire()
    assert wire.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in wire
    assert b"Connection: close" in wire
    assert client.transport.disconnecting
    assert client.pool.calls == []


def test_streamedBodyOverLimitIsCut() -> None:
    client = Client()
    client.send(b"POST /x HTTP/1.1\r\nHost: small.example\r\nTransfer-Encoding: chunked\r\n\r\n")
    [call] = client.pool.calls
    done = call.startBody()
    failures: list[Failure] = []
    done.addErrback(failures.append)
    client.send(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert not failures
    client.send(b"40\r\n" + b"b" * 64 + b"\r\n")
    assert failures, "the upstream request must be aborted, not completed short"
    assert client.wire().startswith(b"HTTP/1.1 413 ")
    assert client.transport.disconnecting
    assert call.cancelled


def test_upstreamFailureIsGeneric502() -> None:
    client = Client()
    client.pool.request = lambda *a, **k: fail(BackendUnavailable("connect to 10.0.0.1:8080: refused"))  # type: ignore[method-assign]
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    wire = client.wire()
    assert wire.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert wire.endswith(b"\r\n\r\n502 Bad Gateway\n")
    assert b"10.0.0.1" not in wire and b"refused" not in wire


def test_upstreamFailureDuringUploadAnsweredAtOnce() -> None:
    client = Client()
    client.send(b"POST /x HTTP/1.1\r\nHost: app.example\r\nContent-Length: 1000\r\n\r\nabc")
    client.pool.calls[0].result.errback(BackendUnavailable("refused"))
    assert client.wire().startswith(b"HTTP/1.1 502 ")
    assert client.transport.disconnecting


def test_noBackendAvailableIs503WithRetryAfter() -> None:
    client = Client()
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.pool.calls[0].result.errback(ServiceUnavailable("every server of app is down"))
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nRetry-After: 5" in head
    assert body == errorBody(503)
    assert b"app" not in body


def test_errorPagesOtherThan503HaveNoRetryAfter() -> None:
    client = Client()
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.pool.calls[0].result.errback(BackendUnavailable("refused"))
    assert client.wire().startswith(b"HTTP/1.1 502 ")
    assert b"Retry-After" not in client.wire()


def test_headResponseHasNoBody() -> None:
    client = Client()
    client.send(b"HEAD /file HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.pool.calls[0].result.callback(FakeResponse(200, {b"Content-Length": [b"1000"]}))
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert b"Content-Length: 1000" in head
    assert body == b""


def test_noContentHasNoBodyOrChunking() -> None:
    client = Client()
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.pool.calls[0].result.callback(FakeResponse(204, {}))
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204 ")
    assert b"Transfer-Encoding" not in head and body == b""


def test_truncatedResponseAbortsClient() -> None:
    client = Client()
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.pool.calls[0].result.callback(FakeResponse(200, {}, b"part", cut=True))
    assert not client.wire().endswith(b"0\r\n\r\n")
    assert client.transport.disconnecting


def test_completeResponseBeforeBodyIsHeldUntilBodyDone() -> None:
    client = Client()
    client.send(b"POST /x HTTP/1.1\r\nHost: app.example\r\nContent-Length: 6\r\n\r\nabc")
    call = client.pool.calls[0]
    call.startBody()
    call.result.callback(FakeResponse(401, {b"Content-Length": [b"2"]}, b"no", length=2))
    assert client.wire() == b""
    client.send(b"def")
    assert client.wire().startswith(b"HTTP/1.1 401 ")
    assert client.wire().endswith(b"no")
    assert not client.transport.disconnecting


def test_stripPrefix() -> None:
    client = Client()
    client.send(b"GET /v1/users?id=3 HTTP/1.1\r\nHost: api.example\r\n\r\n")
    assert client.pool.calls[0].path == b"/users?id=3"


def test_clientGoneCancelsUpstream() -> None:
    client = Client()
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    call = client.pool.calls[0]
    assert len(client.site.inflight) == 1
    client.protocol.connectionLost(Failure(ConnectionError("gone")))
    assert call.cancelled
    assert client.site.inflight == set()
    assert client.site.channels == set()


def test_inflightAndChannelsTracked() -> None:
    client = Client()
    assert client.site.channels == {client.protocol}
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert len(client.site.inflight) == 1
    client.pool.calls[0].result.callback(FakeResponse(200, {}, b"ok"))
    assert client.site.inflight == set()


def test_http2OfferFollowsListener() -> None:
    off = Client(Listener(name="l", endpoint="tcp:0", tls=True, http2=False))
    assert off.site.acceptableProtocols() == [b"http/1.1"]
    on = Client(Listener(name="l", endpoint="tcp:0", tls=True, http2=True))
    assert on.site.acceptableProtocols()[-1] == b"http/1.1"


def test_listenerLimitsReachChannel() -> None:
    limits = Limits(client_idle_timeout=7.0, max_header_size=2048)
    client = Client(Listener(name="l", endpoint="tcp:0", tls=False, limits=limits))
    channel = client.protocol._channel
    assert channel.limits is limits
    assert channel.timeOut == 7.0


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[int, bytes]] = []

    def log(self, request: Any) -> None:
        self.lines.append((request.code, request.uri))


def test_accessLogOncePerRequestEvenWhenCutShort() -> None:
    client = Client()
    client.site.accessLog = recorder = Recorder()
    client.send(b"GET /fine HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.pool.calls[0].result.callback(FakeResponse(200, {}, b"ok"))
    client.send(b"GET /cut HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.pool.calls[1].result.callback(FakeResponse(200, {}, b"part", cut=True))
    client.protocol.connectionLost(Failure(ConnectionError("aborted")))
    assert recorder.lines == [(200, b"/fine"), (200, b"/cut")]


def test_accessLogForEarlyAnswerThenClose() -> None:
    client = Client()
    client.site.accessLog = recorder = Recorder()
    client.send(b"PUT /big HTTP/1.1\r\nHost: small.example\r\nContent-Length: 1000\r\n\r\n")
    client.protocol.connectionLost(Failure(ConnectionError("closed")))
    assert recorder.lines == [(413, b"/big")]


def test_immediateUpstreamFailureOnGetKeepsConnection() -> None:
    client = Client()
    client.pool.request = lambda *a, **k: fail(BackendUnavailable("refused"))  # type: ignore[method-assign]
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert client.wire().startswith(b"HTTP/1.1 502 ")
    assert b"Connection: close" not in client.wire()
    assert not client.transport.disconnecting


class WriteLog(StringTransport):
    """A client transport that remembers each write separately."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.writes.append(b"".join(data))
        super().writeSequence(data)


class StreamingResponse(FakeResponse):
    """A response whose body is still to come when deliverBody returns."""

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


def _loggedClient() -> tuple[Client, WriteLog]:
    client = Client()
    transport = WriteLog(peerAddress=IPv4Address("TCP", "192.0.2.7", 5556))
    client.protocol = client.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5556))
    client.protocol.makeConnection(transport)
    client.transport = transport
    return client, transport


def test_headAndBodyThatCameWithItLeaveInOneWrite() -> None:
    """
    The response head and a body the backend delivered with it reach the
    client transport in one write (over TLS: one record), chunked or not.
    """
    client, transport = _loggedClient()
    client.send(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.pool.calls[0].result.callback(
        FakeResponse(200, {b"Content-Type": [b"text/plain"]}, b"body", length=4)
    )
    [write] = transport.writes
    assert write.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: 4\r\n" in write
    assert write.endswith(b"\r\n\r\nbody")

    del transport.writes[:]
    client.send(b"GET /b HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.pool.calls[1].result.callback(FakeResponse(200, {}, b"abc"))
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert b"".join(transport.writes[1:]) == b"0\r\n\r\n"


def test_headOfABodyStillToComeIsSentAtOnce() -> None:
    """
    A response whose body has not arrived (a slow or endless body, such as
    server-sent events) has its head on the wire before any of the body.
    """
    client, transport = _loggedClient()
    client.send(b"GET /events HTTP/1.1\r\nHost: app.example\r\n\r\n")
    response = StreamingResponse(200, {b"Content-Type": [b"text/event-stream"]})
    client.pool.calls[0].result.callback(response)
    head = client.wire()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    response.protocol.dataReceived(b"data: 1\n\n")
    assert client.wire() == head + b"9\r\ndata: 1\n\n\r\n"


class Exchange:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SendingPool(MemoryPool):
    """A pool with UpstreamPool.send (outcome to a receiver, no Deferred)."""

    def __init__(self, failAtOnce: Exception | None = None) -> None:
        super().__init__()
        self.failAtOnce = failAtOnce
        self.sent: list[tuple[Any, Exchange]] = []

    def send(
        self, method: bytes, path: bytes, headers: Headers, body: Any, receiver: Any,
        hashKey: bytes | None = None,
    ) -> Exchange:
        exchange = Exchange()
        self.sent.append((receiver, exchange))
        if self.failAtOnce is not None:
            receiver.upstreamFailed(Failure(self.failAtOnce))
        return exchange


class PoolResponse:
    """What UpstreamPool.send hands its receiver (status, fields, length)."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.reason = b"OK"
        self.fields = Fields()
        self.length = len(body)
        self.backend = "10.0.0.1:8080"
        self._body = FakeResponse(status, {}, body, length=len(body))

    def deliverBody(self, protocol: Any) -> None:
        self._body.deliverBody(protocol)


def _sendingClient(pool: SendingPool) -> Client:
    client = Client()
    client.pool = pool
    client.runtime.pools["app"] = pool  # type: ignore[index]
    return client


def test_outcomeWithoutDeferredFromPoolSend() -> None:
    """
    With a pool offering send, the response reaches the client through
    the receiver interface, and a client that goes away cancels the
    exchange.
    """
    pool = SendingPool()
    client = _sendingClient(pool)
    client.send(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n")
    [(receiver, exchange)] = pool.sent
    receiver.upstreamResponded(PoolResponse(200, b"ok"))
    assert client.wire().startswith(b"HTTP/1.1 200 OK\r\n")
    assert client.wire().endswith(b"\r\n\r\nok")
    client.send(b"GET /b HTTP/1.1\r\nHost: app.example\r\n\r\n")
    (_, second) = pool.sent[1]
    client.protocol.connectionLost(Failure(ConnectionError("gone")))
    assert second.cancelled and not exchange.cancelled


def test_poolSendFailingBeforeItReturns() -> None:
    """
    An outcome delivered before send returns (no backend available) is
    answered, and the finished exchange is not kept (nor cancelled later).
    """
    pool = SendingPool(failAtOnce=ServiceUnavailable("every server of app is down"))
    client = _sendingClient(pool)
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert client.wire().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert not client.transport.disconnecting
    client.protocol.connectionLost(Failure(ConnectionError("gone")))
    [(_, exchange)] = pool.sent
    assert not exchange.cancelled
