# -*- test-case-name: tests.test_compat_h2 -*-
"""
The private surface of the C{h2} library that edgeproxy's HTTP/2 server
(L{edgeproxy.http.h2}) uses, in one place: L{openStream}.

A client that sends requests without bodies sends reads made of nothing
but C{HEADERS} frames, each opening a new stream (the frame guard,
L{edgeproxy.http.h2.guard}, says when a read is such).  Through
C{H2Connection.receive_data} each of them is parsed into frame and flag
objects, formatted for a trace log, dispatched, counted against the open
streams by a walk over every stream the connection holds, and turned into
events; that is about half of what the library costs per request.
L{openStream} takes the frame's header block and does what
C{receive_data} does with it that matters: the block decoded with the
connection's HPACK decoder (C{h2.connection._decode_headers}, which maps
HPACK errors to the library's), the connection's state machine given the
frame (an input that changes nothing while the connection is open), the
stream made by the connection (C{H2Connection._begin_new_stream}: its
stream-ID checks, its windows from the settings, the highest inbound
stream ID), and the stream's own C{receive_headers} (its state machine,
its content-length).  A protocol error is answered as C{receive_data}
answers it: the connection's GOAWAY queued
(C{H2Connection._terminate_connection}) and the error raised.

What it leaves out is the limit of concurrent streams (the caller refuses
streams over its own, lower, limit) and the removal of closed streams from
C{H2Connection.streams}, which the library makes while counting: the
caller reads C{open_inbound_streams} once per read instead (L{prune}).

Used only with the releases of C{h2} it was checked against (L{TESTED});
C{tests.test_compat_h2} compares the state it leaves, and what comes next,
with what C{receive_data} gives, and fails on another release.
"""

from __future__ import annotations

from typing import Any

import h2
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState, _decode_headers
from h2.exceptions import ProtocolError

__all__ = ["ENABLED", "TESTED", "openStream", "prune"]

TESTED = ("4.4",)
"""The C{h2} releases (major.minor) whose internals L{openStream} mirrors."""

ENABLED = ".".join(h2.__version__.split(".")[:2]) in TESTED

_OPEN = ConnectionState.SERVER_OPEN
_RECV_HEADERS = ConnectionInputs.RECV_HEADERS
_CLIENT_STREAMS = AllowedStreamIDs.ODD


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
        headers = _decode_headers(connection.decoder, block)
        machine = connection.state_machine
        if machine.state is not _OPEN:
            machine.process_input(_RECV_HEADERS)
        stream = connection._begin_new_stream(streamId, _CLIENT_STREAMS)
        _, events = stream.receive_headers(headers, endStream, None)
    except ProtocolError as error:
        connection._terminate_connection(error.error_code)
        raise
    return events[0].headers  # type: ignore[no-any-return]


def prune(connection: Any) -> None:
    """
    Let C{connection} forget its closed streams (what it does whenever it
    counts its open streams, as C{receive_data} does for every new one).
    """
    connection.open_inbound_streams  # noqa: B018 -- the property prunes
