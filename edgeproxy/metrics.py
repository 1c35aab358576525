# -*- test-case-name: tests.test_metrics -*-
"""
The Prometheus metrics of one proxy process: every name starts with
C{edgeproxy_}, and C{docs/operations.rst} documents each one.

A L{Metrics} owns a private C{CollectorRegistry} (so tests and several
runtimes never share counters by accident).  Code that observes something
calls one of the recording methods below; it never touches
C{prometheus_client} itself, so the names and labels live in this one file.

What is a I{state} rather than an event (backend states, requests in flight,
open connections, certificate expiry) is not recorded here but read at
scrape time from the live objects through L{Metrics.setStateSource}, so it
can never drift from what C{/status} shows.

Label values are bounded: routes, upstreams, listeners and backends come
from the configuration (or DNS answers for it), status codes are reduced to
their class, TLS versions and ALPN protocols to the few that exist.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "CacheCounters", "Metrics", "StateSample", "Traffic", "statusClass"]

# The *_created series double every counter for a start time nobody graphs;
# restarts show as counter resets, which rate() already handles.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The exposition format C{GET /metrics} serves."""

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

StateSample = tuple[str, str, dict[str, str], float]
"""(metric name, help text, labels, value) of one gauge sample, as the state
source yields them; names are given without the C{edgeproxy_} prefix."""


