"""
Tests for L{edgeproxy._compat.twisted.tls} and the record path of
L{edgeproxy._compat.pyopenssl}: the server TLS transport of the fast paths,
in memory (L{twisted.test.iosim}), against what Twisted's own
C{BufferingTLSTransport} (the public path: C{fastPaths} off) does with the
same writes: the same bytes reach the client, in records of at most
16 KiB, a write made before the handshake is held until it completes, and a
write that OpenSSL refuses closes the connection with the same error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from twisted.web.resource import Resource
from twisted.web.server import Site

from edgeproxy._compat.pyopenssl import RELEASE_AFTER, BufferReleasingConnection
from edgeproxy._compat.twisted.tls import EdgeTLSTransport, adopt
from edgeproxy.config.model import TLSSettings
from edgeproxy.tls.store import CertificateStore

from .certutil import CertificateAuthority
from .fastpaths import SHOW_DEPRECATIONS, fastPaths, fastPathsOn, using
from .tlsutil import RecordingProtocol, clientCreator, connectTLS, memoryHandshake

pytestmark = SHOW_DEPRECATIONS
__all__ = ["fastPaths", "fastPathsOn"]  # the fixtures, imported for the tests below


class Store:
    def __init__(self, root: Path) -> None:
        self.ca = CertificateAuthority("transport test root")
        self.ca.issue(["a.example"]).writePEM(root / "a.pem")
        from twisted.internet.task import Clock
        import time

        clock = Clock()
        clock.advance(time.time())
        self.store = CertificateStore(
            TLSSettings(certificates=(str(root / "a.pem"),), default=str(root / "a.pem")), clock
        )
        self.store.load()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path)


SIZES = [1, 700, 2**14 - 1, 2**14, 2**14 + 1, 65536, 200_001, 3]


class Writer(RecordingProtocol):
    """Writes each of L{SIZES} when the client says C{go}."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        for size in SIZES:
            self.transport.write(bytes([size % 251]) * size)


