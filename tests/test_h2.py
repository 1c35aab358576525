"""
Tests for L{edgeproxy.http.h2}: bytes from the C{h2} library's client into an
edgeproxy listener connection that switched to HTTP/2, in memory; assertions
on what the client library reads back (responses, resets, GOAWAY), on what
reached the route's stage, and on the body sources paused.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from edgeproxy.cache.bodies import StoredBody
from edgeproxy.config.model import HTTP2Settings, Limits, ProxySettings, Route, Server
from edgeproxy.h1 import Fields
from edgeproxy.http.h2 import connection as h2connection
from edgeproxy.pipeline.forward import Forward
from edgeproxy.pipeline.values import Response
from tests.h2util import ROUTE, UPSTREAM, Body, Pair, SendBuffer, request, textResponse

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR = 0x0, 0x1, 0x2
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 0x6, 0x7, 0x8, 0xB


def headersFrame(pair: Pair, stream: int, headers: list[tuple[bytes, bytes]], end: bool = True) -> bytes:
    """A HEADERS frame, encoded with the client's HPACK state."""
    frame = HeadersFrame(stream, flags=["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"])
    frame.data = pair.client.encoder.encode(headers)
    return frame.serialize()


def answering(pair: Pair, body: bytes = b"hello", fields: list[tuple[bytes, bytes]] | None = None) -> None:
    pair.stage.answer = lambda call: call.respond(textResponse(200, body, fields))


@pytest.fixture(params=["openStream", "library"])
def readPath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """
    Both ways a read of requests alone is taken: streams opened by
    L{edgeproxy._compat.h2.openStream}, or frames parsed by the library
    (another release of it).
    """
    if request.param == "library":
        monkeypatch.setattr(h2connection, "OPEN_STREAMS", False)
    return str(request.param)


# Requests and responses ---------------------------------------------------------


