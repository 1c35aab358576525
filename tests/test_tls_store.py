"""
Tests for L{edgeproxy.tls.store}: real handshakes in memory against the
store's connection creator, asserting on the certificate a client is served,
the ALPN protocol and TLS version it gets, and what survives a reload.
"""

from __future__ import annotations

import datetime
import time
import tracemalloc
from pathlib import Path

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web.resource import Resource
from twisted.web.server import Site

from edgeproxy._compat.pyopenssl import RELEASE_AFTER as _RELEASE_AFTER
from edgeproxy._compat.pyopenssl import _releaseDrainedSend as releaseDrainedSend
from edgeproxy.config.model import TLSSettings, TLSVersion
from edgeproxy.errors import CertificateError
from edgeproxy.tls.connections import CONNECTIONS
from edgeproxy.tls.store import CertificateStore

from .certutil import CertificateAuthority
from .fastpaths import SHOW_DEPRECATIONS, fastPaths
from .tlsutil import (
    InsecureClientCreator,
    LegacyClientCreator,
    ResumingCreator,
    clientCreator,
    connectTLS,
    handshake,
    memoryHandshake,
    pumpBIO,
)

BOTH = [b"h2", b"http/1.1"]

pytestmark = SHOW_DEPRECATIONS
__all__ = ["fastPaths"]  # the fixture, imported for the tests below


class Sites:
    """A certificate directory with an exact, a wildcard and a default."""

    def __init__(self, root: Path) -> None:
        self.ca = CertificateAuthority("store test root")
        self.directory = root / "live"
        self.directory.mkdir()
        self.intermediate = self.ca.intermediate("store test intermediate")
        self.exact = self.intermediate.issue(["a.example", "www.a.example"])
        self.exact.writePEM(self.directory / "a.pem")
        self.wildcard = self.ca.issue(["*.b.example"])
        self.wildcard.writePair(self.directory, "b")
        self.fallback = self.ca.issue(["default.example"])
        self.defaultPath = self.fallback.writePEM(self.directory / "default.pem", order="key-last")
        self.clock = Clock()
        self.clock.advance(time.time())

    def settings(self, **overrides: object) -> TLSSettings:
        values: dict[str, object] = dict(
            certificates=(str(self.directory),), default=str(self.defaultPath)
        )
        values.update(overrides)
        return TLSSettings(**values)  # type: ignore[arg-type]

    def store(self, **overrides: object) -> CertificateStore:
        store = CertificateStore(self.settings(**overrides), self.clock)
        store.load()
        return store


@pytest.fixture
def sites(tmp_path: Path) -> Sites:
    return Sites(tmp_path)


def served(store: CertificateStore, sni: str | None, **kw: object) -> str:
    """The common name of the certificate a non-verifying client gets."""
    connection = connectTLS(store.serverConnectionCreator(), InsecureClientCreator(sni, **kw))  # type: ignore[arg-type]
    assert connection.established, connection.clientApp.lost
    return connection.commonNames[0]


# Name selection


def test_exactNameVerifies(sites: Sites) -> None:
    """A verifying client gets the exact certificate with its intermediate."""
    store = sites.store()
    result = handshake(store.serverConnectionCreator(), "a.example", sites.ca.certificatePEM)
    assert result.established, result.clientApp.lost
    assert result.commonNames == ["a.example"]
    chain = result.client.getHandle().get_peer_cert_chain(as_cryptography=True)
    assert [c.subject for c in chain] == [
        sites.exact.certificate.subject,
        sites.intermediate.certificate.subject,
    ]


def test_secondNameOfSameCertificate(sites: Sites) -> None:
    assert served(sites.store(), "www.a.example") == "a.example"


def test_wildcard(sites: Sites) -> None:
    store = sites.store()
    result = handshake(store.serverConnectionCreator(), "x.b.example", sites.ca.certificatePEM)
    assert result.established and result.commonNames == ["*.b.example"]


@pytest.mark.parametrize("sni", ["y.x.b.example", "b.example"])
def test_wildcardCoversOneLabelOnly(sites: Sites, sni: str) -> None:
    """Not two labels deep, not the bare parent: those get the default."""
    assert served(sites.store(), sni) == "default.example"


