# -*- test-case-name: tests.test_pool -*-
"""
L{UpstreamPool}: one C{[upstream:NAME]} as something a request can be sent to.

It owns the Agent and its C{HTTPConnectionPool} (keep-alive connections per
backend), the choice of backend (delegated to the upstream's
L{edgeproxy.upstream.balance.Balancer}, with a predicate combining health
and C{max_conns}), the in-flight accounting, the queue of requests waiting
for a backend under C{max_conns}, the connect and response timeouts, the
retries (the safety rule and the budget are L{edgeproxy.upstream.retry}'s),
the re-resolution of host names (L{edgeproxy.upstream.resolve}), and the
translation of every client-library failure into one of the L{ProxyError}
classes.  Every attempt's outcome is reported to passive health
(L{edgeproxy.upstream.health.PassiveHealth}) and to the metrics.

The details of a failure (addresses, exception text, which backends were
tried) are logged here and nowhere else; the client only ever gets the
status of the last failure.
"""

from __future__ import annotations

import ipaddress
import random
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall, IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Protocol as _StreamProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    HTTP11ClientProtocol,
    ParseError,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from edgeproxy.config.model import Server, Upstream
from edgeproxy.errors import (
    BackendUnavailable,
    ProxyError,
    ServiceUnavailable,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from edgeproxy.http.bodies import BodyPipe
from edgeproxy.metrics import Metrics
from edgeproxy.upstream import health
from edgeproxy.upstream.backend import Backend, BackendState
from edgeproxy.upstream.balance import Balancer, makeBalancer
from edgeproxy.upstream.resolve import PeriodicResolver, isIPLiteral
from edgeproxy.upstream.retry import IDEMPOTENT_METHODS, Attempt, RetryBudget, decide

REPLAY_LIMIT = 64 * 1024
"""Bytes of an idempotent request's body kept so that it can be sent again
after it was sent (a retry after a reset); a longer body is streamed
without a copy, and is then not retried once any of it was sent."""


class _CreatorSource(Protocol):
    """The part of C{edgeproxy.tls.client.UpstreamTLS} this module uses."""

    def creatorFor(self, server: Server) -> Any: ...


def _leafReasons(failure: Failure) -> list[Failure]:
    """
    Unwrap the C{reasons} lists of Twisted's client wrapper exceptions
    (C{ResponseFailed}, C{RequestTransmissionFailed}...) down to the failures
    that actually happened.
    """
    reasons = getattr(failure.value, "reasons", None)
    if not reasons:
        return [failure]
    leaves: list[Failure] = []
    for reason in reasons:
        leaves.extend(_leafReasons(reason))
    return leaves


def classifyFailure(failure: Failure, timedOut: bool) -> ProxyError:
    """
    Map a failure of C{Agent.request} to the L{ProxyError} the client gets.

    @param failure: what the Agent's Deferred failed with.
    @param timedOut: whether the response timeout cancelled the request.
    @return: L{UpstreamTimeout} for connect and response timeouts,
        L{BackendUnavailable} when no usable connection could be made
        (refused, DNS, TLS verification), L{UpstreamProtocolError} when the
        backend answered something that is not HTTP or hung up mid-answer.
    """
    if timedOut:
        return UpstreamTimeout("no response head within the response timeout")
    leaves = _leafReasons(failure)
    described = "; ".join(f"{type(f.value).__name__}: {f.value}" for f in leaves)
    for leaf in leaves:
        if leaf.check(netError.TimeoutError, CancelledError):
            return UpstreamTimeout(f"connect timeout: {described}")
    for leaf in leaves:
        if leaf.check(SSL.Error):
            return BackendUnavailable(f"TLS failure: {described}")
        if leaf.check(netError.DNSLookupError, netError.ConnectError):
            return BackendUnavailable(f"connect failed: {described}")
    if failure.check(ResponseFailed):
        for leaf in leaves:
            if leaf.check(ParseError):
                return UpstreamProtocolError(f"unparseable response: {described}")
        # The connection was made but closed (or reset) before a complete
        # response head: the backend is there but not answering properly.
        return BackendUnavailable(f"no response: {described}")
    if failure.check(RequestTransmissionFailed, RequestGenerationFailed):
        return BackendUnavailable(f"request not sent: {described}")
    return UpstreamProtocolError(f"unexpected upstream failure: {described}")


def attemptOutcome(failure: Failure, timedOut: bool) -> tuple[Attempt, str]:
    """
    How far a failed attempt got, for the retry decision, and a short label
    of the failure for the C{reason} of C{edgeproxy_retries}.

    @param failure: what the Agent's Deferred failed with.
    @param timedOut: whether the response timeout cancelled the request.
    @return: (L{Attempt}, one of C{response_timeout}, C{response_started},
        C{local}, C{tls_failed}, C{connect_timeout}, C{connect_failed},
        C{not_sent}, C{no_response}).
    """
    if timedOut:
        return Attempt.NO_RESPONSE, "response_timeout"
    if failure.check(ResponseFailed) and not failure.check(ResponseNeverReceived):
        # Twisted fails with ResponseNeverReceived only when no byte of a
        # response arrived; any other ResponseFailed saw (part of) one.
        return Attempt.RESPONSE_STARTED, "response_started"
    if failure.check(RequestGenerationFailed):
        # Our own body producer failed (client gone, body over the limit).
        return Attempt.LOCAL, "local"
    leaves = _leafReasons(failure)
    for leaf in leaves:
        if leaf.check(SSL.Error):
            # The TLS handshake failed: the backend's application never
            # accepted a request on this connection.
            return Attempt.NOT_SENT, "tls_failed"
    for leaf in leaves:
        if leaf.check(netError.TimeoutError):
            return Attempt.NOT_SENT, "connect_timeout"
        if leaf.check(netError.ConnectError, netError.DNSLookupError):
            return Attempt.NOT_SENT, "connect_failed"
        if leaf.check(RequestNotSent):
            return Attempt.NOT_SENT, "not_sent"
    for leaf in leaves:
        if leaf.check(CancelledError):
            return Attempt.LOCAL, "local"
    if failure.check(ResponseNeverReceived, RequestTransmissionFailed):
        return Attempt.NO_RESPONSE, "no_response"
    return Attempt.RESPONSE_STARTED, "response_started"


def _failureDetail(failure: Failure, timedOut: bool, upstream: Upstream) -> str:
    """
    A failed attempt in the words of the health checks' details
    (C{connection refused}, C{TLS: ...}, C{connect timeout}...), for the
    passive-health log lines.
    """
    if timedOut:
        return f"no response head within {upstream.response_timeout:g}s"
    leaves = _leafReasons(failure)
    if any(leaf.check(ParseError) for leaf in leaves):
        return "not an HTTP response"
    return health.describeFailure(leaves[0], upstream.connect_timeout)


CONNECTION_HEADERS_ATTRIBUTE = "connectionHeaders"
"""Attribute set on every response of a pool: the backend's connection
control fields (C{Connection}, C{Keep-Alive}, C{Transfer-Encoding},
C{Content-Length}...), which Twisted's client keeps out of
C{response.headers}."""


class _ClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client protocol, also exposing the response's
    connection control fields.

    Twisted's parser files C{Connection}, C{Content-Length},
    C{Transfer-Encoding} and the like under its private C{connHeaders}, not
    in C{response.headers}.  A proxy needs them: the fields a backend's
    C{Connection} names are hop-by-hop and must not reach the client (RFC
    9110 §7.6.1), and ambiguous framing must be refused, not silently
    resolved.  This is the one place relying on that private surface
    (C{HTTP11ClientProtocol._parser}, C{HTTPParser.connHeaders},
    C{HTTPConnectionPool._factory}); C{tests/test_pool.py} fails if Twisted
    changes it.
    """

    def request(self, request: Any) -> Deferred[IResponse]:
        result = super().request(request)
        parser = getattr(self, "_parser", None)
        if parser is not None:

            def attach(response: IResponse) -> IResponse:
                setattr(response, CONNECTION_HEADERS_ATTRIBUTE, parser.connHeaders)
                return response

            result.addCallback(attach)
        return result


class _ClientFactory(_HTTP11ClientFactory):
    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _ClientProtocol(self._quiescentCallback)


class _ConnectionPool(HTTPConnectionPool):
    _factory = _ClientFactory


def fullResponseHeaders(response: IResponse) -> Headers:
    """
    The response's header fields as the backend sent them: C{headers} plus
    the connection control fields Twisted's client keeps apart.
    """
    merged = response.headers.copy()
    extra = getattr(response, CONNECTION_HEADERS_ATTRIBUTE, None)
    if extra is not None:
        for name, values in extra.getAllRawHeaders():
            for value in values:
                merged.addRawHeader(name, value)
    return merged


def _releaseAfterBody(response: IResponse, release: Callable[[], None]) -> None:
    """
    Call C{release} once the body of C{response} has been delivered
    completely or has failed.

    The request layer delivers every response it gets, to the client or to
    a discarding protocol, and C{IResponse.deliverBody} promises exactly one
    C{connectionLost} (at once for a response without a body), so wrapping
    the protocol covers every path.  The method is replaced on the instance
    (not by a proxy object) so the response keeps its identity and its
    other attributes, such as L{CONNECTION_HEADERS_ATTRIBUTE}.
    """
    original = response.deliverBody

    def deliverBody(protocol: IProtocol) -> None:
        lost = protocol.connectionLost

        def connectionLost(reason: Failure) -> None:
            release()
            lost(reason)

        protocol.connectionLost = connectionLost  # type: ignore[method-assign]
        original(protocol)

    response.deliverBody = deliverBody  # type: ignore[method-assign]


@implementer(IAgentEndpointFactory)
class _ServerEndpoints:
    """
    Resolve the Agent's URI (which only ever names one of our backends, see
    L{UpstreamPool._uriFor}) back to that backend's endpoint.
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        server = self._pool._serverForKey(uri.host, uri.port)
        return self._pool.endpointFor(server)


