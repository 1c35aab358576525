# -*- test-case-name: tests.test_compat_h2 -*-
"""
The private surface of the C{h2} library that edgeproxy's HTTP/2 server
(L{edgeproxy.http.h2}) uses, in one place: L{openStream} and
L{answerWhole}, the two ends of a request without a body answered at
once, which is most of what a proxy's HTTP/2 connection does.

Opening.  A client that sends requests without bodies sends reads made of
nothing but C{HEADERS} frames, each opening a new stream (the frame guard,
L{edgeproxy.http.h2.guard}, says when a read is such).  Through
C{H2Connection.receive_data} each of them is parsed into frame and flag
objects, formatted for a trace log, dispatched, counted against the open
streams by a walk over every stream the connection holds, and turned into
events, and the stream's state machine is driven by inputs looked up in
its table; that is most of what the library costs per request.
L{openStream} takes the frame's header block and does what
C{receive_data} does with it that matters: the block decoded with the
connection's HPACK decoder (C{h2.connection._decode_headers}, which maps
HPACK errors to the library's), the connection's state machine given the
frame (an input that changes nothing while the connection is open), the
stream made as the connection makes it (C{H2Connection._begin_new_stream}
for a stream ID it refuses; else the same C{H2Stream}, its windows from
the settings, the connection's highest inbound stream ID), the stream's
state set as its two inputs (C{RECV_HEADERS},
then C{RECV_END_STREAM}) would set it, and its expected content length
read (C{H2Stream._initialize_content_length}).  A protocol error is
answered as C{receive_data} answers it: the connection's GOAWAY queued
(C{H2Connection._terminate_connection}) and the error raised.  What it
leaves out is the limit of concurrent streams (the caller refuses streams
over its own, lower, limit) and the removal of closed streams from
C{H2Connection.streams}, which the library makes while counting: the
caller lets it happen once some have gathered instead (L{prune}).

Answering.  L{answerWhole} is the other end, for
L{edgeproxy.http.h2.sending.sendWhole}: the state a whole response (its
C{HEADERS}, a C{DATA} frame or none, C{END_STREAM}) leaves a stream in
whose request is complete, set at once instead of through three inputs of
the stream's state machine and two of the connection's.

Closed streams.  The library remembers how each closed stream was closed
(C{H2Connection._closed_streams}, up to 65,536 of them per connection)
to tell a frame that was in flight when the stream closed (a stream error
after a reset) from a peer's error (a connection error).  Kept as the
library keeps it, a connection that served many requests holds several
megabytes for it, and every full collection of the garbage collector
walks all of it.  L{rememberClosed} puts L{ClosedStreams} in its place:
the same answers for the streams closed last, a bounded number of them
kept in a form the collector does not walk.

After a client's GOAWAY.  The library takes no frame in either direction
once it has read one (its connection state machine closes, whatever the
error code); RFC 9113 6.8 lets the streams the client opened complete,
since a client's GOAWAY names the last stream the server opened.
L{reopen} sets the state back to open, the one thing reading a GOAWAY
changed but for the output it dropped, which the caller keeps aside.

The transitions set directly are read from the library's own tables when
this module is imported (L{ENABLED} is false if any differs), and the rest
is used only with the releases of C{h2} it was checked against
(L{TESTED}); C{tests.test_compat_h2} compares the state left, and what
comes next, with what the library's public calls give.
"""

from __future__ import annotations

from typing import Any

import h2
from h2 import stream as _stream
from h2.connection import (
    AllowedStreamIDs,
    ConnectionInputs,
    ConnectionState,
    H2ConnectionStateMachine,
    _decode_headers,
)
from h2.exceptions import ProtocolError
from h2.stream import H2Stream, H2StreamStateMachine, StreamClosedBy, StreamInputs, StreamState

__all__ = [
    "ENABLED",
    "TESTED",
    "ClosedStreams",
    "answerWhole",
    "canAnswerWhole",
    "openStream",
    "prune",
    "rememberClosed",
    "reopen",
]

TESTED = ("4.4",)
"""The C{h2} releases (major.minor) whose internals this module mirrors."""