@pytest.mark.parametrize("sni", ["unknown.example", None, "127.0.0.1"])
def test_unknownOrNoNameGetsDefault(sites: Sites, sni: str | None) -> None:
    assert served(sites.store(), sni) == "default.example"


def test_upperCaseName(sites: Sites) -> None:
    store = sites.store()
    assert served(store, "A.EXAMPLE") == "a.example"
    assert served(store, "X.B.Example") == "*.b.example"


def test_firstEntryIsDefaultWithoutSetting(sites: Sites) -> None:
    assert served(sites.store(default=None), "nothing.example") == "a.example"


def test_lookupNeverRaises(sites: Sites) -> None:
    store = CertificateStore(sites.settings(), sites.clock)
    assert store.lookup(b"a.example") is None  # not loaded yet
    store.load()
    default = store.lookup(None)
    assert default is not None
    assert store.lookup(b"\xff\xfe.example") is default
    assert store.lookup(b"") is default
    assert store.lookup(b"a.example.") is store.lookup(b"a.example") is not default


# ALPN, versions, ciphers


def test_alpnWithSite(sites: Sites) -> None:
    """
    Behind a C{Site}, a client offering both gets h2 on every certificate;
    one offering only http/1.1 gets http/1.1.
    """
    store = sites.store()
    creator = store.serverConnectionCreator()
    for sni in ["a.example", "x.b.example", "other.example"]:
        result = connectTLS(creator, InsecureClientCreator(sni, BOTH), serverFactory=Site(Resource()))
        assert result.negotiatedProtocol == b"h2", sni
    result = connectTLS(
        creator, InsecureClientCreator("a.example", [b"http/1.1"]), serverFactory=Site(Resource())
    )
    assert result.negotiatedProtocol == b"http/1.1"


def test_alpnHttp2Off(sites: Sites) -> None:
    """
    A listener with C{http2 = no} negotiates http/1.1 even though its Site
    could speak h2; a client offering only h2 gets the
    C{no_application_protocol} alert (RFC 7301 §3.2).
    """
    store = sites.store()
    creator = store.serverConnectionCreator(acceptableProtocols=[b"http/1.1"])
    result = connectTLS(creator, InsecureClientCreator("a.example", BOTH), serverFactory=Site(Resource()))
    assert result.negotiatedProtocol == b"http/1.1"
    result = connectTLS(creator, InsecureClientCreator("a.example", [b"h2"]), serverFactory=Site(Resource()))
    assert not result.established
    assert "no application protocol" in str(result.clientApp.lost.value).lower()
    # The other listener on the same store still offers h2.
    result = connectTLS(
        store.serverConnectionCreator(), InsecureClientCreator("a.example", BOTH), serverFactory=Site(Resource())
    )
    assert result.negotiatedProtocol == b"h2"


def test_noALPNOverlap(sites: Sites) -> None:
    """
    A client offering only protocols we do not speak gets the
    C{no_application_protocol} alert; one offering no ALPN at all gets
    HTTP/1.1 as before.
    """
    store = sites.store()
    creator = store.serverConnectionCreator()
    with capturedLogs() as events:
        result = connectTLS(
            creator, InsecureClientCreator("a.example", [b"spdy/3", b"h3"]), serverFactory=Site(Resource())
        )
    assert not result.established
    assert "no application protocol" in str(result.clientApp.lost.value).lower()
    assert not [e for e in events if e.get("log_failure") is not None]
    result = connectTLS(creator, InsecureClientCreator("a.example"), serverFactory=Site(Resource()))
    assert result.established and result.negotiatedProtocol is None


def test_invalidProtocolList(sites: Sites) -> None:
    with pytest.raises(ValueError):
        sites.store().serverConnectionCreator(acceptableProtocols=[])
    with pytest.raises(ValueError):
        sites.store().serverConnectionCreator(acceptableProtocols=["h2"])  # type: ignore[list-item]


