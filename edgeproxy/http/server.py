# -*- test-case-name: tests.test_server -*-
"""
L{HTTP1Connection}: one client connection speaking HTTP/1.1, read with
L{edgeproxy.h1} and answered through the stage pipeline.

Reading.  Request heads are found and parsed whole (L{h1.splitHead},
L{h1.parseRequestHead}); a head still arriving has its request line
checked as soon as that line is complete, so garbage is refused without
waiting for the rest.  Every refusal (the status the parser gives: 400,
414, 431, 501, 505; 408 for a head not complete within
C{client_header_timeout}) is a short generic response with
C{Connection: close}, C{Date} and the request's ID, and nothing after it on the
connection is read; the refused head is a request in the access log and
the metrics as any other (L{ListenerFactory.rejectHead}).  A
body is read by the reader its framing needs and handed to a
L{edgeproxy.bodies.BodyPipe}, which pauses this connection's transport
whenever the backend cannot take more.

Requests are served one at a time, in order (pipelining): bytes of the
next request wait, the transport paused once they pass a bound, until the
current response is complete.

Routing.  The target is normalised once (L{edgeproxy.targets}), the route
found (L{edgeproxy.routing}), and the request described by one
L{edgeproxy.pipeline.values.Request} handed to the route's stages in a
L{Call}.  What is refused from the head (400 for a target, 404 no route,
421 a host this TLS name does not serve, 413 a declared body over the
limit) is answered without ever reaching a stage.

Answering (L{edgeproxy.http.answering}, the connection's C{ClientSide}).
The response is written as HTTP/1.1 with the framing it needs; an answer
that comes while the request body still arrives is sent at once and the
connection closed after it.

Timers (nginx semantics).  The header deadline runs from the connection's
start for the first request and from the first byte of each later one; the
idle timeout (C{client_idle_timeout}) runs while the connection waits for a
request or a body byte, and is suspended while a request is being answered.
Both are entries in queues the listener's connections share
(L{edgeproxy.http.deadlines}).

Closing (L{edgeproxy.http.closing}): what the listener asks (drain), the
deadlines expiring, the early answers to a request body (too large,
stalled), refusals, and the close that becomes an abort after
L{edgeproxy.http.closing.ABORT_TIMEOUT}.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener, IProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy import h1
from edgeproxy._compat.twisted.tcp import immediateWriter
from edgeproxy.bodies import BodyPipe
from edgeproxy.errors import BadRequest
from edgeproxy.http.answering import Answering
from edgeproxy.http.closing import Closing
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.values import ConnectionInfo

__all__ = ["DISCARD_LIMIT", "HTTP1Connection"]

DISCARD_LIMIT = 1024 * 1024
"""Bytes of a request body read and dropped after its request was answered
(so that the connection can carry the next one); past this the connection
closes instead."""


@implementer(IProtocol, IHandshakeListener)
class HTTP1Connection(Closing, Answering):
    """
    One client connection (HTTP/1.1 and 1.0), built by an
    L{edgeproxy.http.listener.ListenerFactory}.
    """

    # Closing before Answering: Answering only names the _abort that
    # Closing defines.

    # An idle kept-alive connection is mostly this object: everything lives
    # in slots (no instance dictionary), and the timers are the listener's.
    __slots__ = (
        "factory", "transport", "connected", "limits", "_info", "_buffer", "_call",
        "_reader", "_pipe", "_persistent", "_closing", "_lost", "_lineChecked",
        "_parsing", "_pendingHead", "_chunked", "_noBody", "_streaming",
        "_readPaused", "_bodyPaused", "_abortCall", "_upgraded", "_maxBody",
        "_handshakeDone", "_traffic", "_started", "_answered", "_registered",
        "_served", "_awaitingHead", "_continued", "_discarded", "_sendNow", "__weakref__",
    )

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.limits = factory.limits
        self.transport: Any = None
        self.connected = 0
        self._info: ConnectionInfo | None = None
        self._buffer = b""
        self._call: Call | None = None
        self._reader: h1.BodyReader | None = None
        self._pipe: BodyPipe | None = None
        self._persistent = True
        self._closing = False
        self._lost = False
        self._lineChecked = False
        self._parsing = False
        self._pendingHead: bytes | None = None
        self._chunked = False
        self._noBody = False
        self._streaming: Any = None
        self._readPaused = False
        self._bodyPaused = False
        self._abortCall: Any = None
        self._upgraded: Any = None
        self._maxBody = 0
        self._handshakeDone = False
        self._traffic: Any = None
        self._started = False
        self._answered = False
        self._registered = False
        self._served = False
        self._awaitingHead = True
        self._continued = False
        self._discarded = 0

    # IProtocol -----------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self.factory.connectionMade(self, transport)
        # A complete response goes out at once (straight to the socket, with
        # the fast paths): chosen once, after the listener wrapped the
        # transport's write to count the bytes.
        self._sendNow = immediateWriter(transport)
        self.connectionMade()

    def connectionMade(self) -> None:
        factory = self.factory
        factory.headQueue.arm(self)
        factory.idleQueue.arm(self)

    def logPrefix(self) -> str:
        return "HTTP1Connection"

    def dataReceived(self, data: bytes) -> None:
        traffic = self._traffic
        if traffic is not None:
            traffic.received += len(data)
        if self._upgraded is not None:
            self._upgraded.dataReceived(data)
            return
        if not self._started:
            self._started = True
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                self._switchToHTTP2(data)
                return
        if self._closing:
            # Nothing after a refusal, an early answer or a close is read.
            return
        factory = self.factory
        if self._reader is not None:
            factory.idleQueue.move(self)
            self._readBody(data)
            return
        buffer = self._buffer
        if self._call is not None:
            # The next request, pipelined: it waits for this one's answer.
            buffer += data
            self._buffer = buffer
            if len(buffer) > self.limits.max_header_size and not self._readPaused:
                self._readPaused = True
                self._updateReading()
            return
        self._buffer = b""
        self._parseHeads(buffer + data if buffer else data)

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        self.connected = 0
        factory = self.factory
        factory.headQueue.disarm(self)
        factory.idleQueue.disarm(self)
        abortCall, self._abortCall = self._abortCall, None
        if abortCall is not None and abortCall.active():
            abortCall.cancel()
        upgraded = self._upgraded
        if upgraded is not None:
            upgraded.connectionLost(reason)
        call = self._call
        if call is not None:
            self._call = None
            # A tunnel's request is over when its connection is (the end of
            # a WebSocket is no failure).
            self._endCall(call, None if upgraded is not None else reason)
        factory.connectionLost(self, reason)

    def handshakeCompleted(self) -> None:
        self._handshakeDone = True
        self.factory.handshakeCompleted(self)
        if not self._started and getattr(self.transport, "negotiatedProtocol", None) == b"h2":
            # RFC 9113 3.4: the server's preface goes at once, and HTTP/2's
            # own deadlines apply from the start.
            self._started = True
            self._switchToHTTP2(b"")

    # Switching protocols -----------------------------------------------------

    def takeOver(self, call: Call, fields: h1.Fields, protocol: Any) -> bytes:
        """
        Switch protocols (a WebSocket's C{101} with C{fields}): write the
        head, then hand every byte of the connection to C{protocol} until it
        ends.  The call stays in flight until then.

        @return: what the client sent after its request head (a WebSocket
            client's first frames), for C{protocol} to take first.
        """
        self._write(h1.writeResponseHead(b"HTTP/1.1", 101, b"Switching Protocols", fields, None))
        self._answered = True
        self._pendingHead = None
        factory = self.factory
        factory.headQueue.disarm(self)
        factory.idleQueue.disarm(self)
        buffered, self._buffer = self._buffer, b""
        self._upgraded = protocol
        if self._readPaused:
            self._readPaused = False
            self._updateReading()
        protocol.makeConnection(self.transport)
        return buffered

    # Reading requests -----------------------------------------------------

    def _parseHeads(self, buffer: bytes) -> None:
        """
        Serve the requests whose heads are in C{buffer}, one at a time:
        each is dispatched, and the next is looked at only once the one
        before has been answered (its answer may come at once).
        """
        self._parsing = True
        limits = self.limits
        try:
            while True:
                if self._closing or self._lost:
                    return
                if not buffer:
                    self._buffer = b""
                    return
                try:
                    found = h1.splitHead(buffer, limits.max_header_size)
                    if found is None:
                        if not self._lineChecked:
                            self._checkRequestLine(buffer)
                        self._buffer = buffer
                        self._headIncomplete()
                        return
                    head, end = found
                    parsed = h1.parseRequestHead(head, limits.max_headers)
                except h1.RemoteProtocolError as error:
                    self._buffer = b""
                    self._reject(error.status, buffer)
                    return
                self._lineChecked = False
                # The deadline stays queued, unarmed: moving it for the next
                # head costs less than removing and adding it per request.
                self._awaitingHead = False
                rest = self._dispatch(parsed, buffer[end:])
                if self._reader is not None:
                    return
                if self._call is not None:
                    # Answered later: the rest waits (see dataReceived).
                    self._buffer = rest
                    if len(rest) > limits.max_header_size and not self._readPaused:
                        self._readPaused = True
                        self._updateReading()
                    return
                buffer = rest
        finally:
            self._parsing = False

    def _headIncomplete(self) -> None:
        """
        The read ended inside a head: from its first byte it has
        C{client_header_timeout} to complete (the first head of a connection
        has had it since the connection opened).  A head that comes whole in
        one read, the usual case, never arms anything.
        """
        factory = self.factory
        if not self._awaitingHead:
            self._awaitingHead = True
            factory.headQueue.arm(self)
        factory.idleQueue.move(self)

    def _checkRequestLine(self, buffer: bytes) -> None:
        start = 2 if buffer[:2] == b"\r\n" else 0
        end = buffer.find(b"\r\n", start)
        if end != -1:
            h1.checkRequestLine(buffer[start:end])
            self._lineChecked = True

    def _readBody(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        try:
            piece = reader.feed(data)
        except h1.RemoteProtocolError as error:
            # The head was fine (the request went on to its stages), the
            # framing is not: nothing after it can be trusted.
            self._reader = None
            call, self._call = self._call, None
            if self._pendingHead is None:
                self._reject(400, call=call)
            else:
                self._abort()
            if call is not None:
                self._endCall(call, Failure(BadRequest(str(error))))
            return
        pipe = self._pipe
        if piece:
            if pipe is not None:
                pipe.write(piece)
                if self._maxBody and pipe.received > self._maxBody and not self._answered:
                    self._bodyTooLarge()
                    return
            if self._answered:
                # Answered already: read and dropped, within a bound.
                self._discarded += len(piece)
                if self._discarded > DISCARD_LIMIT:
                    self._reader = None
                    self._persistent = False
                    if self._call is None:
                        self._loseConnection()
                    return
        if reader.done:
            self._reader = None
            self._buffer = reader.rest
            if pipe is not None:
                pipe.finish()
            if self._call is None:
                # Answered while the body arrived, and now it is all read.
                self._afterCall()

    # A request, head complete ------------------------------------------------

    def _connectionInfo(self) -> ConnectionInfo:
        info = self._info
        if info is None:
            info = self._info = self.factory.connectionInfo(self.transport)
        return info

    def _dispatch(self, head: h1.RequestHead, rest: bytes) -> bytes:
        """
        Hand the request of C{head} to its stages, with C{rest} (what came
        after the head) read as its body first.

        @return: what follows the request's body in C{rest}.
        """
        factory = self.factory
        self._persistent = head.persistent
        self._answered = False
        self._continued = False
        self._discarded = 0
        length = head.length
        request, stages, idleTimeout, maxBody, error = factory.prepare(
            head.method, head.target, head.version, head.fields, head.host, length,
            self._connectionInfo(),
        )
        pipe = None
        if length != 0:
            self._reader = h1.LengthReader(length) if length is not None else h1.ChunkedReader(
                self.limits.max_header_size
            )
            if error is None:
                pipe = BodyPipe(length, self, factory.clock, idleTimeout, self._uploadIdle)
        self._pipe = pipe
        self._maxBody = maxBody
        self._served = True
        call = Call(request, pipe, self, stages, factory.clock.seconds())
        call.idleTimeout = idleTimeout
        self._call = call
        factory.callStarted(call)
        if self._reader is not None and rest:
            # The body bytes that came with the head are in the pipe before
            # the stages run: a stage that answers at once (a redirect, an
            # error) then finds the body complete, and the connection is
            # kept rather than closed on a body still arriving.
            self._readBody(rest)
            if self._reader is not None:
                rest = b""
            else:
                rest, self._buffer = self._buffer, b""
        if self._call is not call:
            # Refused by the body's framing or size meanwhile.
            return rest
        if error is not None:
            factory.refused(call, error)
            call.fail(error)
        else:
            call.next()
        return rest

    def _endCall(self, call: Call, reason: Failure | None) -> None:
        """The call is over: log it, and let go of what it held."""
        streaming = self._endStreaming()
        if reason is not None:
            call.cancel()
            pipe = self._pipe
            if pipe is not None:
                pipe.fail(reason)
            if streaming is not None:
                streaming.stopProducing()
        self._pipe = None
        self._pendingHead = None
        self.factory.callEnded(call, reason)

    def _afterCall(self) -> None:
        """Between requests: close, or look at the next one."""
        factory = self.factory
        if self._reader is not None and self._persistent:
            # Answered while the body still arrives: it is read and dropped
            # first (the idle timeout cuts one that stalls).
            factory.idleQueue.arm(self)
            if self._bodyPaused:
                self._bodyPaused = False
                self._updateReading()
            return
        if not self._persistent:
            self._closing = True
            self._loseConnection()
            return
        factory.idleQueue.arm(self)
        if self._readPaused or self._bodyPaused:
            # The body pipe went with its call: a pause it held (a body that
            # arrived whole and was never read) must not stall the next
            # request.
            self._readPaused = self._bodyPaused = False
            self._updateReading()
        if self._buffer and not self._parsing:
            buffer, self._buffer = self._buffer, b""
            self._parseHeads(buffer)

    # The BodyPipe's ClientReader ---------------------------------------------

    def pause(self) -> None:
        self._bodyPaused = True
        self._updateReading()

    def resume(self) -> None:
        if self._bodyPaused:
            self._bodyPaused = False
            self._updateReading()

    def _updateReading(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        if self._bodyPaused or self._readPaused:
            transport.pauseProducing()
        else:
            transport.resumeProducing()

    # Writing -------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not self._lost:
            self.transport.write(data)

    def _writeNow(self, data: bytes | memoryview) -> None:
        """Write C{data} and send it now (nothing follows it soon)."""
        if not self._lost:
            self._sendNow(self.transport, data)

    # HTTP/2 --------------------------------------------------------------------

    def _switchToHTTP2(self, data: bytes) -> None:
        factory = self.factory
        factory.headQueue.disarm(self)
        factory.idleQueue.disarm(self)
        protocol = factory.buildHTTP2(self)
        self._upgraded = protocol
        protocol.makeConnection(self.transport)
        if data:
            protocol.dataReceived(data)


def isTLSFailure(reason: Any) -> bool:
    """
    Whether a connection lost before its handshake completed was lost to a
    TLS error (an alert, garbage, no common version or cipher), not merely
    closed by the client.
    """
    check = getattr(reason, "check", None)
    return check is not None and check(SSL.Error) is not None
