# -*- test-case-name: tests.test_security_units -*-
"""
The PROXY protocol's header (HAProxy's, versions 1 and 2), without I/O:
L{splitHeader} finds one at the start of a connection's bytes,
L{parseHeader} reads the client and destination addresses it carries,
L{header} writes one.

A load balancer that accepted a client's TCP connection sends the header
before anything else (before TLS), so that the server behind it knows the
client.  edgeproxy reads it on listeners with C{proxy_protocol = yes}
(L{edgeproxy.security.proxyprotocol}) and writes it on backend connections
of upstreams with C{proxy_protocol = v1 | v2} (L{edgeproxy.upstream}).  Read
strictly as the protocol's specification says; Twisted's own parsers
(C{twisted.protocols.haproxy}) are private.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from twisted.internet import address as addresses

__all__ = ["InvalidHeader", "V2_SIGNATURE", "header", "parseHeader", "splitHeader"]

V1_MAX = 107
"""RFC of the protocol, 2.1: a v1 header is at most 107 bytes."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 16 + 4096
"""A v2 header with TLVs beyond this is refused (none we use is large)."""


class InvalidHeader(Exception):
    pass


def splitHeader(data: bytes) -> tuple[bytes, bytes] | None:
    """
    Find a complete PROXY header at the start of C{data}.

    @return: (header, the bytes after it), or L{None} when more bytes are
        needed.
    @raise InvalidHeader: C{data} cannot start with one.
    """
    if data[:1] == b"P":
        if not b"PROXY ".startswith(data[:6]):
            raise InvalidHeader("not a PROXY header")
        end = data.find(b"\r\n")
        if end == -1:
            if len(data) >= V1_MAX:
                raise InvalidHeader("v1 header too long")
            return None
        if end + 2 > V1_MAX:
            raise InvalidHeader("v1 header too long")
        return data[: end + 2], data[end + 2 :]
    if data[:1] == b"\r":
        if not V2_SIGNATURE.startswith(data[:12]):
            raise InvalidHeader("not a PROXY header")
        if len(data) < 16:
            return None
        size = 16 + struct.unpack("!H", data[14:16])[0]
        if size > V2_MAX:
            raise InvalidHeader("v2 header too long")
        if len(data) < size:
            return None
        return data[:size], data[size:]
    raise InvalidHeader("not a PROXY header")


def parseHeader(header: bytes) -> tuple[Any, Any] | None:
    """
    The (source, destination) addresses of a complete header (as
    L{splitHeader} found it), or L{None} for a C{LOCAL} / C{UNKNOWN} one or
    one that carries no IP address (a UNIX socket, an unspecified family).

    @raise InvalidHeader: it is not valid.
    """
    if header.startswith(b"PROXY "):
        return _parseV1(header)
    return _parseV2(header)


def _parseV1(header: bytes) -> tuple[Any, Any] | None:
    # Section 2.1: "PROXY" SP family SP source SP destination SP port SP
    # port CRLF, single spaces, nothing else; UNKNOWN ignores the rest.
    line = header[6:-2]
    if line.startswith(b"UNKNOWN"):
        return None
    parts = line.split(b" ")
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        raise InvalidHeader("invalid v1 header")
    version = 4 if parts[0] == b"TCP4" else 6
    return (
        _address(version, _v1Host(parts[1], version), _v1Port(parts[3])),
        _address(version, _v1Host(parts[2], version), _v1Port(parts[4])),
    )


def _v1Host(text: bytes, version: int) -> str:
    try:
        parsed = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidHeader("invalid address") from None
    if parsed.version != version:
        raise InvalidHeader("address of the wrong family")
    return str(parsed)


def _v1Port(text: bytes) -> int:
    # 0 to 65535 in decimal, no sign and no leading zero (section 2.1).
    if not (text.isdigit() and len(text) <= 5) or (len(text) > 1 and text[:1] == b"0"):
        raise InvalidHeader("invalid port")
    port = int(text)
    if port > 65535:
        raise InvalidHeader("invalid port")
    return port


_V2_FAMILIES = {0x11: (4, socket.AF_INET, 4), 0x21: (6, socket.AF_INET6, 16)}
"""Section 2.2: TCP over IPv4 and IPv6, by the protocol/family byte:
(IP version, address family, address size)."""


def _parseV2(header: bytes) -> tuple[Any, Any] | None:
    if len(header) < 16 or not header.startswith(V2_SIGNATURE):
        raise InvalidHeader("invalid v2 header")
    versionCommand, family = header[12], header[13]
    if versionCommand >> 4 != 2:
        raise InvalidHeader("unknown v2 version")
    command = versionCommand & 0x0F
    if command == 0x0:
        # LOCAL: the balancer's own connection (a health check); its
        # addresses, if any, are to be ignored.
        return None
    if command != 0x1:
        raise InvalidHeader("unknown v2 command")
    body = header[16:]
    if family not in _V2_FAMILIES:
        if family >> 4 > 3 or family & 0x0F > 2:
            raise InvalidHeader("unknown v2 address family")
        # UNSPEC, UDP or UNIX: no TCP client address to speak of.
        return None
    version, addressFamily, size = _V2_FAMILIES[family]
    if len(body) < 2 * size + 4:
        raise InvalidHeader("v2 addresses cut short")
    # Whatever follows the addresses are TLVs (section 2.2.7): not used.
    source = socket.inet_ntop(addressFamily, body[:size])
    destination = socket.inet_ntop(addressFamily, body[size : 2 * size])
    sourcePort, destinationPort = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return _address(version, source, sourcePort), _address(version, destination, destinationPort)


def _address(version: int, host: str, port: int) -> Any:
    # The text every other part of the proxy uses (2001:db8::1).
    canonical = str(ipaddress.ip_address(host))
    if version == 4:
        return addresses.IPv4Address("TCP", canonical, port)
    return addresses.IPv6Address("TCP", canonical, port)


def header(version: str, source: str, sourcePort: int, destination: str, destinationPort: int) -> bytes:
    """
    The header that tells a backend about a client (C{version} C{v1} or
    C{v2}).  Source and destination of different families (an IPv6 client
    of an IPv4 listener) are given in the source's family, the destination
    as its unspecified address.
    """
    try:
        src = ipaddress.ip_address(source)
    except ValueError:
        return b"PROXY UNKNOWN\r\n" if version == "v1" else V2_SIGNATURE + b"\x20\x00\x00\x00"
    try:
        dst = ipaddress.ip_address(destination)
    except ValueError:
        dst = ipaddress.ip_address("0.0.0.0" if src.version == 4 else "::")
    if dst.version != src.version:
        mapped = getattr(dst, "ipv4_mapped", None)
        if src.version == 4 and mapped is not None:
            dst = mapped
        else:
            dst = ipaddress.ip_address("0.0.0.0" if src.version == 4 else "::")
            destinationPort = 0
    if version == "v1":
        family = b"TCP4" if src.version == 4 else b"TCP6"
        return b"PROXY %s %s %s %d %d\r\n" % (
            family, str(src).encode(), str(dst).encode(), sourcePort, destinationPort,
        )
    if src.version == 4:
        body = socket.inet_pton(socket.AF_INET, str(src)) + socket.inet_pton(socket.AF_INET, str(dst))
        familyByte = 0x11
    else:
        body = socket.inet_pton(socket.AF_INET6, str(src)) + socket.inet_pton(socket.AF_INET6, str(dst))
        familyByte = 0x21
    body += struct.pack("!HH", sourcePort, destinationPort)
    return V2_SIGNATURE + bytes((0x21, familyByte)) + struct.pack("!H", len(body)) + body
