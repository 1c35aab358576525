# -*- test-case-name: tests.test_tls_store -*-
"""
The certificates the TLS listeners serve, as OpenSSL contexts.

L{CertificateStore} owns one C{SSL.Context} per certificate entry, built once
per load (never per handshake), the SNI lookup that picks one of them, and the
server connection creator handed to
L{twisted.internet.endpoints.wrapServerTLS}.  A reload builds a complete new
snapshot and rebinds one attribute; a connection keeps the context it was
handed, so open connections are never disturbed.

Session resumption.  pyOpenSSL 26 (on OpenSSL 4) exposes no way to set
session-ticket keys (no C{SSL_CTX_set_tlsext_ticket_keys}, no ticket key
callback in the cffi bindings), but OpenSSL gives every new C{SSL_CTX} fresh
random ticket keys, and encrypts and decrypts tickets with the keys of the
I{initial} context of a connection (C{SSL->session_ctx}), not the one the
servername callback switches to.  So every connection starts on a I{front}
context, and the front context is replaced once
C{session_ticket_rotation} seconds have passed: that is the key rotation.
Tickets therefore work across every certificate of the store and across
certificate reloads (the front context outlives snapshots), and stop working
at the next rotation (the ticket lifetime hint is the rotation period too).
The server-side session cache stays off: tickets need no server state.

Certificates from ACME (L{edgeproxy.acme}) join the snapshot through
L{CertificateStore.setManaged}: validated entries in, a new snapshot
built (the contexts of entries already served are kept) and swapped in
as one rebind, exactly as a reload swaps files.  A reload keeps them.

TLS-ALPN-01 (RFC 8737): L{CertificateStore.setChallenges} builds one
context per pending challenge.  A connection whose ClientHello offers
C{acme-tls/1} and nothing else (read from its first bytes by
L{edgeproxy.tls.clienthello}, only while a challenge is pending) gets the
challenge context of its SNI name, negotiates C{acme-tls/1}, and is closed
once the handshake is done (§3: the validation needs nothing more); any
other connection never sees a challenge certificate.  On a listener with
C{client_ca} too: the validation is not asked for a client certificate
(the CA has none), every other connection is, as before.

OCSP stapling: a context of a certificate naming an OCSP responder answers
a client's status request with what L{CertificateStore.ocsp} (an
L{edgeproxy.tls.ocsp.OCSPStapler}) holds for it at that handshake, so a
refreshed response needs no new context.

The pieces: L{edgeproxy.tls.contexts} builds the contexts (the TLS policy,
the callbacks, the challenge contexts), L{edgeproxy.tls.connections} the
connections and the listeners' creator, L{edgeproxy.tls.waiting} the
transports that hold a ClientHello for an on-demand certificate, and
L{edgeproxy.tls.clientcerts} the contexts of listeners with
C{client_ca}.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Sequence

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger

from edgeproxy._compat import fastPaths
from edgeproxy.config.model import TLSSettings
from edgeproxy.tls.certs import CertificateEntry, CertificateSet
from edgeproxy.tls.clientcerts import ClientContexts
from edgeproxy.tls.connections import CONNECTIONS, ServerConnectionCreator
from edgeproxy.tls.contexts import (
    ACME_TLS_1,
    DEFAULT_PROTOCOLS,
    Front,
    Policy,
    Snapshot,
    challengeContext,
    makeContext,
)
from edgeproxy.tls.layout import loadCertificates


# The connections whose client asked for a name no certificate covers (and
# so got the default one), for the handshake failure metric: weak, so a
# connection leaves it when it is gone.
_unknownNames: weakref.WeakSet[SSL.Connection] = weakref.WeakSet()


def sentUnknownName(connection: SSL.Connection) -> bool:
    """Whether the client of C{connection} sent an SNI name no certificate covers."""
    try:
        return connection in _unknownNames
    except TypeError:  # not an SSL.Connection (a test double)
        return False


class CertificateStore:
    """
    Named certificates as C{SSL.Context}s, with SNI lookup and reload.

    C{load} and C{reload} log a warning (and return nothing special) for each
    certificate expiring within C{expiry_warning}; failures are raised, never
    logged here: the caller (the service) decides how to report them.
    """

    log = Logger()

    def __init__(self, settings: TLSSettings, clock: IReactorTime) -> None:
        """
        @param settings: the C{[tls]} section.
        @param clock: the time source for validity checks and ticket key
            rotation.
        """
        self._settings = settings
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._front: Front | None = None
        self._clients = ClientContexts(self, clock)
        self._managed: tuple[CertificateEntry, ...] = ()
        self._challenges: dict[str, SSL.Context] = {}
        self.ocsp: Any = None
        """An L{edgeproxy.tls.ocsp.OCSPStapler}, or L{None}: no stapling."""
        self.listeners: list[Callable[[CertificateSet], None]] = []
        """Called with the new certificates after every swap."""
        self.onDemand: Callable[[str | None], Any] | None = None
        """With on-demand certificates: called with the SNI name of every
        new connection before OpenSSL reads its ClientHello; returns
        L{None} to go on at once, or a Deferred the handshake waits for
        (L{edgeproxy.acme.ondemand.OnDemand.wait})."""

    @property
    def current(self) -> CertificateSet:
        """
        The certificates being served.

        @raise RuntimeError: before the first successful L{load}.
        """
        if self._snapshot is None:
            raise RuntimeError("CertificateStore.load() has not succeeded yet")
        return self._snapshot.certificates

    def load(self) -> CertificateSet:
        """
        First load: read the configured certificates and build their
        contexts, then warn about those expiring soon.

        @raise CertificateError: naming the file at fault.
        """
        return self.reload()

    def reload(self, settings: TLSSettings | None = None) -> CertificateSet:
        """
        Build a complete new snapshot from C{settings} (the current settings
        when L{None}) and swap it in; new handshakes use it, open connections
        keep what they have.  Then warn about certificates expiring soon.

        @raise CertificateError: naming the file at fault; the previous
            snapshot (and settings) stay in place.
        """
        if settings is None:
            settings = self._settings
        now = self._clock.seconds()
        files = loadCertificates(settings, now=now)
        snapshot = self._build(files, self._managed, Policy.fromSettings(settings))
        # The swap: one rebind each, nothing can fail after this point.
        self._snapshot = snapshot
        self._settings = settings
        self.warnExpiring(now)
        self._announce(snapshot.certificates)
        return snapshot.certificates

    @property
    def managed(self) -> tuple[CertificateEntry, ...]:
        """The certificates obtained through ACME being served."""
        return self._managed

    def setManaged(self, entries: Sequence[CertificateEntry]) -> CertificateSet:
        """
        Serve C{entries} (validated by L{edgeproxy.tls.certs.loadEntry}, as
        every file is) beside the files of C{[tls]}, in place of the
        previous managed ones: a new snapshot, swapped in as a reload swaps
        one.  Open connections keep their context; the contexts of entries
        already served are kept.

        @raise CertificateError: OpenSSL refused an entry; nothing changed.
        @raise RuntimeError: before the first L{load}.
        """
        current = self._snapshot
        if current is None:
            raise RuntimeError("CertificateStore.load() has not succeeded yet")
        managed = tuple(replace(entry, isDefault=False) if entry.isDefault else entry for entry in entries)
        snapshot = self._build(current.files, managed, current.policy, current)
        self._snapshot = snapshot
        self._managed = managed
        self._announce(snapshot.certificates)
        return snapshot.certificates

    def _build(
        self,
        files: CertificateSet,
        managed: tuple[CertificateEntry, ...],
        policy: Policy,
        previous: Snapshot | None = None,
    ) -> Snapshot:
        certificates = CertificateSet(files.entries + managed)
        if previous is None and self._snapshot is not None and self._snapshot.policy == policy:
            previous = self._snapshot
        reusable = previous.built if previous is not None and previous.policy == policy else {}
        served = {id(entry) for entry in (previous.certificates.entries if previous else ())}
        contexts: dict[str, SSL.Context] = {}
        built: dict[int, SSL.Context] = {}
        for entry in certificates.entries:
            key = id(entry)
            context = reusable.get(key) if key in served else None
            built[key] = context if context is not None else self.buildContext(entry, policy)
        for name, entry in certificates.byName().items():
            contexts[name] = built[id(entry)]
        return Snapshot(
            certificates=certificates,
            contexts=contexts,
            default=built[id(certificates.default)],
            policy=policy,
            files=files,
            built=built,
        )

    def _announce(self, certificates: CertificateSet) -> None:
        for listener in list(self.listeners):
            try:
                listener(certificates)
            except Exception:
                self.log.failure("after a certificate swap")

    # TLS-ALPN-01 ----------------------------------------------------------

    @property
    def challengesPending(self) -> bool:
        """Whether a TLS-ALPN-01 challenge is pending (ClientHellos are read)."""
        return bool(self._challenges)

    def setChallenges(self, challenges: Mapping[str, Any]) -> None:
        """
        Present these TLS-ALPN-01 challenges (name -> an object with
        C{certificatePEM} and C{keyPEM}, see
        L{edgeproxy.acme.challenges.TLSALPNChallenge}) from now on, in
        place of the previous ones.
        """
        contexts: dict[str, SSL.Context] = {}
        for name, challenge in challenges.items():
            try:
                contexts[name.lower()] = challengeContext(challenge)
            except Exception:
                self.log.failure("cannot present the TLS-ALPN-01 challenge of {name}", name=name)
        self._challenges = contexts

    def warnExpiring(self, now: float | None = None) -> list[CertificateEntry]:
        """
        Log a warning for every served certificate that expires within the
        C{expiry_warning} setting.  Called by L{load} and L{reload}; a
        service may also call it daily.

        @return: the entries warned about.
        """
        if self._snapshot is None:
            return []
        if now is None:
            now = self._clock.seconds()
        soon = self._snapshot.certificates.expiringWithin(
            self._settings.expiry_warning, now
        )
        for entry in soon:
            self.log.warn(
                "TLS certificate {path} for {names} expires {notAfter}"
                " ({days:.1f} days left)",
                path=entry.path,
                names=", ".join(entry.names),
                notAfter=entry.notAfter.isoformat(),
                days=entry.secondsLeft(now) / 86400.0,
            )
        return soon

    def lookup(self, name: bytes | None) -> SSL.Context | None:
        """
        The context for an SNI name: exact match, then the wildcard one label
        up (C{a.b.example} -> C{*.b.example}, never two labels, never the bare
        parent), else the default.  Case-insensitive; never raises.

        @return: L{None} only before the first load.
        """
        snapshot = self._snapshot
        if snapshot is None:
            return None
        if not name:
            return snapshot.default
        try:
            host = name.decode("ascii").lower().rstrip(".")
        except UnicodeDecodeError:
            # RFC 6066 §3: host names are ASCII (A-labels); anything else gets
            # the default certificate rather than an error.
            return snapshot.default
        context = snapshot.contexts.get(host)
        if context is None:
            _, dot, parent = host.partition(".")
            if dot and parent:
                context = snapshot.contexts.get("*." + parent)
        return context if context is not None else snapshot.default

    def serverConnectionCreator(
        self, acceptableProtocols: Sequence[bytes] = DEFAULT_PROTOCOLS, clientAuth: Any = None
    ) -> IOpenSSLServerConnectionCreator:
        """
        The creator for one listener, to pass to
        L{twisted.internet.endpoints.wrapServerTLS}.

        Every connection starts on the store's current front context and
        switches to the SNI-selected one of the snapshot current at that
        handshake.

        @param acceptableProtocols: ALPN protocols this listener offers, in
            preference order; C{[b"http/1.1"]} for a listener with
            C{http2 = no}.  The wrapped factory narrows them further when it
            provides L{IProtocolNegotiationFactory} (a C{Site} without the
            C{h2} package offers only C{http/1.1}).
        @param clientAuth: the listener's client certificate policy
            (L{edgeproxy.security.listening.ClientAuth}), or L{None}.
        """
        protocols = tuple(acceptableProtocols)
        if not protocols or not all(
            isinstance(p, bytes) and 0 < len(p) < 256 for p in protocols
        ):
            raise ValueError(f"invalid ALPN protocol list: {acceptableProtocols!r}")
        return ServerConnectionCreator(self, protocols, clientAuth)

    def connectionFor(self, protocols: tuple[bytes, ...], clientAuth: Any = None) -> SSL.Connection:
        """
        A new server connection of a listener offering C{protocols} (the
        creator's C{serverConnectionForTLS}).
        """
        if clientAuth is not None:
            return self._clients.connectionFor(protocols, clientAuth)
        # Only while a TLS-ALPN-01 challenge is pending: read the
        # ClientHello before OpenSSL does (see the module docstring).
        readHello = bool(self._challenges)
        connection = CONNECTIONS[fastPaths().tls, readHello](self._frontContext(), None)
        if protocols != DEFAULT_PROTOCOLS:
            connection.acceptableProtocols = protocols
        if readHello:
            connection.helloBuffer = b""
        return connection

    def _frontContext(self) -> SSL.Context:
        """
        The context connections start on, holding the session ticket keys;
        replaced every C{session_ticket_rotation} seconds (see the module
        docstring), or when a reload changed the protocol settings.
        """
        snapshot = self._snapshot
        if snapshot is None:
            raise RuntimeError("TLS connection before CertificateStore.load()")
        now = self._clock.seconds()
        front = self._front
        if front is None or front.outlived(snapshot.policy, now):
            context = self.buildContext(snapshot.certificates.default, snapshot.policy)
            front = self._front = Front(context, now, snapshot.policy)
        return front.context

    @property
    def snapshot(self) -> Snapshot | None:
        """The snapshot being served; L{None} before the first L{load}."""
        return self._snapshot

    def buildContext(
        self, entry: CertificateEntry, policy: Policy, clientAuth: Any = None, level: str = ""
    ) -> SSL.Context:
        """
        The context of C{entry} under C{policy}, with this store's callbacks
        (L{edgeproxy.tls.contexts.makeContext}).

        @raise CertificateError: OpenSSL refused the certificate or key.
        """
        staple = self._staple if self._settings.ocsp_stapling else None
        return makeContext(entry, policy, self._selectContext, staple, clientAuth, level)

    def _selectContext(self, connection: SSL.Connection) -> None:
        """
        The servername callback (runs for every ClientHello, with or without
        SNI).  Must not raise: pyOpenSSL would print the exception and fail
        the handshake with a bare alert.
        """
        try:
            name = connection.get_servername()
            hello = getattr(connection, "clientHello", None)
            if hello is not None and hello.protocols == (ACME_TLS_1,) and name:
                challenge = self._challenges.get(name.decode("ascii", "replace").lower().rstrip("."))
                if challenge is not None:
                    connection.set_context(challenge)
                    # Before the client certificate policy: a CA validating
                    # has no client certificate to give.  The connection
                    # kept the verify mode of the context it was made on
                    # (a listener's with client_ca asks for one).
                    connection.set_verify(SSL.VERIFY_NONE)
                    return
            clientAuth = getattr(connection, "clientAuth", None)
            if clientAuth is not None:
                self._clients.select(connection, clientAuth)
                return
            context = self.lookup(name)
            if context is not None:
                connection.set_context(context)
                if name and self._snapshot is not None and context is self._snapshot.default:
                    if not self._covers(name):
                        _unknownNames.add(connection)
        except Exception:
            self.log.failure("while selecting the TLS context for an SNI name")

    def _staple(self, connection: SSL.Connection, entry: CertificateEntry | None) -> bytes:
        """The OCSP server callback: the current good response, or none."""
        try:
            stapler = self.ocsp
            if stapler is None or entry is None:
                return b""
            return stapler.stapleFor(entry, self._clock.seconds()) or b""
        except Exception:
            self.log.failure("while stapling an OCSP response")
            return b""

    def _covers(self, name: bytes) -> bool:
        """Whether a certificate other than by default serves C{name}."""
        snapshot = self._snapshot
        if snapshot is None:
            return False
        host = name.decode("ascii", "replace").lower().rstrip(".")
        _, dot, parent = host.partition(".")
        return host in snapshot.contexts or bool(dot and parent and "*." + parent in snapshot.contexts)
