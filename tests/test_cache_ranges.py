"""
Tests for L{edgeproxy.cache.ranges}: byte ranges from a stored response
(RFC 9110 14): one range, several (multipart/byteranges), none
satisfiable (416), and the requests that are better ignored.
"""

from __future__ import annotations

import pytest

from edgeproxy.cache.bodies import SliceBody
from edgeproxy.cache.ranges import (
    MAX_RANGES,
    UNSATISFIABLE,
    parseRange,
    plan,
    sliceBody,
)
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.values import BODY_DONE


@pytest.mark.parametrize(
    "value, length, expected",
    [
        (b"bytes=0-4", 10, [(0, 4)]),
        (b"bytes=5-", 10, [(5, 9)]),
        (b"bytes=-3", 10, [(7, 9)]),
        (b"bytes=-30", 10, [(0, 9)]),
        (b"bytes=8-100", 10, [(8, 9)]),
        (b"Bytes = 0-0", 10, [(0, 0)]),
        (b"BYTES=0-0", 10, [(0, 0)]),
        (b"bytes=0-1, 4-5", 10, [(0, 1), (4, 5)]),
        (b"bytes= 0-1 ,4-5", 10, [(0, 1), (4, 5)]),
        # Nothing satisfiable: 416.
        (b"bytes=10-", 10, UNSATISFIABLE),
        (b"bytes=-0", 10, UNSATISFIABLE),
        (b"bytes=0-", 0, UNSATISFIABLE),
        # Unsatisfiable members are dropped when others are satisfiable.
        (b"bytes=0-1, 20-30", 10, [(0, 1)]),
        # Ignored: another unit, garbage, backwards, overlapping, too many.
        (b"items=0-1", 10, None),
        (b"bytes=a-b", 10, None),
        (b"bytes=5-2", 10, None),
        (b"bytes=0-5, 3-8", 10, None),
        (b"bytes=4-5, 0-1", 10, None),
        (b"bytes=" + b",".join(b"%d-%d" % (i, i) for i in range(MAX_RANGES + 1)), 100, None),
    ],
)
def test_parse(value: bytes, length: int, expected: object) -> None:
    assert parseRange(value, length) == expected


STORED = Fields([(b"content-type", b"text/plain"), (b"etag", b'"a"')])
BODY = b"0123456789"


def test_oneRange() -> None:
    answer = plan([(2, 5)], STORED, 10)
    assert answer.status == 206
    assert answer.fields.get(b"content-range") == b"bytes 2-5/10"
    assert answer.fields.get(b"content-type") == b"text/plain"
    assert answer.length == 4
    assert sliceBody(BODY, answer) == b"2345"


def test_severalRanges() -> None:
    answer = plan([(0, 1), (8, 9)], STORED, 10, boundary=b"B")
    assert answer.status == 206
    assert answer.fields.get(b"content-type") == b"multipart/byteranges; boundary=B"
    body = sliceBody(BODY, answer)
    assert body == (
        b"--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/10\r\n\r\n01"
        b"\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 8-9/10\r\n\r\n89"
        b"\r\n--B--\r\n"
    )
    assert answer.length == len(body)


def test_unsatisfiable() -> None:
    answer = plan(UNSATISFIABLE, STORED, 10)  # type: ignore[arg-type]
    assert answer.status == 416
    assert answer.fields.get(b"content-range") == b"bytes */10"
    assert answer.length == 0 and sliceBody(BODY, answer) == b""


def test_oneRangeIsAViewOfTheStoredBody() -> None:
    """One range is sent from the stored bytes themselves, not a copy."""
    answer = plan([(2, 5)], STORED, 10)
    body = sliceBody(BODY, answer)
    assert isinstance(body, memoryview) and body.obj is BODY
    assert bytes(body) == b"2345"


def test_sliceBodyCutWhenTaken() -> None:
    """
    The cache's body for a range of a stored body held in memory: the
    client side takes it whole (one range as a view of the stored bytes);
    a body's protocol is given bytes.
    """
    one = SliceBody(BODY, plan([(2, 5)], STORED, 10))
    taken = one.takeBody()
    assert isinstance(taken, memoryview) and taken.obj is BODY
    several = SliceBody(BODY, plan([(0, 1), (8, 9)], STORED, 10, boundary=b"B"))
    assert several.takeBody() == sliceBody(BODY, plan([(0, 1), (8, 9)], STORED, 10, boundary=b"B"))

    class Protocol:
        def __init__(self) -> None:
            self.data: list[object] = []
            self.reason: object = None

        def makeConnection(self, transport: object) -> None:
            pass

        def dataReceived(self, data: object) -> None:
            self.data.append(data)

        def connectionLost(self, reason: object) -> None:
            self.reason = reason

    protocol = Protocol()
    one.deliverBody(protocol)
    assert protocol.data == [b"2345"] and type(protocol.data[0]) is bytes
    assert protocol.reason is BODY_DONE
