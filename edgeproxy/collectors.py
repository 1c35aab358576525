# -*- test-case-name: tests.test_metrics -*-
"""
The collectors behind L{edgeproxy.metrics.Metrics}: what is counted on the
request path is kept in plain integers and lists (a C{prometheus_client}
counter or histogram costs a label lookup and a lock per event), and these
collectors turn it into metric families at scrape time.

  - L{Counts}, L{Durations}, and L{Observed} shown through its
    L{Projection}s: counters and histograms by labels, for events that
    happen once per request, attempt or connection;
  - L{CacheCounters} (what the HTTP cache adds to) and L{CacheCollector};
  - L{TrafficCollector} and L{BackendTrafficCollector}: the byte counters
    L{edgeproxy.metrics.Metrics} hands out (L{edgeproxy.metrics.Traffic});
  - L{SecurityCounters}: the security layer's refusals, rare enough for
    plain C{prometheus_client} counters.

The names and help texts of these families are here; the recording API and
the other names are L{edgeproxy.metrics}'.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "BackendTrafficCollector",
    "ByteCounts",
    "CacheCollector",
    "CacheCounters",
    "Counts",
    "Durations",
    "Observed",
    "Projection",
    "SecurityCounters",
    "TrafficCollector",
]


class Counts(Collector):
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


class Durations(Collector):
    """
    A histogram by labels, observed once per request or attempt: plain
    counts in a list per label values, turned into cumulative buckets at
    scrape time.  A C{prometheus_client} C{Histogram} costs a label lookup
    and a lock per observation, a few times what this does.
    """

    def __init__(
        self, name: str, documentation: str, labels: list[str], buckets: Sequence[float]
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = labels
        self._buckets = tuple(buckets)
        # As prometheus_client writes bounds: 0.001, 1.0, 60.0.
        self._bounds = [repr(float(b)) for b in self._buckets] + ["+Inf"]
        self.values: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, key: tuple[str, ...], seconds: float) -> None:
        entry = self.values.get(key)
        if entry is None:
            entry = self.values[key] = ([0] * (len(self._buckets) + 1), [0.0])
        # The first bucket whose upper bound is >= seconds: "le" is inclusive.
        entry[0][bisect_left(self._buckets, seconds)] += 1
        entry[1][0] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        for key, (counts, total) in sorted(self.values.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self._bounds, counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(key), buckets, total[0])
        yield family


class Observed:
    """
    Durations observed once per event under their full key (every label any
    family of them has), as plain bucket counts: the counters and the
    histograms by fewer labels are projections of it, made at scrape time
    (L{Projection}), so an event costs one observation however many
    families show it.
    """

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.values: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, key: tuple[str, ...], seconds: float) -> None:
        entry = self.values.get(key)
        if entry is None:
            entry = self.values[key] = ([0] * (len(self.buckets) + 1), [0.0])
        # The first bucket whose upper bound is >= seconds: "le" is inclusive.
        entry[0][bisect_left(self.buckets, seconds)] += 1
        entry[1][0] += seconds


class Projection(Collector):
    """
    One family of an L{Observed}'s events: a histogram or a counter by the
    labels at C{indices} of its keys.
    """

    def __init__(
        self,
        observed: Observed,
        name: str,
        documentation: str,
        labels: list[str],
        indices: tuple[int, ...],
        counter: bool = False,
    ) -> None:
        self._observed = observed
        self._name = name
        self._documentation = documentation
        self._labels = labels
        self._indices = indices
        self._counter = counter

    def collect(self) -> Iterator[Metric]:
        observed = self._observed
        folded: dict[tuple[str, ...], tuple[list[int], float]] = {}
        for key, (counts, total) in observed.values.items():
            short = tuple(key[i] for i in self._indices)
            entry = folded.get(short)
            if entry is None:
                folded[short] = (list(counts), total[0])
            else:
                folded[short] = ([a + b for a, b in zip(entry[0], counts)], entry[1] + total[0])
        if self._counter:
            counter = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
            for short, (counts, _) in sorted(folded.items()):
                counter.add_metric(list(short), sum(counts))
            yield counter
            return
        bounds = [repr(float(b)) for b in observed.buckets] + ["+Inf"]
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        for short, (counts, seconds) in sorted(folded.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(short), buckets, seconds)
        yield family


class CacheCounters:
    """
    What the HTTP cache counts (L{edgeproxy.cache}), in plain integers for
    the same reason as L{edgeproxy.metrics.Traffic}: hits are counted on the
    hit path.  One per process, kept across reloads (a store rebuilt by a
    reload does not send the counters back).

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


