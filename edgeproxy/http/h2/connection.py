# -*- test-case-name: tests.test_h2 -*-
"""
L{HTTP2Connection}: one client connection speaking HTTP/2 (RFC 9113), on
the C{h2} library's state machine, answered through the stage pipeline.

An HTTP/1.1 connection whose TLS handshake chose C{h2} hands its transport
to this protocol (L{edgeproxy.http.server.HTTP1Connection}); everything it
reads from then on comes here.

Reading.  Every frame header is looked at before the library sees the
frame (L{edgeproxy.http.h2.guard}): frame size, flood budgets, and where to
cut a read so that no more than a batch of new streams is built at once.
A read that is nothing but C{HEADERS} frames opening streams (what a
client sending requests without bodies sends) opens them through
L{edgeproxy._compat.h2.openStream}, without the library's frame parsing,
each request dispatched as its frame comes; any other read goes to the
library's C{receive_data}.
A request's header list is read by L{edgeproxy.http.h2.head} and handed to
L{ListenerFactory.prepare}, the same way as HTTP/1.1's, then to its stages
in a L{Call} whose client side is a L{Stream}.  Streams past
C{h2_max_concurrent_streams} are refused (C{REFUSED_STREAM}); malformed
requests are reset (C{PROTOCOL_ERROR}); a stream reset by the client in the
same read as its request never reaches a stage.

Writing.  What the library has to send is written once per read, or once
per answer outside a read.  Response bodies are written as the client's
windows and the socket allow; what waits is held per stream, and the
body's source is paused when a stream holds more than
C{h2_stream_buffer} bytes or the connection more than
C{h2_connection_buffer}, and resumed when half of that is gone; past the
connection's bound no further response is started until then.  A body
that came whole (the cache's bytes, an error page, a converted image) is
not counted whole: the stream refers to its bytes and takes a stream's
bound of them at a time (L{Stream.rest}), so a stream whose window the
client keeps shut holds back nothing else.  A response not all written when it starts, whole or
streamed, has the upstream's idle timeout (the stream is reset without
progress for that long).  This
protocol is the transport's producer for the whole connection: a client
that stops reading stops the writing of C{DATA} frames.

Limits and timers, as for HTTP/1.1 on the same listener: the header
deadline runs until the client's preface and first frame are in, and
whenever a frame (but a C{DATA} payload) or a header block is incomplete;
the idle timeout runs while no request is in flight; each request body and
response body has the route's idle timeout; body limits give 413 on the
stream.  A connection told to close, or whose client sent C{GOAWAY}
without an error, sends C{GOAWAY} with the last stream it took (RFC 9113
6.8), serves those, refuses later ones, and closes.  Any
protocol error ends in C{GOAWAY} with its code, never in an exception.
"""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame, SettingsFrame
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy._compat.h2 import ENABLED as OPEN_STREAMS
from edgeproxy._compat.h2 import openStream, prune, rememberClosed, reopen
from edgeproxy.bodies import BodyPipe
from edgeproxy.errors import ProxyError
from edgeproxy.http.h2.guard import RESETS, FrameGuard, Violation
from edgeproxy.http.h2.head import Malformed, Refused, RequestHead, readRequestHead
from edgeproxy.http.h2.hpackcache import CachingDecoder, CachingEncoder
from edgeproxy.http.h2.notes import clientError, clientNote, codeName
from edgeproxy.http.h2.stream import Stream
from edgeproxy.http.h2.writing import Writing
from edgeproxy.pipeline.call import Call

__all__ = ["ABORT_TIMEOUT", "HTTP2Connection"]

log = Logger()

ABORT_TIMEOUT = 15.0
"""Seconds a connection told to close gets to flush before it is aborted."""

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8

_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,
    # The request's fields are checked by edgeproxy.http.h2.head (with
    # stream errors, where the library would end the connection); the
    # response's are ours.
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    split_outbound_cookies=False,
)

