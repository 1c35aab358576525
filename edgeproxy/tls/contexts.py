# -*- test-case-name: tests.test_tls_store,tests.test_tls_store_acme -*-
"""
How the OpenSSL contexts of a L{edgeproxy.tls.store.CertificateStore} are
built, and the values that hold them.

This module owns the TLS policy every context of a store shares
(L{Policy}: minimum version, ticket lifetime; the cipher suites, the key
exchange groups, the session id context), L{makeContext} (one certificate
entry's context, with the store's callbacks), the TLS-ALPN-01 challenge
contexts (L{challengeContext}, RFC 8737), the ALPN select callback
(L{selectProtocol}), and the values a load builds (L{Snapshot},
L{Front}).

Why contexts are built here rather than by C{CertificateOptions}:
pyOpenSSL refuses to change a context once a connection used it, and
C{CertificateOptions.getContext} sets the cipher list (which creates a
connection) before we could install our own ALPN and servername callbacks.
Building the few settings ourselves keeps every knob in one function,
L{makeContext}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger

from edgeproxy._compat.pyopenssl import setGroupsList
from edgeproxy.config.model import TLSSettings, TLSVersion
from edgeproxy.errors import CertificateError
from edgeproxy.tls.certs import CertificateEntry, CertificateSet

# The store's namespace, as for its other lines: a failing callback of a
# handshake is the store's to report, whichever module holds it.
log = Logger(namespace="edgeproxy.tls.store.CertificateStore")

DEFAULT_PROTOCOLS: tuple[bytes, ...] = (b"h2", b"http/1.1")
"""ALPN protocols offered by default, in server preference order."""

ACME_TLS_1 = b"acme-tls/1"
"""RFC 8737 §6.2: the ALPN protocol of TLS-ALPN-01 validation."""


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
    # Reported by makeContext like any other OpenSSL refusal.
    raise SSL.Error([("edgeproxy", "_setGroups", "no supported key exchange group")])


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings every context of a store shares (not the certificates)."""

    minVersion: TLSVersion
    ticketLifetime: float
    """Seconds; 0 or less disables session tickets."""

    @classmethod
    def fromSettings(cls, settings: TLSSettings) -> Policy:
        return cls(settings.min_version, settings.session_ticket_rotation)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one load of a store built: its certificates and their contexts."""

    certificates: CertificateSet
    contexts: dict[str, SSL.Context]
    """Served name (lower case, C{*.suffix} for wildcards) to context."""
    default: SSL.Context
    policy: Policy
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
class Front:
    """A context connections start on, holding the session ticket keys."""

    context: SSL.Context
    builtAt: float
    policy: Policy

    def outlived(self, policy: Policy, now: float) -> bool:
        """
        Whether connections must start on a new front: the protocol
        settings changed, or its session-ticket keys are as old as the
        ticket lifetime (the key rotation).
        """
        return self.policy != policy or (
            policy.ticketLifetime > 0 and now - self.builtAt >= policy.ticketLifetime
        )


def makeContext(
    entry: CertificateEntry,
    policy: Policy,
    selectContext: Callable[[SSL.Connection], None],
    staple: Callable[[SSL.Connection, Any], bytes] | None,
    clientAuth: Any = None,
    level: str = "",
) -> SSL.Context:
    """
    The context of one certificate entry under C{policy}.

    @param selectContext: the servername callback (the store's SNI lookup).
    @param staple: the OCSP server callback, or L{None} without stapling.
    @param clientAuth: a listener's client certificate policy
        (L{edgeproxy.security.listening.ClientAuth}) and the C{level} of
        the name, for the contexts asking for client certificates.
    @raise CertificateError: OpenSSL refused the certificate or key.
    """
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
        if staple is not None and _ocspURL(entry) is not None:
            # Read at each handshake that asks for it: a refreshed
            # response needs no new context.
            context.set_ocsp_server_callback(staple, entry)
        context.set_tlsext_servername_callback(selectContext)
        # selectProtocol returns bytes or SSL.NO_OVERLAPPING_PROTOCOLS, whose
        # class is private to pyOpenSSL (behind the _compat fence), so its
        # annotation can only say object.
        context.set_alpn_select_callback(selectProtocol)  # type: ignore[arg-type]
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


def _ocspURL(entry: CertificateEntry) -> str | None:
    from edgeproxy.tls.ocsp import responderURL

    return responderURL(entry.certificate)


def challengeContext(challenge: Any) -> SSL.Context:
    """
    The context of a pending TLS-ALPN-01 challenge (an object with
    C{certificatePEM} and C{keyPEM}, see
    L{edgeproxy.acme.challenges.TLSALPNChallenge}).
    """
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


def _selectACMEProtocol(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    # RFC 8737 §3: the validation is the handshake; the transport closes
    # the connection as soon as it is done (EdgeTLSTransport).
    connection.closeAfterHandshake = True  # type: ignore[attr-defined]
    return ACME_TLS_1


def selectProtocol(connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
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
        log.failure("while selecting the ALPN protocol")
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
