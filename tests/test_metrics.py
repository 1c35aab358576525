"""
Tests for L{edgeproxy.metrics} and the instrumentation of
L{edgeproxy.http.listener.ListenerFactory}: real listeners over memory
transports (and in-memory TLS), the exposition parsed back with
C{prometheus_client}'s own parser, so what is asserted is what a Prometheus
server would scrape.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from edgeproxy.config.model import Config, Listener, ProxySettings, TLSSettings
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.metrics import CONTENT_TYPE, Metrics, statusClass
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime
from edgeproxy.tls.store import CertificateStore
from tests.certutil import CertificateAuthority
from tests.fastpaths import fastPaths  # noqa: F401 (fixture)
from tests.memorypool import MemoryResponse, ProxyClient
from tests.metricsutil import Samples, samplesOf
from tests.tlsutil import LegacyClientCreator, connectTLS, handshake


def scrape(metrics: Metrics) -> Samples:
    """Every sample of the exposition: (name, sorted labels) -> value."""
    return samplesOf(metrics.exposition())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# Metrics alone


def test_statusClass() -> None:
    assert [statusClass(c) for c in (101, 200, 308, 404, 503, 99, 600)] == [
        "1xx", "2xx", "3xx", "4xx", "5xx", "other", "other",
    ]


def test_everyNameIsPrefixedAndParses() -> None:
    metrics = Metrics()
    metrics.requestDone("app", "pool", 503, 0.2)
    metrics.backendResponded("pool", "10.0.0.1:80", 200, 0.05)
    metrics.upstreamFailed("pool", 502)
    metrics.bytesTransferred("https", 10, 20)
    metrics.connectionAccepted("https")
    metrics.handshakeDone("https", "1.3", "h2")
    metrics.handshakeFailed("https")
    metrics.healthChecked("pool", "10.0.0.1:80", False)
    metrics.backendTransition("pool", "10.0.0.1:80", "down")
    metrics.ejected("pool", "10.0.0.1:80")
    metrics.retried("pool", "connect")
    metrics.retryRefused("pool")
    metrics.queueTimedOut("pool")
    metrics.reloaded(True)
    metrics.reloaded(False)
    text = metrics.exposition().decode("utf-8")
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.name.startswith(("edgeproxy_", "process_")), family.name
        assert family.documentation, family.name
    samples = scrape(metrics)
    assert value(samples, "edgeproxy_requests_total", route="app", upstream="pool", code="5xx") == 1
    assert value(samples, "edgeproxy_request_duration_seconds_bucket", route="app", le="0.25") == 1
    assert value(samples, "edgeproxy_request_duration_seconds_bucket", route="app", le="0.1") == 0
    assert value(samples, "edgeproxy_upstream_response_seconds_count", upstream="pool") == 1
    assert value(samples, "edgeproxy_upstream_errors_total", upstream="pool", code="502") == 1
    assert value(samples, "edgeproxy_received_bytes_total", listener="https") == 10
    assert value(samples, "edgeproxy_sent_bytes_total", listener="https") == 20
    assert value(samples, "edgeproxy_tls_handshakes_total", listener="https", version="1.3", alpn="h2") == 1
    assert value(samples, "edgeproxy_tls_handshake_failures_total", listener="https", reason="other") == 1
    assert value(samples, "edgeproxy_health_checks_total", upstream="pool", backend="10.0.0.1:80", result="failed") == 1
    assert value(samples, "edgeproxy_backend_transitions_total", upstream="pool", backend="10.0.0.1:80", state="down") == 1
    assert value(samples, "edgeproxy_ejections_total", upstream="pool", backend="10.0.0.1:80") == 1
    assert value(samples, "edgeproxy_retries_total", upstream="pool", reason="connect") == 1
    assert value(samples, "edgeproxy_retries_refused_total", upstream="pool") == 1
    assert value(samples, "edgeproxy_queue_timeouts_total", upstream="pool") == 1
    assert value(samples, "edgeproxy_reloads_total", result="ok") == 1
    assert value(samples, "edgeproxy_reloads_total", result="failed") == 1
    # No *_created series (disabled on purpose).
    assert not [key for key in samples if key[0].endswith("_created")]
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_metricsAreNotShared() -> None:
    """Two Metrics objects (two runtimes, two tests) count separately."""
    one, two = Metrics(), Metrics()
    one.requestDone("a", "b", 200, 0.0)
    one.traffic("l").sent += 5
    assert value(scrape(one), "edgeproxy_requests_total", route="a", upstream="b", code="2xx") == 1
    assert value(scrape(two), "edgeproxy_requests_total", route="a", upstream="b", code="2xx") is None
    assert value(scrape(two), "edgeproxy_sent_bytes_total", listener="l") is None


def test_trafficCountersAreMonotonicPerListener() -> None:
    metrics = Metrics()
    traffic = metrics.traffic("web")
    assert metrics.traffic("web") is traffic
    traffic.received += 3
    metrics.bytesTransferred("web", 4, 5)
    samples = scrape(metrics)
    assert value(samples, "edgeproxy_received_bytes_total", listener="web") == 7
    assert value(samples, "edgeproxy_sent_bytes_total", listener="web") == 5


def test_stateSourceReadAtScrape() -> None:
    metrics = Metrics()
    state = {"n": 1.0}
    metrics.setStateSource(lambda: [
        ("connections_active", "Open connections.", {"listener": "web"}, state["n"]),
        ("info", "Info.", {"version": "1"}, 1.0),
    ])
    assert value(scrape(metrics), "edgeproxy_connections_active", listener="web") == 1
    state["n"] = 4.0
    assert value(scrape(metrics), "edgeproxy_connections_active", listener="web") == 4
    metrics.setStateSource(None)
    assert value(scrape(metrics), "edgeproxy_connections_active", listener="web") is None


# Listener instrumentation (plain HTTP)


def test_requestsBytesAndConnectionsCounted() -> None:
    metrics = Metrics()
    clock = MemoryReactorClock()
    clock.advance(1000)
    client = ProxyClient(Listener(name="web", endpoint="tcp:0", tls=False), clock=clock, metrics=metrics)
    request = b"GET /page HTTP/1.1\r\nHost: app.example\r\n\r\n"
    client.send(request)
    [call] = client.sent
    clock.advance(0.3)
    call.respond(MemoryResponse(200, [(b"Content-Type", b"text/plain")], b"hello", length=5))
    unrouted = b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n"
    client.send(unrouted)
    wire = client.transport.value()
    assert wire.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 404 " in wire

    samples = scrape(metrics)
    assert value(samples, "edgeproxy_connections_total", listener="web") == 1
    assert value(samples, "edgeproxy_received_bytes_total", listener="web") == len(request) + len(unrouted)
    assert value(samples, "edgeproxy_sent_bytes_total", listener="web") == len(wire)
    assert value(samples, "edgeproxy_requests_total", route="app", upstream="app", code="2xx") == 1
    # Not routed: empty route and upstream labels.
    assert value(samples, "edgeproxy_requests_total", route="", upstream="", code="4xx") == 1
    # The routed request took 0.3 s on the injected clock.
    assert value(samples, "edgeproxy_request_duration_seconds_bucket", route="app", le="0.25") == 0
    assert value(samples, "edgeproxy_request_duration_seconds_bucket", route="app", le="0.5") == 1
    assert value(samples, "edgeproxy_request_duration_seconds_sum", route="app") == pytest.approx(0.3)


def test_requestCutShortCountedOnce() -> None:
    """A response cut short is one request (with the status it had), and
    the connection lost after it adds none."""
    metrics = Metrics()
    client = ProxyClient(Listener(name="web", endpoint="tcp:0", tls=False), metrics=metrics)
    client.send(b"GET /page HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[0].respond(MemoryResponse(200, [], b"part", cut=True))
    client.lose()
    assert value(scrape(metrics), "edgeproxy_requests_total", route="app", upstream="app", code="2xx") == 1


def test_bytesCountedOverASocket(fastPaths: bool) -> None:
    """
    Over the connection a TCP listener accepts (C{LeanServer} with the fast
    paths, C{tcp.Server} without), every byte the client receives is
    counted once, whether it went out straight to the socket (a complete
    response) or through the transport's queue (a streamed one).
    """
    from tests.wire import SocketWire

    metrics = Metrics()
    clock = MemoryReactorClock()
    client = ProxyClient(Listener(name="web", endpoint="tcp:0", tls=False), clock=clock, metrics=metrics)
    wire = SocketWire(client.factory, clock)
    try:
        unrouted = b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n"
        wire.send(unrouted)
        request = b"GET /page HTTP/1.1\r\nHost: app.example\r\n\r\n"
        wire.send(request)
        [call] = client.sent
        call.respond(MemoryResponse(200, [(b"Content-Type", b"text/plain")], b"hello", length=5))
        wire.send(request)
        call = client.sent[1]
        call.respond(MemoryResponse(200, [], b"x" * 300_000, length=None))
        received = wire.received()
        assert received.startswith(b"HTTP/1.1 404 ") and received.count(b"HTTP/1.1 200 ") == 2
        samples = scrape(metrics)
        assert value(samples, "edgeproxy_sent_bytes_total", listener="web") == len(received)
        assert value(samples, "edgeproxy_received_bytes_total", listener="web") == len(unrouted) + 2 * len(request)
    finally:
        wire.close()


class SelfWritingTransport(StringTransport):
    """Like TLSMemoryBIOProtocol: writeSequence goes through write."""

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))


@pytest.mark.parametrize("transportType", [StringTransport, SelfWritingTransport])
def test_writeSequenceCountedOnce(transportType: type[StringTransport]) -> None:
    """Bytes written through writeSequence are counted once, whether or not it calls write."""
    metrics = Metrics()
    factory = ListenerFactory(lambda: None, Listener(name="web", endpoint="tcp:0", tls=False),
                              MemoryReactorClock(), metrics=metrics)
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    transport = transportType()
    protocol.makeConnection(transport)
    transport.writeSequence([b"ab", b"cde"])
    transport.write(b"f")
    transport.writeSequence(iter([b"gh"]))
    assert transport.value() == b"abcdefgh"
    assert value(scrape(metrics), "edgeproxy_sent_bytes_total", listener="web") == 8


def test_listenerWithoutMetricsIsUntouched() -> None:
    """Without metrics the transport is not wrapped and nothing is counted."""
    factory = ListenerFactory(lambda: None, Listener(name="web", endpoint="tcp:0", tls=False), MemoryReactorClock())
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert "write" not in vars(transport) and "writeSequence" not in vars(transport)
    assert protocol._traffic is None


# Listener instrumentation (TLS handshakes)


class TLSSite:
    def __init__(self, root: Path) -> None:
        self.ca = CertificateAuthority("metrics test root")
        directory = root / "certs"
        directory.mkdir()
        self.ca.issue(["a.example"]).writePEM(directory / "a.pem")
        clock = Clock()
        clock.advance(time.time())
        self.store = CertificateStore(TLSSettings(certificates=(str(directory),), default=None), clock)
        self.store.load()
        self.metrics = Metrics()
        self.listener = Listener(name="https", endpoint="tcp:0", tls=True)
        config = Config(
            path="/etc/edge.ini", proxy=ProxySettings(), tls=None, listeners=(self.listener,),
            upstreams={}, routes=(),
        )
        # No route: every request gets a 404 from the listener itself.
        runtime = Runtime(config=config, router=Router(()), pools={})
        self.site = ListenerFactory(lambda: runtime, self.listener, MemoryReactorClock(), metrics=self.metrics)


@pytest.fixture
def tlsSite(tmp_path: Path) -> TLSSite:
    return TLSSite(tmp_path)


def test_handshakeCountedWithVersionAndALPN(tlsSite: TLSSite) -> None:
    creator = tlsSite.store.serverConnectionCreator()
    result = handshake(creator, "a.example", tlsSite.ca.certificatePEM, alpn=[b"h2", b"http/1.1"],
                       serverFactory=tlsSite.site)
    # h2 when the listener serves it, else http/1.1: what was negotiated.
    alpn = tlsSite.site.acceptableProtocols()[0]
    assert result.established and result.negotiatedProtocol == alpn
    result = connectTLS(creator, LegacyClientCreator(SSL.TLS1_2_VERSION), serverFactory=tlsSite.site)
    assert result.established
    samples = scrape(tlsSite.metrics)
    assert value(
        samples, "edgeproxy_tls_handshakes_total", listener="https", version="1.3", alpn=alpn.decode()
    ) == 1
    assert value(samples, "edgeproxy_tls_handshakes_total", listener="https", version="1.2", alpn="none") == 1
    assert value(samples, "edgeproxy_connections_total", listener="https") == 2
    assert value(samples, "edgeproxy_tls_handshake_failures_total", listener="https") is None


def test_handshakeFailuresCounted(tlsSite: TLSSite) -> None:
    creator = tlsSite.store.serverConnectionCreator()
    # The server refuses an old protocol version.
    result = connectTLS(creator, LegacyClientCreator(SSL.TLS1_VERSION), serverFactory=tlsSite.site)
    assert not result.established
    # The client does not trust the certificate and says so with an alert.
    other = CertificateAuthority("someone else")
    result = handshake(creator, "a.example", other.certificatePEM, serverFactory=tlsSite.site)
    assert not result.established
    samples = scrape(tlsSite.metrics)
    # By reason: tests/test_metrics_families.py.
    assert value(samples, "edgeproxy_tls_handshake_failures_total", listener="https", reason="protocol_version") == 1
    assert value(samples, "edgeproxy_tls_handshake_failures_total", listener="https", reason="other") == 1
    assert not [k for k in samples if k[0] == "edgeproxy_tls_handshakes_total"]


def test_closedBeforeHandshakeIsNoFailure(tlsSite: TLSSite) -> None:
    """A client that connects and goes away (a port check) is no TLS failure."""
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone

    factory = TLSMemoryBIOFactory(tlsSite.store.serverConnectionCreator(), False, tlsSite.site)
    protocol: Any = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555))
    transport = StringTransport()
    transport.setTcpNoDelay = lambda enabled: None  # type: ignore[attr-defined]
    protocol.makeConnection(transport)
    protocol.connectionLost(Failure(ConnectionDone()))
    samples = scrape(tlsSite.metrics)
    assert value(samples, "edgeproxy_connections_total", listener="https") == 1
    assert value(samples, "edgeproxy_tls_handshake_failures_total", listener="https") is None


def test_histogramBucketsAreInclusiveAndCumulative() -> None:
    metrics = Metrics()
    for seconds in (0.001, 0.0011, 0.5, 100.0):
        metrics.requestDone("r", "u", 200, seconds)
        metrics.backendResponded("u", "10.0.0.1:80", 200, seconds)
    samples = scrape(metrics)
    for name, label in (("edgeproxy_request_duration_seconds", {"route": "r"}),
                        ("edgeproxy_upstream_response_seconds", {"upstream": "u"})):
        assert value(samples, name + "_bucket", le="0.001", **label) == 1
        assert value(samples, name + "_bucket", le="0.0025", **label) == 2
        assert value(samples, name + "_bucket", le="0.5", **label) == 3
        assert value(samples, name + "_bucket", le="60.0", **label) == 3
        assert value(samples, name + "_bucket", le="+Inf", **label) == 4
        assert value(samples, name + "_count", **label) == 4
        assert value(samples, name + "_sum", **label) == pytest.approx(100.5021)


def test_bytesCountedOverTLS(tlsSite: TLSSite) -> None:
    """
    On a TLS listener the bytes counted are the HTTP bytes (after
    decryption, before encryption): what the client sent and received in
    plain text, on the transport Twisted's TLS layer gives the site.
    """
    creator = tlsSite.store.serverConnectionCreator([b"http/1.1"])
    result = handshake(creator, "a.example", tlsSite.ca.certificatePEM, serverFactory=tlsSite.site)
    assert result.established
    request = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
    result.send(request)
    result.send(request)
    assert result.clientApp.received.startswith(b"HTTP/1.1 ")
    samples = scrape(tlsSite.metrics)
    assert value(samples, "edgeproxy_received_bytes_total", listener="https") == 2 * len(request)
    assert value(samples, "edgeproxy_sent_bytes_total", listener="https") == len(
        result.clientApp.received
    )


def test_bytesCountedOverTheEdgeTLSTransport(tlsSite: TLSSite, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The same over the TLS transport the service listens with
    (L{EdgeTLSTransport}, which counts what it is given to send itself):
    each byte counted once.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from edgeproxy._compat.twisted.tls import EdgeTLSTransport
    from tests import tlsutil

    class EdgeTLSFactory(TLSMemoryBIOFactory):
        def __init__(self, creator: Any, isClient: bool, wrapped: Any, clock: Any = None) -> None:
            super().__init__(creator, isClient, wrapped, clock)
            if not isClient:
                self.protocol = EdgeTLSTransport

    monkeypatch.setattr(tlsutil, "TLSMemoryBIOFactory", EdgeTLSFactory)
    creator = tlsSite.store.serverConnectionCreator([b"http/1.1"])
    result = handshake(creator, "a.example", tlsSite.ca.certificatePEM, serverFactory=tlsSite.site)
    assert type(result.server) is EdgeTLSTransport
    request = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
    result.send(request)
    result.send(request)
    assert result.clientApp.received.count(b"HTTP/1.1 404 ") == 2
    samples = scrape(tlsSite.metrics)
    assert value(samples, "edgeproxy_received_bytes_total", listener="https") == 2 * len(request)
    assert value(samples, "edgeproxy_sent_bytes_total", listener="https") == len(
        result.clientApp.received
    )