def statusClass(code: int) -> str:
    """C{200} -> C{"2xx"}; anything outside 100-599 -> C{"other"}."""
    if 100 <= code <= 599:
        return f"{code // 100}xx"
    return "other"


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
    scrape reads them (L{_TrafficCollector}).
    """

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0


class CacheCounters:
    """
    What the HTTP cache counts (L{edgeproxy.cache}), in plain integers for
    the same reason as L{Traffic}: hits are counted on the hit path.  One
    per process, kept across reloads (a store rebuilt by a reload does not
    send the counters back).

    @ivar lookups: tier (C{memory}, C{disk}) -> lookups that reached it.
    @ivar found: tier -> lookups that found an object there.
    @ivar stored: tier -> bytes stored.
    @ivar evicted: tier -> bytes evicted to make room.
    @ivar purges: kind (C{url}, C{prefix}, C{tag}) -> purges asked for.
    """

    __slots__ = (
        "hits", "misses", "staleServed", "revalidations", "collapsed", "lookups", "found",
        "stored", "evicted", "purges", "purged",
    )

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.staleServed = 0
        self.revalidations: dict[str, int] = {"not_modified": 0, "replaced": 0, "failed": 0}
        self.collapsed = 0
        self.lookups = {"memory": 0, "disk": 0}
        self.found = {"memory": 0, "disk": 0}
        self.stored = {"memory": 0, "disk": 0}
        self.evicted = {"memory": 0, "disk": 0}
        self.purges: dict[str, int] = {"url": 0, "prefix": 0, "tag": 0}
        self.purged = 0


class _CacheCollector(Collector):
    def __init__(self, counters: CacheCounters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        c = self._counters
        yield CounterMetricFamily(
            "edgeproxy_cache_hits", "Responses served from the cache without asking the origin.", value=c.hits
        )
        yield CounterMetricFamily(
            "edgeproxy_cache_misses",
            "Cacheable requests forwarded because nothing usable was stored.",
            value=c.misses,
        )
        yield CounterMetricFamily(
            "edgeproxy_cache_stale_served",
            "Stale responses served (stale-while-revalidate, max-stale, stale-if-error).",
            value=c.staleServed,
        )
        revalidations = CounterMetricFamily(
            "edgeproxy_cache_revalidations",
            "Stored responses validated with the origin, by result (not_modified, replaced, failed).",
            labels=["result"],
        )
        for result, count in sorted(c.revalidations.items()):
            revalidations.add_metric([result], count)
        yield revalidations
        yield CounterMetricFamily(
            "edgeproxy_cache_collapsed",
            "Requests that waited for another request's fetch of the same key.",
            value=c.collapsed,
        )
        for name, documentation, values in (
            ("edgeproxy_cache_lookups", "Cache lookups that reached a tier, by tier.", c.lookups),
            ("edgeproxy_cache_lookup_hits", "Cache lookups that found an object, by tier.", c.found),
            ("edgeproxy_cache_stored_bytes", "Bytes stored, by tier.", c.stored),
            ("edgeproxy_cache_evicted_bytes", "Bytes evicted to make room, by tier.", c.evicted),
        ):
            family = CounterMetricFamily(name, documentation, labels=["tier"])
            for tier, count in sorted(values.items()):
                family.add_metric([tier], count)
            yield family
        purges = CounterMetricFamily(
            "edgeproxy_cache_purges", "Purges asked for, by kind (url, prefix, tag).", labels=["kind"]
        )
        for kind, count in sorted(c.purges.items()):
            purges.add_metric([kind], count)
        yield purges
        yield CounterMetricFamily(
            "edgeproxy_cache_purged_objects", "Stored responses removed or marked stale by purges.",
            value=c.purged,
        )


class _TrafficCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "edgeproxy_received_bytes",
            "Bytes received from clients (HTTP bytes, after TLS decryption), by listener.",
            labels=["listener"],
        )
        sent = CounterMetricFamily(
            "edgeproxy_sent_bytes",
            "Bytes sent to clients (HTTP bytes, before TLS encryption), by listener.",
            labels=["listener"],
        )
        for listener, traffic in sorted(self._metrics._traffic.items()):
            received.add_metric([listener], traffic.received)
            sent.add_metric([listener], traffic.sent)
        yield received
        yield sent


class _Durations(Collector):
    """
    A histogram by one label, observed once per request: plain counts in a
    list per label value, turned into cumulative buckets at scrape time.
    A C{prometheus_client} C{Histogram} costs a label lookup and a lock per
    observation, a few times what this does.
    """

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        # As prometheus_client writes bounds: 0.001, 1.0, 60.0.
        self._bounds = [repr(float(b)) for b in _LATENCY_BUCKETS] + ["+Inf"]
        self.values: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, value: str, seconds: float) -> None:
        entry = self.values.get(value)
        if entry is None:
            entry = self.values[value] = ([0] * (len(_LATENCY_BUCKETS) + 1), [0.0])
        # The first bucket whose upper bound is >= seconds: "le" is inclusive.
        entry[0][bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        entry[1][0] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, (counts, total) in sorted(self.values.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self._bounds, counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([value], buckets, total[0])
        yield family


class _Counts(Collector):
    """
    A counter by labels kept as plain integers in a dictionary, for events
    that happen once per request or per connection: a C{prometheus_client}
    C{Counter} costs a label validation, a lock and a child lookup per
    increment (about 2% of the CPU of R2, three per new connection).  The
    exposition is the same as the counter's (C{NAME_total}, no C{_created}).
    """

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = labels
        self.counts: dict[tuple[str, ...], int] = {}

    def inc(self, key: tuple[str, ...]) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for key, count in sorted(self.counts.items()):
            family.add_metric(list(key), count)
        yield family


class Metrics:
    """
    The counters and histograms of one process, and the scrape-time gauges.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requestCounts = _Counts(
            "edgeproxy_requests",
            "Requests answered, by route, upstream and status class.",
            ["route", "upstream", "code"],
        )
        r.register(self._requestCounts)
        self._requestSeconds = _Durations(
            "edgeproxy_request_duration_seconds",
            "Time from the complete request head to the last response byte, by route.",
            "route",
        )
        r.register(self._requestSeconds)
        self._upstreamSeconds = _Durations(
            "edgeproxy_upstream_response_seconds",
            "Time from sending a request to a backend to its response head, by upstream.",
            "upstream",
        )
        r.register(self._upstreamSeconds)
        self._traffic: dict[str, Traffic] = {}
        r.register(_TrafficCollector(self))
        # Once per connection: plain counts (see _Counts).
        self._connections = _Counts(
            "edgeproxy_connections", "Client connections accepted, by listener.", ["listener"]
        )
        r.register(self._connections)
        self._handshakes = _Counts(
            "edgeproxy_tls_handshakes",
            "Completed client TLS handshakes, by listener, protocol version and ALPN.",
            ["listener", "version", "alpn"],
        )
        r.register(self._handshakes)
        self._handshakeFailures = _Counts(
            "edgeproxy_tls_handshake_failures", "Client TLS handshakes that failed, by listener.",
            ["listener"],
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
        # The HTTP cache's counters (edgeproxy.cache adds to them).
        self.cache = CacheCounters()
        r.register(_CacheCollector(self.cache))
        self._stateSource: Callable[[], Iterable[StateSample]] | None = None
        r.register(_StateCollector(self))

    # State read at scrape time ---------------------------------------------

    def setStateSource(self, source: Callable[[], Iterable[StateSample]] | None) -> None:
        """
        @param source: called at every scrape; yields the gauges of the live
            state (backend state and in-flight, active connections,
            certificate expiry...).  Set by whoever owns that state.
        """
        self._stateSource = source

    # Events ----------------------------------------------------------------

    def requestDone(self, route: str, upstream: str, code: int, seconds: float) -> None:
        """
        One finished request (every access-log event is one).

        @param route: the route's name; C{""} when no route matched.
        @param upstream: the upstream's name; C{""} when none was chosen.
        """
        key = (route, upstream, statusClass(code))
        counts = self._requestCounts.counts
        counts[key] = counts.get(key, 0) + 1
        self._requestSeconds.observe(route, seconds)

    def upstreamResponded(self, upstream: str, seconds: float) -> None:
        self._upstreamSeconds.observe(upstream, seconds)

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

    def handshakeFailed(self, listener: str) -> None:
        self._handshakeFailures.inc((listener,))

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
        self._reloads.labels("ok" if ok else "failed").inc()

    # Exposition ------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (L{CONTENT_TYPE})."""
        return generate_latest(self.registry)


