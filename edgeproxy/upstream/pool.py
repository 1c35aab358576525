# -*- test-case-name: tests.test_pool -*-
"""
L{UpstreamPool}: one C{[upstream:NAME]} as something a request can be sent to.

It owns the Agent and its C{HTTPConnectionPool} (keep-alive connections per
backend server), the choice of server (delegated to the upstream's
L{edgeproxy.upstream.balance.Balancer}, in L{UpstreamPool.pickServer} only),
the in-flight accounting the balancer relies on, the connect and response timeouts, and the
translation of every client-library failure into one of the L{ProxyError}
classes.  The details of a failure (address, exception text) are logged here
and nowhere else; the exception handed back carries them for the log only.

It does not decide anything about the client side (status pages, headers,
retries): a failed request is reported, never retried, because only the
caller knows whether the request is idempotent and whether its body is still
replayable.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    HTTP11ClientProtocol,
    ParseError,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
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
from edgeproxy.upstream.backend import Backend
from edgeproxy.upstream.balance import Balancer, makeBalancer


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
    Resolve the Agent's URI (which only ever names one of our servers, see
    L{UpstreamPool._uriFor}) back to that server's endpoint.
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        server = self._pool._serverForKey(uri.host, uri.port)
        return self._pool.endpointFor(server)


class UpstreamPool:
    """
    The servers of one upstream, the keep-alive connections to them and the
    request timeouts.

    @ivar upstream: the configuration this pool was built from.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        upstream: Upstream,
        tls: _CreatorSource | None,
        rng: random.Random | None = None,
    ) -> None:
        """
        @param rng: the randomness of the C{p2c} policy (tests seed it).
        """
        self._reactor = reactor
        self.upstream = upstream
        self._tls = tls
        self._connectionPool = _ConnectionPool(reactor, persistent=True)
        self._connectionPool.maxPersistentPerHost = upstream.keepalive
        self._connectionPool.cachedConnectionTimeout = upstream.keepalive_timeout
        # Retrying is a decision about idempotency and body replay that only
        # the request layer can make; Twisted's automatic retry would resend
        # a request whose first attempt may have reached the backend.
        self._connectionPool.retryAutomatically = False
        self._agent = Agent.usingEndpointFactory(
            reactor, _ServerEndpoints(self), self._connectionPool
        )
        self.backends: tuple[Backend, ...] = ()
        self._byKey: dict[tuple[bytes, int], Backend] = {}
        self._endpoints: dict[Backend, IStreamClientEndpoint] = {}
        self.balancer: Balancer = makeBalancer(
            upstream.balance, (), rng, available=Backend.isAvailable
        )
        self.setBackends(
            [
                Backend(server, server.host, server.port, clock=reactor.seconds)
                for server in upstream.servers
            ]
        )

    def setBackends(self, backends: list[Backend] | tuple[Backend, ...]) -> None:
        """
        Replace the backends requests are balanced over (a host name
        re-resolved).  Requests in flight on a removed backend finish there;
        its idle pooled connections are closed by the keep-alive timeout.
        """
        self.backends = tuple(backends)
        self._byKey = {
            (backend.host.encode("idna"), backend.port): backend
            for backend in self.backends
        }
        self._endpoints = {
            backend: endpoint
            for backend, endpoint in self._endpoints.items()
            if backend in self._byKey.values()
        }
        self.balancer.setServers(self.backends)

    # Choice of backend ---------------------------------------------------

    def pickServer(self, key: bytes | None = None) -> Backend:
        """
        Choose the backend for the next request with the upstream's
        balancing policy.

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
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor,
            server.host,
            server.port,
            timeout=self.upstream.connect_timeout,
        )
        if self._tls is not None:
            endpoint = wrapClientTLS(self._tls.creatorFor(server.server), endpoint)
        return endpoint

    def _serverForKey(self, host: bytes | str, port: int) -> Backend:
        if isinstance(host, str):
            host = host.encode("idna")
        return self._byKey[(host.strip(b"[]"), port)]

    def _uriFor(self, server: Backend, path: bytes) -> bytes:
        scheme = b"https" if self._tls is not None else b"http"
        return scheme + b"://" + server.address.encode("idna") + path

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
        Send a request to one of the servers.

        @param method: the request method.
        @param path: the origin-form target (path and query) to send.
        @param headers: the complete request header set (including C{Host}).
        @param body: the body, or L{None} for none.  When it offers
            C{whenFinished()}, the response timeout starts when the body is
            complete; otherwise at once.
        @param hashKey: the key for C{balance = hash}; see
            L{edgeproxy.upstream.balance.requestHashKey}.
        @return: fires with the response (head received) or fails with a
            L{ProxyError}.  Cancelling it aborts the upstream request.  The
            request counts as in flight for the balancer until the
            response body has been delivered completely or has failed (or
            until the request failed or was cancelled).
        """
        try:
            server = self.pickServer(hashKey)
        except ServiceUnavailable as error:
            self.log.warn(
                "upstream {upstream}: no server available: {why}",
                upstream=self.upstream.name,
                why=str(error),
            )
            return fail(error)
        release = self._countRequest(server)
        agentRequest = self._agent.request(
            method, self._uriFor(server, path), headers, body
        )
        state: dict[str, Any] = {"timedOut": False, "timer": None, "over": False}

        def startResponseTimer(_: object = None) -> None:
            # Not agentRequest.called: the Agent's Deferred counts as called
            # as soon as it waits on the connection's own Deferred.
            if not state["over"] and state["timer"] is None:
                state["timer"] = self._reactor.callLater(
                    self.upstream.response_timeout, timeOut
                )

        def timeOut() -> None:
            state["timedOut"] = True
            agentRequest.cancel()

        def stopTimer(result: object) -> object:
            state["over"] = True
            timer = state["timer"]
            if timer is not None and timer.active():
                timer.cancel()
            return result

        def failed(failure: Failure) -> Failure:
            if failure.check(ProxyError):
                return failure
            if not state["timedOut"] and any(
                leaf.check(CancelledError) for leaf in _leafReasons(failure)
            ):
                # Cancelled by our caller (client gone, body cut): not a
                # backend problem worth more than a debug line.
                self.log.debug(
                    "upstream {upstream} request to {backend} cancelled",
                    upstream=self.upstream.name,
                    backend=server.address,
                )
                return Failure(CancelledError())
            mapped = classifyFailure(failure, bool(state["timedOut"]))
            self.log.warn(
                "upstream {upstream} backend {backend} failed: {status} {why}",
                upstream=self.upstream.name,
                backend=server.address,
                status=mapped.status,
                why=str(mapped),
            )
            return Failure(mapped)

        finisher = getattr(body, "whenFinished", None)
        if finisher is None:
            startResponseTimer()
        else:
            finisher().addCallbacks(startResponseTimer, lambda _: None)
        def responded(response: IResponse) -> IResponse:
            _releaseAfterBody(response, release)
            return response

        def released(failure: Failure) -> Failure:
            release()
            return failure

        agentRequest.addBoth(stopTimer)
        agentRequest.addCallbacks(responded, released)
        agentRequest.addErrback(failed)
        return agentRequest

    def _countRequest(self, server: Backend) -> Callable[[], None]:
        """
        Count a request to C{server} as in flight.

        @return: the function ending it; calling it again does nothing, so
            every path may call it without the count drifting.
        """
        self.balancer.acquired(server)
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.balancer.released(server)

        return release

    def close(self) -> Deferred[None]:
        """
        Close the idle keep-alive connections (in-flight ones finish on
        their own).
        """
        return self._connectionPool.closeCachedConnections()
