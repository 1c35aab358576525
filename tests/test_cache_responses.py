"""
Tests for what the cache stage answers besides stored and forwarded
responses (L{edgeproxy.cache.stage}, L{edgeproxy.cache.responses}): the
errors it makes or passes on (each with its C{Cache-Status} member, as
every response of a cached route), the C{PURGE} method, and invalidation
(RFC 9111 4.4) reaching the other workers.  End to end in memory, with the
site of L{tests.test_cache_stage}: assertions on the bytes the client gets.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest

from edgeproxy.cache.operate import relayFromWorker
from edgeproxy.cache.stores import setRelay
from edgeproxy.config.stagemodel import CacheSettings, ErrorPage, ErrorPages
from edgeproxy.errors import BackendUnavailable, UpstreamTimeout
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.testing import RecordingClient, makeRequest
from edgeproxy.worker import WorkerAgent
from tests.test_cache_stage import FRESH, Site, status

PURGERS = (ipaddress.ip_network("192.0.2.0/24"),)


def test_onlyIfCachedWithNothingStored() -> None:
    site = Site()
    code, fields, body = site.one(site.get(headers=[(b"Cache-Control", b"only-if-cached")]))
    assert (code, body) == (504, b"504 Gateway Timeout\n")
    assert fields["cache-status"] == ["edgeproxy; detail=only-if-cached"]
    assert site.sent == []


def test_onlyIfCachedWithAStaleEntry() -> None:
    site = Site()
    site.get()
    site.answer(site.sent[0], fields=FRESH)
    site.clock.advance(70)
    code, fields, _ = site.one(site.get(headers=[(b"Cache-Control", b"only-if-cached")]))
    assert code == 504 and fields["cache-status"] == ["edgeproxy; detail=only-if-cached"]


@pytest.mark.parametrize("error", [BackendUnavailable("refused"), UpstreamTimeout("slow")])
def test_errorOnAMiss(error: Any) -> None:
    site = Site()
    client = site.get()
    site.sent[0].fail(error)
    code, fields, body = site.one(client)
    assert code == error.status and body.startswith(b"%d " % (error.status,))
    assert fields["cache-status"] == ["edgeproxy; fwd=uri-miss; detail=no-response"]
    assert fields["cache-control"] == ["no-store"]


def test_errorOnAnotherMethod() -> None:
    site = Site()
    client = site.get(method=b"POST")
    site.sent[0].fail(BackendUnavailable("refused"))
    code, fields, _ = site.one(client)
    assert code == 502 and fields["cache-status"] == ["edgeproxy; fwd=method; detail=no-response"]


def test_errorOnAValidation() -> None:
    site = Site()
    site.get()
    site.answer(site.sent[0], fields=FRESH)
    site.clock.advance(70)
    client = site.get()
    site.sent[1].fail(UpstreamTimeout("slow"))
    code, fields, _ = site.one(client)
    assert code == 504 and fields["cache-status"] == ["edgeproxy; fwd=stale; detail=no-response"]


def test_errorKeepsTheRoutesErrorPageAndItsOwnFields() -> None:
    page = ErrorPage(path="/pages/5xx.html", content_type="text/html; charset=utf-8", body=b"<p>down</p>")
    site = Site(errorPages=ErrorPages(classes=((5, page),)))
    client = site.get()
    site.sent[0].fail(BackendUnavailable("refused"))
    code, fields, body = site.one(client)
    assert (code, body) == (502, b"<p>down</p>")
    assert fields["content-type"] == ["text/html; charset=utf-8"]
    assert fields["cache-status"] == ["edgeproxy; fwd=uri-miss; detail=no-response"]


def test_errorOfTheOriginPassesAsItCame() -> None:
    site = Site()
    client = site.get()
    site.answer(site.sent[0], status=503, body=b"origin down")
    code, fields, body = site.one(client)
    assert (code, body) == (503, b"origin down")
    assert status(fields) == "edgeproxy; fwd=uri-miss; fwd-status=503; detail=status"


def test_purgeAnswerCarriesCacheStatus() -> None:
    site = Site(cache=CacheSettings(memory=2**20, purge_from=PURGERS))
    code, fields, body = site.one(site.get(method=b"PURGE"))
    assert code == 200 and json.loads(body)["purged"] == 0
    assert fields["cache-status"] == ["edgeproxy; detail=purged"]
    assert fields["content-type"] == ["application/json"]


def test_purgeRefusedCarriesAllowAndCacheStatus() -> None:
    site = Site()
    code, fields, body = site.one(site.get(method=b"PURGE"))
    assert (code, body) == (405, b"405 Method Not Allowed\n")
    assert fields["allow"] == ["GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"]
    assert fields["cache-status"] == ["edgeproxy; detail=purge-not-allowed"]
    assert site.sent == []


def _overTLS(site: Site, target: bytes = b"/x") -> RecordingClient:
    """A GET of the site's route as an https connection would make it."""
    route = site.config.routes[0]
    request = makeRequest(path=target, host=b"app.example", scheme=b"https", route=route)
    client = RecordingClient()
    Call(request, None, client, site.runtime.pipelines[route.name].stages, site.clock.seconds()).next()
    return client