@pytest.mark.parametrize("version", [SSL.TLS1_VERSION, SSL.TLS1_1_VERSION])
def test_oldTLSRefused(sites: Sites, version: int) -> None:
    result = connectTLS(sites.store().serverConnectionCreator(), LegacyClientCreator(version))
    assert not result.established
    # The server refused (RFC 8446 §4.2.1: protocol_version alert).
    assert "unsupported protocol" in str(result.serverApp.lost.value)  # type: ignore[union-attr]
    assert "alert protocol version" in str(result.clientApp.lost.value)  # type: ignore[union-attr]


def test_tls12Accepted(sites: Sites) -> None:
    result = connectTLS(sites.store().serverConnectionCreator(), LegacyClientCreator(SSL.TLS1_2_VERSION))
    assert result.established and result.tlsVersion == "TLSv1.2"
    assert result.client.getHandle().get_cipher_name().startswith("ECDHE-")


def test_minimumTLS13(sites: Sites) -> None:
    store = sites.store(min_version=TLSVersion.TLSv1_3)
    assert not connectTLS(store.serverConnectionCreator(), LegacyClientCreator(SSL.TLS1_2_VERSION)).established
    assert handshake(store.serverConnectionCreator(), "a.example", sites.ca.certificatePEM).tlsVersion == "TLSv1.3"


def test_cbcCiphersRefused(sites: Sites) -> None:
    """Mozilla intermediate: TLS 1.2 without AEAD is refused."""

    class CBCOnly(LegacyClientCreator):
        def __init__(self) -> None:
            super().__init__(SSL.TLS1_2_VERSION)
            self._context = SSL.Context(SSL.TLS_METHOD)
            self._context.set_max_proto_version(SSL.TLS1_2_VERSION)
            self._context.set_cipher_list(b"ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA")

    assert not connectTLS(sites.store().serverConnectionCreator(), CBCOnly()).established


def test_keyExchangeGroups(sites: Sites) -> None:
    """
    Key exchange uses one of the configured groups, and a client offering
    only secp521r1 is refused: C{_setGroups} reaches OpenSSL.
    """
    store = sites.store()
    result = connectTLS(store.serverConnectionCreator(), InsecureClientCreator("a.example"))
    assert result.client.getHandle().get_group_name() in {"X25519MLKEM768", "x25519"}

    class P521Only(LegacyClientCreator):
        def __init__(self) -> None:
            super().__init__(SSL.TLS1_2_VERSION)
            context = SSL.Context(SSL.TLS_METHOD)
            assert _lib.SSL_CTX_set1_curves_list(context._context, b"secp521r1") == 1
            self._context = context

    assert not connectTLS(store.serverConnectionCreator(), P521Only()).established


def test_noCompressionNoRenegotiation(sites: Sites) -> None:
    result = connectTLS(sites.store().serverConnectionCreator(), InsecureClientCreator("a.example"))
    options = _lib.SSL_get_options(result.server.getHandle()._ssl)
    assert options & SSL.OP_NO_COMPRESSION
    assert options & SSL.OP_NO_RENEGOTIATION


# Reload


def test_reloadSwapsForNextHandshakeOnly(sites: Sites) -> None:
    store = sites.store()
    creator = store.serverConnectionCreator()
    before = handshake(creator, "a.example", sites.ca.certificatePEM)
    assert before.established
    renewed = sites.ca.issue(["a.example", "new.a.example"])
    renewed.writePEM(sites.directory / "a.pem")

    loaded = store.reload()

    assert store.current is loaded
    assert sorted(loaded.byName()) == [
        "*.b.example", "a.example", "default.example", "new.a.example",
    ]
    after = handshake(creator, "new.a.example", sites.ca.certificatePEM)
    assert after.established
    assert after.peerCertificate == renewed.certificate
    # The connection opened before the reload still works, on its old certificate.
    before.send(b"still here")
    assert before.clientApp.received == b"still here"
    assert before.peerCertificate == sites.exact.certificate


def test_reloadChangesDefault(sites: Sites) -> None:
    store = sites.store()
    creator = store.serverConnectionCreator()
    store.reload(sites.settings(default=str(sites.directory / "b.crt")))
    assert connectTLS(creator, InsecureClientCreator(None)).commonNames == ["*.b.example"]


def _breakKey(sites: Sites) -> Path:
    path = sites.directory / "a.pem"
    path.write_bytes(sites.ca.issue(["x"]).keyPEM + sites.exact.certificatePEM)
    return path


