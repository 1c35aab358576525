"""
Tests for L{edgeproxy.upstream.pool} and L{edgeproxy.runtime}: the real
Agent and connection pool over in-memory connections (no sockets), with a
deterministic clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.http_headers import Headers
from zope.interface import implementer

from edgeproxy.config.model import Config, ProxySettings, Route, Server, Upstream
from edgeproxy.errors import (
    BackendUnavailable,
    CertificateError,
    ServiceUnavailable,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from edgeproxy.runtime import Runtime
from edgeproxy.upstream.balance import requestHashKey
from edgeproxy.upstream.pool import UpstreamPool, classifyFailure, fullResponseHeaders


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects every factory to a fresh StringTransport (or fails)."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.connections: list[tuple[Any, StringTransport]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.failure is not None:
            return fail(self.failure)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


class MemoryPool(UpstreamPool):
    endpoint: MemoryEndpoint

    def endpointFor(self, server: Server) -> Any:
        return self.endpoint


def makePool(failure: Exception | None = None, **kw: Any) -> tuple[MemoryPool, MemoryEndpoint, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    upstream = Upstream(name="app", servers=(Server("10.0.0.1", 8080),), response_timeout=5.0, **kw)
    pool = MemoryPool(reactor, upstream, None)
    pool.endpoint = MemoryEndpoint(failure)
    return pool, pool.endpoint, reactor


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def test_smoothWeightedRoundRobin() -> None:
    reactor = MemoryReactorClock()
    upstream = Upstream(
        name="w",
        servers=(Server("a", 1, weight=5), Server("b", 1, weight=1), Server("c", 1, weight=1)),
    )
    pool = UpstreamPool(reactor, upstream, None)
    picks = [pool.pickServer().host for _ in range(14)]
    # nginx's smooth weighted round robin: never a burst of the heavy one.
    assert picks[:7] == ["a", "a", "b", "a", "c", "a", "a"]
    assert picks[7:] == picks[:7]


def test_requestOnTheWire() -> None:
    pool, endpoint, _ = makePool()
    headers = Headers({b"Host": [b"front.example"], b"X-Rep": [b"1", b"2"]})
    d = pool.request(b"GET", b"/p/a?q=1", headers, None)
    protocol, transport = endpoint.connections[0]
    wire = transport.value()
    assert wire.startswith(b"GET /p/a?q=1 HTTP/1.1\r\n")
    assert b"Host: front.example\r\n" in wire
    assert b"X-Rep: 1\r\nX-Rep: 2\r\n" in wire
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    response = result(d)
    assert response.code == 200


def test_connectionHeadersExposed() -> None:
    # Guards the private Twisted surface _ClientProtocol relies on.
    pool, endpoint, _ = makePool()
    d = pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
    protocol, _ = endpoint.connections[0]
    protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\nConnection: X-A\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok"
    )
    merged = fullResponseHeaders(result(d))
    assert merged.getRawHeaders(b"connection") == [b"X-A"]
    assert merged.getRawHeaders(b"content-length") == [b"2"]
    assert merged.getRawHeaders(b"x-a") == [b"1"]


def test_responseTimeout() -> None:
    pool, endpoint, reactor = makePool()
    d = pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
    _, transport = endpoint.connections[0]
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    reactor.advance(4.9)
    assert outcome == []
    reactor.advance(0.2)
    failure = outcome[0]
    assert isinstance(failure, Failure) and failure.check(UpstreamTimeout)
    assert failure.value.status == 504
    assert transport.disconnecting


def test_answerBeforeTimeoutCancelsTimer() -> None:
    pool, endpoint, reactor = makePool()
    d = pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
    endpoint.connections[0][0].dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert result(d).code == 204
    assert all(not call.func.__qualname__.endswith("timeOut") for call in reactor.getDelayedCalls())


def test_connectRefused() -> None:
    pool, _, _ = makePool(netError.ConnectionRefusedError("refused"))
    failure = result(pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None))
    assert failure.check(BackendUnavailable)
    assert failure.value.status == 502


def test_connectTimeout() -> None:
    pool, _, _ = makePool(netError.TimeoutError("connect"))
    failure = result(pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None))
    assert failure.check(UpstreamTimeout)


def test_garbageResponse() -> None:
    pool, endpoint, _ = makePool()
    d = pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
    endpoint.connections[0][0].dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
    failure = result(d)
    assert failure.check(UpstreamProtocolError)


def test_classifyFailure() -> None:
    tls = Failure(ResponseNeverReceived([Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))]))
    assert isinstance(classifyFailure(tls, False), BackendUnavailable)
    dns = Failure(netError.DNSLookupError("nope"))
    assert isinstance(classifyFailure(dns, False), BackendUnavailable)
    closed = Failure(ResponseNeverReceived([Failure(netError.ConnectionDone())]))
    assert classifyFailure(closed, False).status == 502
    assert isinstance(classifyFailure(closed, True), UpstreamTimeout)


def test_endpointForWrapsTLS() -> None:
    reactor = MemoryReactorClock()

    made: dict[str, Any] = {}

    class Creators:
        def creatorFor(self, server: Server) -> Any:
            made[server.address] = optionsForClientTLS("backend.example")
            return made[server.address]

    upstream = Upstream(name="t", servers=(Server("::1", 443),), tls=True)
    pool = UpstreamPool(reactor, upstream, Creators())
    endpoint = pool.endpointFor(pool.backends[0])
    assert list(made) == ["[::1]:443"]
    assert hasattr(endpoint, "_wrapperFactory")  # wrapClientTLS's endpoint
    plain = UpstreamPool(reactor, Upstream(name="p", servers=(Server("h", 80),)), None)
    assert not hasattr(plain.endpointFor(plain.backends[0]), "_wrapperFactory")


# Runtime -----------------------------------------------------------------


def config(upstream: Upstream) -> Config:
    return Config(
        path="/etc/edge.ini",
        proxy=ProxySettings(),
        tls=None,
        listeners=(),
        upstreams={upstream.name: upstream},
        routes=(Route(name="r", hosts=("*",), paths=("/",), upstream=upstream.name),),
    )


def test_runtimeBuildsPools() -> None:
    runtime = Runtime.build(config(Upstream(name="app", servers=(Server("127.0.0.1", 1),))), MemoryReactorClock())
    assert set(runtime.pools) == {"app"}
    assert runtime.router.match(b"any.example", b"/x") is not None
    assert result(runtime.close()) is not None


def test_runtimeRefusesBadCA(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    upstream = Upstream(name="app", servers=(Server("127.0.0.1", 1),), tls=True, ca=str(bad))
    with pytest.raises(CertificateError):
        Runtime.build(config(upstream), MemoryReactorClock())


def test_ipv6AndNamedServersRoundTripThroughTheAgent() -> None:
    for host in ("::1", "Backend.Example"):
        reactor = MemoryReactorClock()
        pool = MemoryPool(reactor, Upstream(name="v6", servers=(Server(host, 8443),)), None)
        pool.endpoint = MemoryEndpoint()
        pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
        [(_, transport)] = pool.endpoint.connections
        assert transport.value().startswith(b"GET / HTTP/1.1\r\n")


def test_cancelByCallerIsNotABackendFailure() -> None:
    pool, endpoint, reactor = makePool()
    d = pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    d.cancel()
    assert outcome[0].check(CancelledError)
    assert endpoint.connections[0][1].disconnecting
    reactor.advance(10)  # the response timer is gone: nothing else fires
    assert len(outcome) == 1


# Balancing through the pool -------------------------------------------------


class BodyCollector(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.reason = reason


class RecordingPool(UpstreamPool):
    """Records which server each connection dials."""

    dialled: list[Server]

    def endpointFor(self, server: Server) -> Any:
        self.dialled.append(server)
        return MemoryEndpoint(None)


def makeBalancedPool(**kw: Any) -> RecordingPool:
    servers = kw.pop("servers", (Server("10.0.0.1", 8080),))
    upstream = Upstream(name="app", servers=servers, response_timeout=5.0, **kw)
    pool = RecordingPool(MemoryReactorClock(), upstream, None)
    pool.dialled = []
    return pool


def test_inFlightUntilTheBodyIsComplete() -> None:
    pool, endpoint, _ = makePool()
    server = pool.backends[0]
    d = pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
    assert pool.balancer.inFlight(server) == 1
    protocol, _ = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
    response = result(d)
    assert pool.balancer.inFlight(server) == 1  # head only: still in flight
    body = BodyCollector()
    response.deliverBody(body)
    protocol.dataReceived(b"ok")
    assert body.data == b"okok"
    assert body.reason is not None
    assert pool.balancer.inFlight(server) == 0


def test_inFlightEndsWhenTheBodyFails() -> None:
    pool, endpoint, _ = makePool()
    server = pool.backends[0]
    d = pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
    protocol, _ = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
    body = BodyCollector()
    result(d).deliverBody(body)
    protocol.connectionLost(Failure(netError.ConnectionLost()))
    assert body.reason is not None
    assert pool.balancer.inFlight(server) == 0


def test_inFlightEndsForBodylessResponse() -> None:
    pool, endpoint, _ = makePool()
    server = pool.backends[0]
    d = pool.request(b"HEAD", b"/", Headers({b"Host": [b"h"]}), None)
    protocol, _ = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    result(d).deliverBody(BodyCollector())
    assert pool.balancer.inFlight(server) == 0


@pytest.mark.parametrize("how", ["refused", "timeout", "cancel"])
def test_inFlightEndsOnFailureAndCancel(how: str) -> None:
    failure = netError.ConnectionRefusedError() if how == "refused" else None
    pool, endpoint, reactor = makePool(failure)
    server = pool.backends[0]
    d = pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
    if how == "timeout":
        reactor.advance(5.0)
    elif how == "cancel":
        d.cancel()
    outcome = result(d)
    assert isinstance(outcome, Failure)
    assert pool.balancer.inFlight(server) == 0


def test_allServersDownIs503AtOnce() -> None:
    pool = makeBalancedPool(servers=(Server("a", 1, down=True), Server("b", 1, down=True)))
    outcome = result(pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None))
    assert isinstance(outcome, Failure)
    assert outcome.check(ServiceUnavailable)
    assert outcome.value.status == 503
    assert pool.dialled == []
    with pytest.raises(ServiceUnavailable):
        pool.pickServer()


def test_leastConnThroughThePool() -> None:
    pool = makeBalancedPool(
        servers=(Server("a", 1), Server("b", 1)), balance="least_conn"
    )
    pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
    pool.request(b"GET", b"/", Headers({b"Host": [b"h"]}), None)
    # Both still waiting for an answer: one each, not two on the first.
    assert [s.host for s in pool.dialled] == ["a", "b"]


def test_hashOnHeaderSendsAUserToOneBackend() -> None:
    servers = tuple(Server(f"10.0.0.{i}", 8080) for i in range(1, 6))
    pool = makeBalancedPool(servers=servers, balance="hash", hash_key="header:x-user")
    chosen: dict[bytes, set[str]] = {}
    for round in range(4):
        for user in (b"alice", b"bob", b"carol", b"dave", b"erin", b"frank"):
            headers = Headers({b"Host": [b"h"], b"X-User": [user]})
            # A different client address each time: the header decides.
            key = requestHashKey(
                pool.upstream.hash_key, f"192.0.2.{round}", headers, b"/"
            )
            pool.request(b"GET", b"/", headers, None, hashKey=key)
            chosen.setdefault(user, set()).add(pool.dialled[-1].address)
    assert all(len(backends) == 1 for backends in chosen.values()), chosen
    # ... and the users are spread, not all on one backend.
    assert len({next(iter(b)) for b in chosen.values()}) > 1
