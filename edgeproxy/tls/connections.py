# -*- test-case-name: tests.test_tls_store,tests.test_tls_store_acme -*-
"""
The server connections a L{edgeproxy.tls.store.CertificateStore} hands
out, and L{ServerConnectionCreator}, the creator a TLS listener is given.

L{ServerConnection} carries what the store's callbacks ask of a
connection (its listener's ALPN protocols, its ClientHello once read); a
L{HelloReadingConnection} reads its ClientHello from its first bytes,
before OpenSSL does (while a TLS-ALPN-01 challenge is pending, and on the
listeners with C{client_ca}).  L{CONNECTIONS} gives the class for the
process's fast paths.  The creator also gives a connection's transport
what on-demand certificates need (L{edgeproxy.tls.waiting}).
"""

from __future__ import annotations

from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from edgeproxy._compat import fastPaths
from edgeproxy._compat.pyopenssl import BufferReleasingConnection
from edgeproxy._compat.twisted.tls import EdgeTLSTransport, adopt
from edgeproxy.tls.clienthello import NEED_MORE, ClientHello, parseClientHello
from edgeproxy.tls.contexts import DEFAULT_PROTOCOLS
from edgeproxy.tls.waiting import PublicWaitingTLSTransport, TwistedTLSTransport, WaitingTLSTransport


class _Store(Protocol):
    """What the creator asks of its store."""

    onDemand: Any

    @property
    def challengesPending(self) -> bool: ...

    def connectionFor(self, protocols: tuple[bytes, ...], clientAuth: Any = None) -> SSL.Connection: ...


class ServerConnection(SSL.Connection):
    """
    A server connection that carries its listener's ALPN protocols for
    L{edgeproxy.tls.contexts.selectProtocol}.

    ALPN: on the connection itself rather than in a weak-keyed map beside
    the store: the map's weak reference and entry cost about 250 bytes for
    as long as a connection lives, idle or not (R4, docs/performance.rst
    Run 6); the attribute is one slot in a dictionary the connection already
    has, and is set only when a listener narrows the default list.

    With the TLS fast paths, connections do not keep their memory BIOs'
    buffers while they have nothing to buffer (L{CONNECTIONS}:
    L{BufferReleasingConnection}); C{tests.test_tls_store} checks the bytes
    still flow after the swaps.
    """

    acceptableProtocols: tuple[bytes, ...] = DEFAULT_PROTOCOLS
    """ALPN protocols offered, in preference order."""

    helloBuffer: bytes | None = None
    """The first bytes received, while a ClientHello is looked for (only
    while a TLS-ALPN-01 challenge is pending); L{None} otherwise."""
    clientHello: ClientHello | None = None
    """The ClientHello read from those bytes, once read."""


class HelloReadingConnection(ServerConnection):
    """A server connection made while a TLS-ALPN-01 challenge is pending:
    it reads its ClientHello from the first bytes it is given."""

    def bio_write(self, buf: bytes | bytearray | memoryview) -> int:
        if self.helloBuffer is not None:
            self._readHello(buf)
        return super().bio_write(buf)

    def _readHello(self, data: bytes | bytearray | memoryview) -> None:
        buffered = self.helloBuffer + data  # type: ignore[operator]
        hello = parseClientHello(buffered)
        if isinstance(hello, ClientHello):
            self.clientHello = hello
            onHello = getattr(self, "onHello", None)
            if onHello is not None:
                onHello(self, hello)
        elif hello is NEED_MORE:
            self.helloBuffer = buffered
            return
        self.helloBuffer = None


class _ReleasingServerConnection(ServerConnection, BufferReleasingConnection):
    pass


class _ReleasingHelloReadingConnection(HelloReadingConnection, BufferReleasingConnection):
    pass


CONNECTIONS: dict[tuple[bool, bool], type[ServerConnection]] = {
    (False, False): ServerConnection,
    (False, True): HelloReadingConnection,
    (True, False): _ReleasingServerConnection,
    (True, True): _ReleasingHelloReadingConnection,
}
"""The class of a server connection, by (TLS fast paths, ClientHello read)."""


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnectionCreator:
    """
    One listener's view of a L{edgeproxy.tls.store.CertificateStore}: the store's current
    contexts, this listener's ALPN protocols.
    """

    def __init__(self, store: _Store, protocols: tuple[bytes, ...], clientAuth: Any = None) -> None:
        self._store = store
        self.acceptableProtocols = protocols
        """ALPN protocols offered, in preference order."""
        self.clientAuth = clientAuth
        """The listener's client certificate policy, or L{None}."""

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        # Called by every server TLS transport as it connects: the one place
        # that sees them all, to give them the faster record path (with the
        # TLS fast paths) and what on-demand certificates and TLS-ALPN-01
        # need.
        store = self._store
        if fastPaths().tls:
            adopt(tlsProtocol)
        kind = type(tlsProtocol)
        if kind is EdgeTLSTransport:
            if store.onDemand is not None:
                tlsProtocol.__class__ = WaitingTLSTransport
                tlsProtocol._onDemand = store.onDemand  # type: ignore[attr-defined]
        elif kind is TwistedTLSTransport and (store.onDemand is not None or store.challengesPending):
            # Twisted's own transport (the public path).
            tlsProtocol.__class__ = PublicWaitingTLSTransport
            tlsProtocol._onDemand = store.onDemand  # type: ignore[attr-defined]
        return store.connectionFor(self.acceptableProtocols, self.clientAuth)