class CacheCollector(Collector):
    """Shows a L{CacheCounters}."""

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


class ByteCounts(Protocol):
    """Bytes counted both ways (L{edgeproxy.metrics.Traffic})."""

    received: int
    sent: int


class TrafficCollector(Collector):
    """Shows the byte counters of the listeners (L{edgeproxy.metrics.Metrics.traffic})."""

    def __init__(self, traffic: Mapping[str, ByteCounts]) -> None:
        self._traffic = traffic

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
        for listener, traffic in sorted(self._traffic.items()):
            received.add_metric([listener], traffic.received)
            sent.add_metric([listener], traffic.sent)
        yield received
        yield sent


class BackendTrafficCollector(Collector):
    """Shows the body byte counters of the backends (L{edgeproxy.metrics.Metrics.backendTraffic})."""

    def __init__(self, traffic: Mapping[tuple[str, str], ByteCounts]) -> None:
        self._traffic = traffic

    def collect(self) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "edgeproxy_backend_received_bytes",
            "Response body bytes received from backends, by upstream and backend.",
            labels=["upstream", "backend"],
        )
        sent = CounterMetricFamily(
            "edgeproxy_backend_sent_bytes",
            "Request body bytes sent to backends, by upstream and backend.",
            labels=["upstream", "backend"],
        )
        for (upstream, backend), traffic in sorted(self._traffic.items()):
            received.add_metric([upstream, backend], traffic.received)
            sent.add_metric([upstream, backend], traffic.sent)
        yield received
        yield sent


class SecurityCounters:
    """The counters of the security layer (L{edgeproxy.security}): refusals
    are rare next to requests, so plain C{prometheus_client} counters do."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.accessRefused = Counter(
            "edgeproxy_access_refused",
            "Requests refused with 403 by an access rule, by route and rule (deny, allow, methods, client_certificate).",
            ["route", "rule"], registry=r,
        )
        self.rateLimited = Counter(
            "edgeproxy_ratelimit_refused",
            "Requests refused with 429 by a rate limit, by route and limit.",
            ["route", "limit"], registry=r,
        )
        self.storeErrors = Counter(
            "edgeproxy_ratelimit_store_errors",
            "Requests whose shared (Redis) rate limits could not be checked, by route and what on_store_error made of them (open or closed).",
            ["route", "outcome"], registry=r,
        )
        self.storeUp = Gauge(
            "edgeproxy_ratelimit_store_up",
            "Whether the last command to the [redis] store of rate limits succeeded (1) or not (0), by store (redis).",
            ["store"], registry=r,
        )
        self.authRefused = Counter(
            "edgeproxy_auth_refused",
            "Requests refused by authentication (401, 403, or the forward-auth service's answer), by route and auth section.",
            ["route", "auth"], registry=r,
        )
        self.authCache = Counter(
            "edgeproxy_auth_cache",
            "Forward-auth verdicts looked up in the cache, by auth section and result (hit or miss).",
            ["auth", "result"], registry=r,
        )
        self.proxyProtocolRefused = Counter(
            "edgeproxy_proxy_protocol_refused",
            "Connections closed before HTTP for their PROXY protocol header, by listener and reason (source, invalid, timeout).",
            ["listener", "reason"], registry=r,
        )
