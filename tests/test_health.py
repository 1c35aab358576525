"""
Tests for L{edgeproxy.upstream.health}: transitions, the active checker and
passive ejection, driven by a L{MemoryReactorClock} (no sockets, no sleeping).

The checker runs against the real L{UpstreamPool}: its endpoints connect
through the memory reactor, where each test plays the backend (accepts and
answers, refuses, or stays silent) and reads the bytes the checker wrote.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from edgeproxy.config.model import Server, Upstream
from edgeproxy.metrics import Metrics
from edgeproxy.upstream.backend import Backend, BackendState
from edgeproxy.upstream.balance import makeBalancer
from edgeproxy.upstream.health import (
    HealthChecker,
    PassiveHealth,
    availability,
    checkHost,
    checkRequest,
    describeFailure,
    enable,
    transition,
)
from edgeproxy.upstream.pool import UpstreamPool
from tests.metricsutil import firstValue

UP, DOWN, UNKNOWN = BackendState.UP, BackendState.DOWN, BackendState.UNKNOWN
DRAINING, DISABLED = BackendState.DRAINING, BackendState.DISABLED


def upstream(count: int = 1, **overrides: Any) -> Upstream:
    servers = tuple(Server(f"127.0.0.{i + 1}", 8000 + i) for i in range(count))
    settings: dict[str, Any] = {"health_path": "/healthz"}
    settings.update(overrides)
    return Upstream("app", servers, **settings)


def makePool(config: Upstream, reactor: MemoryReactorClock | None = None) -> UpstreamPool:
    pool = UpstreamPool(reactor or MemoryReactorClock(), config, None)
    # Until the pool grows them (helper B), give it what health.py uses.
    if not isinstance(getattr(pool, "metrics", None), Metrics):
        pool.metrics = Metrics()  # type: ignore[attr-defined]
    if not isinstance(getattr(pool, "observers", None), list):
        pool.observers = []  # type: ignore[attr-defined]
    return pool


@pytest.fixture
def logs() -> Iterator[Callable[[], list[str]]]:
    """Every log line emitted during the test so far, formatted."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(event) for event in events]
    globalLogPublisher.removeObserver(events.append)


def counterValue(metrics: Metrics, name: str, **labels: str) -> float:
    return firstValue(metrics.exposition(), name, **labels)


