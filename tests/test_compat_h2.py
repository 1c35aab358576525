"""
Tests for L{edgeproxy._compat.h2}: L{openStream} against the C{h2}
library's C{receive_data}, on two server connections driven alike: the
same header lists, the same state left behind (streams and their states,
windows, content lengths, the highest stream, HPACK), the same GOAWAY on
a protocol error, and the same answers to what comes next.
"""

from __future__ import annotations

from typing import Any

import h2
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame, WindowUpdateFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy._compat import h2 as compat
from edgeproxy._compat.h2 import openStream, prune
from edgeproxy.http.h2.connection import _CONFIG

REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]


def connections() -> tuple[Any, Any, Any]:
    """A client and two servers that took its preface and settings."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    data = client.data_to_send()
    servers = []
    for _ in range(2):
        server = h2.connection.H2Connection(_CONFIG)
        server.initiate_connection()
        server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 500})
        server.receive_data(data)
        answer = server.data_to_send()
        servers.append(server)
    client.receive_data(answer)
    data = client.data_to_send()
    for server in servers:
        server.receive_data(data)
        server.data_to_send()
    return client, servers[0], servers[1]


def state(server: Any) -> tuple[Any, ...]:
    return (
        server.state_machine.state,
        server.highest_inbound_stream_id,
        server.inbound_flow_control_window,
        server.outbound_flow_control_window,
        sorted(
            (
                streamId,
                stream.state_machine.state,
                stream.state_machine.client,
                stream.state_machine.headers_received,
                stream.state_machine.headers_sent,
                stream.state_machine.trailers_received,
                stream.state_machine.trailers_sent,
                stream.state_machine.stream_closed_by,
                stream.inbound_flow_control_window,
                stream.outbound_flow_control_window,
                stream._expected_content_length,
                stream.max_outbound_frame_size,
            )
            for streamId, stream in server.streams.items()
        ),
        list(server.decoder.header_table.dynamic_entries),
        server.decoder.header_table.maxsize,
    )


def headersFrame(client: Any, stream: int, headers: list[tuple[bytes, bytes]], end: bool) -> HeadersFrame:
    frame = HeadersFrame(stream, flags=["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"])
    frame.data = client.encoder.encode(headers)
    return frame


def both(public: Any, fast: Any, frame: HeadersFrame) -> None:
    """The frame through receive_data on one, openStream on the other."""
    events = public.receive_data(frame.serialize())
    end = "END_STREAM" in frame.flags
    headers = openStream(fast, frame.stream_id, frame.data, end)
    assert [type(e) for e in events] == [h2.events.RequestReceived] + (
        [h2.events.StreamEnded] if end else []
    )
    assert headers == events[0].headers
    assert fast.data_to_send() == public.data_to_send()


extraFields = st.lists(
    st.tuples(
        st.sampled_from([b"accept", b"x-a", b"cookie", b"content-length", b"user-agent"]),
        st.sampled_from([b"1", b"0", b"5", b"*/*", b"a=1", b"h2load nghttp2/1.52.0"]),
    ),
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(extraFields, st.booleans()), min_size=1, max_size=6))
def test_sameAsReceiveData(requests: list[tuple[list[tuple[bytes, bytes]], bool]]) -> None:
    client, public, fast = connections()
    stream = 1
    for extra, end in requests:
        frame = headersFrame(client, stream, REQUEST + extra, end)
        try:
            events = public.receive_data(frame.serialize())
        except h2.exceptions.ProtocolError as error:
            # (Two content-lengths that disagree, say): the same error and
            # GOAWAY.
            with pytest.raises(type(error)):
                openStream(fast, stream, frame.data, end)
            assert fast.data_to_send() == public.data_to_send()
            assert state(fast) == state(public)
            return
        headers = openStream(fast, stream, frame.data, end)
        assert headers == events[0].headers
        assert fast.data_to_send() == public.data_to_send()
        prune(fast)
        prune(public)
        assert state(fast) == state(public)
        stream += 2
    # What comes next: an answer, a body, a reset, a window, a new stream.
    last = stream - 2
    follow = [
        WindowUpdateFrame(0, window_increment=100).serialize(),
        WindowUpdateFrame(last, window_increment=100).serialize(),
        DataFrame(last, data=b"abc", flags=["END_STREAM"]).serialize(),
        RstStreamFrame(1, error_code=8).serialize(),
        headersFrame(client, stream, REQUEST, True).serialize(),
    ]
    for data in follow:
        outcomes = []
        for server in (public, fast):
            try:
                events = server.receive_data(data)
                outcome: Any = [(type(e), getattr(e, "stream_id", None)) for e in events]
            except h2.exceptions.ProtocolError as error:
                outcome = type(error)
            outcomes.append((outcome, server.data_to_send()))
        assert outcomes[0] == outcomes[1]
        assert state(fast) == state(public)
    for server in (public, fast):
        if server.streams.get(stream) is not None and not server.streams[stream].closed:
            server.send_headers(stream, [(b":status", b"204")], end_stream=True)
    assert fast.data_to_send() == public.data_to_send()


def test_theSameHeadersAsTheEvent() -> None:
    client, public, fast = connections()
    both(public, fast, headersFrame(client, 1, REQUEST + [(b"x-a", b"1")], True))
    both(public, fast, headersFrame(client, 3, REQUEST, False))
    assert state(fast) == state(public)


@pytest.mark.parametrize(
    "block",
    [
        # An index past both tables (RFC 7541 2.3.3).
        b"\xff\x80\x01",
        # A table size update over the limit the decoder allows.
        b"\x3f\xe1\xff\x03",
        # A string longer than the block.
        b"\x40\x0a\x61",
    ],
)
def test_hpackErrorsAsReceiveData(block: bytes) -> None:
    """A header block the decoder refuses: the error and GOAWAY of receive_data."""
    _, public, fast = connections()
    frame = HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"])
    with pytest.raises(h2.exceptions.ProtocolError) as expected:
        public.receive_data(frame.serialize())
    with pytest.raises(type(expected.value)):
        openStream(fast, 1, block, True)
    assert fast.data_to_send() == public.data_to_send()
    assert state(fast) == state(public)


def test_badContentLengthAsReceiveData() -> None:
    client, public, fast = connections()
    frame = headersFrame(client, 1, REQUEST + [(b"content-length", b"x1")], False)
    with pytest.raises(h2.exceptions.ProtocolError):
        public.receive_data(frame.serialize())
    with pytest.raises(h2.exceptions.ProtocolError):
        openStream(fast, 1, frame.data, False)
    assert fast.data_to_send() == public.data_to_send()


def test_streamIdGoingBackIsAConnectionError() -> None:
    client, public, fast = connections()
    both(public, fast, headersFrame(client, 5, REQUEST, True))
    frame = headersFrame(client, 3, REQUEST, True)
    with pytest.raises(h2.exceptions.ProtocolError):
        public.receive_data(frame.serialize())
    with pytest.raises(h2.exceptions.ProtocolError):
        openStream(fast, 3, frame.data, True)
    assert fast.data_to_send() == public.data_to_send()


def test_closedConnectionRefusesNewStreams() -> None:
    """After the connection's own GOAWAY, as receive_data: a protocol error."""
    client, public, fast = connections()
    for server in (public, fast):
        server.close_connection()
        server.data_to_send()
    frame = headersFrame(client, 1, REQUEST, True)
    with pytest.raises(h2.exceptions.ProtocolError):
        public.receive_data(frame.serialize())
    with pytest.raises(h2.exceptions.ProtocolError):
        openStream(fast, 1, frame.data, True)
    assert fast.data_to_send() == public.data_to_send()


