# -*- test-case-name: tests.test_tls_clienthello -*-
"""
Reading the server name and the ALPN protocols of a TLS ClientHello from
the raw bytes of a connection, before OpenSSL sees them.

Two features need them earlier than OpenSSL's callbacks give them:
TLS-ALPN-01 (RFC 8737 §3: a ClientHello offering only C{acme-tls/1} must get
the challenge certificate, but OpenSSL picks the certificate for TLS 1.2
before it asks for ALPN), and on-demand certificates (the handshake waits
while a certificate is ordered for a new name).  Pure: bytes in, a value
out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["ClientHello", "NEED_MORE", "NOT_A_CLIENT_HELLO", "parseClientHello", "MAX_HELLO"]

MAX_HELLO = 64 * 1024
"""Bytes looked at, at most: a ClientHello longer than this is not read."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    serverName: str | None
    """The C{host_name} of the server_name extension (RFC 6066 §3), lower
    case, or L{None}."""
    protocols: tuple[bytes, ...]
    """The ALPN protocols offered (RFC 7301 §3.1), in the client's order."""


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_MORE = _Marker("NEED_MORE")
"""The bytes so far are the start of a ClientHello: read more."""
NOT_A_CLIENT_HELLO = _Marker("NOT_A_CLIENT_HELLO")
"""The bytes are not a TLS ClientHello (or one this parser cannot read):
hand them to OpenSSL as they are."""

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_ALPN = 16


def _handshakeBytes(data: bytes) -> bytes | _Marker:
    """The handshake-layer bytes of the TLS records at the start of C{data}
    (RFC 8446 §5.1: a handshake message may span records)."""
    out = bytearray()
    offset = 0
    while offset + 5 <= len(data):
        contentType, major, length = data[offset], data[offset + 1], struct.unpack_from("!H", data, offset + 3)[0]
        if contentType != _HANDSHAKE or major != 3:
            return NOT_A_CLIENT_HELLO if offset == 0 else bytes(out)
        end = offset + 5 + length
        out += data[offset + 5:min(end, len(data))]
        if end > len(data):
            break
        offset = end
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            break
    if offset == 0 and len(data) >= 1 and data[0] != _HANDSHAKE:
        return NOT_A_CLIENT_HELLO
    return bytes(out)


def parseClientHello(data: bytes) -> ClientHello | _Marker:
    """
    Read the ClientHello at the start of C{data}.

    @return: a L{ClientHello}, L{NEED_MORE} when C{data} stops inside it,
        or L{NOT_A_CLIENT_HELLO}.
    """
    if data and data[0] != _HANDSHAKE:
        return NOT_A_CLIENT_HELLO
    if len(data) > MAX_HELLO:
        data = data[:MAX_HELLO]
    handshake = _handshakeBytes(data)
    if isinstance(handshake, _Marker):
        return handshake
    if len(handshake) < 4:
        return NEED_MORE if len(data) < MAX_HELLO else NOT_A_CLIENT_HELLO
    if handshake[0] != _CLIENT_HELLO:
        return NOT_A_CLIENT_HELLO
    length = int.from_bytes(handshake[1:4], "big")
    if len(handshake) < 4 + length:
        return NEED_MORE if len(data) < MAX_HELLO else NOT_A_CLIENT_HELLO
    try:
        return _parseBody(handshake[4:4 + length])
    except (IndexError, struct.error, UnicodeDecodeError, ValueError):
        return NOT_A_CLIENT_HELLO


def _parseBody(body: bytes) -> ClientHello:
    # RFC 8446 §4.1.2: legacy_version, random, legacy_session_id,
    # cipher_suites, legacy_compression_methods, extensions.
    offset = 2 + 32
    offset += 1 + body[offset]
    offset += 2 + struct.unpack_from("!H", body, offset)[0]
    offset += 1 + body[offset]
    if offset >= len(body):
        return ClientHello(None, ())
    extensionsEnd = offset + 2 + struct.unpack_from("!H", body, offset)[0]
    offset += 2
    serverName: str | None = None
    protocols: tuple[bytes, ...] = ()
    while offset + 4 <= extensionsEnd:
        kind, size = struct.unpack_from("!HH", body, offset)
        value = body[offset + 4:offset + 4 + size]
        if len(value) != size:
            raise ValueError("extension runs past the end")
        offset += 4 + size
        if kind == _SERVER_NAME:
            serverName = _serverName(value)
        elif kind == _ALPN:
            protocols = _protocols(value)
    return ClientHello(serverName, protocols)


def _serverName(value: bytes) -> str | None:
    end = 2 + struct.unpack_from("!H", value, 0)[0]
    offset = 2
    while offset + 3 <= end:
        nameType, size = value[offset], struct.unpack_from("!H", value, offset + 1)[0]
        name = value[offset + 3:offset + 3 + size]
        offset += 3 + size
        if nameType == 0:
            return name.decode("ascii").lower().rstrip(".")
    return None


def _protocols(value: bytes) -> tuple[bytes, ...]:
    end = 2 + struct.unpack_from("!H", value, 0)[0]
    offset = 2
    protocols = []
    while offset < end:
        size = value[offset]
        protocols.append(value[offset + 1:offset + 1 + size])
        offset += 1 + size
    return tuple(protocols)
