"""
Connections made in a burst (a proxy started or restarted into traffic)
stay as compact as connections made one at a time.

CPython 3.11 takes one place for new attribute names from a class's shared
keys with each instance made.  A name a connection first sets some time
after it was made (when it holds small writes, when a producer registers:
every HTTP/2 connection) then no longer fits once twenty or so connections
were made before, and that connection, and every one made after it for
the life of the process, gets a dictionary of its own: about 0.8 KiB each.
The transports set every such name when they are made.

Each test makes connections of a class of its own (so that what earlier
tests did to the shared classes does not decide the outcome), once one at
a time and once all together, and compares what the same later events
allocate per connection (tracemalloc).
"""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from edgeproxy._compat.twisted.tcp import LeanClient, LeanServer
from edgeproxy._compat.twisted.tls import EdgeTLSTransport

BURST = 64

MARGIN = 64
"""Bytes per connection the burst may cost more: a dictionary is ~800."""


def _eventCost(made: list[Any], event: Callable[[Any], None]) -> float:
    """What C{event} allocates per connection, across C{made}."""
    total = 0
    tracemalloc.start()
    try:
        for item in made:
            before = tracemalloc.get_traced_memory()[0]
            event(item)
            total += tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return total / len(made)


def _compare(base: type, make: Callable[[type, int], Any], event: Callable[[Any], None]) -> tuple[float, float]:
    """
    (per connection made one at a time, per connection made together):
    what C{event} allocates, each with a new subclass of C{base}.
    """
    alone = type("Alone", (base,), {})
    costs = []
    for i in range(BURST):
        # Made, then its events, before the next one is made.
        costs.append(_eventCost([make(alone, i)], event))
    together = type("Together", (base,), {})
    made = [make(together, i) for i in range(BURST)]
    return sum(costs) / len(costs), _eventCost(made, event)


def _assertAlike(
    base: type, make: Callable[[type, int], Any], event: Callable[[Any], None], sockets: list[socket.socket]
) -> None:
    """L{_compare}, then the C{sockets} C{make} opened closed: the burst
    costs no more than L{MARGIN} per connection."""
    try:
        alone, together = _compare(base, make, event)
    finally:
        for s in sockets:
            s.close()
    assert together < alone + MARGIN, (alone, together)


def _fill(sock: socket.socket) -> None:
    """Send on non-blocking C{sock} until it takes nothing more (its peer
    reads nothing)."""
    try:
        while True:
            sock.send(b"-" * 65536)
    except BlockingIOError:
        pass


class _Producer:
    """A streaming producer that is never asked to do anything here."""

    def _nothing(self) -> None:
        pass

    pauseProducing = resumeProducing = stopProducing = _nothing


class _TCP:
    """What an EdgeTLSTransport needs of the TCP transport beneath it here."""

    __slots__ = ("producer",)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def test_tcpTransportsMadeTogetherThenGivenAProducer() -> None:
    """
    L{LeanServer}s accepted together, each then given a producer (as an
    HTTP/2 connection or a large body registers one), cost what those
    accepted one at a time cost.
    """
    reactor = MemoryReactorClock()
    sockets: list[socket.socket] = []
    producer = _Producer()

    def make(cls: type, i: int) -> Any:
        sockets.append(socket.socket())
        return cls(sockets[-1], Protocol(), ("127.0.0.1", 40000 + i), None, i, reactor)

    _assertAlike(LeanServer, make, lambda t: t.registerProducer(producer, True), sockets)


class _QuietReactor(MemoryReactorClock):
    """A reactor whose reader and writer sets do not grow with the
    connections (what they cost is the reactor's, not the connection's)."""

    def addReader(self, reader: Any) -> None:
        pass

    def removeReader(self, reader: Any) -> None:
        pass

    def addWriter(self, writer: Any) -> None:
        pass

    def removeWriter(self, writer: Any) -> None:
        pass


def test_tcpTransportsMadeTogetherThenWritingMoreThanTheSocketTakes() -> None:
    """
    L{LeanServer}s accepted together, each then given more than its socket
    takes while a producer is registered (a large response to a slow
    client: Twisted keeps the rest in C{dataBuffer} at C{offset} and pauses
    the producer), cost what those accepted one at a time cost.
    """
    reactor = _QuietReactor()
    sockets: list[socket.socket] = []
    producer = _Producer()

    def make(cls: type, i: int) -> Any:
        ours, peer = socket.socketpair()
        sockets.extend((ours, peer))
        ours.setblocking(False)
        _fill(ours)
        return cls(ours, Protocol(), ("127.0.0.1", 40000 + i), None, i, reactor)

    body = b"x" * (3 * 65536)

    def later(transport: Any) -> None:
        transport.registerProducer(producer, True)
        transport.write(body)
        transport.doWrite()

    _assertAlike(LeanServer, make, later, sockets)


class _Connector:
    """What a L{LeanClient} asks of its connector here."""

    def buildProtocol(self, addr: Any) -> Protocol:
        return Protocol()

    def connectionFailed(self, reason: Any) -> None:
        raise AssertionError(reason)

    def connectionLost(self, reason: Any) -> None:
        pass


def test_backendConnectionsDialledTogetherThenConnectedAndWriting() -> None:
    """
    L{LeanClient}s dialled together (a proxy started into traffic, a burst
    of requests beyond the kept-alive connections), each then connected,
    given a producer (a request body) and more than its socket takes, cost
    what those dialled one at a time cost.  Real sockets on 127.0.0.1; the
    reactor is driven by hand, as a reactor would: the resolved address a
    turn later, C{doWrite} once the socket is writable (connected).
    """
    listening = socket.socket()
    sockets = [listening]
    listening.bind(("127.0.0.1", 0))
    listening.listen(4 * BURST)
    host, port = listening.getsockname()
    reactor = _QuietReactor()
    connector = _Connector()
    producer = _Producer()
    body = b"x" * (3 * 65536)

    def make(cls: type, i: int) -> Any:
        client = cls(host, port, None, connector, reactor)
        sockets.append(client.getHandle())
        return client

    def later(client: Any) -> None:
        # Every client made so far learns its address (a turn later).
        reactor.advance(0)
        # Writable: connected.
        client.doWrite()
        assert client.connected
        handle = client.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        _fill(handle)
        client.registerProducer(producer, True)
        client.write(body)
        client.doWrite()

    _assertAlike(LeanClient, make, later, sockets)


def test_tlsTransportsMadeTogetherThenHoldingWritesAndAProducer() -> None:
    """
    L{EdgeTLSTransport}s made together, each then done with its handshake,
    holding a small write for the next turn, given a producer and rid of it
    again, cost what those made one at a time cost.
    """

    class Factory:
        _clock = Clock()

    factory = Factory()
    producer = _Producer()

    def make(cls: type, i: int) -> Any:
        transport = cls(factory, Protocol())
        # What makeConnection sets as each connection is made.
        transport.transport = _TCP()
        return transport

    def later(transport: Any) -> None:
        # What TLSMemoryBIOProtocol._checkHandshakeStatus sets once the
        # handshake is done.
        transport._handshakeDone = True
        transport._aggregate(b"x")
        transport.registerProducer(producer, True)
        transport.unregisterProducer()

    alone, together = _compare(EdgeTLSTransport, make, later)
    assert together < alone + MARGIN, (alone, together)


def test_tlsTransportsMadeTogetherConnectedLater() -> None:
    """
    Behind a PROXY-protocol listener, a TLS transport is made when its TCP
    connection is accepted but connected (C{makeConnection}) only once the
    PROXY header has been read: a burst of such connections costs what
    connections made and connected one at a time cost.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)

    def server(transport: Any) -> SSL.Connection:
        # Waiting for the ClientHello, as at the start of every connection.
        connection = SSL.Connection(context, None)
        connection.set_accept_state()
        return connection

    class Factory:
        _clock = Clock()
        _creatorCallable = staticmethod(server)

        def registerProtocol(self, protocol: Any) -> None:
            pass

    factory = Factory()
    tcp = StringTransport()

    def make(cls: type, i: int) -> Any:
        return cls(factory, Protocol())

    alone, together = _compare(EdgeTLSTransport, make, lambda t: t.makeConnection(tcp))
    assert together < alone + MARGIN, (alone, together)
