# -*- test-case-name: tests.test_client -*-
"""
The receiving half of L{edgeproxy.upstream.protocol.UpstreamConnection}:
the response to the request on the connection, read off the wire.

Heads are found and read by L{edgeproxy.h1} (one policy for every
response; a head it refuses fails the request, as does one over
L{MAX_HEAD}); interim (1xx) responses other than C{101} are passed on as
they come (RFC 9110 15.2: a proxy forwards them), and one ends the wait of
C{Expect: 100-continue}; the body is framed by L{edgeproxy.h1.bodyFraming}
and read with h1's readers (no body for C{HEAD}, C{204}, C{304}; strict
chunked; the end of the connection for a body with neither length nor
coding).  Reading pauses while the body has no reader and whenever that
reader pauses it (L{ResponseReading} is the response's C{BodySource}).

A response that arrives while the request body is still being sent is
held: handed over once it is complete (the body is then abandoned and the
connection closed) or once the body is sent.

The states a connection goes through are named here, below both halves of
it: L{IDLE}, L{SENDING} (the head is sent, the body not yet completely),
L{WAITING} (for the rest of the response), L{DONE} (closing, never used
again), L{FAILED} (the request failed; closing).

A mixin with no state of its own: its attributes are the connection's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from edgeproxy.h1 import (
    CHUNKED,
    CLOSE_DELIMITED,
    NO_BODY,
    BodyReader,
    ChunkedReader,
    CloseReader,
    LengthReader,
    RemoteProtocolError,
    ResponseHead,
    bodyFraming,
    parseResponseHead,
    splitResponseHead,
)
from edgeproxy.upstream.response import BODY_DONE, UpstreamReceiver, UpstreamResponse

__all__ = ["DONE", "FAILED", "IDLE", "MAX_HEAD", "SENDING", "WAITING", "ResponseReading"]

# The connection's namespace, as its other lines.
log = Logger(namespace="edgeproxy.upstream.protocol")

MAX_HEAD = 64 * 1024
"""A response head longer than this is refused."""

# States of a connection.
IDLE = "IDLE"
SENDING = "SENDING"  # the head is sent, the body is not (yet) completely
WAITING = "WAITING"  # the request is sent: waiting for (the rest of) the response
DONE = "DONE"  # closing, never used again
FAILED = "FAILED"  # the request failed; closing


class ResponseReading:
    """
    Reads the response to the connection's request (see the module
    docstring).
    """

    transport: ITransport | None
    lost: bool
    _state: str
    _address: str
    _receiver: UpstreamReceiver | None
    _method: bytes
    _buffer: bytes
    _received: bool
    _response: UpstreamResponse | None
    _reader: BodyReader | None
    _reusable: bool
    _sending: bool
    _expecting: bool
    _expectTimer: IDelayedCall | None
    _heldResponse: UpstreamResponse | None
    _readPaused: bool
    _bodyPaused: bool

    if TYPE_CHECKING:
        # The connection's (see UpstreamConnection); declared only, so that
        # nothing here stands before them in its method order.

        def close(self) -> None: ...

        def _continue(self) -> None: ...

        def _stopExpecting(self) -> None: ...

        def _stopSending(self) -> None: ...

        def _failRequest(self, failure: Failure) -> None: ...

        def _afterResponse(self) -> None: ...

    # Heads -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        if reader is not None:
            try:
                piece = reader.feed(data)
            except RemoteProtocolError:
                self._bodyError(Failure())
                return
            if piece:
                self._response.bodyReceived(piece)  # type: ignore[union-attr]
            if reader.done:
                self._bodyComplete(reader.rest)
            return
        if self._state is not SENDING and self._state is not WAITING:
            # Bytes nobody asked for (idle in the pool, or after a
            # response): the connection's framing is lost.
            self._reusable = False
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._received = True
        buffer = self._buffer + data if self._buffer else data
        receiver = self._receiver
        while True:
            try:
                found = splitResponseHead(buffer, MAX_HEAD)
                if found is None:
                    self._buffer = buffer
                    return
                head, end = found
                parsed = parseResponseHead(head)
            except RemoteProtocolError:
                self._headError(Failure())
                return
            buffer = buffer[end:]
            if parsed.status >= 200:
                self._buffer = b""
                self._headReceived(parsed, buffer)
                return
            self._interim(parsed)
            if self._receiver is not receiver or self._state is FAILED or self.lost:
                # Cancelled by the interim's receiver, or the body it let
                # go failed at once.
                return
            if not buffer:
                self._buffer = b""
                return

    def _interim(self, head: ResponseHead) -> None:
        if head.status == 101:
            # A switch nobody asked for (tunnels do not come here): ignored,
            # as RFC 9110 15.2 allows for an unexpected 1xx.
            return
        receiver = self._receiver
        if receiver is not None:
            try:
                receiver.upstreamInterim(head.status, head.reason, head.fields)
            except Exception:
                log.failure("handing an interim upstream response over failed")
        if self._expecting and self._receiver is receiver:
            # RFC 9110 10.1.1: the backend is ready for the body.
            timer, self._expectTimer = self._expectTimer, None
            if timer is not None and timer.active():
                timer.cancel()
            self._continue()

    def _headError(self, failure: Failure) -> None:
        self._reusable = False
        if self._sending:
            self._stopSending()
        elif self._expecting:
            self._stopExpecting()
        self._state = FAILED
        self.transport.loseConnection()  # type: ignore[union-attr]
        self._failRequest(Failure(ResponseFailed([failure])))

    def _headReceived(self, head: ResponseHead, rest: bytes) -> None:
        if not head.persistent:
            self._reusable = False
        if self._expecting:
            # RFC 9110 10.1.1: a final answer instead of 100 Continue; the
            # body is not sent, so the framing the head announced is never
            # completed: the connection cannot carry another request.
            self._stopExpecting()
            self._reusable = False
            self._state = WAITING
        framing = bodyFraming(head, self._method)
        response = UpstreamResponse(
            head.status, head.reason, head.fields, head.length, self._address, self
        )
        self._response = response
        # Like Twisted's client, stop reading until the body has a reader
        # (deliverBody resumes).  Besides bounding what is buffered, this
        # takes the backend off the poller and back on after the client's
        # response head was queued, so a backend closing right after its
        # head is seen after that head went out (a reset client connection
        # would hide the head).  A body already complete in the bytes at
        # hand is not paused for: the connection is released before the
        # response is handed over, so the pause would only cost two
        # epoll_ctl calls.
        if framing == NO_BODY or framing == 0:
            self._bodyComplete(rest)
        elif framing > 0 and len(rest) >= framing:
            # The whole body came with its head (most small responses).
            response.bodyReceived(rest[:framing])
            self._bodyComplete(rest[framing:])
        else:
            reader: BodyReader
            if framing == CHUNKED:
                reader = ChunkedReader()
            elif framing == CLOSE_DELIMITED:
                # RFC 9112 6.3 item 8: the body ends with the connection.
                reader = CloseReader()
                self._reusable = False
            else:
                reader = LengthReader(framing)
            self._reader = reader
            if rest:
                try:
                    piece = reader.feed(rest)
                except RemoteProtocolError:
                    self._pauseRead()
                    self._bodyError(Failure())
                    return
                if piece:
                    response.bodyReceived(piece)
                if reader.done:
                    self._bodyComplete(reader.rest)
            if self._reader is not None:
                self._pauseRead()
        if self._receiver is None:
            return
        if self._sending:
            # The backend answered before the request body was sent: hand
            # the response over once it is complete or the body is sent.
            self._heldResponse = response
            if not response.delivered and self._response is response:
                self._pauseRead()
            return
        self._fire(response)

    def _fire(self, response: UpstreamResponse) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is None:
            return
        try:
            receiver.upstreamResponded(response)
        except Exception:
            log.failure("handing an upstream response over failed")

    # The response body's flow (BodySource) -----------------------------------------

    def bodyDelivering(self) -> None:
        if self._readPaused and not self._bodyPaused:
            self._readPaused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def pauseBody(self) -> None:
        self._bodyPaused = True
        self._pauseRead()

    def resumeBody(self) -> None:
        self._bodyPaused = False
        if self._readPaused and (self._response is None or self._response.delivered):
            self._readPaused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopBody(self) -> None:
        self._reusable = False
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _pauseRead(self) -> None:
        if not self._readPaused:
            self._readPaused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _bodyComplete(self, rest: bytes) -> None:
        self._reader = None
        if rest:
            # Bytes after a complete response: the backend's framing is not
            # what it said; never reuse this connection.
            self._reusable = False
        response, self._response = self._response, None
        if self._sending:
            # Complete response while the request body is still being
            # sent: hand it over now, stop sending, and close the
            # connection (what the backend does with the rest of the body
            # is unknown).
            self._stopSending()
            self._reusable = False
            self.close()
            held, self._heldResponse = self._heldResponse, None
            if held is not None:
                self._fire(held)
        else:
            self._afterResponse()
        if response is not None:
            response.bodyEnded(BODY_DONE)

    def _bodyError(self, failure: Failure) -> None:
        self._reader = None
        self._reusable = False
        self._state = FAILED
        self.transport.loseConnection()  # type: ignore[union-attr]
        response, self._response = self._response, None
        held, self._heldResponse = self._heldResponse, None
        if self._sending:
            self._stopSending()
        if self._receiver is not None:
            # Still held (request body in progress): the caller gets the
            # failure instead of a broken response.
            self._failRequest(Failure(ResponseFailed([failure], response)))
            return
        if response is not None and held is not response:
            response.bodyEnded(Failure(ResponseFailed([failure], response)))