class ChunkRecorder(RecordingProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[int] = []

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.chunks.append(len(data))


def _connect(store: Store, serverProtocol: type[RecordingProtocol]) -> Any:
    """A connection over the transport the process's fast paths give."""
    connection = connectTLS(
        store.store.serverConnectionCreator(),
        clientCreator("a.example", store.ca.certificatePEM),
        serverProtocol=serverProtocol,
    )
    assert connection.established, connection.clientApp.lost
    return connection


def test_writesArriveWholeInRecordsOf16KiB(store: Store, fastPaths: bool) -> None:
    """
    Writes of every size around the record size reach the client intact,
    in order, and no record carries more than 2^14 bytes (RFC 8446 §5.1);
    the connection keeps working after the first batch.
    """
    connection = _connect(store, Writer)
    assert type(connection.server) is (EdgeTLSTransport if fastPaths else BufferingTLSTransport)
    recorder = ChunkRecorder()
    recorder.received = connection.clientApp.received
    connection.client.wrappedProtocol = recorder
    expected = b"".join(bytes([size % 251]) * size for size in SIZES)
    connection.send(b"go")
    assert recorder.received == expected
    connection.send(b"go")
    assert recorder.received == expected * 2
    assert max(recorder.chunks) <= 2**14
    assert recorder.lost is None


class BigWriter(RecordingProtocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"b" * 100_000)


def test_drainedSendBIOReplaced(store: Store, fastPathsOn: None) -> None:
    """
    After a large write the send BIO that carried it is replaced (an idle
    connection must not keep its size), and bytes still flow after that.
    """
    connection = _connect(store, BigWriter)
    handle = connection.server.getHandle()
    connection.send(b"go")
    # A memory BIO has no buffer until something is written into it: the
    # one in place now has never held a byte.
    data = _ffi.new("char **")
    assert _lib.BIO_get_mem_data(handle._from_ssl, data) == 0
    assert data[0] == _ffi.NULL
    assert handle._sentThrough < RELEASE_AFTER
    connection.send(b"go")
    assert connection.clientApp.received == b"b" * 200_000


class EarlyWriter(RecordingProtocol):
    """Writes as soon as it is connected: before the TLS handshake."""

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None
        self.transport.write(b"hello " * 5000)


class EarlyBigWriter(RecordingProtocol):
    """Writes more than a chunk (L{WRITE_CHUNK}) before the TLS handshake."""

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None
        self.transport.write(b"hello " * 5000)
        self.transport.write(bytes(range(251)) * 1000)


def test_writeBeforeHandshakeHeldUntilItCompletes(store: Store, fastPaths: bool) -> None:
    """
    OpenSSL cannot encrypt before the handshake (C{WantReadError}): the
    bytes are held and sent once it completes, as Twisted does.
    """
    connection = _connect(store, EarlyWriter)
    assert connection.clientApp.received == b"hello " * 5000


def test_largeWriteBeforeHandshakeHeldUntilItCompletes(store: Store, fastPaths: bool) -> None:
    """A write of several chunks made before the handshake is held whole too."""
    connection = _connect(store, EarlyBigWriter)
    assert connection.clientApp.received == b"hello " * 5000 + bytes(range(251)) * 1000


def test_refusedWriteClosesWithTheError(store: Store, fastPaths: bool) -> None:
    """
    A write OpenSSL refuses (here: after this side's TLS shutdown) closes
    the connection, and the application sees OpenSSL's error, as with
    Twisted's own write path.
    """
    connection = _connect(store, RecordingProtocol)
    connection.server.getHandle().shutdown()
    connection.server.write(b"x" * 40000)
    connection.pump.flush()
    lost = connection.serverApp.lost
    assert lost is not None and lost.check(SSL.Error), lost
    assert connection.clientApp.received == b""


def test_adoptLeavesOtherTransportsAlone() -> None:
    """
    Only Twisted's C{BufferingTLSTransport} itself is adopted: a subclass or
    the plain C{TLSMemoryBIOProtocol} keeps its class.
    """

    class Mine(BufferingTLSTransport):
        pass

    for cls in (Mine, TLSMemoryBIOProtocol):
        instance = cls.__new__(cls)
        adopt(instance)
        assert type(instance) is cls
    instance = BufferingTLSTransport.__new__(BufferingTLSTransport)
    adopt(instance)
    assert type(instance) is EdgeTLSTransport
    assert isinstance(instance, BufferingTLSTransport)


def test_siteOverTheTransport(store: Store, fastPaths: bool) -> None:
    """A real C{Site} answers through the adopted transport, or Twisted's."""

    class Big(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return b"z" * 100_000

    connection = connectTLS(
        store.store.serverConnectionCreator([b"http/1.1"]),
        clientCreator("a.example", store.ca.certificatePEM),
        serverFactory=Site(Big()),
    )
    connection.send(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    head, _, body = connection.clientApp.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"z" * 100_000


def _built(creator: Any) -> list[Any]:
    """Two server TLS transports from one factory, connected to StringTransports."""
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory

    factory = TLSMemoryBIOFactory(
        creator, False, Factory.forProtocol(RecordingProtocol), MemoryReactorClock()
    )
    built = []
    for _ in range(2):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        built.append(protocol)
    return built


def test_factoryBuildsEdgeTransportsAfterTheFirst(store: Store) -> None:
    """
    The first transport of a listener is adopted; its factory builds the
    next ones as L{EdgeTLSTransport}, which come out connected exactly as
    Twisted's: the same interfaces as their TCP transport, registered with
    the factory, the application connected.
    """
    from zope.interface import providedBy

    with using(True):
        edge = _built(store.store.serverConnectionCreator())
    with using(False):
        twisted = _built(store.store.serverConnectionCreator())
    assert [type(p) for p in edge] == [EdgeTLSTransport, EdgeTLSTransport]
    assert [type(p) for p in twisted] == [BufferingTLSTransport, BufferingTLSTransport]
    for mine, theirs in zip(edge, twisted):
        assert list(providedBy(mine)) == list(providedBy(theirs))
        assert mine in mine.factory.protocols
        assert mine.wrappedProtocol.connected and mine.wrappedProtocol.transport is mine
        # The ClientHello is awaited: nothing written, not disconnected.
        assert mine.transport.value() == theirs.transport.value() == b""
        assert not mine.disconnecting


class Echo(RecordingProtocol):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        self.transport.write(data)


def test_readsDeliveredWholeAndEchoed(store: Store, fastPaths: bool) -> None:
    """
    What the client sends, in writes of any size, reaches the application
    whole and in order, and its echo comes back; the receive BIO that
    carried it is replaced once drained (edgeproxy's side).
    """
    connection = _connect(store, Echo)
    sent = b""
    for size in (1, 5000, 2**14, 2**14 + 1, 100_000, 7):
        payload = bytes([size % 251]) * size
        connection.send(payload)
        sent += payload
    assert connection.serverApp.received == sent
    assert connection.clientApp.received == sent
    if fastPaths:
        data = _ffi.new("char **")
        handle = connection.server.getHandle()
        assert _lib.BIO_get_mem_data(handle._into_ssl, data) == 0
        assert handle._receivedThrough < RELEASE_AFTER


def test_closeNotifyIsACleanClose(store: Store, fastPaths: bool) -> None:
    """The client's close_notify ends the connection cleanly, as with Twisted."""
    from twisted.internet.error import ConnectionDone

    connection = _connect(store, Echo)
    connection.send(b"hello")
    connection.client.loseConnection()
    connection.pump.flush()
    lost = connection.serverApp.lost
    assert lost is not None and lost.check(ConnectionDone), lost
    assert connection.serverApp.received == b"hello"


def test_garbageAfterHandshakeIsATLSError(store: Store, fastPaths: bool) -> None:
    """
    Bytes that are no TLS record after the handshake fail the connection
    with OpenSSL's error, and the server sends its alert, as with Twisted.
    """
    connection = _connect(store, Echo)
    connection.server.dataReceived(b"\x17\x03\x03\x00\x05garbage-garbage")
    assert connection.server.transport.disconnecting
    connection.pump.flush()
    lost = connection.serverApp.lost
    assert lost is not None and lost.check(SSL.Error), lost
    # The client got the server's alert and saw the connection fail.
    assert connection.clientApp.lost is not None


class SmallWriter(RecordingProtocol):
    """Answers each read with many small writes, then closes if asked."""

    closeAfter = False

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        for i in range(50):
            self.transport.write(b"%02d," % i)
        self.transport.writeSequence([b"a", bytearray(b"b"), b"c"])
        if self.closeAfter:
            self.transport.loseConnection()


class ClosingSmallWriter(SmallWriter):
    closeAfter = True


WRITTEN = b"".join(b"%02d," % i for i in range(50)) + b"abc"


def test_smallWritesAggregatedIntoOneRecord(store: Store, fastPaths: bool) -> None:
    """
    Small writes made in one reactor turn reach the client as one TLS
    record (Twisted's aggregation, which EdgeTLSTransport does itself), and
    again on the next turn.
    """
    connection = _connect(store, SmallWriter)
    recorder = ChunkRecorder()
    connection.client.wrappedProtocol = recorder
    connection.send(b"go")
    assert recorder.received == WRITTEN
    assert recorder.chunks == [len(WRITTEN)]
    connection.send(b"again")
    assert recorder.received == WRITTEN * 2
    assert recorder.chunks == [len(WRITTEN)] * 2


def test_loseConnectionSendsHeldWritesFirst(store: Store, fastPaths: bool) -> None:
    """
    Writes still held for the next reactor turn go out before the
    close_notify when the application closes the connection.
    """
    from twisted.internet.error import ConnectionDone

    connection = _connect(store, ClosingSmallWriter)
    connection.send(b"go")
    connection.pump.flush()
    assert connection.clientApp.received == WRITTEN
    lost = connection.serverApp.lost
    assert lost is not None and lost.check(ConnectionDone), lost


def test_idleConnectionKeepsNoHandshakeOnlyState(store: Store, fastPathsOn: None) -> None:
    """
    Once the handshake is done, the server connection has let go of the
    ALPN callback's buffers and of pyOpenSSL's reverse-mapping entry, and
    keeps no write buffers while idle (R4); the negotiated protocol is still
    reported and bytes still flow both ways.
    """
    connection = connectTLS(
        store.store.serverConnectionCreator([b"h2", b"http/1.1"]),
        clientCreator("a.example", store.ca.certificatePEM, alpn=[b"http/1.1"]),
        serverProtocol=Echo,
    )
    assert connection.established
    server = connection.server
    handle = server.getHandle()
    assert type(server) is EdgeTLSTransport
    assert handle._alpn_select_callback_args is None
    assert handle._ssl not in SSL.Connection._reverse_mapping
    assert server.negotiatedProtocol == b"http/1.1"
    connection.send(b"ping")
    assert connection.clientApp.received == b"ping"
    # No list held for writes (an empty tuple is shared by all).
    assert server._pending is None
    assert server._appSendBuffer == () and type(server._appSendBuffer) is tuple
    assert "_aggregator" not in vars(server)


def test_renegotiationRefusedWithoutCallbacks(store: Store, fastPaths: bool, capfd: Any) -> None:
    """
    A TLS 1.2 client asking to renegotiate after the handshake is refused
    (SSL_OP_NO_RENEGOTIATION: a no_renegotiation alert, which this client
    answers by failing the connection) without the server's servername or
    ALPN callbacks running, which could no longer find their connection;
    the same outcome as over Twisted's own transport.
    """
    from twisted.internet.ssl import TLSVersion

    client = clientCreator(
        "a.example",
        store.ca.certificatePEM,
        extraCertificateOptions={"lowerMaximumSecurityTo": TLSVersion.TLSv1_2},
    )
    connection = connectTLS(store.store.serverConnectionCreator(), client, serverProtocol=Echo)
    assert connection.established
    handle = connection.client.getHandle()
    assert handle.get_protocol_version_name() == "TLSv1.2"
    assert handle.renegotiate()
    try:
        handle.do_handshake()
    except SSL.WantReadError:
        pass
    connection.client._flushSendBIO()
    connection.pump.flush()
    assert "Traceback" not in capfd.readouterr().err
    lost = connection.serverApp.lost
    assert lost is not None and lost.check(SSL.Error), lost
    assert "handshake failure" in str(lost.value)


def test_writesAfterTheConnectionIsLostAreDroppedUncounted(store: Store, fastPathsOn: None) -> None:
    """
    After the connection is lost, writes are dropped as Twisted drops them,
    and the listener's byte counter does not count them as sent.
    """

    class Traffic:
        sent = 0

    connection = _connect(store, Echo)
    server = connection.server
    server.traffic = traffic = Traffic()
    connection.send(b"hello")
    assert traffic.sent == 5
    connection.client.loseConnection()
    connection.pump.flush()
    assert connection.serverApp.lost is not None
    server.write(b"late")
    server.writeSequence([b"later"])
    connection.pump.flush()
    assert traffic.sent == 5
    assert connection.clientApp.received == b"hello"


@pytest.mark.parametrize("kind", ["twisted", "listener"])
def test_recordsGoStraightToTheSocketOfAcceptedConnections(kind: str, fastPathsOn: None) -> None:
    """
    With nothing queued, records leave at once through the TCP transport's
    own send, without waiting a reactor turn, both on Twisted's C{tcp.Server}
    and on the class edgeproxy's TCP listeners accept connections as
    (L{edgeproxy._compat.twisted.tcp.LeanServer}).
    """
    import socket

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactorClock

    from edgeproxy._compat.twisted.tcp import LeanServer, sendNow

    class Listening:
        _realPortNumber = 8443

    cls = tcp.Server if kind == "twisted" else LeanServer
    mine, theirs = socket.socketpair()
    try:
        server = cls(mine, Protocol(), ("127.0.0.1", 40000), Listening(), 1, MemoryReactorClock())
        sendNow(server, b"record one;record two")
        theirs.setblocking(False)
        assert theirs.recv(100) == b"record one;record two"
        assert not server.dataBuffer and not server._tempDataBuffer
    finally:
        mine.close()
        theirs.close()


@pytest.mark.parametrize("kind", ["twisted", "listener"])
def test_largeWritesGoAsFarAsTheKernelTakesThemThenQueue(kind: str, fastPathsOn: None) -> None:
    """
    A write larger than Twisted's C{SEND_LIMIT} (128 KiB a call) goes to
    the socket in as many calls as the kernel takes whole; what it leaves
    is queued as bytes (the records of a large response come as a cffi
    buffer), and the peer gets every byte, in order, once the queue is
    written.
    """
    import socket

    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactorClock

    from edgeproxy._compat.twisted.tcp import LeanServer, sendNow

    class Listening:
        _realPortNumber = 8443

    cls = tcp.Server if kind == "twisted" else LeanServer
    data = bytes(range(256)) * 8192  # 2 MiB
    source = _ffi.new("char[]", data)
    for sendBuffer, queued in ((8 << 20, False), (256 << 10, True)):
        mine, theirs = socket.socketpair()
        try:
            mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sendBuffer)
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sendBuffer)
            server = cls(mine, Protocol(), ("127.0.0.1", 40000), Listening(), 1, MemoryReactorClock())
            sendNow(server, _ffi.buffer(source, len(data)))
            assert bool(server.dataBuffer or server._tempDataBuffer) is queued
            assert all(type(part) is bytes for part in server._tempDataBuffer)
            theirs.setblocking(False)
            received = b""
            for _ in range(10_000):
                try:
                    received += theirs.recv(1 << 20)
                except BlockingIOError:
                    if not (server.dataBuffer or server._tempDataBuffer):
                        break
                    server.doWrite()
            assert received == data
        finally:
            mine.close()
            theirs.close()


def test_largeWritesAreEncryptedIntoOneBuffer() -> None:
    """
    C{encrypt} takes the records of a write of many records into one
    buffer, leaving none behind: the peer decrypts exactly what was
    written, over TLS 1.3 and TLS 1.2 (whose records carry more overhead).
    """
    from twisted.internet.ssl import TLSVersion

    from edgeproxy._compat.pyopenssl import encrypt

    data = bytes(range(256)) * 4097  # not a whole number of records
    for version in (TLSVersion.TLSv1_3, TLSVersion.TLSv1_2):
        server, client = _memoryPair(version)
        records, sent, failed = encrypt(server, data)
        assert (sent, failed, len(records)) == (len(data), None, 1)
        # Every record was taken out of the send BIO (one read each).
        assert _lib.BIO_get_mem_data(server._from_ssl, _ffi.NULL) == 0
        client.bio_write(bytes(records[0]))
        received = b""
        while True:
            try:
                received += client.recv(1 << 20)
            except SSL.WantReadError:
                break
        assert received == data


class _OverASocket:
    """
    An L{EdgeTLSTransport}, its TLS 1.3 handshake done in memory, over a
    real TCP transport (edgeproxy's L{LeanServer}) on one end of a socket
    pair; the client's L{SSL.Connection} reads the other end.  Records the
    order of the transport's calls to C{encrypt} and to the socket.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, sendBuffer: int) -> None:
        import socket

        from twisted.internet.protocol import Protocol
        from twisted.internet.ssl import TLSVersion
        from twisted.internet.testing import MemoryReactorClock

        from edgeproxy._compat.twisted import tls as tlsModule
        from edgeproxy._compat.twisted.tcp import LeanServer

        class Listening:
            _realPortNumber = 8443

        self.events: list[tuple[str, int, int]] = []
        realEncrypt = tlsModule.encrypt

        def encrypt(connection: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
            self.events.append(("encrypt", len(data), len(data)))
            return realEncrypt(connection, data, *args, **kwargs)

        monkeypatch.setattr(tlsModule, "encrypt", encrypt)
        self.mine, self.theirs = socket.socketpair()
        self.mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sendBuffer)
        self.theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sendBuffer)
        self.theirs.setblocking(False)
        self.tcp = LeanServer(
            self.mine, Protocol(), ("127.0.0.1", 40000), Listening(), 1, MemoryReactorClock()
        )
        realSend = self.tcp.writeSomeData

        def writeSomeData(data: Any) -> Any:
            sent = realSend(data)
            self.events.append(("send", sent, len(data)))
            return sent

        self.tcp.writeSomeData = writeSomeData  # type: ignore[method-assign]
        server, self.client = _memoryPair(TLSVersion.TLSv1_3, BufferReleasingConnection)
        self.tls = EdgeTLSTransport(None, Protocol())
        self.tls._tlsConnection = server
        self.tls.transport = self.tcp

    def queued(self) -> bool:
        return bool(self.tcp.dataBuffer or self.tcp._tempDataBuffer)

    def received(self) -> bytes:
        """Everything the client can decrypt, the TCP queue written out."""
        for _ in range(100_000):
            try:
                self.client.bio_write(self.theirs.recv(1 << 20))
            except BlockingIOError:
                if not self.queued():
                    break
                self.tcp.doWrite()
        plain = b""
        while True:
            try:
                plain += self.client.recv(1 << 20)
            except SSL.WantReadError:
                return plain

    def close(self) -> None:
        self.mine.close()
        self.theirs.close()


def test_largeWriteEncryptedAndSentAChunkAtATime(
    fastPathsOn: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A write larger than L{WRITE_CHUNK} (a 1 MiB cache hit) is encrypted a
    chunk at a time, each chunk's records sent (in one call, at most
    C{SEND_LIMIT}) before the next chunk is encrypted, while the kernel
    takes them; the peer decrypts exactly what was written, and the send
    BIO that carried the chunks is replaced after the last.
    """
    from twisted.internet.abstract import FileDescriptor

    from edgeproxy._compat.twisted.tls import WRITE_CHUNK

    data = bytes(range(251)) * 4200  # about 1 MiB, not a whole number of chunks
    chunks = -(-len(data) // WRITE_CHUNK)
    pair = _OverASocket(monkeypatch, 8 << 20)
    try:
        pair.tls.writeNow(data)
        assert [kind for kind, _, _ in pair.events] == ["encrypt", "send"] * chunks
        assert [size for kind, size, _ in pair.events if kind == "encrypt"] == [WRITE_CHUNK] * (
            chunks - 1
        ) + [len(data) - (chunks - 1) * WRITE_CHUNK]
        assert all(
            sent == asked <= FileDescriptor.SEND_LIMIT for kind, sent, asked in pair.events if kind == "send"
        )
        assert not pair.queued()
        # A memory BIO has no buffer until something is written into it.
        pointer = _ffi.new("char **")
        assert _lib.BIO_get_mem_data(pair.tls._tlsConnection._from_ssl, pointer) == 0
        assert pointer[0] == _ffi.NULL
        assert pair.received() == data
    finally:
        pair.close()


def _encrypted(events: list[tuple[str, int, int]]) -> int:
    return sum(size for kind, size, _ in events if kind == "encrypt")


def test_largeWriteToASlowPeerQueuesTheRestAtOnce(
    fastPathsOn: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Once the kernel leaves part of a chunk, the rest of the write is
    encrypted in one go and queued behind it, as bytes of its own (the
    chunk buffer, which the next large write on any connection fills
    again, is not referred to), and the TCP transport pauses its producer;
    written out, the queue gives the peer every byte, in order.
    """
    from edgeproxy._compat.twisted import tls as tlsModule

    class Producer:
        paused = 0

        def pauseProducing(self) -> None:
            self.paused += 1

        def resumeProducing(self) -> None:
            pass

        def stopProducing(self) -> None:
            pass

    data = bytes(range(251)) * 4200
    pair = _OverASocket(monkeypatch, 64 << 10)
    producer = Producer()
    pair.tcp.registerProducer(producer, True)
    try:
        pair.tls.writeNow(data)
        events = pair.events
        short = next(i for i, (kind, sent, asked) in enumerate(events) if sent < asked)
        # After the send the kernel cut short, one encrypt of all the rest.
        rest = len(data) - _encrypted(events[:short])
        assert events[short + 1 :] == [("encrypt", rest, rest)]
        assert pair.queued() and producer.paused
        buffer = tlsModule._chunkBuffer
        _ffi.memmove(buffer.out, b"\xff" * buffer.room, buffer.room)
        assert pair.received() == data
    finally:
        pair.close()


def _memoryPair(
    version: Any, serverClass: type[SSL.Connection] = SSL.Connection
) -> tuple[SSL.Connection, SSL.Connection]:
    """A server (of C{serverClass}) and a client connection over memory
    BIOs, their handshake done, at most TLS C{version}."""
    from twisted.internet.ssl import TLSVersion

    leaf = CertificateAuthority().issue(["localhost"])
    serverContext = SSL.Context(SSL.TLS_METHOD)
    serverContext.use_certificate(leaf.certificate)
    serverContext.use_privatekey(leaf.key)
    serverContext.set_max_proto_version(
        SSL.TLS1_3_VERSION if version == TLSVersion.TLSv1_3 else SSL.TLS1_2_VERSION
    )
    server = serverClass(serverContext, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    client.set_connect_state()
    memoryHandshake(client, server)
    assert server.get_protocol_version_name() == ("TLSv1.3" if version == TLSVersion.TLSv1_3 else "TLSv1.2")
    return server, client
