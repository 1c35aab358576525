"""
Tests for L{edgeproxy.cache.stage}: the cache stage on the request path
end to end, in memory: a real L{ListenerFactory} and L{HTTP1Connection}
over memory transports, a route whose stages are the cache stage (and, for
variants, the real compression and image stages, the latter over
conversion processes played in this process, L{tests.imagepool}) then the
real L{Forward} stage over an in-memory upstream pool (L{tests.memorypool}) the
test answers.  The clock is the memory reactor's.  Assertions are on the
bytes the clients get and on what reached the upstream.
"""

from __future__ import annotations

import gzip as gzip_
import ipaddress
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from edgeproxy.cache.directives import formatHTTPDate
from edgeproxy.cache.blocking import InlineBlocking
from edgeproxy.cache.kind import storesOf
from edgeproxy.config.model import Config, Listener, ProxySettings, Route
from edgeproxy.config.stagemodel import CacheSettings, CompressSettings, ImageSettings, RouteCache
from edgeproxy.errors import BackendUnavailable
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.metrics import Metrics
from edgeproxy.pipeline.stages import buildPipelines
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime
from tests.imagepool import makePool
from tests.memorypool import PEER, Exchange, MemoryPool, MemoryResponse

NOW = 1_700_000_000.0


def parse(wire: bytes) -> list[tuple[int, dict[str, list[str]], bytes]]:
    """Every response on C{wire} (Content-Length or chunked)."""
    responses = []
    while wire:
        head, _, rest = wire.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields.setdefault(name.strip().lower(), []).append(value.strip())
        if "content-length" in fields:
            length = int(fields["content-length"][0])
            body, wire = rest[:length], rest[length:]
            if status == 304 or status == 204:
                body, wire = b"", rest
        elif "chunked" in fields.get("transfer-encoding", [""])[0]:
            body = b""
            while True:
                size, _, rest = rest.partition(b"\r\n")
                count = int(size, 16)
                if count == 0:
                    wire = rest[2:]
                    break
                body += rest[:count]
                rest = rest[count + 2 :]
        else:
            body, wire = b"", rest
        responses.append((status, fields, body))
    return responses


