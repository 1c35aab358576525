# -*- test-case-name: tests.test_tls_client -*-
"""
TLS from the proxy to its backends.

L{loadUpstreamTLS} reads an upstream's C{ca} and C{client_certificate} once
(at configuration load) and L{UpstreamTLS.creatorFor} hands out one client
connection creator per backend server, built on first use and cached.  A
creator verifies the backend certificate against the upstream's CA (or the
platform store) and its name with C{service_identity}: the upstream's
C{server_name} when set, else the server's own host.  The same name is sent
as SNI, except for IP literals (RFC 6066 §3 forbids them in SNI), whose IP
address subject alternative name is verified instead.  Only HTTP/1.1 is
offered over ALPN: Twisted has no HTTP/2 client.

C{insecure = yes} turns verification off entirely (SNI is still sent so that
name-based backends pick the right certificate); L{UpstreamTLS.insecure}
lets the service warn about it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from zope.interface import implementer

from edgeproxy._compat.twisted import IOpenSSLTrustRoot  # not re-exported by twisted.internet.ssl
from edgeproxy.config.model import Server, Upstream
from edgeproxy.tls.certs import (
    CertificateEntry,
    loadEntry,
    readCertificates,
)
from edgeproxy.tls.layout import pairedKeyPath

UPSTREAM_PROTOCOLS: tuple[bytes, ...] = (b"http/1.1",)
"""ALPN offered to backends."""


def _isIPLiteral(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class UpstreamTLS:
    """
    The TLS settings of one upstream, loaded and checked; a factory of
    per-server client connection creators.
    """

    upstream: Upstream
    trustRoot: IOpenSSLTrustRoot | None
    """L{None} when C{insecure} (nothing is verified)."""
    clientCertificate: CertificateEntry | None = None
    _creators: dict[tuple[str, int], IOpenSSLClientConnectionCreator] = field(
        default_factory=dict, repr=False
    )

    @property
    def insecure(self) -> bool:
        """Whether backend certificates go unverified."""
        return self.upstream.insecure

    def serverNameFor(self, server: Server) -> str:
        """The name verified in (and, unless an IP literal, sent as SNI to)
        C{server}."""
        return self.upstream.server_name or server.host

    def creatorFor(self, server: Server) -> IOpenSSLClientConnectionCreator:
        """
        The client connection creator for one backend, built once.

        @param server: one of the upstream's servers.
        """
        key = (server.host, server.port)
        creator = self._creators.get(key)
        if creator is None:
            creator = self._creators[key] = self._makeCreator(self.serverNameFor(server))
        return creator

    def _certificateOptions(self) -> dict[str, Any]:
        options: dict[str, Any] = {"raiseMinimumTo": TLSVersion.TLSv1_2}
        if self.clientCertificate is not None:
            entry = self.clientCertificate
            options.update(
                privateKey=entry.key,
                certificate=entry.certificate,
                extraCertChain=list(entry.chain),
            )
        return options

    def _makeCreator(self, name: str) -> IOpenSSLClientConnectionCreator:
        if self.trustRoot is None:
            return _UnverifiedCreator(
                CertificateOptions(
                    acceptableProtocols=list(UPSTREAM_PROTOCOLS),
                    **self._certificateOptions(),
                ),
                None if _isIPLiteral(name) else name,
            )
        return optionsForClientTLS(
            name,
            trustRoot=self.trustRoot,
            acceptableProtocols=list(UPSTREAM_PROTOCOLS),
            extraCertificateOptions=self._certificateOptions(),
        )


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """
    C{insecure = yes}: no chain or name verification, but SNI and the client
    certificate are still sent.
    """

    def __init__(self, options: CertificateOptions, serverName: str | None) -> None:
        self._options = options
        self._serverName = (
            serverName.encode("idna") if serverName is not None else None
        )

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._serverName is not None:
            connection.set_tlsext_host_name(self._serverName)
        return connection


def loadUpstreamTLS(upstream: Upstream) -> UpstreamTLS | None:
    """
    Read the TLS files of C{upstream}.

    @return: L{None} when the upstream speaks plain HTTP.
    @raise CertificateError: with C{section="upstream:NAME"} and
        C{key="ca"} or C{key="client_certificate"}, naming the file, when a
        file is unreadable or invalid (a client certificate must also be
        within its validity period and match its key).
    """
    if not upstream.tls:
        return None
    section = f"upstream:{upstream.name}"
    trustRoot: IOpenSSLTrustRoot | None
    if upstream.insecure:
        trustRoot = None
    elif upstream.ca is not None:
        certificates = readCertificates(upstream.ca, section=section, key="ca")
        trustRoot = trustRootFromCertificates(
            [
                Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
                for c in certificates
            ]
        )
    else:
        trustRoot = platformTrust()
    clientCertificate = None
    if upstream.client_certificate is not None:
        clientCertificate = loadEntry(
            upstream.client_certificate,
            pairedKeyPath(upstream.client_certificate),
            section=section,
            key="client_certificate",
            requireNames=False,
        )
    return UpstreamTLS(upstream, trustRoot, clientCertificate)


__all__ = ["UpstreamTLS", "loadUpstreamTLS", "UPSTREAM_PROTOCOLS"]
