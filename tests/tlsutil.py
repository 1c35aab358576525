"""
In-memory TLS handshakes for tests: a client and a server wired by
L{twisted.test.iosim}, no sockets, no reactor.

    result = handshake(store.serverConnectionCreator(), sni="a.example",
                       trustRoot=ca.certificatePEM, alpn=[b"h2", b"http/1.1"])
    result.commonNames, result.negotiatedProtocol, result.tlsVersion

L{connectTLS} keeps the connection open (for "reload while connected"
tests) and lets a test send bytes both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer


class RecordingProtocol(Protocol):
    """Collects what it receives and how it ended."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class EchoProtocol(RecordingProtocol):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        self.transport.write(data)


@dataclass
class TLSConnection:
    """Both ends of an in-memory TLS connection."""

    pump: iosim.IOPump
    client: Any
    """The client's L{TLSMemoryBIOProtocol}."""
    server: Any
    clientApp: RecordingProtocol
    serverApp: RecordingProtocol

    @property
    def established(self) -> bool:
        """The handshake completed and the connection is still open."""
        return self.clientApp.lost is None and self.peerCertificate is not None

    @property
    def peerCertificate(self) -> x509.Certificate | None:
        handle = self.client.getHandle()
        if handle is None:  # the connection failed and was torn down
            return None
        return handle.get_peer_certificate(as_cryptography=True)  # type: ignore[no-any-return]

    @property
    def commonNames(self) -> list[str]:
        cert = self.peerCertificate
        if cert is None:
            return []
        return [
            str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]

    @property
    def negotiatedProtocol(self) -> bytes | None:
        return self.client.negotiatedProtocol  # type: ignore[no-any-return]

    @property
    def tlsVersion(self) -> str:
        return self.client.getHandle().get_protocol_version_name()  # type: ignore[no-any-return]

    @property
    def resumed(self) -> bool:
        # pyOpenSSL has no wrapper for SSL_session_reused.
        return bool(_lib.SSL_session_reused(self.client.getHandle()._ssl))

    @property
    def session(self) -> SSL.Session | None:
        return self.client.getHandle().get_session()

    @property
    def serverSawClientCertificate(self) -> x509.Certificate | None:
        return self.server.getHandle().get_peer_certificate(as_cryptography=True)

    @property
    def serverName(self) -> bytes | None:
        return self.server.getHandle().get_servername()  # type: ignore[no-any-return]

    def send(self, data: bytes) -> None:
        """Client writes C{data}; pump until quiet."""
        self.client.write(data)
        self.pump.flush()


@implementer(IOpenSSLClientConnectionCreator)
class ResumingCreator:
    """
    Wraps a client creator to offer a saved session (resumption).  Use the
    same instance for both connections: OpenSSL only resumes a session on
    the client context that made it.
    """

    def __init__(self, creator: Any) -> None:
        self._creator = creator
        self.session: SSL.Session | None = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        if self.session is not None:
            connection.set_session(self.session)
        return connection  # type: ignore[no-any-return]


def clientCreator(
    sni: str,
    trustRoot: bytes | None = None,
    alpn: Sequence[bytes] | None = None,
    **extra: Any,
) -> Any:
    """C{optionsForClientTLS} with a PEM trust root (or none: trust nothing)."""
    root = Certificate.loadPEM(trustRoot) if trustRoot is not None else None
    return optionsForClientTLS(
        sni,
        trustRoot=root,
        acceptableProtocols=list(alpn) if alpn is not None else None,
        **extra,
    )


@implementer(IOpenSSLClientConnectionCreator)
class InsecureClientCreator:
    """
    A client that verifies nothing, so a test can see which certificate a
    server sends for a name the certificate does not cover.
    """

    def __init__(
        self,
        sni: str | None,
        alpn: Sequence[bytes] | None = None,
        maxVersion: TLSVersion | None = None,
    ) -> None:
        options = CertificateOptions(
            insecurelyLowerMinimumTo=TLSVersion.TLSv1_0 if maxVersion else None,
            lowerMaximumSecurityTo=maxVersion,
            acceptableProtocols=list(alpn) if alpn else None,
        )
        self._options = options
        self._sni = sni.encode("ascii") if sni is not None else None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection  # type: ignore[no-any-return]


@implementer(IOpenSSLClientConnectionCreator)
class LegacyClientCreator:
    """
    A client that speaks only TLS versions up to C{maxVersion} (an
    C{SSL.TLS1_*_VERSION}), with OpenSSL's security level lowered so that
    it really offers TLS 1.0/1.1: the refusal then comes from the server.
    """

    def __init__(self, maxVersion: int, sni: str = "a.example") -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_VERSION)
        context.set_max_proto_version(maxVersion)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self._context = context
        self._sni = sni.encode("ascii")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_tlsext_host_name(self._sni)
        return connection


def connectTLS(
    serverCreator: Any,
    clientCreator: Any,
    serverFactory: Any = None,
    serverProtocol: type[RecordingProtocol] = EchoProtocol,
) -> TLSConnection:
    """
    Connect a client to a server in memory and pump until quiet.

    @param serverFactory: wrapped by the server's L{TLSMemoryBIOFactory};
        defaults to a factory of C{serverProtocol}.  Pass a C{Site} to have
        ALPN negotiated as for a real listener.
    """
    clock = MemoryReactorClock()
    serverApps: list[RecordingProtocol] = []

    if serverFactory is None:

        class _Factory(Factory):
            def buildProtocol(self, addr: Any) -> RecordingProtocol:
                proto = serverProtocol()
                serverApps.append(proto)
                proto.factory = self
                return proto

        serverFactory = _Factory()

    clientApp = RecordingProtocol()
    serverTLSFactory = TLSMemoryBIOFactory(serverCreator, False, serverFactory, clock)
    clientTLSFactory = TLSMemoryBIOFactory(
        clientCreator, True, Factory.forProtocol(lambda: clientApp), clock
    )
    server = serverTLSFactory.buildProtocol(iosim.FakeAddress())
    client = clientTLSFactory.buildProtocol(iosim.FakeAddress())
    pump = iosim.connect(
        server,
        iosim.makeFakeServer(server),
        client,
        iosim.makeFakeClient(client),
        greet=False,
        clock=clock,
    )
    pump.flush()
    serverApp = serverApps[0] if serverApps else getattr(server, "wrappedProtocol", None)
    return TLSConnection(pump, client, server, clientApp, serverApp)


def handshake(
    serverCreator: Any,
    sni: str,
    trustRoot: bytes | None,
    alpn: Sequence[bytes] | None = None,
    serverFactory: Any = None,
    **clientOptions: Any,
) -> TLSConnection:
    """
    One in-memory handshake with a verifying client; see L{TLSConnection}
    for what to assert on (C{established}, C{commonNames},
    C{negotiatedProtocol}, C{tlsVersion}, C{resumed}, C{clientApp.lost}).
    """
    return connectTLS(
        serverCreator,
        clientCreator(sni, trustRoot, alpn, **clientOptions),
        serverFactory=serverFactory,
    )


def pumpBIO(source: SSL.Connection, sink: SSL.Connection) -> None:
    """Move every TLS byte C{source} (over memory BIOs) has to send into C{sink}."""
    while True:
        try:
            data = source.bio_read(2**15)
        except SSL.WantReadError:
            return
        sink.bio_write(data)


def memoryHandshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Run the handshake of two connections over memory BIOs to its end."""
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        pumpBIO(client, server)
        pumpBIO(server, client)