class Site:
    """
    One route with C{cache = yes} in front of a L{MemoryPool}; every
    L{get} is a new client connection.
    """

    def __init__(
        self,
        cache: CacheSettings | None = None,
        route: RouteCache | None = None,
        compress: CompressSettings | None = None,
        images: ImageSettings | None = None,
        holdConversions: bool = False,
        stores: Any = None,
        errorPages: Any = None,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.pool = MemoryPool()
        self.metrics = Metrics()
        routes = (
            Route(
                name="app", hosts=("app.example",), paths=("/",), upstream="app", cache=route or RouteCache(),
                compress=compress, images=images,
                error_pages=errorPages,
            ),
        )
        self.imagePool, self.conversions = makePool(workers=1, queue=0, hold=holdConversions)
        self.config = Config(
            path="/etc/edge.ini", proxy=ProxySettings(), tls=None, listeners=(),
            upstreams={"app": self.pool.upstream}, routes=routes, cache=cache or CacheSettings(memory=2**20),
        )
        pools = {"app": self.pool}
        pipelines = buildPipelines(
            self.config, pools,
            context={
                "reactor": self.clock, "blocking": InlineBlocking(), "metrics": self.metrics,
                "imagePool": self.imagePool,
            },
        )
        self.runtime = Runtime(config=self.config, router=Router(routes), pools=pools, pipelines=pipelines)
        self.stores = storesOf(pipelines)
        self.factory = ListenerFactory(
            lambda: self.runtime, Listener(name="l", endpoint="tcp:0", tls=False), self.clock
        )

    @property
    def counters(self) -> Any:
        return self.metrics.cache

    def get(self, target: bytes = b"/x", headers: list[tuple[bytes, bytes]] = (), method: bytes = b"GET",
            peer: Any = PEER) -> StringTransport:
        transport = StringTransport(peerAddress=peer)
        protocol = self.factory.buildProtocol(peer)
        protocol.makeConnection(transport)
        lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        protocol.dataReceived(method + b" " + target + b" HTTP/1.1\r\nHost: app.example\r\n" + lines + b"\r\n")
        transport.protocol = protocol  # type: ignore[attr-defined]
        return transport

    def one(self, transport: StringTransport) -> tuple[int, dict[str, list[str]], bytes]:
        [response] = parse(transport.value())
        return response

    @property
    def sent(self) -> list[Exchange]:
        return self.pool.sent

    def answer(self, exchange: Exchange, status: int = 200, fields: list[tuple[bytes, bytes]] = (),
               body: bytes = b"hello", **kw: Any) -> MemoryResponse:
        return exchange.respond(MemoryResponse(status, fields, body, length=len(body), **kw))


def status(fields: dict[str, list[str]]) -> str:
    return fields["cache-status"][-1]


FRESH = [(b"Cache-Control", b"max-age=60"), (b"ETag", b'"v1"')]


def test_missThenHit() -> None:
    site = Site()
    first = site.get()
    [exchange] = site.sent
    site.answer(exchange, fields=FRESH + [(b"Surrogate-Key", b"a b"), (b"CDN-Cache-Control", b"max-age=120")])
    code, fields, body = site.one(first)
    assert (code, body) == (200, b"hello")
    assert status(fields) == "edgeproxy; fwd=uri-miss; fwd-status=200; stored; ttl=120"
    # Tags and the targeted field never reach the client.
    assert "surrogate-key" not in fields and "cdn-cache-control" not in fields
    site.clock.advance(30)
    code, fields, body = site.one(site.get())
    assert (code, body) == (200, b"hello")
    assert status(fields) == "edgeproxy; hit; ttl=90"
    assert fields["age"] == ["30"]
    assert "surrogate-key" not in fields and "cdn-cache-control" not in fields
    assert len(site.sent) == 1
    assert (site.counters.hits, site.counters.misses) == (1, 1)


@pytest.mark.parametrize(
    "fields, request_, detail",
    [
        ([(b"Cache-Control", b"no-store")], [], "no-store"),
        ([(b"Cache-Control", b"private, max-age=60")], [], "private"),
        (FRESH + [(b"Set-Cookie", b"s=1")], [], "set-cookie"),
        # Cache deception: a request with a session, an answer without
        # cache headers that a heuristic could keep.
        ([(b"Last-Modified", formatHTTPDate(NOW - 86400))], [(b"Cookie", b"session=secret")], "cookie"),
        (FRESH, [(b"Authorization", b"Bearer x")], "authorization"),
        ([], [], "no-lifetime"),
    ],
)
def test_notStored(fields: list[tuple[bytes, bytes]], request_: list[tuple[bytes, bytes]], detail: str) -> None:
    site = Site()
    first = site.get(headers=request_)
    site.answer(site.sent[0], fields=fields)
    code, got, _ = site.one(first)
    assert status(got) == f"edgeproxy; fwd=uri-miss; fwd-status=200; detail={detail}"
    site.get(headers=request_)
    assert len(site.sent) == 2


def test_cacheCookiesStoresWithoutTheCookie() -> None:
    site = Site(route=RouteCache(cache_cookies=True))
    first = site.get(headers=[(b"Cookie", b"a=1")])
    site.answer(site.sent[0], fields=FRESH + [(b"Set-Cookie", b"s=mine")])
    assert site.one(first)[1]["set-cookie"] == ["s=mine"]
    code, fields, _ = site.one(site.get())
    assert status(fields).startswith("edgeproxy; hit") and "set-cookie" not in fields


def test_headFromAStoredGet() -> None:
    site = Site()
    site.answer(_first(site), fields=FRESH)
    head = site.get(method=b"HEAD")
    wire = head.value()
    assert wire.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 5\r\n" in wire and wire.endswith(b"\r\n\r\n")
    assert len(site.sent) == 1


def _first(site: Site) -> Exchange:
    site.get()
    return site.sent[0]


def test_headMissIsForwardedAndNotStored() -> None:
    site = Site()
    head = site.get(method=b"HEAD")
    [exchange] = site.sent
    assert exchange.method == b"HEAD"
    exchange.respond(MemoryResponse(200, FRESH, b"", length=5))
    assert b"fwd=uri-miss" in head.value()
    site.get()
    assert len(site.sent) == 2


@pytest.mark.parametrize(
    "request_, code",
    [
        ([(b"If-None-Match", b'"v1"')], 304),
        ([(b"If-None-Match", b'"v0", W/"v1"')], 304),
        ([(b"If-None-Match", b'"v2"')], 200),
        ([(b"If-Modified-Since", formatHTTPDate(NOW))], 304),
        ([(b"If-Modified-Since", formatHTTPDate(NOW - 7200))], 200),
        ([(b"If-Match", b'"v2"')], 412),
        ([(b"If-Unmodified-Since", formatHTTPDate(NOW - 7200))], 412),
    ],
)
def test_clientConditionalsOnAHit(request_: list[tuple[bytes, bytes]], code: int) -> None:
    site = Site()
    site.answer(_first(site), fields=FRESH + [(b"Last-Modified", formatHTTPDate(NOW - 3600))])
    got, fields, body = site.one(site.get(headers=request_))
    assert got == code
    assert status(fields).startswith("edgeproxy; hit")
    if code == 304:
        assert fields["etag"] == ['"v1"'] and body == b""
    assert len(site.sent) == 1


def test_clientConditionalsOnAMissAreAnsweredFromTheFullResponse() -> None:
    """
    The client's conditionals are not forwarded on a miss: the full
    response is what can be stored (it is, while the client gets its 304).
    """
    site = Site()
    client = site.get(headers=[(b"If-None-Match", b'"v1"')])
    [exchange] = site.sent
    assert b"if-none-match" not in exchange.fields
    site.answer(exchange, fields=FRESH)
    code, fields, body = site.one(client)
    assert (code, body) == (304, b"")
    assert status(fields) == "edgeproxy; fwd=uri-miss; fwd-status=200; stored; ttl=60"
    assert site.one(site.get())[2] == b"hello"
    assert len(site.sent) == 1


@pytest.mark.parametrize(
    "range_, code, contentRange, body",
    [
        (b"bytes=1-3", 206, "bytes 1-3/10", b"123"),
        (b"bytes=-2", 206, "bytes 8-9/10", b"89"),
        (b"bytes=20-", 416, "bytes */10", b""),
        (b"bytes=5-2", 200, None, b"0123456789"),
    ],
)
def test_rangesFromAStoredResponse(range_: bytes, code: int, contentRange: str | None, body: bytes) -> None:
    site = Site()
    site.answer(_first(site), fields=FRESH, body=b"0123456789")
    got, fields, gotBody = site.one(site.get(headers=[(b"Range", range_)]))
    assert (got, gotBody) == (code, body)
    assert fields.get("content-range", [None])[0] == contentRange
    assert len(site.sent) == 1


def test_multipartRanges() -> None:
    site = Site()
    site.answer(_first(site), fields=FRESH + [(b"Content-Type", b"text/plain")], body=b"0123456789")
    code, fields, body = site.one(site.get(headers=[(b"Range", b"bytes=0-1,8-9")]))
    assert code == 206
    boundary = fields["content-type"][0].split("boundary=")[1].encode()
    assert body.count(b"--" + boundary) == 3
    assert b"Content-Range: bytes 0-1/10\r\n\r\n01" in body and b"Content-Range: bytes 8-9/10\r\n\r\n89" in body


def test_ifRangeMismatchGetsTheWholeResponse() -> None:
    site = Site()
    site.answer(_first(site), fields=FRESH, body=b"0123456789")
    code, _, body = site.one(site.get(headers=[(b"Range", b"bytes=0-1"), (b"If-Range", b'"v0"')]))
    assert (code, body) == (200, b"0123456789")


def test_rangeOnAMissIsForwardedAndNotStored() -> None:
    site = Site()
    client = site.get(headers=[(b"Range", b"bytes=0-1")])
    [exchange] = site.sent
    assert exchange.fields.get(b"range") == b"bytes=0-1"
    site.answer(exchange, status=206, fields=FRESH + [(b"Content-Range", b"bytes 0-1/10")], body=b"01")
    assert site.one(client)[0] == 206
    site.get()
    assert len(site.sent) == 2


def stale(site: Site, fields: list[tuple[bytes, bytes]] = FRESH, advance: float = 70) -> None:
    site.answer(_first(site), fields=fields)
    site.clock.advance(advance)


def test_staleIsRevalidatedAnd304Merged() -> None:
    site = Site()
    stale(site, FRESH + [(b"Last-Modified", formatHTTPDate(NOW - 3600)), (b"X-Version", b"1")])
    client = site.get(headers=[(b"If-None-Match", b'"mine"')])
    revalidation = site.sent[1]
    assert revalidation.fields.getAll(b"if-none-match") == [b'"v1"']
    assert revalidation.fields.getAll(b"if-modified-since") == [formatHTTPDate(NOW - 3600)]
    revalidation.respond(MemoryResponse(304, [(b"Cache-Control", b"max-age=600"), (b"X-Version", b"2")], b""))
    code, fields, body = site.one(client)
    assert (code, body) == (200, b"hello")
    assert fields["x-version"] == ["2"]
    assert status(fields) == "edgeproxy; fwd=stale; fwd-status=304; ttl=600"
    site.clock.advance(100)
    code, fields, _ = site.one(site.get())
    assert status(fields) == "edgeproxy; hit; ttl=500"
    assert len(site.sent) == 2
    assert site.counters.revalidations["not_modified"] == 1


def test_revalidationAnsweredInFullReplaces() -> None:
    site = Site()
    stale(site)
    client = site.get()
    site.answer(site.sent[1], fields=[(b"Cache-Control", b"max-age=60")], body=b"new")
    assert site.one(client)[2] == b"new"
    assert site.one(site.get())[2] == b"new"
    assert site.counters.revalidations["replaced"] == 1


def test_revalidationNowNotStorableRemovesTheOldOne() -> None:
    site = Site()
    stale(site)
    client = site.get()
    site.answer(site.sent[1], fields=[(b"Cache-Control", b"no-store")], body=b"new")
    assert site.one(client)[2] == b"new"
    assert site.stores.lookup(b"http://app.example/x") is None


def test_staleWhileRevalidate() -> None:
    site = Site(route=RouteCache(stale_while_revalidate=60.0))
    stale(site)
    code, fields, body = site.one(site.get())
    assert (code, body) == (200, b"hello")
    assert status(fields) == "edgeproxy; hit; ttl=-10"
    assert len(site.sent) == 2, "one background refresh"
    # More stale requests meanwhile: served, no second refresh.
    site.one(site.get())
    assert len(site.sent) == 2
    refresh = site.sent[1]
    assert refresh.fields.get(b"if-none-match") == b'"v1"'
    refresh.respond(MemoryResponse(304, [(b"Cache-Control", b"max-age=60")], b""))
    code, fields, _ = site.one(site.get())
    assert status(fields) == "edgeproxy; hit; ttl=60"
    assert site.counters.staleServed == 2


def test_staleWhileRevalidateFromTheResponse() -> None:
    site = Site()
    stale(site, [(b"Cache-Control", b"max-age=60, stale-while-revalidate=30")])
    assert status(site.one(site.get())[1]).startswith("edgeproxy; hit; ttl=-")
    site.clock.advance(30)
    site.get()
    assert len(site.sent) == 3  # past the window: validated first


@pytest.mark.parametrize("failure", ["503", "refused"])
def test_staleIfError(failure: str) -> None:
    site = Site(route=RouteCache(stale_if_error=600.0))
    stale(site)
    client = site.get()
    if failure == "503":
        site.answer(site.sent[1], status=503, body=b"down")
    else:
        site.sent[1].fail(BackendUnavailable("connect refused"))
    code, fields, body = site.one(client)
    assert (code, body) == (200, b"hello")
    assert "detail=stale-if-error" in status(fields)
    # The origin is not asked again at once for that key.
    code, fields, _ = site.one(site.get())
    assert code == 200 and "stale-if-error" in status(fields)
    assert len(site.sent) == 2


def test_staleIfErrorOutsideItsWindowPassesTheError() -> None:
    site = Site(route=RouteCache(stale_if_error=5.0))
    stale(site, advance=70)
    client = site.get()
    site.answer(site.sent[1], status=503, body=b"down")
    assert site.one(client)[:3:2] == (503, b"down")


def test_mustRevalidateNeverServedStale() -> None:
    site = Site(route=RouteCache(stale_if_error=600.0, stale_while_revalidate=600.0))
    stale(site, [(b"Cache-Control", b"max-age=60, must-revalidate")])
    client = site.get()
    assert len(site.sent) == 2
    site.sent[1].fail(BackendUnavailable("connect refused"))
    assert site.one(client)[0] == 502


@pytest.mark.parametrize(
    "request_, forwarded, reason",
    [
        ([(b"Cache-Control", b"no-cache")], True, "request"),
        ([(b"Pragma", b"no-cache")], True, "request"),
        ([(b"Cache-Control", b"max-age=5")], True, "request"),
        ([(b"Cache-Control", b"min-fresh=59")], True, "request"),
        ([(b"Cache-Control", b"max-age=20")], False, ""),
    ],
)
def test_requestDirectivesOnAFreshEntry(request_: list[tuple[bytes, bytes]], forwarded: bool, reason: str) -> None:
    site = Site()
    site.answer(_first(site), fields=FRESH)
    site.clock.advance(10)
    client = site.get(headers=request_)
    assert (len(site.sent) == 2) is forwarded
    if forwarded:
        site.sent[1].respond(MemoryResponse(304, [(b"Cache-Control", b"max-age=60")], b""))
        assert status(site.one(client)[1]).startswith(f"edgeproxy; fwd={reason}; fwd-status=304")


def test_onlyIfCached() -> None:
    site = Site()
    assert site.one(site.get(headers=[(b"Cache-Control", b"only-if-cached")]))[0] == 504
    assert site.sent == []
    site.answer(_first(site), fields=FRESH)
    assert site.one(site.get(headers=[(b"Cache-Control", b"only-if-cached")]))[0] == 200
    site.clock.advance(70)
    assert site.one(site.get(headers=[(b"Cache-Control", b"only-if-cached")]))[0] == 504
    assert site.one(site.get(headers=[(b"Cache-Control", b"only-if-cached, max-stale=60")]))[0] == 200
    assert len(site.sent) == 1


def test_requestNoStore() -> None:
    site = Site()
    client = site.get(headers=[(b"Cache-Control", b"no-store")])
    site.answer(site.sent[0], fields=FRESH)
    assert site.one(client)[0] == 200
    site.get()
    assert len(site.sent) == 2


def test_varyKeysOnTheListedFields() -> None:
    site = Site()
    english = site.get(headers=[(b"Accept-Language", b"en")])
    site.answer(site.sent[0], fields=FRESH + [(b"Vary", b"Accept-Language")], body=b"hello")
    assert site.one(english)[2] == b"hello"
    french = site.get(headers=[(b"Accept-Language", b"fr")])
    assert len(site.sent) == 2
    site.answer(site.sent[1], fields=FRESH + [(b"Vary", b"Accept-Language")], body=b"bonjour")
    assert status(site.one(french)[1]).startswith("edgeproxy; fwd=vary-miss")
    assert site.one(site.get(headers=[(b"Accept-Language", b"EN")]))[2] == b"hello"
    assert site.one(site.get(headers=[(b"Accept-Language", b"fr")]))[2] == b"bonjour"
    assert len(site.sent) == 2


def test_unkeyedFieldsCannotPoisonTheEntry() -> None:
    site = Site()
    poisoned = site.get(headers=[(b"X-Forwarded-Host", b"evil.example"), (b"X-Original-URL", b"/admin")])
    site.answer(site.sent[0], fields=FRESH, body=b"page")
    site.one(poisoned)
    # Another URL is not answered by it, whatever the fields say.
    site.get(target=b"/admin", headers=[(b"X-Forwarded-Host", b"app.example")])
    assert len(site.sent) == 2


def test_keyIncludes() -> None:
    site = Site(cache=CacheSettings(memory=2**20, key_includes=("header:x-device", "cookie:lang")))
    phone = site.get(headers=[(b"X-Device", b"phone")])
    site.answer(site.sent[0], fields=FRESH, body=b"small")
    site.one(phone)
    desktop = site.get(headers=[(b"X-Device", b"desktop")])
    assert len(site.sent) == 2
    site.answer(site.sent[1], fields=FRESH, body=b"large")
    site.one(desktop)
    assert site.one(site.get(headers=[(b"X-Device", b"phone")]))[2] == b"small"
    site.get(headers=[(b"X-Device", b"phone"), (b"Cookie", b"lang=fr")])
    assert len(site.sent) == 3


def test_heuristicFreshness() -> None:
    site = Site()
    client = site.get()
    site.answer(site.sent[0], fields=[(b"Last-Modified", formatHTTPDate(NOW - 1000)), (b"Date", formatHTTPDate(NOW))])
    assert status(site.one(client)[1]).endswith("stored; ttl=100")
    site.clock.advance(99)
    assert status(site.one(site.get())[1]).startswith("edgeproxy; hit")
    site.clock.advance(2)
    site.get()
    assert len(site.sent) == 2


def test_defaultTTL() -> None:
    site = Site(route=RouteCache(default_ttl=30.0))
    site.answer(_first(site), fields=[])
    site.clock.advance(29)
    assert status(site.one(site.get())[1]).startswith("edgeproxy; hit")


def test_otherTargetedField() -> None:
    site = Site(cache=CacheSettings(memory=2**20, targeted_field="Edge-Cache-Control"))
    client = site.get()
    site.answer(site.sent[0], fields=[(b"Cache-Control", b"no-store"), (b"Edge-Cache-Control", b"max-age=30"),
                                      (b"CDN-Cache-Control", b"no-store")])
    code, fields, _ = site.one(client)
    assert "edge-cache-control" not in fields and fields["cdn-cache-control"] == ["no-store"]
    assert status(site.one(site.get())[1]).startswith("edgeproxy; hit")


@pytest.mark.parametrize(
    "method, code, invalidated",
    [(b"POST", 200, True), (b"DELETE", 204, True), (b"PUT", 302, True), (b"POST", 500, False),
     (b"POST", 404, False), (b"OPTIONS", 200, False)],
)
def test_unsafeMethodsInvalidate(method: bytes, code: int, invalidated: bool) -> None:
    site = Site()
    site.answer(_first(site), fields=FRESH)
    client = site.get(method=method)
    response = site.answer(site.sent[1], status=code, body=b"")
    assert response.protocol is not None
    assert status(site.one(client)[1]) == f"edgeproxy; fwd=method; fwd-status={code}"
    site.get()
    assert (len(site.sent) == 3) is invalidated


def test_locationOfTheSameOriginIsInvalidatedToo() -> None:
    site = Site()
    site.answer(_first(site), fields=FRESH)
    other = site.get(target=b"/other")
    site.answer(site.sent[1], fields=FRESH)
    site.one(other)
    client = site.get(target=b"/form", method=b"POST")
    site.answer(site.sent[2], status=303, fields=[(b"Location", b"/x"), (b"Content-Location", b"https://elsewhere.example/other")])
    site.one(client)
    site.get()
    site.get(target=b"/other")
    assert [exchange.target for exchange in site.sent[3:]] == [b"/x"]


def test_purgeMethod() -> None:
    site = Site(cache=CacheSettings(memory=2**20, purge_from=(ipaddress.ip_network("192.0.2.0/24"),)))
    site.answer(_first(site), fields=FRESH)
    code, fields, body = site.one(site.get(method=b"PURGE"))
    assert code == 200 and json.loads(body) == {"purged": 1, "memory": 1}
    site.get()
    assert len(site.sent) == 2


def test_purgeMethodRefusedElsewhere() -> None:
    site = Site()
    site.answer(_first(site), fields=FRESH)
    assert site.one(site.get(method=b"PURGE"))[0] == 405
    site.one(site.get())
    assert len(site.sent) == 1


def test_concurrentMissesCollapse() -> None:
    site = Site()
    clients = [site.get() for _ in range(10)]
    assert len(site.sent) == 1
    site.answer(site.sent[0], fields=FRESH)
    answers = [site.one(client) for client in clients]
    assert {(code, body) for code, _, body in answers} == {(200, b"hello")}
    assert status(answers[1][1]) == "edgeproxy; fwd=uri-miss; fwd-status=200; collapsed; ttl=60"
    assert site.counters.collapsed == 9


def test_notStorableReleasesTheWaiters() -> None:
    site = Site()
    clients = [site.get() for _ in range(3)]
    site.answer(site.sent[0], fields=[(b"Cache-Control", b"private")])
    assert len(site.sent) == 3
    for exchange in site.sent[1:]:
        site.answer(exchange, fields=[(b"Cache-Control", b"private")])
    assert [site.one(client)[0] for client in clients] == [200, 200, 200]


def test_waitersWaitBoundedTime() -> None:
    site = Site(cache=CacheSettings(memory=2**20, collapse_timeout=5.0))
    site.get()
    waiter = site.get()
    site.clock.advance(5.1)
    assert len(site.sent) == 2
    site.answer(site.sent[1], fields=FRESH)
    assert site.one(waiter)[0] == 200


def test_leaderGoneReleasesTheWaiters() -> None:
    site = Site()
    leader = site.get()
    waiter = site.get()
    leader.protocol.connectionLost(Failure(ConnectionError("gone")))  # type: ignore[attr-defined]
    assert site.sent[0].cancelled
    assert len(site.sent) == 2
    site.answer(site.sent[1], fields=FRESH)
    assert site.one(waiter)[0] == 200


def test_streamsWhileStoringWithBackpressure() -> None:
    site = Site()
    client = site.get()
    response = site.sent[0].respond(
        MemoryResponse(200, FRESH, b"first ", length=12, complete=False)
    )
    assert client.value().endswith(b"\r\n\r\nfirst ")
    # The client cannot take more: the backend is paused through the store.
    client.producer.pauseProducing()
    assert response.transport.producerState == "paused"
    client.producer.resumeProducing()
    assert response.transport.producerState == "producing"
    response.write(b"second")
    response.end()
    assert site.one(client)[2] == b"first second"
    assert site.one(site.get())[2] == b"first second"


def test_pastMaxObjectSizeStreamsOnUnstored() -> None:
    site = Site(cache=CacheSettings(memory=2**20, max_object_size=8))
    client = site.get()
    response = site.sent[0].respond(MemoryResponse(200, FRESH, b"12345", complete=False))
    response.write(b"67890")
    response.end()
    assert site.one(client)[2] == b"1234567890"
    site.get()
    assert len(site.sent) == 2


def test_cutShortIsNotStored() -> None:
    site = Site()
    client = site.get()
    site.sent[0].respond(MemoryResponse(200, FRESH, b"12345", length=10, cut=True))
    assert client.disconnecting
    site.get()
    assert len(site.sent) == 2


def test_diskTierSurvivesARestartAndStreamsLargeObjects(tmp_path: Path) -> None:
    settings = CacheSettings(memory=4 * 1024 * 1024, disk=str(tmp_path / "cache"))
    site = Site(cache=settings)
    big = random.Random(1).randbytes(2 * 1024 * 1024)  # on disk only
    small = site.get(target=b"/small")
    site.answer(site.sent[0], fields=FRESH, body=b"small")
    site.one(small)
    large = site.get(target=b"/large")
    site.answer(site.sent[1], fields=FRESH, body=big)
    assert site.one(large)[2] == big
    site.stores.close()
    # A new process: the memory tier is empty, the disk has both.
    restarted = Site(cache=settings)
    restarted.clock.advance(10)
    assert restarted.one(restarted.get(target=b"/small"))[2] == b"small"
    client = restarted.get(target=b"/large")
    # Read a piece at a time: let the reactor turn until it is all there.
    for _ in range(100):
        if len(client.value()) > len(big):
            break
        restarted.clock.advance(0)
    code, fields, body = restarted.one(client)
    assert body == big and status(fields).startswith("edgeproxy; hit")
    ranged = restarted.get(target=b"/large", headers=[(b"Range", b"bytes=1000000-1000009")])
    restarted.clock.advance(0)
    assert restarted.one(ranged)[2] == big[1000000:1000010]
    assert restarted.sent == []
    assert restarted.counters.found["disk"] >= 2


def test_otherMethodsAreMarked() -> None:
    site = Site()
    client = site.get(method=b"OPTIONS")
    site.answer(site.sent[0], fields=[(b"Surrogate-Key", b"x")])
    code, fields, _ = site.one(client)
    assert status(fields) == "edgeproxy; fwd=method; fwd-status=200"
    assert "surrogate-key" not in fields


def test_originsCacheStatusComesFirst() -> None:
    site = Site()
    client = site.get()
    site.answer(site.sent[0], fields=FRESH + [(b"Cache-Status", b"origin; hit")])
    assert site.one(client)[1]["cache-status"] == [
        "origin; hit", "edgeproxy; fwd=uri-miss; fwd-status=200; stored; ttl=60",
    ]
    assert site.one(site.get())[1]["cache-status"] == ["origin; hit", "edgeproxy; hit; ttl=60"]


def test_softPurgeRevalidates() -> None:
    site = Site(route=RouteCache(stale_while_revalidate=30.0))
    site.answer(_first(site), fields=FRESH)
    assert site.stores.purge("url", b"http://app.example/x", soft=True) == {"memory": 1}
    code, fields, _ = site.one(site.get())
    assert code == 200 and "ttl=-" in status(fields)
    assert len(site.sent) == 2


def test_backgroundRefreshUsesTheRestOfTheRoute() -> None:
    site = Site(route=RouteCache(stale_while_revalidate=60.0), compress=CompressSettings(("gzip",), min_size=0))
    html = FRESH + [(b"Content-Type", b"text/html")]
    gzip = site.get(headers=[(b"Accept-Encoding", b"gzip")])
    site.answer(site.sent[0], fields=html)
    site.one(gzip)
    site.clock.advance(70)
    site.one(site.get(headers=[(b"Accept-Encoding", b"gzip")]))
    refresh = site.sent[1]
    site.answer(refresh, fields=html, body=b"fresh")
    code, fields, body = site.one(site.get(headers=[(b"Accept-Encoding", b"gzip")]))
    assert fields["content-encoding"] == ["gzip"] and gzip_.decompress(body) == b"fresh"
    assert status(fields).startswith("edgeproxy; hit")


def test_getWithABodyIsNotCached() -> None:
    site = Site()
    transport = StringTransport(peerAddress=PEER)
    protocol = site.factory.buildProtocol(PEER)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: app.example\r\nContent-Length: 2\r\n\r\nhi")
    site.answer(site.sent[0], fields=FRESH)
    assert status(site.one(transport)[1]) == "edgeproxy; fwd=bypass; fwd-status=200"
    site.get()
    assert len(site.sent) == 2


def test_aBodyStoredForNobodyIsTimedOut() -> None:
    """
    A client answered 304 while the full response is stored: the body is
    read for the store alone, and stopped when it stalls for the route's
    idle_timeout (no client is there to time it out).
    """
    site = Site()
    client = site.get(headers=[(b"If-None-Match", b'"v1"')])
    response = site.sent[0].respond(MemoryResponse(200, FRESH, b"half", length=10, complete=False))
    assert site.one(client)[0] == 304
    site.clock.advance(site.pool.upstream.idle_timeout + 1)
    assert response.transport.producerState == "stopped"
    site.get()
    assert len(site.sent) == 2


def test_aDiskObjectGoneMeanwhileIsAMiss(tmp_path: Path) -> None:
    site = Site(cache=CacheSettings(memory=2**20, disk=str(tmp_path / "cache")))
    big = b"b" * (2**19)  # on disk only
    client = site.get()
    site.answer(site.sent[0], fields=FRESH, body=big)
    site.one(client)
    entry = site.stores.disk.get(b"http://app.example/x")
    os.unlink(entry.path)
    client = site.get()
    assert len(site.sent) == 2
    site.answer(site.sent[1], fields=FRESH, body=big)
    assert site.one(client)[2] == big


def test_manyLargeMissesAtOnceHoldBoundedMemory() -> None:
    """Writers collecting for the memory tier hold at most half of it."""
    site = Site(cache=CacheSettings(memory=64 * 1024))
    clients = [site.get(target=b"/%d" % i) for i in range(4)]
    responses = [
        exchange.respond(MemoryResponse(200, FRESH, b"", length=15000, complete=False))
        for exchange in site.sent
    ]
    for response in responses:
        response.write(b"z" * 15000)
        assert site.stores.buffered <= 32 * 1024
    for response in responses:
        response.end()
    assert site.stores.buffered == 0
    assert [site.one(client)[2] for client in clients] == [b"z" * 15000] * 4
    stored = [site.stores.memory.get(b"http://app.example/%d" % i) is not None for i in range(4)]
    assert stored == [True, True, False, False]


@pytest.mark.parametrize(
    "newVary, objects",
    [([], 1), ([(b"Vary", b"Accept-Language, X-Device")], 2)],
    ids=["no-vary", "other-vary"],
)
def test_revalidationStoredUnderANewKeyRemovesTheOldOne(newVary: list[tuple[bytes, bytes]], objects: int) -> None:
    """
    A stale variant whose revalidation is answered in full with another
    C{Vary} is stored under another key: the old one, which no lookup can
    reach any more, does not stay in the store until it is evicted (what
    is left: the new response, and the marker that lists its C{Vary}).
    """
    site = Site()
    english = [(b"Accept-Language", b"en")]
    first = site.get(headers=english)
    site.answer(site.sent[0], fields=FRESH + [(b"Vary", b"Accept-Language")], body=b"hello")
    assert site.one(first)[2] == b"hello"
    site.clock.advance(70)
    client = site.get(headers=english)
    site.answer(site.sent[1], fields=FRESH + newVary, body=b"new")
    assert site.one(client)[2] == b"new"
    assert site.one(site.get(headers=english))[2] == b"new"
    assert len(site.sent) == 2
    assert len(site.stores.memory) == objects


def test_revalidationAnsweredWithAVaryKeepsItsMarker() -> None:
    """
    The other way round: an entry stored without C{Vary}, replaced by a
    response with one, leaves the marker at the URL's key (where the old
    entry was) and the new variant, and both serve.
    """
    site = Site()
    english = [(b"Accept-Language", b"en")]
    stale(site)
    client = site.get(headers=english)
    site.answer(site.sent[1], fields=FRESH + [(b"Vary", b"Accept-Language")], body=b"new")
    assert site.one(client)[2] == b"new"
    assert site.one(site.get(headers=english))[2] == b"new"
    assert len(site.sent) == 2
    assert len(site.stores.memory) == 2


def test_aNewVaryDropsTheVariantsOfTheOldOne() -> None:
    """
    The origin changes what its responses vary on: the response stored
    under the new C{Vary} replaces the URL's marker, and every variant
    stored under the old one (English and French here), which no lookup
    can reach any more, goes with it.
    """
    site = Site()
    for language, body in ((b"en", b"hello"), (b"fr", b"bonjour")):
        client = site.get(headers=[(b"Accept-Language", language)])
        site.answer(site.sent[-1], fields=FRESH + [(b"Vary", b"Accept-Language")], body=body)
        assert site.one(client)[2] == body
    assert len(site.stores.memory) == 3
    german = site.get(headers=[(b"Accept-Language", b"de")])
    site.answer(site.sent[-1], fields=FRESH + [(b"Vary", b"X-Device")], body=b"for every language")
    assert site.one(german)[2] == b"for every language"
    assert len(site.stores.memory) == 2
    assert site.one(site.get(headers=[(b"Accept-Language", b"en")]))[2] == b"for every language"
    assert len(site.sent) == 3
