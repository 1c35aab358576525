# -*- test-case-name: tests.test_security_proxyprotocol -*-
"""
The PROXY protocol (HAProxy's, versions 1 and 2): the address of the
client a load balancer in front of us accepted, sent before anything else
on the connection, before TLS.

In (C{[listen:NAME] proxy_protocol = yes}): L{ProxyProtocolFactory} wraps
a listener's factory at the TCP level, under TLS.  A connection from a
peer outside C{proxy_protocol_from} is closed at once (anyone else could
claim any address); from a listed peer, the header must come whole within
the listener's C{client_header_timeout}, and be valid, or the connection
is closed.  The address it carries becomes the connection's peer for
everything after it: C{getPeer()} of the transport (so
L{edgeproxy.pipeline.values.ConnectionInfo.peer}, the trusted-proxy
resolution, the access rules, the logs), and its destination the
connection's local address.  A C{LOCAL} header (v2; C{UNKNOWN} in v1: the
balancer's own health check) keeps the balancer's address.

The header is read here (L{splitHeader}, L{parseHeader}), strictly as
the protocol's specification says.  Twisted's wrapper
(C{twisted.protocols.haproxy}) is not used: it refuses a header split over
two reads, has no source check and no deadline, and its parsers are
private.

Out (C{[upstream:NAME] proxy_protocol = v1 | v2}): L{header} writes the
header that starts each backend connection (L{edgeproxy.upstream}).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from twisted.internet import address as addresses
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from edgeproxy.config.model import IPNetwork

__all__ = [
    "HeaderFirstEndpoint",
    "ProxyProtocolFactory",
    "V2_SIGNATURE",
    "header",
    "parseHeader",
    "requestHeader",
    "splitHeader",
]

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


def allowedSource(peer: Any, sources: tuple[IPNetwork, ...]) -> bool:
    """Whether the TCP peer C{peer} may send a PROXY header."""
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return False
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return any(parsed in network for network in sources)


class ProxyProtocolWrapper(ProtocolWrapper):
    """One connection that starts with a PROXY header (see the module docstring)."""

    def __init__(self, factory: ProxyProtocolFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer: bytes | None = b""
        self._source: Any = None
        self._destination: Any = None
        self._deadline: Any = None

    def makeConnection(self, transport: Any) -> None:
        factory: ProxyProtocolFactory = self.factory  # type: ignore[assignment]
        if not allowedSource(transport.getPeer(), factory.sources):
            factory.refused("source")
            transport.abortConnection()
            # The wrapped protocol never starts: nothing of it ran.
            self.transport = transport
            self._buffer = None
            return
        # The wrapped protocol (TLS, then HTTP) starts once the header is
        # read: it sees the client's address from its first moment.
        self.transport = transport
        self.connected = 1
        self._deadline = factory.clock.callLater(factory.timeout, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self._buffer is not None:
            self.factory.refused("timeout")  # type: ignore[attr-defined]
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer is None:
            if self.wrappedProtocol.transport is not None:
                self.wrappedProtocol.dataReceived(data)
            return
        buffer += data
        try:
            found = splitHeader(buffer)
            if found is None:
                self._buffer = buffer
                return
            head, rest = found
            parsed = parseHeader(head)
        except InvalidHeader:
            self._buffer = None
            self._cancelDeadline()
            self.factory.refused("invalid")  # type: ignore[attr-defined]
            self.transport.abortConnection()
            return
        self._buffer = None
        self._cancelDeadline()
        if parsed is not None:
            self._source, self._destination = parsed
        self.factory.registerProtocol(self)  # type: ignore[attr-defined]
        self.wrappedProtocol.makeConnection(self)
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Any) -> None:
        self._cancelDeadline()
        if self.wrappedProtocol.transport is not None:
            super().connectionLost(reason)
        else:
            self.connected = 0
            self.disconnecting = 1

    def getPeer(self) -> Any:
        if self._source is not None:
            return self._source
        return self.transport.getPeer()

    def getHost(self) -> Any:
        if self._destination is not None:
            return self._destination
        return self.transport.getHost()


class ProxyProtocolFactory(WrappingFactory):
    """Wraps a listener's factory so that its connections start with a PROXY header."""

    protocol = ProxyProtocolWrapper  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        wrappedFactory: Any,
        sources: tuple[IPNetwork, ...],
        timeout: float,
        clock: Any,
        listener: str = "",
        metrics: Any = None,
    ) -> None:
        super().__init__(wrappedFactory)
        self.sources = sources
        self.timeout = timeout
        self.clock = clock
        self.listener = listener
        self.metrics = metrics

    def unregisterProtocol(self, p: Any) -> None:
        self.protocols.pop(p, None)

    def refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.proxyProtocolRefused(self.listener, reason)

    def __getattr__(self, name: str) -> Any:
        # What the service asks a listener's site (channels, inflight,
        # reconfigure...) goes to the wrapped factory.
        return getattr(self.wrappedFactory, name)


def requestHeader(version: str, request: Any) -> bytes:
    """
    The header that starts the backend connection of C{request}: its
    client (after trusted proxies and the PROXY protocol of the listener)
    and the address it connected to.  The client's port is known only
    when the client is the connection's peer; 0 otherwise.
    """
    connection = request.connection
    port = connection.peerPort if request.client == connection.peer else 0
    return header(version, request.client, port, connection.local, connection.localPort)


class _HeaderFirst(ProtocolWrapper):
    """Writes the PROXY header as the connection's first bytes."""

    def makeConnection(self, transport: Any) -> None:
        transport.write(self.factory.proxyHeader)  # type: ignore[attr-defined]
        super().makeConnection(transport)


class _HeaderFirstFactory(WrappingFactory):
    protocol = _HeaderFirst  # type: ignore[assignment]
    noisy = False

    def __init__(self, wrappedFactory: Any, proxyHeader: bytes) -> None:
        super().__init__(wrappedFactory)
        self.proxyHeader = proxyHeader


@implementer(IStreamClientEndpoint)
class HeaderFirstEndpoint:
    """A client endpoint whose connection starts with a PROXY header, then
    is the wrapped endpoint's (TLS goes on top of it)."""

    def __init__(self, endpoint: Any, proxyHeader: bytes) -> None:
        self._endpoint = endpoint
        self._header = proxyHeader

    def connect(self, protocolFactory: Any) -> Any:
        return self._endpoint.connect(_HeaderFirstFactory(protocolFactory, self._header)).addCallback(
            lambda wrapper: wrapper.wrappedProtocol
        )
