# -*- test-case-name: tests.test_h2 -*-
"""
L{Writing}: the half of L{edgeproxy.http.h2.connection.HTTP2Connection}
that writes what its streams hold, and ends streams.

A stream holds its response head until it can go with the first body
bytes, and body bytes the client's flow-control windows or its socket do
not take yet (L{Writing.push}).  A whole response at hand goes out in one
pass (L{edgeproxy.http.h2.sending.sendWhole}); anything else through the
library's public calls, a frame at a time as the windows allow.  What the
streams hold is counted per stream and for the connection, and the body
sources are paused past the listener's bounds and resumed once half of it
is written (L{Writing.checkHeld}).  A body handed over whole has no source
to pause: past the connection's bound no response is started at all (its
body not taken, nor its source read); they wait, in the order they came,
until half of it is written (L{Writing.parks}).  What is written goes to
the transport once per read of the client's bytes, or once per answer
outside one, and whenever a connection's bound of it is framed, so that
the transport can pause the connection when its own buffer is full.

A stream ends when both sides have ended it, or when either resets it; its
call ends when its answer is written (or cut short), and bytes held back
from its request body are given back to the connection's window.
"""

from __future__ import annotations

from typing import Any

from h2.exceptions import H2Error
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from edgeproxy._compat.h2 import prune
from edgeproxy.http.h2.guard import RESETS
from edgeproxy.http.h2.notes import clientNote
from edgeproxy.http.h2.sending import sendWhole
from edgeproxy.http.h2.stream import Stream
from edgeproxy.pipeline.call import Call, discardResponse
from edgeproxy.pipeline.values import Response

__all__ = ["Writing"]


NO_ERROR = 0x0
INTERNAL_ERROR = 0x2