def _addressOrder(address: str) -> tuple[int, int, str]:
    parsed = ipaddress.ip_address(address)
    return parsed.version, int(parsed), address


class _Full:
    """L{UpstreamPool._choose}'s answer when every available backend is at
    its C{max_conns}: wait in the queue."""


_FULL = _Full()
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
        # keepalive = 0: Twisted's pool cannot hold zero connections (it
        # fails on every response); a non-persistent pool sends
        # Connection: close instead (RFC 9112 §9.6).
        self._connectionPool = _ConnectionPool(reactor, persistent=upstream.keepalive > 0)
        self._connectionPool.maxPersistentPerHost = upstream.keepalive
        self._connectionPool.cachedConnectionTimeout = upstream.keepalive_timeout
        # Retrying is decided here, with what Twisted cannot know (is the
        # body still replayable, is the budget spent); Twisted's automatic
        # retry would resend a request whose first attempt may have reached
        # the backend.
        self._connectionPool.retryAutomatically = False
        self._agent = Agent.usingEndpointFactory(
            reactor, _ServerEndpoints(self), self._connectionPool
        )
        self._budget = RetryBudget(reactor.seconds, upstream.retry_budget)
        self._queue: deque[_Exchange] = deque()
        self._draining = False
        self._drainAgain = False
        # Requests still in flight on backends no longer in the pool.
        self._orphaned = 0
        # Set by _choose around its balancer.pick calls (single-threaded),
        # read by _pickable: outside them the predicate is health alone
        # (what pickServer, and /status's "available", ask).
        self._excluded: frozenset[Backend] | set[Backend] = _NOTHING
        self._limits = False
        self._available = health.availability(self)
        self.backends: tuple[Backend, ...] = ()
        self._byBackend: set[Backend] = set()
        self._byKey: dict[tuple[bytes, int], Backend] = {}
        self._uris: dict[Backend, bytes] = {}
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
        self._uris = {b: u for b, u in self._uris.items() if b in kept}
        # Each backend's URI names it uniquely: the Agent keys its pooled
        # connections on it, and two host names may resolve to one address
        # (with different TLS names, so different connections).
        self._byKey = {}
        for backend, uri in self._uris.items():
            self._byKey[self._keyOf(uri)] = backend
        for backend in self.backends:
            if backend in self._uris:
                continue
            authority = backend.address.encode("idna")
            key = self._keyOf(authority)
            serial = 0
            while key in self._byKey:
                # Never sent (Host is always set): only a unique key.
                serial += 1
                label = backend.host.encode("idna").replace(b":", b"-")
                authority = b"dup%d.%s.invalid:%d" % (serial, label, backend.port)
                key = self._keyOf(authority)
            self._byKey[key] = backend
            self._uris[backend] = authority
        self.balancer.setServers(self.backends)
        if self._checker is not None:
            self._checker.backendsChanged()
        if self._queue:
            self._drainQueue()

    @staticmethod
    def _keyOf(authority: bytes) -> tuple[bytes, int]:
        host, _, port = authority.rpartition(b":")
        return host.strip(b"[]"), int(port)

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
        return self._connectionPool.closeCachedConnections()

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
            health.transition(self, backend, target, reason)
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

    def _choose(self, key: bytes | None, tried: set[Backend]) -> Backend | _Full | None:
        """
        The backend for one attempt of a request.

        @param tried: backends the request was already tried on: avoided,
            unless no other can be picked.
        @return: a backend; L{_FULL} when every available backend is at its
            C{max_conns}; L{None} when none is available at all.
        """
        self._excluded = tried
        self._limits = True
        try:
            backend = self.balancer.pick(key)
            if backend is None and tried:
                if any(b not in tried and self._available(b) for b in self.backends):
                    # Another backend is there, only busy: wait for it
                    # rather than send the retry where it just failed.
                    return _FULL
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
                return _FULL
        return None

    def endpointFor(self, server: Backend) -> IStreamClientEndpoint:
        """
        @return: a client endpoint dialling backend C{server} with the upstream's
            connect timeout, wrapped in TLS when the upstream uses it.
        """
        # The Agent asks for an endpoint on every request, even when a
        # pooled connection serves it; endpoints hold no per-connection
        # state, so one per server is built once.
        endpoint = self._endpoints.get(server)
        if endpoint is None:
            endpoint = self._endpoints[server] = self._newEndpoint(server)
        return endpoint

    def _newEndpoint(self, server: Backend) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint
        timeout = self.upstream.connect_timeout
        if isIPLiteral(server.host):
            # An address (configured or resolved): HostnameEndpoint would
            # still hand it to getaddrinfo in a thread for every connection.
            endpointType = TCP6ClientEndpoint if ":" in server.host else TCP4ClientEndpoint
            endpoint = endpointType(self._reactor, server.host, server.port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, server.host, server.port, timeout=timeout)
        if self._tls is not None:
            # Keyed on the configured Server: a resolved address is still
            # verified against (and sent as SNI) the configured name.
            endpoint = wrapClientTLS(self._tls.creatorFor(server.server), endpoint)
        return endpoint

    def _serverForKey(self, host: bytes | str, port: int) -> Backend:
        if isinstance(host, str):
            host = host.encode("idna")
        return self._byKey[(host.strip(b"[]"), port)]

    def _uriFor(self, server: Backend, path: bytes) -> bytes:
        scheme = b"https" if self._tls is not None else b"http"
        return scheme + b"://" + self._uris[server] + path

    # Requests ------------------------------------------------------------

    def request(
        self,
        method: bytes,
        path: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        hashKey: bytes | None = None,
    ) -> Deferred[IResponse]:
        """
        Send a request to one of the backends, retrying on another when
        that is safe and within the budget.

        @param method: the request method.
        @param path: the origin-form target (path and query) to send.
        @param headers: the complete request header set (including C{Host}).
        @param body: the body, or L{None} for none.  Only a L{BodyPipe} can
            be replayed for a retry (any other producer is sent once).
            When it offers C{whenFinished()}, the response timeout starts
            when the body is complete; otherwise at once.
        @param hashKey: the key for C{balance = hash}; see
            L{edgeproxy.upstream.balance.requestHashKey}.
        @return: fires with the response (head received) or fails with a
            L{ProxyError} (the last attempt's; L{ServiceUnavailable} when no
            backend is available, the queue is full or the wait in it timed
            out).  Cancelling it aborts the upstream request or leaves the
            queue.  Each attempt counts as in flight for the balancer until
            its response body has been delivered completely or has failed
            (or until the attempt failed or was cancelled).
        """
        self._budget.requestStarted()
        if (
            isinstance(body, BodyPipe)
            and self.upstream.retries
            and method in IDEMPOTENT_METHODS
        ):
            body.keepForReplay(REPLAY_LIMIT)
        exchange = _Exchange(self, method, path, headers, body, hashKey)
        exchange.place()
        return exchange.result

    def _countRequest(self, server: Backend) -> Callable[[], None]:
        """
        Count a request to C{server} as in flight.

        @return: the function ending it; calling it again does nothing, so
            every path may call it without the count drifting.  Ending it
            gives the freed place to the queue.
        """
        self.balancer.acquired(server)
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                if server in self._byBackend:
                    self.balancer.released(server)
                else:
                    self._orphaned -= 1
                if self._queue:
                    self._drainQueue()

        return release

    # The queue (max_conns) -------------------------------------------------

    def _enqueue(self, exchange: _Exchange) -> None:
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

    def _dequeue(self, exchange: _Exchange) -> None:
        """Take C{exchange} out of the queue (served, timed out or cancelled)."""
        try:
            self._queue.remove(exchange)
        except ValueError:
            pass
        timer, exchange.queueTimer = exchange.queueTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _queueTimedOut(self, exchange: _Exchange) -> None:
        exchange.queueTimer = None
        self._dequeue(exchange)
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
                    choice = self._choose(exchange.hashKey, exchange.tried)
                    if choice is _FULL:
                        break
                    self._dequeue(exchange)
                    exchange.placed(choice)  # type: ignore[arg-type]
                if not self._drainAgain:
                    break
        finally:
            self._draining = False


