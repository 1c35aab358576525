# -*- test-case-name: tests.test_cache_stage -*-
"""
The response bodies of the cache stage:

  - L{StoringBody}: a body from the origin on its way to the client,
    copied into a store (a L{Sink}) piece by piece as it passes.  The
    client's pauses, resumptions and stop reach the body's producer (the
    backend connection) unchanged, so a slow client slows the origin and
    nothing is buffered beyond what the store itself keeps; a store that
    gives up (the object grew past C{max_object_size}) leaves the stream
    to the client untouched.
  - L{FileBody}: segments of a stored object's file, read a piece at a
    time when the client can take them (a large object is never read
    whole into memory).
  - L{Drain}: the reader of a body only the store wants (a background
    refresh; a client answered C{304} while the response is stored).
  - L{StoredBody}: a body held in memory, as the store holds it.
  - L{SliceBody}: the ranges of a body held in memory, cut when the client
    side takes them (a response waiting its turn to be written holds no
    copy; one range is never copied, L{sliceBody}).

L{StoredBody} and a L{SliceBody} of one range give the store's own bytes
(a view for a range), never a copy: a client side that writes them a bound
at a time keeps a reference to them meanwhile.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from zope.interface import implementer

from edgeproxy.bodies import IdleTimer, PiecedBody
from edgeproxy.cache.ranges import RangePlan, sliceBody
from edgeproxy.pipeline.values import BODY_DONE, BytesBody

__all__ = ["PIECE", "Drain", "FileBody", "Sink", "SliceBody", "StoredBody", "StoringBody"]

PIECE = 64 * 1024
"""Bytes a L{FileBody} reads at a time."""

PIECES_PER_TURN = 4
"""Pieces a L{FileBody} sends before letting the reactor run."""


class Sink(Protocol):
    """Where a L{StoringBody} copies the body."""

    def write(self, data: bytes) -> bool:
        """Keep C{data}; C{False} once the sink gave up (it cleaned up)."""

    def finish(self) -> None:
        """The body is complete."""

    def abort(self) -> None:
        """The body was cut short, or nobody wants it: drop what was kept."""


@implementer(IPushProducer)
class StoringBody:
    """See the module docstring."""

    __slots__ = ("_inner", "_producer", "_protocol", "_sink")

    def __init__(self, inner: Any, sink: Sink) -> None:
        self._inner = inner
        self._sink: Sink | None = sink
        self._protocol: Any = None
        self._producer: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self._protocol = protocol
        self._inner.deliverBody(self)

    # The inner body's protocol ------------------------------------------------

    def makeConnection(self, producer: Any) -> None:
        self._producer = producer
        self._protocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None and not sink.write(data):
            self._sink = None
        self._protocol.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            # Only a body ended by its framing is known to be complete: one
            # ended by the close of its connection may be cut (RFC 9111 3.3).
            if isinstance(reason.value, ResponseDone):
                sink.finish()
            else:
                sink.abort()
        self._protocol.connectionLost(reason)

    # The client's view of the producer ----------------------------------------

    def pauseProducing(self) -> None:
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.abort()
        if self._producer is not None:
            self._producer.stopProducing()


class Drain:
    """
    Reads a body to its end and drops it (the store keeps it), stopping
    it when it goes C{timeout} seconds without a byte (the route's
    C{idle_timeout}: no client is there to time it out).
    """

    __slots__ = ("_producer", "_idle")

    def __init__(self, clock: Any, timeout: float) -> None:
        self._producer: Any = None
        self._idle = IdleTimer(clock, timeout, self._stalled)

    def makeConnection(self, producer: Any) -> None:
        self._producer = producer
        self._idle.touch()

    def dataReceived(self, data: bytes) -> None:
        self._idle.touch()

    def connectionLost(self, reason: Failure) -> None:
        self._idle.close()
        self._producer = None

    def _stalled(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()


class FileBody(PiecedBody):
    """
    Segments of an open file, each after some bytes of its own (a
    multipart boundary), then a trailer; the file is closed at the end.
    """

    __slots__ = ("_done", "_fd", "_index", "_left", "_position", "_segments", "_trailer")

    def __init__(
        self,
        fd: int,
        segments: tuple[tuple[bytes, int, int], ...],
        trailer: bytes,
        clock: Any,
    ) -> None:
        super().__init__(clock)
        self._fd = fd
        self._segments = segments
        self._trailer = trailer
        self._index = -1
        self._position = 0
        self._left = 0
        self._done = False

    def _pump(self) -> None:
        self._scheduled = None
        sent = 0
        while not self._paused and not self._done:
            if sent >= PIECES_PER_TURN:
                self._again()
                return
            if self._left == 0:
                self._index += 1
                if self._index >= len(self._segments):
                    self._finish()
                    return
                prefix, self._position, self._left = self._segments[self._index]
                if prefix:
                    self._protocol.dataReceived(prefix)
                continue
            try:
                data = os.pread(self._fd, min(PIECE, self._left), self._position)
            except OSError as e:
                self._end(Failure(e))
                return
            if not data:
                # The file is shorter than its index said: cut short.
                self._end(Failure(ConnectionAborted("stored object truncated")))
                return
            self._position += len(data)
            self._left -= len(data)
            sent += 1
            self._protocol.dataReceived(data)

    def _finish(self) -> None:
        if self._trailer:
            self._protocol.dataReceived(self._trailer)
        self._end(BODY_DONE)

    def _more(self) -> bool:
        return not self._done

    def _end(self, reason: Failure) -> None:
        if self._done:
            return
        self._done = True
        os.close(self._fd)
        self._protocol.connectionLost(reason)


class StoredBody(BytesBody):
    """See the module docstring."""

    __slots__ = ()


class SliceBody:
    """See the module docstring."""

    __slots__ = ("_body", "_plan")

    def __init__(self, body: bytes, rangePlan: RangePlan) -> None:
        self._body = body
        self._plan = rangePlan

    def takeBody(self) -> bytes | memoryview:
        """The whole body, at once (see L{edgeproxy.pipeline.values.ResponseBody})."""
        return sliceBody(self._body, self._plan)

    def deliverBody(self, protocol: Any) -> None:
        # (A body's protocol, and what it writes to, may want bytes.)
        BytesBody(bytes(self.takeBody())).deliverBody(protocol)