_OPEN = ConnectionState.SERVER_OPEN
_RECV_HEADERS = ConnectionInputs.RECV_HEADERS
_CLIENT_STREAMS = AllowedStreamIDs.ODD
_STREAM_OPEN = StreamState.OPEN
_HALF_CLOSED_REMOTE = StreamState.HALF_CLOSED_REMOTE
_CLOSED = StreamState.CLOSED
_SENT_END = StreamClosedBy.SEND_END_STREAM

_STREAM_TRANSITIONS = {
    # A request's head: client False, headers received (no event kept).
    (StreamState.IDLE, StreamInputs.RECV_HEADERS): (H2StreamStateMachine.request_received, _STREAM_OPEN),
    # Its END_STREAM: nothing more than the state.
    (_STREAM_OPEN, StreamInputs.RECV_END_STREAM): (H2StreamStateMachine.stream_half_closed, _HALF_CLOSED_REMOTE),
    # The response's head: headers sent.
    (_HALF_CLOSED_REMOTE, StreamInputs.SEND_HEADERS): (H2StreamStateMachine.response_sent, _HALF_CLOSED_REMOTE),
    (_HALF_CLOSED_REMOTE, StreamInputs.SEND_DATA): (None, _HALF_CLOSED_REMOTE),
    # Its END_STREAM: closed, by us.
    (_HALF_CLOSED_REMOTE, StreamInputs.SEND_END_STREAM): (H2StreamStateMachine.send_end_stream, _CLOSED),
}
"""The stream transitions L{openStream} and L{answerWhole} make directly,
and what each does (checked against the library's table)."""

_CONNECTION_TRANSITIONS = {
    (_OPEN, _RECV_HEADERS): (None, _OPEN),
    (_OPEN, ConnectionInputs.SEND_HEADERS): (None, _OPEN),
    (_OPEN, ConnectionInputs.SEND_DATA): (None, _OPEN),
}
"""The connection's inputs left out while it is open: they change nothing."""

_GOAWAY_TRANSITION = {
    (_OPEN, ConnectionInputs.RECV_GOAWAY): (None, ConnectionState.CLOSED),
}
"""What a client's GOAWAY does to an open connection (L{reopen} undoes it)."""


def _checked() -> bool:
    if ".".join(h2.__version__.split(".")[:2]) not in TESTED:
        return False
    streams = getattr(_stream, "_transitions", {})
    connections = getattr(H2ConnectionStateMachine, "_transitions", {})
    return all(streams.get(key) == value for key, value in _STREAM_TRANSITIONS.items()) and all(
        connections.get(key) == value
        for key, value in {**_CONNECTION_TRANSITIONS, **_GOAWAY_TRANSITION}.items()
    )


ENABLED = _checked()
"""Whether the installed C{h2} is one this module was checked against."""


def openStream(
    connection: Any, streamId: int, block: bytes, endStream: bool
) -> list[tuple[bytes, bytes]]:
    """
    Open client stream C{streamId} of C{connection} (an C{h2} server
    connection) from a C{HEADERS} frame with C{END_HEADERS} and neither
    padding nor priority, as C{receive_data} would.

    @param block: the frame's payload, a whole header block.
    @param endStream: the frame has C{END_STREAM}.
    @return: the request's header list (what C{RequestReceived.headers}
        would be).
    @raise ProtocolError: what C{receive_data} would raise, after queuing
        the same GOAWAY.
    """
    try:
        # (A list of byte pairs: the decoder's raw output.)
        headers: list[tuple[bytes, bytes]] = _decode_headers(connection.decoder, block)  # type: ignore[assignment]
        machine = connection.state_machine
        if machine.state is not _OPEN:
            machine.process_input(_RECV_HEADERS)
        if streamId > connection.highest_inbound_stream_id and streamId & 1:
            # What _begin_new_stream does for a valid new client stream,
            # without its debug logging.
            stream = H2Stream(
                streamId,
                config=connection.config,
                inbound_window_size=connection.local_settings.initial_window_size,
                outbound_window_size=connection.remote_settings.initial_window_size,
            )
            stream.max_outbound_frame_size = connection.max_outbound_frame_size
            connection.streams[streamId] = stream
            connection.highest_inbound_stream_id = streamId
        else:
            # (Which raises the library's error.)
            stream = connection._begin_new_stream(streamId, _CLIENT_STREAMS)
        if _informational(headers):
            # (Which the library refuses from a client.)
            stream.receive_headers(headers, endStream, None)
        else:
            machine = stream.state_machine
            machine.client = False
            machine.headers_received = True
            machine.state = _HALF_CLOSED_REMOTE if endStream else _STREAM_OPEN
            stream._initialize_content_length(headers)
    except ProtocolError as error:
        connection._terminate_connection(error.error_code)
        raise
    return headers


