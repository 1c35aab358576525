# -*- test-case-name: tests.test_listeners,tests.test_tls_transport,tests.test_client,tests.test_server -*-
"""
The fast paths through Twisted's TCP transports (C{tcp.Server},
C{tcp.Client}), all reaching into their private state:

  - L{LeanServer}, the accepted connection of edgeproxy's TCP listeners
    (L{acceptAsLeanServer} sets a listening port's C{transport} class),
    which sends straight to the socket itself (L{LeanServer.writeNow});
  - L{LeanClient}, the connections to backends (L{connectingLean} gives
    the endpoints a view of the reactor whose C{connectTCP} makes them,
    through L{LeanConnector});
  - L{sendNow}, which sends bytes straight to the socket when nothing is
    queued, through the transport's own C{writeSomeData}
    (C{dataBuffer}, C{_tempDataBuffer});
  - L{immediateWriter}, which picks once per connection the way a writer
    that knows nothing follows soon (a complete response, a request head)
    sends: one of the above with the fast paths, C{write} without;
  - L{holdSends} and L{sendHeld}, between which (one batch of the
    reactor's I/O events, L{edgeproxy._compat.twisted.reactor}) the small
    sends of the above wait in the transport's own queue and then go out
    together.

C{tests/test_listeners.py} compares L{LeanServer} with Twisted's class,
C{tests/test_tls_transport.py} and
C{tests/integration/test_client_sockets.py} send through L{sendNow} on real
sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import Any

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import directlyProvides, providedBy

from edgeproxy._compat import fastPaths

__all__ = [
    "HOLD_BYTES",
    "HOLD_SECONDS",
    "HOLD_TRANSPORTS",
    "LeanClient",
    "LeanConnector",
    "LeanServer",
    "acceptAsLeanServer",
    "beforeEvent",
    "connectingLean",
    "holdSends",
    "immediateWriter",
    "sendHeld",
    "sendNow",
]


def _placeLateNames(transport: FileDescriptor) -> None:
    """
    Set, to their class defaults, the names Twisted's C{FileDescriptor}
    first sets on a transport later in its life: when a producer registers
    (every HTTP/2 connection at its start, every streamed body) and when
    the socket takes less than it is given and Twisted keeps the rest (a
    large response to a slow client: C{doWrite}'s C{dataBuffer} and
    C{offset}, C{write}'s C{producerPaused}).

    CPython 3.11 takes one place for new attribute names from a class's
    shared keys with each instance made, so after a burst of connections
    (a proxy started or restarted into traffic) a name first set later no
    longer fits, and every connection from then on, for the life of the
    process, gets a dictionary of its own (about 0.8 KiB;
    C{tests/test_burst_memory.py}).  Set when the transport is made, the
    names are there from the first one.
    """
    transport.producer = None
    transport.streamingProducer = False
    transport.producerPaused = False
    transport.dataBuffer = b""
    transport.offset = 0


class LeanServer(tcp.Server):
    """
    Twisted's accepted TCP connection without two strings stored per
    connection: its log prefix (C{logstr}) and its C{repr} (C{repstr}),
    which C{tcp.Server.__init__} formats for every connection and keeps,
    are made when asked for.  They are asked for rarely: C{logPrefix()} by
    Twisted's legacy log context, which
    L{edgeproxy._compat.twisted.reactor.dispatchWithoutLogContext} no
    longer sets up per event, and C{repr()} in debugging.  The text is the
    same as Twisted's, with the protocol the connection has at the time of
    asking (C{_getLogPrefix}, the port's C{_realPortNumber}).

    It also counts the bytes it is given to send (L{traffic}), those it
    sends straight to the socket (L{writeNow}) included.
    """

    traffic: Any = None
    """
    When set (by L{edgeproxy.http.listener}), an object whose C{sent} is
    increased by the bytes written while connected: counted here rather
    than by wrapping C{write} on every connection, which neither sees what
    L{writeNow} sends nor comes free (two bound methods per connection).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _placeLateNames(self)

    def write(self, data: bytes) -> None:
        traffic = self.traffic
        if traffic is not None and self.connected and not self._writeDisconnected:
            traffic.sent += len(data)
        FileDescriptor.write(self, data)

    def writeSequence(self, iovec: Any) -> None:
        traffic = self.traffic
        if traffic is not None:
            iovec = list(iovec)
            if self.connected and not self._writeDisconnected:
                traffic.sent += sum(map(len, iovec))
        FileDescriptor.writeSequence(self, iovec)

    def writeNow(self, data: bytes | memoryview) -> None:
        """
        Write C{data}, straight to the socket when nothing is queued before
        it: L{sendNow} (see there why), counted.
        """
        traffic = self.traffic
        if traffic is not None and self.connected and not self._writeDisconnected:
            traffic.sent += len(data)
        sendNow(self, data)

    @property
    def logstr(self) -> str:
        protocol = getattr(self, "protocol", None)
        prefix = "-" if protocol is None else self._getLogPrefix(protocol)
        return f"{prefix},{self.sessionno},{self.hostname}"

    @logstr.setter
    def logstr(self, value: str) -> None:
        # tcp.Server.__init__ assigns it; it is made again when asked for.
        pass

    @property
    def repstr(self) -> str:
        protocol = getattr(self, "protocol", None)
        port = getattr(self.server, "_realPortNumber", "?")
        return f"<{type(protocol).__name__} #{self.sessionno} on {port}>"

    @repstr.setter
    def repstr(self, value: str) -> None:
        pass


def acceptAsLeanServer(port: Any) -> bool:
    """
    Make C{port} accept its connections as L{LeanServer} if it accepts them
    as Twisted's C{tcp.Server} (C{tcp:}, C{ssl:} and adopted C{systemd:}
    ports: C{tcp.Port} builds each from its C{transport} attribute).

    @return: whether C{port} was changed.
    """
    if getattr(port, "transport", None) is tcp.Server:
        port.transport = LeanServer
        return True
    return False


class LeanClient(tcp.Client):
    """
    Twisted's connection to a backend, with every name it sets on itself
    during a connection's life set when it is made, and its log prefix made
    when asked for, as L{LeanServer}'s.

    Beside the names of every transport (L{_placeLateNames}: many
    connections are dialled at once when a proxy starts into traffic, or
    requests burst beyond the kept-alive ones), Twisted sets
    C{realAddress}, C{doWrite} and C{doRead} on a client a reactor turn
    after it is made, C{connected} and C{logstr} once connected, and
    C{disconnecting} and C{disconnected} as it closes.
    """

    def __init__(
        self, host: str, port: int, bindAddress: Any, connector: Any, reactor: Any = None
    ) -> None:
        self.realAddress: Any = None
        # Set to doConnect while connecting, deleted once connected (the
        # class's methods again): the names are given their places now
        # and left unset.
        self.doWrite = self.doRead = None  # type: ignore[method-assign,assignment]
        del self.doWrite, self.doRead
        self.connected = 0
        _placeLateNames(self)
        # And as it closes, which backend connections do all the time (a
        # backend's keep-alive timeout, a pool's): made a dictionary then,
        # a connection is one more allocation and copy at its end.
        self.disconnecting = 0
        self.disconnected = 0
        super().__init__(host, port, bindAddress, connector, reactor)

    @property
    def logstr(self) -> str:
        # Twisted's text once connected; its class default before.
        protocol = getattr(self, "protocol", None)
        if protocol is None:
            return "Uninitialized"
        return f"{self._getLogPrefix(protocol)},client"

    @logstr.setter
    def logstr(self, value: str) -> None:
        # _connectDone assigns it; it is made again when asked for.
        pass


class LeanConnector(tcp.Connector):
    """Twisted's connector, connecting with a L{LeanClient}."""

    def _makeTransport(self) -> LeanClient:
        return LeanClient(self.host, self.port, self.bindAddress, self, self.reactor)


class _LeanConnecting:
    """
    A reactor as client endpoints see it, whose C{connectTCP} connects
    with a L{LeanConnector}; everything else is the reactor's own (it
    provides the reactor's interfaces, so that C{HostnameEndpoint} finds
    its name resolver).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        directlyProvides(self, providedBy(reactor))

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> Any:
        if not fastPaths().tcp:
            # Decided when the service starts, after its pools were built.
            return self._reactor.connectTCP(host, port, factory, timeout, bindAddress)
        connector = LeanConnector(host, port, factory, timeout, bindAddress, self._reactor)
        connector.connect()
        return connector

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def connectingLean(reactor: Any) -> Any:
    """
    What client endpoints should be given as their reactor: for a reactor
    whose C{connectTCP} is the POSIX one (Twisted's C{tcp.Connector}), a
    view of C{reactor} whose C{connectTCP} connects with a L{LeanClient}
    while the process has the TCP fast paths (and with Twisted's own
    connector without them); for any other (a test's memory reactor),
    C{reactor} itself.
    """
    if isinstance(reactor, PosixReactorBase):
        return _LeanConnecting(reactor)
    return reactor


_DIRECT: frozenset[type] = frozenset((tcp.Client, tcp.Server, LeanServer, LeanClient))
"""
The transports L{sendNow} sends through directly: exactly these classes.
A TLS wrapper forwards unknown attributes to the TCP transport beneath it,
so duck typing would send plain text under TLS.
"""


HOLD_BYTES = 16384
"""The largest send held until the end of a batch of I/O events (a TLS
record's worth): a larger one goes at once, as it did before."""

HOLD_TRANSPORTS = 32
"""Transports whose sends are held at once: the next one sends them all
(and goes on holding), so that a batch of thousands of events delays no
send by more than this many events' work."""

HOLD_SECONDS = 0.001
"""How long a send is held at most, give or take one event's work: before
each event of a batch, what was held longer goes (L{beforeEvent}), so that
an event that takes long (a large body compressed) does not hold back the
responses made before it past its end."""

_heldSince = 0.0
"""When the first send of what is held now was held."""

_held: dict[Any, None] | None = None
"""The transports whose sends wait in their queue for L{sendHeld}, while
a batch of I/O events is dispatched; L{None} outside one."""


def holdSends() -> None:
    """
    From now until L{sendHeld}, hold the small sends of L{sendNow} (and of
    the writers built on it) in the transport's own queue.

    Why: a send that makes a sleeping peer runnable wakes it, and when the
    peer's CPU is another one that is an inter-processor interrupt, which
    in a virtual machine is an exit to the hypervisor: under R1 load, 1.6
    of them per request (the backend woken for the request, the client for
    the response) were 35 us of system time and more of user time per
    request, a third of the proxy's CPU (docs/performance.rst, Run 11).
    Sent back to back after the batch, the first send of a batch wakes the
    peer and the others find it awake: 0.08 per request.
    """
    global _held
    _held = {}


def beforeEvent(selectable: Any) -> None:
    """
    Before an event of the batch is dispatched to C{selectable}: what it
    holds goes first (its event may be the peer's end, after which the
    socket is closed), and what was held for longer than L{HOLD_SECONDS}
    goes, holding going on.
    """
    held = _held
    if held:
        if selectable in held:
            del held[selectable]
            _sendQueued(selectable)
        if monotonic() - _heldSince > HOLD_SECONDS:
            sendHeld()
            holdSends()


def sendHeld() -> None:
    """Send what was held since L{holdSends}, in the order it was written,
    and hold nothing more."""
    global _held
    held, _held = _held, None
    if held:
        for transport in held:
            _sendQueued(transport)


def _sendQueued(transport: Any) -> None:
    """
    Send the bytes held in C{transport}'s queue (and any queued after
    them) straight to the socket, unless the reactor wrote part of them
    meanwhile (then it carries on) or the connection is gone (Twisted has
    dropped its queue).
    """
    if not transport.connected or transport.dataBuffer:
        return
    queued = transport._tempDataBuffer
    if not queued:
        return
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    _send(transport, queued[0] if len(queued) == 1 else b"".join(queued))


def sendNow(transport: Any, data: bytes | memoryview) -> bool:
    """
    Write C{data} to C{transport}, straight to the socket when nothing is
    queued before it.

    Twisted's TCP transport never sends in C{write}: it queues, registers
    the socket for writability, sends on the next reactor turn and
    unregisters it (two C{epoll_ctl} calls and one more event per write),
    and a queue of more than C{bufferSize} (64 KiB) pauses the producer
    until then, so a large body paused and resumed the backend's socket
    every 64 KiB for bytes the kernel could take at once.  With the
    transport's buffers empty the bytes go out through its own
    C{writeSomeData} (what C{doWrite} would call); whatever the kernel does
    not take, or an error (which C{doWrite} then reports as usual), is
    queued as before, so a slow peer still pauses its producer.  Any other
    transport gets a plain C{write}.

    C{writeSomeData} sends at most C{SEND_LIMIT} (128 KiB) a call: a larger
    C{data} (a 1 MiB cache hit's records) goes in as many calls as the
    kernel takes whole, and only what it leaves is copied into the queue.
    C{data} may be any bytes-like object (L{edgeproxy._compat.pyopenssl.encrypt}
    gives the records of a large write as one cffi buffer); what is queued
    is C{bytes}, as Twisted's transports require (a copy: C{data} may be
    a buffer its owner fills again once this returns).

    @return: whether all of C{data} went to the socket; if not, the rest is
        queued (or written to a transport of another kind).
    """
    global _heldSince
    held = _held
    if held is not None and type(transport) in _DIRECT:
        if transport in held:
            if len(data) > HOLD_BYTES or not transport.connected:
                # What was held goes first, then this as it would have gone.
                del held[transport]
                _sendQueued(transport)
                return _send(transport, data)
        elif len(data) > HOLD_BYTES or not _straight(transport):
            return _send(transport, data)
        else:
            if len(held) >= HOLD_TRANSPORTS:
                sendHeld()
                holdSends()
                held = _held
                assert held is not None
            if not held:
                _heldSince = monotonic()
            held[transport] = None
        # In the queue Twisted writes from, without registering for
        # writability: whatever is written after comes after it, by this
        # function or by Twisted's write.
        transport._tempDataBuffer.append(data if type(data) is bytes else bytes(data))
        transport._tempDataLen += len(data)
        return True
    return _send(transport, data)


def _straight(transport: Any) -> bool:
    """Whether C{transport} (one of L{_DIRECT}) may be written to straight:
    connected, not closing, not under TLS, nothing queued."""
    return (
        not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
    )


def _send(transport: Any, data: bytes | memoryview) -> bool:
    """L{sendNow} without holding."""
    if type(transport) in _DIRECT and _straight(transport):
        total = len(data)
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == total:
                return True
            limit = transport.SEND_LIMIT
            if sent == limit:
                view = memoryview(data)
                done = sent
                while sent == limit:
                    sent = transport.writeSomeData(view[done:])
                    if not isinstance(sent, int):
                        break
                    done += sent
                    if done == total:
                        return True
                data = view[done:]
            else:
                data = data[sent:]
        # else: an error instance; queue the bytes, doWrite reports it.
    data = data if type(data) is bytes else bytes(data)
    if type(transport) in _DIRECT and not transport.TLS:
        # Twisted's queue without LeanServer.write, which would count the
        # bytes its writeNow counted already.
        FileDescriptor.write(transport, data)
    else:
        transport.write(data)
    return False


def _write(transport: Any, data: bytes | memoryview) -> None:
    # Twisted's transports take bytes only; a writer may give a view.
    transport.write(data if type(data) is bytes else bytes(data))


def immediateWriter(transport: Any) -> Callable[[Any, bytes | memoryview], object]:
    """
    The function a writer that knows nothing follows soon (a complete
    response, a request head) sends bytes to C{transport} with, chosen once
    per connection and called as C{send(transport, data)}: the
    C{writeNow} of the transport's class when it has one
    (L{edgeproxy._compat.twisted.tls.EdgeTLSTransport}: its class, not the
    instance, since a TLS wrapper forwards unknown attributes), L{sendNow}
    for a TCP transport with the fast paths on, else its C{write}.

    Plain functions, shared by every connection, rather than a method
    bound to each: a bound method is 64 bytes a connection kept for the
    connection's life (R4 in C{docs/performance.rst}).
    """
    writeNow = getattr(type(transport), "writeNow", None)
    if writeNow is not None:
        # EdgeTLSTransport, LeanServer.
        return writeNow
    if type(transport) in _DIRECT and fastPaths().tcp:
        return sendNow
    return _write
