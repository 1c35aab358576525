# -*- test-case-name: tests.test_h2_sending -*-
"""
L{sendWhole}: a whole response written in one go, as the C{h2} library's
C{send_headers} followed by C{send_data(end_stream=True)} would write it,
without the library's per-frame objects.

Most answers are small and complete when their head comes (an error page,
a 1 KiB body from a backend): their HEADERS and their one DATA frame,
carrying C{END_STREAM}, go out together.  Through the library's public
calls that is two passes over the header list (its checks of what it is
given, then HPACK), two frame objects with their flag sets, and their
serialisation; about five times the work of the same state changes made
directly.  Here the library's own state machines (the connection's and
the stream's) take the same inputs in the same order (or, for a complete
request on an open connection, the stream is set to the state they would
leave it in: L{edgeproxy._compat.h2.answerWhole}), its own HPACK encoder
encodes the header list (after the stream's transition, as the library
does: encoding changes the compression state for good), its own
flow-control windows are charged, and the frames are written with the
layout of RFC 9113 4.1, 6.1 and 6.2 (CONTINUATION frames, 6.10, when the
block is larger than the peer's frame size).

It reads the connection's C{streams}, a stream's C{state_machine},
C{closed} and C{outbound_flow_control_window}, and the state machines'
input enums: names without an underscore, but not the library's documented
interface.  So it is used only with the releases it was checked against
(L{TESTED}), and C{tests.test_h2_sending} compares its frames and the
state it leaves with what the public calls give; with any other release
L{sendWhole} declines and the caller uses the public calls.
"""

from __future__ import annotations

import struct
from typing import Any

import h2
from h2.connection import ConnectionInputs
from h2.stream import StreamInputs

from edgeproxy._compat.h2 import ENABLED as DIRECT
from edgeproxy._compat.h2 import answerWhole, canAnswerWhole

__all__ = ["ENABLED", "TESTED", "sendWhole"]

TESTED = ("4.4",)
"""The C{h2} releases (major.minor) whose internals L{sendWhole} mirrors."""

ENABLED = ".".join(h2.__version__.split(".")[:2]) in TESTED

_HEADER = struct.Struct(">BHBBL")

_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4

_SEND_HEADERS = ConnectionInputs.SEND_HEADERS
_SEND_DATA = ConnectionInputs.SEND_DATA
_STREAM_HEADERS = StreamInputs.SEND_HEADERS
_STREAM_DATA = StreamInputs.SEND_DATA
_STREAM_END = StreamInputs.SEND_END_STREAM


def _frame(kind: int, flags: int, streamId: int, payload: bytes) -> bytes:
    size = len(payload)
    return _HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, streamId) + payload


def sendWhole(connection: Any, streamId: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes | None:
    """
    The frames of a whole response on stream C{streamId} of C{connection}
    (an C{h2} server connection): C{headers} (the response's header list,
    C{:status} first, names lower case), then C{body} with C{END_STREAM}
    (or C{END_STREAM} on the head when C{body} is empty), the library's
    state changed as its public calls would change it.

    @return: the bytes to write after whatever the library has to send, or
        L{None} when this cannot be done here (another library release, a
        stream the library does not hold open, a body over the peer's
        window or frame size) and nothing was changed: the caller uses the
        public calls.
    """
    if not ENABLED:
        return None
    stream = connection.streams.get(streamId)
    if stream is None or stream.closed:
        return None
    size = len(body)
    maxFrame = connection.max_outbound_frame_size
    if size and (
        size > maxFrame
        or size > stream.outbound_flow_control_window
        or size > connection.outbound_flow_control_window
    ):
        return None
    machine = stream.state_machine
    # The usual case (a complete request, its connection open) in one step
    # after the encoding (answerWhole); else input by input.
    direct = DIRECT and canAnswerWhole(connection, stream)
    if not direct:
        connection.state_machine.process_input(_SEND_HEADERS)
        machine.process_input(_STREAM_HEADERS)
    block = connection.encoder.encode(headers)
    if size:
        headFlags = 0
    else:
        if not direct:
            machine.process_input(_STREAM_END)
        headFlags = _END_STREAM
    if len(block) <= maxFrame:
        frames = _frame(_HEADERS, headFlags | _END_HEADERS, streamId, block)
    else:
        # RFC 9113 6.10: the rest of the block in CONTINUATION frames, the
        # last one ending it.
        pieces = [block[start:start + maxFrame] for start in range(0, len(block), maxFrame)]
        parts = [_frame(_HEADERS, headFlags, streamId, pieces[0])]
        for piece in pieces[1:-1]:
            parts.append(_frame(_CONTINUATION, 0, streamId, piece))
        parts.append(_frame(_CONTINUATION, _END_HEADERS, streamId, pieces[-1]))
        frames = b"".join(parts)
    if size:
        if not direct:
            connection.state_machine.process_input(_SEND_DATA)
            machine.process_input(_STREAM_DATA)
            machine.process_input(_STREAM_END)
        stream.outbound_flow_control_window -= size
        connection.outbound_flow_control_window -= size
        frames += _frame(_DATA, _END_STREAM, streamId, body)
    if direct:
        answerWhole(stream)
    return frames
