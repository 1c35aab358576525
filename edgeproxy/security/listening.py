# -*- test-case-name: tests.integration.test_security_tls -*-
"""
The security settings of a C{[listen:NAME]}, where its port is built
(L{edgeproxy.serve.listeners}) and its requests are prepared
(L{edgeproxy.http.listener}): the PROXY protocol wrapper, and the client
certificate policy.

Client certificates.  A listener with C{client_ca} asks for a certificate
in the handshake; the I{level} of a name decides how:

  - C{require}: the handshake fails without a certificate the CA issued
    (every name of a C{client_certificates = require} listener, and the
    names of routes with C{require_client_certificate = yes} on any
    listener with C{client_ca});
  - C{request}: a certificate is asked for, verified when given, and the
    handshake goes on without one.

The level is chosen from the SNI name (the handshake happens before any
request).  A request whose C{Host} has another level than its
connection's SNI name gets C{421} (RFC 9110 15.5.20): a connection made
for a name that only requests certificates must not carry requests for a
name that requires one.  Sessions never cross levels or listeners: each
(CA, level) has its own session-ID context, and each listener's CA its own
session-ticket keys (L{edgeproxy.tls.clientcerts}); a session resumed under
another policy would carry a certificate that policy never verified.

The level is read from the current runtime's routes at each handshake:
a reload that changes routes changes it for new connections.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from OpenSSL import SSL

from edgeproxy.config.model import Config, Listener
from edgeproxy.pipeline.values import ClientCertificate
from edgeproxy.routing import normaliseHost
from edgeproxy.security.proxyprotocol import ProxyProtocolFactory

__all__ = ["ClientAuth", "certificateFacts", "clientAuthFor", "proxyProtocolFactory", "securityShape"]


def _digest(path: str | None) -> bytes:
    if path is None:
        return b""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).digest()
    except OSError:
        return b"unreadable"


def securityShape(listener: Listener) -> tuple[Any, ...]:
    """What of a listener's security settings needs its port opened again
    when it changes (the CA's contents included)."""
    return (
        listener.client_ca,
        _digest(listener.client_ca),
        listener.client_certificates,
        listener.proxy_protocol,
        listener.proxy_protocol_from,
    )


def proxyProtocolFactory(listener: Listener, factory: Any, site: Any, reactor: Any) -> ProxyProtocolFactory:
    return ProxyProtocolFactory(
        factory,
        listener.proxy_protocol_from,
        listener.limits.client_header_timeout,
        reactor,
        listener.name,
        getattr(site, "metrics", None),
    )


def requiringHosts(config: Config) -> tuple[frozenset[str], frozenset[str], bool]:
    """(exact names, wildcard suffixes, catch-all) of the routes with
    C{require_client_certificate = yes}."""
    exact: set[str] = set()
    suffixes: set[str] = set()
    anyHost = False
    for route in config.routes:
        if not route.require_client_certificate:
            continue
        for host in route.hosts:
            if host == "*":
                anyHost = True
            elif host.startswith("*."):
                suffixes.add(normaliseHost(host[2:]) or "")
            else:
                exact.add(normaliseHost(host) or "")
    return frozenset(exact), frozenset(suffixes), anyHost


class ClientAuth:
    """
    The client certificate policy of one listener (see the module
    docstring); what L{edgeproxy.tls.clientcerts} asks about a handshake.

    @ivar key: names the CA (its file's digest): contexts and ticket keys
        are kept per key.
    """

    def __init__(self, listener: Listener, currentConfig: Any) -> None:
        assert listener.client_ca is not None
        self.listener = listener
        self.currentConfig = currentConfig
        with open(listener.client_ca, "rb") as f:
            pem = f.read()
        self.key = hashlib.sha256(pem).hexdigest()[:16]
        self._cache: tuple[int, tuple[frozenset[str], frozenset[str], bool]] | None = None

    def _hosts(self) -> tuple[frozenset[str], frozenset[str], bool]:
        config = self.currentConfig()
        cached = self._cache
        if cached is None or cached[0] != id(config):
            cached = self._cache = (id(config), requiringHosts(config))
        return cached[1]

    def levelFor(self, name: bytes | str | None) -> str:
        """C{"require"} or C{"request"} for an SNI name or C{Host}."""
        if self.listener.client_certificates == "require":
            return "require"
        exact, suffixes, anyHost = self._hosts()
        if anyHost:
            return "require"
        host = normaliseHost(name) if name else ""
        if not host:
            return "request"
        if host in exact:
            return "require"
        parent = host.partition(".")[2]
        if parent and parent in suffixes:
            return "require"
        return "request"

    def misdirected(self, host: bytes, serverName: bytes | None) -> bool:
        """Whether a request for C{host} on a connection for C{serverName}
        must get 421 (their levels differ)."""
        return self.levelFor(host) != self.levelFor(serverName)

    def verifyMode(self, level: str) -> int:
        return verifyMode(level)

    def configure(self, context: SSL.Context, level: str) -> None:
        """Make C{context} ask for (and verify) client certificates at
        C{level}, with a session-ID context of its own."""
        assert self.listener.client_ca is not None
        context.load_verify_locations(self.listener.client_ca)
        # The names sent in the CertificateRequest: every certificate's
        # subject in the file (pyOpenSSL's X509Name, which set_client_ca_list
        # takes, is deprecated).
        context.load_client_ca(os.fsencode(self.listener.client_ca))
        context.set_verify(verifyMode(level))
        # RFC 5246 / 8446: resumption is refused across session-ID
        # contexts, so a session made at "request" is never resumed at
        # "require", nor one verified by another listener's CA.
        # At most 32 bytes (SSL_MAX_SID_CTX_LENGTH): "ep:<16 hex>:<level>".
        context.set_session_id(f"ep:{self.key}:{level}".encode("ascii"))


def verifyMode(level: str) -> int:
    mode = SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
    if level == "require":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    return mode


def clientAuthFor(listener: Listener, site: Any) -> ClientAuth | None:
    """
    The client certificate policy of C{listener} (L{None} without
    C{client_ca}); also given to its site, which checks C{Host} against
    the SNI name (421) and reads the certificate of each connection.
    """
    if listener.client_ca is None:
        if site is not None:
            site.clientAuth = None
        return None

    def currentConfig() -> Config:
        return site.currentRuntime().config

    auth = ClientAuth(listener, currentConfig)
    if site is not None:
        site.clientAuth = auth
    return auth


def certificateFacts(handle: Any) -> ClientCertificate | None:
    """
    The verified client certificate of a TLS connection (an
    C{SSL.Connection} whose handshake is done), or L{None}.  With
    verification on, a certificate that is there is one the CA issued
    (the handshake fails otherwise; a resumed session carries the one
    verified when it was made, under the same policy).
    """
    try:
        peer = handle.get_peer_certificate(as_cryptography=True)
    except TypeError:
        peer = handle.get_peer_certificate()
        peer = None if peer is None else peer.to_cryptography()
    except Exception:
        return None
    if peer is None:
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    names: list[str] = []
    try:
        san = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for entry in san:
            if isinstance(entry, x509.DNSName):
                names.append(f"DNS:{entry.value}")
            elif isinstance(entry, x509.RFC822Name):
                names.append(f"email:{entry.value}")
            elif isinstance(entry, x509.UniformResourceIdentifier):
                names.append(f"URI:{entry.value}")
            elif isinstance(entry, x509.IPAddress):
                names.append(f"IP:{entry.value}")
    fingerprint = hashlib.sha256(peer.public_bytes(Encoding.DER)).hexdigest()
    return ClientCertificate(peer.subject.rfc4514_string(), tuple(names), fingerprint)
