# -*- test-case-name: tests.test_pool -*-
"""
L{UpstreamPool}: one C{[upstream:NAME]} as something a request can be sent to.

It owns the L{edgeproxy.upstream.client.UpstreamClient} (keep-alive
connections per backend), the backends (one per address; host names
re-resolved through L{edgeproxy.upstream.resolve}), the choice of backend (delegated to the
upstream's L{edgeproxy.upstream.balance.Balancer}, with a predicate
combining health and C{max_conns}), the in-flight accounting, the queue of
requests waiting for a backend under C{max_conns} (a
L{edgeproxy.upstream.queue.RequestQueue}, drained whenever a place may have
come free), the retry budget, and the start and stop of its background
work (re-resolution, the health checker).  What happens to one request
(attempts, retries, timeouts, outcomes reported to passive health and the
metrics) is L{edgeproxy.upstream.exchange.Exchange}'s, which asks the pool
for what it needs through a few public methods (L{choose}, L{enqueue},
L{dequeue}, L{dispatch}, L{release}: the exchange's C{_Pool}); what a
failure means is L{edgeproxy.upstream.failures}'.  Backends are handed to
the client as they are: it keys its idle connections on them and dials a
new one through L{endpointFor} (the pool's
L{edgeproxy.upstream.dialing.Dialer}).

The details of a failure (addresses, exception text, which backends were
tried) are logged and nowhere else; the client only ever gets the status
of the last failure.

One way in: L{UpstreamPool.send} hands the outcome to an
L{edgeproxy.upstream.response.UpstreamReceiver} by a plain call.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Set
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from edgeproxy.bodies import BodyPipe
from edgeproxy.config.model import Server, Upstream
from edgeproxy.config.stagemodel import RouteForwarding
from edgeproxy.errors import ServiceUnavailable
from edgeproxy.h1 import Fields
from edgeproxy.logs import repeats
from edgeproxy.metrics import Metrics
from edgeproxy.upstream import health
from edgeproxy.upstream.backend import Backend, BackendState
from edgeproxy.upstream.balance import Balancer, makeBalancer
from edgeproxy.upstream.client import Handle, UpstreamClient
from edgeproxy.upstream.dialing import Addresses, CreatorSource, Dialer
from edgeproxy.upstream.exchange import FULL, Exchange, Full
from edgeproxy.upstream.failures import classifyFailure
from edgeproxy.upstream.queue import RequestQueue
from edgeproxy.upstream.resolve import PeriodicResolver, isIPLiteral
from edgeproxy.upstream.response import UpstreamReceiver
from edgeproxy.upstream.retry import IDEMPOTENT_METHODS, RetryBudget
from edgeproxy.upstream.sending import BodyProducer
from edgeproxy.upstream.terms import Terms

__all__ = [
    "REPLAY_LIMIT",
    "UpstreamPool",
    "UpstreamReceiver",
    "classifyFailure",
]

REPLAY_LIMIT = 64 * 1024
"""Bytes of an idempotent request's body kept so that it can be sent again
after it was sent (a retry after a reset); a longer body is streamed
without a copy, and is then not retried once any of it was sent."""


_NOTHING: frozenset[Backend] = frozenset()


class UpstreamPool:
    """
    The backends of one upstream, the keep-alive connections to them, the
    request timeouts, retries and queue.

    @ivar upstream: the configuration this pool was built from.
    @ivar backends: the backends requests are balanced over now (one per
        address; a host name becomes one per address it resolves to).
    @ivar balancer: the upstream's balancing policy over L{backends}.
    @ivar metrics: where outcomes are counted (a private L{Metrics} when
        none was given).
    @ivar observers: called with a backend after every change of its state
        (by L{edgeproxy.upstream.health.transition}).
    @ivar passive: passive health: every attempt's outcome is reported to
        it.
    @ivar seconds: the clock (the reactor's).
    @ivar callLater: the reactor's.
    @ivar budget: the upstream's retry budget.
    @ivar terms: the upstream's own timeouts and retries, for the routes
        that set none of their own (L{termsFor}).
    @ivar deadlines: the response deadlines of the requests sent on
        L{terms}.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        upstream: Upstream,
        tls: CreatorSource | None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        activeChecks: bool = True,
        resolver: Any = None,
    ) -> None:
        """
        @param rng: the randomness of the C{p2c} policy (tests seed it).
        @param metrics: the process's metrics.
        @param activeChecks: whether L{start} starts this process's own
            health checker (C{False} in a worker, whose verdicts come from
            the supervisor through L{applyVerdict}).
        @param resolver: the C{IHostnameResolver} host names are resolved
            with; by default the reactor's C{nameResolver} (C{getaddrinfo}
            in the reactor's thread pool, never blocking the reactor).
        """
        self._reactor = reactor
        self.seconds: Callable[[], float] = reactor.seconds
        self.callLater: Callable[..., Any] = reactor.callLater
        # Per-request notes (a backend failing each request...): the first
        # of an interval in full, then a count (edgeproxy.logs).
        self.repeats = repeats(reactor)
        self.upstream = upstream
        self.metrics = metrics if metrics is not None else Metrics()
        self.observers: list[Callable[[Backend], None]] = [self._backendChanged]
        self.passive = health.PassiveHealth(self, reactor)
        self._activeChecks = activeChecks
        self._checker: health.HealthChecker | None = None
        self._resolver = resolver
        self._periodic: PeriodicResolver | None = None
        self._addresses = Addresses(self, self._newBackend)
        # keepalive = 0: a non-persistent client sends Connection: close
        # (RFC 9112 §9.6) and keeps nothing idle.  Retrying is decided here
        # (is the body still replayable, is the budget spent): the client
        # never retries on its own.
        self._client = UpstreamClient(
            reactor,
            self,
            maxPersistentPerHost=upstream.keepalive,
            cachedConnectionTimeout=upstream.keepalive_timeout,
            # A PROXY header names one client: such a connection is never
            # reused for another request.
            persistent=upstream.keepalive > 0 and upstream.proxy_protocol is None,
        )
        self.budget = RetryBudget(reactor.seconds, upstream.retry_budget)
        self.terms = Terms(reactor, upstream)
        self.deadlines = self.terms.deadlines
        self._routeTerms: dict[tuple[float, float, int, float], Terms] = {}
        self._queue = RequestQueue(reactor, self)
        # The queue's requests: tested on every release, as a plain deque.
        self._queued = self._queue.waiting
        # Requests still in flight on backends no longer in the pool.
        self._orphaned = 0
        # Set by choose around its balancer.pick calls (single-threaded),
        # read by _pickable: outside them the predicate is health alone
        # (what pickServer, and /status's "available", ask).
        self._excluded: Set[Backend] = _NOTHING
        self._limits = False
        self._available = health.availability(self)
        self.backends: tuple[Backend, ...] = ()
        self._byBackend: set[Backend] = set()
        self._dialer = Dialer(reactor, upstream, tls)
        self.balancer: Balancer = makeBalancer(
            upstream.balance, (), rng, available=self._pickable
        )
        self.setBackends([self._newBackend(server, server.host) for server in upstream.servers])

    def _newBackend(self, server: Server, host: str) -> Backend:
        return Backend(server, host, server.port, clock=self._reactor.seconds)

    def setBackends(self, backends: list[Backend] | tuple[Backend, ...]) -> None:
        """
        Replace the backends requests are balanced over (a host name
        re-resolved).  Requests in flight on a removed backend finish there;
        its idle pooled connections are closed by the keep-alive timeout.
        """
        kept = set(backends)
        for removed in self.backends:
            if removed not in kept:
                self._orphaned += self.balancer.inFlight(removed)
        self.backends = tuple(backends)
        self._byBackend = kept
        self._dialer.keep(kept)
        self.balancer.setServers(self.backends)
        if self._checker is not None:
            self._checker.backendsChanged()
        if self._queued:
            self._queue.drain()

    # Lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """
        Start the background work: re-resolution of the host names in
        C{servers} (resolved at once, then every C{resolve_interval}) and,
        with C{health_path} and active checks, the health checker.
        """
        names = sorted({s.host for s in self.upstream.servers if not isIPLiteral(s.host)})
        if names and self._periodic is None:
            resolver = self._resolver
            if resolver is None:
                resolver = self._reactor.nameResolver
            self._periodic = PeriodicResolver(
                self._reactor,
                resolver,
                names,
                self.upstream.resolve_interval,
                self._addresses.namesResolved,
                self._addresses.resolutionFailed,
            )
            self._periodic.start()
        if (
            self.upstream.health_path is not None
            and self._activeChecks
            and self._checker is None
        ):
            self._checker = health.HealthChecker(self._reactor, self)
            self._checker.start()

    def stop(self) -> Deferred[None]:
        """
        Stop re-resolution, health checks and ejection timers (requests in
        flight and queued carry on).
        """
        waits: list[Deferred[Any]] = []
        if self._periodic is not None:
            self._periodic.stop()
            self._periodic = None
        if self._checker is not None:
            checker, self._checker = self._checker, None
            waits.append(checker.stop())
        self.passive.stop()
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def close(self) -> Deferred[None]:
        """
        Stop the background work and close the idle keep-alive connections
        (in-flight ones finish on their own).
        """
        self.stop()
        # Requests in flight keep their deadlines; with none, nothing of
        # this pool stays scheduled.
        self.deadlines.close()
        for terms in self._routeTerms.values():
            terms.deadlines.close()
        return self._client.closeCachedConnections()

    # Health ----------------------------------------------------------------

    def applyVerdict(self, address: str, state: str, reason: str) -> None:
        """
        Apply a verdict decided elsewhere (the supervisor's health checker,
        in workers mode) to the backend at C{address}.

        @param address: L{Backend.address}, C{host:port}.
        @param state: a L{BackendState} value (C{up}, C{down}...).
        """
        try:
            target = BackendState(state)
        except ValueError:
            self.log.warn(
                "upstream {upstream}: ignoring verdict with unknown state {state!r} for {backend}",
                upstream=self.upstream.name,
                state=state,
                backend=address,
            )
            return
        # Two names resolving to one address are two backends: both get it.
        matching = [backend for backend in self.backends if backend.address == address]
        for backend in matching:
            # The supervisor logged the change; N workers need not repeat it.
            health.transition(self, backend, target, reason, logged=False)
        if matching:
            return
        # Another process may resolve a name differently for a moment.
        self.log.debug(
            "upstream {upstream}: verdict for unknown backend {backend} ignored",
            upstream=self.upstream.name,
            backend=address,
        )

    def _backendChanged(self, backend: Backend) -> None:
        # A backend that comes back may take queued requests; one that went
        # away may leave queued requests with no backend at all.
        if self._queued:
            self._queue.drain()

    def inFlight(self, backend: Backend | None = None) -> int:
        """
        @param backend: one of L{backends}, or L{None} for the whole pool.
        @return: requests to C{backend} sent and whose response body is not
            delivered yet; for the whole pool, those of every backend (also
            removed ones) plus the queued requests.
        """
        if backend is None:
            balancer = self.balancer
            current = sum(balancer.inFlight(b) for b in self.backends)
            return current + self._orphaned + len(self._queued)
        try:
            return self.balancer.inFlight(backend)
        except KeyError:
            return 0

    @property
    def queued(self) -> int:
        """Requests waiting for a backend under C{max_conns}."""
        return len(self._queued)

    # Choice of backend ---------------------------------------------------

    def _pickable(self, backend: Backend) -> bool:
        """
        The balancer's predicate: available (L{health.availability}) and,
        while a request is being placed, not already tried by it and below
        C{max_conns}.
        """
        if backend in self._excluded or not self._available(backend):
            return False
        limit = backend.server.max_conns
        return not (limit and self._limits and self.balancer.inFlight(backend) >= limit)

    def pickServer(self, key: bytes | None = None) -> Backend:
        """
        Choose the backend for a new WebSocket tunnel with the upstream's
        balancing policy.  Tunnels do not count against C{max_conns} and
        never wait in the queue.

        @param key: the request's hash key (only C{balance = hash} uses it).
        @return: one of L{backends}.
        @raise ServiceUnavailable: when no backend is available (all are
            down, ejected, draining or disabled); the client gets 503 at
            once, not a connect timeout.
        """
        server = self.balancer.pick(key)
        if server is None:
            raise ServiceUnavailable(f"upstream {self.upstream.name}: no server available")
        return server

    def choose(
        self, key: bytes | None, tried: Set[Backend], untriedOnly: bool = False
    ) -> Backend | Full | None:
        """
        The backend for one attempt of a request.

        @param tried: backends the request was already tried on: avoided,
            unless no other can be picked.
        @param untriedOnly: never one of C{tried} (a timed-out request).
        @return: a backend; L{FULL} when every available backend is at its
            C{max_conns}; L{None} when none is available at all.
        """
        backends = self.backends
        if len(backends) == 1 and not tried:
            # Every policy picks the only backend when it may be picked:
            # the same answer without the balancer's work per request.
            only = backends[0]
            if not self._available(only):
                return None
            limit = only.server.max_conns
            if limit and self.balancer.inFlight(only) >= limit:
                return FULL
            return only
        self._excluded = tried
        self._limits = True
        try:
            backend = self.balancer.pick(key)
            if backend is None and tried:
                if any(b not in tried and self._available(b) for b in self.backends):
                    # Another backend is there, only busy: wait for it
                    # rather than send the retry where it just failed.
                    return FULL
                if untriedOnly:
                    return None
                self._excluded = _NOTHING
                backend = self.balancer.pick(key)
        finally:
            self._excluded = _NOTHING
            self._limits = False
        if backend is not None:
            return backend
        # The balancer tries primaries then backups: with nothing picked,
        # every available backend (if any) is at its limit.
        for candidate in self.backends:
            if self._available(candidate):
                return FULL
        return None

    def endpointFor(
        self,
        server: Backend,
        proxyHeader: bytes | None = None,
        connectTimeout: float | None = None,
    ) -> IStreamClientEndpoint:
        """
        The endpoint of backend C{server}, for the client's new connections,
        the health checks and WebSocket tunnels (L{Dialer.endpointFor}).
        """
        return self._dialer.endpointFor(server, proxyHeader, connectTimeout)

    # Requests ------------------------------------------------------------

    def termsFor(self, route: RouteForwarding | None) -> Terms:
        """
        The terms a route's requests are sent on (its forward stage asks
        once per runtime): L{terms} when it sets no timeouts or retries of
        its own, else one L{Terms} per distinct set of values (shared by
        the routes, and the reloads, that give the same).
        """
        if route is None:
            return self.terms
        terms = Terms(self._reactor, self.upstream, route)
        key = terms.key()
        if key == self.terms.key():
            return self.terms
        return self._routeTerms.setdefault(key, terms)

    def send(
        self,
        method: bytes,
        target: bytes,
        fields: Fields,
        body: BodyPipe | None,
        receiver: UpstreamReceiver,
        hashKey: bytes | None = None,
        proxyHeader: bytes | None = None,
        terms: Terms | None = None,
    ) -> Exchange:
        """
        Send a request to one of the backends, retrying on another when
        that is safe and within the budget.

        @param method: the request method.
        @param target: the origin-form target (path and query) to send.
        @param fields: the request's fields: exactly one C{host}, no framing
            fields (the body frames the request: C{Content-Length} from its
            declared length, chunked when unknown).  With C{expect:
            100-continue} the body waits for the backend (see
            L{edgeproxy.upstream.protocol}).
        @param body: the body, or L{None} for none; it can be replayed for
            a retry while it is replayable.  The response timeout starts
            once it was sent completely.
        @param receiver: gets the interim responses, then the response (head
            received) or a L{Failure} of a L{ProxyError} (the last
            attempt's; L{ServiceUnavailable} when no backend is available,
            the queue is full or the wait in it timed out); possibly before
            this returns.
        @param hashKey: the key for C{balance = hash}; see
            L{edgeproxy.upstream.balance.requestHashKey}.
        @param proxyHeader: the PROXY protocol header each attempt's
            connection starts with (C{[upstream] proxy_protocol}), or
            L{None}.
        @param terms: the route's timeouts and retries (L{termsFor});
            L{None}: the upstream's (L{terms}).
        @return: the request; its C{cancel()} abandons it (the upstream
            request is aborted or the queue left), after which C{receiver}
            hears nothing.  Each attempt counts as in flight for the
            balancer until its response body has been delivered completely
            or has failed (or until the attempt failed or was cancelled).
        """
        self.budget.requestStarted()
        if terms is None:
            terms = self.terms
        if body is not None and terms.retries and method in IDEMPOTENT_METHODS:
            body.keepForReplay(REPLAY_LIMIT)
        exchange = Exchange(self, method, target, fields, body, hashKey, receiver, terms)
        exchange.proxyHeader = proxyHeader
        exchange.place()
        return exchange

    # What an Exchange asks of its pool (edgeproxy.upstream.exchange._Pool) ------

    def dispatch(
        self,
        backend: Backend,
        method: bytes,
        target: bytes,
        fields: Fields,
        body: BodyProducer | None,
        receiver: UpstreamReceiver,
        proxyHeader: bytes | None = None,
        connectTimeout: float | None = None,
    ) -> Handle:
        """
        Count one more request in flight on C{backend} (until L{release})
        and send it there.

        @param connectTimeout: a route's own connect timeout for a new
            connection; L{None}: the upstream's.
        """
        self.balancer.acquired(backend)
        return self._client.send(
            backend, method, target, fields, body, receiver, proxyHeader, connectTimeout
        )

    def release(self, backend: Backend) -> None:
        """
        A request to C{backend} is no longer in flight; the freed place goes
        to the queue.
        """
        if backend in self._byBackend:
            self.balancer.released(backend)
        else:
            self._orphaned -= 1
        if self._queued:
            self._queue.drain()

    # The queue (max_conns) -------------------------------------------------

    def enqueue(self, exchange: Exchange) -> None:
        """
        Queue C{exchange} until a backend is below C{max_conns} (or fail it
        at once when the queue is full).
        """
        self._queue.enqueue(exchange)

    def dequeue(self, exchange: Exchange) -> None:
        """Take C{exchange} out of the queue (served, timed out or cancelled)."""
        self._queue.dequeue(exchange)