class Backends:
    """Plays the backends behind a memory reactor."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.seen = 0

    def pending(self) -> list[tuple[str, int]]:
        return [(c[0], c[1]) for c in self.reactor.tcpClients[self.seen:]]

    def _next(self, port: int) -> int:
        for index in range(self.seen, len(self.reactor.tcpClients)):
            if self.reactor.tcpClients[index][1] == port:
                return index
        raise AssertionError(f"no connection attempt to port {port}: {self.pending()}")

    def _consume(self, index: int) -> tuple[Any, Any]:
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        connector = self.reactor.connectors[index]
        del self.reactor.tcpClients[index]
        del self.reactor.connectors[index]
        return factory, connector

    def accept(self, port: int) -> tuple[Any, StringTransport]:
        factory, _ = self._consume(self._next(port))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def answer(self, port: int, response: bytes) -> bytes:
        """Accept the check's connection to C{port}, answer, return the request."""
        protocol, transport = self.accept(port)
        request = transport.value()
        protocol.dataReceived(response)
        return request

    def refuse(self, port: int) -> None:
        factory, connector = self._consume(self._next(port))
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        # HostnameEndpoint reports the failure when its next attempt finds
        # no other address to try (its attemptDelay later).
        self.reactor.advance(0.3)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def started(config: Upstream, seed: int = 1) -> tuple[UpstreamPool, HealthChecker, Backends, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    pool = makePool(config, reactor)
    checker = HealthChecker(reactor, pool, random.Random(seed))
    checker.start()
    return pool, checker, Backends(reactor), reactor


# What is sent ---------------------------------------------------------------------


def test_requestAsDocumented() -> None:
    pool, checker, backends, _ = started(upstream())
    request = backends.answer(8000, OK)
    assert request == (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nConnection: close\r\n"
        b"User-Agent: edgeproxy-health\r\n\r\n"
    )


def test_hostHeaderChoice() -> None:
    backend = Backend(Server("app.internal", 443), "10.0.0.1", 443)
    tls = upstream(tls=True)
    assert checkHost(tls, backend) == "app.internal"
    assert checkHost(replace(tls, server_name="api.internal"), backend) == "api.internal"
    assert checkHost(replace(tls, host_header="front:8443", server_name="x"), backend) == "front:8443"
    assert checkHost(replace(tls, health_host="health.internal", host_header="front"), backend) == "health.internal"
    plain = upstream()
    assert checkHost(plain, Backend(Server("app", 80), "10.0.0.1", 80)) == "app"
    assert checkHost(plain, Backend(Server("app", 443), "10.0.0.1", 443)) == "app:443"
    assert checkHost(plain, Backend(Server("::1", 8080), "::1", 8080)) == "[::1]:8080"
    assert checkRequest(replace(plain, health_path="/ready?x=1"), backend).startswith(
        b"GET /ready?x=1 HTTP/1.1\r\n"
    )


def test_connectsThroughThePoolsEndpoint() -> None:
    config = upstream(connect_timeout=3.0)
    pool, checker, backends, reactor = started(config)
    assert backends.pending() == [("127.0.0.1", 8000)]
    assert reactor.tcpClients[0][3] == 3.0  # the upstream's connect timeout


# Verdicts -------------------------------------------------------------------------


def test_unknownUntilTheFirstPass(logs: Callable[[], list[str]]) -> None:
    pool, checker, backends, reactor = started(upstream())
    backend = pool.backends[0]
    assert backend.state is UNKNOWN
    backends.answer(8000, OK)
    assert backend.state is UP
    assert backend.reason == "first check passed: 200"
    assert backend.lastCheck is not None and backend.lastCheck.ok
    assert backend.lastCheck.detail == "200"
    # Starting as unknown is where checking starts, not a logged change.
    assert [line for line in logs() if " -> " in line] == [
        "upstream app backend 127.0.0.1:8000: unknown -> up (first check passed: 200)"
    ]
    assert counterValue(pool.metrics, "edgeproxy_health_checks_total", result="ok") == 1
    assert counterValue(pool.metrics, "edgeproxy_backend_transitions_total", state="up") == 1


def test_firstFailureIsDownThenRiseToComeBack(logs: Callable[[], list[str]]) -> None:
    pool, checker, backends, reactor = started(upstream(rise=2, health_interval=5.0))
    backend = pool.backends[0]
    backends.refuse(8000)
    assert backend.state is DOWN
    assert backend.reason == "first check failed: connection refused"
    reactor.advance(5.5)
    backends.answer(8000, OK)
    assert backend.state is DOWN
    reactor.advance(5.5)
    backends.answer(8000, OK)
    assert backend.state is UP
    assert backend.reason == "2 passing checks in a row: 200"
    assert "upstream app backend 127.0.0.1:8000: down -> up (2 passing checks in a row: 200)" in logs()


def test_fallFailuresInARowTakeItDown(logs: Callable[[], list[str]]) -> None:
    pool, checker, backends, reactor = started(upstream(fall=3))
    backend = pool.backends[0]
    backends.answer(8000, OK)
    for _ in range(2):
        reactor.advance(5.5)
        backends.answer(8000, b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
    assert backend.state is UP
    assert backend.lastCheck is not None and backend.lastCheck.detail == "status 503"
    # A pass in between starts the count again.
    reactor.advance(5.5)
    backends.answer(8000, OK)
    for _ in range(2):
        reactor.advance(5.5)
        backends.refuse(8000)
    assert backend.state is UP
    reactor.advance(5.5)
    backends.refuse(8000)
    assert backend.state is DOWN
    assert backend.reason == "3 failed checks in a row: connection refused"
    assert counterValue(pool.metrics, "edgeproxy_health_checks_total", result="failed") == 5
    # The failures short of fall are in the log (they explain a coming
    # "down"); passing checks are not (one line per backend per interval).
    lines = [line for line in logs() if "check failed" in line or "up -> down" in line]
    assert lines == [
        "upstream app backend 127.0.0.1:8000 check failed (1 of 3): status 503",
        "upstream app backend 127.0.0.1:8000 check failed (2 of 3): status 503",
        "upstream app backend 127.0.0.1:8000 check failed (1 of 3): connection refused",
        "upstream app backend 127.0.0.1:8000 check failed (2 of 3): connection refused",
        "upstream app backend 127.0.0.1:8000: up -> down (3 failed checks in a row: connection refused)",
    ]


def test_initialUpTakesTrafficBeforeAnyCheck() -> None:
    pool, checker, backends, reactor = started(upstream(health_initial="up", fall=2))
    backend = pool.backends[0]
    assert backend.state is UP
    backends.refuse(8000)
    assert backend.state is UP
    reactor.advance(5.5)
    backends.refuse(8000)
    assert backend.state is DOWN


def test_statusRanges() -> None:
    config = upstream(health_status=((200, 204), (301, 301)), fall=1, rise=1)
    pool, checker, backends, reactor = started(config)
    backend = pool.backends[0]
    backends.answer(8000, b"HTTP/1.1 204 No Content\r\n\r\n")
    assert backend.state is UP
    reactor.advance(5.5)
    backends.answer(8000, b"HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n")
    assert (backend.state, backend.reason) == (DOWN, "1 failed check in a row: status 302")
    reactor.advance(5.5)
    backends.answer(8000, b"HTTP/1.0 301 Moved\r\n\r\n")
    assert (backend.state, backend.reason) == (UP, "1 passing check in a row: 301")


def test_timeoutCoversConnectAndHead() -> None:
    pool, checker, backends, reactor = started(upstream(health_timeout=2.0))
    backend = pool.backends[0]
    # Never accepted: the connect attempt is abandoned at the timeout.
    reactor.advance(2.0)
    assert backend.lastCheck is not None
    assert backend.lastCheck.detail == "timeout after 2s"
    assert backend.lastCheck.duration == pytest.approx(2.0)
    assert reactor.connectors[0].stoppedConnecting
    backends.seen = 1
    # Accepted, but the head never completes: the connection is aborted.
    reactor.advance(4.0)
    protocol, transport = backends.accept(8000)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX: y\r\n")
    reactor.advance(1.9)
    assert backend.lastCheck.at < reactor.seconds() - 1
    reactor.advance(0.1)
    assert backend.lastCheck.detail == "timeout after 2s"
    assert transport.disconnecting or getattr(transport, "aborted", False)


def test_headSplitAndBareLineFeeds() -> None:
    pool, checker, backends, reactor = started(upstream())
    protocol, transport = backends.accept(8000)
    protocol.dataReceived(b"HTTP/1.1 2")
    protocol.dataReceived(b"00 OK\nServer: x\n")
    assert pool.backends[0].state is UNKNOWN
    protocol.dataReceived(b"\nbody")
    assert pool.backends[0].state is UP
    assert transport.disconnecting


def test_notHTTP() -> None:
    pool, checker, backends, reactor = started(upstream())
    backends.answer(8000, b"SSH-2.0-OpenSSH_9.6\r\n")
    check = pool.backends[0].lastCheck
    assert check is not None and not check.ok
    assert check.detail == "not an HTTP response: b'SSH-2.0-OpenSSH_9.6'"


def test_headReadAsTrafficReadsIt() -> None:
    # The check reads the head with edgeproxy.h1, as every response is
    # read: an obs-fold is accepted, a head traffic would refuse fails.
    pool, checker, backends, reactor = started(upstream())
    backends.answer(8000, b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\n\r\n")
    assert pool.backends[0].lastCheck.ok  # type: ignore[union-attr]
    pool, checker, backends, reactor = started(upstream())
    backends.answer(8000, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    check = pool.backends[0].lastCheck
    assert check is not None and not check.ok
    assert check.detail == "invalid response head: conflicting response Content-Length values"


def test_interimResponsesPassedOver() -> None:
    # 103 Early Hints (and a 100 nobody asked for) come before the final
    # status, as traffic's reader sees them: the check is on the final 200.
    pool, checker, backends, reactor = started(upstream())
    backends.answer(
        8000,
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    )
    assert pool.backends[0].lastCheck.ok  # type: ignore[union-attr]
    pool, checker, backends, reactor = started(upstream())
    backends.answer(8000, b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 503 Busy\r\n\r\n")
    check = pool.backends[0].lastCheck
    assert check is not None and not check.ok
    assert "503" in check.detail


def test_closedBeforeAnswering() -> None:
    pool, checker, backends, reactor = started(upstream())
    protocol, transport = backends.accept(8000)
    from twisted.internet.error import ConnectionDone, ConnectionLost

    protocol.connectionLost(Failure(ConnectionDone()))
    assert pool.backends[0].lastCheck.detail == "connection closed before a response"  # type: ignore[union-attr]
    assert describeFailure(Failure(ConnectionLost()), 2) == "connection lost before a response"


def test_failureDetails() -> None:
    verify = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert describeFailure(Failure(verify), 2) == "TLS: certificate verify failed"
    assert describeFailure(Failure(DNSLookupError("app.internal")), 2).startswith("DNS: ")
    assert describeFailure(Failure(ConnectionRefusedError()), 2) == "connection refused"
    from service_identity import VerificationError
    from service_identity.hazmat import DNS_ID, DNSMismatch

    mismatch = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("other.test"))])
    assert describeFailure(Failure(mismatch), 2) == "TLS: certificate does not match other.test"


# Scheduling --------------------------------------------------------------------------


def test_everyBackendAtOnceThenIntervalWithJitter() -> None:
    config = upstream(3, health_interval=10.0)
    pool, checker, backends, reactor = started(config, seed=7)
    assert sorted(p for _, p in backends.pending()) == [8000, 8001, 8002]
    delays = []
    for port in (8000, 8001, 8002):
        backends.answer(port, OK)
    for call in reactor.getDelayedCalls():
        delays.append(call.getTime() - reactor.seconds())
    # Many rounds: every delay within 10% of the interval, and not all equal.
    for _ in range(30):
        reactor.advance(min(c.getTime() for c in reactor.getDelayedCalls()) - reactor.seconds())
        for host, port in backends.pending():
            backends.answer(port, OK)
            delays.extend(
                c.getTime() - reactor.seconds()
                for c in reactor.getDelayedCalls()
                if c.args and c.args[0].port == port
            )
    assert all(9.0 <= d <= 11.0 for d in delays), delays
    assert len({round(d, 6) for d in delays}) > 10


def test_stopCancelsTimersAndChecks() -> None:
    pool, checker, backends, reactor = started(upstream(2))
    backends.answer(8000, OK)
    connector = reactor.connectors[0]
    d = checker.stop()
    assert d.called
    assert connector.stoppedConnecting
    assert reactor.getDelayedCalls() == []
    before = len(reactor.tcpClients)
    reactor.advance(60)
    assert len(reactor.tcpClients) == before


def test_followsThePoolsBackends() -> None:
    pool, checker, backends, reactor = started(upstream(1))
    old = pool.backends[0]
    backends.answer(8000, OK)
    new = Backend(Server("127.0.0.9", 9000), "127.0.0.9", 9000, clock=reactor.seconds)
    pool.setBackends([new])
    checker.backendsChanged()
    assert new.state is UNKNOWN
    backends.answer(9000, OK)
    assert new.state is UP
    reactor.advance(60)
    assert {port for _, port in backends.pending()} == {9000}
    assert old.lastCheck is not None


# Transitions and administration ------------------------------------------------------


def test_adminStatesWinOverHealth() -> None:
    pool, checker, backends, reactor = started(upstream(fall=1))
    backend = pool.backends[0]
    backends.answer(8000, OK)
    transition(pool, backend, DRAINING, "admin: drain")
    reactor.advance(5.5)
    backends.refuse(8000)
    assert backend.state is DRAINING
    assert backend.lastCheck is not None and backend.lastCheck.detail == "connection refused"
    enable(pool, backend)
    assert (backend.state, backend.reason) == (DOWN, "admin: enable")


def test_enableWithoutHealthChecksIsUp() -> None:
    pool = makePool(upstream(health_path=None))
    backend = pool.backends[0]
    transition(pool, backend, DISABLED, "admin: disable")
    assert not availability(pool)(backend)
    enable(pool, backend)
    assert backend.state is UP


def test_supervisorVerdictsAreAuthoritative() -> None:
    # Workers apply the supervisor's state as it is, administrative or not.
    pool = makePool(upstream())
    backend = pool.backends[0]
    transition(pool, backend, DRAINING, "admin: drain")
    transition(pool, backend, UP, "admin: enable")
    assert backend.state is UP


def test_observersAfterEveryChangeOnly() -> None:
    pool = makePool(upstream(health_path=None))
    backend = pool.backends[0]
    seen: list[tuple[str, str]] = []

    def broken(b: Backend) -> None:
        raise RuntimeError("boom")

    pool.observers.extend([broken, lambda b: seen.append((b.address, b.state.value))])
    transition(pool, backend, UP, "still up")
    assert seen == [] and backend.reason == "still up"
    transition(pool, backend, DOWN, "3 failed checks in a row: connection refused")
    assert seen == [("127.0.0.1:8000", "down")]


def test_failOpenWhileNothingIsUp() -> None:
    pool = makePool(upstream(3))
    available = availability(pool)
    a, b, c = pool.backends
    for backend in pool.backends:
        backend.state = UNKNOWN
    balancer = makeBalancer("round_robin", pool.backends, available=available)
    assert {balancer.pick() for _ in range(6)} == {a, b, c}
    a.state = DOWN
    assert {balancer.pick() for _ in range(6)} == {b, c}
    b.state = UP
    assert {balancer.pick() for _ in range(6)} == {b}
    b.ejectedUntil = 100.0
    assert {balancer.pick() for _ in range(6)} == {c}
    c.ejectedUntil = 100.0
    assert balancer.pick() is None


# Slow start -----------------------------------------------------------------------------


def test_slowStartRampsTheRecoveredShare(logs: Callable[[], list[str]]) -> None:
    reactor = MemoryReactorClock()
    pool = makePool(upstream(2, health_path=None, slow_start=30.0), reactor)
    a, b = pool.backends
    transition(pool, a, DOWN, "test")
    reactor.advance(100)
    transition(pool, a, UP, "2 passing checks in a row: 200")
    balancer = makeBalancer("round_robin", pool.backends, available=availability(pool))

    def shareOfA(picks: int = 1000) -> float:
        return Counter(balancer.pick() for _ in range(picks))[a] / picks

    assert a.rampFactor() == pytest.approx(0.1)
    assert shareOfA() == pytest.approx(0.1 / 1.1, abs=0.01)
    reactor.advance(15)
    assert shareOfA() == pytest.approx(0.55 / 1.55, abs=0.01)
    reactor.advance(15)
    assert shareOfA() == pytest.approx(0.5, abs=0.01)
    assert a.slowStartAt is None


def test_noSlowStartForAFirstVerdict() -> None:
    reactor = MemoryReactorClock()
    pool = makePool(upstream(1, slow_start=30.0), reactor)
    transition(pool, pool.backends[0], UNKNOWN, "not checked yet")
    transition(pool, pool.backends[0], UP, "first check passed: 200")
    assert pool.backends[0].effectiveWeight() == 1


def test_slowStartWithHashKeepsTheRing() -> None:
    reactor = MemoryReactorClock()
    pool = makePool(upstream(4, health_path=None, slow_start=20.0), reactor)
    balancer = makeBalancer("hash", pool.backends, available=availability(pool))
    ring = balancer._rings  # type: ignore[attr-defined]
    keys = [f"user-{i}".encode() for i in range(2000)]
    home = {key: balancer.pick(key) for key in keys}
    a = pool.backends[0]
    mine = [key for key in keys if home[key] is a]
    transition(pool, a, DOWN, "test")
    transition(pool, a, UP, "back")
    assert balancer._rings is ring  # type: ignore[attr-defined]
    shares = []
    for _ in range(3):
        kept = [key for key in mine if balancer.pick(key) is a]
        shares.append(len(kept) / len(mine))
        # Keys of the other servers never move.
        assert all(balancer.pick(k) is home[k] for k in keys if home[k] is not a)
        reactor.advance(9)
    assert shares[0] == pytest.approx(0.1, abs=0.05)
    assert shares[1] == pytest.approx(0.1 + 0.9 * 9 / 20, abs=0.07)
    assert shares[0] < shares[1] < shares[2]
    reactor.advance(10)
    assert all(balancer.pick(key) is a for key in mine)


# Passive health ---------------------------------------------------------------------------


def passive(count: int = 2, **overrides: Any) -> tuple[UpstreamPool, PassiveHealth, MemoryReactorClock]:
    settings: dict[str, Any] = {"health_path": None, "max_fails": 3, "fail_window": 10.0,
                                "eject_time": 30.0, "eject_max_time": 300.0}
    settings.update(overrides)
    reactor = MemoryReactorClock()
    pool = makePool(upstream(count, **settings), reactor)
    return pool, PassiveHealth(pool, reactor), reactor


def test_ejectionAfterMaxFailsWithinTheWindow(logs: Callable[[], list[str]]) -> None:
    pool, health, reactor = passive(slow_start=10.0)
    a = pool.backends[0]
    health.failure(a, "connection refused")
    reactor.advance(6)
    health.failure(a, "connection refused")
    reactor.advance(6)  # the first one left the window
    health.failure(a, "connection refused")
    assert a.ejectedUntil is None
    health.failure(a, "timeout")
    assert a.ejectedUntil == reactor.seconds() + 30
    assert a.ejections == 1
    assert not availability(pool)(a)
    assert counterValue(pool.metrics, "edgeproxy_ejections_total", backend="127.0.0.1:8000") == 1
    assert (
        "upstream app backend 127.0.0.1:8000 ejected for 30s: 3 failures within 10s, last: timeout"
        in logs()
    )
    reactor.advance(30)
    assert a.ejectedUntil is None
    assert availability(pool)(a)
    assert a.rampFactor() == pytest.approx(0.1)
    assert "upstream app backend 127.0.0.1:8000: ejection over after 30s" in logs()


def test_ejectionDoublesUpToTheCapAndResetsAfterAHealthyPeriod() -> None:
    pool, health, reactor = passive(eject_time=30.0, eject_max_time=200.0)
    a = pool.backends[0]
    lengths = []
    for _ in range(5):
        for _ in range(3):
            health.failure(a, "reset")
        assert a.ejectedUntil is not None
        lengths.append(a.ejectedUntil - reactor.seconds())
        reactor.advance(lengths[-1])
        reactor.advance(1)  # failing again soon after coming back
    assert lengths == [30, 60, 120, 200, 200]
    reactor.advance(200)  # served as long as it was last kept out
    for _ in range(3):
        health.failure(a, "reset")
    assert a.ejectedUntil == reactor.seconds() + 30


def test_failStatusCountsOtherStatusesDoNot() -> None:
    pool, health, reactor = passive(fail_status=(502, 503, 504))
    a = pool.backends[0]
    for status in (200, 500, 404, 502, 503):
        health.responded(a, status)
    assert a.ejectedUntil is None
    health.responded(a, 504)
    assert a.ejectedUntil is not None


def test_neverEjectsTheLastAvailableBackend(logs: Callable[[], list[str]]) -> None:
    pool, health, reactor = passive(2)
    a, b = pool.backends
    b.state = DOWN
    for _ in range(3):
        health.failure(a, "connection refused")
    assert a.ejectedUntil is None and a.ejections == 0
    assert any("not ejected: it is the last available backend" in line for line in logs())


def test_passiveOff() -> None:
    pool, health, reactor = passive(max_fails=0)
    for _ in range(100):
        health.failure(pool.backends[0], "connection refused")
    assert pool.backends[0].ejectedUntil is None


def test_stopCancelsEjectionTimers() -> None:
    pool, health, reactor = passive()
    for _ in range(3):
        health.failure(pool.backends[0], "reset")
    assert reactor.getDelayedCalls()
    health.stop()
    assert reactor.getDelayedCalls() == []


def test_recoveryByHealthChecksEndsTheEjection(logs: Callable[[], list[str]]) -> None:
    reactor = MemoryReactorClock()
    pool = makePool(upstream(2, max_fails=2, rise=1, fall=1), reactor)
    health = PassiveHealth(pool, reactor)
    pool.passive = health  # type: ignore[attr-defined]
    checker = HealthChecker(reactor, pool, random.Random(1))
    checker.start()
    backends = Backends(reactor)
    a = pool.backends[0]
    backends.answer(8000, OK)
    backends.answer(8001, OK)
    health.failure(a, "reset")
    health.failure(a, "reset")
    assert a.ejectedUntil == reactor.seconds() + 30
    # The checker sees it down, then back: the ejection ends with it.
    reactor.advance(5.5)
    backends.refuse(8000)
    backends.answer(8001, OK)
    assert a.state is DOWN and a.ejectedUntil is not None
    reactor.advance(5.5)
    backends.answer(8000, OK)
    assert a.state is UP
    assert a.ejectedUntil is None
    assert availability(pool)(a)
    assert (
        "upstream app backend 127.0.0.1:8000: ejection ended early "
        "(1 passing check in a row: 200)" in logs()
    )
    assert [c for c in reactor.getDelayedCalls() if c.func == health._readmit] == []

