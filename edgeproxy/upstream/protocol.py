# -*- test-case-name: tests.test_client -*-
"""
L{UpstreamConnection}: one HTTP/1.1 connection to a backend, one request at
a time, and everything about that request on the wire.

Sending: the head in one write (L{edgeproxy.h1.writeRequestHead}), then the
body from its producer, registered with the transport as a streaming
producer; a producer writing more or fewer bytes than it declared fails the
request.  A request with C{Expect: 100-continue} and a body waits for the
backend before its body (RFC 9110 10.1.1): an interim response lets the body
go, a final one means the body is not sent (and the connection is not
reused, its framing being unknown), and after L{EXPECT_TIMEOUT} seconds of
silence the body is sent anyway (and the receiver hears an interim C{100}
so that a client waiting for one sends its body too).

Receiving is L{edgeproxy.upstream.reading}'s (the connection's receiving
half, L{ResponseReading}): heads and bodies read with L{edgeproxy.h1},
interim responses passed on, reading paused while the body's reader
pauses.

Failures are Twisted's client classes, so that
L{edgeproxy.upstream.failures} reads them the same way whatever failed
(and L{RequestNotSent} when the connection was gone before the request):
C{RequestGenerationFailed} (the body producer failed, or the request was
cancelled while its body was being sent), C{RequestTransmissionFailed}
(lost while sending the body), C{ResponseNeverReceived} (no byte of a
response), C{ResponseFailed} (part of a head, a head h1 refuses inside it as
an L{edgeproxy.h1.RemoteProtocolError}, or a body cut short).

A response that arrives while the request body is still being sent is
handed over once it is complete (the body is then abandoned and the
connection closed) or once the body is sent, never while the request is
still being written to the same connection.  The end of the connection
ends a body delimited by it (RFC 9112 6.3 item 8) and fails anything else
still under way.

Reuse: the connection goes back to its L{ConnectionOwner} once the
response was read completely and the request completely sent, unless the
response's head did not allow it (L{edgeproxy.h1.ResponseHead.persistent}),
its body was delimited by the close, or unexpected bytes followed it.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol as _Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from edgeproxy._compat.twisted.tcp import immediateWriter
from edgeproxy.h1 import (
    BodyReader,
    Fields,
    LocalProtocolError,
    RemoteProtocolError,
    writeRequestHead,
)
from edgeproxy.upstream.backend import Backend
from edgeproxy.upstream.reading import (
    DONE,
    FAILED,
    IDLE,
    SENDING,
    WAITING,
    ResponseReading,
)
from edgeproxy.upstream.response import UpstreamReceiver, UpstreamResponse
from edgeproxy.upstream.sending import (
    BodyProducer,
    ChunkedConsumer,
    LengthConsumer,
    bodyLength,
)

__all__ = ["EXPECT_TIMEOUT", "ConnectionOwner", "RequestNotSent", "UpstreamConnection"]

log = Logger()

_NO_FIELDS = Fields.trusted({})

EXPECT_TIMEOUT = 1.0
"""Seconds a request with C{Expect: 100-continue} waits for the backend's
interim (or final) response before its body is sent anyway (RFC 9110
10.1.1: a client that does not wait indefinitely).  Short: the wait is on
the client's time, and a backend that ignores C{Expect} costs every such
request this much."""

_CLOSED = Failure(ConnectionDone("connection closed"))

class RequestNotSent(Exception):
    """
    The connection was gone (or busy) before the request could be written
    on it: nothing of the request reached the backend.
    """


class ConnectionOwner(Protocol):
    """What a connection tells the client that made it."""

    def connectionIdle(self, connection: UpstreamConnection) -> None:
        """C{connection} is done with its request and may serve another."""

    def connectionGone(self, connection: UpstreamConnection) -> None:
        """C{connection} is lost."""


def _expectsContinue(fields: Fields) -> bool:
    expect = fields.raw().get(b"expect")
    # RFC 9110 10.1.1: 100-continue is the only expectation defined
    # (case-insensitive).
    return expect is not None and any(
        value.strip(b" \t").lower() == b"100-continue" for value in expect
    )


class UpstreamConnection(ResponseReading, _Protocol):
    """
    One HTTP/1.1 connection to a backend, one request at a time.

    @ivar backend: the backend it is connected to (its owner's key).
    @ivar lost: the connection is gone.
    @ivar idleSince: for the owner: when it last became idle.
    @ivar idleTimer: for the owner: its idle timeout, if armed.
    @ivar closeWaiters: for the owner: fired once the connection is lost.
    """

    def __init__(self, owner: ConnectionOwner, backend: Backend, clock: IReactorTime) -> None:
        self._owner = owner
        self.backend = backend
        self._address = backend.address
        self._clock = clock
        self._state = IDLE
        # Per request:
        self._receiver: UpstreamReceiver | None = None
        self._method = b""
        self._buffer = b""
        self._received = False
        self._response: UpstreamResponse | None = None
        self._reader: BodyReader | None = None
        self._reusable = True
        self._producer: BodyProducer | None = None
        self._sending = False
        self._expecting = False
        self._expectTimer: IDelayedCall | None = None
        self._heldResponse: UpstreamResponse | None = None
        self._readPaused = False
        self._bodyPaused = False
        # The owner's bookkeeping:
        self.idleSince = 0.0
        self.idleTimer: Any = None
        self.closeWaiters: list[Deferred[None]] = []
        self.lost = False

    @property
    def idle(self) -> bool:
        """Whether the connection can take a request now."""
        return self._state is IDLE and not self.lost

    def connectionMade(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        # How a request head goes out: chosen once per connection.
        self._sendNow = immediateWriter(transport)

    def close(self) -> None:
        """Close the connection (idle, or given up on); it is never used again."""
        self._state = DONE
        self.transport.loseConnection()  # type: ignore[union-attr]

    # Sending -------------------------------------------------------------------

    def send(
        self,
        method: bytes,
        target: bytes,
        fields: Fields,
        body: BodyProducer | None,
        persistent: bool,
        receiver: UpstreamReceiver,
    ) -> None:
        """
        Send one request; its outcome goes to C{receiver} (possibly before
        this returns, for a request that cannot be sent); L{abandon}
        cancels it.

        @param fields: the request's fields, with exactly one C{host} and no
            framing fields (the framing comes from C{body}).
        @param persistent: whether the connection may be kept after this
            request (C{Connection: close} is sent when not).
        """
        if self._state is not IDLE or self.lost:
            receiver.upstreamFailed(Failure(RequestNotSent()))
            return
        length = bodyLength(body)
        try:
            head = writeRequestHead(method, target, fields, length, persistent)
        except LocalProtocolError:
            self._state = FAILED
            self.transport.abortConnection()  # type: ignore[union-attr]
            receiver.upstreamFailed(Failure(RequestGenerationFailed([Failure()])))
            return
        self._method = method
        self._buffer = b""
        self._received = False
        self._response = None
        self._reader = None
        self._reusable = persistent
        self._heldResponse = None
        self._receiver = receiver
        self._sendNow(self.transport, head)
        if body is None:
            self._state = WAITING
            return
        self._state = SENDING
        if length != 0 and _expectsContinue(fields):
            # Held until the backend answers or EXPECT_TIMEOUT passes (a
            # timer only for these rare requests).
            self._expecting = True
            self._producer = body
            self._expectTimer = self._clock.callLater(EXPECT_TIMEOUT, self._expectTimedOut)
            return
        self._startBody(body)

    def _startBody(self, body: BodyProducer) -> None:
        transport = self.transport
        self._sending = True
        self._producer = body
        consumer: Any
        if body.length is UNKNOWN_LENGTH:
            consumer = ChunkedConsumer(transport, body)
        else:
            consumer = LengthConsumer(transport, body)
        transport.registerProducer(body, True)  # type: ignore[union-attr]
        try:
            producing = body.startProducing(consumer)
        except Exception:
            producing = fail()
        producing.addCallbacks(
            self._bodySent, self._bodyFailed, callbackArgs=(consumer,), errbackArgs=(consumer,)
        )

    def _expectTimedOut(self) -> None:
        """
        The backend said nothing within L{EXPECT_TIMEOUT}: send the body
        anyway, and let the client send it too (a client that asked for
        C{100 Continue} may be waiting for one: it gets it from the proxy).
        """
        self._expectTimer = None
        receiver = self._receiver
        if self._expecting and receiver is not None:
            try:
                receiver.upstreamInterim(100, b"Continue", _NO_FIELDS)
            except Exception:
                log.failure("handing an interim upstream response over failed")
            if self._receiver is not receiver:
                return
        self._continue()

    def _continue(self) -> None:
        """The wait of C{Expect: 100-continue} is over: send the body."""
        self._expectTimer = None
        if self._expecting:
            self._expecting = False
            producer, self._producer = self._producer, None
            if producer is not None:
                self._startBody(producer)

    def _stopExpecting(self) -> None:
        """The held body will not be sent on this connection."""
        self._expecting = False
        timer, self._expectTimer = self._expectTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                log.failure("stopping a request body producer failed")

    def _bodySent(self, _: object, consumer: Any) -> None:
        if not self._sending:
            return
        try:
            consumer.finish()
        except Exception:
            self._bodyFailed(Failure(), consumer)
            return
        self._sending = False
        self._producer = None
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        if self._state is SENDING:
            self._state = WAITING
        held, self._heldResponse = self._heldResponse, None
        if held is not None:
            self._fire(held)

    def _bodyFailed(self, reason: Failure, consumer: Any) -> None:
        if not self._sending:
            return
        consumer.stop()
        self._sending = False
        self._producer = None
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self._reusable = False
        if self._state is SENDING:
            self._state = FAILED
            self.transport.abortConnection()  # type: ignore[union-attr]
            self._failRequest(Failure(RequestGenerationFailed([reason])))
        else:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def abandon(self, receiver: UpstreamReceiver) -> None:
        """
        The caller of the request whose outcome goes to C{receiver} gave up
        before the response head: abort the connection and fail the request
        with a C{CancelledError} inside Twisted's class for how far it got.
        Nothing happens when C{receiver}'s request is over (this connection
        may be serving another one by now).
        """
        if receiver is not self._receiver:
            return
        self._reusable = False
        self._state = FAILED
        if self._sending:
            self._stopSending()
            self.transport.abortConnection()  # type: ignore[union-attr]
            self._failRequest(Failure(RequestGenerationFailed([Failure(CancelledError())])))
            return
        if self._expecting:
            self._stopExpecting()
        self.transport.abortConnection()  # type: ignore[union-attr]
        cls = ResponseFailed if self._received else ResponseNeverReceived
        self._failRequest(Failure(cls([Failure(CancelledError())])))

    def _stopSending(self) -> None:
        producer, self._producer = self._producer, None
        self._sending = False
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                log.failure("stopping a request body producer failed")
            self.transport.unregisterProducer()  # type: ignore[union-attr]

    def _failRequest(self, failure: Failure) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            try:
                receiver.upstreamFailed(failure)
            except Exception:
                # Not this connection's problem: logged, as a Deferred
                # callback's error would be.
                log.failure("handling a failed upstream request failed")

    # After the response: reuse, and the end of the connection -------------------

    def _afterResponse(self) -> None:
        self._state = IDLE
        if self._readPaused:
            self._readPaused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        self._bodyPaused = False
        if self._reusable and not self.lost:
            self._owner.connectionIdle(self)
        else:
            self.close()

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        self.lost = True
        self._owner.connectionGone(self)
        response, self._response = self._response, None
        reader, self._reader = self._reader, None
        held, self._heldResponse = self._heldResponse, None
        sending = self._sending
        if sending:
            self._stopSending()
        elif self._expecting:
            self._stopExpecting()
        if self._receiver is not None:
            if sending:
                self._failRequest(Failure(RequestTransmissionFailed([reason])))
            else:
                cls = ResponseFailed if self._received else ResponseNeverReceived
                self._failRequest(Failure(cls([reason])))
            return
        if response is None or held is response:
            return
        if reader is not None:
            try:
                reader.eof()
            except RemoteProtocolError:
                response.bodyEnded(Failure(ResponseFailed([reason, Failure()], response)))
                return
            # RFC 9112 6.3 item 8: the close is the end of such a body.
            response.bodyEnded(Failure(PotentialDataLoss()))
            return
        response.bodyEnded(Failure(ResponseFailed([reason], response)))
