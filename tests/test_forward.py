"""
Tests for L{edgeproxy.pipeline.forward}: the last stage, run in memory
between the test doubles of L{edgeproxy.pipeline.testing} (the client) and
an in-memory pool of the upstream interface (L{tests.memorypool}): what the
pool is asked to send, and what the client gets of each outcome.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.python.failure import Failure

from edgeproxy.config.model import ProxySettings, Route, Server, Upstream
from edgeproxy.errors import BackendUnavailable, ServiceUnavailable, UpstreamTimeout
from edgeproxy.h1 import Fields
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.forward import Forward, isWebSocketUpgrade, stripPrefix
from edgeproxy.pipeline.testing import RecordingClient, makeRequest
from edgeproxy.pipeline.values import Request
from edgeproxy.upstream.balance import requestHashKey
from tests.memorypool import MemoryPool, MemoryResponse

UPSTREAM = Upstream(name="app", servers=(Server("10.0.0.1", 8080),))
ROUTE = Route(name="r", hosts=("*",), paths=("/",), upstream="app")


class TunnelClient(RecordingClient):
    """A client side that records the tunnels it is asked to open."""

    def __init__(self) -> None:
        super().__init__()
        self.tunnels: list[tuple[Any, ...]] = []

    def tunnel(self, call: Call, pool: Any, fields: Fields, path: bytes, hashKey: bytes | None) -> None:
        self.tunnels.append((pool, fields, path, hashKey))


def forward(
    request: Request,
    route: Route = ROUTE,
    upstream: Upstream = UPSTREAM,
    proxy: ProxySettings | None = None,
    pool: MemoryPool | None = None,
) -> tuple[Call, TunnelClient, MemoryPool]:
    pool = pool or MemoryPool(upstream)
    stage = Forward(route, pool, proxy or ProxySettings())
    client = TunnelClient()
    call = Call(request, None, client, (stage,), 0.0)
    call.next()
    return call, client, pool


def test_fieldsRewrittenForTheBackend() -> None:
    request = makeRequest(
        method=b"POST",
        path=b"/a",
        query=b"?b=1",
        fields=[
            (b"host", b"example.com"),
            (b"connection", b"x-secret"),
            (b"x-secret", b"s"),
            (b"x-forwarded-for", b"203.0.113.1"),
            (b"accept", b"*/*"),
            (b"expect", b"100-continue"),
        ],
        client="192.0.2.7",
        length=3,
    )
    call, _, pool = forward(request, proxy=ProxySettings(via="edge"))
    [sent] = pool.sent
    assert (sent.method, sent.target, sent.receiver) == (b"POST", b"/a?b=1", call)
    assert list(sent.fields.pairs()) == [
        (b"host", b"example.com"),
        (b"accept", b"*/*"),
        (b"expect", b"100-continue"),
        (b"x-forwarded-for", b"192.0.2.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"example.com"),
        (b"forwarded", b"for=192.0.2.7;host=example.com;proto=https"),
        (b"via", b"1.1 edge"),
    ]
    assert call.upstreamName == "app"


def test_hostOverrideAndViaProtocol() -> None:
    upstream = Upstream(name="app", servers=UPSTREAM.servers, host_header="backend.internal")
    for version, via in ((b"HTTP/1.0", b"1.0 edge"), (b"HTTP/2", b"2 edge")):
        _, _, pool = forward(makeRequest(version=version), upstream=upstream, proxy=ProxySettings(via="edge"))
        fields = pool.sent[0].fields
        assert fields.get(b"host") == b"backend.internal"
        assert fields.get(b"x-forwarded-host") == b"example.com"
        assert fields.getAll(b"via") == [via]


def test_trustedPeerKeepsItsForwardingFields() -> None:
    import ipaddress

    request = makeRequest(fields=[(b"host", b"example.com"), (b"x-forwarded-for", b"203.0.113.1")])
    proxy = ProxySettings(trusted_proxies=(ipaddress.ip_network("192.0.2.0/24"),))
    _, _, pool = forward(request, proxy=proxy)
    assert pool.sent[0].fields.getAll(b"x-forwarded-for") == [b"203.0.113.1, 192.0.2.1"]


@pytest.mark.parametrize(
    "path,prefix,stripped",
    [
        (b"/api/x", b"/api", b"/x"),
        (b"/api", b"/api", b"/"),
        (b"/api/", b"/api/", b"/"),
        (b"/api/x/y", b"/api/", b"/x/y"),
        (b"/x", b"/", b"/x"),
    ],
)
def test_stripPrefix(path: bytes, prefix: bytes, stripped: bytes) -> None:
    assert stripPrefix(path, prefix) == stripped


def test_stripPrefixOnlyWhenTheRouteAsks() -> None:
    request = makeRequest(path=b"/api/users", query=b"?id=3")._replace(prefix=b"/api")
    stripping = Route(name="r", hosts=("*",), paths=("/api",), upstream="app", strip_prefix=True)
    assert forward(request, route=stripping)[2].sent[0].target == b"/users?id=3"
    assert forward(request)[2].sent[0].target == b"/api/users?id=3"
    # An empty query keeps its "?".
    assert forward(makeRequest(path=b"/a", query=b"?"))[2].sent[0].target == b"/a?"


def test_hashKeyFromTheClientsRequest() -> None:
    """
    With C{balance = hash} the key is computed from the client's own fields
    (not the rewritten ones) and the path as routed (before strip_prefix);
    other policies get none.
    """
    hashed = Upstream(name="app", servers=UPSTREAM.servers, balance="hash", hash_key="header:x-user")
    stripping = Route(name="r", hosts=("*",), paths=("/api",), upstream="app", strip_prefix=True)
    request = makeRequest(path=b"/api/x", fields=[(b"host", b"h"), (b"x-user", b"alice")])._replace(prefix=b"/api")
    assert forward(request, route=stripping, upstream=hashed)[2].sent[0].hashKey == b"alice"
    byPath = Upstream(name="app", servers=UPSTREAM.servers, balance="hash", hash_key="path")
    assert forward(request, route=stripping, upstream=byPath)[2].sent[0].hashKey == b"/api/x"
    byClient = Upstream(name="app", servers=UPSTREAM.servers, balance="hash", hash_key="client_ip")
    assert forward(request, upstream=byClient)[2].sent[0].hashKey == b"192.0.2.1"
    assert forward(request)[2].sent[0].hashKey is None
    assert requestHashKey("header:x-user", "192.0.2.1", request.fields, b"/") == b"alice"


def test_responseBecomesTheClientsAnswer() -> None:
    call, client, pool = forward(makeRequest())
    pool.sent[0].respond(
        MemoryResponse(
            404, [(b"server", b"nginx"), (b"x-powered-by", b"php"), (b"content-type", b"text/plain")],
            b"gone", length=4, reason=b"Not Found", backend="10.0.0.2:8080",
        )
    )
    response = client.response
    assert response is not None
    assert (response.status, response.reason, response.length) == (404, b"Not Found", 4)
    assert list(response.fields.pairs()) == [(b"content-type", b"text/plain")]
    assert (client.body, client.complete) == (b"gone", True)
    assert call.backend == "10.0.0.2:8080"
    assert call.cancelHook is None


@pytest.mark.parametrize(
    "error,status",
    [
        (BackendUnavailable("connect to 10.0.0.1:8080 refused"), 502),
        (UpstreamTimeout("no response in 60s"), 504),
        (ServiceUnavailable("every server down"), 503),
        (ConnectionResetError("a bug, not a ProxyError"), 502),
    ],
)
def test_failureBecomesTheClientsError(error: Exception, status: int) -> None:
    call, client, pool = forward(makeRequest())
    pool.sent[0].receiver.upstreamFailed(Failure(error))
    assert client.error is not None and client.status == status
    assert call.cancelHook is None


def test_interimResponsesPassedOn() -> None:
    _, client, pool = forward(makeRequest())
    pool.sent[0].interim(103, b"Early Hints", [(b"link", b"</a>")])
    assert [(status, fields.get(b"link")) for status, fields in client.interims] == [(103, b"</a>")]


def test_clientGoneCancelsTheExchange() -> None:
    call, client, pool = forward(makeRequest())
    [exchange] = pool.sent
    call.cancel()
    assert exchange.cancelled
    # The outcome that still comes reaches nobody.
    response = exchange.respond(MemoryResponse(200, [], b"late", complete=False))
    assert client.response is None
    assert response.transport.producerState == "stopped"


def test_outcomeBeforeSendReturnsKeepsNoHandle() -> None:
    """
    A pool that fails before send returns (no backend available): the
    client has its answer, and the finished exchange is not kept to be
    cancelled later.
    """
    call, client, pool = forward(makeRequest(), pool=MemoryPool(UPSTREAM, failAtOnce=ServiceUnavailable("down")))
    assert client.status == 503
    assert call.cancelHook is None
    call.cancel()
    assert not pool.sent[0].cancelled


# WebSockets -------------------------------------------------------------------

UPGRADE = [(b"host", b"example.com"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-key", b"k")]


def test_webSocketHandedToTheClientsTunnel() -> None:
    hashed = Upstream(name="app", servers=UPSTREAM.servers, balance="hash", hash_key="header:x-user")
    request = makeRequest(path=b"/chat", query=b"?room=1", fields=UPGRADE + [(b"x-user", b"bob")])
    call, client, pool = forward(request, upstream=hashed)
    assert pool.sent == []
    [(tunnelPool, fields, path, hashKey)] = client.tunnels
    assert (tunnelPool, path, hashKey) == (pool, b"/chat?room=1", b"bob")
    assert fields.getAll(b"connection") == [b"upgrade"]
    assert fields.getAll(b"upgrade") == [b"websocket"]
    assert fields.get(b"sec-websocket-key") == b"k"
    assert fields.get(b"x-forwarded-for") == b"192.0.2.1"
    assert call.upstreamName == "app"


def test_webSocketOnARouteWithoutThemIsAPlainRequest() -> None:
    """An Upgrade the route does not allow is dropped with the other
    hop-by-hop fields, and the request is forwarded as any other."""
    noSockets = Route(name="r", hosts=("*",), paths=("/",), upstream="app", websocket=False)
    _, client, pool = forward(makeRequest(fields=UPGRADE), route=noSockets)
    assert client.tunnels == []
    [sent] = pool.sent
    assert b"upgrade" not in sent.fields and b"connection" not in sent.fields


@pytest.mark.parametrize(
    "method, version, length, pairs, expected",
    [
        (b"GET", b"HTTP/1.1", 0, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], True),
        (b"GET", b"HTTP/1.1", 0, [(b"Upgrade", b"WebSocket"), (b"Connection", b"keep-alive, UPGRADE")], True),
        (b"GET", b"HTTP/1.1", 0, [(b"Upgrade", b"foo, websocket"), (b"Connection", b"upgrade")], True),
        (b"GET", b"HTTP/1.1", 0, [(b"Upgrade", b"websocket"), (b"Connection", b"x"), (b"Connection", b"upgrade")], True),
        (b"POST", b"HTTP/1.1", 0, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], False),
        (b"get", b"HTTP/1.1", 0, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], False),
        (b"GET", b"HTTP/1.1", 0, [(b"Upgrade", b"h2c"), (b"Connection", b"Upgrade, HTTP2-Settings")], False),
        (b"GET", b"HTTP/1.1", 0, [(b"Upgrade", b"websocket")], False),
        (b"GET", b"HTTP/1.1", 0, [(b"Upgrade", b"websocket"), (b"Connection", b"keep-alive")], False),
        (b"GET", b"HTTP/1.1", 0, [(b"Connection", b"Upgrade")], False),
        (b"GET", b"HTTP/1.1", 0, [(b"Upgrade", b"websocketx"), (b"Connection", b"Upgrade")], False),
        # A body (declared or chunked) is no handshake.
        (b"GET", b"HTTP/1.1", 5, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], False),
        (b"GET", b"HTTP/1.1", None, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], False),
        # HTTP/1.0 ignores Upgrade; HTTP/2 has none (RFC 8441 is its own).
        (b"GET", b"HTTP/1.0", 0, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], False),
        (b"GET", b"HTTP/2", 0, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], False),
    ],
)
def test_isWebSocketUpgrade(
    method: bytes, version: bytes, length: int | None, pairs: list[tuple[bytes, bytes]], expected: bool
) -> None:
    request = makeRequest(method=method, version=version, length=length, fields=[(b"host", b"h"), *pairs])
    assert isWebSocketUpgrade(request) is expected


def test_http2UpgradeIsForwardedWithoutIt() -> None:
    """An HTTP/2 request cannot be taken over: no tunnel is attempted, and
    its Upgrade never reaches the backend."""
    _, client, pool = forward(makeRequest(version=b"HTTP/2", fields=UPGRADE))
    assert client.tunnels == []
    assert b"upgrade" not in pool.sent[0].fields
