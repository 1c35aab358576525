# -*- test-case-name: tests.test_h2_guard -*-
"""
L{FrameGuard}: a look at every HTTP/2 frame header a client sends before the
C{h2} library buffers the frame, for what the library does not defend
against.

  - Frame size: a frame announcing more than our C{SETTINGS_MAX_FRAME_SIZE}
    is refused with C{FRAME_SIZE_ERROR} from its 9-byte header (RFC 9113
    4.2), before any of its payload is held (the library reads the whole
    frame first).
  - Flood budgets: frames that make a server work without asking for
    anything (C{DATA} without C{END_STREAM} carrying no data, padding
    aside; C{PRIORITY}, C{SETTINGS}, C{PING}, C{RST_STREAM}, extension
    frames), and streams refused or reset
    before they were answered (Rapid Reset, CVE-2023-44487), spend tokens of
    a budget per kind that refills with time (C{RST_STREAM} also with each
    stream answered); a client that runs one out gets C{ENHANCE_YOUR_CALM}
    (RFC 9113 5.4.1).
  - Stream batches: the frame ending the header block of every
    C{batch}-th new stream of one read is a place to cut the read at, so
    that the connection can refuse streams past its limit before the
    library has built thousands of them from one read.
  - Client GOAWAY: each C{GOAWAY} frame is cut out of the read (cuts at
    its start and its end), so that the library reads it alone and the
    connection can keep serving the streams in flight after it.
  - Header deadline: whether a frame (other than a C{DATA} payload) or a
    header block is incomplete, so that the connection can run its
    header deadline while it is.
  - Requests alone: whether a read is nothing but whole C{HEADERS} frames
    that each open a new stream with a whole header block (no padding, no
    priority), the usual read of a client sending requests without
    bodies; the connection opens those streams without the library's
    frame parsing (L{edgeproxy._compat.h2.openStream}).

It does no I/O and keeps no clock: the time is passed in.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "BUDGETS",
    "Budget",
    "FrameGuard",
    "Violation",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The client connection preface (RFC 9113 3.4), checked by the library."""

_HEADER = struct.Struct(">BHBBL")

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)

_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8

FRAME_SIZE_ERROR = 0x6
ENHANCE_YOUR_CALM = 0xB


class Budget(NamedTuple):
    """Tokens of one kind: C{burst} at most, C{rate} more per second."""

    burst: float
    rate: float


EMPTY_DATA, PRIORITY_FRAMES, SETTINGS_FRAMES, PING_FRAMES, RESETS, EXTENSION_FRAMES = range(6)

KIND_NAMES = ("empty DATA", "PRIORITY", "SETTINGS", "PING", "RST_STREAM", "extension")

BUDGETS = (
    # Empty DATA frames carry nothing (CVE-2019-9518).
    Budget(100.0, 10.0),
    # Some clients send a PRIORITY frame per request, or a few for idle
    # streams of a priority tree (CVE-2019-9513).
    Budget(1000.0, 100.0),
    # A client sends one at the start and seldom another (CVE-2019-9515).
    Budget(100.0, 1.0),
    # Each is answered (CVE-2019-9512).
    Budget(100.0, 10.0),
    # Streams reset by the client, or refused over the limit, before their
    # answer: each may have cost a backend request (CVE-2023-44487,
    # CVE-2019-9514).  Also refilled by every stream answered.
    Budget(200.0, 2.0),
    # Unknown frame types are ignored (RFC 9113 5.5), not for free.
    Budget(100.0, 10.0),
)
"""The budget of each kind (index: C{EMPTY_DATA}...)."""


class Violation(NamedTuple):
    """Why the connection must end: a GOAWAY error code and a reason."""

    code: int
    why: str


