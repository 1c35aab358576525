# -*- test-case-name: tests.test_h2 -*-
"""
L{Stream}: one HTTP/2 request and its answer, as the pipeline's client side
(L{edgeproxy.pipeline.call.ClientSide}) and as the reader of its request
body (L{edgeproxy.bodies.ClientReader}).

The stream holds what is to be written for it: the response head until it
can go with the first body bytes (a body at hand when the head comes goes
out in the same write, C{END_STREAM} on its last C{DATA} frame), and body
bytes the client's flow-control window or its socket does not take yet.
Its connection writes them (L{HTTP2Connection.push}) and pauses the body's
source, the backend, when they pass the listener's bounds; past the
connection's bound a response waits, unstarted (L{Stream.parked}).

Reading: the request body goes to a L{BodyPipe}; while the pipe has paused
the stream, the bytes received are not acknowledged, so the client's
window closes and it stops sending (RFC 9113 5.2): at most one window is
held per stream.

A WebSocket over HTTP/2 (RFC 8441) is a stream too: the tunnel of
L{edgeproxy.http.tunnel} takes the stream over (L{Stream.takeOver}) as it
takes over an HTTP/1.1 connection, and the stream's C{DATA} frames are the
client end of the tunnel (L{StreamTransport}).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections import deque
from typing import Any

from hpack import NeverIndexedHeaderTuple
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from edgeproxy.bodies import BodyPipe, IdleTimer
from edgeproxy.config.stagemodel import ErrorPages
from edgeproxy.errors import ContentTooLarge, ProxyError, UpstreamProtocolError
from edgeproxy.h1.fields import LINES, Fields, splitLine
from edgeproxy.http.errorpages import errorResponse, httpDate, pagesFor
from edgeproxy.http.websocket import startTunnel
from edgeproxy.pipeline.call import Call, discardResponse
from edgeproxy.pipeline.values import Response

__all__ = ["Stream", "StreamTransport", "responseHeaders"]

log = Logger()

NO_ERROR = 0x0
INTERNAL_ERROR = 0x2
CANCEL = 0x8

_COMPLETE = (ResponseDone, PotentialDataLoss)

_STATUS = {status: b"%d" % status for status in range(100, 1000)}

_NOT_SENT = frozenset(
    (
        # RFC 9113 8.2.2: connection-specific fields are never sent.
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        # Written from the response's length.
        b"content-length",
    )
)

_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_TUNNEL_NOT_SENT = frozenset((b"sec-websocket-accept",)) | _NOT_SENT


def responseHeaders(status: int, fields: Fields, length: int | None, skip: frozenset[bytes] = _NOT_SENT) -> list[tuple[bytes, bytes]]:
    """
    The header list of a response: C{:status}, the fields but the
    connection-specific ones, C{content-length} when the length is known
    (also for C{HEAD} and C{304}, the length the full response would have;
    never for 1xx and 204: RFC 9110 8.6), C{date} when missing.
    """
    headers = [(b":status", _STATUS.get(status) or b"%d" % status)]
    lines = fields.lines()
    if lines is not None:
        # A backend's fields, as they came: each line is (usually) known
        # already as the pair it holds, which is what HPACK takes.
        known = LINES
        dated = False
        for line in lines:
            pair = known.get(line)
            if pair is None:
                pair = splitLine(line)
            name = pair[0]
            if name in skip:
                continue
            if name == b"date":
                dated = True
            headers.append(pair)
    else:
        raw = fields.raw()
        for name, values in raw.items():
            if name in skip:
                continue
            for value in values:
                headers.append((name, value))
        dated = b"date" in raw
    if length is not None and status >= 200 and status != 204:
        headers.append((b"content-length", b"%d" % length))
    if not dated:
        headers.append((b"date", httpDate()))
    return headers


class Stream:
    """
    One stream of an L{HTTP2Connection}: its request's call and its answer.

    @ivar call: the call in flight, or L{None} once it is over.
    @ivar headers: the response's header list until it is written.
    @ivar pending: body bytes to write (bytes or memoryviews), in order.
    @ivar held: how many bytes L{pending} holds.
    @ivar endPending: C{END_STREAM} follows L{pending}.
    @ivar producer: the response body's source (paused past the bounds).
    @ivar parked: the response waiting its turn to start (see
        L{edgeproxy.http.h2.writing.Writing.parks}), or L{None}.
    @ivar rest: what is left of a whole body (a view of its bytes: the
        cache's, or the response's own) once its first bound went to
        L{pending}; the connection moves it there a bound at a time
        (L{None}: none left).
    """

    __slots__ = (
        "connection", "id", "call", "pipe", "maxBody", "received", "unacked",
        "readPaused", "remoteEnded", "localEnded", "answered", "headers", "noBody",
        "pending", "held", "endPending", "producer", "producerPaused", "delivering",
        "idle", "transport", "early", "wsKey", "parked", "rest",
    )

    def __init__(self, connection: Any, streamId: int) -> None:
        self.connection = connection
        self.id = streamId
        self.call: Call | None = None
        self.pipe: BodyPipe | None = None
        self.maxBody = 0
        self.received = 0
        self.unacked = 0
        self.readPaused = False
        self.remoteEnded = False
        self.localEnded = False
        self.answered = False
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.noBody = False
        self.pending: deque[Any] = deque()
        self.held = 0
        self.endPending = False
        self.producer: Any = None
        self.producerPaused = False
        self.delivering = False
        self.idle: IdleTimer | None = None
        self.transport: StreamTransport | None = None
        self.early: list[bytes] | None = None
        self.wsKey: bytes | None = None
        self.parked: Response | None = None
        self.rest: memoryview | None = None

    @property
    def factory(self) -> Any:
        return self.connection.factory

    # The request body (the connection hands DATA frames here) ---------------

    def dataReceived(self, data: bytes, flowLength: int) -> None:
        self.received += len(data)
        transport = self.transport
        if transport is not None and transport.protocol is not None:
            transport.protocol.dataReceived(data)
        elif self.early is not None:
            # A WebSocket's first frames, before the backend switched.
            self.early.append(data)
            self.readPaused = True
        else:
            pipe = self.pipe
            if pipe is not None:
                pipe.write(data)
                if self.maxBody and self.received > self.maxBody and self.call is not None:
                    self._bodyTooLarge()
        if self.readPaused:
            self.unacked += flowLength
        else:
            self.connection.ack(self, flowLength)

    def ended(self) -> None:
        """The client's END_STREAM."""
        self.remoteEnded = True
        pipe = self.pipe
        if pipe is not None:
            pipe.finish()
        transport = self.transport
        if transport is not None and transport.protocol is not None:
            # The client closed its side of the tunnel: the tunnel ends, and
            # so does our side once what it holds is written.
            transport.lost(Failure(ConnectionDone("client ended the stream")))
            self.endPending = True
            self.connection.push(self)

    def pause(self) -> None:
        self.readPaused = True

    def resume(self) -> None:
        if self.readPaused:
            self.readPaused = False
            unacked, self.unacked = self.unacked, 0
            if unacked:
                self.connection.ack(self, unacked)

    def _bodyTooLarge(self) -> None:
        call = self.call
        assert call is not None
        error = ContentTooLarge(f"body over the limit of {self.maxBody} bytes")
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            pipe.fail(Failure(error))
        call.stop()
        if self.answered:
            self.connection.reset(self, CANCEL, Failure(error))
        else:
            call.fail(error)

    def uploadIdle(self) -> None:
        log.warn("request body idle timeout: aborting backend and stream")
        self.connection.reset(self, CANCEL, Failure(ConnectionAborted("request body idle")))

    def responseIdle(self) -> None:
        log.warn("response body idle timeout: aborting backend and stream")
        self.connection.reset(self, CANCEL, Failure(ConnectionAborted("idle timeout")))

    # Answering (the pipeline's ClientSide) ------------------------------------

    def respond(self, call: Call, response: Response) -> None:
        if call is not self.call or self.answered:
            discardResponse(response)
            return
        self.answered = True
        call.status = response.status
        if response.body is None or not self.connection.parks(self, response):
            self.start(response)

    def start(self, response: Response) -> None:
        """Write C{response}, the answer to the call."""
        status = response.status
        connection = self.connection
        call = self.call
        fields = response.fields
        requestId = b""
        if call is not None:
            if call.firstByte is None:
                call.firstByte = connection.clock.seconds()
            request = call.request
            self.noBody = request.method == b"HEAD" or status == 204 or status == 304
            rules = call.responseRules
            if rules is not None:
                # The route's response header rules (edgeproxy.headers.stage).
                fields = rules.apply(fields)
            requestId = request.requestId
        headers = self.headers = responseHeaders(status, fields, response.length)
        if requestId:
            # Never in the response already (see answering.respond).
            ids = connection.factory.requestIds
            if ids is not None:
                # New in every response: never indexed (RFC 7541 6.2.3), so
                # it evicts no field that repeats from the client's table
                # and the rest of the block stays the same as the last.
                headers.append(NeverIndexedHeaderTuple(ids.name, requestId))
        body = response.body
        if body is None:
            self.endPending = True
            connection.push(self)
            return
        take = getattr(body, "takeBody", None)
        if take is not None:
            data = take()
            if data is not None:
                # The whole body at hand (most small responses): with its
                # head, without the body's protocol.
                if data and not self.noBody:
                    if call is not None:
                        call.sent = len(data)
                    bound = connection.streamBound
                    if len(data) > bound:
                        # Held a stream's bound at a time (the rest by
                        # reference: the cache's bytes, or bytes that are
                        # in memory whole anyway), so that a client that
                        # keeps this stream's window shut (a paused video)
                        # does not hold back the connection's other
                        # responses.
                        view = data if type(data) is memoryview else memoryview(data)
                        data, self.rest = view[:bound], view[bound:]
                    self.pending.append(data)
                    self.held += len(data)
                    connection.held += len(data)
                self.endPending = self.rest is None
                connection.push(self)
                connection.checkHeld(self)
                if call is not None and call is self.call and call.idleTimeout > 0:
                    # Not all written (a shut window, a client that stopped
                    # reading): the same deadline as a streamed body's.
                    self.idle = IdleTimer(connection.clock, call.idleTimeout, self.responseIdle)
                    self.idle.touch()
                return
        assert call is not None
        self.delivering = True
        body.deliverBody(call)
        self.delivering = False
        if call is not self.call:
            return
        # The head and the body bytes at hand go in one write (END_STREAM
        # on the last DATA frame when the body came whole); a body that goes
        # on does not hold them back (server-sent events).
        connection.push(self)
        connection.checkHeld(self)
        if self.producer is not None and call.idleTimeout > 0 and call is self.call:
            self.idle = IdleTimer(connection.clock, call.idleTimeout, self.responseIdle)
            self.idle.touch()

    def _pages(self, call: Call) -> ErrorPages | None:
        """The custom error pages of C{call} (L{pagesFor})."""
        return pagesFor(call.request.route, self.connection.factory.currentRuntime)

    def fail(self, call: Call, error: ProxyError) -> None:
        if call is not self.call:
            return
        if self.answered:
            # The response has started: the client must see it cut short.
            self.connection.reset(self, INTERNAL_ERROR, Failure(error))
            return
        self.respond(call, errorResponse(error, self._pages(call)))

    def interim(self, call: Call, status: int, reason: bytes, fields: Fields) -> None:
        # RFC 9113 8.1: interim responses are HEADERS frames without
        # END_STREAM; 101 does not exist in HTTP/2 (8.6).
        if (
            call is not self.call
            or self.answered
            or status == 101
            or (status == 100 and not call.request.fields.get(b"expect"))
        ):
            return
        self.connection.interim(self, responseHeaders(status, fields, None))

    def bodyStarted(self, call: Call, producer: Any) -> None:
        if call is not self.call:
            producer.stopProducing()
            return
        self.producer = producer

    def bodyData(self, call: Call, data: bytes) -> None:
        if call is not self.call or self.noBody or not data:
            return
        call.sent += len(data)
        self.pending.append(data)
        size = len(data)
        self.held += size
        connection = self.connection
        connection.held += size
        if self.delivering:
            return
        idle = self.idle
        if idle is not None:
            idle.touch()
        connection.push(self)
        connection.checkHeld(self)

    def bodyEnded(self, call: Call, reason: Failure) -> None:
        if call is not self.call:
            return
        idle, self.idle = self.idle, None
        if idle is not None:
            idle.close()
        self.producer = None
        if isinstance(reason.value, _COMPLETE):
            self.endPending = True
            if not self.delivering:
                self.connection.push(self)
            return
        log.warn("response body cut short: {why}", why=reason.getErrorMessage())
        self.connection.reset(self, INTERNAL_ERROR, reason)

    # The end of the call -----------------------------------------------------

    def endCall(self, reason: Failure | None) -> None:
        """The call is over (its answer written, or cut short by C{reason})."""
        call, self.call = self.call, None
        idle, self.idle = self.idle, None
        if idle is not None:
            idle.close()
        producer, self.producer = self.producer, None
        pipe, self.pipe = self.pipe, None
        if call is None:
            return
        if reason is not None:
            call.cancel()
            if pipe is not None:
                pipe.fail(reason)
            if producer is not None and self.transport is None:
                # (A tunnel's producer is its backend connection, which
                # the tunnel closes.)
                producer.stopProducing()
        self.connection.callEnded(self, call, reason)

    # WebSockets over HTTP/2 (RFC 8441) --------------------------------------

    def tunnel(self, call: Call, pool: Any, fields: Fields, path: bytes, hashKey: bytes | None) -> None:
        if call is not self.call:
            return
        # RFC 8441 5: no Sec-WebSocket-Key over HTTP/2; the backend's
        # HTTP/1.1 handshake needs one (RFC 6455 4.1), ours.
        key = base64.b64encode(os.urandom(16))
        self.wsKey = key
        self.transport = StreamTransport(self)
        startTunnel(self, call, pool, fields.withField(b"sec-websocket-key", key), path, hashKey)

    def takeOver(self, call: Call, fields: Fields, protocol: Any) -> bytes:
        """
        The backend switched to the WebSocket protocol: answer C{200} (RFC
        8441 5) and make the stream's C{DATA} frames C{protocol}'s
        connection.

        @return: what the client sent before (its first frames).
        """
        transport = self.transport
        assert transport is not None
        # RFC 6455 4.1: what the client (here, the proxy) checks.
        assert self.wsKey is not None
        expected = base64.b64encode(hashlib.sha1(self.wsKey + _WEBSOCKET_GUID).digest())
        early, self.early = self.early or [], None
        transport.protocol = protocol
        protocol.makeConnection(transport)
        if call is not self.call or fields.get(b"sec-websocket-accept") != expected:
            if call is self.call:
                log.warn("backend answered the WebSocket handshake with a wrong Sec-WebSocket-Accept")
                self.respond(
                    call,
                    errorResponse(UpstreamProtocolError("wrong Sec-WebSocket-Accept"), self._pages(call)),
                )
            transport.lost(Failure(ConnectionAborted("handshake refused")))
            return b""
        self.answered = True
        call.status = 200
        self.headers = responseHeaders(200, fields, None, _TUNNEL_NOT_SENT)
        if self.remoteEnded:
            # The client ended its side before the switch: the tunnel is
            # over as soon as it starts.
            self.endPending = True
            self.connection.push(self)
            transport.lost(Failure(ConnectionDone("client ended the stream")))
            return b"".join(early)
        self.connection.push(self)
        self.resume()
        return b"".join(early)

    def closeAfterResponse(self) -> None:
        # After a refused handshake the stream is reset once the answer is
        # complete (RFC 9113 8.1), as after any early answer.
        pass


