# -*- test-case-name: tests.test_tls_store -*-
"""
The certificates the TLS listeners serve, as OpenSSL contexts.

L{CertificateStore} owns one C{SSL.Context} per certificate entry, built once
per load (never per handshake), the SNI lookup that picks one of them, and the
server connection creator handed to
L{twisted.internet.endpoints.wrapServerTLS}.  A reload builds a complete new
snapshot and rebinds one attribute; a connection keeps the context it was
handed, so open connections are never disturbed.

Why contexts are built here rather than by C{CertificateOptions}:
pyOpenSSL refuses to change a context once a connection used it, and
C{CertificateOptions.getContext} sets the cipher list (which creates a
connection) before we could install our own ALPN and servername callbacks.
Building the few settings ourselves keeps every knob in one function,
L{_makeContext}.

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
other connection never sees a challenge certificate.

OCSP stapling: a context of a certificate naming an OCSP responder answers
a client's status request with what L{CertificateStore.ocsp} (an
L{edgeproxy.tls.ocsp.OCSPStapler}) holds for it at that handshake, so a
refreshed response needs no new context.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolNegotiationFactory,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from edgeproxy._compat import fastPaths
from edgeproxy._compat.pyopenssl import BufferReleasingConnection, setGroupsList
from edgeproxy._compat.twisted.tls import EdgeTLSTransport, adopt
from edgeproxy.config.model import TLSSettings, TLSVersion
from edgeproxy.errors import CertificateError
from edgeproxy.tls.certs import CertificateEntry, CertificateSet, loadCertificates
from edgeproxy.tls.clienthello import NEED_MORE, ClientHello, parseClientHello

DEFAULT_PROTOCOLS: tuple[bytes, ...] = (b"h2", b"http/1.1")
"""ALPN protocols offered by default, in server preference order."""

ACME_TLS_1 = b"acme-tls/1"
"""RFC 8737 §6.2: the ALPN protocol of TLS-ALPN-01 validation."""


def _selectACMEProtocol(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    # RFC 8737 §3: the validation is the handshake; the transport closes
    # the connection as soon as it is done (EdgeTLSTransport).
    connection.closeAfterHandshake = True  # type: ignore[attr-defined]
    return ACME_TLS_1


def _ocspURL(entry: CertificateEntry) -> str | None:
    from edgeproxy.tls.ocsp import responderURL

    return responderURL(entry.certificate)

# Mozilla "intermediate" (Server Side TLS 5.x): forward secret AEAD suites
# only for TLS 1.2; TLS 1.3 suites are all AEAD already.
_TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
_TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# The hybrid post-quantum group first where this OpenSSL has it (3.5+),
# then Mozilla's classic list.
_GROUP_LISTS = (
    b"X25519MLKEM768:X25519:prime256v1:secp384r1",
    b"X25519:prime256v1:secp384r1",
)
# One session id context for every context of every snapshot.  OpenSSL
# refuses to resume a session whose id context differs from the connection's;
# a single value keeps that check from ever depending on which certificate's
# context (or which reload) made the session.  Twisted's CertificateOptions
# uses a random one per context, which is why we do not use it here.
_SESSION_ID_CONTEXT = b"edgeproxy"

_MIN_VERSIONS = {
    TLSVersion.TLSv1_2: SSL.TLS1_2_VERSION,
    TLSVersion.TLSv1_3: SSL.TLS1_3_VERSION,
}


def _setGroups(context: SSL.Context) -> bytes:
    """
    Restrict the key exchange groups.  pyOpenSSL has no public API for
    C{SSL_CTX_set1_groups_list} (L{setGroupsList} reaches the binding);
    C{tests.test_tls_store} checks the negotiated group so a change in the
    binding shows up there.

    @return: the list that was accepted (empty: this pyOpenSSL cannot set
        one, OpenSSL's defaults stay).
    """
    for groups in _GROUP_LISTS:
        accepted = setGroupsList(context, groups)
        if accepted is None:
            return b""
        if accepted:
            return groups
    # Reported by _makeContext like any other OpenSSL refusal.
    raise SSL.Error([("edgeproxy", "_setGroups", "no supported key exchange group")])


@dataclass(frozen=True, slots=True)
class _Policy:
    """The settings every context of a store shares (not the certificates)."""

    minVersion: TLSVersion
    ticketLifetime: float
    """Seconds; 0 or less disables session tickets."""

    @classmethod
    def fromSettings(cls, settings: TLSSettings) -> _Policy:
        return cls(settings.min_version, settings.session_ticket_rotation)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    certificates: CertificateSet
    contexts: dict[str, SSL.Context]
    """Served name (lower case, C{*.suffix} for wildcards) to context."""
    default: SSL.Context
    policy: _Policy
    files: CertificateSet
    """The certificates of C{[tls]} alone (C{certificates} adds the
    managed ones)."""
    built: dict[int, SSL.Context]
    """C{id(entry)} -> its context, for every entry of C{certificates}
    (reused by the next snapshot when the entry is still served)."""
    clientContexts: dict[tuple[int, str, str], SSL.Context] = field(default_factory=dict)
    """(C{id} of a context of C{built}, client CA key, level) -> the same
    certificate asking for client certificates (made at first use)."""


@dataclass(frozen=True, slots=True)
class _Front:
    context: SSL.Context
    builtAt: float
    policy: _Policy


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
        self._snapshot: _Snapshot | None = None
        self._front: _Front | None = None
        self._clientFronts: dict[str, _Front] = {}
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
        snapshot = self._build(files, self._managed, _Policy.fromSettings(settings))
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
        policy: _Policy,
        previous: _Snapshot | None = None,
    ) -> _Snapshot:
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
            built[key] = context if context is not None else self._makeContext(entry, policy)
        for name, entry in certificates.byName().items():
            contexts[name] = built[id(entry)]
        return _Snapshot(
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
                contexts[name.lower()] = self._challengeContext(challenge)
            except Exception:
                self.log.failure("cannot present the TLS-ALPN-01 challenge of {name}", name=name)
        self._challenges = contexts

    def _challengeContext(self, challenge: Any) -> SSL.Context:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
        context.use_certificate(x509.load_pem_x509_certificate(challenge.certificatePEM))
        context.use_privatekey(load_pem_private_key(challenge.keyPEM, password=None))  # type: ignore[arg-type]
        context.check_privatekey()
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_alpn_select_callback(_selectACMEProtocol)
        return context

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
        return _ServerConnectionCreator(self, protocols, clientAuth)

    def _connectionFor(self, protocols: tuple[bytes, ...], clientAuth: Any = None) -> SSL.Connection:
        if clientAuth is not None:
            return self._clientConnectionFor(protocols, clientAuth)
        # Only while a TLS-ALPN-01 challenge is pending: read the
        # ClientHello before OpenSSL does (see the module docstring).
        readHello = bool(self._challenges)
        connection = _CONNECTIONS[fastPaths().tls, readHello](self._frontContext(), None)
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
        if (
            front is None
            or front.policy != snapshot.policy
            or (
                snapshot.policy.ticketLifetime > 0
                and now - front.builtAt >= snapshot.policy.ticketLifetime
            )
        ):
            context = self._makeContext(snapshot.certificates.default, snapshot.policy)
            front = self._front = _Front(context, now, snapshot.policy)
        return front.context

    # Client certificates (edgeproxy.security.listening) ------------------

    def _clientConnectionFor(self, protocols: tuple[bytes, ...], clientAuth: Any) -> SSL.Connection:
        """
        A connection of a listener with C{client_ca}: it starts on a front
        context of that CA's own (its own session-ticket keys), and the
        servername callback picks the certificate's context at the name's
        level (L{_selectClientContext}).
        """
        connection = _CONNECTIONS[fastPaths().tls, True](self._clientFront(clientAuth), None)
        connection.clientAuth = clientAuth  # type: ignore[attr-defined]
        if protocols != DEFAULT_PROTOCOLS:
            connection.acceptableProtocols = protocols
        # OpenSSL looks a resumed session's session-ID context up before
        # the servername callback runs: the context of the name's level is
        # set from the ClientHello, read before OpenSSL reads it.  A hello
        # that cannot be read leaves the front context, whose session-ID
        # context no session ever gets (nothing is resumed).
        connection.helloBuffer = b""
        connection.onHello = self._clientHello  # type: ignore[attr-defined]
        return connection

    def _clientHello(self, connection: SSL.Connection, hello: ClientHello) -> None:
        clientAuth = getattr(connection, "clientAuth", None)
        if clientAuth is not None:
            name = hello.serverName.encode("ascii") if hello.serverName else None
            context = self._clientContextFor(name, clientAuth)
            if context is not None:
                connection.set_context(context)

    def _clientFront(self, clientAuth: Any) -> SSL.Context:
        snapshot = self._snapshot
        if snapshot is None:
            raise RuntimeError("TLS connection before CertificateStore.load()")
        now = self._clock.seconds()
        fronts = self._clientFronts
        front = fronts.get(clientAuth.key)
        if (
            front is None
            or front.policy != snapshot.policy
            or (
                snapshot.policy.ticketLifetime > 0
                and now - front.builtAt >= snapshot.policy.ticketLifetime
            )
        ):
            context = self._makeContext(
                snapshot.certificates.default, snapshot.policy, clientAuth, "front"
            )
            front = fronts[clientAuth.key] = _Front(context, now, snapshot.policy)
        return front.context

    def _selectClientContext(self, connection: SSL.Connection, clientAuth: Any) -> None:
        name = connection.get_servername()
        context = self._clientContextFor(name, clientAuth)
        if context is None:
            return
        connection.set_context(context)
        # OpenSSL copies the verify mode into the connection when it is
        # made, not when its context is switched.
        connection.set_verify(clientAuth.verifyMode(clientAuth.levelFor(name)))

    def _clientContextFor(self, name: bytes | None, clientAuth: Any) -> SSL.Context | None:
        base = self.lookup(name)
        snapshot = self._snapshot
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
            context = snapshot.clientContexts[key] = self._makeContext(
                entry, snapshot.policy, clientAuth, level
            )
        return context

    def _makeContext(
        self, entry: CertificateEntry, policy: _Policy, clientAuth: Any = None, level: str = ""
    ) -> SSL.Context:
        try:
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_min_proto_version(_MIN_VERSIONS[policy.minVersion])
            options = (
                SSL.OP_NO_COMPRESSION  # CRIME
                | SSL.OP_NO_RENEGOTIATION  # RFC 8446 has none; TLS 1.2 needs none
            )
            if policy.ticketLifetime <= 0:
                options |= SSL.OP_NO_TICKET
            context.set_options(options)
            context.set_mode(SSL.MODE_RELEASE_BUFFERS)
            context.use_certificate(entry.certificate)
            context.use_privatekey(entry.key)
            for certificate in entry.chain:
                context.add_extra_chain_cert(certificate)
            context.check_privatekey()
            context.set_session_id(_SESSION_ID_CONTEXT)
            if clientAuth is not None:
                clientAuth.configure(context, level)
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            if policy.ticketLifetime > 0:
                # RFC 8446 §4.6.1 ticket_lifetime / RFC 5077 lifetime hint.
                context.set_timeout(max(1, int(policy.ticketLifetime)))
            _setGroups(context)
            context.set_tls13_ciphersuites(_TLS13_SUITES)
            if self._settings.ocsp_stapling and _ocspURL(entry) is not None:
                # Read at each handshake that asks for it: a refreshed
                # response needs no new context.
                context.set_ocsp_server_callback(self._staple, entry)
            context.set_tlsext_servername_callback(self._selectContext)
            context.set_alpn_select_callback(self._selectProtocol)
            # Last: pyOpenSSL may create a connection to check the list,
            # after which the context cannot change any more.
            context.set_cipher_list(_TLS12_CIPHERS)
        except SSL.Error as e:
            raise CertificateError(
                f"OpenSSL refused the certificate or key: {e}",
                file=entry.path,
                section="tls",
                key="default" if entry.isDefault else "certificates",
            )
        return context

    def _selectContext(self, connection: SSL.Connection) -> None:
        """
        The servername callback (runs for every ClientHello, with or without
        SNI).  Must not raise: pyOpenSSL would print the exception and fail
        the handshake with a bare alert.
        """
        try:
            clientAuth = getattr(connection, "clientAuth", None)
            if clientAuth is not None:
                self._selectClientContext(connection, clientAuth)
                return
            name = connection.get_servername()
            hello = getattr(connection, "clientHello", None)
            if hello is not None and hello.protocols == (ACME_TLS_1,) and name:
                challenge = self._challenges.get(name.decode("ascii", "replace").lower().rstrip("."))
                if challenge is not None:
                    connection.set_context(challenge)
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

    def _selectProtocol(
        self, connection: SSL.Connection, offered: list[bytes]
    ) -> bytes | object:
        """
        The ALPN select callback: the listener's protocols narrowed by what
        the wrapped factory speaks, in server preference order.

        With no overlap the handshake fails with the fatal
        C{no_application_protocol} alert (RFC 7301 §3.2): pyOpenSSL sends
        it when the callback raises, and raises the exception again from
        the handshake, where Twisted takes an L{SSL.Error} for the failed
        handshake it is.
        """
        try:
            wanted = getattr(connection, "acceptableProtocols", DEFAULT_PROTOCOLS)
            tlsProtocol = connection.get_app_data()
            factory = getattr(getattr(tlsProtocol, "factory", None), "wrappedFactory", None)
            negotiation = IProtocolNegotiationFactory(factory, None)
            if negotiation is not None:
                speaks = set(negotiation.acceptableProtocols())
                wanted = tuple(p for p in wanted if p in speaks)
            for protocol in wanted:
                if protocol in offered:
                    return protocol
        except Exception:
            self.log.failure("while selecting the ALPN protocol")
            return SSL.NO_OVERLAPPING_PROTOCOLS
        if offered == [ACME_TLS_1]:
            # A TLS-ALPN-01 validation (RFC 8737) for a name with no
            # challenge pending: it sees the name's own certificate and
            # fails on that.
            return SSL.NO_OVERLAPPING_PROTOCOLS
        raise NoApplicationProtocol()


class NoApplicationProtocol(SSL.Error):
    """
    The client offered ALPN protocols and none is ours: the handshake ends
    with the C{no_application_protocol} alert (RFC 7301 §3.2).

    Its argument has the shape of OpenSSL's error queue (what
    C{SSL.Error}s carry, and what Twisted reads to tell an EOF from an
    error).
    """

    def __init__(self) -> None:
        SSL.Error.__init__(self, [("SSL routines", "", "no application protocol")])


class _ServerConnection(SSL.Connection):
    """
    A server connection that carries its listener's ALPN protocols for
    L{CertificateStore._selectProtocol}.

    ALPN: on the connection itself rather than in a weak-keyed map beside
    the store: the map's weak reference and entry cost about 250 bytes for
    as long as a connection lives, idle or not (R4, docs/performance.rst
    Run 6); the attribute is one slot in a dictionary the connection already
    has, and is set only when a listener narrows the default list.

    With the TLS fast paths, connections do not keep their memory BIOs'
    buffers while they have nothing to buffer (L{_CONNECTIONS}:
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


class _HelloReadingConnection(_ServerConnection):
    """A server connection made while a TLS-ALPN-01 challenge is pending:
    it reads its ClientHello from the first bytes it is given."""

    def bio_write(self, buf: bytes) -> int:
        if self.helloBuffer is not None:
            self._readHello(buf)
        return super().bio_write(buf)

    def _readHello(self, data: bytes) -> None:
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


class _ReleasingServerConnection(_ServerConnection, BufferReleasingConnection):
    pass


class _ReleasingHelloReadingConnection(_HelloReadingConnection, BufferReleasingConnection):
    pass


_CONNECTIONS: dict[tuple[bool, bool], type[_ServerConnection]] = {
    (False, False): _ServerConnection,
    (False, True): _HelloReadingConnection,
    (True, False): _ReleasingServerConnection,
    (True, True): _ReleasingHelloReadingConnection,
}
"""The class of a server connection, by (TLS fast paths, ClientHello read)."""


@implementer(IOpenSSLServerConnectionCreator)
class _ServerConnectionCreator:
    """
    One listener's view of a L{CertificateStore}: the store's current
    contexts, this listener's ALPN protocols.
    """

    def __init__(self, store: CertificateStore, protocols: tuple[bytes, ...], clientAuth: Any = None) -> None:
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
                tlsProtocol.__class__ = _WaitingTLSTransport
                tlsProtocol._onDemand = store.onDemand  # type: ignore[attr-defined]
        elif kind is _TwistedTLSTransport and (store.onDemand is not None or store.challengesPending):
            # Twisted's own transport (the public path).
            tlsProtocol.__class__ = _PublicWaitingTLSTransport
            tlsProtocol._onDemand = store.onDemand  # type: ignore[attr-defined]
        return store._connectionFor(self.acceptableProtocols, self.clientAuth)


class _HoldsHello:
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
                CertificateStore.log.failure("on-demand certificate for {name}", name=hello.serverName)
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


class _WaitingTLSTransport(_HoldsHello, EdgeTLSTransport):
    """L{_HoldsHello} over the fast paths' transport."""

    __slots__ = ()


_TwistedTLSTransport: Any = TLSMemoryBIOFactory.protocol
"""Twisted's own server TLS transport (the public path)."""


class _PublicWaitingTLSTransport(_HoldsHello, _TwistedTLSTransport):
    """
    L{_HoldsHello} over Twisted's own transport (the public path), which
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