class _Exchange:
    """
    One request through the pool: its attempts, retries and time in the
    queue.

    @ivar result: what L{UpstreamPool.request} returned.
    @ivar tried: the backends an attempt was made on.
    """

    __slots__ = (
        "pool", "method", "path", "headers", "body", "hashKey", "result",
        "tried", "triedOrder", "retriesDone", "attempt", "queueTimer", "over",
        "lastError",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        method: bytes,
        path: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        hashKey: bytes | None,
    ) -> None:
        self.pool = pool
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.hashKey = hashKey
        self.result: Deferred[IResponse] = Deferred(self._cancel)
        self.tried: set[Backend] = set()
        self.triedOrder: list[Backend] = []
        self.retriesDone = 0
        self.attempt: Deferred[IResponse] | None = None
        self.queueTimer: IDelayedCall | None = None
        self.over = False
        self.lastError: ProxyError | None = None

    # Placing an attempt -----------------------------------------------------

    def place(self) -> None:
        """Pick a backend now, or queue, or fail with 503."""
        pool = self.pool
        choice = pool._choose(self.hashKey, self.tried)
        if choice is _FULL:
            pool._enqueue(self)
        else:
            self.placed(choice)  # type: ignore[arg-type]

    def placed(self, backend: Backend | None) -> None:
        if self.over:
            return
        if backend is None:
            pool = self.pool
            if self.lastError is not None:
                # A queued retry whose backends all went away: the client
                # gets the failure it would have had without the retry.
                self.fail(self.lastError, code=None)
                return
            pool.log.warn(
                "upstream {upstream}: no server available",
                upstream=pool.upstream.name,
            )
            self.fail(
                ServiceUnavailable(f"upstream {pool.upstream.name}: no server available"),
                code=503,
            )
            return
        self.send(backend)

    def send(self, backend: Backend) -> None:
        pool = self.pool
        reactor = pool._reactor
        upstream = pool.upstream
        body = self.body
        producer: IBodyProducer | None = body
        if isinstance(body, BodyPipe):
            if not body.replayable:
                # Failed or abandoned while this request waited in the
                # queue: the request layer has answered already.
                self.fail(CancelledError("request body gone"), code=None)
                return
            producer = body.newAttempt()
        self.tried.add(backend)
        self.triedOrder.append(backend)
        release = pool._countRequest(backend)
        started = reactor.seconds()
        agentRequest = pool._agent.request(
            self.method, pool._uriFor(backend, self.path), self.headers, producer
        )
        self.attempt = agentRequest
        timer: IDelayedCall | None = None
        timedOut = False
        answered = False

        def startResponseTimer(_: object = None) -> None:
            # Not agentRequest.called: the Agent's Deferred counts as called
            # as soon as it waits on the connection's own Deferred.
            nonlocal timer
            if not answered and timer is None:
                timer = reactor.callLater(upstream.response_timeout, timeOut)

        def timeOut() -> None:
            nonlocal timedOut
            timedOut = True
            agentRequest.cancel()

        def responded(response: IResponse) -> None:
            nonlocal answered
            answered = True
            if timer is not None and timer.active():
                timer.cancel()
            self.attempt = None
            _releaseAfterBody(response, release)
            pool.metrics.upstreamResponded(upstream.name, reactor.seconds() - started)
            pool.passive.responded(backend, response.code)
            if self.over:
                # Cancelled meanwhile (cannot happen with Twisted's Agent,
                # whose cancel errbacks): nobody reads it.
                response.deliverBody(_Discarding())
                return
            if self.retriesDone:
                pool.log.info(
                    "upstream {upstream}: {method} answered by {backend} after "
                    "{retries} retries (tried {tried})",
                    upstream=upstream.name,
                    method=self.method.decode("ascii", "replace"),
                    backend=backend.address,
                    retries=self.retriesDone,
                    tried=self._triedText(),
                )
            self.over = True
            self.result.callback(response)

        def failed(failure: Failure) -> None:
            nonlocal answered
            answered = True
            if timer is not None and timer.active():
                timer.cancel()
            self.attempt = None
            release()
            if self.over:
                return  # cancelled by the caller: nothing to report
            self.attemptFailed(backend, failure, timedOut)

        finisher = getattr(producer, "whenFinished", None)
        if finisher is None:
            startResponseTimer()
        else:
            finisher().addCallbacks(startResponseTimer, lambda _: None)
        agentRequest.addCallbacks(responded, failed)

    # Outcomes -------------------------------------------------------------------

    def attemptFailed(self, backend: Backend, failure: Failure, timedOut: bool) -> None:
        pool = self.pool
        upstream = pool.upstream
        kind, label = attemptOutcome(failure, timedOut)
        if kind is Attempt.LOCAL:
            # The client went away or its body failed: not the backend's
            # doing, and nobody waits for a retry.
            pool.log.debug(
                "upstream {upstream} request to {backend} abandoned: {why}",
                upstream=upstream.name,
                backend=backend.address,
                why=failure.getErrorMessage(),
            )
            if any(leaf.check(CancelledError) for leaf in _leafReasons(failure)):
                self.fail(CancelledError(), code=None)
            else:
                self.fail(classifyFailure(failure, False), code=None)
            return
        error = classifyFailure(failure, timedOut)
        pool.log.warn(
            "upstream {upstream} backend {backend} failed: {status} {why}",
            upstream=upstream.name,
            backend=backend.address,
            status=error.status,
            why=str(error),
        )
        pool.metrics.upstreamFailed(upstream.name, error.status)
        pool.passive.failure(backend, _failureDetail(failure, timedOut, upstream))
        body = self.body
        replayable = body is None or (isinstance(body, BodyPipe) and body.replayable)
        decision = decide(self.method, kind, replayable, self.retriesDone, upstream.retries)
        if not decision.retry:
            if upstream.retries:
                pool.log.info(
                    "upstream {upstream}: {method} not retried: {why} (tried {tried})",
                    upstream=upstream.name,
                    method=self.method.decode("ascii", "replace"),
                    why=decision.why,
                    tried=self._triedText(),
                )
            self.fail(error, code=None)
            return
        if not pool._budget.tryRetry():
            pool.metrics.retryRefused(upstream.name)
            pool.log.warn(
                "upstream {upstream}: {method} not retried: retry budget spent "
                "(tried {tried})",
                upstream=upstream.name,
                method=self.method.decode("ascii", "replace"),
                tried=self._triedText(),
            )
            self.fail(error, code=None)
            return
        # The next attempt must have a backend: when none is available now
        # (the failing one was just ejected, say), the client gets this
        # failure, not a 503 for a retry it never asked for.
        choice = pool._choose(self.hashKey, self.tried)
        if choice is None:
            pool.log.info(
                "upstream {upstream}: {method} not retried: no other backend available "
                "(tried {tried})",
                upstream=upstream.name,
                method=self.method.decode("ascii", "replace"),
                tried=self._triedText(),
            )
            self.fail(error, code=None)
            return
        self.retriesDone += 1
        self.lastError = error
        pool.metrics.retried(upstream.name, label)
        pool.log.info(
            "upstream {upstream}: retrying {method} after {backend} failed ({reason}); "
            "retry {count} of {allowed}",
            upstream=upstream.name,
            method=self.method.decode("ascii", "replace"),
            backend=backend.address,
            reason=label,
            count=self.retriesDone,
            allowed=upstream.retries,
        )
        if choice is _FULL:
            pool._enqueue(self)
        else:
            self.send(choice)  # type: ignore[arg-type]

    def failWaiting(self, error: ServiceUnavailable) -> None:
        """
        No place for this request under C{max_conns}: 503, or for a retry
        the failure it would have had without the retry.
        """
        if self.lastError is not None:
            self.fail(self.lastError, code=None)
        else:
            self.fail(error, code=503)

    def fail(self, error: Exception, code: int | None) -> None:
        """
        End the request with C{error}.

        @param code: the status to count in C{edgeproxy_upstream_errors} for
            a failure that no attempt counted (503s of the pool itself).
        """
        if self.over:
            return
        self.over = True
        if code is not None:
            self.pool.metrics.upstreamFailed(self.pool.upstream.name, code)
        body = self.body
        if isinstance(body, BodyPipe) and not isinstance(error, CancelledError):
            # No further attempt: let the rest of the body drain.
            body.stopProducing()
        self.result.errback(Failure(error))

    def _cancel(self, result: Deferred[IResponse]) -> None:
        # The caller gave up (the client went away): leave the queue or
        # abort the attempt in progress; no retry follows.
        if self.over:
            return
        self.over = True
        self.pool._dequeue(self)
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.cancel()
        self.pool.log.debug(
            "upstream {upstream} request cancelled by the client",
            upstream=self.pool.upstream.name,
        )

    def _triedText(self) -> str:
        return ", ".join(backend.address for backend in self.triedOrder)


class _Discarding(_StreamProtocol):
    """Closes the connection of a response nobody reads."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass
