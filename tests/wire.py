"""
A protocol served over a real TCP socket on 127.0.0.1, as a TCP listener
serves it, with the test at the other end of the socket: for tests that
must see what the fast paths change (bytes sent straight to the socket, the
TLS transport's record path) and what they fall back to without them.

    wire = SocketWire(factory, clock, tls=store.serverConnectionCreator())
    wire.send(b"GET / HTTP/1.1\\r\\n...")
    wire.received()   # every byte (decrypted, with tls) the peer got so far

The accepted connection is what a TCP listener would make with the
process's fast paths (L{edgeproxy._compat.fastPaths}): a C{LeanServer} or
Twisted's C{tcp.Server}, wrapped, with C{tls}, by the TLS factory a TLS
listener uses (L{edgeproxy.serve.listeners.tlsServerFactory}).  No reactor
runs: the wire reads the socket when the transport is reading, and writes
what the transport queued, when the test asks (L{pump}).
"""

from __future__ import annotations

import select
import socket
from typing import Any

from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from edgeproxy._compat import fastPaths
from edgeproxy._compat.twisted.tcp import LeanServer
from edgeproxy.serve.listeners import tlsServerFactory

__all__ = ["SocketWire"]

PEER = ("192.0.2.7", 40000)


def _connectedPair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a TCP connection on 127.0.0.1, non-blocking."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        peer = socket.create_connection(listening.getsockname(), timeout=5)
        mine, _ = listening.accept()
    for end in (mine, peer):
        end.setblocking(False)
        # Every write is seen by the other end at once (no Nagle delay).
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return mine, peer


class _Listening:
    """What an accepted connection asks of its port."""

    _realPortNumber = 8443

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8443)


class _TLSClient:
    """The client's TLS connection, in memory (what curl's OpenSSL does)."""

    def __init__(self, caPEM: bytes | None, serverName: bytes, alpn: list[bytes]) -> None:
        from OpenSSL import crypto

        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if caPEM is not None:
            store = context.get_cert_store()
            assert store is not None
            store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, caPEM))
            context.set_verify(SSL.VERIFY_PEER)
        context.set_alpn_protos(alpn)
        self.connection = SSL.Connection(context, None)
        self.connection.set_tlsext_host_name(serverName)
        self.connection.set_connect_state()

    def outgoing(self) -> bytes:
        try:
            return self.connection.bio_read(1 << 20)
        except SSL.WantReadError:
            return b""

    def incoming(self, data: bytes) -> bytes:
        if data:
            self.connection.bio_write(data)
        try:
            self.connection.do_handshake()
        except SSL.WantReadError:
            return b""
        out = []
        while True:
            try:
                out.append(self.connection.recv(1 << 16))
            except (SSL.WantReadError, SSL.ZeroReturnError):
                break
        return b"".join(out)


