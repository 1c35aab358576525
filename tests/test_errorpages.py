"""
Tests for L{edgeproxy.http.errorpages}: custom error pages (C{error_pages})
on the wire, over HTTP/1.1 (a real L{ListenerFactory} and
L{HTTP1Connection} over a memory transport, real stages) and HTTP/2 (the
C{h2} library's client, L{tests.h2util}): every error the proxy makes
itself gets the route's page (or the global one), with the fields the
error carries; a backend's own error passes as it is.
"""

from __future__ import annotations

import ipaddress
import re

from twisted.internet.testing import MemoryReactorClock

from edgeproxy.config.model import Config, ProxySettings, Route
from edgeproxy.config.stagemodel import ErrorPage, ErrorPages, RateLimit, RouteCache
from edgeproxy.errors import BackendUnavailable, ServiceUnavailable, Unauthorized, UpstreamTimeout
from edgeproxy.http.errorpages import errorBody, errorResponse, rejection
from edgeproxy.pipeline.stages import buildPipelines
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime
from tests.h2util import Pair, request
from tests.memorypool import MemoryPool, MemoryResponse, ProxyClient
from tests.wireutil import undated

HTML = "text/html; charset=utf-8"
SITE_404 = ErrorPage("/srv/errors/404.html", HTML, b"<h1>Nothing here</h1>\n")
SITE_5XX = ErrorPage("/srv/errors/5xx.html", HTML, b"<h1>We are down</h1>\n")
API_5XX = ErrorPage("/srv/errors/api/5xx.json", "application/json", b'{"error": "unavailable"}\n')
API_429 = ErrorPage("/srv/errors/api/429.txt", "text/plain; charset=utf-8", b"slow down\n")
SITE = ErrorPages(exact=((404, SITE_404),), classes=((5, SITE_5XX),))
# The api route's own pages over the site's (as edgeproxy.config.errorpages
# merges them): its 5xx, its 429, the site's 404.
API = ErrorPages(exact=((404, SITE_404), (429, API_429)), classes=((5, API_5XX),))
PRIVATE_4XX = ErrorPage("/srv/errors/private/4xx.html", HTML, b"<h1>Staff only</h1>\n")
PRIVATE = ErrorPages(classes=((4, PRIVATE_4XX), (5, SITE_5XX)))

ROUTES = (
    Route(name="site", hosts=("app.example",), paths=("/",), upstream="app", error_pages=SITE),
    Route(
        name="api", hosts=("app.example",), paths=("/api",), upstream="app", error_pages=API,
        rate_limit=("one",), max_body_size=10,
    ),
    Route(
        name="private", hosts=("app.example",), paths=("/private",), upstream="app",
        deny=(ipaddress.ip_network("0.0.0.0/0"),), error_pages=PRIVATE,
    ),
    Route(
        name="closed", hosts=("app.example",), paths=("/closed",), upstream="app",
        deny=(ipaddress.ip_network("0.0.0.0/0"),), error_pages=SITE,
    ),
    Route(
        name="cached", hosts=("app.example",), paths=("/cached",), upstream="app",
        cache=RouteCache(), error_pages=SITE,
    ),
    Route(name="plain", hosts=("plain.example",), paths=("/",), upstream="app"),
)
LIMITS = {"one": RateLimit(name="one", count=1, window=60.0, burst=1)}


def makeClient(pool: MemoryPool | None = None, pages: ErrorPages = SITE) -> ProxyClient:
    clock = MemoryReactorClock()
    clock.advance(1000)
    proxy = ProxySettings(error_pages=pages)
    client = ProxyClient(clock=clock, proxy=proxy, pool=pool, routes=ROUTES)
    pools = {"app": client.pool}
    config = Config(
        path="/etc/edge.ini", proxy=proxy, tls=None, listeners=(),
        upstreams={"app": client.pool.upstream}, routes=ROUTES, ratelimits=LIMITS,
    )
    client.runtime = Runtime(
        config=config, router=Router(ROUTES), pools=pools,
        pipelines=buildPipelines(config, pools, None, {"reactor": clock}),
    )
    return client


