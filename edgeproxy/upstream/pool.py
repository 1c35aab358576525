# -*- test-case-name: tests.test_pool -*-
"""
L{UpstreamPool}: one C{[upstream:NAME]} as something a request can be sent to.

It owns the L{edgeproxy.upstream.client.UpstreamClient} (keep-alive
connections per backend), the backends (one per address; host names
re-resolved through L{edgeproxy.upstream.resolve}), the choice of backend (delegated to the
upstream's L{edgeproxy.upstream.balance.Balancer}, with a predicate
combining health and C{max_conns}), the in-flight accounting, the queue of
requests waiting for a backend under C{max_conns}, the retry budget, and
the start and stop of its background work (re-resolution, the health
checker).  What happens to one request (attempts, retries, timeouts,
outcomes reported to passive health and the metrics) is
L{edgeproxy.upstream.exchange.Exchange}'s, which asks the pool for what it
needs through a few public methods (L{choose}, L{enqueue}, L{dequeue},
L{dispatch}, L{release}: the exchange's C{_Pool}); what a failure means is
L{edgeproxy.upstream.failures}'.  Backends are handed to the client as they
are: it keys its idle connections on them and dials a new one through
L{endpointFor}.

The details of a failure (addresses, exception text, which backends were
tried) are logged and nowhere else; the client only ever gets the status
of the last failure.

One way in: L{UpstreamPool.send} hands the outcome to an
L{edgeproxy.upstream.response.UpstreamReceiver} by a plain call.
"""

from __future__ import annotations

import ipaddress
import random
from collections import deque
from collections.abc import Callable, Set
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from edgeproxy.bodies import BodyPipe
from edgeproxy.config.model import RouteForwarding, Server, Upstream
from edgeproxy.errors import ServiceUnavailable
from edgeproxy.h1 import Fields
from edgeproxy.metrics import Metrics
from edgeproxy.upstream import health
from edgeproxy.upstream.backend import Backend, BackendState
from edgeproxy.upstream.balance import Balancer, makeBalancer
from edgeproxy.upstream.client import Handle, UpstreamClient
from edgeproxy.upstream.exchange import FULL, Exchange, Full
from edgeproxy.upstream.headerfirst import HeaderFirstEndpoint
from edgeproxy.upstream.failures import classifyFailure
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


class _CreatorSource(Protocol):
    """The part of C{edgeproxy.tls.client.UpstreamTLS} this module uses."""

    def creatorFor(self, server: Server) -> Any: ...