def test_requestReachesTheStagesAsHTTP1Would(readPath: str) -> None:
    """
    The stage sees the same request value an HTTP/1.1 request would give:
    method, normalised path and query, version C{HTTP/2}, C{:authority} as
    the C{host} field (first), cookie crumbs joined (RFC 9113 8.2.3).
    """
    pair = Pair()
    answering(pair)
    stream = pair.get(
        request(b"/a/./b?q=1", extra=[(b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")])
    )
    [seen] = pair.stage.requests
    assert (seen.method, seen.path, seen.query, seen.version) == (b"GET", b"/a/b", b"?q=1", b"HTTP/2")
    assert seen.host == b"example.com"
    assert list(seen.fields.pairs()) == [
        (b"host", b"example.com"),
        (b"accept", b"*/*"),
        (b"cookie", b"a=1; b=2"),
    ]
    assert seen.length == 0
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"200" and body == b"hello" and ended


def test_responseHeaders() -> None:
    """
    The response head has C{:status}, the response's fields without the
    connection-specific ones, C{content-length} from its length, and a
    C{date} when it had none.
    """
    pair = Pair()
    answering(
        pair,
        b"x" * 10,
        [(b"content-type", b"text/plain"), (b"connection", b"close"), (b"keep-alive", b"5"), (b"x-a", b"1")],
    )
    stream = pair.get(request())
    headers, body, ended = pair.response(stream)
    assert b"connection" not in headers and b"keep-alive" not in headers
    assert headers[b"x-a"] == b"1" and headers[b"content-length"] == b"10"
    assert headers[b"date"].endswith(b" GMT")
    assert body == b"x" * 10 and ended


_FIELD_LINES = st.lists(
    st.tuples(
        st.sampled_from([b"Content-Type", b"content-type", b"X-A", b"Date", b"Connection", b"Set-Cookie", b"TE"]),
        st.sampled_from([b"1", b"text/plain", b"a b", b"Fri, 27 Nov 2026 22:00:00 GMT"]),
        st.sampled_from([b": ", b":", b":  "]),
    ),
    max_size=8,
)


@given(_FIELD_LINES, st.sampled_from([None, 0, 10]), st.sampled_from([200, 204, 304, 404]))
def test_responseHeadersFromLinesAsFromTheDictionary(
    lines: list[tuple[bytes, bytes, bytes]], length: int | None, status: int
) -> None:
    """
    The header list of fields read from a backend's lines (each line's
    pair, in the order the lines came) holds the pairs the fields'
    dictionary gives, those of one name in the same order.
    """
    from edgeproxy.h1.fields import noteLine, splitLine
    from edgeproxy.http.h2.stream import responseHeaders

    wire = [name + colon + value for name, value, colon in lines]
    for line in wire[::2]:
        # A parser notes some lines; the others are split when read.
        noteLine(line, *splitLine(line))
    fromLines = responseHeaders(status, Fields.fromLines(wire), length)
    fromDictionary = responseHeaders(status, Fields.trusted(Fields.fromLines(wire).copyRaw()), length)

    def byName(headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            if name != b"date" or value.startswith(b"Fri"):
                grouped.setdefault(name, []).append(value)
        return grouped

    assert fromLines[0] == fromDictionary[0] == (b":status", b"%d" % status)
    assert byName(fromLines) == byName(fromDictionary)
    assert len(fromLines) == len(fromDictionary)
    assert not {b"connection", b"te"} & {name for name, _ in fromLines}


def test_requestReadsAnsweredAlikeOnBothPaths(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The same client bytes, with reads of requests alone (opened without
    the library's frame parsing) and mixed reads, give the same bytes back
    as when the library parses every frame: answers, a malformed request's
    reset, a refusal over the limit, and a request with a body.
    """
    opened: list[int] = []
    original = h2connection.openStream

    def spy(connection: Any, streamId: int, block: bytes, endStream: bool) -> Any:
        opened.append(streamId)
        return original(connection, streamId, block, endStream)

    monkeypatch.setattr(h2connection, "openStream", spy)
    fields = [(b"content-type", b"text/plain"), (b"date", b"Fri, 27 Nov 2026 22:00:00 GMT")]
    # (No request IDs: random ones would make the two answers differ.)
    pairs = [
        Pair(settings=HTTP2Settings(max_concurrent_streams=4), proxy=ProxySettings(request_id=None))
        for _ in range(2)
    ]
    for pair in pairs:
        pair.stage.answer = lambda call: (
            None if call.request.path == b"/held" else call.respond(textResponse(200, call.request.path, fields))
        )
    reads = [
        b"".join(headersFrame(pairs[0], stream, request(b"/%d" % stream)) for stream in (1, 3, 5)),
        headersFrame(pairs[0], 7, request(extra=[(b"connection", b"close")]))
        + headersFrame(pairs[0], 9, request(b"/held")),
        headersFrame(pairs[0], 11, request(b"/up", b"POST"), end=False)
        + _frame("DATA", 11, 1, b"body")
        + PingFrame(0, opaque_data=b"12345678").serialize(),
        b"".join(headersFrame(pairs[0], stream, request(b"/held")) for stream in (13, 15, 17, 19, 21)),
    ]
    for index, pair in enumerate(pairs):
        if index == 1:
            monkeypatch.setattr(h2connection, "OPEN_STREAMS", False)
        for data in reads:
            pair.send(data)
    assert opened == [1, 3, 5, 7, 9, 13, 15, 17, 19, 21]
    assert pairs[0].transport.value() == pairs[1].transport.value()
    assert [r.path for r in pairs[0].stage.requests] == [r.path for r in pairs[1].stage.requests]


def test_closedStreamsForgotten(readPath: str) -> None:
    """
    What the library keeps of closed streams stays bounded while requests
    keep coming on a busy connection, and is gone once none is in flight.
    """
    pair = Pair()
    held = []
    pair.stage.answer = lambda call: held.append(call) if call.request.path == b"/held" else call.respond(
        textResponse(200, b"ok")
    )
    pair.get(request(b"/held"))
    library = pair.server._h2
    # Raw frames from here (the client library is left behind).
    for first in range(3, 603, 6):
        pair.send(b"".join(headersFrame(pair, stream, request()) for stream in (first, first + 2, first + 4)))
        assert len(library.streams) <= 1 + 32 + 3
    assert len(pair.frames()) > 0
    held[0].respond(textResponse(200, b"done"))
    assert library.streams == {}


def _lateTrailersOnAResetStream(readPath: str, between: int) -> tuple[list[Any], Pair]:
    """
    Stream 1 reset by the client while its body is pending, then
    C{between} requests answered (three per read), then a HEADERS frame
    (trailers) on stream 1, as a client sends when it crossed the reset;
    the frames the server wrote after it.
    """
    pair = Pair()
    answering(pair, b"ok")
    pair.send(headersFrame(pair, 1, request(b"/upload", b"POST"), end=False))
    pair.sendFrame(RstStreamFrame(1, error_code=CANCEL))
    for first in range(3, 3 + 2 * between, 6):
        streams = [s for s in (first, first + 2, first + 4) if s < 3 + 2 * between]
        pair.send(b"".join(headersFrame(pair, stream, request()) for stream in streams))
    assert [f for f in pair.frames() if isinstance(f, GoAwayFrame)] == []
    trailers = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM"])
    # Never indexed: the client's table stays as the server's.
    trailers.data = pair.client.encoder.encode([hpack.NeverIndexedHeaderTuple(b"x-checksum", b"1")])
    pair.sendFrame(trailers)
    return pair.frames(), pair


def test_lateFramesOnARecentlyResetStreamResetOnlyIt(readPath: str) -> None:
    """
    RFC 9113 5.1: a frame that crossed a reset is a stream error
    (RST_STREAM STREAM_CLOSED), and the connection goes on.
    """
    frames, pair = _lateTrailersOnAResetStream(readPath, 300)
    assert [(type(f), f.stream_id, f.error_code) for f in frames] == [(RstStreamFrame, 1, 0x5)]
    pair.send(headersFrame(pair, 3 + 2 * 300, request()))
    assert [f.headers[b":status"] for f in pair.frames() if isinstance(f, HeadersFrame)] == [b"200"]


def test_closedStreamsRememberedAreBounded(readPath: str) -> None:
    """
    How streams closed is kept for the last few times the concurrent
    streams allowed (100: at least 400 of them), not for 65,536 per
    connection as the library keeps it: a frame on a stream closed that
    long ago ends the connection as one on a stream never opened
    (PROTOCOL_ERROR), which RFC 9113 5.1 allows.
    """
    frames, pair = _lateTrailersOnAResetStream(readPath, 900)
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert [f.error_code for f in goaways] == [PROTOCOL_ERROR]
    assert pair.closed()


def test_wholeResponseInOneWrite() -> None:
    """
    A response whose body came with it goes out as HEADERS and one DATA
    frame carrying END_STREAM, in one write.
    """
    pair = Pair()
    answering(pair, b"abc")
    writes: list[bytes] = []
    original = pair.transport.write
    pair.transport.write = lambda data: (writes.append(data), original(data))  # type: ignore[method-assign]
    stream = pair.get(request())
    assert len(writes) == 1
    kinds = [type(event) for event in pair.events if getattr(event, "stream_id", None) == stream]
    assert kinds == [h2.events.ResponseReceived, h2.events.DataReceived, h2.events.StreamEnded]


def test_postBodyReachesTheStage() -> None:
    pair = Pair()
    pair.stage.read = True
    stream = pair.get(request(b"/up", b"POST", [(b"content-length", b"5")]), b"hello")
    assert pair.stage.requests[0].length == 5
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"200" and body == b"hello" and ended


def test_bodyWithoutLength() -> None:
    """No content-length and no END_STREAM: a body of unknown length."""
    pair = Pair()
    pair.stage.read = True
    stream = pair.get(request(b"/up", b"POST"), b"some body")
    assert pair.stage.requests[0].length is None
    assert pair.response(stream)[1] == b"some body"


def test_headAndNoBodyStatuses() -> None:
    """HEAD, 204 and 304 end with their head, no DATA."""
    pair = Pair()
    pair.stage.answer = lambda call: call.respond(
        textResponse(304 if call.request.path == b"/304" else 200, b"body")
    )
    head = pair.get(request(b"/", b"HEAD"))
    notModified = pair.get(request(b"/304"))
    for stream in (head, notModified):
        headers, body, ended = pair.response(stream)
        assert body == b"" and ended
        assert headers[b"content-length"] == b"4"


def test_interimResponses() -> None:
    """
    103 (and 100 to a client that asked) are passed on as HEADERS without
    END_STREAM (RFC 9113 8.1); 101 and an unasked 100 are not.
    """
    pair = Pair()
    stream = pair.get(request(b"/", extra=[(b"expect", b"100-continue")]))
    other = pair.get(request(b"/other"))
    first, second = pair.stage.held
    hints = Fields([(b"link", b"</a.css>; rel=preload")])
    for call in (first, second):
        call.interim(103, b"Early Hints", hints)
        call.interim(101, b"Switching Protocols", Fields())
        call.interim(100, b"Continue", Fields())
        call.respond(textResponse(200, b"ok"))
    pair.pump()
    informational = [
        (event.stream_id, dict(event.headers)[b":status"])
        for event in pair.events
        if isinstance(event, h2.events.InformationalResponseReceived)
    ]
    assert informational == [(stream, b"103"), (stream, b"100"), (other, b"103")]
    assert pair.response(stream)[1] == b"ok" and pair.response(other)[1] == b"ok"


def test_errorPages() -> None:
    """A request refused from its head gets the same error page as over HTTP/1.1."""
    pair = Pair(routes=(Route(name="all", hosts=("example.com",), paths=("/",), upstream="app"),))
    stream = pair.get(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"other.test"), (b":path", b"/")]
    )
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"404" and body == b"404 Not Found\n" and ended
    assert not pair.stage.requests


def test_accessLogAndMetricsThroughTheFactory() -> None:
    pair = Pair()
    answering(pair, b"12345")
    pair.get(request(b"/logged"))
    [call] = pair.factory.accessLog.calls
    assert call.request.version == b"HTTP/2" and call.status == 200 and call.sent == 5
    assert not pair.factory.inflight


def test_refusedHeadsAreLoggedAndCountedAsAnyRequest(readPath: str) -> None:
    """
    A stream refused from its fields (431 over the field count, 400 for a
    scheme HTTP/1.1 cannot carry) is one access-log line and one request
    in C{edgeproxy_requests}, as over HTTP/1.1; its answer carries the
    line's request ID and is not to be stored.
    """
    from edgeproxy.accesslog import AccessLog, formatCombined
    from edgeproxy.metrics import Metrics
    from tests.metricsutil import samplesOf

    pair = Pair(limits=Limits(max_headers=10))
    events: list[dict[str, Any]] = []
    pair.factory.accessLog = AccessLog(pair.clock)
    pair.factory.accessLog.publisher.addObserver(events.append)
    pair.factory.metrics = Metrics()
    many = pair.get(request(b"/many", extra=[(b"x-%d" % n, b"v") for n in range(20)]))
    scheme = pair.get([(b":method", b"GET"), (b":scheme", b"ftp"), (b":authority", b"example.com"), (b":path", b"/s")])
    assert not pair.stage.requests
    lines = [formatCombined(event) for event in events]
    assert len(lines) == 2
    for stream, status, line in zip((many, scheme), (b"431", b"400"), lines):
        headers, body, ended = pair.response(stream)
        assert headers[b":status"] == status and ended
        assert headers[b"cache-control"] == b"no-store"
        requestId = headers[b"x-request-id"].decode()
        assert f" request_id={requestId} route=- upstream=- backend=- " in line
    assert '"GET /many HTTP/2" 431 ' in lines[0] and '"GET /s HTTP/2" 400 ' in lines[1]
    samples = samplesOf(pair.factory.metrics.exposition())
    assert samples[("edgeproxy_requests_total", (("code", "4xx"), ("route", ""), ("upstream", "")))] == 2



def test_requestIdIsNeverIndexed() -> None:
    """
    The request ID, new in every response, is a literal never indexed (RFC
    7541 6.2.3): it leaves the client's table to the fields that repeat.
    """
    pair = Pair()
    answering(pair, b"12345")
    streams = [pair.get(request(b"/a")) for _ in range(3)]
    heads = {
        event.stream_id: event.headers
        for event in pair.events
        if isinstance(event, h2.events.ResponseReceived)
    }
    ids = set()
    for stream in streams:
        [field] = [field for field in heads[stream] if field[0] == b"x-request-id"]
        assert isinstance(field, hpack.NeverIndexedHeaderTuple)
        ids.add(field[1])
    assert len(ids) == 3
    entries = pair.client.decoder.header_table.dynamic_entries
    assert all(name != b"x-request-id" for name, _ in entries)

def test_manyStreamsInterleaved(readPath: str) -> None:
    pair = Pair()
    streams = [pair.get(request(b"/%d" % n)) for n in range(5)]
    calls = pair.stage.held
    for call in reversed(calls):
        call.respond(textResponse(200, call.request.path))
    pair.pump()
    for n, stream in enumerate(streams):
        assert pair.response(stream)[1] == b"/%d" % n


# Backpressure ---------------------------------------------------------------------


def streaming(pair: Pair) -> tuple[int, Body]:
    body = Body()
    pair.stage.answer = lambda call: call.respond(
        Response(200, b"OK", Fields([(b"content-type", b"application/octet-stream")]), None, body)
    )
    stream = pair.get(request(b"/big"))
    return stream, body


def test_flowControlPausesTheBackend() -> None:
    """
    A client that does not open its window: what the proxy holds for the
    stream stays within C{h2_stream_buffer} plus a write, and the body's
    source is paused; opening the window drains it and resumes the source.
    """
    pair = Pair(settings=HTTP2Settings(stream_buffer=32 * 1024, connection_buffer=1024 * 1024))
    pair.autoAck = False
    stream, body = streaming(pair)
    chunk = b"x" * 8192
    while not body.paused:
        body.write(chunk)
        assert pair.server.held <= 32 * 1024 + len(chunk)
    pair.pump()
    received = len(pair.response(stream)[1])
    assert received == 65535  # the default window, no more
    assert pair.server.held > 16 * 1024
    pair.client.acknowledge_received_data(received, stream)
    pair.client.increment_flow_control_window(1 << 20)
    pair.client.increment_flow_control_window(1 << 20, stream)
    pair.pump()
    assert not body.paused and pair.server.held == 0
    body.finish()
    pair.pump()
    assert pair.response(stream)[2]


def test_socketBackpressurePausesTheBackend() -> None:
    """
    A client that stops reading its socket with its windows wide open: the
    transport pauses the connection, DATA frames wait, and the body's
    source is paused at the bound; the transport resuming drains them.
    """
    pair = Pair(
        settings=HTTP2Settings(stream_buffer=64 * 1024, connection_buffer=1024 * 1024),
        clientSettings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1},
    )
    pair.client.increment_flow_control_window(2**31 - 1 - 65535)
    pair.pump()
    stream, body = streaming(pair)
    pair.server.pauseProducing()  # what a full send buffer does
    written = len(pair.transport.value())
    for _ in range(100):
        if body.paused:
            break
        body.write(b"y" * 16384)
    assert body.paused
    assert len(pair.transport.value()) == written
    total = pair.server.held
    assert 64 * 1024 < total <= 64 * 1024 + 16384
    pair.server.resumeProducing()
    assert not body.paused and pair.server.held == 0
    body.finish()
    pair.pump()
    headers, data, ended = pair.response(stream)
    assert len(data) == total and ended


def test_connectionBoundPausesEveryStream() -> None:
    """
    Streams each under their own bound but together over the connection's
    are all paused, and resumed once half of it is gone.
    """
    pair = Pair(settings=HTTP2Settings(stream_buffer=64 * 1024, connection_buffer=96 * 1024))
    pair.autoAck = False
    bodies = []
    for n in range(3):
        body = Body()
        bodies.append(body)
    answers = iter(bodies)
    pair.stage.answer = lambda call: call.respond(
        Response(200, b"OK", Fields(), None, next(answers))
    )
    streams = [pair.get(request(b"/%d" % n)) for n in range(3)]
    pair.server.pauseProducing()
    for body in bodies:
        body.write(b"z" * (40 * 1024))
    assert all(body.paused for body in bodies)
    assert pair.server.held == 120 * 1024
    pair.server.resumeProducing()
    # The client's connection window (65,535) lets some through.
    assert 0 < pair.server.held < 120 * 1024
    pair.autoAck = True
    for event in pair.pump():
        if isinstance(event, h2.events.DataReceived):
            pair.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    pair.pump()
    assert pair.server.held == 0
    assert not any(body.paused for body in bodies)
    for stream in streams:
        assert len(pair.response(stream)[1]) == 40 * 1024


def _wideOpen(
    settings: HTTP2Settings | None = None, limits: Limits | None = None, transport: Any = None
) -> Pair:
    """A pair whose client opened its windows as wide as they go."""
    pair = Pair(
        settings=settings,
        limits=limits,
        clientSettings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1},
        transport=transport,
    )
    pair.client.increment_flow_control_window(2**31 - 1 - 65535)
    pair.pump()
    return pair


def test_wholeResponsesWaitWhileTheConnectionIsOverItsBound(readPath: str) -> None:
    """
    A client that stops reading with its windows open, and 20 streams each
    answered at once with a whole 4 MiB body of their own: each stream
    holds a stream's bound of its body (the rest stays the response's, by
    reference), and what the connection holds stays within
    C{h2_connection_buffer} and one stream's bound (the responses after
    that wait, unstarted, in order, until half of it is written) instead of
    growing by each of them.  Once the client reads, every response arrives
    whole.
    """
    pair = _wideOpen()
    body = b"w" * (4 << 20)
    answering(pair, body)
    pair.server.pauseProducing()  # what a full send buffer does
    streams = []
    for n in range(20):
        stream = pair.client.get_next_available_stream_id()
        pair.client.send_headers(stream, request(b"/%d" % n), end_stream=True)
        streams.append(stream)
        pair.pump()
        assert pair.server.held <= (1 << 20) + 64 * 1024
    assert len(pair.stage.requests) == 20
    pair.server.resumeProducing()
    pair.pump()
    for stream in streams:
        headers, data, ended = pair.response(stream)
        assert headers[b":status"] == b"200" and len(data) == len(body) and ended
    assert pair.server.held == 0 and not pair.factory.inflight


def _storedBodyPair(big: bytes, settings: HTTP2Settings | None = None) -> Pair:
    """
    A pair whose stage answers C{/video} with C{big} as the cache's memory
    tier does (L{StoredBody}), anything else with its path; the client
    opens the connection's window wide and acknowledges nothing itself (a
    browser whose paused video keeps that stream's window shut).
    """
    pair = Pair(settings=settings)
    pair.autoAck = False
    pair.client.increment_flow_control_window(2**30)
    pair.pump()
    pair.stage.answer = lambda call: call.respond(
        Response(200, b"OK", Fields(), len(big), StoredBody(big))
        if call.request.path == b"/video"
        else textResponse(200, call.request.path)
    )
    return pair


@pytest.mark.parametrize("own", [False, True], ids=["stored", "own"])
def test_aWholeBodyOnAShutWindowDoesNotHoldBackTheOthers(readPath: str, own: bool) -> None:
    """
    A 4 MiB body held whole, from the cache or the response's own (a
    converted image, an error page, a small backend response read whole),
    on a stream whose client keeps its window shut: the stream holds at
    most C{h2_stream_buffer} of it for the client (the rest by reference),
    so the responses asked for after it on the same connection are written
    at once instead of waiting for it; once the client opens that window,
    the body arrives whole.
    """
    big = bytes(range(256)) * (4 << 12)
    pair = _storedBodyPair(big)
    if own:
        pair.stage.answer = lambda call: call.respond(
            textResponse(200, big if call.request.path == b"/video" else call.request.path)
        )
    video = pair.get(request(b"/video"))
    headers, data, ended = pair.response(video)
    assert headers[b":status"] == b"200" and len(data) == 65535 and not ended
    others = [pair.get(request(b"/%d" % n)) for n in range(3)]
    for n, stream in enumerate(others):
        assert pair.response(stream)[1:] == (b"/%d" % n, True)
    assert pair.server.held <= 64 * 1024
    pair.client.increment_flow_control_window(len(big), stream_id=video)
    pair.pump()
    assert pair.response(video)[1:] == (big, True)
    assert pair.server.held == 0 and not pair.factory.inflight
    [line] = [c for c in pair.factory.accessLog.calls if c.request.path == b"/video"]
    assert line.sent == len(big)


def test_aStoredBodyOnAShutWindowEndsAtTheIdleTimeout() -> None:
    """
    The stream of a stored body whose window stays shut is reset
    (C{CANCEL}) after its upstream's idle timeout, as a streamed body's is,
    and lets go of the cache's bytes.
    """
    big = b"v" * (1 << 20)
    pair = _storedBodyPair(big)
    video = pair.get(request(b"/video"))
    assert pair.server._streams[video].rest is not None
    pair.clock.advance(29)
    pair.pump()
    assert not pair.resets()
    pair.clock.advance(2)
    pair.pump()
    assert pair.resets() == {video: CANCEL}
    assert pair.server.held == 0 and not pair.factory.inflight and not pair.server._streams


def test_aWholeBodyTheClientDoesNotReadEndsAtTheIdleTimeout() -> None:
    """
    A client that stops reading the connection: a small whole response
    (an error page, a redirect) it does not take is given up after the
    upstream's idle timeout, as a streamed body is, and the connection goes
    idle, so that its own idle timeout can end it.
    """
    pair = Pair()
    answering(pair, b"hello")
    pair.server.pauseProducing()  # what a full send buffer does
    stream = pair.get(request(b"/"))
    assert pair.server.held == len(b"hello") and pair.factory.inflight
    pair.clock.advance(29)
    assert pair.server.held and pair.factory.inflight
    pair.clock.advance(2)
    assert pair.server.held == 0 and not pair.factory.inflight
    pair.server.resumeProducing()
    pair.pump()
    assert pair.resets() == {stream: CANCEL}


def test_resetsReleaseWhatTheConnectionWaitsFor() -> None:
    """
    The stream holding the connection past its bound (a stream's bound of
    a whole 4 MiB body, over a smaller connection bound) is reset by the
    client: what it held is dropped and the responses that waited start;
    a waiting stream reset by the client is never started.
    """
    pair = _wideOpen(settings=HTTP2Settings(stream_buffer=64 * 1024, connection_buffer=32 * 1024))
    big = b"w" * (4 << 20)
    pair.stage.answer = lambda call: call.respond(
        textResponse(200, big if call.request.path == b"/big" else call.request.path)
    )
    pair.server.pauseProducing()
    first = pair.get(request(b"/big"))
    waiting = pair.get(request(b"/waiting"))
    gone = pair.get(request(b"/gone"))
    assert pair.server.held == 64 * 1024
    assert pair.response(waiting)[0] == {} and pair.response(gone)[0] == {}
    pair.client.reset_stream(gone, CANCEL)
    pair.pump()
    assert len(pair.factory.accessLog.calls) == 1
    pair.client.reset_stream(first, CANCEL)
    pair.pump()
    assert pair.server.held == len(b"/waiting")
    pair.server.resumeProducing()
    pair.pump()
    assert pair.response(waiting)[1:] == (b"/waiting", True)
    assert pair.response(gone)[0] == {}
    assert pair.server.held == 0 and not pair.factory.inflight


def test_theTransportIsGivenABoundAtATime(readPath: str) -> None:
    """
    Whole 4 MiB responses, windows open, a client that does not read: the
    bytes go to the transport a connection's bound at a time, so that its
    buffer filling up pauses the writing; it never holds much more than its
    own size and that bound.
    """
    transport = SendBuffer(64 * 1024)
    pair = _wideOpen(transport=transport)
    transport.clear()
    body = b"w" * (4 << 20)
    answering(pair, body)
    for stream in range(1, 40, 2):
        pair.client.send_headers(stream, request(b"/%d" % stream), end_stream=True)
        pair.send(pair.client.data_to_send())
        assert transport.most <= 64 * 1024 + (1 << 20) + 16384 + 1024
        assert pair.server.held <= (1 << 20) + 64 * 1024
    assert len(pair.stage.requests) == 20
    # The client reads it all.
    transport.bufferSize = 1 << 40
    transport.paused = False
    pair.server.resumeProducing()
    pair.pump()
    received = {event.stream_id: 0 for event in pair.events if isinstance(event, h2.events.DataReceived)}
    for event in pair.events:
        if isinstance(event, h2.events.DataReceived):
            received[event.stream_id] += len(event.data)
    assert received == {stream: len(body) for stream in range(1, 40, 2)}


def test_errorPagesWaitWhileTheConnectionIsOverItsBound() -> None:
    """
    Requests refused from their head (431) while the connection holds more
    than its bound: their pages wait too, and go once the client reads.
    """
    pair = _wideOpen(
        settings=HTTP2Settings(stream_buffer=64 * 1024, connection_buffer=32 * 1024), limits=Limits(max_headers=10)
    )
    body = b"w" * (2 << 20)
    answering(pair, body)
    pair.server.pauseProducing()
    big = pair.get(request(b"/big"))
    held = pair.server.held
    assert held > 32 * 1024
    refused = [pair.get(request(extra=[(b"x-%d" % n, b"v") for n in range(20)])) for _ in range(50)]
    assert pair.server.held == held
    pair.server.resumeProducing()
    pair.pump()
    assert len(pair.response(big)[1]) == len(body)
    for stream in refused:
        headers, data, ended = pair.response(stream)
        assert headers[b":status"] == b"431" and data and ended
    assert pair.server.held == 0


def test_requestBodyPausedStreamWithholdsWindow() -> None:
    """
    While the backend does not take the request body, the stream's bytes
    are not acknowledged: the client's window closes (RFC 9113 5.2), and
    opens again once the backend takes them.
    """
    unlimited = Route(name="all", hosts=("*",), paths=("/",), upstream="app")
    pair = Pair(settings=HTTP2Settings(initial_window_size=16384), routes=(unlimited,))
    stream = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream, request(b"/up", b"POST", [(b"content-length", b"100000")]))
    pair.pump()
    [call] = pair.stage.held
    pair.client.send_data(stream, b"a" * 16384)
    pair.pump()
    # Nobody reads the body yet: the window stays shut.
    assert pair.client.local_flow_control_window(stream) == 0
    consumer_data: list[bytes] = []

    class Sink:
        def write(self, data: bytes) -> None:
            consumer_data.append(data)

        def registerProducer(self, producer: object, streaming: bool) -> None:
            pass

        def unregisterProducer(self) -> None:
            pass

    call.body.startProducing(Sink())
    pair.pump()
    assert b"".join(consumer_data) == b"a" * 16384
    assert pair.client.local_flow_control_window(stream) > 0


# Limits ----------------------------------------------------------------------------


def test_tooManyFieldsGets431(readPath: str) -> None:
    pair = Pair(limits=Limits(max_headers=10))
    answering(pair)
    stream = pair.get(request(extra=[(b"x-%d" % n, b"v") for n in range(20)]))
    ok = pair.get(request(b"/fine"))
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"431" and ended
    assert pair.response(ok)[0][b":status"] == b"200"
    assert [r.path for r in pair.stage.requests] == [b"/fine"]


def test_tooLargeHeadGets431() -> None:
    pair = Pair(limits=Limits(max_header_size=4096))
    answering(pair)
    stream = pair.get(request(extra=[(b"x-big", b"v" * 5000)]))
    assert pair.response(stream)[0][b":status"] == b"431"
    assert not pair.stage.requests


def test_theIssuesHeadsGet431WithTheDefaults(readPath: str) -> None:
    """
    500 fields, or one 32 KiB field: 431 over HTTP/1.1 with the default
    limits, and now over HTTP/2 as well (they fit the default
    h2_max_header_list_size, so the stream is answered, not the connection
    ended).
    """
    pair = Pair()
    answering(pair)
    many = pair.get(request(extra=[(b"x-%d" % n, b"v") for n in range(500)]))
    big = pair.get(request(extra=[(b"x-big", b"v" * 32 * 1024)]))
    assert pair.response(many)[0][b":status"] == b"431"
    assert pair.response(big)[0][b":status"] == b"431"
    assert not pair.stage.requests and not pair.closed()


def test_headerListOverTheAdvertisedSizeEndsTheConnection(readPath: str) -> None:
    """Over SETTINGS_MAX_HEADER_LIST_SIZE the HPACK state cannot be trusted
    any more: GOAWAY (RFC 9113 10.5.1)."""
    pair = Pair(settings=HTTP2Settings(max_header_list_size=4096))
    pair.send(headersFrame(pair, 1, request(extra=[(b"x-big", b"v" * 8000)])))
    frames = pair.frames()
    assert isinstance(frames[-1], GoAwayFrame) and frames[-1].error_code == ENHANCE_YOUR_CALM
    assert pair.closed() and not pair.stage.requests


def test_declaredBodyOverTheLimitGets413() -> None:
    """The route's limit is 1000 bytes: a larger declared body gets 413,
    then the stream is reset with NO_ERROR (RFC 9113 8.1)."""
    pair = Pair()
    stream = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream, request(b"/up", b"POST", [(b"content-length", b"5000")]))
    pair.pump()
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"413" and ended
    assert pair.resets() == {stream: NO_ERROR}
    assert not pair.stage.requests


def test_streamedBodyOverTheLimitGets413() -> None:
    pair = Pair()
    pair.stage.read = True
    stream = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream, request(b"/up", b"POST"))
    pair.client.send_data(stream, b"b" * 800)
    pair.pump()
    pair.client.send_data(stream, b"b" * 800)
    pair.pump()
    assert pair.response(stream)[0][b":status"] == b"413"
    assert pair.resets() == {stream: NO_ERROR}
    assert pair.factory.accessLog.calls[0].status == 413


def test_requestBodyIdleTimeout() -> None:
    """A body that stops arriving is cut after the route's idle timeout."""
    pair = Pair()
    pair.stage.read = True
    stream = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream, request(b"/up", b"POST"))
    pair.client.send_data(stream, b"b" * 10)
    pair.pump()
    pair.clock.advance(31)
    pair.pump()
    assert pair.resets() == {stream: CANCEL}
    assert len(pair.factory.accessLog.calls) == 1 and not pair.factory.inflight
    assert not pair.closed()


def test_responseBodyIdleTimeout() -> None:
    pair = Pair()
    stream, body = streaming(pair)
    body.write(b"some")
    pair.clock.advance(29)
    body.write(b"more")
    pair.clock.advance(29)
    assert not pair.resets()
    pair.clock.advance(2)
    pair.pump()
    assert pair.resets() == {stream: CANCEL} and body.stopped


def test_frameSizeCheckedAtTheFrameHeader() -> None:
    """
    A frame header announcing 16 MiB gets FRAME_SIZE_ERROR at once, before
    any of its payload (RFC 9113 4.2).
    """
    pair = Pair()
    frame = DataFrame(1)
    header = (2**24 - 1).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")
    pair.send(header)
    assert pair.closed()
    pair.pump()
    assert pair.goaway().error_code == FRAME_SIZE_ERROR
    del frame


def test_streamsOverTheLimitRefused(readPath: str) -> None:
    """
    One stream over C{h2_max_concurrent_streams} is refused with
    REFUSED_STREAM; the others carry on.
    """
    pair = Pair(settings=HTTP2Settings(max_concurrent_streams=2))
    # The client library would refuse to go over: raw frames from here.
    for stream in (1, 3, 5):
        pair.send(headersFrame(pair, stream, request(b"/%d" % stream)))
    frames = pair.frames()
    assert [(type(f), f.stream_id, f.error_code) for f in frames] == [(RstStreamFrame, 5, REFUSED_STREAM)]
    for call in pair.stage.held:
        call.respond(textResponse(200, b"ok"))
    answered = {f.stream_id for f in pair.frames() if isinstance(f, DataFrame) and f.data == b"ok"}
    assert answered == {1, 3}
    assert not pair.closed()


def test_burstOfStreamsInOneRead(readPath: str) -> None:
    """
    Hundreds of new streams in one read: the ones over the limit are
    refused, without the connection failing.
    """

    pair = Pair(settings=HTTP2Settings(max_concurrent_streams=10))
    pair.send(b"".join(headersFrame(pair, stream, request()) for stream in range(1, 200, 2)))
    frames = pair.frames()
    assert len(pair.stage.held) == 10
    refused = [f.stream_id for f in frames if isinstance(f, RstStreamFrame) and f.error_code == REFUSED_STREAM]
    assert refused == list(range(21, 200, 2))
    assert not pair.closed()
    # A client that keeps going over the limit runs out of its budget.
    pair.send(b"".join(headersFrame(pair, stream, request()) for stream in range(201, 2000, 2)))
    frames = pair.frames()
    assert isinstance(frames[-1], GoAwayFrame) and frames[-1].error_code == ENHANCE_YOUR_CALM
    assert pair.closed() and len(pair.stage.held) == 10


# Hostile peers -------------------------------------------------------------------


def test_floodsEndWithEnhanceYourCalm() -> None:
    for make in (
        lambda: DataFrame(1),
        # All padding, no data: as empty as the frame above.
        lambda: DataFrame(1, pad_length=0, flags=["PADDED"]),
        lambda: PriorityFrame(3, depends_on=1),
        lambda: SettingsFrame(0),
        lambda: PingFrame(0, opaque_data=b"12345678"),
    ):
        pair = Pair()
        stream = pair.client.get_next_available_stream_id()
        pair.client.send_headers(stream, request(b"/up", b"POST"))
        pair.pump()
        pair.send(make().serialize() * 2000)
        pair.pump()
        assert pair.goaway() is not None and pair.goaway().error_code == ENHANCE_YOUR_CALM, make()
        assert pair.closed()


def _failuresLogged() -> tuple[list[dict[str, Any]], Any]:
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    return failures, observe


def test_priorityOnManyIdleStreams() -> None:
    """
    PRIORITY frames for 1,500 distinct idle streams in one read (what
    made Twisted's priority tree raise): GOAWAY ENHANCE_YOUR_CALM, no
    failure logged, nothing reaches a stage.
    """
    failures, observe = _failuresLogged()
    try:
        pair = Pair()
        pair.send(
            b"".join(PriorityFrame(stream, depends_on=0).serialize() for stream in range(3, 3003, 2))
        )
        frames = pair.frames()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert isinstance(frames[-1], GoAwayFrame) and frames[-1].error_code == ENHANCE_YOUR_CALM
    assert pair.closed() and not pair.stage.requests
    assert not failures, failures


def test_priorityTrickleOnIdleStreamsKeepsNoState() -> None:
    """
    The same 1,500 idle streams named slowly, within the PRIORITY budget:
    the connection keeps no stream for them (RFC 9113 5.3.2 makes
    priority advisory; it is not acted on) and serves a request after.
    """
    failures, observe = _failuresLogged()
    try:
        pair = Pair()
        answering(pair)
        for first in range(3, 3003, 100):
            pair.send(
                b"".join(
                    PriorityFrame(stream, depends_on=0).serialize() for stream in range(first, first + 100, 2)
                )
            )
            pair.clock.advance(1)
            assert not pair.closed()
        assert len(pair.server._h2.streams) == 0 and not pair.frames()
        pair.send(headersFrame(pair, 3003, request(b"/after")))
        frames = pair.frames()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [f.data for f in frames if isinstance(f, DataFrame)] == [b"hello"]
    assert [r.path for r in pair.stage.requests] == [b"/after"]
    assert not failures, failures


def test_rapidResetNeverReachesTheStage() -> None:
    """
    Streams opened and reset in the same read never reach a stage; resets
    past the budget end the connection with ENHANCE_YOUR_CALM.
    """
    pair = Pair()
    encoder = pair.client.encoder
    data = b""
    for stream in range(1, 100, 2):
        frame = HeadersFrame(stream, flags=["END_HEADERS", "END_STREAM"])
        frame.data = encoder.encode(request())
        data += frame.serialize() + RstStreamFrame(stream, error_code=CANCEL).serialize()
    pair.send(data)
    assert not pair.stage.requests
    assert not pair.closed()
    for start in range(101, 2000, 20):
        data = b""
        for stream in range(start, start + 20, 2):
            frame = HeadersFrame(stream, flags=["END_HEADERS", "END_STREAM"])
            frame.data = encoder.encode(request())
            data += frame.serialize() + RstStreamFrame(stream, error_code=CANCEL).serialize()
        pair.send(data)
        if pair.closed():
            break
    pair.pump()
    assert pair.goaway().error_code == ENHANCE_YOUR_CALM
    assert not pair.stage.requests


def test_continuationFlood() -> None:
    """An endless header block is cut by the library (64 CONTINUATION)."""
    pair = Pair()
    data = HeadersFrame(1, flags=[]).serialize()
    data += ContinuationFrame(1, data=b"").serialize() * 100
    pair.send(data)
    pair.pump()
    assert pair.goaway() is not None and pair.closed()


def test_clientResetEndsTheCall() -> None:
    pair = Pair()
    stream, body = streaming(pair)
    body.write(b"x")
    pair.client.reset_stream(stream, CANCEL)
    pair.pump()
    assert body.stopped
    assert not pair.factory.inflight and not pair.closed()


def test_connectionLostEndsEveryCall() -> None:
    pair = Pair()
    streaming(pair)
    pair.get(request(b"/held"))
    assert len(pair.factory.inflight) == 2
    pair.lose(Failure(ConnectionDone()))
    assert not pair.factory.inflight and len(pair.factory.accessLog.calls) == 2


def test_clientGoAwayCloses() -> None:
    pair = Pair()
    pair.client.close_connection()
    pair.pump()
    assert pair.closed()


def test_clientGoAwayLetsItsStreamsFinish(readPath: str) -> None:
    """
    A client's GOAWAY without error names the last stream the server
    opened (RFC 9113 6.8; none, we push nothing): the client's own streams
    in flight are answered, the frames before it in the same read too;
    the server answers with its own GOAWAY naming the last stream it took,
    refuses later ones, and closes once the others are done.
    """
    pair = Pair()
    pair.stage.read = True
    held = pair.get(request(b"/held"))
    upload = pair.client.get_next_available_stream_id()
    pair.client.send_headers(upload, request(b"/up", b"POST"))
    pair.client.send_data(upload, b"ab")
    pair.pump()
    # Raw frames from here: the client library takes nothing after its GOAWAY.
    pair.send(
        PingFrame(0, opaque_data=b"12345678").serialize()
        + GoAwayFrame(0, last_stream_id=0, error_code=NO_ERROR).serialize()
        + DataFrame(upload, data=b"cd", flags=["END_STREAM"]).serialize()
        + headersFrame(pair, upload + 2, request(b"/late"))
    )
    frames = pair.frames()
    assert isinstance(frames[0], PingFrame) and "ACK" in frames[0].flags
    assert isinstance(frames[1], GoAwayFrame)
    assert (frames[1].last_stream_id, frames[1].error_code) == (upload, NO_ERROR)
    assert [f.data for f in frames if isinstance(f, DataFrame)] == [b"abcd"]
    assert [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)] == [
        (upload + 2, REFUSED_STREAM)
    ]
    assert not pair.closed()
    pair.stage.held[0].respond(textResponse(200, b"done"))
    frames = pair.frames()
    assert [(f.stream_id, f.data) for f in frames if isinstance(f, DataFrame)] == [(held, b"done")]
    assert pair.closed()
    assert [r.path for r in pair.stage.requests] == [b"/held", b"/up"]
    assert [call.status for call in pair.factory.accessLog.calls] == [200, 200]


def test_clientGoAwayWithAnErrorCutsItsStreams() -> None:
    """A GOAWAY with an error code ends the connection and its streams."""
    pair = Pair()
    pair.get(request(b"/held"))
    pair.send(GoAwayFrame(0, last_stream_id=0, error_code=PROTOCOL_ERROR).serialize())
    assert pair.closed()
    pair.stage.held[0].respond(textResponse(200, b"late"))
    assert [f for f in pair.frames() if isinstance(f, DataFrame)] == []
    pair.lose(Failure(ConnectionDone()))
    assert not pair.factory.inflight


# Timers ---------------------------------------------------------------------------


def test_headerDeadlineBeforeThePreface() -> None:
    pair = Pair(preface=False)
    pair.clock.advance(9)
    assert not pair.closed()
    pair.clock.advance(2)
    assert pair.closed()


def test_headerTrickle() -> None:
    """
    A header block trickled byte by byte is cut at the header deadline,
    however steadily the bytes come.
    """
    pair = Pair()
    frame = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM"])
    frame.data = pair.client.encoder.encode(request(extra=[(b"x-pad", b"p" * 200)]))
    data = frame.serialize()
    for index in range(len(data) - 1):
        pair.send(data[index:index + 1])
        pair.clock.advance(0.5)
        if pair.closed():
            break
    assert pair.closed()
    assert 9.5 <= index * 0.5 <= 11
    assert not pair.stage.requests


def test_idleTimeout() -> None:
    """
    With no request in flight the connection closes after the idle
    timeout (GOAWAY NO_ERROR); a request in flight holds it open.
    """
    pair = Pair()
    pair.get(request())
    pair.clock.advance(120)
    assert not pair.closed()
    pair.stage.held[0].respond(textResponse(200))
    pair.pump()
    pair.clock.advance(59)
    assert not pair.closed()
    pair.clock.advance(2)
    pair.pump()
    assert pair.closed() and pair.goaway().error_code == NO_ERROR


# Drain and reload ---------------------------------------------------------------


def test_drainSendsGoAwayWithTheLastStream(readPath: str) -> None:
    pair = Pair()
    first = pair.get(request(b"/1"))
    assert pair.connection.busy()
    pair.connection.closeAfterResponse()
    [goaway] = pair.frames()
    assert (goaway.last_stream_id, goaway.error_code) == (first, NO_ERROR)
    assert not pair.closed()
    # The client library takes nothing after a GOAWAY: raw frames from here.
    pair.send(headersFrame(pair, 3, request(b"/late")))
    assert [(type(f), f.error_code) for f in pair.frames()] == [(RstStreamFrame, REFUSED_STREAM)]
    pair.stage.held[0].respond(textResponse(200, b"done"))
    frames = pair.frames()
    assert [f.data for f in frames if isinstance(f, DataFrame)] == [b"done"]
    assert pair.closed()
    assert [r.path for r in pair.stage.requests] == [b"/1"]


def test_closeIdle() -> None:
    pair = Pair()
    answering(pair)
    pair.get(request())
    assert not pair.connection.busy()
    pair.connection.closeIdle()
    pair.pump()
    assert pair.goaway().error_code == NO_ERROR and pair.closed()


def test_reloadSendsGoAway() -> None:
    pair = Pair()
    pair.get(request(b"/1"))
    pair.factory.reconfigure(pair.factory.listener)
    pair.pump()
    assert pair.goaway() is not None and not pair.closed()


# CONNECT -------------------------------------------------------------------------


def test_connectRefused(readPath: str) -> None:
    pair = Pair()
    stream = pair.get([(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"501"
    assert not pair.stage.requests


def test_extendedConnectAdvertisedOnlyWithWebSocketRoutes() -> None:
    code = h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL
    assert Pair().client.remote_settings.get(code) == 1
    closed = Route(name="all", hosts=("*",), paths=("/",), upstream="app", websocket=False)
    assert Pair(routes=(closed,)).client.remote_settings.get(code, 0) == 0


def test_extendedConnectWithoutTheSettingIsMalformed(readPath: str) -> None:
    closed = Route(name="all", hosts=("*",), paths=("/",), upstream="app", websocket=False)
    pair = Pair(routes=(closed,))
    stream = pair.get(request(b"/chat", b"CONNECT", [(b":protocol", b"websocket")]))
    assert pair.resets() == {stream: PROTOCOL_ERROR}


def test_extendedConnectOnARouteWithoutWebSockets() -> None:
    closed = Route(name="closed", hosts=("closed.test",), paths=("/",), upstream="app", websocket=False)
    pair = Pair(routes=(ROUTE, closed))
    headers = [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"https"),
        (b":authority", b"closed.test"),
        (b":path", b"/chat"),
    ]
    stream = pair.get(headers)
    assert pair.response(stream)[0][b":status"] == b"501"
    assert not pair.stage.requests


# Any frames at all -----------------------------------------------------------------


def _frame(kind: str, stream: int, flags: int, payload: bytes) -> bytes:
    types = {"DATA": 0, "HEADERS": 1, "PRIORITY": 2, "RST_STREAM": 3, "SETTINGS": 4,
             "PUSH_PROMISE": 5, "PING": 6, "GOAWAY": 7, "WINDOW_UPDATE": 8, "CONTINUATION": 9,
             "UNKNOWN": 0x42}
    return (
        len(payload).to_bytes(3, "big") + bytes([types[kind], flags]) + stream.to_bytes(4, "big") + payload
    )


frameStrategy = st.one_of(
    st.builds(
        _frame,
        st.sampled_from(["DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE",
                         "PING", "GOAWAY", "WINDOW_UPDATE", "CONTINUATION", "UNKNOWN"]),
        st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]),
        st.integers(min_value=0, max_value=255),
        st.binary(max_size=40),
    ),
    st.sampled_from(["request", "post", "bad", "reset", "window"]),
    st.binary(min_size=1, max_size=30),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(frameStrategy, max_size=25), st.integers(min_value=1, max_value=64))
def test_anyFrameSequenceEndsCleanly(frames: list[Any], chunk: int) -> None:
    """
    Whatever a client sends, the connection answers, resets streams or
    ends with GOAWAY: never an unhandled exception, never a failure logged,
    and every call ends with the connection.
    """
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        pair = Pair()
        pair.stage.answer = lambda call: (
            call.respond(textResponse(200, b"ok")) if call.request.path == b"/ok" else None
        )
        data = b""
        stream = 1
        for frame in frames:
            if frame == "request":
                data += headersFrame(pair, stream, request(b"/ok"))
                stream += 2
            elif frame == "post":
                data += headersFrame(pair, stream, request(b"/held", b"POST"), end=False)
                data += _frame("DATA", stream, 0, b"body")
                stream += 2
            elif frame == "bad":
                data += headersFrame(pair, stream, request(extra=[(b"connection", b"close")]))
                stream += 2
            elif frame == "reset":
                data += _frame("RST_STREAM", max(1, stream - 2), 0, b"\x00\x00\x00\x08")
            elif frame == "window":
                data += _frame("WINDOW_UPDATE", 0, 0, b"\x00\x01\x00\x00")
            else:
                data += frame
        for start in range(0, len(data), chunk):
            pair.send(data[start:start + chunk])
        pair.frames()
        for call in list(pair.stage.held):
            call.respond(textResponse(200, b"late"))
        pair.clock.advance(100)
        pair.lose(Failure(ConnectionDone()))
        assert not pair.factory.inflight
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, failures


def _badConnections(count: int, payload: Any) -> tuple[list[str], list[str]]:
    """
    C{count} client connections, each sending its preface and then what
    C{payload(client)} gives, each cut by the proxy; what the process log
    got at C{info} and above, and at C{debug}, once the interval is over.
    """
    from twisted.internet.address import IPv4Address
    from twisted.logger import LogLevel, formatEvent

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        pair = Pair()
        for port in range(count):
            transport = StringTransport()
            transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
            connection = pair.factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", port))
            connection.makeConnection(transport)
            client = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding=None)
            )
            client.initiate_connection()
            preface = client.data_to_send()
            connection.dataReceived(preface + payload(client))
            assert transport.disconnecting
        pair.clock.advance(10)
    finally:
        globalLogPublisher.removeObserver(events.append)
    shown = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.info]
    debug = [formatEvent(e) for e in events if e["log_level"] == LogLevel.debug]
    return shown, debug


