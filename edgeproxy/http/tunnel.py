# -*- test-case-name: tests.test_tunnel -*-
"""
L{Tunnel}: two connections joined into one byte pipe, for a WebSocket once
its handshake is done (L{edgeproxy.http.websocket}): backpressure both
ways, closed together, bounded by an idle timeout.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["ABORT_TIMEOUT", "Tunnel", "TunnelEnd"]

log = Logger()

ABORT_TIMEOUT = 15.0
"""Seconds a closing connection gets to flush before it is aborted."""


# The tunnel ---------------------------------------------------------------


class TunnelEnd(Protocol):
    """
    One side of a L{Tunnel}: what it receives is written to the other side.
    """

    # Its connection's TCP or TLS transport, or an HTTP/2 stream's end: a
    # producer and a consumer that can abort (Twisted declares an optional
    # ITransport).
    transport: Any

    def __init__(self, tunnel: Tunnel, name: str) -> None:
        self._tunnel = tunnel
        self.name = name
        """C{"client"} or C{"backend"}."""
        self.lost = False
        """Its connection is gone."""
        self.closing = False
        """The tunnel asked its connection to close."""
        self.received = 0
        """Bytes received from this side (and relayed to the other)."""

    def dataReceived(self, data: bytes) -> None:
        self._tunnel._relay(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._tunnel._endLost(self, reason)


class Tunnel:
    """
    Two connections joined into one byte pipe.

    Each transport is registered as the streaming producer of the other, so
    when one side reads slowly its send buffer fills, its transport pauses
    the other transport, and the kernel's window pushes back on the fast
    peer: memory stays bounded by the transports' buffers.  When either side
    goes away the other is closed after its pending bytes are flushed (and
    aborted if it has not gone within L{ABORT_TIMEOUT}).  When no byte has
    moved in either direction for C{idleTimeout} seconds, both are closed
    (an C{idleTimeout} of 0 or less: never).

    Connect L{client} and L{backend} (C{makeConnection}), then L{start}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idleTimeout: float,
        abortTimeout: float = ABORT_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._idleTimeout = idleTimeout
        self._abortTimeout = abortTimeout
        self.client = TunnelEnd(self, "client")
        self.backend = TunnelEnd(self, "backend")
        self.closedBy: str | None = None
        """What ended the tunnel: C{"client"}, C{"backend"} or C{"idle"}."""
        self._lastActivity = 0.0
        self._idleCall: IDelayedCall | None = None
        self._abortCall: IDelayedCall | None = None
        self._started = False
        self._joined = False
        self._clientLost: list[Deferred[Tunnel]] = []
        self.clientLostReason: Failure | None = None
        """Why the client's connection ended, once it has."""
        self._closed: list[Deferred[Tunnel]] = []

    def _other(self, end: TunnelEnd) -> TunnelEnd:
        return self.backend if end is self.client else self.client

    def whenClientLost(self) -> Deferred[Tunnel]:
        """
        @return: fires with this tunnel once the client's connection is gone
            (the backend is closing by then); the reason is in
            L{clientLostReason}.
        """
        d: Deferred[Tunnel] = Deferred()
        self._clientLost.append(d)
        return d

    def whenClosed(self) -> Deferred[Tunnel]:
        """@return: fires with this tunnel once both connections are gone."""
        d: Deferred[Tunnel] = Deferred()
        self._closed.append(d)
        return d

    def start(self, toBackend: bytes = b"", toClient: bytes = b"") -> None:
        """
        Join the two connected ends.

        @param toBackend: bytes the client sent before the tunnel existed;
            written to the backend first.
        @param toClient: bytes the backend sent after its response head;
            written to the client first.
        """
        self._started = True
        self._lastActivity = self._clock.seconds()
        for end in (self.client, self.backend):
            if end.lost:
                self._close(end.name)
                return
        clientTransport, backendTransport = self.client.transport, self.backend.transport
        clientTransport.registerProducer(backendTransport, True)
        backendTransport.registerProducer(clientTransport, True)
        self._joined = True
        if toBackend:
            self.client.received += len(toBackend)
            backendTransport.write(toBackend)
        if toClient:
            self.backend.received += len(toClient)
            clientTransport.write(toClient)
        if self._idleTimeout > 0:
            self._idleCall = self._clock.callLater(self._idleTimeout, self._checkIdle)

    def _relay(self, end: TunnelEnd, data: bytes) -> None:
        self._lastActivity = self._clock.seconds()
        end.received += len(data)
        other = self._other(end)
        if not other.lost and not other.closing:
            other.transport.write(data)

    def _checkIdle(self) -> None:
        # Re-arming a timer on every chunk is costly on a busy tunnel; the
        # chunk only records the time and the timer checks it when it fires.
        self._idleCall = None
        idle = self._clock.seconds() - self._lastActivity
        if idle >= self._idleTimeout:
            log.info(
                "websocket tunnel idle for {idle:.1f}s, closing both sides",
                idle=idle,
            )
            self._close("idle")
        else:
            self._idleCall = self._clock.callLater(self._idleTimeout - idle, self._checkIdle)

    def _close(self, cause: str) -> None:
        if self.closedBy is None:
            self.closedBy = cause
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None
        for end in (self.client, self.backend):
            if not end.lost and not end.closing and end.transport is not None:
                end.closing = True
                # A TLS transport only sends its close_notify once no
                # producer is registered, and a TCP one resumes a paused
                # producer instead of closing: unregister first.
                if self._joined:
                    end.transport.unregisterProducer()
                    # It may have been paused by the other side's full
                    # buffer; a paused transport never sees its peer's FIN
                    # or TLS close_notify, which a TLS close waits for.
                    # From here what it reads is dropped.
                    end.transport.resumeProducing()
                end.transport.loseConnection()
        if self._abortCall is None and not (self.client.lost and self.backend.lost):
            self._abortCall = self._clock.callLater(self._abortTimeout, self._abort)

    def _abort(self) -> None:
        self._abortCall = None
        for end in (self.client, self.backend):
            if not end.lost and end.transport is not None:
                log.info("websocket tunnel {side} did not close in time, aborting", side=end.name)
                end.transport.abortConnection()

    def _endLost(self, end: TunnelEnd, reason: Failure) -> None:
        if end.lost:
            return
        end.lost = True
        if self._started:
            self._close(end.name)
        if end is self.client:
            self.clientLostReason = reason
            clientLost, self._clientLost = self._clientLost, []
            for d in clientLost:
                d.callback(self)
        if self.client.lost and self.backend.lost:
            if self._abortCall is not None and self._abortCall.active():
                self._abortCall.cancel()
            self._abortCall = None
            closed, self._closed = self._closed, []
            for d in closed:
                d.callback(self)