def parse(wire: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    head, _, body = wire.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        fields.setdefault(name.lower(), []).append(value)
    return lines[0], fields, body


def get(client: ProxyClient, data: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    client.transport.clear()
    client.send(data)
    return parse(client.wire())


def test_noRouteGetsTheGlobalPage() -> None:
    client = makeClient()
    status, fields, body = get(client, b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
    assert status == b"HTTP/1.1 404 Not Found"
    assert body == SITE_404.body
    assert fields[b"content-type"] == [b"text/html; charset=utf-8"]
    assert fields[b"content-length"] == [b"%d" % len(body)]
    assert fields[b"cache-control"] == [b"no-store"]


def test_poolFailuresGetTheRoutesPageByClass() -> None:
    client = makeClient()
    client.send(b"GET /page HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[-1].fail(BackendUnavailable("refused"))
    status, fields, body = parse(client.wire())
    assert status == b"HTTP/1.1 502 Bad Gateway" and body == SITE_5XX.body
    client.transport.clear()
    client.send(b"GET /api/x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[-1].fail(UpstreamTimeout("slow"))
    status, fields, body = parse(client.wire())
    assert status == b"HTTP/1.1 504 Gateway Timeout" and body == API_5XX.body
    assert fields[b"content-type"] == [b"application/json"]


def test_fieldsOfTheErrorAreKept() -> None:
    # 503 keeps its Retry-After; 429 its Retry-After and RateLimit fields.
    client = makeClient(MemoryPool(failAtOnce=ServiceUnavailable("no backend")))
    status, fields, body = get(client, b"GET /api/1 HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert status == b"HTTP/1.1 503 Service Unavailable" and body == API_5XX.body
    assert fields[b"retry-after"] == [b"5"]
    status, fields, body = get(client, b"GET /api/2 HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert status == b"HTTP/1.1 429 Too Many Requests" and body == API_429.body
    assert fields[b"content-type"] == [b"text/plain; charset=utf-8"]
    assert b"retry-after" in fields and b"ratelimit" in fields and b"ratelimit-policy" in fields


def test_securityRefusalGetsThePage() -> None:
    client = makeClient()
    status, fields, body = get(client, b"GET /private HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert status == b"HTTP/1.1 403 Forbidden" and body == PRIVATE_4XX.body
    assert fields[b"content-type"] == [b"text/html; charset=utf-8"]
    # Without a page for 403 or 4xx: the built-in one.
    status, fields, body = get(client, b"GET /closed HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert status == b"HTTP/1.1 403 Forbidden" and body == errorBody(403)
    assert client.sent == []


def test_onlyIfCachedGetsThePage() -> None:
    client = makeClient()
    status, _, body = get(
        client, b"GET /cached HTTP/1.1\r\nHost: app.example\r\nCache-Control: only-if-cached\r\n\r\n"
    )
    assert status == b"HTTP/1.1 504 Gateway Timeout" and body == SITE_5XX.body


def test_tooLargeKeepsConnectionClose() -> None:
    client = makeClient()
    status, fields, body = get(
        client, b"POST /api HTTP/1.1\r\nHost: app.example\r\nContent-Length: 100\r\n\r\n"
    )
    assert status == b"HTTP/1.1 413 Content Too Large"
    assert body == errorBody(413)  # the api route has no page for it
    assert fields[b"connection"] == [b"close"]


def test_headGetsTheHeadOfThePage() -> None:
    client = makeClient()
    status, fields, body = get(client, b"HEAD / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
    assert status == b"HTTP/1.1 404 Not Found"
    assert fields[b"content-length"] == [b"%d" % len(SITE_404.body)] and body == b""


def test_backendErrorsPassAsTheyAre() -> None:
    client = makeClient()
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[-1].respond(
        MemoryResponse(502, [(b"content-type", b"text/plain")], b"backend says no", length=15)
    )
    status, fields, body = parse(client.wire())
    assert status.startswith(b"HTTP/1.1 502 ") and body == b"backend says no"


def test_routeWithoutPagesOfItsOwnHasTheBuiltInOnes() -> None:
    # The "plain" route was built without error_pages (in a configuration
    # read from a file it would have the global ones, merged).
    client = makeClient()
    client.send(b"GET / HTTP/1.1\r\nHost: plain.example\r\n\r\n")
    client.sent[-1].fail(BackendUnavailable("refused"))
    assert parse(client.wire())[2] == errorBody(502)


def test_malformedRequestLineGetsTheGlobalPage() -> None:
    bad = ErrorPage("/srv/errors/400.html", HTML, b"<h1>Bad request</h1>\n")
    client = makeClient(pages=ErrorPages(exact=((400, bad),)))
    client.send(b"GET /\x01 HTTP/1.1\r\nHost: app.example\r\n\r\n")
    status, fields, body = parse(client.wire())
    assert status == b"HTTP/1.1 400 Bad Request" and body == bad.body
    assert fields[b"content-type"] == [b"text/html; charset=utf-8"]
    assert fields[b"connection"] == [b"close"]
    assert client.transport.disconnecting
    # Refused by the parser itself (not a request line at all).
    client = makeClient(pages=ErrorPages(exact=((400, bad),)))
    client.send(b"\x16\x03\x01 garbage\r\n\r\n")
    status, fields, body = parse(client.wire())
    assert status == b"HTTP/1.1 400 Bad Request" and body == bad.body
    assert fields[b"connection"] == [b"close"]


def test_rejectionWithAPage() -> None:
    pages = ErrorPages(classes=((4, ErrorPage("/e/4xx.txt", "text/plain; charset=utf-8", b"no.\n")),))
    wire = rejection(431, pages)
    assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\r\n", wire)
    assert undated(wire) == (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 4\r\nCache-Control: no-store\r\nConnection: close\r\n\r\nno.\n"
    )
    assert undated(rejection(431)) == undated(rejection(431, None))  # the built-in one, unchanged
    assert b"no." not in rejection(431)


def test_rejectionIsNotStoredAndCarriesTheRequestId() -> None:
    """
    A refused head's answer, built-in page or custom, is never stored by a
    cache on the way (C{no-store}, as every error page) and carries the
    request's ID when it has one.
    """
    pages = ErrorPages(classes=((4, ErrorPage("/e/4xx.txt", "text/plain; charset=utf-8", b"no.\n")),))
    for page in (None, pages):
        wire = rejection(400, page, b"X-Request-ID: abc")
        head, _, body = wire.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert b"Cache-Control: no-store" in lines and b"X-Request-ID: abc" in lines
        assert b"Content-Length: %d" % len(body) in lines
        assert undated(rejection(400, page)) == undated(wire.replace(b"X-Request-ID: abc\r\n", b""))


def test_errorResponseKeepsTheChallenge() -> None:
    error = Unauthorized("no credentials")
    error.fields = ((b"www-authenticate", b'Basic realm="x"'),)
    response = errorResponse(error, SITE)
    assert response.status == 401
    assert response.fields.get(b"www-authenticate") == b'Basic realm="x"'
    assert response.body.takeBody() == errorBody(401)  # type: ignore[union-attr]


# HTTP/2 ------------------------------------------------------------------------


H2_ROUTES = (
    Route(name="site", hosts=("example.com",), paths=("/",), upstream="app", error_pages=API),
)


def test_http2NoRouteGetsTheGlobalPage() -> None:
    pair = Pair(routes=H2_ROUTES, proxy=ProxySettings(error_pages=SITE))
    stream = pair.get(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"other.test"), (b":path", b"/")]
    )
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"404" and body == SITE_404.body and ended
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    assert headers[b"content-length"] == b"%d" % len(SITE_404.body)


def test_http2StageErrorGetsTheRoutesPage() -> None:
    pair = Pair(routes=H2_ROUTES, proxy=ProxySettings(error_pages=SITE))
    pair.stage.answer = lambda call: call.fail(ServiceUnavailable("none"))
    stream = pair.get(request(b"/x"))
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"503" and body == API_5XX.body and ended
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"retry-after"] == b"5"


def test_http2RefusedHeadGetsTheGlobalPage() -> None:
    pair = Pair(routes=H2_ROUTES, proxy=ProxySettings(error_pages=ErrorPages(classes=((4, API_429),))))
    stream = pair.get(request(b"/", extra=[(b"x-%d" % n, b"v") for n in range(101)]))
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"431" and body == API_429.body and ended