class Writing:
    """
    Writing and ending streams, for L{HTTP2Connection} (whose slots hold
    the state used here).
    """

    __slots__ = (
        "held", "_waiting", "_out", "_writePaused", "_connFull", "_receiving", "_calls",
        "_streamLimit", "_connLimit", "_parked", "_starting", "_unflushed",
    )

    factory: Any
    clock: Any
    transport: Any
    _h2: Any
    _guard: Any
    _streams: dict[int, Stream]
    _closing: bool
    _lost: bool
    _goingAway: bool
    _idleQueue: Any

    def __init__(self, streamLimit: int, connLimit: int) -> None:
        self.held = 0
        self._waiting: dict[Stream, None] = {}
        self._out: list[bytes] = []
        self._writePaused = False
        self._connFull = False
        self._receiving = False
        self._calls = 0
        self._streamLimit = streamLimit
        self._connLimit = connLimit
        self._parked: dict[Stream, None] = {}
        self._starting = False
        self._unflushed = 0

    def _loseConnection(self) -> None:
        raise NotImplementedError()

    def push(self, stream: Stream) -> None:
        """
        Write what C{stream} holds as far as the client's windows and the
        socket allow: the response head, body bytes, C{END_STREAM}.
        """
        if self._closing or stream.localEnded:
            return
        h2 = self._h2
        streamId = stream.id
        sent = 0
        try:
            headers = stream.headers
            pending = stream.pending
            if headers is not None:
                if stream.endPending and len(pending) <= 1 and not self._writePaused:
                    # The whole response at hand: one pass (sendWhole).
                    frames = sendWhole(h2, streamId, headers, pending[0] if pending else b"")
                    if frames is not None:
                        stream.headers = None
                        if pending:
                            pending.clear()
                            self.held -= stream.held
                            stream.held = 0
                        waiting = h2.data_to_send()
                        if waiting:
                            self._out.append(waiting)
                        self._out.append(frames)
                        self._localEnd(stream)
                        self._framed(len(frames))
                        if not self._receiving:
                            self._flush()
                        return
                stream.headers = None
                if stream.endPending and not pending:
                    h2.send_headers(streamId, headers, end_stream=True)
                    self._localEnd(stream)
                    return
                h2.send_headers(streamId, headers)
            if pending:
                if not self._writePaused:
                    maxFrame = h2.max_outbound_frame_size
                    window = h2.local_flow_control_window(streamId)
                    while pending and window > 0:
                        chunk = pending[0]
                        size = len(chunk)
                        room = min(maxFrame, window)
                        if size <= room:
                            pending.popleft()
                            h2.send_data(streamId, chunk, end_stream=stream.endPending and not pending)
                        else:
                            view = chunk if type(chunk) is memoryview else memoryview(chunk)
                            h2.send_data(streamId, view[:room])
                            pending[0] = view[room:]
                            size = room
                        sent += size
                        window -= size
                        self._framed(size)
                        if not pending and stream.rest is not None:
                            self._refill(stream)
                        if self._writePaused:
                            break
                    if sent:
                        stream.held -= sent
                        self.held -= sent
                        if stream.idle is not None:
                            stream.idle.touch()
                if pending:
                    self._waiting[stream] = None
                else:
                    self._waiting.pop(stream, None)
                    if stream.endPending:
                        self._localEnd(stream)
            elif stream.endPending:
                h2.end_stream(streamId)
                self._localEnd(stream)
        except H2Error as error:
            clientNote(self.clock, "HTTP/2 stream failed", "HTTP/2 stream {stream} failed: {why}", stream=streamId, why=str(error))
            self.reset(stream, INTERNAL_ERROR, Failure(error))
            return
        if sent:
            # Last: resuming a source may bring its next bytes at once.
            self._released(stream)
        if not self._receiving:
            self._flush()

    @property
    def streamBound(self) -> int:
        """C{h2_stream_buffer}: the bytes held for one stream before its
        source is paused."""
        return self._streamLimit

    def _refill(self, stream: Stream) -> None:
        """Move the next bound of C{stream}'s whole body to its pending
        bytes (see L{Stream.rest})."""
        rest = stream.rest
        assert rest is not None
        bound = self._streamLimit
        if len(rest) > bound:
            chunk, stream.rest = rest[:bound], rest[bound:]
        else:
            chunk, stream.rest = rest, None
            stream.endPending = True
        stream.pending.append(chunk)
        stream.held += len(chunk)
        self.held += len(chunk)

    def interim(self, stream: Stream, headers: list[tuple[bytes, bytes]]) -> None:
        """Write an interim (1xx) response head on C{stream}."""
        if self._closing or stream.localEnded:
            return
        try:
            self._h2.send_headers(stream.id, headers)
        except H2Error:
            return
        if not self._receiving:
            self._flush()

    def ack(self, stream: Stream, size: int) -> None:
        """C{size} flow-controlled bytes of C{stream} were taken."""
        if self._closing:
            return
        self._h2.acknowledge_received_data(size, stream.id)
        if not self._receiving:
            self._flush()

    def parks(self, stream: Stream, response: Response) -> bool:
        """
        Whether C{stream}'s C{response} waits its turn, unstarted: while the
        connection holds more than its bound (or others wait before it).
        """
        if not self._connFull and not self._parked:
            return False
        stream.parked = response
        self._parked[stream] = None
        return True

    def _startParked(self) -> None:
        """Start the responses that wait, in order, while there is room."""
        if self._starting:
            return
        self._starting = True
        try:
            parked = self._parked
            while parked and not self._connFull and not self._closing:
                stream = next(iter(parked))
                del parked[stream]
                response, stream.parked = stream.parked, None
                if response is not None:
                    stream.start(response)
        finally:
            self._starting = False

    def _framed(self, size: int) -> None:
        """
        C{size} bytes were framed: past the connection's bound they go to
        the transport now (which pauses the connection when its buffer is
        full) rather than at the end of the read.
        """
        self._unflushed += size
        if self._unflushed >= self._connLimit:
            self._flush()

    def checkHeld(self, stream: Stream) -> None:
        """Pause body sources past the bounds of what is held."""
        if stream.held > self._streamLimit and not stream.producerPaused:
            producer = stream.producer
            if producer is not None:
                stream.producerPaused = True
                producer.pauseProducing()
        if self.held > self._connLimit and not self._connFull:
            self._connFull = True
            for other in list(self._streams.values()):
                producer = other.producer
                if producer is not None and not other.producerPaused:
                    other.producerPaused = True
                    producer.pauseProducing()

    def _released(self, stream: Stream | None) -> None:
        """
        Resume body sources, and start the responses that wait, once half
        of their bound is gone (C{stream}: the one that wrote or went).
        """
        if self._connFull:
            if self.held > self._connLimit // 2 or self._closing:
                return
            self._connFull = False
            streams = [s for s in self._streams.values() if s.producerPaused]
        elif stream is not None and stream.producerPaused:
            streams = [stream]
        else:
            return
        half = self._streamLimit // 2
        for other in streams:
            if other.held <= half and other.producerPaused:
                other.producerPaused = False
                producer = other.producer
                if producer is not None:
                    producer.resumeProducing()
        if self._parked:
            self._startParked()

    def _pushWaiting(self) -> None:
        receiving = self._receiving
        self._receiving = True
        try:
            for stream in list(self._waiting):
                if self._writePaused or self._closing:
                    break
                self.push(stream)
        finally:
            self._receiving = receiving
        if not receiving:
            self._flush()

    def _flush(self, force: bool = False) -> None:
        if self._lost or (self._closing and not force):
            return
        data = self._h2.data_to_send()
        out = self._out
        if out:
            # What sendWhole wrote went after what the library had then.
            if data:
                out.append(data)
            data = b"".join(out)
            out.clear()
        self._unflushed = 0
        if data:
            self.transport.write(data)

    # Streams ending -----------------------------------------------------------

    def _localEnd(self, stream: Stream) -> None:
        """C{END_STREAM} is written: the response is complete."""
        if stream.localEnded:
            return
        stream.localEnded = True
        self._waiting.pop(stream, None)
        if stream.call is not None:
            stream.endCall(None)
        if not stream.remoteEnded:
            # RFC 9113 8.1: answered before the request was complete; the
            # rest of it is not wanted.
            stream.remoteEnded = True
            try:
                self._h2.reset_stream(stream.id, NO_ERROR)
            except H2Error:
                pass
        self._forget(stream)

    def reset(self, stream: Stream, code: int, reason: Failure) -> None:
        """Reset C{stream} (C{code}) and end its call with C{reason}."""
        if stream.localEnded and stream.remoteEnded:
            return
        self._dropPending(stream)
        stream.localEnded = stream.remoteEnded = True
        if not self._closing:
            try:
                self._h2.reset_stream(stream.id, code)
            except H2Error:
                pass
        self._streams.pop(stream.id, None)
        self._closeStream(stream, reason)
        self._afterForget()
        self._released(None)
        if not self._receiving:
            self._flush()

    def _forget(self, stream: Stream) -> None:
        if self._streams.pop(stream.id, None) is not None:
            self._closeStream(stream, None)
            self._afterForget()

    def _afterForget(self) -> None:
        if self._goingAway and not self._streams:
            self._loseConnection()

    def _closeStream(self, stream: Stream, reason: Failure | None) -> None:
        self._waiting.pop(stream, None)
        response = stream.parked
        if response is not None:
            stream.parked = None
            self._parked.pop(stream, None)
            discardResponse(response)
        unacked, stream.unacked = stream.unacked, 0
        if unacked and not self._closing:
            # Bytes held back from a paused body: the connection's window
            # gets them back (a closed stream's own window is gone).
            self._h2.acknowledge_received_data(unacked, stream.id)
        if stream.call is not None:
            stream.endCall(reason or Failure(ConnectionLost("stream closed")))
        transport = stream.transport
        if transport is not None:
            transport.lost(reason or Failure(ConnectionLost("stream closed")))

    def _dropPending(self, stream: Stream) -> None:
        if stream.held:
            self.held -= stream.held
            stream.held = 0
        stream.pending.clear()
        stream.rest = None
        stream.headers = None
        self._waiting.pop(stream, None)

    def callEnded(self, stream: Stream, call: Call, reason: Failure | None) -> None:
        """A stream's call is over (see L{Stream.endCall})."""
        if reason is None:
            self._guard.credit(RESETS)
        self._calls -= 1
        if not self._calls and not self._closing:
            self._idleQueue.arm(self)
            # An idle connection holds no closed stream.
            prune(self._h2)
        self.factory.callEnded(call, reason)