def _addressOrder(address: str) -> tuple[int, int, str]:
    parsed = ipaddress.ip_address(address)
    return parsed.version, int(parsed), address


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
        tls: _CreatorSource | None,
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
        self.upstream = upstream
        self._tls = tls
        self.metrics = metrics if metrics is not None else Metrics()
        self.observers: list[Callable[[Backend], None]] = [self._backendChanged]
        self.passive = health.PassiveHealth(self, reactor)
        self._activeChecks = activeChecks
        self._checker: health.HealthChecker | None = None
        self._resolver = resolver
        self._periodic: PeriodicResolver | None = None
        self._resolved: dict[str, tuple[str, ...]] = {}
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
        self._routeEndpoints: dict[tuple[Backend, float], IStreamClientEndpoint] = {}
        self._queue: deque[Exchange] = deque()
        self._draining = False
        self._drainAgain = False
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
        self._endpoints: dict[Backend, IStreamClientEndpoint] = {}
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
        self._endpoints = {b: e for b, e in self._endpoints.items() if b in kept}
        self._routeEndpoints = {k: e for k, e in self._routeEndpoints.items() if k[0] in kept}
        self.balancer.setServers(self.backends)
        if self._checker is not None:
            self._checker.backendsChanged()
        if self._queue:
            self._drainQueue()

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
                self._namesResolved,
                self._resolutionFailed,
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

    # DNS -------------------------------------------------------------------

    def _namesResolved(self, name: str, addresses: tuple[str, ...]) -> None:
        # Round-robin DNS rotates its answers: the order means nothing, and
        # a fixed one keeps the backends (and the log) still.
        addresses = tuple(sorted(addresses, key=_addressOrder))
        previous = self._resolved.get(name)
        if previous == addresses:
            return
        self._resolved[name] = addresses
        self.log.info(
            "upstream {upstream}: {name} resolves to {addresses}",
            upstream=self.upstream.name,
            name=name,
            addresses=", ".join(addresses),
            previous=previous,
        )
        self._rebuildBackends()

    def _resolutionFailed(self, name: str, why: str) -> None:
        kept = self._resolved.get(name)
        self.log.warn(
            "upstream {upstream}: resolving {name} failed ({why}); keeping {kept}",
            upstream=self.upstream.name,
            name=name,
            why=why,
            kept=", ".join(kept) if kept else "the name itself",
        )

    def _rebuildBackends(self) -> None:
        """
        One backend per address of every server (a name not resolved yet
        is dialled as it is); an address kept keeps its L{Backend}, with
        its state and counters.
        """
        current = {(b.server, b.host): b for b in self.backends}
        wanted: list[Backend] = []
        for server in self.upstream.servers:
            hosts = self._resolved.get(server.host, (server.host,))
            for host in hosts:
                backend = current.get((server, host))
                if backend is None:
                    backend = self._newBackend(server, host)
                wanted.append(backend)
        if wanted != list(self.backends):
            self.setBackends(wanted)

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
        if self._queue:
            self._drainQueue()

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
            return current + self._orphaned + len(self._queue)
        try:
            return self.balancer.inFlight(backend)
        except KeyError:
            return 0

    @property
    def queued(self) -> int:
        """Requests waiting for a backend under C{max_conns}."""
        return len(self._queue)

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
        the health checks and WebSocket tunnels.

        @param connectTimeout: a route's own connect timeout (L{Terms});
            L{None}: the upstream's.
        @return: a client endpoint dialling C{server} with the connect
            timeout, wrapped in TLS when the upstream uses it.
        """
        if proxyHeader is not None:
            # Per connection: the header is written first, under TLS.
            return self._newEndpoint(server, proxyHeader, connectTimeout)
        # Endpoints hold no per-connection state: one per backend (and
        # connect timeout), built once.
        if connectTimeout is not None:
            key = (server, connectTimeout)
            endpoint = self._routeEndpoints.get(key)
            if endpoint is None:
                endpoint = self._routeEndpoints[key] = self._newEndpoint(server, None, connectTimeout)
            return endpoint
        endpoint = self._endpoints.get(server)
        if endpoint is None:
            endpoint = self._endpoints[server] = self._newEndpoint(server)
        return endpoint

    def _newEndpoint(
        self, server: Backend, proxyHeader: bytes | None = None, connectTimeout: float | None = None
    ) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint
        timeout = self.upstream.connect_timeout if connectTimeout is None else connectTimeout
        if isIPLiteral(server.host):
            # An address (configured or resolved): HostnameEndpoint would
            # still hand it to getaddrinfo in a thread for every connection.
            endpointType = TCP6ClientEndpoint if ":" in server.host else TCP4ClientEndpoint
            endpoint = endpointType(self._reactor, server.host, server.port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, server.host, server.port, timeout=timeout)
        if proxyHeader is not None:
            endpoint = HeaderFirstEndpoint(endpoint, proxyHeader)
        if self._tls is not None:
            # Keyed on the configured Server: a resolved address is still
            # verified against (and sent as SNI) the configured name.
            endpoint = wrapClientTLS(self._tls.creatorFor(server.server), endpoint)
        return endpoint

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
        if self._queue:
            self._drainQueue()

    # The queue (max_conns) -------------------------------------------------

    def enqueue(self, exchange: Exchange) -> None:
        """
        Queue C{exchange} until a backend is below C{max_conns} (or fail it
        at once when the queue is full).
        """
        upstream = self.upstream
        if len(self._queue) >= upstream.queue_size:
            self.log.warn(
                "upstream {upstream}: every available backend is at max_conns and "
                "the queue is full ({size}): 503",
                upstream=upstream.name,
                size=upstream.queue_size,
            )
            exchange.failWaiting(ServiceUnavailable(f"upstream {upstream.name}: queue full"))
            return
        self._queue.append(exchange)
        exchange.queueTimer = self._reactor.callLater(
            upstream.queue_timeout, self._queueTimedOut, exchange
        )

    def dequeue(self, exchange: Exchange) -> None:
        """Take C{exchange} out of the queue (served, timed out or cancelled)."""
        try:
            self._queue.remove(exchange)
        except ValueError:
            pass
        timer, exchange.queueTimer = exchange.queueTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _queueTimedOut(self, exchange: Exchange) -> None:
        exchange.queueTimer = None
        self.dequeue(exchange)
        self.metrics.queueTimedOut(self.upstream.name)
        self.log.warn(
            "upstream {upstream}: no backend below max_conns within {timeout}s: 503",
            upstream=self.upstream.name,
            timeout=self.upstream.queue_timeout,
        )
        exchange.failWaiting(
            ServiceUnavailable(f"upstream {self.upstream.name}: queue timeout")
        )

    def _drainQueue(self) -> None:
        """
        Give backends with room to the queued requests, first come first
        served; the head of the queue waits for a place before any other.
        """
        if self._draining:
            # Called back from a request sent below (it failed at once):
            # the loop below looks again.
            self._drainAgain = True
            return
        self._draining = True
        try:
            while True:
                self._drainAgain = False
                while self._queue:
                    exchange = self._queue[0]
                    choice = self.choose(exchange.hashKey, exchange.tried, exchange.untriedOnly)
                    if choice is FULL:
                        break
                    self.dequeue(exchange)
                    exchange.placed(choice)  # type: ignore[arg-type]
                if not self._drainAgain:
                    break
        finally:
            self._draining = False
