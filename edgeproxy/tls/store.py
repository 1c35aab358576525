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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from OpenSSL import SSL
from OpenSSL._util import lib as _opensslLib
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolNegotiationFactory,
    IReactorTime,
)
from twisted.logger import Logger
from zope.interface import implementer

from edgeproxy.config.model import TLSSettings, TLSVersion
from edgeproxy.errors import CertificateError
from edgeproxy.tls.certs import CertificateEntry, CertificateSet, loadCertificates
from edgeproxy.tls.transport import _releaseDrained, _releaseDrainedReceive, adopt

DEFAULT_PROTOCOLS: tuple[bytes, ...] = (b"h2", b"http/1.1")
"""ALPN protocols offered by default, in server preference order."""

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
    C{SSL_CTX_set1_groups_list}, so this is the one place that calls the
    binding directly; C{tests.test_tls_store} checks the negotiated group so
    a change in the binding shows up there.

    @return: the list that was accepted.
    """
    for groups in _GROUP_LISTS:
        if _opensslLib.SSL_CTX_set1_curves_list(context._context, groups) == 1:
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


@dataclass(frozen=True, slots=True)
class _Front:
    context: SSL.Context
    builtAt: float
    policy: _Policy


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
        certificates = loadCertificates(settings, now=now)
        policy = _Policy.fromSettings(settings)
        contexts: dict[str, SSL.Context] = {}
        built: dict[int, SSL.Context] = {}
        for entry in certificates.entries:
            built[id(entry)] = self._makeContext(entry, policy)
        for name, entry in certificates.byName().items():
            contexts[name] = built[id(entry)]
        snapshot = _Snapshot(
            certificates=certificates,
            contexts=contexts,
            default=built[id(certificates.default)],
            policy=policy,
        )
        # The swap: one rebind each, nothing can fail after this point.
        self._snapshot = snapshot
        self._settings = settings
        self.warnExpiring(now)
        return certificates

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
        self, acceptableProtocols: Sequence[bytes] = DEFAULT_PROTOCOLS
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
        """
        protocols = tuple(acceptableProtocols)
        if not protocols or not all(
            isinstance(p, bytes) and 0 < len(p) < 256 for p in protocols
        ):
            raise ValueError(f"invalid ALPN protocol list: {acceptableProtocols!r}")
        return _ServerConnectionCreator(self, protocols)

    def _connectionFor(self, protocols: tuple[bytes, ...]) -> SSL.Connection:
        connection = _ServerConnection(self._frontContext(), None)
        if protocols != DEFAULT_PROTOCOLS:
            connection.acceptableProtocols = protocols
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

    def _makeContext(self, entry: CertificateEntry, policy: _Policy) -> SSL.Context:
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
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            if policy.ticketLifetime > 0:
                # RFC 8446 §4.6.1 ticket_lifetime / RFC 5077 lifetime hint.
                context.set_timeout(max(1, int(policy.ticketLifetime)))
            _setGroups(context)
            context.set_tls13_ciphersuites(_TLS13_SUITES)
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
            context = self.lookup(connection.get_servername())
            if context is not None:
                connection.set_context(context)
        except Exception:
            self.log.failure("while selecting the TLS context for an SNI name")

    def _selectProtocol(
        self, connection: SSL.Connection, offered: list[bytes]
    ) -> bytes | object:
        """
        The ALPN select callback: the listener's protocols narrowed by what
        the wrapped factory speaks, in server preference order.

        With no overlap the handshake goes on without ALPN (what nginx does)
        rather than with the fatal alert of RFC 7301 §3.2: pyOpenSSL has no
        way to send that alert except by raising inside the callback, which
        Twisted would then see as an unexpected exception.
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


class _ServerConnection(SSL.Connection):
    """
    A server connection that carries its listener's ALPN protocols for
    L{CertificateStore._selectProtocol}, and does not keep its memory BIOs'
    buffers while it has nothing to buffer.

    ALPN: on the connection itself rather than in a weak-keyed map beside
    the store: the map's weak reference and entry cost about 250 bytes for
    as long as a connection lives, idle or not (R4, docs/performance.rst
    Run 6); the attribute is one slot in a dictionary the connection already
    has, and is set only when a listener narrows the default list.

    BIOs: OpenSSL's memory BIO never shrinks: once a 16 KiB write
    (C{TLSMemoryBIOProtocol} hands OpenSSL 16 KiB at a time) has passed
    through the send BIO, it keeps about 22 KiB allocated for the rest of the
    connection's life, and the receive BIO keeps the size of the largest
    burst read (the ClientHello at least).  C{SSL_MODE_RELEASE_BUFFERS} frees
    OpenSSL's own record buffers when idle, not these.  So once
    L{edgeproxy.tls.transport.RELEASE_AFTER} bytes went through a BIO and it
    is empty again, it is swapped for a fresh one (C{SSL_set_bio} frees the
    old one): about 2 KiB less per idle connection after one small response,
    22 KiB less after a large one; the cost is one C{BIO_new} per 512 bytes
    at most, well under a microsecond.  pyOpenSSL reads C{_into_ssl}/C{_from_ssl} on every call,
    so rebinding them is all it needs; nothing is swapped once the receive
    side has been shut down (C{bio_shutdown} marks that BIO at EOF).
    C{tests.test_tls_store} checks the bytes still flow after swaps.
    """

    acceptableProtocols: tuple[bytes, ...] = DEFAULT_PROTOCOLS
    """ALPN protocols offered, in preference order."""

    _sentThrough = 0
    _receivedThrough = 0
    _receiveShutDown = False

    def bio_read(self, bufsiz: int) -> bytes:
        data = super().bio_read(bufsiz)
        _releaseDrained(self, (data,))
        return data

    def bio_write(self, buf: bytes) -> int:
        written = super().bio_write(buf)
        self._receivedThrough += written
        return written

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        try:
            return super().recv(bufsiz, flags)
        except SSL.WantReadError:
            # Everything written into the receive BIO has been consumed.
            _releaseDrainedReceive(self)
            raise

    def bio_shutdown(self) -> None:
        self._receiveShutDown = True
        super().bio_shutdown()


@implementer(IOpenSSLServerConnectionCreator)
class _ServerConnectionCreator:
    """
    One listener's view of a L{CertificateStore}: the store's current
    contexts, this listener's ALPN protocols.
    """

    def __init__(self, store: CertificateStore, protocols: tuple[bytes, ...]) -> None:
        self._store = store
        self.acceptableProtocols = protocols
        """ALPN protocols offered, in preference order."""

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        # Called by every server TLS transport as it connects: the one place
        # that sees them all, to give them the faster write path.
        adopt(tlsProtocol)
        return self._store._connectionFor(self.acceptableProtocols)
