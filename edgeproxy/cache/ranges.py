# -*- test-case-name: tests.test_cache_ranges -*-
"""
Range requests (RFC 9110 14) answered from a complete stored response:
L{parseRange} reads C{Range}, L{plan} says what to send: a C{206} with one
range, a C{206} C{multipart/byteranges} with several (RFC 9110 14.6), or a
C{416} when none is satisfiable.  The body is described as segments of
the stored body (with the bytes that go before each), so that a stored
response on disk is sent from its file without being read whole.

A C{Range} that cannot be read, that is not in bytes, that asks for more
than L{MAX_RANGES} ranges, or whose ranges overlap or go back, is ignored:
the whole response is served (RFC 9110 14.2 allows it, and it defeats
requests made to multiply the work of a small object).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from edgeproxy.h1.fields import Fields

__all__ = ["MAX_RANGES", "UNSATISFIABLE", "RangePlan", "isOneView", "parseRange", "plan", "sliceBody"]

MAX_RANGES = 16

_SPEC = re.compile(rb"[ \t]*(?:([0-9]{1,18})-([0-9]{0,18})|-([0-9]{1,18}))[ \t]*\Z")


class _Unsatisfiable:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSATISFIABLE"


UNSATISFIABLE = _Unsatisfiable()


def parseRange(value: bytes, length: int) -> list[tuple[int, int]] | _Unsatisfiable | None:
    """
    The byte ranges C{value} asks of a body of C{length} bytes, as
    C{(first, last)} inclusive and within the body; L{UNSATISFIABLE} when
    none is (416); L{None} to ignore it and serve the whole body.
    """
    unit, equals, specs = value.partition(b"=")
    if not equals or unit.strip(b" \t").lower() != b"bytes":
        return None
    pieces = specs.split(b",")
    if len(pieces) > MAX_RANGES:
        return None
    ranges: list[tuple[int, int]] = []
    for piece in pieces:
        if not piece.strip(b" \t"):
            continue
        match = _SPEC.match(piece)
        if match is None:
            return None
        first, last, suffix = match.groups()
        if suffix is not None:
            count = int(suffix)
            if count == 0 or length == 0:
                continue
            ranges.append((max(0, length - count), length - 1))
            continue
        start = int(first)
        end = int(last) if last else length - 1
        if last and end < start:
            return None
        if start >= length:
            continue
        ranges.append((start, min(end, length - 1)))
    if not ranges:
        return UNSATISFIABLE
    for (_, previousLast), (nextFirst, _) in zip(ranges, ranges[1:]):
        if nextFirst <= previousLast:
            return None
    return ranges


class RangePlan(NamedTuple):
    """What to send for a range request."""

    status: int
    fields: Fields
    length: int
    segments: tuple[tuple[bytes, int, int], ...]
    """Each: the bytes sent first, then C{count} bytes of the body from
    C{start}: C{(prefix, start, count)}."""
    trailer: bytes


def plan(
    ranges: list[tuple[int, int]] | _Unsatisfiable,
    fields: Fields,
    length: int,
    boundary: bytes | None = None,
) -> RangePlan:
    """
    The answer to C{ranges} of a stored response with C{fields} and a body
    of C{length} bytes.
    """
    raw = {
        name: values
        for name, values in fields.raw().items()
        if name not in (b"content-length", b"content-range")
    }
    if isinstance(ranges, _Unsatisfiable):
        raw.pop(b"content-type", None)
        raw[b"content-range"] = [b"bytes */%d" % (length,)]
        return RangePlan(416, Fields.trusted(raw), 0, (), b"")
    if len(ranges) == 1:
        first, last = ranges[0]
        raw[b"content-range"] = [b"bytes %d-%d/%d" % (first, last, length)]
        return RangePlan(206, Fields.trusted(raw), last - first + 1, ((b"", first, last - first + 1),), b"")
    if boundary is None:
        boundary = os.urandom(12).hex().encode("ascii")
    contentType = raw.pop(b"content-type", None)
    partType = b"Content-Type: " + contentType[0] + b"\r\n" if contentType else b""
    segments = []
    total = 0
    for index, (first, last) in enumerate(ranges):
        head = (
            (b"\r\n" if index else b"")
            + b"--" + boundary + b"\r\n"
            + partType
            + b"Content-Range: bytes %d-%d/%d\r\n\r\n" % (first, last, length)
        )
        count = last - first + 1
        segments.append((head, first, count))
        total += len(head) + count
    trailer = b"\r\n--" + boundary + b"--\r\n"
    total += len(trailer)
    raw[b"content-type"] = [b"multipart/byteranges; boundary=" + boundary]
    return RangePlan(206, Fields.trusted(raw), total, tuple(segments), trailer)


def isOneView(rangePlan: RangePlan) -> bool:
    """Whether L{sliceBody} gives a view of the body for C{rangePlan} (one
    range, nothing around it)."""
    segments = rangePlan.segments
    return len(segments) == 1 and not rangePlan.trailer and not segments[0][0]


def sliceBody(body: bytes, rangePlan: RangePlan) -> bytes | memoryview:
    """
    The body of C{rangePlan} cut from a body held in memory: for one range a
    view of C{body} (a stored body is sent from the store's own bytes, not
    copied); else new bytes.
    """
    if isOneView(rangePlan):
        _, start, count = rangePlan.segments[0]
        return memoryview(body)[start : start + count]
    return b"".join(prefix + body[start : start + count] for prefix, start, count in rangePlan.segments) + (
        rangePlan.trailer
    )
