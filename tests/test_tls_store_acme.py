"""
L{edgeproxy.tls.store.CertificateStore} and ACME: managed certificates
joining the snapshot (and surviving reloads), TLS-ALPN-01 challenge
contexts given only to validation handshakes, and the on-demand gate that
holds a ClientHello until the hook says go.  In memory (iosim).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from edgeproxy.acme.challenges import ACME_TLS_1, tlsALPN01Certificate
from edgeproxy.config.model import Listener
from edgeproxy.security.listening import ClientAuth
from edgeproxy.tls.certs import loadEntry

from .certutil import CertificateAuthority, IssuedCertificate
from .fastpaths import fastPaths  # noqa: F401 (fixture)
from .test_tls_store import Sites, served, sites  # noqa: F401 (fixture)
from .tlsutil import InsecureClientCreator, connectTLS, handshake


@implementer(IOpenSSLClientConnectionCreator)
class SeeingClient:
    """A client that trusts anything and remembers the certificate it was
    shown and the protocol negotiated (the connection may be gone by the
    time the test looks)."""

    def __init__(self, sni: str, alpn: list[bytes], certificate: IssuedCertificate | None = None) -> None:
        self.commonNames: list[str] = []
        self.protocols: list[bytes | None] = []
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_verify(SSL.VERIFY_PEER, self._verify)
        context.set_info_callback(self._info)
        context.set_alpn_protos(alpn)
        if certificate is not None:
            context.use_certificate(certificate.certificate)
            context.use_privatekey(certificate.key)
        self._context = context
        self._sni = sni.encode()

    def _verify(self, connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
        if depth == 0:
            from cryptography.x509.oid import NameOID

            name = certificate.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            if name not in self.commonNames:
                # OpenSSL asks again for each verification error.
                self.commonNames.append(name)
        return True

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            self.protocols.append(connection.get_alpn_proto_negotiated() or None)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_tlsext_host_name(self._sni)
        return connection


def managedEntry(sites: Sites, tmp_path: Path, name: str) -> object:
    issued = sites.ca.issue([name])
    path = issued.writePEM(tmp_path / f"{name}.pem")
    return replace(loadEntry(str(path), None, sites.clock.seconds()), source="acme")


def test_managedJoinTheSnapshot(sites: Sites, tmp_path: Path) -> None:
    """
    New handshakes get the managed certificate; a connection made before
    the swap carries on; a reload of the files keeps the managed ones; an
    entry already served keeps its context.
    """
    store = sites.store()
    creator = store.serverConnectionCreator()
    before = handshake(creator, "a.example", sites.ca.certificatePEM)
    assert served(store, "new.example") == "default.example"
    entry = managedEntry(sites, tmp_path, "new.example")
    swapped: list[object] = []
    store.listeners.append(swapped.append)
    certificates = store.setManaged([entry])  # type: ignore[list-item]
    assert swapped == [certificates]
    assert served(store, "new.example") == "new.example"
    assert [e.source for e in store.current.entries if "new.example" in e.names] == ["acme"]
    before.send(b"still here")
    assert before.clientApp.received == b"still here"
    context = store._snapshot.contexts["new.example"]  # type: ignore[union-attr]
    other = managedEntry(sites, tmp_path, "other.example")
    store.setManaged([entry, other])  # type: ignore[list-item]
    assert store._snapshot.contexts["new.example"] is context  # type: ignore[union-attr]
    store.reload()
    assert served(store, "other.example") == "other.example"
    store.setManaged([])
    assert served(store, "new.example") == "default.example"


def test_tlsALPN01OnlyForValidation(sites: Sites, fastPaths: bool) -> None:
    """
    RFC 8737 §3: a ClientHello offering only acme-tls/1 for a name with a
    pending challenge gets the challenge certificate (Pebble checks the
    acme-tls/1 it negotiates: tests/integration/test_acme.py)
    and is closed after the handshake; a client also offering h2, or
    asking for another name, never sees it.
    """
    store = sites.store()
    challenge = tlsALPN01Certificate("a.example", "token.thumbprint")
    store.setChallenges({"a.example": challenge})
    creator = store.serverConnectionCreator()

    validator = SeeingClient("a.example", [ACME_TLS_1])
    validation = connectTLS(creator, validator)
    assert validator.commonNames == ["ACME challenge"]
    assert validation.clientApp.lost is not None  # closed once the handshake was done

    browser = connectTLS(creator, InsecureClientCreator("a.example", alpn=[b"h2", ACME_TLS_1]))
    assert browser.established and browser.commonNames == ["a.example"]
    plain = connectTLS(creator, InsecureClientCreator("a.example"))
    assert plain.established and plain.commonNames == ["a.example"]
    otherName = SeeingClient("www.a.example", [ACME_TLS_1])
    connectTLS(creator, otherName)
    assert otherName.commonNames == ["a.example"]  # its own certificate, not the challenge's

    store.setChallenges({})
    after = SeeingClient("a.example", [ACME_TLS_1])
    connectTLS(creator, after)
    assert after.commonNames == ["a.example"]


def test_tlsALPN01OnAListenerRequiringClientCertificates(sites: Sites, tmp_path: Path, fastPaths: bool) -> None:
    """
    A listener with C{client_ca} and C{client_certificates = require}: the
    validation (acme-tls/1 only, no client certificate, as a CA sends it)
    gets the challenge certificate, negotiates acme-tls/1 and is closed;
    every other client still gets the name's own certificate and must
    present one of its own.
    """
    clients = CertificateAuthority("client CA")
    clients.writeCertificate(tmp_path / "clients.pem")
    member = clients.issue(["ann.example"], clientAuth=True)
    listener = Listener("tls", "tcp:0", True, client_ca=str(tmp_path / "clients.pem"), client_certificates="require")
    store = sites.store()
    store.setChallenges({"a.example": tlsALPN01Certificate("a.example", "token.thumbprint")})
    creator = store.serverConnectionCreator(clientAuth=ClientAuth(listener, lambda: None))

    validator = SeeingClient("a.example", [ACME_TLS_1])
    validation = connectTLS(creator, validator)
    assert validator.commonNames == ["ACME challenge"]
    assert validator.protocols == [ACME_TLS_1]
    assert validation.clientApp.lost is not None  # closed once the handshake was done

    # Everyone else: the name's certificate, and a client certificate required.
    stranger = connectTLS(creator, InsecureClientCreator("a.example"))
    assert not stranger.established
    assert "certificate required" in str(stranger.clientApp.lost.value)  # type: ignore[union-attr]
    browser = SeeingClient("a.example", [b"h2", ACME_TLS_1], certificate=member)
    withCertificate = connectTLS(creator, browser)
    assert withCertificate.established and browser.commonNames == ["a.example"]
    assert browser.protocols == [b"h2"]
    otherName = SeeingClient("www.a.example", [ACME_TLS_1])
    other = connectTLS(creator, otherName)
    assert otherName.commonNames == ["a.example"] and not other.established


def test_onDemandHoldsTheHandshake(sites: Sites, tmp_path: Path, fastPaths: bool) -> None:
    """
    The hook sees the SNI name before OpenSSL does; the handshake waits
    for its Deferred and then gets the certificate swapped in meanwhile.
    """
    store = sites.store()
    asked: list[str | None] = []
    waiting: Deferred[None] = Deferred()

    def hook(name: str | None) -> Deferred[None] | None:
        asked.append(name)
        return waiting if name == "new.example" else None

    store.onDemand = hook
    creator = store.serverConnectionCreator()
    held = connectTLS(creator, InsecureClientCreator("new.example"))
    assert asked == ["new.example"]
    assert held.peerCertificate is None  # nothing sent yet
    store.setManaged([managedEntry(sites, tmp_path, "new.example")])  # type: ignore[list-item]
    waiting.callback(None)
    held.pump.flush()
    assert held.established and held.commonNames == ["new.example"]
    # Names that need no wait go on at once.
    assert served(store, "a.example") == "a.example"
    assert asked == ["new.example", "a.example"]
