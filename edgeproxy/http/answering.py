# -*- test-case-name: tests.test_server -*-
"""
The answering half of L{edgeproxy.http.server.HTTP1Connection}: what the
pipeline's L{Call} calls on its client side (C{ClientSide}), written as
HTTP/1.1.

A response's head and the body bytes already at hand go out in one write
(a body held whole that is larger than L{WHOLE_LIMIT} goes that much at a
time, paused by a client that does not read); a
body still to come streams with backpressure (the body's source is the
transport's producer while it flows, and a body that goes without a byte for
the C{idle_timeout} of the route's upstream is cut).  The framing follows the response: its
length when known, else chunked (HTTP/1.1) or the end of the connection
(HTTP/1.0); no body for C{HEAD}, 1xx, 204 and 304.  The route's response
header rules are applied (L{edgeproxy.headers.stage}: to every final
response, error pages too); C{Date} is added when the response has none,
and the request's ID in its field; nothing identifies the software.  Interim responses
(1xx) are passed on to HTTP/1.1 clients (RFC 9110 15.2), C{100 Continue}
only to a client that asked for it, and once.  An answer that comes while
the request body is still arriving is sent at once; the rest of the body is
then read and dropped (up to L{edgeproxy.http.server.DISCARD_LIMIT} bytes,
else the connection closes), and the connection goes on.

A mixin with no state of its own: its attributes are the connection's slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from edgeproxy import h1
from edgeproxy.bodies import BODY_DONE, IdleTimer, PiecedBody
from edgeproxy.errors import ProxyError
from edgeproxy.h1.fields import Fields
from edgeproxy.http.errorpages import CLOSE_AFTER, dateField, errorResponse, pagesFor
from edgeproxy.http.websocket import startTunnel
from edgeproxy.pipeline.call import Call, discardResponse
from edgeproxy.pipeline.values import Response

if TYPE_CHECKING:
    from edgeproxy.bodies import BodyPipe

__all__ = ["Answering"]

log = Logger()

_COMPLETE = (ResponseDone, PotentialDataLoss)
"""How a complete body ends: with the end of its framing, or (a body
delimited by its source closing, RFC 9112 6.3 item 8) with the close that is
its end."""


JOIN_LIMIT = 64 * 1024
"""A whole body larger than this is written after its head, not joined to it."""

WHOLE_LIMIT = 256 * 1024
"""
The largest body held whole in memory (a cache hit, a converted image)
that is written at once.  A larger one is written this much at a time, as
views of it, with the body as the transport's producer as a streamed body
is: a client that reads slowly pauses it, so what the proxy holds for that
client is a piece (encrypted, queued for its socket) and what its
transport's buffer takes before it pauses its producer, not a copy of the
whole body (64 MiB for the largest cached object by default, per
connection).
"""

TURN_LIMIT = 1 << 20
"""
The most of a body held whole that is written in one reactor turn, in
pieces of L{WHOLE_LIMIT}, to a client whose socket takes them as fast as
they come; the rest waits for the next turn, so that other connections are
served between.
"""


@implementer(IPushProducer)
class _Streaming:
    """
    A response body's source, registered as the client transport's producer
    while the body flows: a slow client pauses it, and a resume (the client
    took bytes) counts as activity for the body's idle timeout.
    """

    __slots__ = ("producer", "idle")

    def __init__(self, producer: Any, idle: IdleTimer | None) -> None:
        self.producer = producer
        self.idle = idle

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self.idle is not None:
            self.idle.touch()
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()


class _Pieces(PiecedBody):
    """
    A body held whole in memory, delivered to its call's protocol in
    pieces of L{WHOLE_LIMIT} bytes, up to L{TURN_LIMIT} a reactor turn,
    while not paused (see there).
    """

    __slots__ = ("_view", "_done")

    def __init__(self, data: bytes | memoryview, clock: Any) -> None:
        super().__init__(clock)
        self._view = memoryview(data)
        self._done = 0

    def _pump(self) -> None:
        self._scheduled = None
        view = self._view
        total = len(view)
        # The first piece goes alone: it is written from deliverBody, before
        # the client side registers this body as its transport's producer
        # (nothing could pause it yet).
        turnEnd = self._done + (TURN_LIMIT if self._done else WHOLE_LIMIT)
        while True:
            protocol = self._protocol
            if self._paused or protocol is None:
                return
            start = self._done
            end = self._done = start + WHOLE_LIMIT
            # A view, not a copy (Answering.bodyData sends it at once).
            # A client that does not take it all pauses this body before
            # dataReceived returns (its transport's buffer is full).
            protocol.dataReceived(view[start:end])
            if self._protocol is None:
                return
            if end >= total:
                self._end(BODY_DONE)
                return
            if end >= turnEnd:
                break
        if not self._paused:
            self._again()

    def _more(self) -> bool:
        return self._protocol is not None

    def _end(self, reason: Failure) -> None:
        protocol, self._protocol = self._protocol, None
        self._view = memoryview(b"")
        if protocol is not None:
            protocol.connectionLost(reason)


class Answering:
    """
    The C{ClientSide} of an HTTP/1.1 connection (see the module docstring).
    """

    if not TYPE_CHECKING:
        # No slots of its own (the connection's are its attributes); hidden
        # from mypy, which would refuse every attribute set here.
        __slots__ = ()

    factory: Any
    transport: Any
    _call: Call | None
    _reader: h1.BodyReader | None
    _pipe: BodyPipe | None
    _persistent: bool
    _lost: bool
    _pendingHead: bytes | None
    _chunked: bool
    _noBody: bool
    _streaming: Any
    _registered: bool
    _answered: bool
    _continued: bool

    def respond(self, call: Call, response: Response) -> None:
        if call is not self._call or self._pendingHead is not None or self._answered:
            discardResponse(response)
            return
        self._answered = True
        status = response.status
        call.status = status
        request = call.request
        if call.firstByte is None:
            call.firstByte = self.factory.clock.seconds()
        length = response.length
        noBody = request.method == b"HEAD" or status in (204, 304) or status < 200
        chunked = False
        if noBody:
            if status == 204 or status < 200:
                # RFC 9110 8.6: no Content-Length in a 1xx or 204.
                length = None
        elif length is None:
            if request.version == b"HTTP/1.1":
                chunked = True
            else:
                # HTTP/1.0: the close ends the body (RFC 9112 6.3 item 8).
                self._persistent = False
        if self._reader is not None:
            # Answered before the whole body arrived: the rest is read and
            # dropped (up to DISCARD_LIMIT), so that the next request is
            # where the client puts it and no unread byte makes the kernel
            # reset the connection under the answer (RFC 9112 9.6).
            pipe = self._pipe
            if pipe is not None:
                pipe.stopProducing()
        fields = response.fields
        rules = call.responseRules
        if rules is not None:
            # The route's response header rules (edgeproxy.headers.stage).
            fields = rules.apply(fields)
        extra = b"" if b"date" in fields else dateField()
        requestId = request.requestId
        if requestId:
            # Never in the response already: a backend's is dropped
            # (forwarded.clientFields), a rule may not set it.
            ids = self.factory.requestIds
            if ids is not None:
                extra += ids.prefix + requestId + b"\r\n"
        self._noBody = noBody
        self._chunked = chunked
        self._pendingHead = h1.writeResponseHead(
            request.version,
            status,
            response.reason,
            fields,
            length,
            chunked,
            not self._persistent,
            extra,
        )
        body = response.body
        if body is None:
            self._finishResponse(call)
            return
        take = getattr(body, "takeBody", None)
        if take is not None:
            data = take()
            if data is not None and len(data) > WHOLE_LIMIT and not noBody:
                # Too large to write at once (see WHOLE_LIMIT): streamed.
                body = _Pieces(data, self.factory.clock)
            elif data is not None:
                # The whole body is at hand (most small responses): head
                # and body go in one write, without the body's protocol.
                if data and not noBody:
                    call.sent = len(data)
                    head = self._pendingHead
                    if chunked:
                        self._pendingHead = head + h1.chunk(data)
                    elif len(data) > JOIN_LIMIT and type(data) is bytes:
                        # A large body (a cache hit) is not copied behind
                        # its head: two writes.
                        self._pendingHead = b""
                        self._writeNow(head)
                        self._writeNow(data)
                    else:
                        self._pendingHead = head + data
                self._finishResponse(call)
                return
        body.deliverBody(call)
        if call is not self._call or self._lost:
            return
        # The body is not over yet: the head goes now, so that a slow or
        # endless body (server-sent events) does not hold it back, and the
        # body's source becomes the transport's producer.
        head = self._pendingHead
        if head:
            self._pendingHead = b""
            self._write(head)
        producer = self._streaming
        if producer is not None:
            idle = None
            if call.idleTimeout > 0:
                idle = IdleTimer(self.factory.clock, call.idleTimeout, self._responseIdle)
                idle.touch()
            streaming = _Streaming(producer, idle)
            self._streaming = streaming
            self._registered = True
            self.transport.registerProducer(streaming, True)

    def fail(self, call: Call, error: ProxyError) -> None:
        if call is not self._call:
            return
        if self._pendingHead is not None:
            # The response has started: the client must see it cut short.
            self._abort()
            return
        if error.status in CLOSE_AFTER:
            self._persistent = False
        pages = pagesFor(call.request.route, self.factory.currentRuntime)
        self.respond(call, errorResponse(error, pages))

    def interim(self, call: Call, status: int, reason: bytes, fields: Fields) -> None:
        request = call.request
        if (
            call is not self._call
            or self._pendingHead is not None
            or request.version != b"HTTP/1.1"
            or status == 101
        ):
            return
        if status == 100:
            # Only to a client that asked for it, and once (the proxy's own
            # when the backend kept silent, or the backend's).
            if self._continued or not request.fields.get(b"expect"):
                return
            self._continued = True
        self._write(h1.writeResponseHead(b"HTTP/1.1", status, reason, fields, None))

    def bodyStarted(self, call: Call, producer: Any) -> None:
        if call is not self._call:
            producer.stopProducing()
            return
        # Wrapped and registered only if the body outlasts deliverBody (see
        # respond): most bodies came whole with their head.
        self._streaming = producer

    def bodyData(self, call: Call, data: bytes | memoryview) -> None:
        if call is not self._call or self._noBody or not data:
            return
        call.sent += len(data)
        streaming = self._streaming
        if type(streaming) is _Streaming and streaming.idle is not None:
            streaming.idle.touch()
        if type(data) is memoryview:
            # A piece of a body held whole (_Pieces): sent now, after the
            # head, and not copied (the transports take views there).
            head = self._pendingHead
            if head:
                self._pendingHead = b""
                self._writeNow(head)
            self._writeNow(h1.chunk(data) if self._chunked else data)
            return
        if self._chunked:
            data = h1.chunk(data)
        head = self._pendingHead
        if head:
            self._pendingHead = b""
            data = head + data
        self._write(data)

    def bodyEnded(self, call: Call, reason: Failure) -> None:
        if call is not self._call:
            return
        self._endStreaming()
        if isinstance(reason.value, _COMPLETE):
            self._finishResponse(call)
            return
        log.warn("response body cut short: {why}", why=reason.getErrorMessage())
        self._call = None
        self._abort()
        self._endCall(call, reason)

    def tunnel(self, call: Call, pool: Any, fields: Fields, path: bytes, hashKey: bytes | None) -> None:
        startTunnel(self, call, pool, fields, path, hashKey)

    # The response written -------------------------------------------------------

    def _finishResponse(self, call: Call) -> None:
        head = self._pendingHead
        tail = h1.LAST_CHUNK if self._chunked and not self._noBody else b""
        # The response is complete: no reason to wait for more to write.
        if head:
            self._writeNow(head + tail)
        elif tail:
            self._writeNow(tail)
        self._pendingHead = None
        self._call = None
        self._endCall(call, None)
        if not self._lost:
            self._afterCall()

    def _endStreaming(self) -> Any:
        """Let go of the response body's source (unregistered, timer off)."""
        streaming, self._streaming = self._streaming, None
        if type(streaming) is _Streaming and streaming.idle is not None:
            streaming.idle.close()
        if self._registered:
            self._registered = False
            if not self._lost:
                self.transport.unregisterProducer()
        return streaming

    def _responseIdle(self) -> None:
        log.warn("response body idle timeout: aborting backend and client")
        call = self._call
        self._call = None
        self._abort()
        if call is not None:
            self._endCall(call, Failure(ConnectionAborted("idle timeout")))

    # The connection's (see HTTP1Connection).

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _writeNow(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def _endCall(self, call: Call, reason: Failure | None) -> None:
        raise NotImplementedError

    def _afterCall(self) -> None:
        raise NotImplementedError