def test_clientErrorsAreCountedNotLoggedEach(readPath: str) -> None:
    """
    Connections a client ends with a protocol error (here a HEADERS frame
    on a stream it may not open) are C{debug} lines; the process log gets
    one count per interval, by the error code's name.
    """

    def bad(client: Any) -> bytes:
        frame = HeadersFrame(2, flags=["END_HEADERS", "END_STREAM"])
        frame.data = client.encoder.encode(request())
        return frame.serialize()

    shown, debug = _badConnections(300, bad)
    assert shown == ["repeated in the last 10s: HTTP/2 client error PROTOCOL_ERROR x 300"]
    assert debug.count("HTTP/2 client error PROTOCOL_ERROR: Invalid stream ID for peer.") == 300


def test_floodsAreCountedNotLoggedEach() -> None:
    """
    Connections cut for a flood (here of PING frames) are C{debug} lines
    too, counted per interval by the GOAWAY's code: a client opening many
    of them does not write to the process log for each.
    """
    from hyperframe.frame import PingFrame

    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    shown, debug = _badConnections(50, lambda client: ping * 5000)
    assert shown == ["repeated in the last 10s: HTTP/2 client refused ENHANCE_YOUR_CALM x 50"], shown
    assert debug.count("HTTP/2 client refused: PING flood") == 50


