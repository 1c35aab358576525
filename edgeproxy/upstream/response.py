# -*- test-case-name: tests.test_client -*-
"""
L{UpstreamResponse}: a backend's response as the pool hands it over (status,
reason, the message's own fields, the declared length, the backend that
answered), and the delivery of its body; L{UpstreamReceiver}: who is handed
it.

The body is delivered the way Twisted's C{IResponse.deliverBody} does it, to
one protocol: C{makeConnection} with the response itself as the transport
(an C{IPushProducer}: pausing, resuming or giving up on the body),
C{dataReceived} per piece, then one C{connectionLost}: L{BODY_DONE} when
complete, C{PotentialDataLoss} for a body the backend ended by closing its
connection, a C{ResponseFailed} when it was cut short.

The response reads its body from a L{BodySource} (the backend connection),
and keeps what arrives before C{deliverBody} is called.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.bodies import BODY_DONE
from edgeproxy.h1 import Fields

__all__ = ["BODY_DONE", "BodySource", "UpstreamReceiver", "UpstreamResponse"]


class UpstreamReceiver(Protocol):
    """
    Who learns the outcome of one request: any number of
    L{upstreamInterim} calls, then exactly one of L{upstreamResponded} and
    L{upstreamFailed}, unless the request is cancelled first (then nothing
    more).
    """

    def upstreamInterim(self, status: int, reason: bytes, fields: Fields) -> None:
        """An interim (1xx) response other than C{101} arrived."""

    def upstreamResponded(self, response: UpstreamResponse) -> None:
        """The final response head arrived."""

    def upstreamFailed(self, failure: Failure) -> None:
        """The request failed."""


class BodySource(Protocol):
    """What a response asks of the connection its body comes from."""

    def bodyDelivering(self) -> None:
        """The body has a reader now: reading may resume."""

    def pauseBody(self) -> None: ...

    def resumeBody(self) -> None: ...

    def stopBody(self) -> None:
        """Nobody wants the rest: close the connection."""


@implementer(IPushProducer)
class UpstreamResponse:
    """
    One response from a backend.

    @ivar status: the status code.
    @ivar reason: the reason phrase (possibly empty).
    @ivar fields: the message's own fields: no connection or framing
        fields, no C{Content-Length} (L{edgeproxy.h1.ResponseHead.fields}).
    @ivar length: the C{Content-Length}, or L{None}; for a response with no
        body (to C{HEAD}, C{204}, C{304}) the length it declared.
    @ivar backend: the address of the backend that answered (C{host:port}).
    @ivar whenDelivered: called once, just before the body protocol's
        C{connectionLost} (the end of the body, complete or not); the pool
        ends the request's in-flight count there.
    @ivar delivered: whether L{deliverBody} was called.
    @ivar traffic: an L{edgeproxy.metrics.Traffic} the body bytes delivered
        are added to (C{received}), when the pool set one before
        L{deliverBody}.
    """

    __slots__ = (
        "status", "reason", "fields", "length", "backend", "whenDelivered", "delivered",
        "traffic", "_protocol", "_buffer", "_outcome", "_source", "__weakref__",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        fields: Fields,
        length: int | None,
        backend: str,
        source: BodySource,
    ) -> None:
        self.status = status
        self.reason = reason
        self.fields = fields
        self.length = length
        self.backend = backend
        self.whenDelivered: Callable[[], None] | None = None
        self.delivered = False
        self.traffic: Any = None
        self._protocol: Any = None
        self._buffer: list[bytes] | None = []
        self._outcome: Failure | None = None
        self._source: BodySource | None = source

    def deliverBody(self, protocol: Any) -> None:
        """
        Deliver the body to C{protocol} (see the module docstring).  A
        response without a body needs this call too: it ends the request
        (and gives its connection back to the pool).

        @raise RuntimeError: if called more than once.
        """
        if self.delivered:
            raise RuntimeError("deliverBody already called")
        self.delivered = True
        self._protocol = protocol
        protocol.makeConnection(self)
        buffered, self._buffer = self._buffer, None
        if buffered:
            if self.traffic is not None:
                self.traffic.received += sum(map(len, buffered))
            for data in buffered:
                protocol.dataReceived(data)
        if self._outcome is not None:
            outcome, self._outcome = self._outcome, None
            self._protocol = None
            self._lose(protocol, outcome)
            return
        source = self._source
        if source is not None:
            source.bodyDelivering()

    def takeBody(self) -> bytes | None:
        """
        The whole body, when it is all at hand and complete (it came with
        the head: most small responses), delivered at once: what
        L{deliverBody} would give a protocol, without one.  L{None} (and
        nothing done) otherwise.
        """
        if self.delivered or self._outcome is not BODY_DONE:
            return None
        self.delivered = True
        buffered, self._buffer = self._buffer, None
        self._outcome = None
        data = b"".join(buffered) if buffered else b""
        if self.traffic is not None:
            self.traffic.received += len(data)
        whenDelivered, self.whenDelivered = self.whenDelivered, None
        if whenDelivered is not None:
            whenDelivered()
        return data

    def _lose(self, protocol: Any, reason: Failure) -> None:
        whenDelivered, self.whenDelivered = self.whenDelivered, None
        if whenDelivered is not None:
            whenDelivered()
        protocol.connectionLost(reason)

    # The body protocol's transport ----------------------------------------

    def pauseProducing(self) -> None:
        if self._source is not None:
            self._source.pauseBody()

    def resumeProducing(self) -> None:
        if self._source is not None:
            self._source.resumeBody()

    def stopProducing(self) -> None:
        if self._source is not None:
            self._source.stopBody()

    def loseConnection(self) -> None:
        self.stopProducing()

    # From the source ---------------------------------------------------------

    def bodyReceived(self, data: bytes) -> None:
        """A piece of the body (kept until L{deliverBody})."""
        if self._protocol is not None:
            if self.traffic is not None:
                self.traffic.received += len(data)
            self._protocol.dataReceived(data)
        elif self._buffer is not None:
            self._buffer.append(data)

    def bodyEnded(self, reason: Failure) -> None:
        """The body is over (L{BODY_DONE}) or cut short."""
        # The connection may be back in the pool: pausing or stopping
        # through this response must no longer reach it.
        self._source = None
        protocol = self._protocol
        if protocol is not None:
            self._protocol = None
            self._lose(protocol, reason)
        elif not self.delivered:
            self._outcome = reason