@implementer(IPushProducer)
class StreamTransport:
    """
    The client end of a WebSocket tunnel over HTTP/2: writes become C{DATA}
    frames of the stream (held, and the producer paused, within the
    listener's bounds), pausing withholds the stream's window, closing ends
    the stream (C{END_STREAM}), aborting resets it (C{CANCEL}).
    """

    disconnecting = False

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.protocol: Any = None
        self.gone = False

    def write(self, data: bytes) -> None:
        stream = self.stream
        if self.gone or stream.localEnded or stream.endPending or not data:
            return
        stream.pending.append(data)
        size = len(data)
        stream.held += size
        connection = stream.connection
        connection.held += size
        if stream.call is not None:
            stream.call.sent += size
        connection.push(stream)
        connection.checkHeld(stream)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        stream = self.stream
        self.disconnecting = True
        if not self.gone and not stream.localEnded:
            stream.endPending = True
            stream.connection.push(stream)

    def abortConnection(self) -> None:
        if not self.gone:
            self.stream.connection.reset(self.stream, CANCEL, Failure(ConnectionAborted()))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.stream.producer = producer

    def unregisterProducer(self) -> None:
        self.stream.producer = None

    def pauseProducing(self) -> None:
        self.stream.pause()

    def resumeProducing(self) -> None:
        self.stream.resume()

    def stopProducing(self) -> None:
        self.abortConnection()

    def getPeer(self) -> Any:
        return self.stream.connection.transport.getPeer()

    def getHost(self) -> Any:
        return self.stream.connection.transport.getHost()

    def lost(self, reason: Failure) -> None:
        """The stream is over: the tunnel's client end is gone."""
        if self.gone:
            return
        self.gone = True
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)
