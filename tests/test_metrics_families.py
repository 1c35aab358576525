"""
Tests for the metric families an operator asked for in one go
(L{edgeproxy.metrics}): per backend, requests by method and status class,
TLS handshake failures by reason, the last reload, the process's own
C{process_*}, configurable buckets.  Each through the code that records it
in production where there is one: a real upstream pool, a real listener
factory, real TLS handshakes in memory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from OpenSSL import SSL
from twisted.internet import error as netError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from edgeproxy.bodies import BodyPipe
from edgeproxy.config.model import Limits, Listener, Server, TLSSettings, Upstream
from edgeproxy.h1 import Fields
from edgeproxy.metrics import Metrics, methodClass
from edgeproxy.tls.store import CertificateStore
from edgeproxy.upstream.backend import Backend
from edgeproxy.upstream.pool import UpstreamPool
from tests.certutil import CertificateAuthority
from tests.metricsutil import Samples, samplesOf
from tests.test_server import Echo, makeFactory
from tests.tlsutil import LegacyClientCreator, connectTLS, handshake


def scrape(metrics: Metrics) -> Samples:
    return samplesOf(metrics.exposition())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# Per backend, through a real pool ------------------------------------------


class Dial:
    """One backend's endpoint: connects in memory, or fails."""

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


class _Reader:
    """A client body reader that is never paused here (L{ClientReader})."""

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


class Fleet(UpstreamPool):
    dials: dict[str, Dial]

    def endpointFor(self, server: Backend) -> Any:  # type: ignore[override]
        return self.dials.setdefault(server.host, Dial())


def test_perBackendRequestsResponsesTimesAndBytes() -> None:
    """
    Every attempt is a backend request, every response head counts by
    status class with its time, and the body bytes both ways are counted per
    backend; the attempt that failed (and was retried) shows on its backend.
    """
    reactor = MemoryReactorClock()
    pool = Fleet(reactor, Upstream(name="app", servers=(Server("a", 80), Server("b", 80))), None)
    pool.dials = {"a": Dial(netError.ConnectionRefusedError("refused"))}
    body = BodyPipe(12, _Reader(), reactor, 0, lambda: None)
    body.write(b"twelve bytes")
    body.finish()
    outcome: list[Any] = []

    class Receiver:
        def upstreamInterim(self, status: int, reason: bytes, fields: Fields) -> None:
            pass

        def upstreamResponded(self, response: Any) -> None:
            outcome.append(response)

        def upstreamFailed(self, failure: Failure) -> None:
            outcome.append(failure)

    pool.send(b"PUT", b"/", Fields([(b"host", b"h")]), body, Receiver())
    reactor.advance(0.25)
    pool.dials["b"].connections[-1][0].dataReceived(b"HTTP/1.1 503 Busy\r\nContent-Length: 5\r\n\r\nbusy!")
    (response,) = outcome
    received: list[bytes] = []

    class Collect(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    response.deliverBody(Collect())
    assert b"".join(received) == b"busy!"
    samples = scrape(pool.metrics)
    assert value(samples, "edgeproxy_backend_requests_total", upstream="app", backend="a:80") == 1
    assert value(samples, "edgeproxy_backend_requests_total", upstream="app", backend="b:80") == 1
    assert value(samples, "edgeproxy_backend_responses_total", upstream="app", backend="b:80", code="5xx") == 1
    assert value(samples, "edgeproxy_backend_responses_total", upstream="app", backend="a:80", code="5xx") is None
    bucket = "edgeproxy_backend_response_seconds_bucket"
    assert value(samples, bucket, upstream="app", backend="b:80", code="5xx", le="0.25") == 1
    assert value(samples, bucket, upstream="app", backend="b:80", code="5xx", le="0.1") == 0
    assert value(samples, "edgeproxy_backend_sent_bytes_total", upstream="app", backend="b:80") == 12
    assert value(samples, "edgeproxy_backend_received_bytes_total", upstream="app", backend="b:80") == 5


# Requests by method and status class ------------------------------------------


def test_methodClass() -> None:
    assert [methodClass(m) for m in (b"GET", "PATCH", b"BREW", b"get", b"")] == [
        "GET", "PATCH", "other", "other", "other",
    ]


def test_requestHistogramByMethodAndCode() -> None:
    metrics = Metrics()
    metrics.requestDone("app", "app", 200, 0.02, b"GET")
    metrics.requestDone("app", "app", 201, 0.3, b"POST")
    metrics.requestDone("", "", 400, 0.001, b"BREW")  # RFC 2324 is not RFC 9110
    samples = scrape(metrics)
    name = "edgeproxy_http_request_duration_seconds"
    assert value(samples, name + "_count", method="GET", code="2xx") == 1
    assert value(samples, name + "_bucket", method="POST", code="2xx", le="0.25") == 0
    assert value(samples, name + "_bucket", method="POST", code="2xx", le="0.5") == 1
    assert value(samples, name + "_count", method="other", code="4xx") == 1


def test_requestMethodFromTheListener() -> None:
    """The listener passes each request's method with its outcome."""
    metrics = Metrics()
    clock = Clock()
    factory = makeFactory(Limits(), clock, Echo([]))
    factory.metrics = metrics
    from twisted.internet.address import IPv4Address

    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"DELETE /x HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    samples = scrape(metrics)
    assert value(samples, "edgeproxy_http_request_duration_seconds_count", method="DELETE", code="2xx") == 1


def test_bucketsAreConfigurable() -> None:
    metrics = Metrics(buckets=(0.1, 1.0))
    metrics.requestDone("r", "u", 200, 0.5, b"GET")
    metrics.backendResponded("u", "b:1", 200, 2.0)
    samples = scrape(metrics)
    bounds = sorted(
        dict(labels)["le"] for (name, labels) in samples if name == "edgeproxy_request_duration_seconds_bucket"
    )
    assert bounds == ["+Inf", "0.1", "1.0"]
    bucket = "edgeproxy_backend_response_seconds_bucket"
    assert value(samples, bucket, upstream="u", backend="b:1", code="2xx", le="1.0") == 0
    assert value(samples, bucket, upstream="u", backend="b:1", code="2xx", le="+Inf") == 1


# The last reload, the process ----------------------------------------------------


def test_lastReloadSuccessAndTime() -> None:
    """
    As Prometheus's own: the start is a successful load; a refused reload
    sets the gauge to 0 and keeps the time of the last good one.
    """
    now = [1000.0]
    metrics = Metrics(clock=lambda: now[0])
    samples = scrape(metrics)
    assert value(samples, "edgeproxy_config_last_reload_success") == 1
    assert value(samples, "edgeproxy_config_last_reload_success_timestamp_seconds") == 1000
    now[0] = 2000.0
    metrics.reloaded(False)
    samples = scrape(metrics)
    assert value(samples, "edgeproxy_config_last_reload_success") == 0
    assert value(samples, "edgeproxy_config_last_reload_success_timestamp_seconds") == 1000
    now[0] = 3000.0
    metrics.reloaded(True)
    samples = scrape(metrics)
    assert value(samples, "edgeproxy_config_last_reload_success") == 1
    assert value(samples, "edgeproxy_config_last_reload_success_timestamp_seconds") == 3000


def test_processMetrics() -> None:
    """CPU, memory, open descriptors and start time of this process."""
    samples = scrape(Metrics())
    assert value(samples, "process_cpu_seconds_total") is not None
    assert value(samples, "process_resident_memory_bytes") > 0  # type: ignore[operator]
    assert 0 < value(samples, "process_open_fds") < 100_000  # type: ignore[operator]
    started = value(samples, "process_start_time_seconds")
    assert started is not None and abs(started - time.time()) < 86400 * 30
    assert value(samples, "process_max_fds") == os.sysconf("SC_OPEN_MAX")


# TLS handshake failures by reason --------------------------------------------------


class CipherClientCreator(LegacyClientCreator):
    """A TLS 1.2 client offering only cipher suites the proxy does not accept."""

    def __init__(self, ciphers: bytes) -> None:
        super().__init__(SSL.TLS1_2_VERSION)
        self._context.set_cipher_list(ciphers + b":@SECLEVEL=0")


class NameCheckingClientCreator(LegacyClientCreator):
    """
    A client that checks the server's name during the handshake, as browsers
    and curl do (Twisted's own client checks it afterwards), and aborts with
    an alert when the certificate does not cover it.
    """

    def __init__(self, sni: str) -> None:
        super().__init__(SSL.TLS1_3_VERSION, sni)

        def verify(connection: Any, certificate: Any, errno: int, depth: int, ok: int) -> bool:
            if depth:
                return True
            names = certificate.to_cryptography().extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.DNSName)
            return sni in names

        self._context.set_verify(SSL.VERIFY_PEER, verify)


