"""
Tests for L{edgeproxy.upstream.backend} and how the balancer treats
backends.
"""

from __future__ import annotations

from edgeproxy.config.model import Server
from edgeproxy.upstream.backend import Backend, BackendState
from edgeproxy.upstream.balance import makeBalancer


def test_downInConfigurationIsDisabled() -> None:
    backend = Backend(Server("app.internal", 443, down=True), "10.0.0.1", 443)
    assert backend.state is BackendState.DISABLED
    assert not backend.isAvailable()
    assert backend.address == "10.0.0.1:443"
    assert backend.serverName == "app.internal"


def test_ipv6AddressInBrackets() -> None:
    assert Backend(Server("::1", 8443), "::1", 8443).address == "[::1]:8443"


def test_unavailableStatesAreNeverPicked() -> None:
    backends = [Backend(Server(f"10.0.0.{i}", 80), f"10.0.0.{i}", 80) for i in range(4)]
    backends[0].state = BackendState.DOWN
    backends[1].state = BackendState.DRAINING
    backends[2].ejectedUntil = 100.0
    balancer = makeBalancer("round_robin", backends, available=Backend.isAvailable)
    assert {balancer.pick() for _ in range(10)} == {backends[3]}
    backends[3].state = BackendState.DISABLED
    assert balancer.pick() is None


def test_setServersKeepsInFlightOfKeptMembers() -> None:
    a, b, c = (Backend(Server(h, 80), h, 80) for h in ("10.0.0.1", "10.0.0.2", "10.0.0.3"))
    balancer = makeBalancer("least_conn", [a, b], available=Backend.isAvailable)
    balancer.acquired(a)
    balancer.acquired(b)
    balancer.setServers([a, c])
    assert balancer.inFlight(a) == 1
    assert balancer.pick() is c
    # A request still in flight on the removed member ends without error.
    balancer.released(b)


def test_unknownIsAvailableOnlyWhenFailingOpen() -> None:
    backend = Backend(Server("10.0.0.1", 80), "10.0.0.1", 80, state=BackendState.UNKNOWN)
    assert not backend.isAvailable()
    assert backend.isAvailable(failOpen=True)
    backend.ejectedUntil = 5.0
    assert not backend.isAvailable(failOpen=True)


def test_slowStartWeightRampsLinearly() -> None:
    now = [100.0]
    backend = Backend(Server("10.0.0.1", 80, weight=10), "10.0.0.1", 80, clock=lambda: now[0])
    assert backend.effectiveWeight() == 10
    backend.startSlowStart(0)
    assert backend.slowStartAt is None
    backend.startSlowStart(20.0)
    assert backend.effectiveWeight() == 1.0
    now[0] += 10
    assert backend.effectiveWeight() == 5.5
    now[0] += 10
    assert backend.effectiveWeight() == 10
    assert backend.slowStartAt is None


def test_slowStartNeedsAClock() -> None:
    backend = Backend(Server("10.0.0.1", 80), "10.0.0.1", 80)
    backend.startSlowStart(30.0)
    assert backend.rampFactor() == 1.0
