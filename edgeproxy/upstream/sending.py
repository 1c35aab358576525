# -*- test-case-name: tests.test_client -*-
"""
Writing a request body to a backend connection, framed by the length its
producer declared or, for a body of unknown length, in the chunked coding
(RFC 9112 7.1).  The head goes out in one write before it, through the
connection's immediate writer (L{edgeproxy._compat.twisted.tcp.immediateWriter}:
straight to the socket when nothing is queued, with the fast paths).

The head itself is L{edgeproxy.h1.writeRequestHead}'s; this module only
puts bytes on a transport and holds a body producer to what it declared.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from edgeproxy.h1 import LAST_CHUNK, LocalProtocolError

__all__ = ["BodyProducer", "ChunkedConsumer", "LengthConsumer", "bodyLength"]


class BodyProducer(Protocol):
    """
    A request body as the connection reads it (C{IBodyProducer}): each
    attempt of the pool hands one over (L{edgeproxy.bodies.BodyPipe.newAttempt}).
    """

    length: Any
    """The number of bytes it will write, or C{UNKNOWN_LENGTH}."""

    def startProducing(self, consumer: IConsumer) -> Deferred[None]: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


def bodyLength(body: BodyProducer | None) -> int | None:
    """
    The length to frame C{body} with (L{edgeproxy.h1.writeRequestHead}'s
    C{length}): C{0} for no body, L{None} for a body sent chunked.
    """
    if body is None:
        return 0
    length = body.length
    return None if length is UNKNOWN_LENGTH else length


@implementer(IConsumer)
class LengthConsumer:
    """
    Passes a body on to the transport, holding its producer to the length
    it declared (C{Content-Length} was sent with the head).
    """

    def __init__(self, transport: Any, producer: BodyProducer) -> None:
        self._transport: Any = transport
        self._producer = producer
        self._remaining = producer.length

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if self._transport is None:
            self._producer.stopProducing()
            raise LocalProtocolError("request body written after its end")
        if len(data) > self._remaining:
            self._transport = None
            self._producer.stopProducing()
            raise LocalProtocolError("request body longer than its Content-Length")
        self._remaining -= len(data)
        self._transport.write(data)

    def finish(self) -> None:
        """
        The producer says it is done.

        @raise LocalProtocolError: it wrote more or fewer bytes than it
            declared.
        """
        if self._transport is None:
            raise LocalProtocolError("request body longer than its Content-Length")
        self._transport = None
        if self._remaining:
            raise LocalProtocolError("request body shorter than its Content-Length")

    def stop(self) -> None:
        """Nothing more goes to the transport."""
        self._transport = None


@implementer(IConsumer)
class ChunkedConsumer:
    """Passes a body of unknown length on to the transport, chunked."""

    def __init__(self, transport: Any, producer: BodyProducer) -> None:
        self._transport: Any = transport

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if self._transport is None:
            raise LocalProtocolError("request body written after its end")
        if data:
            # Three pieces, not one copy of the data (h1.chunk would join).
            self._transport.writeSequence((b"%x\r\n" % (len(data),), data, b"\r\n"))

    def finish(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.write(LAST_CHUNK)

    def stop(self) -> None:
        self._transport = None