def _informational(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the library would read C{headers} as an interim response
    (a C{:status} among the pseudo-headers)."""
    for name, _ in headers:
        if name[:1] != b":":
            return False
        if name == b":status":
            return True
    return False


def prune(connection: Any, atMost: int = 0) -> None:
    """
    Let C{connection} forget its closed streams (what it does whenever it
    counts its open streams, as C{receive_data} does for every new one)
    when it holds more than C{atMost} streams.
    """
    if len(connection.streams) > atMost:
        connection.open_inbound_streams  # noqa: B018 -- the property prunes


_CLOSED_BY: tuple[StreamClosedBy | None, ...] = (None, *StreamClosedBy)
"""How a stream was closed, by the small integer L{ClosedStreams} keeps."""

_CLOSED_CODES = {closedBy: code for code, closedBy in enumerate(_CLOSED_BY)}


class ClosedStreams:
    """
    How the last closed streams of a connection were closed: what
    C{H2Connection._closed_streams} holds, for the calls the library makes
    of it (C{in}, item and item assignment), bounded.

    Between C{limit // 2} and C{limit} streams are remembered, the most
    recently closed; the older half is forgotten at once when the limit is
    passed.  A frame on a stream forgotten so is answered as one on a
    stream the client never opened below its highest (a connection error,
    C{PROTOCOL_ERROR}), which RFC 9113 5.1 allows for frames that come
    long after the stream closed.

    Stream IDs and small integers only: the collector does not track the
    dictionary that holds them, so it costs a full collection nothing.
    """

    __slots__ = ("_codes", "_limit")

    def __init__(self, limit: int) -> None:
        self._codes: dict[int, int] = {}
        self._limit = limit

    def __contains__(self, streamId: object) -> bool:
        return streamId in self._codes

    def __getitem__(self, streamId: int) -> StreamClosedBy | None:
        return _CLOSED_BY[self._codes[streamId]]

    def __setitem__(self, streamId: int, closedBy: StreamClosedBy | None) -> None:
        codes = self._codes
        codes[streamId] = _CLOSED_CODES[closedBy]
        if len(codes) > self._limit:
            kept = list(codes.items())[len(codes) // 2 :]
            self._codes = dict(kept)

    def __len__(self) -> int:
        return len(self._codes)


def rememberClosed(connection: Any, limit: int) -> bool:
    """
    Let C{connection} (an C{h2} connection) remember at most C{limit} of
    its closed streams (L{ClosedStreams}) instead of the library's 65,536.

    @return: whether it was done: not with another release of the library.
    """
    if not ENABLED or not hasattr(connection, "_closed_streams"):
        return False
    connection._closed_streams = ClosedStreams(limit)
    return True


def canAnswerWhole(connection: Any, stream: Any) -> bool:
    """
    Whether L{answerWhole} applies to C{stream} of C{connection}: the
    connection open, the stream's request complete and nothing sent on it.
    """
    machine = stream.state_machine
    return (
        machine.state is _HALF_CLOSED_REMOTE
        and not machine.headers_sent
        and machine.client is False
        and connection.state_machine.state is _OPEN
    )


def answerWhole(stream: Any) -> None:
    """
    The state a whole response leaves C{stream} in (see
    L{canAnswerWhole}): its head sent, then C{END_STREAM} (on the head or
    on a C{DATA} frame): closed, by us.
    """
    machine = stream.state_machine
    machine.headers_sent = True
    machine.state = _CLOSED
    machine.stream_closed_by = _SENT_END


def reopen(connection: Any) -> bool:
    """
    Open C{connection} (an C{h2} server connection that took client
    streams) again after the client's GOAWAY closed it.

    @return: whether it was done: not with another release of the library,
        nor for a connection that was not closed.
    """
    machine = connection.state_machine
    if not ENABLED or machine.state is not ConnectionState.CLOSED:
        return False
    machine.state = _OPEN
    return True
