# -*- test-case-name: tests.test_server -*-
"""
The closing half of L{edgeproxy.http.server.HTTP1Connection}: how and when
a client connection ends, and the answers that end a request early.

  - the listener's view: whether a request is in flight (L{Closing.busy}),
    closing after the current response or at once when idle (drain,
    reload), and the two deadlines expiring (the header deadline: 408; the
    idle timeout: a silent close between requests, a cut request body);
  - early answers: a request body over the route's limit (413, or a cut
    when the response has begun), a request body that stopped arriving;
  - a refusal of what the client sent (the generic page, then close), a
    clean close (unregistering the response's producer first, so that TLS
    sends its close_notify) that becomes an abort after L{ABORT_TIMEOUT},
    and the abort.

A mixin with no state of its own: its attributes are the connection's slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionAborted
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy import h1
from edgeproxy.bodies import BodyPipe
from edgeproxy.errors import ContentTooLarge
from edgeproxy.pipeline.call import Call

__all__ = ["ABORT_TIMEOUT", "Closing"]

# The connection's namespace, as its other lines.
log = Logger(namespace="edgeproxy.http.server")

ABORT_TIMEOUT = 15.0
"""Seconds a connection told to close gets to flush before it is aborted
(the grace Twisted's C{HTTPChannel.abortTimeout} gives)."""


class Closing:
    """
    The ways an HTTP/1.1 connection ends (see the module docstring).
    """

    if not TYPE_CHECKING:
        # No slots of its own (the connection's are its attributes); hidden
        # from mypy, which would refuse every attribute set here.
        __slots__ = ()

    factory: Any
    transport: Any
    _call: Call | None
    _reader: h1.BodyReader | None
    _buffer: bytes
    _pipe: BodyPipe | None
    _persistent: bool
    _closing: bool
    _lost: bool
    _pendingHead: bytes | None
    _answered: bool
    _upgraded: Any
    _maxBody: int
    _awaitingHead: bool
    _abortCall: Any
    _registered: bool

    if TYPE_CHECKING:
        # The connection's (see HTTP1Connection); declared only, so that
        # nothing here stands before them in its method order.

        def _write(self, data: bytes) -> None: ...

        def _endCall(self, call: Call, reason: Failure | None) -> None: ...

    # The listener's view (drain, timers) --------------------------------------

    def busy(self) -> bool:
        """Whether a request is in flight on this connection (or a tunnel)."""
        upgraded = self._upgraded
        if upgraded is not None and self._call is None:
            # HTTP/2: its streams.
            return bool(upgraded.busy())
        return self._call is not None

    def closeAfterResponse(self) -> None:
        """
        Close once the current response is complete, saying so in it when
        its head is not written yet (RFC 9112 9.6).
        """
        self._persistent = False
        upgraded = self._upgraded
        if upgraded is not None and self._call is None:
            upgraded.closeAfterResponse()

    def closeIdle(self) -> None:
        """Close a connection that has no request in flight, cleanly."""
        upgraded = self._upgraded
        if upgraded is not None:
            if self._call is None:
                upgraded.closeIdle()
        elif self._call is None:
            self._loseConnection()

    def headExpired(self) -> None:
        """The header deadline passed: 408 and close."""
        if (
            self._awaitingHead
            and self._call is None
            and self._reader is None
            and not self._closing
        ):
            self._reject(408, self._buffer)

    def idleExpired(self) -> None:
        """
        The idle timeout passed: between requests the connection closes
        silently; a request body that stopped arriving is cut.
        """
        call = self._call
        if call is None:
            self._loseConnection()
        elif self._reader is not None:
            self._call = None
            self._abort()
            self._endCall(call, Failure(ConnectionAborted("client idle")))
        else:
            # Suspended while the request is answered: counted again from
            # the end of the response (moving a deadline is cheaper than
            # removing and adding it per request).
            self.factory.idleQueue.arm(self)

    # Early answers -------------------------------------------------------------

    def _bodyTooLarge(self) -> None:
        call = self._call
        error = ContentTooLarge(f"body over the limit of {self._maxBody} bytes")
        # Whatever holds the request (a stage, the backend) lets go first, so
        # that the body's failure below reaches nobody who would answer it
        # (a backend exchange would make it a 502); the client gets a 413
        # (or, with its response begun, a cut).
        if call is not None:
            call.stop()
        if self._pipe is not None:
            self._pipe.fail(Failure(error))
            self._pipe = None
        if call is None:
            return
        self._persistent = False
        if self._pendingHead is not None or self._answered:
            self._call = None
            self._abort()
            self._endCall(call, Failure(error))
            return
        call.fail(error)

    def _uploadIdle(self) -> None:
        log.warn("request body idle timeout: aborting backend and client")
        call = self._call
        self._call = None
        self._abort()
        if call is not None:
            self._endCall(call, Failure(ConnectionAborted("request body idle")))

    # Closing -------------------------------------------------------------------

    def _reject(self, status: int, received: bytes = b"", call: Call | None = None) -> None:
        """
        Refuse what the client sent: the page, then close.

        @param received: the refused head as far as it was read (its
            request line goes to the access log).
        @param call: the request refused after its head was taken (its
            body's framing), whose record is its own.
        """
        self._write(self.factory.rejectHead(status, self, received, call))
        self._closing = True
        self._loseConnection()

    def _loseConnection(self) -> None:
        if self._lost or self._abortCall is not None:
            return
        self._closing = True
        factory = self.factory
        factory.headQueue.disarm(self)
        factory.idleQueue.disarm(self)
        transport = self.transport
        if self._registered:
            # A TLS transport sends its close_notify, and so closes, only
            # once no producer is registered.
            self._registered = False
            transport.unregisterProducer()
        transport.loseConnection()
        self._abortCall = factory.clock.callLater(ABORT_TIMEOUT, self._abort)

    def _abort(self) -> None:
        self._closing = True
        if not self._lost and self.transport is not None:
            self.transport.abortConnection()