# WebSockets over HTTP/2 (RFC 8441) ----------------------------------------------


class _Endpoint:
    def __init__(self) -> None:
        self.transports: list[StringTransport] = []
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


class _Pool:
    def __init__(self) -> None:
        self.upstream = UPSTREAM
        self.endpoint = _Endpoint()
        self.clock = None

    def pickServer(self, hashKey: bytes | None) -> Server:
        return UPSTREAM.servers[0]

    def endpointFor(self, server: Server) -> _Endpoint:
        return self.endpoint


def _accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


def websocketPair() -> tuple[Pair, _Pool, int]:
    pair = Pair()
    pool = _Pool()
    forward = Forward(ROUTE, pool, ProxySettings())
    pair.stage.answer = forward.handle
    stream = pair.client.get_next_available_stream_id()
    pair.client.send_headers(
        stream,
        [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
         (b":authority", b"example.com"), (b":path", b"/chat"), (b"sec-websocket-version", b"13")],
    )
    pair.client.send_data(stream, b"early")
    pair.pump()
    return pair, pool, stream


def test_webSocketOverHTTP2() -> None:
    """
    An extended CONNECT for websocket reaches the backend as an HTTP/1.1
    Upgrade with a key of the proxy's; the backend's 101 becomes a 200
    (RFC 8441 5), and the stream's DATA frames and the backend's bytes are
    relayed both ways until the client ends the stream.
    """
    pair, pool, stream = websocketPair()
    [backend] = pool.endpoint.transports
    head = backend.value().decode("latin-1")
    assert head.startswith("GET /chat HTTP/1.1\r\n")
    fields = {
        name.lower(): value for name, value in (line.split(": ", 1) for line in head.split("\r\n")[1:] if line)
    }
    assert fields["upgrade"] == "websocket" and fields["connection"] == "upgrade"
    assert fields["sec-websocket-version"] == "13"
    key = fields["sec-websocket-key"].encode()
    assert len(base64.b64decode(key)) == 16
    backend.clear()
    [protocol] = pool.endpoint.protocols
    protocol.dataReceived(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + _accept(key) + b"\r\nSec-WebSocket-Protocol: chat\r\n\r\nhello"
    )
    pair.pump()
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"200" and headers[b"sec-websocket-protocol"] == b"chat"
    assert b"sec-websocket-accept" not in headers and b"upgrade" not in headers
    assert body == b"hello" and not ended
    assert backend.value() == b"early"
    pair.client.send_data(stream, b"ping")
    pair.pump()
    assert backend.value() == b"earlyping"
    protocol.dataReceived(b"pong")
    pair.pump()
    assert pair.response(stream)[1] == b"hellopong"
    pair.client.end_stream(stream)
    pair.pump()
    assert backend.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    pair.pump()
    assert pair.response(stream)[2]
    [call] = pair.factory.accessLog.calls
    assert call.status == 200 and call.request.method == b"CONNECT"
    assert not pair.closed()