def test_pruneForgetsClosedStreams() -> None:
    """When the connection holds more streams than allowed."""
    client, _, fast = connections()
    for stream in (1, 3, 5):
        openStream(fast, stream, client.encoder.encode(REQUEST), True)
    fast.send_headers(1, [(b":status", b"204")], end_stream=True)
    prune(fast, 3)
    assert sorted(fast.streams) == [1, 3, 5]
    fast.reset_stream(3)
    prune(fast)
    assert sorted(fast.streams) == [5]
    # What the library remembers of them (a late frame on a stream it
    # reset is a stream error, on one that ended a connection error).
    events = fast.receive_data(WindowUpdateFrame(3, window_increment=1).serialize())
    assert events == []


@pytest.mark.parametrize("end", [True, False])
def test_interimHeadFromAClientAsReceiveData(end: bool) -> None:
    """A C{:status} in a request: whatever the library makes of it."""
    client, public, fast = connections()
    frame = headersFrame(client, 1, [(b":status", b"103"), *REQUEST], end)
    with pytest.raises(h2.exceptions.ProtocolError) as expected:
        public.receive_data(frame.serialize())
    with pytest.raises(type(expected.value)):
        openStream(fast, 1, frame.data, end)
    assert fast.data_to_send() == public.data_to_send()
    assert state(fast) == state(public)


def test_disabledWhenATransitionDiffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release whose state machine does otherwise turns the module off."""
    from h2 import stream as streamModule

    assert compat._checked()
    table = dict(streamModule._transitions)
    key = (h2.stream.StreamState.OPEN, h2.stream.StreamInputs.RECV_END_STREAM)
    table[key] = (h2.stream.H2StreamStateMachine.stream_ended, h2.stream.StreamState.HALF_CLOSED_REMOTE)
    monkeypatch.setattr(streamModule, "_transitions", table)
    assert not compat._checked()
    monkeypatch.setattr(h2, "__version__", "9.0.0")
    monkeypatch.setattr(streamModule, "_transitions", {**table, key: compat._STREAM_TRANSITIONS[key]})
    assert not compat._checked()


def test_enabledForTheInstalledRelease() -> None:
    """The release installed is one it was checked against: if this fails,
    check L{openStream} against the new release before adding it."""
    assert compat.ENABLED, h2.__version__


def test_reopenAfterTheClientsGoAway() -> None:
    """
    After a client's GOAWAY the library refuses to answer; once reopened,
    the stream in flight is answered and read as the public calls would
    have before the GOAWAY, and the client's frames on it are taken.
    """
    client, server, reference = connections()
    opening = headersFrame(client, 1, REQUEST, False).serialize()
    for connection in (server, reference):
        connection.receive_data(opening)
    server.receive_data(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
    with pytest.raises(h2.exceptions.ProtocolError):
        server.send_headers(1, [(b":status", b"200")])
    assert compat.reopen(server)
    assert not compat.reopen(server)
    for connection in (server, reference):
        connection.send_headers(1, [(b":status", b"200")])
        connection.send_data(1, b"ok", end_stream=True)
    assert server.data_to_send() == reference.data_to_send()
    data = DataFrame(1, data=b"body", flags=["END_STREAM"]).serialize()
    events = [[type(e) for e in c.receive_data(data)] for c in (server, reference)]
    assert events[0] == events[1] == [h2.events.DataReceived, h2.events.StreamEnded]
    assert state(server) == state(reference)
