"""
Tests for L{edgeproxy.example_origin}: the page it serves (through a real
Site over a memory transport) and the TLS options it builds from one PEM.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.web.server import Site

from edgeproxy.example_origin import Options, ShowRequest, tlsOptions
from tests.certutil import CertificateAuthority


def test_pageListsTheHeadersEscaped() -> None:
    site = Site(ShowRequest("https", 9001), reactor=MemoryReactorClock())
    channel = site.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5))
    channel.makeConnection(transport)
    channel.dataReceived(
        b"GET /x?a=<b> HTTP/1.1\r\nHost: localhost\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Evil: <script>\r\n\r\n"
    )
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"<h1>edgeproxy is working</h1>" in response
    assert b"<tr><th>X-Forwarded-For</th><td>203.0.113.9</td></tr>" in response
    assert b"&lt;script&gt;" in response and b"<script>" not in response
    assert b"GET /x?a=&lt;b&gt; HTTP/1.1" in response


def test_tlsOptionsSendLeafAndIntermediate(tmp_path: Path) -> None:
    root = CertificateAuthority()
    intermediate = root.intermediate()
    leaf = intermediate.issue(["origin.internal"])
    path = leaf.writePEM(tmp_path / "origin.pem", order="key-last")
    options = tlsOptions(path.read_bytes())
    assert options.certificate == leaf.certificate
    assert options.extraCertChain == [intermediate.certificate]
    assert isinstance(options.getContext(), SSL.Context)


def test_tlsOptionsRefuseForeignKey(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    one, other = ca.issue(["a"]), ca.issue(["b"])
    with pytest.raises(ValueError, match="matches its private key"):
        tlsOptions(other.keyPEM + one.certificatePEM)


def test_optionsNeedCertOrPlain() -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--port", "9001"])
    options = Options()
    options.parseOptions(["--port", "9001", "--plain"])
    assert options["port"] == 9001 and options["plain"]
