"""
The request path end to end, in memory: a real L{ListenerFactory} and
L{HTTP1Connection} over a memory transport, whose routes end in the real
L{edgeproxy.pipeline.forward.Forward} stage over an in-memory upstream pool
(L{tests.memorypool}) the test answers.  Assertions are on the bytes the
client gets and on what the upstream request carried; the error pages are
L{edgeproxy.http.errorpages}'.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from edgeproxy.config.model import Limits, Listener, Route
from edgeproxy.config.stagemodel import RouteForwarding
from edgeproxy.errors import BackendUnavailable, ServiceUnavailable
from edgeproxy.http.errorpages import errorBody
from edgeproxy.http.server import DISCARD_LIMIT
from tests.memorypool import MemoryPool, MemoryResponse, ProxyClient as Client
from tests.test_pool import makeFleet


def test_bodyReachesUpstreamBeforeItIsComplete() -> None:
    client = Client()
    client.send(b"POST /upload?x=1 HTTP/1.1\r\nHost: app.example\r\nContent-Length: 10\r\n\r\nfour")
    [call] = client.sent
    assert (call.method, call.target) == (b"POST", b"/upload?x=1")
    assert call.fields.getAll(b"host") == [b"app.example"]
    assert call.fields.getAll(b"x-forwarded-for") == [b"192.0.2.7"]
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
    [call] = client.sent
    assert call.body is None
    call.respond(
        MemoryResponse(
            200,
            [(b"Server", b"Secret/1"), (b"X-Powered-By", b"x"), (b"Content-Type", b"text/plain")],
            b"body",
            length=4,
        )
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
    client.sent[0].respond(MemoryResponse(200, [], b"abc"))
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
    assert client.sent == []
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert len(client.sent) == 1


def test_badTargetIs400() -> None:
    client = Client()
    client.send(b"GET /a%2fb HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert client.wire().startswith(b"HTTP/1.1 400 ")
    assert client.sent == []


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
    assert client.sent == []


def test_streamedBodyOverLimitIsCut() -> None:
    client = Client()
    client.send(b"POST /x HTTP/1.1\r\nHost: small.example\r\nTransfer-Encoding: chunked\r\n\r\n")
    [call] = client.sent
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


def test_streamedBodyOverLimitIs413WithTheRealPool() -> None:
    """
    With the real upstream pool, the body's failure is not answered as the
    backend's (a 502): the client that sent too much learns so (413), and
    the backend connection that had the request's head is dropped.
    """
    from tests.test_pool import makePool

    pool, endpoint, _ = makePool()
    client = Client(pool=pool)  # type: ignore[arg-type]
    client.send(b"POST /x HTTP/1.1\r\nHost: small.example\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(b"40\r\n" + b"a" * 64 + b"\r\n")
    [(_, backend)] = endpoint.connections
    assert backend.value().startswith(b"POST /x HTTP/1.1\r\n")
    client.send(b"40\r\n" + b"b" * 64 + b"\r\n")
    assert client.wire().startswith(b"HTTP/1.1 413 ")
    assert client.transport.disconnecting
    assert backend.disconnecting or backend.disconnected


def test_upstreamFailureIsGeneric502() -> None:
    client = Client(pool=MemoryPool(failAtOnce=BackendUnavailable("connect to 10.0.0.1:8080: refused")))
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    wire = client.wire()
    assert wire.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert wire.endswith(b"\r\n\r\n502 Bad Gateway\n")
    assert b"10.0.0.1" not in wire and b"refused" not in wire


def test_upstreamFailureDuringUploadAnsweredAtOnce() -> None:
    """
    The client does not have to upload everything to learn the backend is
    down: the 502 goes at once; the rest of its body is read and dropped,
    and the connection serves its next request.
    """
    client = Client()
    client.send(b"POST /x HTTP/1.1\r\nHost: app.example\r\nContent-Length: 1000\r\n\r\nabc")
    client.sent[0].fail(BackendUnavailable("refused"))
    assert client.wire().startswith(b"HTTP/1.1 502 ")
    assert not client.transport.disconnecting
    client.send(b"x" * 997 + b"GET /next HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert [call.target for call in client.sent] == [b"/x", b"/next"]
    assert not client.transport.disconnecting


def test_bodyDroppedAfterTheAnswerIsBounded() -> None:
    """Past DISCARD_LIMIT dropped bytes the connection closes instead."""
    client = Client()
    client.send(b"POST /x HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.sent[0].fail(BackendUnavailable("refused"))
    assert client.wire().startswith(b"HTTP/1.1 502 ")
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    for _ in range(DISCARD_LIMIT // (64 * 1024)):
        client.send(chunk)
    assert not client.transport.disconnecting
    client.send(chunk)
    assert client.transport.disconnecting


def test_noBackendAvailableIs503WithRetryAfter() -> None:
    client = Client()
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[0].fail(ServiceUnavailable("every server of app is down"))
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nRetry-After: 5" in head
    assert body == errorBody(503)
    assert b"app" not in body


def test_errorPagesOtherThan503HaveNoRetryAfter() -> None:
    client = Client()
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[0].fail(BackendUnavailable("refused"))
    assert client.wire().startswith(b"HTTP/1.1 502 ")
    assert b"Retry-After" not in client.wire()


def test_headResponseHasNoBody() -> None:
    client = Client()
    client.send(b"HEAD /file HTTP/1.1\r\nHost: app.example\r\n\r\n")
    # The backend's Content-Length comes as the response's length.
    client.sent[0].respond(MemoryResponse(200, [], length=1000))
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert b"Content-Length: 1000" in head
    assert body == b""


def test_noContentHasNoBodyOrChunking() -> None:
    client = Client()
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[0].respond(MemoryResponse(204, []))
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204 ")
    assert b"Transfer-Encoding" not in head and body == b""


def test_truncatedResponseAbortsClient() -> None:
    client = Client()
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[0].respond(MemoryResponse(200, [], b"part", cut=True))
    assert not client.wire().endswith(b"0\r\n\r\n")
    assert client.transport.disconnecting


def test_completeResponseBeforeBodyIsSentAtOnce() -> None:
    """
    A complete response that comes while the request body is still arriving
    is sent at once, and the backend request no longer waits for the body;
    the rest of the body is read and dropped (no unread byte for the kernel
    to reset the connection over, RFC 9112 9.6), and the connection goes
    on.  (The HTTPChannel path held the response until the body was
    complete.)
    """
    client = Client()
    client.send(b"POST /x HTTP/1.1\r\nHost: app.example\r\nContent-Length: 6\r\n\r\nabc")
    call = client.sent[0]
    consumer = call.startBody()
    call.respond(MemoryResponse(401, [], b"no", length=2))
    wire = client.wire()
    assert wire.startswith(b"HTTP/1.1 401 ")
    assert b"Connection: close" not in wire
    assert wire.endswith(b"no")
    client.send(b"def")
    assert client.wire() == wire
    assert call.consumer.value() == b"abc"
    assert not client.transport.disconnecting


def test_stripPrefix() -> None:
    client = Client()
    client.send(b"GET /v1/users?id=3 HTTP/1.1\r\nHost: api.example\r\n\r\n")
    assert client.sent[0].target == b"/users?id=3"


def test_clientGoneCancelsUpstream() -> None:
    client = Client()
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    call = client.sent[0]
    assert len(client.factory.inflight) == 1
    client.lose(ConnectionError("gone"))
    assert call.cancelled
    assert client.factory.inflight == set()
    assert client.factory.channels == set()


def test_inflightAndChannelsTracked() -> None:
    client = Client()
    assert client.factory.channels == {client.protocol}
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert len(client.factory.inflight) == 1
    client.sent[0].respond(MemoryResponse(200, [], b"ok"))
    assert client.factory.inflight == set()


def test_http2OfferFollowsListener() -> None:
    """
    HTTP/2 is offered only on a listener that has it on (and only once a
    protocol for it exists); HTTP/1.1 always, last.
    """
    off = Client(Listener(name="l", endpoint="tcp:0", tls=True, http2=False))
    assert off.factory.acceptableProtocols() == [b"http/1.1"]
    on = Client(Listener(name="l", endpoint="tcp:0", tls=True, http2=True))
    assert on.factory.acceptableProtocols()[-1] == b"http/1.1"


def test_listenerLimitsReachConnection() -> None:
    limits = Limits(client_idle_timeout=7.0, max_header_size=2048)
    client = Client(Listener(name="l", endpoint="tcp:0", tls=False, limits=limits))
    assert client.protocol.limits is limits
    assert client.factory.idleQueue.period == 7.0


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[int, bytes]] = []

    def log(self, call: Any) -> None:
        self.lines.append((call.status, call.request.target))


def test_accessLogOncePerRequestEvenWhenCutShort() -> None:
    recorder = Recorder()
    client = Client(accessLog=recorder)
    client.send(b"GET /fine HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[0].respond(MemoryResponse(200, [], b"ok"))
    client.send(b"GET /cut HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[1].respond(MemoryResponse(200, [], b"part", cut=True))
    client.lose(ConnectionError("aborted"))
    assert recorder.lines == [(200, b"/fine"), (200, b"/cut")]


def test_accessLogForEarlyAnswerThenClose() -> None:
    recorder = Recorder()
    client = Client(accessLog=recorder)
    client.send(b"PUT /big HTTP/1.1\r\nHost: small.example\r\nContent-Length: 1000\r\n\r\n")
    client.lose(ConnectionError("closed"))
    assert recorder.lines == [(413, b"/big")]


def test_immediateUpstreamFailureOnGetKeepsConnection() -> None:
    client = Client(pool=MemoryPool(failAtOnce=BackendUnavailable("refused")))
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


def _loggedClient() -> tuple[Client, WriteLog]:
    transport = WriteLog(peerAddress=IPv4Address("TCP", "192.0.2.7", 5556))
    return Client(transport=transport), transport


def test_headAndBodyThatCameWithItLeaveInOneWrite() -> None:
    """
    The response head and a body the backend delivered with it reach the
    client transport in one write (over TLS: one record), chunked or not.
    """
    client, transport = _loggedClient()
    client.send(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[0].respond(MemoryResponse(200, [(b"Content-Type", b"text/plain")], b"body", length=4))
    [write] = transport.writes
    assert write.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: 4\r\n" in write
    assert write.endswith(b"\r\n\r\nbody")

    del transport.writes[:]
    client.send(b"GET /b HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[1].respond(MemoryResponse(200, [], b"abc"))
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in transport.writes[0]
    assert transport.writes[0].endswith(b"\r\n\r\n3\r\nabc\r\n")
    assert b"".join(transport.writes[1:]) == b"0\r\n\r\n"


def test_headOfABodyStillToComeIsSentAtOnce() -> None:
    """
    A response whose body has not arrived (a slow or endless body, such as
    server-sent events) has its head on the wire before any of the body.
    """
    client, transport = _loggedClient()
    client.send(b"GET /events HTTP/1.1\r\nHost: app.example\r\n\r\n")
    response = client.sent[0].respond(
        MemoryResponse(200, [(b"Content-Type", b"text/event-stream")], complete=False)
    )
    head = client.wire()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    response.write(b"data: 1\n\n")
    assert client.wire() == head + b"9\r\ndata: 1\n\n\r\n"


def test_outcomeThroughTheReceiver() -> None:
    """
    The response reaches the client through the receiver interface, and a
    client that goes away cancels the exchange in progress, not a finished
    one.
    """
    client = Client()
    client.send(b"GET /a HTTP/1.1\r\nHost: app.example\r\n\r\n")
    [first] = client.sent
    first.respond(MemoryResponse(200, [], b"ok", length=2))
    assert client.wire().startswith(b"HTTP/1.1 200 OK\r\n")
    assert client.wire().endswith(b"\r\n\r\nok")
    client.send(b"GET /b HTTP/1.1\r\nHost: app.example\r\n\r\n")
    second = client.sent[1]
    client.lose(ConnectionError("gone"))
    assert second.cancelled and not first.cancelled


def test_poolSendFailingBeforeItReturns() -> None:
    """
    An outcome delivered before send returns (no backend available) is
    answered, and the finished exchange is not kept (nor cancelled later).
    """
    client = Client(pool=MemoryPool(failAtOnce=ServiceUnavailable("every server of app is down")))
    client.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert client.wire().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert not client.transport.disconnecting
    client.lose(ConnectionError("gone"))
    [exchange] = client.sent
    assert not exchange.cancelled


def test_interimResponsesFromTheBackendPassedOn() -> None:
    """
    RFC 9110 15.2: 103 Early Hints (and 102) reach an HTTP/1.1 client before
    the final response; 100 only a client that asked for it.
    """
    client = Client()
    client.send(b"PUT /x HTTP/1.1\r\nHost: app.example\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    call = client.sent[0]
    assert call.fields.get(b"expect") == b"100-continue"
    assert client.wire() == b""
    call.interim(100, b"Continue")
    assert client.wire() == b"HTTP/1.1 100 Continue\r\n\r\n"
    call.interim(103, b"Early Hints", [(b"link", b"</s.css>; rel=preload")])
    client.send(b"ok")
    call.respond(MemoryResponse(201, [], b"", length=0, reason=b"Created"))
    interims = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    )
    assert client.wire().startswith(interims + b"HTTP/1.1 201 Created\r\n")
    assert client.wire().count(b"HTTP/1.1 201 ") == 1
    other = Client()
    other.send(b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    other.sent[0].interim(100, b"Continue")
    assert other.wire() == b""


def test_clientBehindATrustedProxy() -> None:
    """
    With trusted proxies in front, a request from one of them reaches the
    backend with its X-Forwarded-For chain kept and this hop appended, and
    the request's client is the address the proxy vouches for.
    """
    import ipaddress

    from edgeproxy.config.model import ProxySettings

    recorder: list[str] = []

    class ClientRecorder:
        def log(self, call: Any) -> None:
            recorder.append(call.request.client)

    client = Client(
        proxy=ProxySettings(trusted_proxies=(ipaddress.ip_network("192.0.2.0/24"),)),
        accessLog=ClientRecorder(),
    )
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 203.0.113.5\r\n\r\n")
    [call] = client.sent
    assert call.fields.getAll(b"x-forwarded-for") == [b"203.0.113.5, 192.0.2.7"]
    call.respond(MemoryResponse(200, [], b"", length=0))
    assert client.wire().startswith(b"HTTP/1.1 200 OK\r\n")
    assert recorder == ["203.0.113.5"]


def test_noSpoofedRealIPReachesTheBackend() -> None:
    """
    A client's X-Real-IP never reaches a backend, in any spelling, on the
    fast path (fields as read) and the general one (a Connection naming a
    field, a trusted peer); with client_ip_header = X-Real-IP the backend
    gets the client's real address, once.
    """
    import ipaddress

    from edgeproxy.config.model import ProxySettings

    spoofs = [
        b"X-Real-IP: 10.0.0.1\r\n",
        b"x-real-ip: 10.0.0.1\r\nX-REAL-IP: 10.0.0.2\r\n",
        b"X-Real-IP: 10.0.0.1\r\nConnection: keep-alive, x-other\r\nX-Other: 1\r\n",
    ]
    trusted = (ipaddress.ip_network("192.0.2.0/24"),)
    for proxy, expected in (
        (ProxySettings(), []),
        (ProxySettings(trusted_proxies=trusted), []),
        (ProxySettings(client_ip_header="X-Real-IP"), [b"192.0.2.7"]),
        (ProxySettings(client_ip_header="X-Real-IP", trusted_proxies=trusted), [b"203.0.113.5"]),
    ):
        for spoof in spoofs:
            client = Client(proxy=proxy)
            client.send(
                b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 203.0.113.5\r\n" + spoof + b"\r\n"
            )
            [call] = client.sent
            assert list(call.fields.getAll(b"x-real-ip")) == expected, (proxy, spoof)
# Timeouts and retries on the route's terms (a real pool) -------------------


def _timed(hosts: tuple[str, ...], forwarding: RouteForwarding | None = None) -> tuple[Client, Any, Any]:
    """A client whose route (app.example) forwards to a real pool of
    C{hosts} that never answer (response_timeout 5 s, retries 2)."""
    pool, reactor = makeFleet(hosts=hosts)
    route = Route(name="app", hosts=("app.example",), paths=("/",), upstream="app", forwarding=forwarding)
    return Client(pool=pool, clock=reactor, routes=(route,)), pool, reactor


def test_oneBackendTimingOutIs504AfterOneResponseTimeout() -> None:
    # The trial of issue 15: 504 after 5 s from one attempt, not after 15 s
    # from three.
    client, pool, reactor = _timed(("a",))
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    reactor.advance(4.9)
    assert client.wire() == b""
    reactor.advance(0.1)
    assert client.wire().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert client.wire().endswith(errorBody(504))
    assert pool.dialLog == ["a"]


def test_routesOwnResponseTimeoutReachesThePool() -> None:
    client, pool, reactor = _timed(("a",), RouteForwarding(response_timeout=20.0))
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    reactor.advance(19.9)
    assert client.wire() == b""
    reactor.advance(0.1)
    assert client.wire().startswith(b"HTTP/1.1 504 ")


def test_routesRequestTimeoutBoundsTheRetries() -> None:
    # Three backends that never answer: without a bound the client would
    # wait 15 s (5 s on each); the route's request_timeout answers at 8 s.
    client, pool, reactor = _timed(("a", "b", "c"), RouteForwarding(request_timeout=8.0))
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    reactor.advance(7.9)
    assert client.wire() == b"" and pool.dialLog == ["a", "b"]
    reactor.advance(0.1)
    assert client.wire().startswith(b"HTTP/1.1 504 ")
    reactor.advance(20)
    assert pool.dialLog == ["a", "b"]