def test_handshakeFailuresCountedByReason(tmp_path: Path) -> None:
    """
    Each failed handshake is counted with why: no common version, no common
    cipher, a name no certificate covers, or something else.
    """
    ca = CertificateAuthority("metrics test root")
    (tmp_path / "certs").mkdir()
    ca.issue(["a.example"]).writePEM(tmp_path / "certs" / "a.pem")
    clock = Clock()
    clock.advance(time.time())
    store = CertificateStore(TLSSettings(certificates=(str(tmp_path / "certs"),), default=None), clock)
    store.load()
    metrics = Metrics()
    factory = makeFactory(Limits(), Clock(), Echo([]), Listener(name="https", endpoint="tcp:0", tls=True))
    factory.metrics = metrics
    creator = store.serverConnectionCreator()

    # The server refuses an old protocol version.
    assert not connectTLS(creator, LegacyClientCreator(SSL.TLS1_VERSION), serverFactory=factory).established
    # Only RSA key exchange and CBC suites: nothing the proxy accepts.
    assert not connectTLS(creator, CipherClientCreator(b"AES128-SHA"), serverFactory=factory).established
    # A name no certificate covers: the default certificate, refused.
    assert not connectTLS(creator, NameCheckingClientCreator("unknown.example"), serverFactory=factory).established
    # The same client for a name that is served: no failure.
    assert connectTLS(creator, NameCheckingClientCreator("a.example"), serverFactory=factory).established
    # The client does not trust the certificate and says so with an alert.
    other = CertificateAuthority("someone else")
    assert not handshake(creator, "a.example", other.certificatePEM, serverFactory=factory).established

    samples = scrape(metrics)
    failures = {
        dict(labels)["reason"]: count
        for (name, labels), count in samples.items()
        if name == "edgeproxy_tls_handshake_failures_total"
    }
    assert failures == {"protocol_version": 1, "no_shared_cipher": 1, "unknown_sni": 1, "other": 1}
    assert value(samples, "edgeproxy_tls_handshakes_total", listener="https", version="1.3", alpn="none") == 1
