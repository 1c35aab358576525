# -*- test-case-name: tests.test_listeners,tests.test_tls_transport,tests.test_client,tests.test_server -*-
"""
The fast paths through Twisted's TCP transports (C{tcp.Server},
C{tcp.Client}), all reaching into their private state:

  - L{LeanServer}, the accepted connection of edgeproxy's TCP listeners
    (L{acceptAsLeanServer} sets a listening port's C{transport} class),
    which sends straight to the socket itself (L{LeanServer.writeNow});
  - L{sendNow}, which sends bytes straight to the socket when nothing is
    queued, through the transport's own C{writeSomeData}
    (C{dataBuffer}, C{_tempDataBuffer});
  - L{immediateWriter}, which picks once per connection the way a writer
    that knows nothing follows soon (a complete response, a request head)
    sends: one of the above with the fast paths, C{write} without.

C{tests/test_listeners.py} compares L{LeanServer} with Twisted's class,
C{tests/test_tls_transport.py} and
C{tests/integration/test_client_sockets.py} send through L{sendNow} on real
sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor

from edgeproxy._compat import fastPaths

__all__ = ["LeanServer", "acceptAsLeanServer", "immediateWriter", "sendNow"]


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

    def writeNow(self, data: bytes) -> None:
        """
        Write C{data}, straight to the socket when nothing is queued before
        it: L{sendNow} (see there why), for a connection of this class, as
        one call.
        """
        traffic = self.traffic
        if traffic is not None and self.connected and not self._writeDisconnected:
            traffic.sent += len(data)
        if not self.dataBuffer and not self._tempDataBuffer and self.connected and not self.disconnecting:
            sent = self.writeSomeData(data)
            if isinstance(sent, int):
                if sent == len(data):
                    return
                data = data[sent:]
        # Twisted queues bytes only (data may be a view: of a body held
        # whole, see edgeproxy.http.answering._Pieces).
        FileDescriptor.write(self, data if type(data) is bytes else bytes(data))

    @property  # type: ignore[override]
    def logstr(self) -> str:
        protocol = getattr(self, "protocol", None)
        prefix = "-" if protocol is None else self._getLogPrefix(protocol)
        return f"{prefix},{self.sessionno},{self.hostname}"

    @logstr.setter
    def logstr(self, value: str) -> None:
        # tcp.Server.__init__ assigns it; it is made again when asked for.
        pass

    @property  # type: ignore[override]
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


_DIRECT: frozenset[type] = frozenset((tcp.Client, tcp.Server, LeanServer))
"""
The transports L{sendNow} sends through directly: exactly these classes.
A TLS wrapper forwards unknown attributes to the TCP transport beneath it,
so duck typing would send plain text under TLS.
"""


def sendNow(transport: Any, data: bytes) -> bool:
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
    if (
        type(transport) in _DIRECT
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
    ):
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
    transport.write(data if type(data) is bytes else bytes(data))
    return False


def _write(transport: Any, data: bytes) -> None:
    # Twisted's transports take bytes only; a writer may give a view.
    transport.write(data if type(data) is bytes else bytes(data))


def immediateWriter(transport: Any) -> Callable[[Any, bytes], object]:
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
        return writeNow  # type: ignore[no-any-return]
    if type(transport) in _DIRECT and fastPaths().tcp:
        return sendNow
    return _write