def _expire(sites: Sites) -> Path:
    now = datetime.datetime.now(datetime.timezone.utc)
    return sites.ca.issue(
        ["a.example"], notBefore=now - datetime.timedelta(days=9), notAfter=now - datetime.timedelta(days=1)
    ).writePEM(sites.directory / "a.pem")


def _garbage(sites: Sites) -> Path:
    path = sites.directory / "a.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    return path


def _missing(sites: Sites) -> Path:
    path = sites.directory / "b.key"
    path.unlink()
    return sites.directory / "b.crt"


@pytest.mark.parametrize(
    "breakIt, message",
    [(_breakKey, "does not match"), (_expire, "expired"), (_garbage, "not a valid"), (_missing, "b.key")],
)
def test_badReloadKeepsOldSet(sites: Sites, breakIt, message: str) -> None:  # type: ignore[no-untyped-def]
    store = sites.store()
    creator = store.serverConnectionCreator()
    old = store.current
    culprit = breakIt(sites)

    with pytest.raises(CertificateError) as info:
        store.reload()

    assert info.value.file == str(culprit)
    assert message in info.value.message
    assert store.current is old
    result = handshake(creator, "a.example", sites.ca.certificatePEM)
    assert result.established and result.peerCertificate == sites.exact.certificate
    assert served(store, "x.b.example") == "*.b.example"


def test_badReloadKeepsOldSettings(sites: Sites, tmp_path: Path) -> None:
    store = sites.store()
    with pytest.raises(CertificateError) as info:
        store.reload(sites.settings(certificates=(str(tmp_path / "nowhere"),)))
    assert info.value.key == "certificates"
    store.reload()  # the old, good settings again
    assert served(store, "a.example") == "a.example"


# Expiry warnings


def test_expiryWarningAtLoadAndReload(sites: Sites) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    sites.ca.issue(["soon.example"], notAfter=now + datetime.timedelta(days=3)).writePEM(
        sites.directory / "soon.pem"
    )
    store = CertificateStore(sites.settings(expiry_warning=7 * 86400.0), sites.clock)
    with capturedLogs() as events:
        store.load()
    warnings = [e for e in events if e.get("path") == str(sites.directory / "soon.pem")]
    assert len(warnings) == 1
    assert warnings[0]["log_level"].name == "warn"
    assert warnings[0]["names"] == "soon.example"
    with capturedLogs() as events:
        store.reload(sites.settings(expiry_warning=86400.0))
    assert [e for e in events if "path" in e] == []


# Session resumption


def _resumes(store: CertificateStore, client: ResumingCreator, sites: Sites | None = None) -> bool:
    creator = store.serverConnectionCreator()
    first = connectTLS(creator, client)
    assert first.established
    first.send(b"ticket please")  # TLS 1.3 tickets arrive after the handshake
    client.session = first.session
    second = connectTLS(creator, client)
    assert second.established
    return second.resumed


@pytest.mark.parametrize("sni", ["a.example", "x.b.example", "unknown.example"])
def test_resumptionTLS13(sites: Sites, sni: str) -> None:
    store = sites.store()
    trusted = sni != "unknown.example"
    inner = clientCreator(sni, sites.ca.certificatePEM) if trusted else InsecureClientCreator(sni)
    assert _resumes(store, ResumingCreator(inner))


def test_resumptionTLS12(sites: Sites) -> None:
    store = sites.store()
    assert _resumes(store, ResumingCreator(LegacyClientCreator(SSL.TLS1_2_VERSION, "x.b.example")))


def test_ticketKeysRotate(sites: Sites) -> None:
    store = sites.store(session_ticket_rotation=600.0)
    client = ResumingCreator(clientCreator("a.example", sites.ca.certificatePEM))
    assert _resumes(store, client)
    sites.clock.advance(601)
    second = connectTLS(store.serverConnectionCreator(), client)
    assert second.established and not second.resumed


def test_resumptionAcrossReload(sites: Sites) -> None:
    """
    Ticket keys belong to the store, not to a snapshot: a certificate
    reload does not force every client into a full handshake.
    """
    store = sites.store()
    client = ResumingCreator(clientCreator("a.example", sites.ca.certificatePEM))
    creator = store.serverConnectionCreator()
    first = connectTLS(creator, client)
    first.send(b"x")
    client.session = first.session
    store.reload()
    assert connectTLS(creator, client).resumed


