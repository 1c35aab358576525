# -*- test-case-name: tests.test_security_units -*-
"""
The PROXY protocol (HAProxy's, versions 1 and 2): the address of the
client a load balancer in front of us accepted, sent before anything else
on the connection, before TLS.

In (C{[listen:NAME] proxy_protocol = yes}): L{ProxyProtocolFactory} wraps
a listener's factory at the TCP level, under TLS.  A connection from a
peer outside C{proxy_protocol_from} is closed at once (anyone else could
claim any address); from a listed peer, the header must come whole within
the listener's C{client_header_timeout}, and be valid, or the connection
is closed.  The address it carries becomes the connection's peer for
everything after it: C{getPeer()} of the transport (so
L{edgeproxy.pipeline.values.ConnectionInfo.peer}, the trusted-proxy
resolution, the access rules, the logs), and its destination the
connection's local address.  A C{LOCAL} header (v2; C{UNKNOWN} in v1: the
balancer's own health check) keeps the balancer's address.

The header itself is read by L{edgeproxy.proxyheader}.  Twisted's wrapper
(C{twisted.protocols.haproxy}) is not used: it refuses a header split over
two reads, has no source check and no deadline, and its parsers are
private.  The other direction (a header on backend connections) is
L{edgeproxy.upstream.headerfirst}'s.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from edgeproxy.config.model import IPNetwork
from edgeproxy.proxyheader import InvalidHeader, parseHeader, splitHeader

if TYPE_CHECKING:
    from twisted.internet.interfaces import ITCPTransport
    from twisted.python.failure import Failure

__all__ = ["ProxyProtocolFactory", "allowedSource"]


def allowedSource(peer: Any, sources: tuple[IPNetwork, ...]) -> bool:
    """Whether the TCP peer C{peer} may send a PROXY header."""
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return False
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return any(parsed in network for network in sources)


class ProxyProtocolWrapper(ProtocolWrapper):
    """One connection that starts with a PROXY header (see the module docstring)."""

    # Set by makeConnection, before anything else runs: the listener's TCP
    # transport.  The wrapped protocol is the listener factory's (TLS's, or
    # an HTTP/1.1 connection): an IProtocol with a transport attribute.
    transport: ITCPTransport
    wrappedProtocol: Any

    def __init__(self, factory: ProxyProtocolFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer: bytes | None = b""
        self._source: Any = None
        self._destination: Any = None
        self._deadline: Any = None

    def makeConnection(self, transport: Any) -> None:
        factory: ProxyProtocolFactory = self.factory
        if not allowedSource(transport.getPeer(), factory.sources):
            factory.refused("source")
            transport.abortConnection()
            # The wrapped protocol never starts: nothing of it ran.
            self.transport = transport
            self._buffer = None
            return
        # The wrapped protocol (TLS, then HTTP) starts once the header is
        # read: it sees the client's address from its first moment.
        self.transport = transport
        self.connected = 1
        self._deadline = factory.clock.callLater(factory.timeout, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self._buffer is not None:
            self.factory.refused("timeout")
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer is None:
            if self.wrappedProtocol.transport is not None:
                self.wrappedProtocol.dataReceived(data)
            return
        buffer += data
        try:
            found = splitHeader(buffer)
            if found is None:
                self._buffer = buffer
                return
            head, rest = found
            parsed = parseHeader(head)
        except InvalidHeader:
            self._buffer = None
            self._cancelDeadline()
            self.factory.refused("invalid")
            self.transport.abortConnection()
            return
        self._buffer = None
        self._cancelDeadline()
        if parsed is not None:
            self._source, self._destination = parsed
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelDeadline()
        if self.wrappedProtocol.transport is not None:
            super().connectionLost(reason)
        else:
            self.connected = 0
            self.disconnecting = 1

    def getPeer(self) -> Any:
        if self._source is not None:
            return self._source
        return self.transport.getPeer()

    def getHost(self) -> Any:
        if self._destination is not None:
            return self._destination
        return self.transport.getHost()


class ProxyProtocolFactory(WrappingFactory[ProxyProtocolWrapper]):
    """Wraps a listener's factory so that its connections start with a PROXY header."""

    protocol = ProxyProtocolWrapper
    noisy = False

    def __init__(
        self,
        wrappedFactory: Any,
        sources: tuple[IPNetwork, ...],
        timeout: float,
        clock: Any,
        listener: str = "",
        metrics: Any = None,
    ) -> None:
        super().__init__(wrappedFactory)
        self.sources = sources
        self.timeout = timeout
        self.clock = clock
        self.listener = listener
        self.metrics = metrics

    def unregisterProtocol(self, p: Any) -> None:
        self.protocols.pop(p, None)

    def refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.proxyProtocolRefused(self.listener, reason)

    def __getattr__(self, name: str) -> Any:
        # What the service asks a listener's site (channels, inflight,
        # reconfigure...) goes to the wrapped factory.
        return getattr(self.wrappedFactory, name)


