"""
The C{headers} stage (L{edgeproxy.headers.stage}) through the request path:
a real listener, the route's real stages (headers, cache, forward) over an
in-memory pool, HTTP/1.1 and HTTP/2.  Assertions are on what the backend
was sent and on the bytes the client got: every response of the route
(streamed, whole, a cache hit, the proxy's own error page) gets the
response rules; the security stages' refusals, which come before, do not.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport

from edgeproxy.cache.blocking import InlineBlocking
from edgeproxy.config.model import Config, Listener, ProxySettings, Route
from edgeproxy.config.stagemodel import CacheSettings, HeaderRules, RouteCache
from edgeproxy.errors import BackendUnavailable, UpstreamTimeout
from edgeproxy.headers.stage import HeadersStage
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.pipeline.forward import Forward
from edgeproxy.pipeline.stages import RoutePipeline, buildPipelines
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime
from tests.h2util import Pair, request, textResponse
from tests.memorypool import PEER, MemoryPool, MemoryResponse, fixedIds

REQUEST_RULES = HeaderRules(
    remove=("x-debug", "x-internal-*"),
    set=(("x-env", "prod"),),
    add=(("x-trace", "edge"),),
)
RESPONSE_RULES = HeaderRules(
    remove=("x-backend-*",),
    set=(("x-content-type-options", "nosniff"), ("cache-control", "no-store, private")),
    add=(("vary", "Origin"),),
)


def route(**kwargs: Any) -> Route:
    settings: dict[str, Any] = {
        "name": "app", "hosts": ("app.example",), "paths": ("/",), "upstream": "app",
        "request_headers": REQUEST_RULES, "response_headers": RESPONSE_RULES,
    }
    settings.update(kwargs)
    return Route(**settings)


class Site:
    """A listener whose routes are built as the runtime builds them."""

    def __init__(self, *routes: Route, cache: bool = False) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_800_000_000)
        self.pool = MemoryPool(clock=self.clock)
        config = Config(
            path="/etc/edge.ini", proxy=ProxySettings(), tls=None, listeners=(),
            upstreams={"app": self.pool.upstream}, routes=routes,
            cache=CacheSettings(memory=2**20) if cache else None,
        )
        pools = {"app": self.pool}
        self.pipelines = buildPipelines(
            config, pools, context={"reactor": self.clock, "blocking": InlineBlocking()}
        )
        self.runtime = Runtime(config=config, router=Router(routes), pools=pools, pipelines=self.pipelines)
        object.__setattr__(self.runtime, "requestIds", fixedIds())
        self.factory = ListenerFactory(
            lambda: self.runtime, Listener(name="l", endpoint="tcp:0", tls=False), self.clock
        )

    def get(self, head: bytes = b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n", peer: Any = PEER) -> StringTransport:
        transport = StringTransport(peerAddress=peer)
        protocol = self.factory.buildProtocol(peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(head)
        return transport


def headOf(transport: StringTransport) -> list[bytes]:
    return transport.value().partition(b"\r\n\r\n")[0].split(b"\r\n")


def fieldsOf(head: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The field lines after the status line, lower-case names, Date apart."""
    out = []
    for line in head[1:]:
        name, _, value = line.partition(b":")
        if name.lower() != b"date":
            out.append((name.lower(), value.strip()))
    return out


def test_aRouteWithoutRulesHasNoStage() -> None:
    site = Site(Route(name="app", hosts=("app.example",), paths=("/",), upstream="app"))
    assert [type(stage) for stage in site.pipelines["app"].stages] == [Forward]
    site = Site(route(response_headers=None))
    assert [type(stage) for stage in site.pipelines["app"].stages] == [HeadersStage, Forward]


def test_requestRulesReachTheBackend() -> None:
    site = Site(route())
    site.get(
        b"GET /x HTTP/1.1\r\nHost: app.example\r\nX-Debug: 1\r\nX-Internal-User: root\r\n"
        b"X-Env: dev\r\nX-Trace: client\r\nAccept: */*\r\n\r\n"
    )
    [exchange] = site.pool.sent
    sent = exchange.fields
    assert b"x-debug" not in sent and b"x-internal-user" not in sent
    assert sent.getAll(b"x-env") == [b"prod"]
    assert sent.getAll(b"x-trace") == [b"client", b"edge"]
    assert sent.getAll(b"accept") == [b"*/*"]
    assert sent.getAll(b"host") == [b"app.example"]


def test_responseRulesOnABackendsResponse() -> None:
    site = Site(route())
    client = site.get()
    site.pool.sent[0].respond(
        MemoryResponse(
            200,
            [(b"Content-Type", b"text/html"), (b"X-Backend-Host", b"web-3"), (b"Cache-Control", b"max-age=60"),
             (b"Vary", b"Accept-Encoding")],
            b"hello",
            length=5,
        )
    )
    head = headOf(client)
    assert head[0] == b"HTTP/1.1 200 OK"
    assert fieldsOf(head) == [
        (b"content-length", b"5"),
        (b"content-type", b"text/html"),
        (b"vary", b"Accept-Encoding"),
        (b"vary", b"Origin"),
        (b"x-content-type-options", b"nosniff"),
        (b"cache-control", b"no-store, private"),
        (b"x-request-id", b"1" * 32),
    ]
    assert client.value().endswith(b"\r\n\r\nhello")


