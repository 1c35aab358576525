# -*- test-case-name: tests.test_tls_store_acme,tests.test_tls_transport -*-
"""
The server TLS transports that hold a connection's ClientHello back from
OpenSSL: L{HoldsHello}, over the fast paths' transport
(L{WaitingTLSTransport}) or over Twisted's own (L{PublicWaitingTLSTransport}).

A listener of a store with on-demand certificates
(L{edgeproxy.tls.store.CertificateStore.onDemand}) has its connections'
transports turned into one of these by the connection creator
(L{edgeproxy.tls.connections.ServerConnectionCreator}); Twisted's own
transport also gets one while a TLS-ALPN-01 challenge is pending, to close
the validation once its handshake is done.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from edgeproxy._compat.twisted.tls import EdgeTLSTransport
from edgeproxy.tls.clienthello import NEED_MORE, ClientHello, parseClientHello
from edgeproxy.tls.contexts import ACME_TLS_1

# The store's namespace: an on-demand hook that fails is the store's to
# report, as its other lines.
log = Logger(namespace="edgeproxy.tls.store.CertificateStore")


class HoldsHello:
    """
    What the TLS transport of a listener with on-demand certificates adds:
    it holds the first bytes of the connection until its ClientHello is
    complete, asks the store's C{onDemand} hook about the SNI name, and
    hands the bytes to OpenSSL when the hook says so (the certificate
    ordered for the name is then in the snapshot the servername callback
    reads).  The TCP transport is paused meanwhile.  Only listeners of a
    store with on-demand certificates get it.
    """

    # No __slots__: the classes it is mixed into have an instance
    # dictionary, and __class__ assignment needs the same layout.

    _heldHello: bytes = b""
    _helloPassed = False
    _onDemand: Any = None

    def dataReceived(self, data: bytes) -> None:
        deliver = super().dataReceived  # type: ignore[misc]
        if self._helloPassed or self._onDemand is None:
            deliver(data)
            return
        held = self._heldHello + data
        hello = parseClientHello(held)
        if hello is NEED_MORE:
            self._heldHello = held
            return
        self._helloPassed = True
        self._heldHello = b""
        wait = None
        if isinstance(hello, ClientHello) and hello.serverName and hello.protocols != (ACME_TLS_1,):
            try:
                wait = self._onDemand(hello.serverName)
            except Exception:
                log.failure("on-demand certificate for {name}", name=hello.serverName)
        if wait is None:
            deliver(held)
            return
        tls: Any = self
        transport: Any = tls.transport
        transport.pauseProducing()

        def resume(_: object) -> None:
            # Closed or aborted meanwhile (nothing reached OpenSSL yet, so
            # nothing else can have ended the TLS connection).
            if tls.disconnecting or not tls.connected or getattr(transport, "disconnected", False):
                return
            transport.resumeProducing()
            deliver(held)

        wait.addBoth(resume)


class WaitingTLSTransport(HoldsHello, EdgeTLSTransport):
    """L{HoldsHello} over the fast paths' transport."""

    __slots__ = ()


TwistedTLSTransport: Any = TLSMemoryBIOFactory.protocol
"""Twisted's own server TLS transport (the public path)."""


class PublicWaitingTLSTransport(HoldsHello, TwistedTLSTransport):
    """
    L{HoldsHello} over Twisted's own transport (the public path), which
    also closes a TLS-ALPN-01 validation once its handshake is done, as
    L{EdgeTLSTransport} does (RFC 8737 §3: nothing follows it): given only
    while a challenge is pending or with on-demand certificates.
    """

    __slots__ = ()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        connection = self.getHandle()
        if (
            connection is not None
            and getattr(connection, "closeAfterHandshake", False)
            and not self.disconnecting
            # The client's Finished was received: the handshake is done.
            and connection.get_peer_finished() is not None
        ):
            self.loseConnection()