_CLOSED_KEPT = 32
"""Closed streams the library may hold before it is told to forget them."""

_HEADS_CACHED = 32
"""Request header lists (and what they were read as) remembered per
connection: a client repeating a request repeats its list."""


class _NotImplemented(ProxyError):
    status = 501


@implementer(IProtocol, IPushProducer)
class HTTP2Connection(Writing):
    """
    One HTTP/2 client connection, built by
    L{edgeproxy.http.listener.ListenerFactory.buildHTTP2}.

    @ivar held: response bytes the streams hold for the client.
    """

    __slots__ = (
        "factory", "clock", "transport", "connected", "limits", "settings", "_h2", "_guard",
        "_streams", "_info", "_connectProtocol", "_goingAway", "_lastStream", "_closing",
        "_lost", "_abortCall", "_headArmed", "_heads", "_headQueue", "_idleQueue",
        "_maxStreams", "__weakref__",
    )

    def __init__(self, factory: Any, connectProtocol: bool = False) -> None:
        self.factory = factory
        self.clock = factory.clock
        self.limits = factory.limits
        settings = self.settings = factory.listener.h2
        Writing.__init__(self, settings.stream_buffer, settings.connection_buffer)
        self.transport: Any = None
        self.connected = 0
        self._h2: Any = None
        self._guard = FrameGuard(settings.max_frame_size, settings.max_concurrent_streams)
        self._streams: dict[int, Stream] = {}
        self._info: Any = None
        self._connectProtocol = connectProtocol
        self._goingAway = False
        self._lastStream = 0
        self._closing = False
        self._lost = False
        self._abortCall: Any = None
        self._headArmed = False
        self._heads: dict[tuple[Any, ...], Any] = {}
        self._headQueue = factory.headQueue
        self._idleQueue = factory.idleQueue
        self._maxStreams = settings.max_concurrent_streams

    # IProtocol -----------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        settings = self.settings
        advertised = {
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window_size,
            SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
        }
        if self._connectProtocol:
            # RFC 8441 3.
            advertised[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        h2 = self._h2 = H2Connection(_CONFIG)
        # The library ends the connection (PROTOCOL_ERROR) at one stream over
        # its limit; the refusal of one stream (REFUSED_STREAM, RFC 9113
        # 5.1.2) is ours, at the advertised limit.  The library's limit
        # allows the streams of one batch of a read (the guard cuts reads
        # there) on top.
        enforced = dict(advertised)
        enforced[SettingCodes.MAX_CONCURRENT_STREAMS] = 2 * settings.max_concurrent_streams + 1
        h2.local_settings = Settings(client=False, initial_values=enforced)
        h2.max_inbound_frame_size = settings.max_frame_size
        # How the last streams closed, for frames in flight then: a client
        # closes at most the streams it has open in one round trip, so a
        # few times the limit of them (the library keeps 65,536).
        rememberClosed(h2, 8 * settings.max_concurrent_streams)
        h2.encoder = CachingEncoder()
        h2.decoder = CachingDecoder(settings.max_header_list_size)
        h2.initiate_connection()
        h2.data_to_send()
        preface = SettingsFrame(0, settings={int(k): v for k, v in advertised.items()}).serialize()
        window = max(settings.connection_buffer, settings.initial_window_size)
        if window > 65535:
            # RFC 9113 6.9.2: the connection's window starts at 65,535
            # whatever the settings say.
            h2.increment_flow_control_window(window - 65535)
        self.transport.write(preface + h2.data_to_send())
        self.transport.registerProducer(self, True)
        # The header deadline runs until the preface and the first frame
        # are in; the idle timeout from the start (suspended while a request
        # is in flight: see idleExpired).
        self._headQueue.arm(self)
        self._headArmed = True
        self._idleQueue.arm(self)

    def logPrefix(self) -> str:
        return "HTTP2Connection"

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        guard = self._guard
        violation = guard.scan(data, self.clock.seconds())
        if violation is not None:
            self._violated(violation)
            return
        self._receiving = True
        try:
            cuts = guard.cuts
            requests = guard.requests
            if requests is not None and OPEN_STREAMS:
                self._openStreams(data, requests)
            elif cuts is None:
                self._receive(data)
            else:
                start = 0
                h2 = self._h2
                for cut in cuts:
                    self._receive(data[start:cut])
                    if self._closing:
                        return
                    # What the library has to send goes first (reading a
                    # GOAWAY drops it).
                    waiting = h2.data_to_send()
                    if waiting:
                        self._out.append(waiting)
                    start = cut
                self._receive(data[start:])
        finally:
            self._receiving = False
        if self._closing:
            return
        self._flush()
        if guard.incomplete or not guard.started:
            if not self._headArmed:
                self._headArmed = True
                self._headQueue.arm(self)
        elif self._headArmed:
            self._headArmed = False
            self._headQueue.disarm(self)
        if not self._calls:
            self._idleQueue.move(self)

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        self._closing = True
        self.connected = 0
        self._headQueue.disarm(self)
        self._idleQueue.disarm(self)
        abortCall, self._abortCall = self._abortCall, None
        if abortCall is not None and abortCall.active():
            abortCall.cancel()
        streams = list(self._streams.values())
        self._streams.clear()
        self._waiting.clear()
        for stream in streams:
            self._closeStream(stream, reason)
        self._parked.clear()
        self.factory.http2Lost(self)

    # The transport's producer (writing) ------------------------------------

    def pauseProducing(self) -> None:
        self._writePaused = True

    def resumeProducing(self) -> None:
        if not self._writePaused:
            return
        self._writePaused = False
        self._pushWaiting()

    def stopProducing(self) -> None:
        self._writePaused = True

    # The listener's view (drain, reload, timers) ------------------------------

    def busy(self) -> bool:
        """Whether a stream is open."""
        return bool(self._streams)

    def closeAfterResponse(self) -> None:
        """GOAWAY with the last stream taken; close once those are done."""
        self.goAway()

    def closeIdle(self) -> None:
        """GOAWAY and close (no stream is open)."""
        self.goAway()
        self._loseConnection()

    def goAway(self) -> None:
        """
        Tell the client no further stream is taken (RFC 9113 6.8: GOAWAY,
        C{NO_ERROR}, the last stream taken): it retries later ones on a new
        connection.  The connection closes once its open streams are done.
        """
        if self._goingAway or self._closing:
            return
        self._goingAway = True
        h2 = self._h2
        self._lastStream = h2.highest_inbound_stream_id
        # Written beside the library, which would take no frame after a
        # GOAWAY of its own.
        self._flush()
        self.transport.write(GoAwayFrame(0, last_stream_id=self._lastStream, error_code=NO_ERROR).serialize())
        if not self._streams:
            self._loseConnection()

    def headExpired(self) -> None:
        """The header deadline passed with a frame or header block incomplete."""
        self._headArmed = False
        if self._closing:
            return
        clientNote(self.clock, "HTTP/2 client too slow", "HTTP/2 client too slow sending a frame or header block: closing")
        self._terminate(NO_ERROR, b"header timeout")

    def idleExpired(self) -> None:
        """
        The idle timeout passed: with no request in flight the connection
        closes (GOAWAY, no error); with one it is counted again (moving a
        deadline once per timeout is cheaper than taking it out and putting
        it back per request).
        """
        if self._closing:
            return
        if self._calls:
            self._idleQueue.arm(self)
            return
        self._terminate(NO_ERROR, b"idle")

    # Reading --------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except ProtocolError as error:
            # The library has queued its GOAWAY with the error's code.
            clientError(self.clock, error)
            self._fatal()
            return
        except Exception:
            log.failure("HTTP/2 frame handling failed")
            self._terminate(INTERNAL_ERROR, b"")
            return
        reset: set[int] | None = None
        if self._guard.resets and len(events) > 1:
            reset = {event.stream_id for event in events if type(event) is StreamReset}
        try:
            for event in events:
                kind = type(event)
                if kind is RequestReceived:
                    if reset is not None and event.stream_id in reset:
                        # Rapid Reset: cancelled before it was read.
                        continue
                    self._requestReceived(event.stream_id, event.headers, event.stream_ended is not None)
                elif kind is DataReceived:
                    self._dataReceived(event)
                elif kind is StreamEnded:
                    self._streamEnded(event.stream_id)
                elif kind is WindowUpdated or kind is RemoteSettingsChanged:
                    if self._waiting:
                        self._pushWaiting()
                elif kind is StreamReset:
                    self._streamReset(event)
                elif kind is ConnectionTerminated:
                    self._clientWentAway(event)
                if self._closing:
                    return
        except Exception:
            log.failure("HTTP/2 event handling failed")
            self._terminate(INTERNAL_ERROR, b"")

    def _openStreams(self, data: bytes, requests: list[tuple[int, int, int, bool]]) -> None:
        """
        A read of whole HEADERS frames each opening a stream (the guard's
        C{requests}): the streams opened without the library's frame
        parsing, each request dispatched as its frame comes.
        """
        h2 = self._h2
        for start, end, streamId, ended in requests:
            try:
                headers = openStream(h2, streamId, data[start:end], ended)
            except ProtocolError as error:
                clientError(self.clock, error)
                self._fatal()
                return
            except Exception:
                log.failure("HTTP/2 frame handling failed")
                self._terminate(INTERNAL_ERROR, b"")
                return
            try:
                self._requestReceived(streamId, headers, ended)
                if ended:
                    self._streamEnded(streamId)
            except Exception:
                log.failure("HTTP/2 event handling failed")
                self._terminate(INTERNAL_ERROR, b"")
                return
            if self._closing:
                return
        # A walk over every stream every few new ones, not for each; the
        # rest goes once no request is in flight (Writing.callEnded).
        prune(h2, len(self._streams) + _CLOSED_KEPT)

    def _streamEnded(self, streamId: int) -> None:
        """The client's END_STREAM on C{streamId}."""
        stream = self._streams.get(streamId)
        if stream is not None:
            stream.ended()
            if stream.localEnded:
                self._forget(stream)

    def _requestReceived(self, streamId: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        if self._goingAway and streamId > self._lastStream:
            self._refuse(streamId)
            return
        if len(self._streams) >= self._maxStreams:
            self._refuse(streamId)
            violation = self._guard.spend(RESETS, self.clock.seconds())
            if violation is not None:
                self._violated(violation)
            return
        key = tuple(headers)
        heads = self._heads
        head = heads.get(key)
        if head is None:
            limits = self.limits
            try:
                head = readRequestHead(
                    headers, limits.max_headers, limits.max_header_size, self._connectProtocol
                )
            except Malformed as error:
                log.debug("malformed HTTP/2 request: {why}", why=str(error))
                self.resetStream(streamId, PROTOCOL_ERROR)
                return
            except Refused as error:
                head = error
            if len(heads) >= _HEADS_CACHED:
                heads.clear()
            heads[key] = head
        stream = Stream(self, streamId)
        self._streams[streamId] = stream
        if ended:
            stream.remoteEnded = True
        self._dispatch(stream, head)

    def _dispatch(self, stream: Stream, head: RequestHead | Refused) -> None:
        factory = self.factory
        refused = None
        if isinstance(head, Refused):
            # Answered with its status, logged as any refused request.
            refused, head = head, head.head
        info = self._info
        if info is None:
            info = self._info = factory.connectionInfo(self.transport)
        length = 0 if stream.remoteEnded else head.length
        fields = head.fields
        if head.protocol is not None:
            # RFC 8441 4: :protocol stands for the Upgrade of HTTP/1.1, and
            # the forward stage tunnels it as one.
            fields = fields.withField(b"upgrade", head.protocol)
            length = 0
            stream.early = []
        request, stages, idleTimeout, maxBody, error = factory.prepare(
            head.method, head.target, b"HTTP/2", fields, head.host, length, info, refused
        )
        if error is None and head.protocol is not None and (
            request.route is None or not request.route.websocket
        ):
            error = _NotImplemented("WebSocket not allowed on this route")
            stages = ()
        pipe = None
        if not stream.remoteEnded and error is None and stream.early is None:
            pipe = stream.pipe = BodyPipe(length, stream, self.clock, idleTimeout, stream.uploadIdle)
        stream.maxBody = maxBody
        call = Call(request, pipe, stream, stages, self.clock.seconds())
        call.idleTimeout = idleTimeout
        stream.call = call
        self._calls += 1
        factory.callStarted(call)
        if error is not None:
            factory.refused(call, error)
            call.fail(error)
        else:
            call.next()

    def _dataReceived(self, event: DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.dataReceived(event.data, event.flow_controlled_length)

    def _streamReset(self, event: StreamReset) -> None:
        stream = self._streams.pop(event.stream_id, None)
        if stream is None:
            return
        self._dropPending(stream)
        stream.localEnded = stream.remoteEnded = True
        self._closeStream(stream, Failure(ConnectionLost("stream reset by the client")))
        self._afterForget()
        self._released(None)

    def _clientWentAway(self, event: ConnectionTerminated) -> None:
        if not event.error_code and reopen(self._h2):
            # RFC 9113 6.8: a client's GOAWAY names the last stream the
            # server opened (none); its own streams in flight may complete.
            # Ours says no later one is taken, and the connection closes
            # once those are done.
            self.goAway()
            return
        # With an error (or a library that takes nothing after a GOAWAY):
        # the streams in flight end with the connection.
        if event.error_code:
            code = codeName(event.error_code)
            clientNote(self.clock, f"HTTP/2 client GOAWAY {code}", "HTTP/2 client sent GOAWAY: {code}", code=code)
        self._closing = True
        self._flush(force=True)
        self._loseConnection()

    def _refuse(self, streamId: int) -> None:
        self.resetStream(streamId, REFUSED_STREAM)

    def resetStream(self, streamId: int, code: int) -> None:
        """
        Send RST_STREAM for C{streamId}, unless the connection is already
        closed at the HTTP/2 level (a GOAWAY read in the same batch of
        frames: the library then refuses any frame, and the stream ends
        with the connection anyway).
        """
        try:
            self._h2.reset_stream(streamId, code)
        except H2Error:
            pass

    # Closing --------------------------------------------------------------------

    def _violated(self, violation: Violation) -> None:
        code = codeName(violation.code)
        clientNote(self.clock, f"HTTP/2 client refused {code}", "HTTP/2 client refused: {why}", why=violation.why)
        self._terminate(violation.code, b"")

    def _terminate(self, code: int, debug: bytes) -> None:
        """GOAWAY with C{code}, then close."""
        if self._closing:
            return
        try:
            self._h2.close_connection(code, additional_data=debug or None)
        except H2Error:
            pass
        self._fatal()

    def _fatal(self) -> None:
        """Write what the library has (its GOAWAY) and close."""
        self._closing = True
        self._flush(force=True)
        self._loseConnection()

    def _loseConnection(self) -> None:
        if self._lost or self._abortCall is not None:
            return
        # What the library still has (a last response, a GOAWAY) goes first.
        self._flush(force=True)
        self._closing = True
        self._headQueue.disarm(self)
        self._idleQueue.disarm(self)
        transport = self.transport
        # A TLS transport sends its close_notify, and so closes, only once
        # no producer is registered.
        transport.unregisterProducer()
        transport.loseConnection()
        self._abortCall = self.clock.callLater(ABORT_TIMEOUT, self._abort)

    def _abort(self) -> None:
        self._abortCall = None
        if not self._lost:
            self.transport.abortConnection()
