# -*- test-case-name: tests.test_metrics -*-
"""
The Prometheus metrics of one proxy process: every name starts with
C{edgeproxy_}, and C{docs/operations.rst} documents each one.

A L{Metrics} owns a private C{CollectorRegistry} (so tests and several
runtimes never share counters by accident).  Code that observes something
calls one of the recording methods below; it never touches
C{prometheus_client} itself, so the names and labels live in this module
and in the collectors it registers (L{edgeproxy.collectors}).

What is a I{state} rather than an event (backend states, requests in flight,
open connections, certificate expiry) is not recorded here but read at
scrape time from the live objects through L{Metrics.setStateSource}, so it
can never drift from what C{/status} shows.

Label values are bounded: routes, upstreams, listeners and backends come
from the configuration (or DNS answers for it), status codes are reduced to
their class, methods to the standard ones and C{other}, TLS versions, ALPN
protocols and handshake failure reasons to the few that exist.

The process's own C{process_*} metrics (CPU, memory, file descriptors,
start time) come from C{prometheus_client}'s C{ProcessCollector}.

The recording API, by who calls it:

  - the request path: L{Metrics.requestDone} (with the method, for
    C{edgeproxy_http_request_duration_seconds}), L{Metrics.traffic},
    L{Metrics.connectionAccepted}, L{Metrics.handshakeDone},
    L{Metrics.handshakeFailed} (with a reason from
    L{edgeproxy.tls.failures.handshakeFailureReason});
  - the upstream pool, once per attempt on a backend:
    L{Metrics.backendRequest}, L{Metrics.backendResponded},
    L{Metrics.backendTraffic} (byte counters to add to), and per upstream
    L{Metrics.upstreamResponded}, L{Metrics.upstreamFailed},
    L{Metrics.retried}, L{Metrics.retryRefused}, L{Metrics.queueTimedOut};
  - health: L{Metrics.healthChecked}, L{Metrics.backendTransition},
    L{Metrics.ejected};
  - the service: L{Metrics.reloaded}.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeproxy.collectors import (
    BackendTrafficCollector,
    CacheCollector,
    CacheCounters,
    Counts,
    Durations,
    Observed,
    Projection,
    SecurityCounters,
    TrafficCollector,
)
from edgeproxy.config.model import LATENCY_BUCKETS

__all__ = [
    "CONTENT_TYPE",
    "Metrics",
    "StateSample",
    "Traffic",
    "methodClass",
    "statusClass",
]

# The *_created series double every counter for a start time nobody graphs;
# restarts show as counter resets, which rate() already handles.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The exposition format C{GET /metrics} serves."""

StateSample = tuple[str, str, dict[str, str], float]
"""(metric name, help text, labels, value) of one gauge sample, as the state
source yields them; names are given without the C{edgeproxy_} prefix."""