def test_webSocketWrongAccept() -> None:
    pair, pool, stream = websocketPair()
    [protocol] = pool.endpoint.protocols
    protocol.dataReceived(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: bogus\r\n\r\n"
    )
    pair.pump()
    assert pair.response(stream)[0][b":status"] == b"502"
    assert pool.endpoint.transports[0].disconnecting


def test_webSocketRefusedByTheBackend() -> None:
    pair, pool, stream = websocketPair()
    [protocol] = pool.endpoint.protocols
    protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
    pair.pump()
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"403" and body == b"no" and ended
    assert not pair.closed()


def test_webSocketClientResets() -> None:
    pair, pool, stream = websocketPair()
    [protocol] = pool.endpoint.protocols
    [backend] = pool.endpoint.transports
    key = backend.value().split(b"Sec-Websocket-Key: ")[1].split(b"\r\n")[0]
    protocol.dataReceived(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + _accept(key) + b"\r\n\r\n"
    )
    pair.pump()
    pair.client.reset_stream(stream, CANCEL)
    pair.pump()
    assert backend.disconnecting


def test_prefaceSentAtTheHandshake() -> None:
    """
    The server's SETTINGS go as soon as the handshake chose h2 (RFC 9113
    3.4); a client that then sends nothing gets HTTP/2's header deadline,
    never an HTTP/1.1 408.
    """
    pair = Pair(preface=False)
    pair.connection.handshakeCompleted()
    frames = pair.frames()
    assert isinstance(frames[0], SettingsFrame) and "ACK" not in frames[0].flags
    pair.clock.advance(11)
    assert pair.closed()
    data = pair.transport.value()
    assert b"HTTP/1.1" not in data
    assert isinstance(pair.frames()[-1], GoAwayFrame)