class FrameGuard:
    """
    The frame headers of one client connection.

    @ivar cuts: after L{scan}, the offsets in the data scanned after which
        the library should be fed the rest separately (L{None}: feed it
        whole).
    @ivar resets: C{RST_STREAM} frames in the data scanned last.
    @ivar started: the preface and the first frame (SETTINGS) have arrived.
    @ivar requests: after L{scan}, when the data scanned is only whole
        C{HEADERS} frames opening new streams (see the module docstring):
        C{(start, end, streamId, endStream)} of each, C{start:end} its
        header block; else L{None}.
    """

    __slots__ = (
        "maxFrameSize", "batch", "cuts", "resets", "started", "requests", "_preface", "_head",
        "_left", "_type", "_block", "_blockNew", "_lastStream", "_tokens", "_stamps",
        "_budgets",
    )

    def __init__(
        self, maxFrameSize: int, batch: int, budgets: tuple[Budget, ...] = BUDGETS
    ) -> None:
        self.maxFrameSize = maxFrameSize
        self.batch = max(1, batch)
        self.cuts: list[int] | None = None
        self.resets = 0
        self.started = False
        self.requests: list[tuple[int, int, int, bool]] | None = None
        self._preface = len(PREFACE)
        self._head = b""
        self._left = 0
        self._type = -1
        self._block = False
        self._blockNew = False
        self._lastStream = 0
        self._budgets = budgets
        self._tokens = [budget.burst for budget in budgets]
        self._stamps = [0.0] * len(budgets)

    @property
    def incomplete(self) -> bool:
        """
        Whether the client is in the middle of something the header deadline
        covers: the preface, a frame header, a frame other than C{DATA}, or
        a header block awaiting its C{CONTINUATION}.
        """
        return bool(
            self._preface
            or self._head
            or self._block
            or (self._left and self._type != DATA)
        )

    def spend(self, kind: int, now: float) -> Violation | None:
        """
        Take one token of C{kind}'s budget.

        @return: the violation when there was none left.
        """
        budget = self._budgets[kind]
        tokens = self._tokens[kind] + (now - self._stamps[kind]) * budget.rate
        tokens = min(tokens, budget.burst)
        self._stamps[kind] = now
        if tokens < 1.0:
            self._tokens[kind] = tokens
            return Violation(ENHANCE_YOUR_CALM, f"{KIND_NAMES[kind]} flood")
        self._tokens[kind] = tokens - 1.0
        return None

    def credit(self, kind: int) -> None:
        """Give back one token of C{kind} (up to its burst)."""
        tokens = self._tokens[kind] + 1.0
        burst = self._budgets[kind].burst
        self._tokens[kind] = min(burst, tokens)

    def _cut(self, offset: int, size: int) -> None:
        """Cut the read of C{size} bytes at C{offset} (once, and only inside it)."""
        if 0 < offset < size:
            cuts = self.cuts
            if cuts is None:
                self.cuts = [offset]
            elif cuts[-1] != offset:
                cuts.append(offset)

    def scan(self, data: bytes, now: float) -> Violation | None:
        """
        Look at the frame headers that complete in C{data}, the next bytes
        the client sent.

        @return: the first violation, or L{None}.  After a violation the
            guard is of no further use (the connection ends).
        """
        self.cuts = None
        self.resets = 0
        self.requests = None
        size = len(data)
        pos = 0
        # Whole request frames only, from a frame boundary (after the
        # preface and the first frame) to one.
        requests: list[tuple[int, int, int, bool]] | None = (
            [] if self.started and not (self._preface or self._left or self._head or self._block) else None
        )
        if self._preface:
            taken = min(self._preface, size)
            self._preface -= taken
            pos = taken
        left = self._left
        if left:
            if left > size - pos:
                self._left = left - (size - pos)
                return None
            pos += left
            self._left = 0
            if self._type == GOAWAY:
                self._cut(pos, size)
            if not self.started:
                self.started = True
        opened = 0
        maxFrameSize = self.maxFrameSize
        while pos < size:
            head = self._head
            if head:
                need = 9 - len(head)
                head += data[pos:pos + need]
                if len(head) < 9:
                    self._head = head
                    return None
                self._head = b""
                pos += need
                high, low, kind, flags, stream = _HEADER.unpack(head)
                start = 0
            elif size - pos < 9:
                self._head = data[pos:]
                return None
            else:
                high, low, kind, flags, stream = _HEADER.unpack_from(data, pos)
                start = pos
                pos += 9
            length = (high << 16) | low
            if length > maxFrameSize:
                return Violation(
                    FRAME_SIZE_ERROR, f"frame of {length} bytes over the limit of {maxFrameSize}"
                )
            if requests is not None:
                # HEADERS, END_HEADERS (and END_STREAM or not), no other flag,
                # a new client stream, the whole frame in this read.
                opens = stream & 0x7FFFFFFF
                if (
                    kind == HEADERS
                    and flags | _END_STREAM == _END_HEADERS | _END_STREAM
                    and opens & 1
                    and opens > self._lastStream
                    and length <= size - pos
                ):
                    requests.append((pos, pos + length, opens, flags == _END_HEADERS | _END_STREAM))
                else:
                    requests = None
            if kind > CONTINUATION:
                violation = self.spend(EXTENSION_FRAMES, now)
            elif kind == DATA:
                violation = None
                if not flags & _END_STREAM and (
                    not length
                    # RFC 9113 6.1: padding only (its length byte, then
                    # that many bytes) is no data either; the length byte
                    # is read when it came with the frame header.
                    or (flags & _PADDED and pos < size and length == 1 + data[pos])
                ):
                    violation = self.spend(EMPTY_DATA, now)
            elif kind == HEADERS or kind == CONTINUATION:
                violation = None
                if kind == HEADERS:
                    stream &= 0x7FFFFFFF
                    self._blockNew = stream & 1 == 1 and stream > self._lastStream
                    if self._blockNew:
                        self._lastStream = stream
                if flags & _END_HEADERS:
                    self._block = False
                    if self._blockNew:
                        self._blockNew = False
                        opened += 1
                        if opened % self.batch == 0:
                            self._cut(pos + length, size)
                else:
                    self._block = True
            elif kind == PRIORITY:
                violation = self.spend(PRIORITY_FRAMES, now)
            elif kind == RST_STREAM:
                self.resets += 1
                violation = self.spend(RESETS, now)
            elif kind == SETTINGS:
                violation = None if flags & _ACK else self.spend(SETTINGS_FRAMES, now)
            elif kind == PING:
                violation = None if flags & _ACK else self.spend(PING_FRAMES, now)
            else:
                violation = None
                if kind == GOAWAY:
                    self._cut(start, size)
                    self._cut(pos + length, size)
            if violation is not None:
                return violation
            if length > size - pos:
                self._left = length - (size - pos)
                self._type = kind
                return None
            pos += length
            if not self.started:
                self.started = True
        if requests:
            self.requests = requests
        return None
