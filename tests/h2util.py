"""
An HTTP/2 client and server in memory for the tests of
L{edgeproxy.http.h2}: the C{h2} library's own client-side C{H2Connection} as
the peer, bytes moved through a C{StringTransport} into an
L{HTTP1Connection} (whose ALPN chose C{h2}) of a real L{ListenerFactory},
whose route ends in a stage the test controls.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import Frame, HeadersFrame
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from edgeproxy.config.model import (
    Config,
    HTTP2Settings,
    Limits,
    Listener,
    ProxySettings,
    Route,
    Server,
    Upstream,
)
from edgeproxy.h1 import Fields
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.stages import RoutePipeline
from edgeproxy.pipeline.values import BODY_DONE, BytesBody, Response
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime

UPSTREAM = Upstream(name="app", servers=(Server("10.0.0.1", 8080),), idle_timeout=30.0)
ROUTE = Route(name="all", hosts=("*",), paths=("/",), upstream="app", max_body_size=1000)


class Body:
    """A response body the test writes, with the producer it is paused by."""

    def __init__(self) -> None:
        self.protocol: Any = None
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True

    def write(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def finish(self) -> None:
        self.protocol.connectionLost(BODY_DONE)


class Stage:
    """
    The route's only stage.  Records every request; answers at once with
    C{answer(call)} when set, else holds the call in C{held}.  Reads the
    body when C{read} is set (C{bodies} per target).
    """

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.held: list[Call] = []
        self.answer: Any = None
        self.read = False
        self.bodies: dict[bytes, bytes] = {}
        self.consumers: dict[bytes, Any] = {}

    def handle(self, call: Call) -> None:
        self.requests.append(call.request)
        if self.read and call.body is not None:
            consumer = Consumer()
            self.consumers[call.request.target] = consumer
            done = call.body.startProducing(consumer)

            def complete(_: object) -> None:
                self.bodies[call.request.target] = consumer.data
                call.respond(textResponse(200, consumer.data))

            done.addCallbacks(complete, lambda failure: None)
            return
        if self.answer is not None:
            self.answer(call)
        else:
            self.held.append(call)


class Consumer:
    def __init__(self) -> None:
        self.data = b""
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        self.data += data

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        pass


def textResponse(status: int, body: bytes = b"", fields: list[tuple[bytes, bytes]] | None = None) -> Response:
    return Response(
        status, b"OK", Fields(fields or [(b"content-type", b"text/plain")]), len(body), BytesBody(body)
    )


class AccessLog:
    def __init__(self) -> None:
        self.calls: list[Call] = []

    def log(self, call: Call) -> None:
        self.calls.append(call)


def makeFactory(
    clock: Clock,
    stage: Any,
    limits: Limits | None = None,
    settings: HTTP2Settings | None = None,
    routes: tuple[Route, ...] = (ROUTE,),
    proxy: ProxySettings | None = None,
) -> ListenerFactory:
    config = Config(
        path="/etc/edge.ini",
        proxy=proxy or ProxySettings(),
        tls=None,
        listeners=(),
        upstreams={"app": UPSTREAM},
        routes=routes,
    )
    runtime = Runtime(
        config=config,
        router=Router(routes),
        pools={},
        pipelines={route.name: RoutePipeline((("forward", stage),), 30.0) for route in routes},
    )
    listener = Listener(
        name="l",
        endpoint="tcp:0",
        tls=True,
        limits=limits or Limits(),
        h2=settings or HTTP2Settings(),
    )
    factory = ListenerFactory(lambda: runtime, listener, clock)
    factory.accessLog = AccessLog()
    return factory


REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"), (b":path", b"/")]


def request(path: bytes = b"/", method: bytes = b"GET", extra: list[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":authority", b"example.com"),
        (b":path", path),
        *extra,
    ]


class Pair:
    """An HTTP/2 client and an edgeproxy listener connection, in memory."""

    def __init__(
        self,
        limits: Limits | None = None,
        settings: HTTP2Settings | None = None,
        routes: tuple[Route, ...] = (ROUTE,),
        clientSettings: dict[int, int] | None = None,
        preface: bool = True,
        proxy: ProxySettings | None = None,
        transport: StringTransport | None = None,
    ) -> None:
        self.clock = Clock()
        self.stage = Stage()
        self.factory = makeFactory(self.clock, self.stage, limits, settings, routes, proxy)
        self.connection = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        self.transport = transport or StringTransport()
        self.transport.peerAddress = IPv4Address("TCP", "192.0.2.7", 40000)
        self.transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        self.connection.makeConnection(self.transport)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=False)
        )
        if clientSettings:
            self.client.local_settings = h2.settings.Settings(client=True, initial_values=clientSettings)
        self.client.initiate_connection()
        self.decoder = hpack.Decoder()
        self.events: list[Any] = []
        self.autoAck = True
        self.lost = False
        if preface:
            self.pump()

    @property
    def server(self) -> Any:
        """The HTTP/2 protocol the connection switched to."""
        return self.connection._upgraded

    def send(self, data: bytes) -> None:
        """Raw bytes from the client (on top of what the client library has)."""
        self.connection.dataReceived(data)

    def sendFrame(self, frame: Frame) -> None:
        self.send(frame.serialize())

    def pump(self) -> list[Any]:
        """Move bytes both ways until nothing moves; the client's new events."""
        new: list[Any] = []
        for _ in range(1000):
            out = self.client.data_to_send()
            if out and not self.lost:
                self.connection.dataReceived(out)
            back = self.transport.value()
            self.transport.clear()
            if back:
                events = self.client.receive_data(back)
                for event in events:
                    if self.autoAck and isinstance(event, h2.events.DataReceived):
                        self.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                new.extend(events)
            if not out and not back:
                break
        self.events.extend(new)
        return new

    def get(self, headers: list[tuple[bytes, bytes]], body: bytes | None = None) -> int:
        """Send a request; its stream id."""
        stream = self.client.get_next_available_stream_id()
        self.client.send_headers(stream, headers, end_stream=body is None)
        if body is not None:
            self.client.send_data(stream, body, end_stream=True)
        self.pump()
        return stream

    def response(self, stream: int) -> tuple[dict[bytes, bytes], bytes, bool]:
        """The headers, body and whether the stream ended, so far."""
        headers: dict[bytes, bytes] = {}
        body = b""
        ended = False
        for event in self.events:
            if getattr(event, "stream_id", None) != stream:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
        return headers, body, ended

    def frames(self) -> list[Frame]:
        """
        The frames the server wrote since the last look, read without the
        client library (for tests that send what it would refuse to);
        header blocks are decoded into C{frame.headers}.
        """
        data = self.transport.value()
        self.transport.clear()
        frames = []
        while len(data) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9 : 9 + length]))
            data = data[9 + length :]
            if isinstance(frame, HeadersFrame):
                frame.headers = dict(self.decoder.decode(frame.data, raw=True))  # type: ignore[attr-defined]
            frames.append(frame)
        return frames

    def resets(self) -> dict[int, int]:
        return {
            event.stream_id: int(event.error_code)
            for event in self.events
            if isinstance(event, h2.events.StreamReset)
        }

    def goaway(self) -> Any:
        found = [event for event in self.events if isinstance(event, h2.events.ConnectionTerminated)]
        return found[-1] if found else None

    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self, reason: Failure) -> None:
        self.lost = True
        self.connection.connectionLost(reason)


class SendBuffer(StringTransport):
    """
    A transport whose buffer pauses its producer once it holds more than
    C{bufferSize} bytes, as Twisted's own transports do (the bytes written
    stay; C{FileDescriptor.write}).
    """

    def __init__(self, bufferSize: int) -> None:
        super().__init__()
        self.bufferSize = bufferSize
        self.paused = False
        self.most = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        size = len(self.io.getvalue())
        self.most = max(self.most, size)
        if size > self.bufferSize and self.producer is not None and not self.paused:
            self.paused = True
            self.producer.pauseProducing()
