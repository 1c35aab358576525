"""
Tests for L{edgeproxy.http.h2.sending}: L{sendWhole} against the C{h2}
library's public C{send_headers} and C{send_data}, on two server
connections driven alike: the same bytes on the wire, the same state left
behind (stream and connection states, windows, HPACK), the same bytes for
what comes next.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.http.h2 import sending
from edgeproxy.http.h2.sending import sendWhole

CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)

REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]


def servers(frameSize: int, window: int, endRequest: bool) -> tuple[Any, Any, Any]:
    """A client and two servers that received the same bytes, stream 1 open."""
    clientConfig = h2.config.H2Configuration(client_side=True, header_encoding=None)
    client = h2.connection.H2Connection(clientConfig)
    client.initiate_connection()
    client.update_settings(
        {
            h2.settings.SettingCodes.MAX_FRAME_SIZE: frameSize,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
        }
    )
    client.send_headers(1, REQUEST, end_stream=endRequest)
    data = client.data_to_send()
    made = []
    for _ in range(2):
        server = h2.connection.H2Connection(CONFIG)
        server.initiate_connection()
        server.receive_data(data)
        answer = server.data_to_send()
        made.append(server)
    # The server's SETTINGS and its ACK of the client's.
    client.receive_data(answer)
    return client, made[0], made[1]


def state(server: Any) -> tuple[Any, ...]:
    stream = server.streams.get(1)
    return (
        server.state_machine.state,
        server.outbound_flow_control_window,
        None if stream is None else stream.state_machine.state,
        None if stream is None else stream.closed,
        None if stream is None else stream.closed_by,
        None if stream is None else stream.state_machine.headers_sent,
        None if stream is None else stream.outbound_flow_control_window,
        list(server.encoder.header_table.dynamic_entries),
    )


headerLists = st.lists(
    st.tuples(
        st.sampled_from([b"content-type", b"x-a", b"set-cookie", b"date", b"etag"]),
        st.text(alphabet="abcXYZ019-_=;/.", max_size=300).map(str.encode),
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(
    headerLists,
    st.sampled_from([0, 1, 100, 16384, 16385, 70000]),
    st.sampled_from([16384, 20000]),
    st.sampled_from([0, 10, 65535, 100000]),
    st.booleans(),
)
def test_sameAsThePublicCalls(
    fields: list[tuple[bytes, bytes]], size: int, frameSize: int, window: int, endRequest: bool
) -> None:
    client, public, fast = servers(frameSize, window, endRequest)
    headers = [(b":status", b"200"), *fields]
    body = b"b" * size
    frames = sendWhole(fast, 1, list(headers), body)
    if frames is None:
        # Declined: nothing changed, and the public calls would refuse too
        # (or split the body, which sendWhole does not do).
        assert state(fast) == state(public)
        assert size > min(window, 65535) or size > frameSize
        return
    if size:
        public.send_headers(1, list(headers))
        public.send_data(1, body, end_stream=True)
    else:
        public.send_headers(1, list(headers), end_stream=True)
    assert fast.data_to_send() + frames == public.data_to_send()
    assert state(fast) == state(public)
    # What comes next is the same too (HPACK and the stream's end).
    events = client.receive_data(frames)
    assert [type(e) for e in events][:1] == [h2.events.ResponseReceived]
    for server in (fast, public):
        server.receive_data(client.data_to_send())
    if not endRequest:
        client.reset_stream(1)
        data = client.data_to_send()
        for server in (fast, public):
            server.receive_data(data)
    client.send_headers(3, REQUEST, end_stream=True)
    data = client.data_to_send()
    for server in (fast, public):
        server.receive_data(data)
        server.send_headers(3, [(b":status", b"204"), *fields], end_stream=True)
    assert fast.data_to_send() == public.data_to_send()
    assert state(fast) == state(public)


def test_declinesAClosedStream() -> None:
    client, _, fast = servers(16384, 65535, True)
    fast.reset_stream(1)
    assert sendWhole(fast, 1, [(b":status", b"200")], b"x") is None
    assert sendWhole(fast, 99, [(b":status", b"200")], b"x") is None


def test_declinesOtherReleases(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a release it was not checked against, the public calls are used."""
    client, _, fast = servers(16384, 65535, True)
    monkeypatch.setattr(sending, "ENABLED", False)
    assert sendWhole(fast, 1, [(b":status", b"200")], b"x") is None
    assert fast.streams[1].state_machine.state.name == "HALF_CLOSED_REMOTE"


def test_enabledForTheInstalledRelease() -> None:
    """The release installed is one it was checked against: if this fails,
    check the fast path against the new release before adding it."""
    assert sending.ENABLED, h2.__version__


@pytest.mark.parametrize("size", [0, 5])
def test_headerBlockInContinuationFrames(size: int) -> None:
    """A head larger than the peer's frame size: CONTINUATION frames, as
    the library writes them."""
    client, public, fast = servers(16384, 65535, True)
    headers = [(b":status", b"200"), (b"x-big", b"a1" * 20000)]
    frames = sendWhole(fast, 1, list(headers), b"x" * size)
    assert frames is not None
    if size:
        public.send_headers(1, list(headers))
        public.send_data(1, b"x" * size, end_stream=True)
    else:
        public.send_headers(1, list(headers), end_stream=True)
    assert fast.data_to_send() + frames == public.data_to_send()
    assert state(fast) == state(public)
    events = client.receive_data(frames)
    assert dict(events[0].headers)[b"x-big"] == b"a1" * 20000