def test_purgeOverPlainHTTPRemovesTheHTTPSCopyToo() -> None:
    site = Site(cache=CacheSettings(memory=2**20, purge_from=PURGERS))
    site.get()
    site.answer(site.sent[0], fields=FRESH)
    _overTLS(site)
    site.answer(site.sent[1], fields=FRESH)
    assert _overTLS(site).status == 200 and len(site.sent) == 2  # both stored
    code, _, body = site.one(site.get(method=b"PURGE"))
    assert code == 200 and json.loads(body) == {"purged": 2, "memory": 2}
    _overTLS(site)
    site.get()
    assert len(site.sent) == 4


# Invalidation across workers ---------------------------------------------------------


class _Worker:
    """A worker as the supervisor sees it: its control channel delivers to
    the worker's agent (L{edgeproxy.worker.WorkerAgent}), which purges its
    site's stores."""

    def __init__(self, site: Site, number: int) -> None:
        service = type("Service", (), {"currentRuntime": lambda _: site.runtime})()
        self.agent = WorkerAgent(service, number)
        self.ready = True

    def send(self, message: dict[str, Any]) -> None:
        self.agent.handle(json.loads(json.dumps(message)))


@pytest.fixture
def twoWorkers() -> Iterator[tuple[Site, Site]]:
    """Two workers' sites (each its own memory tier), the first relaying
    what it purges itself through the supervisor to the second."""
    first, second = Site(), Site()
    workers = {1: _Worker(first, 1), 2: _Worker(second, 2)}
    supervisor = type("Supervisor", (), {"workers": workers})()
    setRelay(lambda message: relayFromWorker(supervisor, workers[1], json.loads(json.dumps(message))))
    try:
        yield first, second
    finally:
        setRelay(None)


def _stored(site: Site, target: bytes = b"/x") -> None:
    client = site.get(target=target)
    site.answer(site.sent[-1], fields=FRESH)
    site.one(client)


def test_invalidationReachesTheOtherWorkers(twoWorkers: tuple[Site, Site]) -> None:
    first, second = twoWorkers
    for site in (first, second):
        _stored(site)
        _stored(site, b"/next")
    client = first.get(method=b"POST")
    first.answer(first.sent[-1], status=303, fields=[(b"Location", b"/next")], body=b"")
    first.one(client)
    second.get()
    second.get(target=b"/next")
    assert [exchange.target for exchange in second.sent[2:]] == [b"/x", b"/next"]


def test_failedUnsafeRequestInvalidatesNothingAnywhere(twoWorkers: tuple[Site, Site]) -> None:
    first, second = twoWorkers
    for site in (first, second):
        _stored(site)
    client = first.get(method=b"POST")
    first.answer(first.sent[-1], status=500, body=b"")
    first.one(client)
    assert status(second.one(second.get())[1]).startswith("edgeproxy; hit")
    assert status(first.one(first.get())[1]).startswith("edgeproxy; hit")