def test_ticketsOff(sites: Sites) -> None:
    store = sites.store(session_ticket_rotation=0.0)
    assert not _resumes(store, ResumingCreator(clientCreator("a.example", sites.ca.certificatePEM)))


def test_failedFirstLoad(sites: Sites) -> None:
    """A failed first load leaves nothing half-built to serve from."""
    _breakKey(sites)
    store = CertificateStore(sites.settings(), sites.clock)
    with pytest.raises(CertificateError) as info:
        store.load()
    assert info.value.file == str(sites.directory / "a.pem")
    assert store.lookup(b"x.b.example") is None
    with pytest.raises(RuntimeError):
        store.current


# Memory BIOs released once drained (R4)


def _drain(connection: SSL.Connection) -> bytes:
    received = b""
    while True:
        try:
            received += connection.recv(2**15)
        except SSL.WantReadError:
            return received


def test_bytesFlowAcrossBIOReplacement(sites: Sites, fastPaths: bool) -> None:
    """
    A server connection replaces its memory BIOs once large amounts went
    through them and they are empty (with the fast paths), and not one byte
    is lost, duplicated or reordered either way; after C{bio_shutdown} the
    end of the stream is still seen.
    """
    store = sites.store()
    server = store.serverConnectionCreator().serverConnectionForTLS(None)
    server.set_accept_state()
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client = SSL.Connection(context, None)
    client.set_tlsext_host_name(b"a.example")
    client.set_connect_state()
    memoryHandshake(client, server)
    sent = received = b""
    for size in (100, 700, 16384, 40000, 3, 16384, 5000):
        payload = bytes([size % 251]) * size
        # Server to client, 16 KiB at a time as TLSMemoryBIOProtocol writes.
        for start in range(0, size, 2**14):
            chunk = payload[start : start + 2**14]
            assert server.send(chunk) == len(chunk)
            pumpBIO(server, client)
        assert _drain(client) == payload
        # Client to server (send may take only part of it).
        rest = payload
        while rest:
            rest = rest[client.send(rest) :]
            pumpBIO(client, server)
            received += _drain(server)
        sent += payload
    assert received == sent
    if fastPaths:
        # Both BIOs were replaced after the last large transfer (the counts
        # start again from zero only then).
        assert server._sentThrough < _RELEASE_AFTER
        assert server._receivedThrough < _RELEASE_AFTER
    else:
        assert not hasattr(server, "_sentThrough")
    server.bio_shutdown()
    with pytest.raises(SSL.Error):
        server.recv(100)


def test_connectionsMadeTogetherGetNoDictionaryEach(sites: Sites) -> None:
    """
    Server connections made together (a proxy started into traffic), which
    all then count what goes through their BIOs, stay as compact as one made
    alone: the counts are slots.  They used to be attributes set after
    pyOpenSSL's eleven.  CPython 3.11 takes one place for new attribute
    names from a class's shared keys with each instance made, so when
    twenty or so connections had been accepted before the first counted a
    byte, the second count's name no longer fitted, and every connection
    from then on got a dictionary of its own: about 830 bytes for its life
    (RSS of a proxy given 2,000 TLS connections at once, 64 at a time: 24.9
    KiB each before, 24.2 after).  A class of its own here, so that what
    earlier tests did to the shared class does not decide the outcome.
    """
    counting = CONNECTIONS[(True, False)]  # what the fast paths make

    class Fresh(counting):  # type: ignore[misc,valid-type]
        pass

    context = sites.store().serverConnectionCreator().serverConnectionForTLS(None).get_context()
    connections = [Fresh(context, None) for _ in range(64)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for connection in connections:
            # What a handshake does first: bytes in, then records out.
            connection.bio_write(b"\x16\x03\x01")
            releaseDrainedSend(connection, (b"records",))
        perConnection = (tracemalloc.get_traced_memory()[0] - before) / len(connections)
    finally:
        tracemalloc.stop()
    assert perConnection < 100, perConnection