class SocketWire:
    """One accepted connection serving C{factory}'s protocol over a socket pair."""

    opened: list[SocketWire] = []
    """Every wire not closed yet (L{closeAll})."""

    @classmethod
    def closeAll(cls) -> None:
        """Close every wire (a fixture's clean-up)."""
        while cls.opened:
            cls.opened.pop().close()

    def __init__(
        self,
        factory: Any,
        clock: Any,
        tls: Any = None,
        caPEM: bytes | None = None,
        serverName: bytes = b"a.example",
        alpn: tuple[bytes, ...] = (b"http/1.1",),
        transportClass: type | None = None,
    ) -> None:
        """
        @param factory: what a listener serves (its site).
        @param clock: the TLS layer's clock (advanced by L{pump}).
        @param tls: a server connection creator, for a TLS listener.
        @param transportClass: the TCP transport, when not what a listener
            would accept the connection as (Twisted's C{tcp.Server} stands
            for a backend connection's C{tcp.Client}: the same write path).
        """
        self.clock = clock
        self.reactor = MemoryReactorClock()
        self.mine, self.peer = _connectedPair()
        self.opened.append(self)
        served = tlsServerFactory(tls, factory, clock) if tls is not None else factory
        protocol = served.buildProtocol(IPv4Address("TCP", *PEER))
        if transportClass is None:
            transportClass = LeanServer if fastPaths().tcp else tcp.Server
        self.tcp = transportClass(self.mine, protocol, PEER, _Listening(), 1, self.reactor)
        protocol.makeConnection(self.tcp)
        self.tlsProtocol = protocol if tls is not None else None
        self.protocol = protocol.wrappedProtocol if tls is not None else protocol
        """The application's protocol (what the factory built)."""
        self.transport = protocol if tls is not None else self.tcp
        """The transport the application writes to."""
        self.client = _TLSClient(caPEM, serverName, list(alpn)) if tls is not None else None
        self.closed: Failure | None = None
        self._received = b""
        if self.client is not None:
            for _ in range(10):
                try:
                    self.client.connection.do_handshake()
                except SSL.WantReadError:
                    pass
                self._toServer(self.client.outgoing())
                if not self.pump() and self.client.connection.get_peer_finished() is not None:
                    break

    def close(self) -> None:
        if self in self.opened:
            self.opened.remove(self)
        self.mine.close()
        self.peer.close()

    @property
    def disconnecting(self) -> bool:
        """Whether the server closed, or is closing, the connection."""
        self.pump()
        return bool(self.transport.disconnecting or self.tcp.disconnected)

    # The peer's side ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """The peer sends C{data} (encrypted, with TLS); then L{pump}."""
        if self.client is not None:
            self.client.connection.send(data)
            data = self.client.outgoing()
        self._toServer(data)
        self.pump()

    def received(self) -> bytes:
        """Everything the peer received so far (after L{pump})."""
        self.pump()
        return self._received

    def peek(self) -> bytes:
        """What reached the peer's socket so far, without running anything
        on the server's side (no timer, no queued write)."""
        self._fromServer()
        return self._received

    def deliver(self, data: bytes) -> bytes:
        """
        The peer sends C{data} and the server reads it, and no more: no
        timer runs and nothing the transport queued is written.

        @return: what reached the peer's socket meanwhile (decrypted).
        """
        if self.client is not None:
            self.client.connection.send(data)
            data = self.client.outgoing()
        self.peer.sendall(data)
        self._read()
        self._fromServer()
        return self._received

    # Moving bytes --------------------------------------------------------------

    def _toServer(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.peer.send(view)
            except BlockingIOError:
                # The socket is full: let the server read (or answer) first.
                if not (self._read() | self._write() | self._fromServer()):
                    raise AssertionError("the server reads nothing and the socket is full")
                continue
            view = view[sent:]
            self._read()

    def pump(self) -> bool:
        """
        Run what the reactor would: due timers (the TLS layer's next turn),
        writes the transport queued, reads while it reads; until nothing
        moves.  C{True} if anything did.
        """
        moved = False
        for _ in range(1000):
            self.clock.advance(0)
            self.reactor.advance(0)
            step = self._write() | self._read() | self._fromServer()
            if not step:
                break
            moved = True
        return moved

    def _read(self) -> bool:
        moved = False
        while self.closed is None and self.tcp in self.reactor.readers:
            if not select.select([self.mine], [], [], 0)[0]:
                break
            why = self.tcp.doRead()
            moved = True
            if why is not None:
                self._lost(why)
        return moved

    def _write(self) -> bool:
        moved = False
        while self.closed is None and self.tcp in self.reactor.writers:
            before = len(self.tcp.dataBuffer) - self.tcp.offset + sum(map(len, self.tcp._tempDataBuffer))
            why = self.tcp.doWrite()
            if why is not None:
                self._lost(why)
                return True
            after = len(self.tcp.dataBuffer) - self.tcp.offset + sum(map(len, self.tcp._tempDataBuffer))
            if after == before:
                break
            moved = True
        return moved

    def _fromServer(self) -> bool:
        chunks = []
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                break
            except ConnectionResetError:
                # The server closed with bytes of ours unread.
                break
            if not chunk:
                break
            chunks.append(chunk)
        if not chunks:
            return False
        data = b"".join(chunks)
        if self.client is not None:
            data = self.client.incoming(data)
            self._toServer(self.client.outgoing())
        self._received += data
        return True

    def _lost(self, why: Any) -> None:
        self.closed = Failure(why)
        self.tcp.connectionLost(self.closed)