def test_responseRulesOnAStreamedResponse() -> None:
    """A body of unknown length, sent as it comes: its head has the rules."""
    site = Site(route())
    client = site.get()
    response = site.pool.sent[0].respond(MemoryResponse(200, [(b"X-Backend-A", b"1")], b"first", complete=False))
    head = headOf(client)
    assert (b"transfer-encoding", b"chunked") in fieldsOf(head)
    assert (b"x-content-type-options", b"nosniff") in fieldsOf(head)
    assert b"x-backend-a" not in dict(fieldsOf(head))
    response.write(b"second")
    response.end()
    assert client.value().endswith(b"6\r\nsecond\r\n0\r\n\r\n")


def test_responseRulesOnTheProxysErrorPages() -> None:
    """
    What failed after the stage (a backend that cannot be reached, one that
    does not answer in time) is answered with the error page and the rules.
    """
    for error, status in ((BackendUnavailable("refused"), b"502"), (UpstreamTimeout("slow"), b"504")):
        site = Site(route())
        client = site.get()
        site.pool.sent[0].fail(error)
        head = headOf(client)
        assert head[0].startswith(b"HTTP/1.1 " + status)
        fields = fieldsOf(head)
        assert (b"x-content-type-options", b"nosniff") in fields
        # Set: in place of the error page's own no-store.
        assert [value for name, value in fields if name == b"cache-control"] == [b"no-store, private"]
        assert (b"vary", b"Origin") in fields


def test_responseRulesOnHeadAndNotModified() -> None:
    site = Site(route())
    client = site.get(b"HEAD /x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    site.pool.sent[0].respond(MemoryResponse(200, [], b"", length=10))
    assert (b"x-content-type-options", b"nosniff") in fieldsOf(headOf(client))
    assert client.value().endswith(b"\r\n\r\n")
    client = site.get(b"GET /x HTTP/1.1\r\nHost: app.example\r\nIf-None-Match: \"a\"\r\n\r\n")
    site.pool.sent[1].respond(MemoryResponse(304, [(b"ETag", b'"a"')], b""))
    head = headOf(client)
    assert head[0].startswith(b"HTTP/1.1 304 ")
    assert (b"x-content-type-options", b"nosniff") in fieldsOf(head)


def test_responseRulesOnCacheHits() -> None:
    """
    The cache comes after the rules' stage: a stored response is stored as
    the backend sent it, and the rules apply to each hit as to the miss.
    """
    site = Site(route(cache=RouteCache()), cache=True)
    miss = site.get()
    [exchange] = site.pool.sent
    exchange.respond(
        MemoryResponse(
            200, [(b"Cache-Control", b"public, max-age=60"), (b"X-Backend-Host", b"web-3")], b"hello", length=5,
        )
    )
    site.clock.advance(5)
    hit = site.get()
    assert len(site.pool.sent) == 1, "answered from the cache"
    for client in (miss, hit):
        fields = fieldsOf(headOf(client))
        assert (b"x-content-type-options", b"nosniff") in fields
        assert [value for name, value in fields if name == b"cache-control"] == [b"no-store, private"]
        assert b"x-backend-host" not in dict(fields)
        assert client.value().endswith(b"hello")
    hitFields = dict(fieldsOf(headOf(hit)))
    assert hitFields[b"cache-status"].endswith(b"hit; ttl=55") and hitFields[b"age"] == b"5"


def test_notOnRefusalsOfTheStagesBefore() -> None:
    """
    An access rule's 403 answers before the rules' stage: no rules (the
    documented boundary), but the request's ID all the same.
    """
    site = Site(route(deny=(ipaddress.ip_network("192.0.2.0/24"),)))
    client = site.get()
    head = headOf(client)
    assert head[0].startswith(b"HTTP/1.1 403 ")
    fields = dict(fieldsOf(head))
    assert b"x-content-type-options" not in fields and fields[b"cache-control"] == b"no-store"
    assert fields[b"x-request-id"] == b"1" * 32
    assert site.pool.sent == []


def test_overHTTP2() -> None:
    """
    The same rules over HTTP/2: the request the route's next stage sees,
    and the response's header list (lower case, as HTTP/2 has it), an
    error page's too.
    """
    pair = Pair()
    runtime = pair.factory.currentRuntime()
    object.__setattr__(runtime, "requestIds", fixedIds())
    stages = (
        ("headers", HeadersStage.fromRoute(route())),
        ("forward", pair.stage),
    )
    runtime.pipelines["all"] = RoutePipeline(stages, 30.0)  # type: ignore[arg-type]
    pair.stage.answer = lambda call: call.respond(
        textResponse(200, b"hi", [(b"content-type", b"text/plain"), (b"x-backend-host", b"web-3")])
    )
    stream = pair.get(request(b"/", extra=[(b"x-debug", b"1"), (b"x-env", b"dev")]))
    [seen] = pair.stage.requests
    assert b"x-debug" not in seen.fields and seen.fields.getAll(b"x-env") == [b"prod"]
    headers, body, ended = pair.response(stream)
    assert (headers[b":status"], body, ended) == (b"200", b"hi", True)
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"cache-control"] == b"no-store, private"
    assert headers[b"x-request-id"] == b"1" * 32
    assert b"x-backend-host" not in headers

    pair.stage.answer = lambda call: call.fail(BackendUnavailable("refused"))
    stream = pair.get(request(b"/"))
    headers, body, _ = pair.response(stream)
    assert headers[b":status"] == b"502"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"x-request-id"] == b"1" * 32
