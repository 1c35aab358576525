# -*- test-case-name: tests.integration.test_security_tls -*-
"""
The contexts of the listeners with C{client_ca}: L{ClientContexts}, the
client certificate part of a L{edgeproxy.tls.store.CertificateStore}.

A listener's client certificate policy
(L{edgeproxy.security.listening.ClientAuth}) says which CA signs the
certificates it asks for, and at which level a name asks (C{request},
C{require}, or none).  Each CA has a front context of its own (its own
session-ticket keys, rotated as the store's); the servername callback
switches a connection to the context of its certificate at its name's
level, made at first use and kept in the store's snapshot (a reload
drops them with it).
"""

from __future__ import annotations

from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet.interfaces import IReactorTime

from edgeproxy._compat import fastPaths
from edgeproxy.tls.certs import CertificateEntry
from edgeproxy.tls.clienthello import ClientHello
from edgeproxy.tls.connections import CONNECTIONS
from edgeproxy.tls.contexts import DEFAULT_PROTOCOLS, Front, Policy, Snapshot


class _Store(Protocol):
    """What the client contexts ask of their store."""

    @property
    def snapshot(self) -> Snapshot | None: ...

    def lookup(self, name: bytes | None) -> SSL.Context | None: ...

    def buildContext(
        self, entry: CertificateEntry, policy: Policy, clientAuth: Any = None, level: str = ""
    ) -> SSL.Context: ...


class ClientContexts:
    """The contexts of a store's listeners with C{client_ca}, per CA and level."""

    def __init__(self, store: _Store, clock: IReactorTime) -> None:
        self._store = store
        self._clock = clock
        self._fronts: dict[str, Front] = {}

    def connectionFor(self, protocols: tuple[bytes, ...], clientAuth: Any) -> SSL.Connection:
        """
        A connection of a listener with C{client_ca}: it starts on a front
        context of that CA's own (its own session-ticket keys), and the
        servername callback picks the certificate's context at the name's
        level (L{select}).
        """
        connection = CONNECTIONS[fastPaths().tls, True](self._front(clientAuth), None)
        connection.clientAuth = clientAuth  # type: ignore[attr-defined]
        if protocols != DEFAULT_PROTOCOLS:
            connection.acceptableProtocols = protocols
        # OpenSSL looks a resumed session's session-ID context up before
        # the servername callback runs: the context of the name's level is
        # set from the ClientHello, read before OpenSSL reads it.  A hello
        # that cannot be read leaves the front context, whose session-ID
        # context no session ever gets (nothing is resumed).
        connection.helloBuffer = b""
        connection.onHello = self._onHello  # type: ignore[attr-defined]
        return connection

    def _onHello(self, connection: SSL.Connection, hello: ClientHello) -> None:
        clientAuth = getattr(connection, "clientAuth", None)
        if clientAuth is not None:
            name = hello.serverName.encode("ascii") if hello.serverName else None
            context = self._contextFor(name, clientAuth)
            if context is not None:
                connection.set_context(context)

    def _front(self, clientAuth: Any) -> SSL.Context:
        snapshot = self._store.snapshot
        if snapshot is None:
            raise RuntimeError("TLS connection before CertificateStore.load()")
        now = self._clock.seconds()
        fronts = self._fronts
        front = fronts.get(clientAuth.key)
        if front is None or front.outlived(snapshot.policy, now):
            context = self._store.buildContext(
                snapshot.certificates.default, snapshot.policy, clientAuth, "front"
            )
            front = fronts[clientAuth.key] = Front(context, now, snapshot.policy)
        return front.context

    def select(self, connection: SSL.Connection, clientAuth: Any) -> None:
        """The servername callback's part for a connection with C{clientAuth}."""
        name = connection.get_servername()
        context = self._contextFor(name, clientAuth)
        if context is None:
            return
        connection.set_context(context)
        # OpenSSL copies the verify mode into the connection when it is
        # made, not when its context is switched.
        connection.set_verify(clientAuth.verifyMode(clientAuth.levelFor(name)))

    def _contextFor(self, name: bytes | None, clientAuth: Any) -> SSL.Context | None:
        store = self._store
        base = store.lookup(name)
        snapshot = store.snapshot
        if base is None or snapshot is None:
            return None
        level = clientAuth.levelFor(name)
        key = (id(base), clientAuth.key, level)
        context = snapshot.clientContexts.get(key)
        if context is None:
            entry = next(
                (e for e in snapshot.certificates.entries if snapshot.built.get(id(e)) is base),
                snapshot.certificates.default,
            )
            context = snapshot.clientContexts[key] = store.buildContext(
                entry, snapshot.policy, clientAuth, level
            )
        return context
