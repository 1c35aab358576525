"""
Tests for L{edgeproxy.runtime}: what a runtime built to replace another
takes over (the same pool objects, with their connections and backend
states) and what it builds anew, decided by the upstream's settings and the
bytes of its TLS files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from edgeproxy.config.model import Config, ProxySettings, Route, Server, Upstream
from edgeproxy.config.stagemodel import RouteForwarding
from edgeproxy.errors import CertificateError
from edgeproxy.runtime import Runtime, poolInFlight, upstreamFingerprint
from edgeproxy.upstream.backend import BackendState
from tests.certutil import CertificateAuthority
from tests.memorypool import ProxyClient


def makeConfig(*upstreams: Upstream, route: str | None = None) -> Config:
    return Config(
        path="/etc/edge.ini",
        proxy=ProxySettings(),
        tls=None,
        listeners=(),
        upstreams={u.name: u for u in upstreams},
        routes=(
            Route(name="r", hosts=("*",), paths=("/",), upstream=route or upstreams[0].name),
        ),
    )


APP = Upstream(name="app", servers=(Server("127.0.0.1", 9001),))
API = Upstream(name="api", servers=(Server("127.0.0.1", 9002),))


def test_unchangedUpstreamsKeepTheirPool() -> None:
    reactor = MemoryReactorClock()
    first = Runtime.build(makeConfig(APP, API), reactor)
    assert first.inherited == frozenset()
    # A backend's state is part of what survives.
    first.pools["app"].backends[0].state = BackendState.DOWN

    changedAPI = dataclasses.replace(API, keepalive=4)
    second = Runtime.build(makeConfig(APP, changedAPI, route="api"), reactor, previous=first)
    assert second.pools["app"] is first.pools["app"]
    assert second.pools["app"].backends[0].state is BackendState.DOWN
    assert second.pools["api"] is not first.pools["api"]
    assert second.pools["api"].upstream.keepalive == 4
    assert second.inherited == frozenset({"app"})
    assert second.retiredFrom(first) == [first.pools["api"]]
    # The new router is the new configuration's.
    match = second.router.match(b"x.example", b"/")
    assert match is not None and match.route.upstream == "api"


def test_removedUpstreamIsRetired() -> None:
    reactor = MemoryReactorClock()
    first = Runtime.build(makeConfig(APP, API), reactor)
    second = Runtime.build(makeConfig(APP), reactor, previous=first)
    assert set(second.pools) == {"app"}
    assert second.retiredFrom(first) == [first.pools["api"]]
    assert second.retiredFrom(second) == []


def test_serverListChangeIsAChange() -> None:
    reactor = MemoryReactorClock()
    first = Runtime.build(makeConfig(APP), reactor)
    moved = dataclasses.replace(APP, servers=(Server("127.0.0.1", 9009),))
    second = Runtime.build(makeConfig(moved), reactor, previous=first)
    assert second.pools["app"] is not first.pools["app"]
    assert [b.address for b in second.pools["app"].backends] == ["127.0.0.1:9009"]


def test_renewedCAFileIsAChange(tmp_path: Path) -> None:
    """Same path, other bytes: the pool is rebuilt with the new trust."""
    ca = tmp_path / "ca.pem"
    CertificateAuthority("first").writeCertificate(ca)
    secure = Upstream(name="app", servers=(Server("127.0.0.1", 9001),), tls=True, ca=str(ca))
    reactor = MemoryReactorClock()
    first = Runtime.build(makeConfig(secure), reactor)
    same = Runtime.build(makeConfig(secure), reactor, previous=first)
    assert same.pools["app"] is first.pools["app"]
    CertificateAuthority("second").writeCertificate(ca)
    renewed = Runtime.build(makeConfig(secure), reactor, previous=same)
    assert renewed.pools["app"] is not first.pools["app"]


def test_clientCertificateKeyFileIsPartOfTheFingerprint(tmp_path: Path) -> None:
    authority = CertificateAuthority()
    certificate, key = authority.issue(["client.example"]).writePair(tmp_path, "client")
    upstream = Upstream(
        name="app", servers=(Server("127.0.0.1", 9001),), tls=True,
        client_certificate=str(certificate),
    )
    before = upstreamFingerprint(upstream)
    assert [path for path, _ in before[1]] == [str(certificate), str(key)]
    authority.issue(["client.example"]).writePair(tmp_path, "client")
    assert upstreamFingerprint(upstream) != before


def test_badFileRefusedAndPreviousUntouched(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    CertificateAuthority().writeCertificate(ca)
    secure = Upstream(name="app", servers=(Server("127.0.0.1", 9001),), tls=True, ca=str(ca))
    reactor = MemoryReactorClock()
    first = Runtime.build(makeConfig(secure, API), reactor)
    ca.write_text("not a certificate")
    with pytest.raises(CertificateError) as raised:
        Runtime.build(makeConfig(secure, API), reactor, previous=first)
    assert raised.value.file == str(ca)
    assert set(first.pools) == {"app", "api"}


def test_unreadableFileIsNeverCarriedOver(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    CertificateAuthority().writeCertificate(ca)
    secure = Upstream(name="app", servers=(Server("127.0.0.1", 9001),), tls=True, ca=str(ca))
    reactor = MemoryReactorClock()
    first = Runtime.build(makeConfig(secure), reactor)
    ca.unlink()
    # Carrying the pool over would hide that the file is gone.
    with pytest.raises(CertificateError):
        Runtime.build(makeConfig(secure), reactor, previous=first)


def test_poolInFlightCountsRequestsToEveryBackend() -> None:
    runtime = Runtime.build(makeConfig(APP), MemoryReactorClock())
    pool = runtime.pools["app"]
    assert poolInFlight(pool) == 0
    backend = pool.backends[0]
    pool.balancer.acquired(backend)
    pool.balancer.acquired(backend)
    assert poolInFlight(pool) == 2
    pool.balancer.released(backend)
    assert poolInFlight(pool) == 1


def test_startStartsOnlyTheNewPools() -> None:
    """
    An inherited pool's health checker runs on; starting the new runtime
    must not add a second one (checks would double at every reload).
    """
    reactor = MemoryReactorClock()
    checked = dataclasses.replace(APP, health_path="/health", health_interval=5.0)

    def checksIn(seconds: float) -> int:
        before = len(reactor.tcpClients)
        for _ in range(int(seconds * 10)):
            reactor.advance(0.1)
        return sum(1 for host, port, *_ in reactor.tcpClients[before:] if port == 9001)

    first = Runtime.build(makeConfig(checked), reactor)
    first.start()
    alone = checksIn(30)
    assert alone >= 4
    second = Runtime.build(makeConfig(checked, API), reactor, previous=first)
    assert second.pools["app"] is first.pools["app"]
    second.start()
    # Checks are 5 s apart with up to 10% jitter: one checker makes at most
    # 30 / 4.5 + 1 = 7 checks in 30 s (the jitter is random, so the count
    # varies), two would make at least 2 x 30 / 5.5 = 10.
    assert checksIn(30) <= 8
    # A changed upstream gets its own checker, and the retired one stops.
    moved = dataclasses.replace(checked, health_path="/ready")
    third = Runtime.build(makeConfig(moved, API), reactor, previous=second)
    for pool in third.retiredFrom(second):
        pool.stop()
    third.start()
    assert checksIn(30) <= 8
    second.stop()
    third.stop()


def test_routesOwnTimeoutsFollowAReloadOnTheKeptPool() -> None:
    # The pool is kept (its upstream did not change); the route's new
    # response_timeout applies to the requests after the reload.
    reactor = MemoryReactorClock()
    first = Runtime.build(makeConfig(APP), reactor)
    config = makeConfig(APP)
    slow = dataclasses.replace(config.routes[0], forwarding=RouteForwarding(response_timeout=120.0))
    second = Runtime.build(dataclasses.replace(config, routes=(slow,)), reactor, previous=first)
    assert second.pools["app"] is first.pools["app"]
    before = ProxyClient(clock=reactor)
    before.runtime = first
    before.send(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    after = ProxyClient(clock=reactor)
    after.runtime = second
    after.send(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    # Nothing answers (the memory reactor never connects).
    reactor.advance(60)
    assert before.wire().startswith(b"HTTP/1.1 504 ") and after.wire() == b""
    reactor.advance(60)
    assert after.wire().startswith(b"HTTP/1.1 504 ")
