"""
Tests for L{edgeproxy.tls.client}: in-memory handshakes between the
creator the proxy uses for a backend and a backend TLS server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.ssl import Certificate, CertificateOptions

from edgeproxy.config.model import Server, Upstream
from edgeproxy.errors import CertificateError
from edgeproxy.tls.client import loadUpstreamTLS

from .certutil import CertificateAuthority, IssuedCertificate
from .fastpaths import SHOW_DEPRECATIONS
from .tlsutil import RecordingProtocol, connectTLS

# edgeproxy.tls.client uses a private Twisted name (through
# edgeproxy._compat.twisted): its deprecation warnings stay visible here.
pytestmark = SHOW_DEPRECATIONS


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("backend root")


@pytest.fixture(scope="module")
def backend(ca: CertificateAuthority) -> IssuedCertificate:
    return ca.intermediate("backend intermediate").issue(["origin.internal", "10.0.0.7", "::1"])


def _server(issued: IssuedCertificate, clientCA: CertificateAuthority | None = None) -> Any:
    """
    A backend: its certificate and chain, optionally requiring a client
    certificate issued by C{clientCA}.  It offers ALPN http/1.1 like a
    Twisted C{Site} would: a Twisted server with no ALPN protocols at all
    answers an ALPN-offering client with an empty selection, which OpenSSL 4
    turns into an internal_error alert (see L{test_twistedServerWithoutALPN}).
    """
    extra: dict[str, Any] = {"acceptableProtocols": [b"http/1.1"]}
    if clientCA is not None:
        extra["trustRoot"] = Certificate.loadPEM(clientCA.certificatePEM)
    return CertificateOptions(
        privateKey=issued.key,
        certificate=issued.certificate,
        extraCertChain=list(issued.chain),
        **extra,
    )


def _upstream(**kw: Any) -> Upstream:
    values: dict[str, Any] = dict(name="app", servers=(Server("origin.internal", 443),), tls=True)
    values.update(kw)
    return Upstream(**values)


def _ca(tmp_path: Path, ca: CertificateAuthority) -> str:
    return str(ca.writeCertificate(tmp_path / "ca.pem"))


class SNIRecorder(RecordingProtocol):
    pass


def test_plainUpstream() -> None:
    assert loadUpstreamTLS(_upstream(tls=False)) is None


def test_goodCA(ca: CertificateAuthority, backend: IssuedCertificate, tmp_path: Path) -> None:
    tls = loadUpstreamTLS(_upstream(ca=_ca(tmp_path, ca)))
    assert tls is not None and not tls.insecure
    connection = connectTLS(_server(backend), tls.creatorFor(Server("origin.internal", 443)))
    assert connection.established, connection.clientApp.lost
    assert connection.serverName == b"origin.internal"
    assert connection.negotiatedProtocol == b"http/1.1"
    assert connection.tlsVersion in {"TLSv1.2", "TLSv1.3"}


def test_twistedServerWithoutALPN(backend: IssuedCertificate) -> None:
    """
    Documents a trap for whoever writes test backends: Twisted's ALPN
    callback returns C{b""} when it has nothing to offer, and OpenSSL 4
    fails the handshake.  If this starts passing, the workaround in
    L{_server} can go.
    """
    server = CertificateOptions(privateKey=backend.key, certificate=backend.certificate)
    client = CertificateOptions(acceptableProtocols=[b"http/1.1"])
    connection = connectTLS(server, client)
    assert "internal error" in str(connection.clientApp.lost.value)  # type: ignore[union-attr]


def test_alpnHttp11Only(ca: CertificateAuthority, backend: IssuedCertificate, tmp_path: Path) -> None:
    tls = loadUpstreamTLS(_upstream(ca=_ca(tmp_path, ca)))
    assert tls is not None
    server = CertificateOptions(
        privateKey=backend.key,
        certificate=backend.certificate,
        extraCertChain=list(backend.chain),
        acceptableProtocols=[b"h2", b"http/1.1"],
    )
    connection = connectTLS(server, tls.creatorFor(Server("origin.internal", 443)))
    assert connection.negotiatedProtocol == b"http/1.1"


def test_wrongCA(backend: IssuedCertificate, tmp_path: Path) -> None:
    tls = loadUpstreamTLS(_upstream(ca=_ca(tmp_path, CertificateAuthority("other root"))))
    assert tls is not None
    connection = connectTLS(_server(backend), tls.creatorFor(Server("origin.internal", 443)))
    assert not connection.established
    assert "certificate verify failed" in str(connection.clientApp.lost.value)  # type: ignore[union-attr]


def test_wrongName(ca: CertificateAuthority, backend: IssuedCertificate, tmp_path: Path) -> None:
    tls = loadUpstreamTLS(_upstream(ca=_ca(tmp_path, ca), servers=(Server("api.internal", 443),)))
    assert tls is not None
    connection = connectTLS(_server(backend), tls.creatorFor(Server("api.internal", 443)))
    assert not connection.established
    assert "api.internal" in repr(connection.clientApp.lost.value)  # type: ignore[union-attr]


def test_serverNameDiffersFromAddress(
    ca: CertificateAuthority, backend: IssuedCertificate, tmp_path: Path
) -> None:
    """
    Dialling an address, verifying (and sending as SNI) the configured
    C{server_name}.
    """
    server = Server("192.0.2.10", 8443)
    tls = loadUpstreamTLS(
        _upstream(ca=_ca(tmp_path, ca), servers=(server,), server_name="origin.internal")
    )
    assert tls is not None
    connection = connectTLS(_server(backend), tls.creatorFor(server))
    assert connection.established, connection.clientApp.lost
    assert connection.serverName == b"origin.internal"


@pytest.mark.parametrize("host, ok", [("10.0.0.7", True), ("::1", True), ("10.0.0.8", False)])
def test_ipLiteral(
    ca: CertificateAuthority, backend: IssuedCertificate, tmp_path: Path, host: str, ok: bool
) -> None:
    """No SNI for an IP literal (RFC 6066 §3), but its IP SAN is verified."""
    server = Server(host, 443)
    tls = loadUpstreamTLS(_upstream(ca=_ca(tmp_path, ca), servers=(server,)))
    assert tls is not None
    connection = connectTLS(_server(backend), tls.creatorFor(server))
    assert connection.established is ok
    if ok:
        assert connection.serverName is None


def test_mutualTLS(ca: CertificateAuthority, backend: IssuedCertificate, tmp_path: Path) -> None:
    clientCA = CertificateAuthority("edge clients")
    clientIssuer = clientCA.intermediate("edge clients intermediate")
    presented = clientIssuer.issue(["edge-client"], clientAuth=True)
    path = presented.writePEM(tmp_path / "edge-client.pem", order="key-last")
    tls = loadUpstreamTLS(_upstream(ca=_ca(tmp_path, ca), client_certificate=str(path)))
    assert tls is not None
    connection = connectTLS(_server(backend, clientCA=clientCA), tls.creatorFor(Server("origin.internal", 443)))
    assert connection.established, connection.clientApp.lost
    assert connection.serverSawClientCertificate == presented.certificate

    without = loadUpstreamTLS(_upstream(ca=_ca(tmp_path, ca)))
    assert without is not None
    refused = connectTLS(_server(backend, clientCA=clientCA), without.creatorFor(Server("origin.internal", 443)))
    refused.send(b"GET / HTTP/1.1\r\n\r\n")  # TLS 1.3: the refusal comes after the client's Finished
    assert refused.clientApp.lost is not None


def test_insecureAcceptsAnything(backend: IssuedCertificate) -> None:
    stranger = CertificateAuthority("nobody trusts me").issue(["elsewhere.example"])
    tls = loadUpstreamTLS(_upstream(insecure=True, ca=None))
    assert tls is not None and tls.insecure
    connection = connectTLS(_server(stranger), tls.creatorFor(Server("origin.internal", 443)))
    assert connection.established, connection.clientApp.lost
    assert connection.serverName == b"origin.internal"  # SNI still sent
    ip = connectTLS(_server(stranger), tls.creatorFor(Server("10.1.2.3", 443)))
    assert ip.established and ip.serverName is None


def test_creatorsCachedPerServer(ca: CertificateAuthority, tmp_path: Path) -> None:
    one, two = Server("a.internal", 443), Server("b.internal", 443)
    tls = loadUpstreamTLS(_upstream(ca=_ca(tmp_path, ca), servers=(one, two)))
    assert tls is not None
    assert tls.creatorFor(one) is tls.creatorFor(Server("a.internal", 443))
    assert tls.creatorFor(one) is not tls.creatorFor(two)


def test_platformTrustWhenNoCA(backend: IssuedCertificate) -> None:
    """Without C{ca} the system store is used: our private root is not in it."""
    tls = loadUpstreamTLS(_upstream())
    assert tls is not None
    connection = connectTLS(_server(backend), tls.creatorFor(Server("origin.internal", 443)))
    assert not connection.established


# Bad files


def test_unreadableCA(tmp_path: Path) -> None:
    with pytest.raises(CertificateError) as info:
        loadUpstreamTLS(_upstream(ca=str(tmp_path / "missing.pem")))
    assert (info.value.section, info.value.key) == ("upstream:app", "ca")
    assert info.value.file == str(tmp_path / "missing.pem")


def test_caWithKeyOrGarbage(ca: CertificateAuthority, tmp_path: Path) -> None:
    withKey = ca.issue(["x.example"]).writePEM(tmp_path / "bundle.pem")
    with pytest.raises(CertificateError) as info:
        loadUpstreamTLS(_upstream(ca=str(withKey)))
    assert "private key" in info.value.message
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not pem")
    with pytest.raises(CertificateError) as info:
        loadUpstreamTLS(_upstream(ca=str(garbage)))
    assert info.value.key == "ca"


def test_badClientCertificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    onlyCert = ca.writeCertificate(tmp_path / "cert-only.pem")
    with pytest.raises(CertificateError) as info:
        loadUpstreamTLS(_upstream(client_certificate=str(onlyCert)))
    assert (info.value.section, info.value.key, info.value.file) == (
        "upstream:app",
        "client_certificate",
        str(onlyCert),
    )
    assert "no private key" in info.value.message
