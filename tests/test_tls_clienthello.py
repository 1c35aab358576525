"""
L{edgeproxy.tls.clienthello}: the SNI name and ALPN list of real
ClientHellos (made by the ssl module, TLS 1.2 and 1.3 clients), whole, cut
anywhere, split across records, and bytes that are not a ClientHello.
"""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.tls.clienthello import NEED_MORE, NOT_A_CLIENT_HELLO, ClientHello, parseClientHello


def clientHello(name: str | None, alpn: list[str] | None = None, maximum: ssl.TLSVersion | None = None) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.maximum_version = maximum
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


HELLO = clientHello("App.Example", ["acme-tls/1"])


def test_nameAndProtocols() -> None:
    assert parseClientHello(HELLO) == ClientHello("app.example", (b"acme-tls/1",))
    assert parseClientHello(clientHello("a.example", ["h2", "http/1.1"], ssl.TLSVersion.TLSv1_2)) == ClientHello(
        "a.example", (b"h2", b"http/1.1")
    )
    assert parseClientHello(clientHello(None)) == ClientHello(None, ())


def test_everyCutNeedsMore() -> None:
    for end in range(1, len(HELLO)):
        assert parseClientHello(HELLO[:end]) is NEED_MORE, end
    assert parseClientHello(HELLO + b"more") == ClientHello("app.example", (b"acme-tls/1",))


def test_splitAcrossRecords() -> None:
    """RFC 8446 §5.1: a handshake message may be fragmented over records."""
    body = HELLO[5:]
    split = 40
    records = b"".join(
        bytes([22, 3, 1]) + struct.pack("!H", len(part)) + part for part in (body[:split], body[split:])
    )
    assert parseClientHello(records) == ClientHello("app.example", (b"acme-tls/1",))


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x16\x02\x00\x00\x05hello", b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"])
def test_notAClientHello(data: bytes) -> None:
    assert parseClientHello(data) is NOT_A_CLIENT_HELLO


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_neverRaises(data: bytes) -> None:
    result = parseClientHello(bytes([22, 3, 1]) + data)
    assert result is NEED_MORE or result is NOT_A_CLIENT_HELLO or isinstance(result, ClientHello)
