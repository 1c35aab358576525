# -*- test-case-name: tests.test_content_compress -*-
"""
Response bodies the content stages hand on in place of the backend's:

  - L{CompressedBody}: the backend's body compressed as it streams.  The
    client side's pause, resume and stop go straight to the backend's body
    (its producer is handed on untouched), so a slow client slows the
    backend and no more than one piece and the compressor's window are
    ever held; each piece is compressed and flushed as it comes;
  - L{ReplayBody}: a body of which a prefix was read already (the image
    stage reads up to C{image_max_bytes} before it decides), delivered as
    the prefix and then the rest as it streams.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from edgeproxy.content.encoders import Encoder
from edgeproxy.pipeline.values import ResponseBody

__all__ = ["CompressedBody", "ReplayBody"]

_COMPLETE = (ResponseDone, PotentialDataLoss)


class CompressedBody:
    """
    C{source} compressed by C{encoder} (see the module docstring).

    @ivar done: called once at the end with the bytes read and the bytes
        written (for the metrics), if the body was complete.
    """

    __slots__ = ("_source", "_encoder", "_protocol", "_done", "_in", "_out")

    def __init__(
        self,
        source: ResponseBody,
        encoder: Encoder,
        done: Callable[[int, int], None] | None = None,
    ) -> None:
        self._source = source
        self._encoder = encoder
        self._protocol: Any = None
        self._done = done
        self._in = 0
        self._out = 0

    def deliverBody(self, protocol: Any) -> None:
        self._protocol = protocol
        self._source.deliverBody(self)

    # The backend body's protocol.

    def makeConnection(self, producer: Any) -> None:
        self._protocol.makeConnection(producer)

    def dataReceived(self, data: bytes) -> None:
        self._in += len(data)
        out = self._encoder.compress(data)
        if out:
            self._out += len(out)
            self._protocol.dataReceived(out)

    def connectionLost(self, reason: Failure) -> None:
        protocol = self._protocol
        if isinstance(reason.value, _COMPLETE):
            tail = self._encoder.finish()
            if tail:
                self._out += len(tail)
                protocol.dataReceived(tail)
            if self._done is not None:
                self._done(self._in, self._out)
        # Cut short: no end of stream, so the client cannot take a
        # truncated body for a whole one.
        protocol.connectionLost(reason)


@implementer(IPushProducer)
class ReplayBody:
    """
    A body whose first bytes (C{prefix}) were read already and whose rest
    is still coming from C{producer}: the reader that collected the prefix
    forwards what follows through L{dataReceived} and L{connectionLost}.

    The source stays paused from L{hold} until the new reader is there and
    wants bytes: the reader's pauses and this body's own hold are kept
    apart, so neither resumes what the other paused.
    """

    __slots__ = ("_prefix", "_producer", "_protocol", "_held", "_paused", "_pending", "_stopped")

    def __init__(self, prefix: list[bytes], producer: Any) -> None:
        self._prefix = prefix
        self._producer = producer
        self._protocol: Any = None
        self._held = False
        self._paused = False
        self._pending: list[bytes] = []
        self._stopped: Failure | None = None

    def hold(self) -> None:
        """Pause the source until a reader comes."""
        self._held = True
        self._producer.pauseProducing()

    def deliverBody(self, protocol: Any) -> None:
        self._protocol = protocol
        protocol.makeConnection(self)
        prefix, self._prefix = self._prefix, []
        for data in prefix:
            protocol.dataReceived(data)
        pending, self._pending = self._pending, []
        for data in pending:
            protocol.dataReceived(data)
        if self._stopped is not None:
            reason, self._stopped = self._stopped, None
            protocol.connectionLost(reason)
            return
        if self._held:
            self._held = False
            if not self._paused:
                self._producer.resumeProducing()

    # From the reader that collected the prefix.

    def dataReceived(self, data: bytes) -> None:
        if self._protocol is None:
            # Bytes already on their way when the hold began.
            self._pending.append(data)
        else:
            self._protocol.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._protocol is None:
            self._stopped = reason
        else:
            self._protocol.connectionLost(reason)

    # The new reader's transport.

    def pauseProducing(self) -> None:
        self._paused = True
        if not self._held:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._held:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()