def test_earlyAnswerGivesTheWindowBack() -> None:
    """
    A stream answered while its body is held back (the backend paused it)
    is reset, and the bytes it held are given back to the connection's
    window: uploads on other streams do not starve.
    """
    unlimited = Route(name="all", hosts=("*",), paths=("/",), upstream="app")
    pair = Pair(settings=HTTP2Settings(initial_window_size=65535, connection_buffer=65535), routes=(unlimited,))
    for n in range(5):
        stream = pair.client.get_next_available_stream_id()
        pair.client.send_headers(stream, request(b"/up%d" % n, b"POST", [(b"content-length", b"100000")]))
        for _ in range(4):
            pair.client.send_data(stream, b"d" * 15000)
        pair.pump()
        call = pair.stage.held[-1]
        # Nobody reads the body: the backend answers at once.
        call.respond(textResponse(200, b"early"))
        pair.pump()
        assert pair.response(stream)[1] == b"early"
        assert pair.resets()[stream] == NO_ERROR
    assert pair.client.outbound_flow_control_window >= 60000


actionStrategy = st.one_of(
    st.sampled_from(
        ["request", "whole", "pause", "resume", "write", "finish", "cut", "ack", "tick", "reset"]
    ),
    frameStrategy,
)


@settings(max_examples=500, deadline=None)
@given(st.lists(actionStrategy, max_size=40))
@example(["request", "pause", "write", "write", "reset", "request", "write", "cut", "resume"])
@example(["pause", "whole", "whole", "request", "whole", "reset", "whole", "write"])
def test_anyInterleavingKeepsTheAccounts(actions: list[Any]) -> None:
    """
    Frames from the client, body bytes from backends, the socket pausing
    and resuming, time passing, in any order: no failure, what is held
    for the client always adds up, and every call ends with the connection.
    """
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        pair = Pair(settings=HTTP2Settings(stream_buffer=4096, connection_buffer=8192))
        bodies: list[Body] = []

        def answer(call: Any) -> None:
            if call.request.path == b"/whole":
                call.respond(textResponse(200, b"x" * 6000))
                return
            body = Body()
            bodies.append(body)
            call.respond(Response(200, b"OK", Fields(), None, body))

        pair.stage.answer = answer
        stream = 1
        for action in actions:
            if action == "pause":
                pair.server.pauseProducing()
            elif action == "resume":
                pair.server.resumeProducing()
            elif action in ("write", "finish", "cut"):
                for body in bodies:
                    if body.protocol is None or body.stopped:
                        continue
                    if action == "write":
                        body.write(b"w" * 3000)
                    elif action == "finish":
                        body.finish()
                    else:
                        body.protocol.connectionLost(Failure(ConnectionDone()))
                    break
            elif action == "ack":
                pair.send(_frame("WINDOW_UPDATE", 0, 0, b"\x00\x01\x00\x00"))
                for open_ in range(1, stream, 2):
                    pair.send(_frame("WINDOW_UPDATE", open_, 0, b"\x00\x01\x00\x00"))
            elif action == "tick":
                pair.clock.advance(5)
            elif action == "request" or action == "whole":
                pair.send(headersFrame(pair, stream, request(b"/s" if action == "request" else b"/whole")))
                stream += 2
            elif action == "reset":
                pair.send(_frame("RST_STREAM", max(1, stream - 2), 0, b"\x00\x00\x00\x08"))
            elif isinstance(action, str):
                continue
            else:
                pair.send(action)
            server = pair.server
            if server is not None:
                assert server.held >= 0
                assert server.held == sum(s.held for s in server._streams.values())
            pair.transport.clear()
        if not pair.closed():
            # The client reads everything and the bodies end: every call
            # ends (nothing waits for good).
            pair.server.resumeProducing()
            for body in bodies:
                if body.protocol is not None and not body.stopped:
                    body.finish()
            pair.send(_frame("WINDOW_UPDATE", 0, 0, b"\x00\x10\x00\x00"))
            for open_ in range(1, stream, 2):
                pair.send(_frame("WINDOW_UPDATE", open_, 0, b"\x00\x10\x00\x00"))
            assert pair.closed() or not pair.factory.inflight
        pair.lose(Failure(ConnectionDone()))
        assert not pair.factory.inflight
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, failures


