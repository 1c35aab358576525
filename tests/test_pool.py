"""
Tests for L{edgeproxy.upstream.pool}, L{edgeproxy.upstream.exchange} and
L{edgeproxy.runtime}: the real pool, exchange and client over in-memory
connections (no sockets), with a deterministic clock, driven through
C{send} with a recording receiver as the request path drives it.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import error as netError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.endpoints import TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from zope.interface import implementer

from edgeproxy.config.model import Config, ProxySettings, Route, Server, Upstream
from edgeproxy.config.stagemodel import RouteForwarding
from edgeproxy.errors import (
    BackendUnavailable,
    CertificateError,
    ServiceUnavailable,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from edgeproxy.bodies import BodyPipe
from edgeproxy.h1 import Fields
from edgeproxy.runtime import Runtime
from edgeproxy.upstream import health
from edgeproxy.upstream.backend import Backend, BackendState
from edgeproxy.upstream.balance import requestHashKey
from edgeproxy.upstream.protocol import EXPECT_TIMEOUT
from edgeproxy.upstream.pool import UpstreamPool, classifyFailure
from edgeproxy.upstream.terms import Terms
from tests.metricsutil import firstValue
from tests.test_resolve import FakeResolver


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


HOST = Fields([(b"host", b"h")])


class Sent:
    """A request sent with C{pool.send}, and what its receiver heard."""

    def __init__(
        self,
        pool: UpstreamPool,
        method: bytes = b"GET",
        target: bytes = b"/",
        body: Any = None,
        fields: Fields = HOST,
        hashKey: bytes | None = None,
        terms: Terms | None = None,
    ) -> None:
        self.interim: list[tuple[int, bytes, Fields]] = []
        self.outcomes: list[Any] = []
        self.exchange = pool.send(method, target, fields, body, self, hashKey, None, terms)

    def upstreamInterim(self, status: int, reason: bytes, fields: Fields) -> None:
        assert not self.outcomes, "interim response after the outcome"
        self.interim.append((status, reason, fields))

    def upstreamResponded(self, response: Any) -> None:
        self.outcomes.append(response)

    def upstreamFailed(self, failure: Failure) -> None:
        self.outcomes.append(failure)

    @property
    def called(self) -> bool:
        return bool(self.outcomes)

    def cancel(self) -> None:
        self.exchange.cancel()


def result(sent: Sent | Deferred[Any]) -> Any:
    """The one outcome of a request, or the result of a Deferred."""
    if isinstance(sent, Deferred):
        out: list[Any] = []
        sent.addBoth(out.append)
        assert out, "Deferred has not fired"
        return out[0]
    assert sent.outcomes, "no outcome yet"
    [outcome] = sent.outcomes
    return outcome


def fired(**sent: Sent) -> dict[str, Any]:
    """The outcome of each of C{sent} that has one, by name."""
    return {name: result(one) for name, one in sent.items() if one.called}


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
    fields = Fields([(b"host", b"front.example"), (b"x-rep", b"1"), (b"x-rep", b"2")])
    d = Sent(pool, b"GET", b"/p/a?q=1", fields=fields)
    protocol, transport = endpoint.connections[0]
    wire = transport.value()
    assert wire.startswith(b"GET /p/a?q=1 HTTP/1.1\r\n")
    assert b"Host: front.example\r\n" in wire
    assert b"X-Rep: 1\r\nX-Rep: 2\r\n" in wire
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    response = result(d)
    assert response.status == 200
    assert response.backend == "10.0.0.1:8080"  # for the access log


def test_responseCarriesTheMessagesOwnFieldsAndItsLength() -> None:
    # The connection's fields (and those Connection names) stay with the
    # connection; the framing is the length.
    pool, endpoint, _ = makePool()
    d = Sent(pool, b"GET", b"/")
    protocol, _ = endpoint.connections[0]
    protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\nConnection: X-A\r\nX-A: 1\r\nX-B: 2\r\nContent-Length: 2\r\n\r\nok"
    )
    response = result(d)
    assert list(response.fields.pairs()) == [(b"x-b", b"2")]
    assert response.length == 2


def test_responseTimeout() -> None:
    pool, endpoint, reactor = makePool(retries=0)
    d = Sent(pool, b"GET", b"/")
    _, transport = endpoint.connections[0]
    reactor.advance(4.9)
    assert not d.called
    reactor.advance(0.2)
    failure = result(d)
    assert isinstance(failure, Failure) and failure.check(UpstreamTimeout)
    assert failure.value.status == 504
    assert transport.disconnecting


def test_answerBeforeTimeoutEndsTheTimeout() -> None:
    # An answered request is not timed out later: its connection stays
    # open and serves the next request, and nothing is counted as failed.
    pool, endpoint, reactor = makePool(retries=0)
    d = Sent(pool, b"GET", b"/")
    protocol, transport = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert result(d).status == 204
    reactor.advance(10)
    assert not transport.disconnecting
    second = Sent(pool, b"GET", b"/")
    assert len(endpoint.connections) == 1
    reactor.advance(4.9)
    protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert result(second).status == 204
    reactor.advance(10)
    assert not transport.disconnecting
    assert firstValue(pool.metrics.exposition(), "edgeproxy_upstream_errors_total") == 0
    # Nothing of the pool stays scheduled once it is closed.
    pool.close()
    assert all(call.func.__self__ is not pool for call in reactor.getDelayedCalls()
               if hasattr(call.func, "__self__"))


def test_eachRequestTimesOutAtItsOwnDeadline() -> None:
    # One timer serves every request of the pool: each still fails at its
    # own response_timeout, in order, whatever was answered in between.
    pool, endpoint, reactor = makePool(retries=0)
    first = Sent(pool, b"GET", b"/1")
    reactor.advance(1)
    answered = Sent(pool, b"GET", b"/2")
    reactor.advance(1)
    second = Sent(pool, b"GET", b"/3")
    endpoint.connections[1][0].dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert result(answered).status == 204
    reactor.advance(2.9)  # t = 4.9
    assert fired(first=first, second=second) == {}
    reactor.advance(0.2)  # t = 5.1
    outcomes = fired(first=first, second=second)
    assert list(outcomes) == ["first"] and outcomes["first"].check(UpstreamTimeout)
    assert endpoint.connections[0][1].disconnecting
    reactor.advance(1.8)  # t = 6.9
    assert list(fired(first=first, second=second)) == ["first"]
    reactor.advance(0.2)  # t = 7.1
    assert fired(first=first, second=second)["second"].check(UpstreamTimeout)
    assert endpoint.connections[2][1].disconnecting
    assert not endpoint.connections[1][1].disconnecting


def test_connectRefused() -> None:
    pool, _, _ = makePool(netError.ConnectionRefusedError("refused"))
    failure = result(Sent(pool, b"GET", b"/"))
    assert failure.check(BackendUnavailable)
    assert failure.value.status == 502


def test_connectTimeout() -> None:
    pool, _, _ = makePool(netError.TimeoutError("connect"))
    failure = result(Sent(pool, b"GET", b"/"))
    assert failure.check(UpstreamTimeout)


def test_garbageResponse() -> None:
    pool, endpoint, _ = makePool()
    d = Sent(pool, b"GET", b"/")
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
        Sent(pool, b"GET", b"/")
        [(_, transport)] = pool.endpoint.connections
        assert transport.value().startswith(b"GET / HTTP/1.1\r\n")


def test_cancelByCallerIsNotABackendFailure() -> None:
    pool, endpoint, reactor = makePool()
    d = Sent(pool, b"GET", b"/")
    d.cancel()
    assert endpoint.connections[0][1].disconnecting
    reactor.advance(10)  # the response timer is gone: nothing fires
    assert not d.called
    assert metric(pool, "edgeproxy_upstream_errors_total") == 0


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
    d = Sent(pool, b"GET", b"/")
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
    d = Sent(pool, b"GET", b"/")
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
    d = Sent(pool, b"HEAD", b"/")
    protocol, _ = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    result(d).deliverBody(BodyCollector())
    assert pool.balancer.inFlight(server) == 0


@pytest.mark.parametrize("how", ["refused", "timeout", "cancel"])
def test_inFlightEndsOnFailureAndCancel(how: str) -> None:
    failure = netError.ConnectionRefusedError() if how == "refused" else None
    pool, endpoint, reactor = makePool(failure, retries=0)
    server = pool.backends[0]
    d = Sent(pool, b"GET", b"/")
    if how == "timeout":
        reactor.advance(5.0)
    elif how == "cancel":
        d.cancel()
    if how == "cancel":
        assert not d.called
    else:
        assert isinstance(result(d), Failure)
    assert pool.balancer.inFlight(server) == 0


def test_allServersDownIs503AtOnce() -> None:
    pool = makeBalancedPool(servers=(Server("a", 1, down=True), Server("b", 1, down=True)))
    outcome = result(Sent(pool, b"GET", b"/"))
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
    Sent(pool, b"GET", b"/")
    Sent(pool, b"GET", b"/")
    # Both still waiting for an answer: one each, not two on the first.
    assert [s.host for s in pool.dialled] == ["a", "b"]


def test_hashOnHeaderSendsAUserToOneBackend() -> None:
    servers = tuple(Server(f"10.0.0.{i}", 8080) for i in range(1, 6))
    pool = makeBalancedPool(servers=servers, balance="hash", hash_key="header:x-user")
    chosen: dict[bytes, set[str]] = {}
    for round in range(4):
        for user in (b"alice", b"bob", b"carol", b"dave", b"erin", b"frank"):
            fields = Fields([(b"host", b"h"), (b"x-user", user)])
            # A different client address each time: the header decides.
            key = requestHashKey(
                pool.upstream.hash_key, f"192.0.2.{round}", fields, b"/"
            )
            Sent(pool, b"GET", b"/", fields=fields, hashKey=key)
            chosen.setdefault(user, set()).add(pool.dialled[-1].address)
    assert all(len(backends) == 1 for backends in chosen.values()), chosen
    # ... and the users are spread, not all on one backend.
    assert len({next(iter(b)) for b in chosen.values()}) > 1


# Retries ---------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class Dial:
    """One backend's endpoint: records every connection in the fleet's
    dial log, and connects in memory or fails."""

    def __init__(self, host: str, log: list[str], failure: Exception | None = None) -> None:
        self.host = host
        self.log = log
        self.failure = failure
        self.connections: list[tuple[Any, StringTransport]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.log.append(self.host)
        if self.failure is not None:
            return fail(self.failure)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    def answer(self, response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", index: int = -1) -> None:
        self.connections[index][0].dataReceived(response)

    def reset(self, index: int = -1) -> None:
        self.connections[index][0].connectionLost(Failure(netError.ConnectionLost("reset")))

    def wire(self, index: int = -1) -> bytes:
        return self.connections[index][1].value()


class Fleet(UpstreamPool):
    """A pool whose backends are Dials, by host."""

    dials: dict[str, Dial]
    dialLog: list[str]

    def endpointFor(  # type: ignore[override]
        self, server: Backend, proxyHeader: bytes | None = None, connectTimeout: float | None = None
    ) -> Any:
        dial = self.dials.get(server.host)
        if dial is None:
            dial = self.dials[server.host] = Dial(server.host, self.dialLog)
        return dial


REFUSED = netError.ConnectionRefusedError("refused")


def makeFleet(
    hosts: tuple[str, ...] = ("a", "b", "c"),
    failing: dict[str, Exception] | None = None,
    servers: tuple[Server, ...] | None = None,
    **kw: Any,
) -> tuple[Fleet, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    if servers is None:
        servers = tuple(Server(host, 80) for host in hosts)
    kw.setdefault("response_timeout", 5.0)
    pool = Fleet(reactor, Upstream(name="app", servers=servers, **kw), None)
    pool.dialLog = []
    pool.dials = {}
    for host, failure in (failing or {}).items():
        pool.dials[host] = Dial(host, pool.dialLog, failure)
    return pool, reactor


def get(
    pool: UpstreamPool,
    method: bytes = b"GET",
    path: bytes = b"/",
    body: Any = None,
    terms: Terms | None = None,
) -> Sent:
    return Sent(pool, method, path, body, terms=terms)


def metric(pool: UpstreamPool, name: str, **labels: str) -> float:
    return firstValue(pool.metrics.exposition(), name, **labels)


@pytest.fixture
def logs() -> Iterator[Callable[[], str]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: "\n".join(formatEvent(event) or "" for event in events)
    globalLogPublisher.removeObserver(events.append)


class Client:
    """The client side of a body (L{ClientReader}): nothing to pause."""

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


def pipeWith(reactor: Any, data: bytes, length: int | None = -1, finish: bool = True) -> BodyPipe:
    pipe = BodyPipe(len(data) if length == -1 else length, Client(), reactor, 0, lambda: None)
    if data:
        pipe.write(data)
    if finish:
        pipe.finish()
    return pipe


def test_connectRefusedIsRetriedOnAnotherBackend(logs: Callable[[], str]) -> None:
    pool, _ = makeFleet(failing={"a": REFUSED})
    d = get(pool)
    assert pool.dialLog == ["a", "b"]
    pool.dials["b"].answer()
    assert result(d).status == 200
    assert metric(pool, "edgeproxy_retries_total", upstream="app", reason="connect_failed") == 1
    assert metric(pool, "edgeproxy_upstream_errors_total", upstream="app", code="502") == 1
    assert "retrying GET after a:80 failed (connect_failed)" in logs()
    assert "answered by b:80 after 1 retries (tried a:80, b:80)" in logs()


def test_postNotSentIsRetriedWithItsWholeBody() -> None:
    pool, reactor = makeFleet(failing={"a": REFUSED})
    d = get(pool, b"POST", body=pipeWith(reactor, b"payload"))
    assert pool.dialLog == ["a", "b"]
    assert pool.dials["b"].wire().endswith(b"\r\n\r\npayload")
    pool.dials["b"].answer()
    assert result(d).status == 200


def test_idempotentRequestResetBeforeAnyResponseByteIsRetried() -> None:
    pool, _ = makeFleet()
    d = get(pool)
    pool.dials["a"].reset()
    assert pool.dialLog == ["a", "b"]
    pool.dials["b"].answer()
    assert result(d).status == 200


def test_postResetAfterItWasSentIsNotRetried(logs: Callable[[], str]) -> None:
    pool, reactor = makeFleet()
    d = get(pool, b"POST", body=pipeWith(reactor, b"payment"))
    assert pool.dials["a"].wire().endswith(b"payment")
    pool.dials["a"].reset()
    outcome = result(d)
    assert outcome.check(BackendUnavailable) and outcome.value.status == 502
    assert pool.dialLog == ["a"]
    assert "POST not retried: POST is not idempotent (tried a:80)" in logs()


def test_deadBackendBurstIsAFewLinesPerInterval() -> None:
    """
    900 requests in 2 s to a single backend refusing connections: the
    process log has the first failure in full (backend and reason), the
    first of each other note, and a count at the end of the interval, not
    a line or three per request; the next interval starts over.
    """
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        pool, _, reactor = makePool(netError.ConnectionRefusedError())
        for _ in range(900):
            Sent(pool)
            reactor.advance(2 / 900)
        reactor.advance(10)
        Sent(pool)
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import LogLevel

    shown = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.info]
    assert 3 <= len(shown) <= 10, shown
    assert shown[0].startswith(
        "upstream app backend 10.0.0.1:8080 failed: 502 connect failed: ConnectionRefusedError"
    )
    [count] = [line for line in shown if line.startswith("repeated in the last 10s: ")]
    assert "upstream app backend 10.0.0.1:8080 failed (502 connect_failed) x " in count
    # The next interval's first failure is in full again.
    after = shown[shown.index(count) + 1 :]
    assert after and after[0].startswith("upstream app backend 10.0.0.1:8080 failed: 502 ")
    # Every note is still there at debug.
    failed = [e for e in events if formatEvent(e).startswith("upstream app backend 10.0.0.1:8080 failed:")]
    assert len(failed) > 900


def test_smallPutBodyIsReplayedAfterAReset() -> None:
    pool, reactor = makeFleet()
    d = get(pool, b"PUT", body=pipeWith(reactor, b"document"))
    assert pool.dials["a"].wire().endswith(b"\r\n\r\ndocument")
    pool.dials["a"].reset()
    assert pool.dialLog == ["a", "b"]
    wire = pool.dials["b"].wire()
    assert wire.startswith(b"PUT / HTTP/1.1\r\n")
    assert b"Content-Length: 8\r\n" in wire and wire.endswith(b"\r\n\r\ndocument")
    pool.dials["b"].answer(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert result(d).status == 204


def test_streamedBodyPartlySentIsNotReplayed(logs: Callable[[], str]) -> None:
    pool, reactor = makeFleet()
    pipe = pipeWith(reactor, b"", length=None, finish=False)
    d = get(pool, b"PUT", body=pipe)
    chunk = b"x" * 16384
    for _ in range(5):  # 80 KiB, over what is kept for a replay
        pipe.write(chunk)
    pool.dials["a"].reset()
    outcome = result(d)
    assert outcome.check(BackendUnavailable)
    assert pool.dialLog == ["a"]
    assert "cannot be sent again" in logs()


def test_responseStartedIsNeverRetried() -> None:
    pool, _ = makeFleet()
    d = get(pool)
    pool.dials["a"].answer(b"HTTP/1.1 200 OK\r\nContent-Le")
    pool.dials["a"].reset()
    assert result(d).check(BackendUnavailable, UpstreamProtocolError)
    assert pool.dialLog == ["a"]


def test_garbageIsNotRetried() -> None:
    pool, _ = makeFleet()
    d = get(pool)
    pool.dials["a"].answer(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert result(d).check(UpstreamProtocolError)
    assert pool.dialLog == ["a"]


def test_responseTimeoutOfAGetIsRetried() -> None:
    pool, reactor = makeFleet()
    d = get(pool)
    reactor.advance(5.0)
    assert pool.dials["a"].connections[0][1].disconnecting
    assert pool.dialLog == ["a", "b"]
    pool.dials["b"].answer()
    assert result(d).status == 200
    assert metric(pool, "edgeproxy_retries_total", reason="response_timeout") == 1
    assert metric(pool, "edgeproxy_upstream_errors_total", code="504") == 1


def test_retriesOfTimedOutRequestsKeepEveryDeadline() -> None:
    # A retry started while timed-out requests are handled gets its own
    # full response_timeout, and the requests still waiting keep theirs.
    pool, reactor = makeFleet(hosts=("a", "b"), retries=1)
    first = get(pool)  # a, due at 5
    reactor.advance(1)
    second = get(pool)  # b, due at 6
    reactor.advance(4.1)  # t = 5.1: first retried on b, due at 10.1
    assert pool.dialLog == ["a", "b", "b"] and fired(first=first, second=second) == {}
    reactor.advance(1.0)  # t = 6.1: second retried on a, due at 11.1
    assert pool.dialLog == ["a", "b", "b", "a"] and fired(first=first, second=second) == {}
    reactor.advance(3.9)  # t = 10.0
    assert fired(first=first, second=second) == {}
    reactor.advance(0.2)  # t = 10.2
    outcomes = fired(first=first, second=second)
    assert list(outcomes) == ["first"] and outcomes["first"].check(UpstreamTimeout)
    reactor.advance(0.8)  # t = 11.0
    assert list(fired(first=first, second=second)) == ["first"]
    reactor.advance(0.2)  # t = 11.2
    assert fired(first=first, second=second)["second"].check(UpstreamTimeout)
    assert metric(pool, "edgeproxy_upstream_errors_total", code="504") == 4


def test_retriesAreBoundedAndTheLastErrorIsReturned() -> None:
    pool, _ = makeFleet(
        hosts=("a", "b", "c", "d"),
        failing={h: REFUSED for h in "abcd"},
        retries=2,
    )
    outcome = result(get(pool))
    assert outcome.check(BackendUnavailable)
    assert pool.dialLog == ["a", "b", "c"]
    assert metric(pool, "edgeproxy_retries_total") == 2


def test_retriesUseTheSameBackendOnlyWhenNoOtherIsAvailable() -> None:
    pool, endpoint, _ = makePool(netError.ConnectionRefusedError("refused"))
    outcome = result(Sent(pool, b"GET", b"/"))
    assert outcome.check(BackendUnavailable)
    assert len(endpoint.connections) == 0  # every connect failed...
    assert metric(pool, "edgeproxy_upstream_errors_total", code="502") == 3  # ...three times


def test_noRetriesConfigured() -> None:
    pool, _ = makeFleet(failing={"a": REFUSED}, retries=0)
    assert result(get(pool)).check(BackendUnavailable)
    assert pool.dialLog == ["a"]


def test_retryBudgetRefusesAndTheOriginalErrorIsReturned(logs: Callable[[], str]) -> None:
    pool, _ = makeFleet(
        hosts=("a", "b"), failing={"a": REFUSED, "b": REFUSED}, retries=1, retry_budget=0.0,
        max_fails=0,
    )
    outcomes = [result(get(pool)) for _ in range(4)]
    assert all(o.check(BackendUnavailable) for o in outcomes)
    # The floor allows 3 retries in this second; the fourth is refused.
    assert metric(pool, "edgeproxy_retries_total") == 3
    assert metric(pool, "edgeproxy_retries_refused_total", upstream="app") == 1
    assert len(pool.dialLog) == 4 * 2 - 1
    assert "retry budget spent" in logs()


def test_cancelledRequestIsNeitherRetriedNorCountedAgainstTheBackend() -> None:
    pool, _ = makeFleet(max_fails=1)
    d = get(pool)
    d.cancel()
    assert not d.called
    assert pool.dialLog == ["a"]
    assert all(b.ejectedUntil is None for b in pool.backends)
    assert metric(pool, "edgeproxy_upstream_errors_total") == 0


def test_clientBodyFailureIsNotRetriedNorTheBackendsFault() -> None:
    pool, reactor = makeFleet(max_fails=1)
    pipe = pipeWith(reactor, b"abc", length=10, finish=False)
    d = get(pool, b"PUT", body=pipe)
    pipe.fail(Failure(ValueError("client gone")))
    assert isinstance(result(d), Failure)
    assert pool.dialLog == ["a"]
    assert all(b.ejectedUntil is None for b in pool.backends)


# Outcomes reported to passive health and the metrics -------------------------


def test_connectFailuresEjectABackend() -> None:
    pool, _ = makeFleet(hosts=("a", "b"), failing={"a": REFUSED}, max_fails=2)
    for _ in range(4):
        d = get(pool)
        pool.dials["b"].answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        result(d).deliverBody(BodyCollector())
    a = pool.backends[0]
    assert a.ejectedUntil is not None
    assert pool.dialLog.count("a") == 2  # not dialled once ejected
    assert metric(pool, "edgeproxy_ejections_total", backend="a:80") == 1


def test_failStatusCountsAsAFailureButIsNotRetried() -> None:
    pool, _ = makeFleet(hosts=("a", "b"), max_fails=1, fail_status=(503,))
    d = get(pool)
    pool.dials["a"].answer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    assert result(d).status == 503  # the backend's own answer reaches the client
    assert pool.dialLog == ["a"]
    assert pool.backends[0].ejectedUntil is not None


def test_upstreamLatencyObserved() -> None:
    pool, reactor = makeFleet()
    d = get(pool)
    reactor.advance(0.3)
    pool.dials["a"].answer()
    result(d)
    assert metric(pool, "edgeproxy_upstream_response_seconds_count", upstream="app") == 1
    assert metric(pool, "edgeproxy_upstream_response_seconds_sum", upstream="app") == pytest.approx(0.3)


# Timeouts: one backend, the route's own terms, request_timeout --------------


def test_oneBackendThatTimesOutIsTriedOnce(logs: Callable[[], str]) -> None:
    # The trial of issue 15: response_timeout 5 s with the default retries
    # (2) kept the client 15 s for a 504 from one backend tried three
    # times.  Now: one attempt, the 504 at 5 s.
    pool, reactor = makeFleet(hosts=("a",))
    assert pool.terms.retries == 2
    d = get(pool)
    reactor.advance(4.9)
    assert not d.called
    reactor.advance(0.1)
    outcome = result(d)
    assert outcome.check(UpstreamTimeout) and outcome.value.status == 504
    assert pool.dialLog == ["a"]
    assert pool.dials["a"].connections[0][1].disconnecting
    assert metric(pool, "edgeproxy_upstream_errors_total", code="504") == 1
    assert metric(pool, "edgeproxy_retries_total") == 0
    assert "a timeout is retried only on a backend not tried yet (tried a:80)" in logs()


def test_oneBackendWhoseConnectTimesOutIsTriedOnce() -> None:
    pool, _ = makeFleet(hosts=("a",), failing={"a": netError.TimeoutError("connect")})
    assert result(get(pool)).check(UpstreamTimeout)
    assert pool.dialLog == ["a"]


def test_oneBackendRefusingIsStillRetried() -> None:
    # A refused connection or a reset keep-alive connection is over at
    # once: trying the one backend again costs the client nothing.
    pool, _ = makeFleet(hosts=("a",), failing={"a": REFUSED})
    assert result(get(pool)).check(BackendUnavailable)
    assert pool.dialLog == ["a", "a", "a"]


def test_aTimedOutRequestIsNotSentBackToATriedBackend() -> None:
    # a times out, b refuses: a is not asked again (the request failed
    # with b's error, not after another 5 s on a).
    pool, reactor = makeFleet(hosts=("a", "b"), failing={"b": REFUSED})
    d = get(pool)
    reactor.advance(5.0)
    assert pool.dialLog == ["a", "b"]
    assert result(d).check(BackendUnavailable)


def test_routeTermsAreSharedAndDefaultToTheUpstreams() -> None:
    pool, _ = makeFleet()
    assert pool.termsFor(None) is pool.terms
    assert pool.termsFor(RouteForwarding(response_timeout=5.0, retries=2)) is pool.terms
    short = pool.termsFor(RouteForwarding(response_timeout=2.0))
    assert short is not pool.terms
    assert short is pool.termsFor(RouteForwarding(response_timeout=2.0))
    assert (short.responseTimeout, short.retries, short.connectTimeout) == (2.0, 2, 5.0)
    # The default request_timeout: queue_timeout + connect + response.
    assert pool.terms.requestTimeout == 10.0 + 5.0 + 5.0
    assert short.requestTimeout == 10.0 + 5.0 + 2.0


def test_routesOwnResponseTimeoutApplies() -> None:
    pool, reactor = makeFleet(hosts=("a",))
    short = get(pool, terms=pool.termsFor(RouteForwarding(response_timeout=2.0)))
    usual = get(pool)
    reactor.advance(1.9)
    assert fired(short=short, usual=usual) == {}
    reactor.advance(0.1)
    assert list(fired(short=short, usual=usual)) == ["short"]
    assert result(short).check(UpstreamTimeout)
    reactor.advance(3.0)
    assert result(usual).check(UpstreamTimeout)


def test_routesOwnRetries() -> None:
    pool, _ = makeFleet(hosts=("a", "b"), failing={"a": REFUSED, "b": REFUSED})
    assert result(get(pool, terms=pool.termsFor(RouteForwarding(retries=0)))).check(
        BackendUnavailable
    )
    assert len(pool.dialLog) == 1
    assert result(get(pool)).check(BackendUnavailable)  # the upstream's 2 retries
    assert len(pool.dialLog) == 1 + 3


def test_routesOwnConnectTimeoutDialsWithIt() -> None:
    # The real endpoints of the pool: the connect timeout is what the
    # reactor is asked to connect with.
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor, Upstream(name="app", servers=(Server("10.0.0.1", 80),)), None)
    Sent(pool, terms=pool.termsFor(RouteForwarding(connect_timeout=1.5)))
    Sent(pool)
    assert [(host, timeout) for host, _, _, timeout, _ in reactor.tcpClients] == [
        ("10.0.0.1", 1.5),
        ("10.0.0.1", 5.0),
    ]


def test_requestTimeoutBoundsTheRetries(logs: Callable[[], str]) -> None:
    # a times out at 5 s and the retry on b gets what is left of 8 s: the
    # client has its 504 at 8 s, b's attempt is abandoned, c never tried.
    pool, reactor = makeFleet()
    terms = pool.termsFor(RouteForwarding(request_timeout=8.0))
    d = get(pool, terms=terms)
    reactor.advance(5.0)
    assert pool.dialLog == ["a", "b"] and not d.called
    reactor.advance(2.9)
    assert not d.called
    reactor.advance(0.1)
    outcome = result(d)
    assert outcome.check(UpstreamTimeout) and outcome.value.status == 504
    assert pool.dials["b"].connections[0][1].disconnecting
    assert pool.dialLog == ["a", "b"]
    assert pool.inFlight() == 0
    # b's abandoned attempt is not held against it (the route's bound cut
    # it, not b's own timeout): a's timeout and the client's 504 count.
    assert metric(pool, "edgeproxy_upstream_errors_total", code="504") == 2
    assert "backend b:80 failed" not in logs()
    assert "had no response head within its request_timeout (8s; tried a:80, b:80): 504" in logs()
    reactor.advance(60)
    assert pool.dialLog == ["a", "b"]


def test_requestTimeoutBelowTheResponseTimeout() -> None:
    pool, reactor = makeFleet(hosts=("a",))
    d = get(pool, terms=pool.termsFor(RouteForwarding(request_timeout=2.0)))
    reactor.advance(2.0)
    assert result(d).check(UpstreamTimeout)
    assert pool.dials["a"].connections[0][1].disconnecting
    reactor.advance(10)  # its response deadline passes: nothing more
    assert pool.dialLog == ["a"] and len(d.outcomes) == 1


def test_requestTimeoutCountsTheQueue() -> None:
    # queue_timeout 3 s would answer 503; the route's 1 s bound comes
    # first, and the request leaves the queue with a 504.
    pool, reactor = limited()
    get(pool)
    waiting = get(pool, terms=pool.termsFor(RouteForwarding(request_timeout=1.0)))
    assert pool.queued == 1
    reactor.advance(1.0)
    assert result(waiting).check(UpstreamTimeout)
    assert pool.queued == 0


def test_requestTimeoutStartsOnceTheBodyIsPassedOn() -> None:
    # A slow upload is not the backend's delay: the bound counts from the
    # moment the body was passed on whole.
    pool, reactor = makeFleet(hosts=("a",))
    pipe = pipeWith(reactor, b"part", length=8, finish=False)
    d = get(pool, b"POST", body=pipe, terms=pool.termsFor(RouteForwarding(request_timeout=2.0)))
    reactor.advance(30)
    assert not d.called
    pipe.write(b"more")
    pipe.finish()
    reactor.advance(1.9)
    assert not d.called
    reactor.advance(0.1)
    assert result(d).check(UpstreamTimeout)


def test_aRequestOnTheUpstreamsTermsArmsNoTimerOfItsOwn() -> None:
    # The default request_timeout never cuts a first attempt short, so a
    # request costs no timer for it: the pool's one deadline timer is all.
    pool, reactor = makeFleet(hosts=("a",))
    for _ in range(3):
        get(pool)
    assert len(reactor.getDelayedCalls()) == 1
    sent = get(pool)
    assert sent.exchange.timer is None


# max_conns and the queue --------------------------------------------------------


def finish(dial: Dial, index: int = -1) -> None:
    """Answer the request on a connection and deliver its (empty) body."""
    before = len(dial.connections)
    dial.answer(b"HTTP/1.1 204 No Content\r\n\r\n", index)
    assert len(dial.connections) == before


def limited(**kw: Any) -> tuple[Fleet, MemoryReactorClock]:
    kw.setdefault("servers", (Server("a", 80, max_conns=1),))
    kw.setdefault("queue_size", 2)
    kw.setdefault("queue_timeout", 3.0)
    kw.setdefault("keepalive", 0)  # a new connection per request: one dial each
    return makeFleet(**kw)


def test_requestWaitsForABackendUnderMaxConns() -> None:
    pool, _ = limited()
    first = get(pool, path=b"/1")
    second = get(pool, path=b"/2")
    assert pool.dialLog == ["a"]
    assert pool.queued == 1
    assert pool.inFlight() == 2  # one sent, one queued
    finish(pool.dials["a"])
    result(first).deliverBody(BodyCollector())
    assert pool.dialLog == ["a", "a"]
    assert pool.dials["a"].wire().startswith(b"GET /2 ")
    finish(pool.dials["a"])
    assert result(second).status == 204


def test_queueIsFirstComeFirstServed() -> None:
    pool, _ = limited(queue_size=5)
    first = get(pool, path=b"/1")
    waiting = [get(pool, path=b"/%d" % i) for i in range(2, 5)]
    served = [first]
    for expected in (b"/2", b"/3", b"/4"):
        finish(pool.dials["a"])
        result(served[-1]).deliverBody(BodyCollector())
        assert pool.dials["a"].wire().startswith(b"GET " + expected + b" ")
        served.append(waiting.pop(0))


def test_queueTimeoutIs503WithRetryAfter(logs: Callable[[], str]) -> None:
    pool, reactor = limited()
    get(pool)
    second = get(pool)
    reactor.advance(2.9)
    assert not second.called
    reactor.advance(0.2)
    outcome = result(second)
    assert outcome.check(ServiceUnavailable)
    assert outcome.value.status == 503 and outcome.value.retryAfter == 5
    assert pool.queued == 0
    assert metric(pool, "edgeproxy_queue_timeouts_total", upstream="app") == 1
    assert "no backend below max_conns within 3.0s" in logs()


def test_fullQueueIs503AtOnce() -> None:
    pool, _ = limited(queue_size=1)
    get(pool)
    get(pool)
    third = result(get(pool))
    assert third.check(ServiceUnavailable) and third.value.status == 503
    assert pool.dialLog == ["a"]
    assert metric(pool, "edgeproxy_upstream_errors_total", code="503") == 1


def test_noQueueWithQueueSizeZero() -> None:
    pool, _ = limited(queue_size=0)
    get(pool)
    assert result(get(pool)).check(ServiceUnavailable)


def test_clientLeavingTheQueueIsRemoved() -> None:
    pool, reactor = limited()
    first = get(pool, path=b"/1")
    leaving = get(pool, path=b"/2")
    staying = get(pool, path=b"/3")
    leaving.cancel()
    assert not leaving.called
    assert pool.queued == 1
    finish(pool.dials["a"])
    result(first).deliverBody(BodyCollector())
    assert pool.dials["a"].wire().startswith(b"GET /3 ")
    finish(pool.dials["a"])
    assert result(staying).status == 204
    reactor.advance(10)  # the cancelled one's queue timer is gone
    assert metric(pool, "edgeproxy_queue_timeouts_total") == 0


def test_backendsAtTheirLimitAreSkippedBeforeQueueing() -> None:
    pool, _ = makeFleet(servers=(Server("a", 80, max_conns=1), Server("b", 80)))
    for _ in range(4):
        get(pool)
    assert pool.dialLog == ["a", "b", "b", "b"]
    assert pool.queued == 0


def test_noBackendAvailableIs503AtOnceEvenWithMaxConns() -> None:
    pool, _ = makeFleet(servers=(Server("a", 80, max_conns=1, down=True),))
    outcome = result(get(pool))
    assert outcome.check(ServiceUnavailable)
    assert pool.queued == 0 and pool.dialLog == []


def test_tunnelsIgnoreMaxConns() -> None:
    pool, _ = limited()
    get(pool)
    assert pool.pickServer().host == "a"


def test_queuedRequestFailsWhenItsBackendsGoAway() -> None:
    pool, _ = limited()
    get(pool)
    waiting = get(pool)
    backend = pool.backends[0]
    health.transition(pool, backend, BackendState.DISABLED, "admin: disable")
    outcome = result(waiting)
    assert outcome.check(ServiceUnavailable)


def test_retryWaitsInTheQueueWhenTheOtherBackendIsFull() -> None:
    pool, _ = makeFleet(
        servers=(Server("a", 80), Server("b", 80, max_conns=1)), failing={"a": REFUSED},
        balance="least_conn", keepalive=0,
    )
    busy = get(pool)  # least_conn: a refuses, retried on b
    assert pool.dialLog == ["a", "b"]
    retried = get(pool)  # a (refused), b is full: the retry waits
    assert pool.dialLog == ["a", "b", "a"]
    assert pool.queued == 1
    finish(pool.dials["b"])
    result(busy).deliverBody(BodyCollector())
    assert pool.dialLog == ["a", "b", "a", "b"]
    finish(pool.dials["b"])
    assert result(retried).status == 204


# Verdicts from elsewhere ---------------------------------------------------------


def test_applyVerdict(logs: Callable[[], str]) -> None:
    pool, _ = makeFleet(hosts=("a", "b"))
    seen: list[Backend] = []
    pool.observers.append(seen.append)
    pool.applyVerdict("b:80", "down", "supervisor: 3 failed checks")
    b = pool.backends[1]
    assert b.state is BackendState.DOWN and b.reason == "supervisor: 3 failed checks"
    assert seen == [b]
    # The supervisor logged the change; a worker does not repeat it.
    assert "up -> down" not in logs()
    pool.applyVerdict("z:80", "down", "unknown backend")  # ignored
    pool.applyVerdict("a:80", "sideways", "bad state")  # ignored
    assert pool.backends[0].state is BackendState.UP
    for _ in range(3):
        get(pool)
    assert pool.dialLog == ["a", "a", "a"]


# Host names: resolution and re-resolution ------------------------------------------


def named(resolver: FakeResolver, *servers: Server, **kw: Any) -> tuple[Fleet, MemoryReactorClock]:
    kw.setdefault("resolve_interval", 30.0)
    pool, reactor = makeFleet(servers=servers, **kw)
    pool._resolver = resolver
    return pool, reactor


def hostsOf(pool: UpstreamPool) -> list[str]:
    return [backend.address for backend in pool.backends]


def test_nameIsDialledUntilItIsResolved() -> None:
    resolver = FakeResolver({"app.internal": ["10.0.0.1"]}, manual=True)
    pool, _ = named(resolver, Server("app.internal", 8080))
    assert hostsOf(pool) == ["app.internal:8080"]
    pool.start()
    get(pool)
    assert pool.dialLog == ["app.internal"]
    resolver.complete()
    assert hostsOf(pool) == ["10.0.0.1:8080"]
    get(pool)
    assert pool.dialLog == ["app.internal", "10.0.0.1"]


def test_everyAddressBecomesABackendWithTheServersOptions() -> None:
    resolver = FakeResolver({"app.internal": ["10.0.0.1", "2001:db8::1"]})
    pool, _ = named(
        resolver,
        Server("app.internal", 8080, weight=3, max_conns=7),
        Server("10.9.9.9", 80, backup=True),
    )
    pool.start()
    assert hostsOf(pool) == ["10.0.0.1:8080", "[2001:db8::1]:8080", "10.9.9.9:80"]
    first, second, backup = pool.backends
    assert first.server is second.server is pool.upstream.servers[0]
    assert first.weight == 3 and first.server.max_conns == 7
    assert backup.backup
    # IP literals are not resolved.
    assert [name for name, _ in resolver.asked] == ["app.internal"]


def test_reResolutionKeepsUnchangedBackends(logs: Callable[[], str]) -> None:
    resolver = FakeResolver({"app.internal": ["10.0.0.1", "10.0.0.2"]})
    pool, reactor = named(resolver, Server("app.internal", 80))
    pool.start()
    kept, removed = pool.backends
    kept.ejections = 4
    health.transition(pool, kept, BackendState.DRAINING, "admin: drain")
    resolver.answers["app.internal"] = ["10.0.0.1", "10.0.0.3"]
    reactor.advance(30)
    assert hostsOf(pool) == ["10.0.0.1:80", "10.0.0.3:80"]
    assert pool.backends[0] is kept
    assert kept.ejections == 4 and kept.state is BackendState.DRAINING
    assert removed not in pool.backends
    assert "app.internal resolves to 10.0.0.1, 10.0.0.3" in logs()
    # The same answer again changes nothing.
    before = pool.backends
    reactor.advance(30)
    assert pool.backends is before


def test_failedResolutionKeepsThePreviousAddresses(logs: Callable[[], str]) -> None:
    resolver = FakeResolver({"app.internal": ["10.0.0.1"]})
    pool, reactor = named(resolver, Server("app.internal", 80))
    pool.start()
    before = pool.backends
    resolver.answers["app.internal"] = []
    reactor.advance(30)
    assert pool.backends == before
    assert (
        "resolving app.internal failed (DNS lookup failed: no A or AAAA record for "
        "app.internal.); keeping 10.0.0.1"
    ) in logs()


def test_failedFirstResolutionKeepsDiallingTheName() -> None:
    pool, _ = named(FakeResolver({}), Server("app.internal", 80))
    pool.start()
    assert hostsOf(pool) == ["app.internal:80"]


def test_requestOnARemovedAddressFinishes() -> None:
    resolver = FakeResolver({"app.internal": ["10.0.0.1"]})
    # Slow enough to be in flight across the re-resolution.
    pool, reactor = named(resolver, Server("app.internal", 80), response_timeout=60.0)
    pool.start()
    d = get(pool)
    assert pool.inFlight() == 1
    resolver.answers["app.internal"] = ["10.0.0.2"]
    reactor.advance(30)
    assert hostsOf(pool) == ["10.0.0.2:80"]
    assert pool.inFlight() == 1  # still in flight on the removed backend
    finish(pool.dials["10.0.0.1"])
    result(d).deliverBody(BodyCollector())
    assert pool.inFlight() == 0


def test_twoNamesOnOneAddressKeepTheirOwnBackends() -> None:
    resolver = FakeResolver({"a.internal": ["10.0.0.1"], "b.internal": ["10.0.0.1"]})
    reactor = MemoryReactorClock()
    upstream = Upstream(name="app", servers=(Server("a.internal", 443), Server("b.internal", 443)))
    pool = UpstreamPool(reactor, upstream, None, resolver=resolver)
    pool.start()
    a, b = pool.backends
    assert a.address == b.address == "10.0.0.1:443"
    endpoints = {a: pool.endpointFor(a), b: pool.endpointFor(b)}
    assert endpoints[a] is not endpoints[b]
    # Each request reaches the endpoint of the backend it was sent to (the
    # balancer alternates), and each backend keeps its own connection.
    dials: dict[Backend, MemoryEndpoint] = {}

    def endpointFor(backend: Backend) -> MemoryEndpoint:
        assert backend not in dials
        dials[backend] = MemoryEndpoint()
        return dials[backend]

    pool.endpointFor = endpointFor  # type: ignore[method-assign]
    for expected in (a, b, a, b):
        sent = Sent(pool, b"GET", b"/")
        [(protocol, transport)] = dials[expected].connections
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        result(sent).deliverBody(BodyCollector())
    assert list(dials) == [a, b]
    assert [dial.connections[0][1].value().count(b"GET /") for dial in dials.values()] == [2, 2]


def test_resolvedAddressIsDialledButTLSVerifiesTheConfiguredName() -> None:
    reactor = MemoryReactorClock()
    names: list[str] = []

    class Creators:
        def creatorFor(self, server: Server) -> Any:
            names.append(server.host)
            return optionsForClientTLS(server.host)

    resolver = FakeResolver({"app.internal": ["10.0.0.7"]})
    upstream = Upstream(name="t", servers=(Server("app.internal", 8443),), tls=True)
    pool = UpstreamPool(reactor, upstream, Creators(), resolver=resolver)
    pool.start()
    [backend] = pool.backends
    pool.endpointFor(backend).connect(Factory.forProtocol(Protocol))
    host, port = reactor.tcpClients[-1][:2]
    assert (host, port) == ("10.0.0.7", 8443)
    assert names == ["app.internal"]


def test_ipLiteralsAreDialledWithoutAResolver() -> None:
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor, Upstream(name="p", servers=(Server("::1", 80),)), None)
    endpoint = pool.endpointFor(pool.backends[0])
    assert isinstance(endpoint, TCP6ClientEndpoint)
    endpoint.connect(Factory.forProtocol(Protocol))
    assert reactor.tcpClients[-1][:2] == ("::1", 80)


def test_stopEndsReResolution() -> None:
    resolver = FakeResolver({"app.internal": ["10.0.0.1"]})
    pool, reactor = named(resolver, Server("app.internal", 80))
    pool.start()
    assert result(pool.stop()) is None
    reactor.advance(300)
    assert len(resolver.asked) == 1


def test_onlyIPsStartNoResolution() -> None:
    pool, reactor = makeFleet(hosts=("10.0.0.1",))
    pool.start()
    assert reactor.getDelayedCalls() == []


def test_newAddressesAreHealthChecked() -> None:
    resolver = FakeResolver({"app.internal": ["10.0.0.1"]})
    pool, reactor = named(resolver, Server("app.internal", 80), health_path="/healthz")
    pool.start()
    [first] = pool.backends
    assert first.state is BackendState.UNKNOWN
    assert pool.dialLog == ["10.0.0.1"]  # checked at once
    resolver.answers["app.internal"] = ["10.0.0.1", "10.0.0.2"]
    reactor.advance(30)
    second = pool.backends[1]
    assert second.state is BackendState.UNKNOWN and second.reason == "not checked yet"
    assert "10.0.0.2" in pool.dialLog
    result(pool.stop())


def test_workersDoNotCheckThemselves() -> None:
    reactor = MemoryReactorClock()
    upstream = Upstream(name="app", servers=(Server("10.0.0.1", 80),), health_path="/healthz")
    pool = UpstreamPool(reactor, upstream, None, activeChecks=False)
    pool.start()
    assert reactor.tcpClients == [] and reactor.getDelayedCalls() == []


def test_queuedRetryWhoseBackendsGoAwayGetsTheOriginalError() -> None:
    pool, _ = makeFleet(
        servers=(Server("a", 80), Server("b", 80, max_conns=1)), failing={"a": REFUSED},
        balance="least_conn", keepalive=0,
    )
    get(pool)  # a refuses, retried on b, which is now full
    retried = get(pool)  # a refuses, the retry waits for b
    assert pool.queued == 1
    a, b = pool.backends
    health.transition(pool, a, BackendState.DISABLED, "admin: disable")
    assert pool.queued == 1  # still waiting for b
    health.transition(pool, b, BackendState.DISABLED, "admin: disable")
    outcome = result(retried)
    assert outcome.check(BackendUnavailable)  # a's refusal, not a 503
    assert pool.dialLog == ["a", "b", "a"]


def test_keepaliveZeroClosesEveryConnection(logs: Callable[[], str]) -> None:
    pool, _ = makeFleet(hosts=("a",), keepalive=0)
    for _ in range(2):
        d = get(pool)
        assert b"Connection: close\r\n" in pool.dials["a"].wire()
        pool.dials["a"].answer()
        result(d).deliverBody(BodyCollector())
    assert pool.dialLog == ["a", "a"]
    assert all(t.disconnecting for _, t in pool.dials["a"].connections)
    assert "Traceback" not in logs() and "IndexError" not in logs()


def test_ejectionLogSaysWhatFailed(logs: Callable[[], str]) -> None:
    pool, _ = makeFleet(hosts=("a", "b"), failing={"a": REFUSED}, max_fails=1)
    d = get(pool)
    pool.dials["b"].answer()
    assert result(d).status == 200
    assert "upstream app backend a:80 ejected for 30s: 1 failures within 10s, last: connection refused" in logs()


def test_ejectionLogForAResetAndATimeout(logs: Callable[[], str]) -> None:
    pool, reactor = makeFleet(hosts=("a", "b", "c"), max_fails=1)
    d = get(pool)
    pool.dials["a"].reset()
    reactor.advance(5.0)  # b does not answer either
    pool.dials["c"].answer()
    assert result(d).status == 200
    assert "backend a:80 ejected for 30s: 1 failures within 10s, last: connection lost before a response" in logs()
    assert "backend b:80 ejected for 30s: 1 failures within 10s, last: no response head within 5s" in logs()


def test_rotatingDNSAnswersChangeNothing(logs: Callable[[], str]) -> None:
    resolver = FakeResolver({"app.internal": ["10.0.0.2", "2001:db8::1", "10.0.0.10"]})
    pool, reactor = named(resolver, Server("app.internal", 80))
    pool.start()
    assert hostsOf(pool) == ["10.0.0.2:80", "10.0.0.10:80", "[2001:db8::1]:80"]
    before = pool.backends
    resolver.answers["app.internal"] = ["2001:db8::1", "10.0.0.10", "10.0.0.2"]
    reactor.advance(30)
    assert pool.backends is before
    assert logs().count("resolves to") == 1


def test_aBackendAtItsLimitIsStillAvailable() -> None:
    # /status's "available" asks the balancer: a busy backend is not down.
    pool, _ = limited()
    get(pool)
    assert pool.balancer.isAvailable(pool.backends[0])


def test_queuedRetryTimingOutGetsTheOriginalError() -> None:
    pool, reactor = makeFleet(
        servers=(Server("a", 80), Server("b", 80, max_conns=1)), failing={"a": REFUSED},
        balance="least_conn", keepalive=0, queue_timeout=2.0,
    )
    get(pool)  # a refuses, retried on b, which is now full
    retried = get(pool)  # a refuses, the retry waits for b
    reactor.advance(2.0)
    outcome = result(retried)
    assert outcome.check(BackendUnavailable)  # a's refusal, not a 503
    assert metric(pool, "edgeproxy_queue_timeouts_total") == 1


def test_aBugWhileHandlingAFailureStillAnswers(monkeypatch: pytest.MonkeyPatch) -> None:
    pool, _ = makeFleet(failing={"a": REFUSED})

    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(pool.passive, "failure", broken)
    outcome = result(get(pool))
    assert outcome.check(BackendUnavailable)


# Reference cycles ----------------------------------------------------------


class _Reader(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


@pytest.fixture
def noCycleCollector() -> Iterator[None]:
    # What reference counting frees, with the cyclic collector kept out of
    # it: anything left is held by a cycle (or a leak).
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def test_proxiedResponseFreedByReferenceCounting(noCycleCollector: None) -> None:
    # The whole per-request chain (exchange, attempt, response, its body
    # protocol) is freed by reference counting once the body is delivered:
    # a cycle per response would leave every one to the cyclic collector.
    pool, endpoint, _ = makePool()
    d = Sent(pool, b"GET", b"/")
    endpoint.connections[0][0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
    response = result(d)
    del d
    reader = _Reader()
    response.deliverBody(reader)
    assert reader.data == b"body"
    assert pool.inFlight() == 0
    responseGone, readerGone = weakref.ref(response), weakref.ref(reader)
    del response, reader
    assert responseGone() is None and readerGone() is None
    # The connection went back to the pool and serves the next request.
    Sent(pool, b"GET", b"/")
    assert len(endpoint.connections) == 1


def test_oneBackendAtItsLimitQueuesAndDownFails() -> None:
    # The only backend of an upstream: picked while it may be, queued at
    # max_conns, 503 when it is down (the balancer is not asked).
    reactor = MemoryReactorClock()
    upstream = Upstream(
        name="one", servers=(Server("10.0.0.1", 8080, max_conns=1),), queue_timeout=5.0
    )
    pool = MemoryPool(reactor, upstream, None)
    pool.endpoint = MemoryEndpoint()
    first = Sent(pool, b"GET", b"/1")
    second = Sent(pool, b"GET", b"/2")
    assert len(pool.endpoint.connections) == 1 and pool.queued == 1
    protocol, _ = pool.endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(first).deliverBody(Protocol())
    assert pool.queued == 0
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(second).deliverBody(Protocol())
    [backend] = pool.backends
    health.transition(pool, backend, BackendState.DOWN, "test")
    failure = result(Sent(pool, b"GET", b"/3"))
    assert failure.check(ServiceUnavailable) and failure.value.status == 503


def test_sendHandsTheResponseToTheReceiver() -> None:
    pool, endpoint, _ = makePool()
    sent = Sent(pool, b"GET", b"/p")
    protocol, transport = endpoint.connections[0]
    assert transport.value().startswith(b"GET /p HTTP/1.1\r\n")
    assert not sent.called
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    response = result(sent)
    assert response.status == 200
    reader = _Reader()
    response.deliverBody(reader)
    assert reader.data == b"ok" and pool.inFlight() == 0


def test_sendFailsToTheReceiver() -> None:
    pool, _, _ = makePool(netError.ConnectionRefusedError("refused"), retries=0)
    failure = result(Sent(pool, b"GET", b"/"))
    assert isinstance(failure, Failure) and failure.check(BackendUnavailable)


def test_sendCancelledTellsTheReceiverNothing() -> None:
    pool, endpoint, reactor = makePool()
    sent = Sent(pool, b"GET", b"/")
    sent.cancel()
    _, transport = endpoint.connections[0]
    assert transport.disconnecting
    reactor.advance(10)
    assert not sent.called and pool.inFlight() == 0


# Interim responses and Expect: 100-continue ------------------------------------


def test_interimResponsesReachTheReceiverBeforeTheResponse() -> None:
    pool, endpoint, _ = makePool()
    sent = Sent(pool, b"GET", b"/")
    protocol, _ = endpoint.connections[0]
    protocol.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
    [(status, reason, fields)] = sent.interim
    assert (status, reason, fields.getAll(b"link")) == (103, b"Early Hints", [b"</s.css>; rel=preload"])
    assert not sent.called
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert result(sent).status == 200
    assert len(sent.interim) == 1


def test_noInterimResponseAfterACancel() -> None:
    pool, endpoint, _ = makePool()
    sent = Sent(pool, b"GET", b"/")
    sent.cancel()
    endpoint.connections[0][0].dataReceived(b"HTTP/1.1 103 Early Hints\r\n\r\n")
    assert sent.interim == [] and not sent.called


EXPECT = Fields([(b"host", b"h"), (b"expect", b"100-continue")])


def test_expectContinueIsAnsweredByTheBackend() -> None:
    pool, endpoint, reactor = makePool()
    sent = Sent(pool, b"PUT", b"/doc", pipeWith(reactor, b"document"), fields=EXPECT)
    protocol, transport = endpoint.connections[0]
    assert transport.value().endswith(b"Expect: 100-continue\r\n\r\n")  # the body waits
    protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert [status for status, _, _ in sent.interim] == [100]
    assert transport.value().endswith(b"\r\n\r\ndocument")
    protocol.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    result(sent).deliverBody(BodyCollector())
    assert pool.inFlight() == 0


def test_expectWaitIsBoundedAndTheResponseTimeoutFollowsTheBody() -> None:
    pool, endpoint, reactor = makePool(retries=0)
    sent = Sent(pool, b"PUT", b"/doc", pipeWith(reactor, b"document"), fields=EXPECT)
    _, transport = endpoint.connections[0]
    reactor.advance(EXPECT_TIMEOUT)
    assert transport.value().endswith(b"\r\n\r\ndocument")  # sent anyway
    # The response timeout (5 s) runs from the end of the body.
    reactor.advance(4.9)
    assert not sent.called
    reactor.advance(0.2)
    assert result(sent).check(UpstreamTimeout)


def test_expectAnsweredWithAFinalStatus() -> None:
    pool, endpoint, reactor = makePool()
    pipe = pipeWith(reactor, b"document")
    sent = Sent(pool, b"PUT", b"/doc", pipe, fields=EXPECT)
    protocol, transport = endpoint.connections[0]
    head = transport.value()
    protocol.dataReceived(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    response = result(sent)
    assert response.status == 413 and sent.interim == []
    assert transport.value() == head  # no byte of the body
    response.deliverBody(BodyCollector())
    assert transport.disconnecting and pool.inFlight() == 0
    assert reactor.getDelayedCalls() == []


def test_expectingRequestResetIsRetriedAndWaitsAgain() -> None:
    pool, reactor = makeFleet()
    sent = Sent(pool, b"PUT", b"/", pipeWith(reactor, b"document"), fields=EXPECT)
    pool.dials["a"].reset()  # before its 100 Continue: nothing of the body sent
    assert pool.dialLog == ["a", "b"]
    b = pool.dials["b"]
    assert b.wire().endswith(b"Expect: 100-continue\r\n\r\n")
    b.answer(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert b.wire().endswith(b"\r\n\r\ndocument")
    b.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert result(sent).status == 204
    assert [status for status, _, _ in sent.interim] == [100]
