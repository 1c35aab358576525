# -*- test-case-name: tests.test_client -*-
"""
L{UpstreamClient}: requests to backends over kept-alive HTTP/1.1
connections, made for the one thing the proxy does with them: send a
request whose fields are already built and hand the response on.

The client owns the connections: it dials a backend through the endpoint
its L{EndpointSource} gives for it, keeps C{maxPersistentPerHost} idle
connections per backend for at most C{cachedConnectionTimeout} seconds,
and closes them on request.  A burst of more requests in flight than that
frees more connections than are kept: the surplus stays idle for
L{SURPLUS_LINGER} seconds more, so that the rest of the burst (an HTTP/2
client keeps a hundred streams in flight) takes them instead of dialling
new ones, and is then closed, the least recently used first.  What happens on one connection is
L{edgeproxy.upstream.protocol}'s; what a request's outcome means, and
whether to try again, is the pool's (the client never retries).

Connections are keyed on the L{Backend} object itself: two names that
resolve to one address are two backends, with their own connections (and
TLS names).

The outcome of L{UpstreamClient.send} goes to an
L{edgeproxy.upstream.response.UpstreamReceiver} by a plain call (no
Deferred per request), and each pooled connection has one idle timer,
re-armed lazily, instead of one C{callLater} per request.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IProtocol, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from edgeproxy.h1 import Fields
from edgeproxy.upstream.backend import Backend
from edgeproxy.upstream.protocol import RequestNotSent, UpstreamConnection
from edgeproxy.upstream.response import UpstreamReceiver
from edgeproxy.upstream.sending import BodyProducer

__all__ = ["SURPLUS_LINGER", "EndpointSource", "Handle", "UpstreamClient"]

SURPLUS_LINGER = 1.0
"""
Seconds an idle connection over C{maxPersistentPerHost} is kept.  Closing
it at once makes every request over the limit dial a connection and close
it (and leave a C{TIME_WAIT} behind) while the load lasts.
"""


class EndpointSource(Protocol):
    """Where the client learns how to dial a backend (the pool)."""

    def endpointFor(
        self,
        backend: Backend,
        proxyHeader: bytes | None = None,
        connectTimeout: float | None = None,
    ) -> IStreamClientEndpoint: ...


class Handle(Protocol):
    """What cancels a request sent with L{UpstreamClient.send}."""

    def abandon(self, receiver: UpstreamReceiver) -> None:
        """
        Give up on the request whose outcome goes to C{receiver}: its
        connection (or connection attempt) is aborted and C{receiver} fails
        with a C{CancelledError} inside; nothing happens once its outcome
        is known.
        """


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, client: UpstreamClient, backend: Backend) -> None:
        self._client = client
        self._backend = backend

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._client, self._backend, self._client.reactor)


class _Connecting:
    """
    A request waiting for a new connection to its backend; the connection
    once it is there.
    """

    __slots__ = (
        "_client", "_method", "_target", "_fields", "_body", "_receiver",
        "_connecting", "_connection",
    )

    def __init__(
        self,
        client: UpstreamClient,
        method: bytes,
        target: bytes,
        fields: Fields,
        body: BodyProducer | None,
        receiver: UpstreamReceiver,
    ) -> None:
        self._client = client
        self._method = method
        self._target = target
        self._fields = fields
        self._body = body
        self._receiver: UpstreamReceiver | None = receiver
        self._connecting: Deferred[IProtocol] | None = None
        self._connection: UpstreamConnection | None = None

    def start(self, endpoint: IStreamClientEndpoint, backend: Backend) -> None:
        try:
            connecting = endpoint.connect(_ConnectionFactory(self._client, backend))
        except Exception:
            self._failed(Failure())
            return
        self._connecting = connecting
        connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, connection: UpstreamConnection) -> None:
        self._connecting = None
        receiver, self._receiver = self._receiver, None
        client = self._client
        client.connections.add(connection)
        if receiver is None:
            return
        if connection.lost:
            receiver.upstreamFailed(Failure(RequestNotSent()))
            return
        self._connection = connection
        connection.send(
            self._method, self._target, self._fields, self._body, client.persistent, receiver
        )

    def _failed(self, reason: Failure) -> None:
        self._connecting = None
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.upstreamFailed(reason)

    def abandon(self, receiver: UpstreamReceiver) -> None:
        if self._connection is not None:
            self._connection.abandon(receiver)
        elif self._connecting is not None and receiver is self._receiver:
            # Fails the request through _failed, with the endpoint's
            # CancelledError.
            self._connecting.cancel()


class UpstreamClient:
    """
    Requests to backends over pooled keep-alive HTTP/1.1 connections.

    @ivar reactor: the clock of the connections' timers.
    @ivar maxPersistentPerHost: idle connections kept per backend.
    @ivar cachedConnectionTimeout: seconds an idle connection is kept.
    @ivar persistent: whether connections are kept at all (when not, every
        request says C{Connection: close}, RFC 9112 9.6).
    @ivar connections: every open connection.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoints: EndpointSource,
        maxPersistentPerHost: int = 2,
        cachedConnectionTimeout: float = 240,
        persistent: bool = True,
    ) -> None:
        self.reactor = reactor
        self._endpoints = endpoints
        self.maxPersistentPerHost = maxPersistentPerHost
        self.cachedConnectionTimeout = cachedConnectionTimeout
        self.persistent = persistent
        self._idle: dict[Backend, list[UpstreamConnection]] = {}
        self.connections: set[UpstreamConnection] = set()
        self._trimCall: Any = None

    def send(
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
        Send a request to C{backend} on an idle connection, or a new one;
        its outcome goes to C{receiver}, possibly before this returns.
        With C{proxyHeader}, always on a new connection that starts with it
        (a PROXY protocol header names one client).  A new connection is
        dialled with C{connectTimeout} when given (a route's own), else
        the endpoint's own.

        @param target: the request-target (origin form).
        @param fields: the request's fields: exactly one C{host}, no framing
            fields (C{body} frames it).
        @param body: the body, or L{None} for none.
        @return: what to call C{abandon(receiver)} on to cancel the request.
        """
        if proxyHeader is not None:
            connecting = _Connecting(self, method, target, fields, body, receiver)
            if connectTimeout is None:
                endpoint = self._endpoints.endpointFor(backend, proxyHeader)
            else:
                endpoint = self._endpoints.endpointFor(backend, proxyHeader, connectTimeout)
            connecting.start(endpoint, backend)
            return connecting
        idle = self._idle.get(backend)
        while idle:
            connection = idle.pop()
            if connection.idle:
                connection.send(method, target, fields, body, self.persistent, receiver)
                return connection
        connecting = _Connecting(self, method, target, fields, body, receiver)
        if connectTimeout is None:
            endpoint = self._endpoints.endpointFor(backend)
        else:
            endpoint = self._endpoints.endpointFor(backend, None, connectTimeout)
        connecting.start(endpoint, backend)
        return connecting

    # From the connections (ConnectionOwner) -------------------------------------

    def connectionIdle(self, connection: UpstreamConnection) -> None:
        idle = self._idle.get(connection.backend)
        if idle is None:
            idle = self._idle[connection.backend] = []
        if len(idle) >= self.maxPersistentPerHost:
            if not self.maxPersistentPerHost:
                connection.close()
                return
            # The surplus of a burst: the newest idle connection is the
            # next one used, the oldest ones are closed by _trim.
            if self._trimCall is None:
                self._trimCall = self.reactor.callLater(SURPLUS_LINGER, self._trim)
        idle.append(connection)
        connection.idleSince = self.reactor.seconds()
        timeout = self.cachedConnectionTimeout
        if timeout is not None and connection.idleTimer is None:
            # One timer per connection, re-armed only when it fires: a
            # connection reused every few milliseconds costs no timer work
            # per request.
            connection.idleTimer = self.reactor.callLater(timeout, self._idleCheck, connection)

    def connectionGone(self, connection: UpstreamConnection) -> None:
        self.connections.discard(connection)
        idle = self._idle.get(connection.backend)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                # A backend gone for good (re-resolved away) leaves no key.
                del self._idle[connection.backend]
        timer, connection.idleTimer = connection.idleTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        waiters, connection.closeWaiters = connection.closeWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _idleCheck(self, connection: UpstreamConnection) -> None:
        connection.idleTimer = None
        if connection.lost:
            return
        idle = self._idle.get(connection.backend, ())
        if not connection.idle or connection not in idle:
            # In use: the next release re-arms it.
            return
        left = connection.idleSince + self.cachedConnectionTimeout - self.reactor.seconds()
        if left > 0:
            connection.idleTimer = self.reactor.callLater(left, self._idleCheck, connection)
            return
        idle.remove(connection)  # type: ignore[union-attr]
        connection.close()

    def _trim(self) -> None:
        """
        Close the idle connections over C{maxPersistentPerHost} of each
        backend that have been idle for L{SURPLUS_LINGER}, the oldest first
        (the bottom of each idle list: connections are taken from its top).
        """
        self._trimCall = None
        now = self.reactor.seconds()
        keep = self.maxPersistentPerHost
        due: float | None = None
        for idle in list(self._idle.values()):
            surplus = len(idle) - keep
            closing = 0
            while closing < surplus and idle[closing].idleSince + SURPLUS_LINGER <= now:
                closing += 1
            if closing < surplus:
                ends = idle[closing].idleSince + SURPLUS_LINGER
                due = ends if due is None else min(due, ends)
            if closing:
                old = idle[:closing]
                del idle[:closing]
                for connection in old:
                    connection.close()
        if due is not None:
            self._trimCall = self.reactor.callLater(max(0.0, due - now), self._trim)

    def closeCachedConnections(self) -> Deferred[None]:
        """
        Close every idle connection; requests in flight finish on theirs.

        @return: fires once the idle connections are closed.
        """
        trimCall, self._trimCall = self._trimCall, None
        if trimCall is not None and trimCall.active():
            trimCall.cancel()
        waiting = []
        for idle in self._idle.values():
            for connection in idle:
                if connection.lost:
                    continue
                done: Deferred[None] = Deferred()
                connection.closeWaiters.append(done)
                waiting.append(done)
                connection.close()
            idle.clear()
        return DeferredList(waiting).addCallback(lambda _: None)
