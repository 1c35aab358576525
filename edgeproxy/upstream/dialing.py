# -*- test-case-name: tests.test_pool -*-
"""
Where one L{edgeproxy.upstream.pool.UpstreamPool}'s connections go: which
backends its servers are (L{Addresses}), and how each is dialled
(L{Dialer}).

A backend is one dialable address: a server given by address is one
backend; one given by name is dialled through the name until the name is
resolved, then is one backend per address it resolves to (re-resolved
every C{resolve_interval} by the pool's
L{edgeproxy.upstream.resolve.PeriodicResolver}, in a fixed order whatever
order the answers come in).  An address kept keeps its L{Backend}, with its
state and counters; a failed resolution keeps the last addresses.

The L{Dialer} gives the client endpoint of each backend, for the pool's
client (new keep-alive connections), the health checks and WebSocket
tunnels.  A backend that is an address is dialled over TCP to that
address; one still named is dialled through its name
(C{HostnameEndpoint}).  The connect timeout is the upstream's, or a
route's own; with TLS the endpoint is wrapped in the connection creator of
the configured server (its name verified and sent as SNI, whatever address
it resolved to); with a PROXY protocol header the header is written first,
under TLS.  Endpoints hold no per-connection state, so there is one per
backend (and connect timeout), built once; one with a PROXY header names
one client and is built per connection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Set
from typing import Any, Protocol

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from edgeproxy._compat.twisted.tcp import connectingLean
from edgeproxy.config.model import Server, Upstream
from edgeproxy.upstream.backend import Backend
from edgeproxy.upstream.headerfirst import HeaderFirstEndpoint
from edgeproxy.upstream.resolve import isIPLiteral

__all__ = ["Addresses", "CreatorSource", "Dialer"]


class CreatorSource(Protocol):
    """The part of C{edgeproxy.tls.client.UpstreamTLS} this module uses."""

    def creatorFor(self, server: Server) -> Any: ...


class Dialer:
    """
    The client endpoints of one pool's backends (see the module docstring).
    """

    def __init__(self, reactor: Any, upstream: Upstream, tls: CreatorSource | None) -> None:
        """
        @param reactor: what the endpoints connect with.
        @param upstream: the configuration of the pool (its connect
            timeout).
        @param tls: the connection creators of the upstream's servers, or
            L{None} when it is not dialled over TLS.
        """
        self._reactor = connectingLean(reactor)
        self._upstream = upstream
        self._tls = tls
        self._endpoints: dict[Backend, IStreamClientEndpoint] = {}
        self._routeEndpoints: dict[tuple[Backend, float], IStreamClientEndpoint] = {}

    def keep(self, backends: Set[Backend]) -> None:
        """Forget the endpoints of every backend not in C{backends}."""
        self._endpoints = {b: e for b, e in self._endpoints.items() if b in backends}
        self._routeEndpoints = {k: e for k, e in self._routeEndpoints.items() if k[0] in backends}

    def endpointFor(
        self,
        server: Backend,
        proxyHeader: bytes | None = None,
        connectTimeout: float | None = None,
    ) -> IStreamClientEndpoint:
        """
        The endpoint of backend C{server}, for the client's new connections,
        the health checks and WebSocket tunnels.

        @param proxyHeader: a PROXY protocol header the connection starts
            with (a new endpoint per connection), or L{None}.
        @param connectTimeout: a route's own connect timeout
            (L{edgeproxy.upstream.terms.Terms}); L{None}: the upstream's.
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
        timeout = self._upstream.connect_timeout if connectTimeout is None else connectTimeout
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


class _Pool(Protocol):
    """What L{Addresses} uses of an L{edgeproxy.upstream.pool.UpstreamPool}."""

    upstream: Upstream
    log: Logger
    backends: tuple[Backend, ...]

    def setBackends(self, backends: list[Backend] | tuple[Backend, ...]) -> None:
        """Balance over C{backends} from now on."""


def _addressOrder(address: str) -> tuple[int, int, str]:
    parsed = ipaddress.ip_address(address)
    return parsed.version, int(parsed), address


class Addresses:
    """
    What the answers for one pool's host names make of its backends (see
    the module docstring): the callbacks of its
    L{edgeproxy.upstream.resolve.PeriodicResolver}.
    """

    def __init__(self, pool: _Pool, newBackend: Callable[[Server, str], Backend]) -> None:
        """
        @param newBackend: makes the backend of a server at one address (or
            name).
        """
        self._pool = pool
        self._newBackend = newBackend
        self._resolved: dict[str, tuple[str, ...]] = {}

    def namesResolved(self, name: str, addresses: tuple[str, ...]) -> None:
        # Round-robin DNS rotates its answers: the order means nothing, and
        # a fixed one keeps the backends (and the log) still.
        addresses = tuple(sorted(addresses, key=_addressOrder))
        previous = self._resolved.get(name)
        if previous == addresses:
            return
        self._resolved[name] = addresses
        pool = self._pool
        pool.log.info(
            "upstream {upstream}: {name} resolves to {addresses}",
            upstream=pool.upstream.name,
            name=name,
            addresses=", ".join(addresses),
            previous=previous,
        )
        self._rebuild()

    def resolutionFailed(self, name: str, why: str) -> None:
        kept = self._resolved.get(name)
        pool = self._pool
        pool.log.warn(
            "upstream {upstream}: resolving {name} failed ({why}); keeping {kept}",
            upstream=pool.upstream.name,
            name=name,
            why=why,
            kept=", ".join(kept) if kept else "the name itself",
        )

    def _rebuild(self) -> None:
        """
        One backend per address of every server (a name not resolved yet
        is dialled as it is); an address kept keeps its L{Backend}, with
        its state and counters.
        """
        pool = self._pool
        current = {(b.server, b.host): b for b in pool.backends}
        wanted: list[Backend] = []
        for server in pool.upstream.servers:
            hosts = self._resolved.get(server.host, (server.host,))
            for host in hosts:
                backend = current.get((server, host))
                if backend is None:
                    backend = self._newBackend(server, host)
                wanted.append(backend)
        if wanted != list(pool.backends):
            pool.setBackends(wanted)