def test_idleWithoutAnyRequest() -> None:
    """A client that sends its preface and then nothing is closed after the
    idle timeout."""
    pair = Pair()
    pair.clock.advance(59)
    assert not pair.closed()
    pair.clock.advance(2)
    pair.pump()
    assert pair.closed() and pair.goaway().error_code == NO_ERROR


def test_requestsKeepTheConnectionAlive() -> None:
    """Requests coming and going reset the idle timeout."""
    pair = Pair()
    answering(pair)
    for _ in range(5):
        pair.clock.advance(40)
        pair.get(request())
    assert not pair.closed()
    pair.clock.advance(61)
    assert pair.closed()


def test_webSocketClientEndedBeforeTheSwitch() -> None:
    pair, pool, stream = websocketPair()
    pair.client.end_stream(stream)
    pair.pump()
    [protocol] = pool.endpoint.protocols
    [backend] = pool.endpoint.transports
    key = backend.value().split(b"Sec-Websocket-Key: ")[1].split(b"\r\n")[0]
    protocol.dataReceived(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + _accept(key) + b"\r\n\r\n"
    )
    pair.pump()
    headers, body, ended = pair.response(stream)
    assert headers[b":status"] == b"200" and ended
    assert backend.disconnecting


_FIRST_CONNECTION = """
import sys

import h2.config
import h2.connection
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tests.h2util import Stage, makeFactory, request, textResponse

stage = Stage()
stage.answer = lambda call: call.respond(textResponse(200, b"hello"))
factory = makeFactory(Clock(), stage)
before = set(sys.modules)
connection = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
transport = StringTransport()
transport.negotiatedProtocol = b"h2"
connection.makeConnection(transport)
client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
client.initiate_connection()
client.send_headers(1, request(), end_stream=True)
connection.dataReceived(client.data_to_send())
events = client.receive_data(transport.value())
print(sorted(m for m in set(sys.modules) - before if m.startswith("edgeproxy")))
print(sorted(type(e).__name__ for e in events))
"""


def test_firstConnectionImportsNothing() -> None:
    """
    A process's first HTTP/2 connection is served without importing
    anything: the HTTP/2 stack (about 17 ms of imports) comes with the
    listener, not on the reactor's thread while that connection and every
    other one wait.  In a fresh interpreter, so that other tests have not
    imported it already.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_CONNECTION],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "[]", out
    assert "ResponseReceived" in out[1] and "DataReceived" in out[1], out