def statusClass(code: int) -> str:
    """C{200} -> C{"2xx"}; anything outside 100-599 -> C{"other"}."""
    if 100 <= code <= 599:
        return _CLASSES[code // 100]
    return "other"


_CLASSES = {n: f"{n}xx" for n in range(1, 6)}


# RFC 9110 §9.3 and RFC 5789 (PATCH): anything else is "other", so that a
# client cannot make a label value per invented method.
_METHODS = {
    method.encode("ascii"): method
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
}


def methodClass(method: bytes | str) -> str:
    """C{b"GET"} -> C{"GET"}; a method outside RFC 9110 and PATCH -> C{"other"}."""
    if isinstance(method, str):
        method = method.encode("ascii", "replace")
    return _METHODS.get(method, "other")


class _StateCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        source = self._metrics._stateSource
        if source is None:
            return
        families: dict[str, GaugeMetricFamily] = {}
        labelNames: dict[str, list[str]] = {}
        for name, documentation, labels, value in source():
            family = families.get(name)
            if family is None:
                labelNames[name] = sorted(labels)
                family = families[name] = GaugeMetricFamily(
                    "edgeproxy_" + name, documentation, labels=labelNames[name]
                )
            family.add_metric([labels[key] for key in labelNames[name]], value)
        yield from families.values()


class Traffic:
    """
    The bytes of one listener, counted in plain integers.

    Bytes are counted on every read and write of every connection, far too
    often for a C{prometheus_client} counter (a lock and a label lookup per
    call); the listener's site adds to these two integers instead and the
    scrape reads them (L{edgeproxy.collectors.TrafficCollector}).
    """

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0


class Metrics:
    """
    The counters and histograms of one process, and the scrape-time gauges.
    """

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS, clock: Callable[[], float] = time.time) -> None:
        """
        @param buckets: upper bounds (seconds, ascending) of every duration
            histogram (C{[edgeproxy] latency_buckets}).
        @param clock: POSIX time, for the reload time stamps.
        """
        self._clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Once per request: one observation under (route, upstream, method
        # class, status class), shown as three families (see edgeproxy.collectors.Observed).
        self._requests = Observed(buckets)
        for family in (
            Projection(
                self._requests,
                "edgeproxy_requests",
                "Requests answered, by route, upstream and status class.",
                ["route", "upstream", "code"],
                (0, 1, 3),
                counter=True,
            ),
            Projection(
                self._requests,
                "edgeproxy_request_duration_seconds",
                "Time from the complete request head to the last response byte, by route.",
                ["route"],
                (0,),
            ),
            Projection(
                self._requests,
                "edgeproxy_http_request_duration_seconds",
                "Time from the complete request head to the last response byte, by method and status class.",
                ["method", "code"],
                (2, 3),
            ),
        ):
            r.register(family)
        # Per backend: once per attempt, plain counts (see edgeproxy.collectors.Counts).
        self._backendRequests = Counts(
            "edgeproxy_backend_requests",
            "Requests sent to backends (each attempt, retries included), by upstream and backend.",
            ["upstream", "backend"],
        )
        r.register(self._backendRequests)
        # Once per response head from a backend: one observation under
        # (upstream, backend, status class), shown as three families.
        self._backends = Observed(buckets)
        for family in (
            Projection(
                self._backends,
                "edgeproxy_backend_responses",
                "Response heads received from backends, by upstream, backend and status class.",
                ["upstream", "backend", "code"],
                (0, 1, 2),
                counter=True,
            ),
            Projection(
                self._backends,
                "edgeproxy_backend_response_seconds",
                "Time from sending a request to a backend to its response head, by upstream, backend and status class.",
                ["upstream", "backend", "code"],
                (0, 1, 2),
            ),
            Projection(
                self._backends,
                "edgeproxy_upstream_response_seconds",
                "Time from sending a request to a backend to its response head, by upstream.",
                ["upstream"],
                (0,),
            ),
        ):
            r.register(family)
        self._backendTraffic: dict[tuple[str, str], Traffic] = {}
        r.register(BackendTrafficCollector(self._backendTraffic))
        self._traffic: dict[str, Traffic] = {}
        r.register(TrafficCollector(self._traffic))
        # Once per connection: plain counts (see edgeproxy.collectors.Counts).
        self._connections = Counts(
            "edgeproxy_connections", "Client connections accepted, by listener.", ["listener"]
        )
        r.register(self._connections)
        self._handshakes = Counts(
            "edgeproxy_tls_handshakes",
            "Completed client TLS handshakes, by listener, protocol version and ALPN.",
            ["listener", "version", "alpn"],
        )
        r.register(self._handshakes)
        self._handshakeFailures = Counts(
            "edgeproxy_tls_handshake_failures",
            "Client TLS handshakes that failed, by listener and reason "
            "(no_shared_cipher, protocol_version, unknown_sni, other).",
            ["listener", "reason"],
        )
        r.register(self._handshakeFailures)
        self._checks = Counter(
            "edgeproxy_health_checks",
            "Active health checks, by upstream, backend and result (ok or failed).",
            ["upstream", "backend", "result"], registry=r,
        )
        self._transitions = Counter(
            "edgeproxy_backend_transitions",
            "Backend state changes, by upstream, backend and the state entered.",
            ["upstream", "backend", "state"], registry=r,
        )
        self._ejections = Counter(
            "edgeproxy_ejections", "Passive-health ejections, by upstream and backend.",
            ["upstream", "backend"], registry=r,
        )
        self._retries = Counter(
            "edgeproxy_retries", "Requests retried on another backend, by upstream and reason.",
            ["upstream", "reason"], registry=r,
        )
        self._retriesRefused = Counter(
            "edgeproxy_retries_refused",
            "Retries not made because the retry budget was spent, by upstream.",
            ["upstream"], registry=r,
        )
        self._queueTimeouts = Counter(
            "edgeproxy_queue_timeouts",
            "Requests answered 503 after waiting for a backend under max_conns, by upstream.",
            ["upstream"], registry=r,
        )
        self._upstreamErrors = Counter(
            "edgeproxy_upstream_errors",
            "Failed backend attempts (retried ones included), by upstream and the status each maps to (502, 503, 504).",
            ["upstream", "code"], registry=r,
        )
        self._reloads = Counter(
            "edgeproxy_reloads", "Reloads (SIGHUP), by result (ok or failed).",
            ["result"], registry=r,
        )
        self._acmeOrders = Counter(
            "edgeproxy_acme_orders",
            "ACME orders started, by kind (new or renewal).",
            ["kind"], registry=r,
        )
        self._acmeObtained = Counter(
            "edgeproxy_acme_certificates",
            "Certificates obtained through ACME and swapped in, by kind (new or renewal).",
            ["kind"], registry=r,
        )
        self._acmeFailures = Counter(
            "edgeproxy_acme_failures",
            "Failed ACME orders, by the CA's problem type (rateLimited, unauthorized, connection... or other).",
            ["problem"], registry=r,
        )
        # Prometheus's own names for the same question (and the same
        # meaning: the start counts as a successful load).
        self._lastReloadOk = Gauge(
            "edgeproxy_config_last_reload_success",
            "Whether the last configuration (re)load succeeded (1) or was refused (0).",
            registry=r,
        )
        self._lastReloadOk.set(1)
        self._lastReloadTime = Gauge(
            "edgeproxy_config_last_reload_success_timestamp_seconds",
            "POSIX time of the last successful configuration load (the start, or a reload).",
            registry=r,
        )
        self._lastReloadTime.set(clock())
        ProcessCollector(registry=r)
        self._initContent(buckets)
        # The HTTP cache's counters (edgeproxy.cache adds to them).
        self.cache = CacheCounters()
        r.register(CacheCollector(self.cache))
        self._stateSource: Callable[[], Iterable[StateSample]] | None = None
        r.register(_StateCollector(self))
        self._security = SecurityCounters(r)

    # State read at scrape time ---------------------------------------------

    def setStateSource(self, source: Callable[[], Iterable[StateSample]] | None) -> None:
        """
        @param source: called at every scrape; yields the gauges of the live
            state (backend state and in-flight, active connections,
            certificate expiry...).  Set by whoever owns that state.
        """
        self._stateSource = source

    # Events ----------------------------------------------------------------

    def requestDone(
        self, route: str, upstream: str, code: int, seconds: float, method: bytes | str = b""
    ) -> None:
        """
        One finished request (every access-log event is one).

        @param route: the route's name; C{""} when no route matched.
        @param upstream: the upstream's name; C{""} when none was chosen.
        @param method: the request method (reduced by L{methodClass}).
        """
        self._requests.observe((route, upstream, methodClass(method), statusClass(code)), seconds)

    def backendRequest(self, upstream: str, backend: str) -> None:
        """One attempt sent to C{backend} (an address) of C{upstream}."""
        self._backendRequests.inc((upstream, backend))

    def backendResponded(self, upstream: str, backend: str, code: int, seconds: float) -> None:
        """
        C{backend}'s response head arrived C{seconds} after its request
        was sent (the upstream's histogram too).
        """
        self._backends.observe((upstream, backend, statusClass(code)), seconds)

    def backendTraffic(self, upstream: str, backend: str) -> Traffic:
        """
        The body byte counters of C{backend}, to add to directly:
        C{received} from the backend, C{sent} to it (one object per
        backend, kept for the process's life).
        """
        key = (upstream, backend)
        traffic = self._backendTraffic.get(key)
        if traffic is None:
            traffic = self._backendTraffic[key] = Traffic()
        return traffic

    def upstreamFailed(self, upstream: str, code: int) -> None:
        self._upstreamErrors.labels(upstream, str(code)).inc()

    def traffic(self, listener: str) -> Traffic:
        """
        The byte counters of C{listener}, to add to directly on the hot
        path (one object per listener name, kept for the process's life so
        the counters never go backwards across reloads).
        """
        traffic = self._traffic.get(listener)
        if traffic is None:
            traffic = self._traffic[listener] = Traffic()
        return traffic

    def bytesTransferred(self, listener: str, received: int, sent: int) -> None:
        traffic = self.traffic(listener)
        traffic.received += received
        traffic.sent += sent

    def connectionAccepted(self, listener: str) -> None:
        self._connections.inc((listener,))

    def handshakeDone(self, listener: str, version: str, alpn: str) -> None:
        self._handshakes.inc((listener, version, alpn))

    def handshakeFailed(self, listener: str, reason: str = "other") -> None:
        """
        @param reason: one of
            L{edgeproxy.tls.failures.HANDSHAKE_FAILURE_REASONS}.
        """
        self._handshakeFailures.inc((listener, reason))

    def healthChecked(self, upstream: str, backend: str, ok: bool) -> None:
        self._checks.labels(upstream, backend, "ok" if ok else "failed").inc()

    def backendTransition(self, upstream: str, backend: str, state: str) -> None:
        self._transitions.labels(upstream, backend, state).inc()

    def ejected(self, upstream: str, backend: str) -> None:
        self._ejections.labels(upstream, backend).inc()

    def retried(self, upstream: str, reason: str) -> None:
        self._retries.labels(upstream, reason).inc()

    def retryRefused(self, upstream: str) -> None:
        self._retriesRefused.labels(upstream).inc()

    def queueTimedOut(self, upstream: str) -> None:
        self._queueTimeouts.labels(upstream).inc()

    def acmeOrdered(self, renewal: bool) -> None:
        self._acmeOrders.labels("renewal" if renewal else "new").inc()

    def acmeObtained(self, renewal: bool) -> None:
        self._acmeObtained.labels("renewal" if renewal else "new").inc()

    def acmeFailed(self, problem: str) -> None:
        self._acmeFailures.labels(problem).inc()

    def reloaded(self, ok: bool) -> None:
        """A reload ended: in use (C{ok}) or refused."""
        self._reloads.labels("ok" if ok else "failed").inc()
        self._lastReloadOk.set(1 if ok else 0)
        if ok:
            self._lastReloadTime.set(self._clock())

    # Content optimisation (edgeproxy.content) ------------------------------

    def _initContent(self, buckets: Sequence[float]) -> None:
        # Once per response on the routes that use them: plain counts.
        r = self.registry
        self._compressed = Counts(
            "edgeproxy_compressed_responses",
            "Responses compressed, by encoding.",
            ["encoding"],
        )
        self._compressedIn = Counts(
            "edgeproxy_compression_read_bytes",
            "Bytes of the responses compressed, before compression, by encoding.",
            ["encoding"],
        )
        self._compressedOut = Counts(
            "edgeproxy_compression_written_bytes",
            "Bytes of the responses compressed, after compression, by encoding.",
            ["encoding"],
        )
        self._images = Counts(
            "edgeproxy_image_conversions",
            "Image responses that could be converted, by the format asked for and the "
            "result (converted, or why the original went out).",
            ["format", "result"],
        )
        self._imagesIn = Counts(
            "edgeproxy_image_read_bytes",
            "Bytes of the images converted, before conversion, by format.",
            ["format"],
        )
        self._imagesOut = Counts(
            "edgeproxy_image_written_bytes",
            "Bytes of the images converted, after conversion, by format.",
            ["format"],
        )
        self._imageSeconds = Durations(
            "edgeproxy_image_conversion_seconds",
            "Time from the image's last byte to its conversion's end (queue included), by format.",
            ["format"],
            buckets,
        )
        for collector in (
            self._compressed, self._compressedIn, self._compressedOut,
            self._images, self._imagesIn, self._imagesOut, self._imageSeconds,
        ):
            r.register(collector)

    def compressed(self, encoding: str, read: int, written: int) -> None:
        """One response body compressed whole: C{read} bytes in, C{written} out."""
        key = (encoding,)
        self._compressed.inc(key)
        self._compressedIn.counts[key] = self._compressedIn.counts.get(key, 0) + read
        self._compressedOut.counts[key] = self._compressedOut.counts.get(key, 0) + written

    def imageConverted(self, fmt: str, read: int, written: int, seconds: float) -> None:
        """One image converted to C{fmt} and sent converted."""
        key = (fmt,)
        self._images.inc((fmt, "converted"))
        self._imagesIn.counts[key] = self._imagesIn.counts.get(key, 0) + read
        self._imagesOut.counts[key] = self._imagesOut.counts.get(key, 0) + written
        self._imageSeconds.observe((fmt,), seconds)

    def imageKept(self, fmt: str, result: str) -> None:
        """
        An image sent as the original although C{fmt} was asked for:
        C{result} says why (C{larger}, C{failed}, C{too_large}, C{full},
        C{timeout}, C{unsupported}).
        """
        self._images.inc((fmt, result))

    # The security layer (edgeproxy.security) ---------------------------------

    def accessRefused(self, route: str, rule: str) -> None:
        """@param rule: the kind of rule (C{deny}, C{allow}, C{methods},
        C{client_certificate}), never the network (bounded labels)."""
        self._security.accessRefused.labels(route, rule).inc()

    def rateLimited(self, route: str, limit: str) -> None:
        self._security.rateLimited.labels(route, limit).inc()

    def rateLimitStoreFailed(self, route: str, outcome: str) -> None:
        self._security.storeErrors.labels(route, outcome).inc()

    def rateLimitStoreUp(self, up: bool) -> None:
        self._security.storeUp.labels("redis").set(1 if up else 0)

    def authRefused(self, route: str, auth: str) -> None:
        self._security.authRefused.labels(route, auth).inc()

    def authCacheLookup(self, auth: str, hit: bool) -> None:
        self._security.authCache.labels(auth, "hit" if hit else "miss").inc()

    def proxyProtocolRefused(self, listener: str, reason: str) -> None:
        self._security.proxyProtocolRefused.labels(listener, reason).inc()

    # Exposition ------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (L{CONTENT_TYPE})."""
        return generate_latest(self.registry)
