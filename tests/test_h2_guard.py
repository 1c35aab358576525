"""
Tests for L{edgeproxy.http.h2.guard}: frame headers looked at before the
library buffers the frame.
"""

from __future__ import annotations

from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.http.h2.guard import (
    BUDGETS,
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    PREFACE,
    RESETS,
    FrameGuard,
)


def guard(maxFrameSize: int = 16384, batch: int = 100) -> FrameGuard:
    g = FrameGuard(maxFrameSize, batch)
    assert g.scan(PREFACE + SettingsFrame(0).serialize(), 0.0) is None
    assert g.started and not g.incomplete
    return g


def headers(stream: int, end: bool = True) -> bytes:
    return HeadersFrame(stream, data=b"\x82", flags=["END_HEADERS", "END_STREAM"] if end else []).serialize()


def test_frameSizeAtTheHeader() -> None:
    """Nine bytes announcing a frame over the limit are enough."""
    g = guard()
    header = (16385).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    violation = g.scan(header, 0.0)
    assert violation is not None and violation.code == FRAME_SIZE_ERROR


def test_frameAtTheLimit() -> None:
    g = guard()
    assert g.scan(DataFrame(1, data=b"x" * 16384).serialize(), 0.0) is None


def test_headerSplitAnywhere() -> None:
    """A frame header cut across reads is read whole."""
    data = DataFrame(1, data=b"x" * 10).serialize() + (20000).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    for cut in range(len(data)):
        g = guard()
        first = g.scan(data[:cut], 0.0)
        assert first is None
        second = g.scan(data[cut:], 0.0)
        assert second is not None and second.code == FRAME_SIZE_ERROR


def test_incompleteWhileAFrameArrives() -> None:
    g = guard()
    frame = HeadersFrame(1, data=b"\x82" * 20, flags=["END_HEADERS"]).serialize()
    g.scan(frame[:5], 0.0)
    assert g.incomplete
    g.scan(frame[5:12], 0.0)
    assert g.incomplete
    g.scan(frame[12:], 0.0)
    assert not g.incomplete


def test_dataPayloadIsNotIncomplete() -> None:
    """A DATA payload on its way is the body's business (its idle timeout)."""
    g = guard()
    frame = DataFrame(1, data=b"x" * 100).serialize()
    g.scan(frame[:50], 0.0)
    assert not g.incomplete


def test_headerBlockAwaitingContinuation() -> None:
    g = guard()
    g.scan(headers(1, end=False), 0.0)
    assert g.incomplete


def test_preface() -> None:
    g = FrameGuard(16384, 100)
    g.scan(PREFACE[:10], 0.0)
    assert g.incomplete and not g.started
    g.scan(PREFACE[10:] + SettingsFrame(0).serialize()[:4], 0.0)
    assert not g.started
    g.scan(SettingsFrame(0).serialize()[4:], 0.0)
    assert g.started and not g.incomplete


FLOODS = [
    ("empty DATA", DataFrame(1).serialize()),
    ("PRIORITY", PriorityFrame(3, depends_on=1).serialize()),
    ("SETTINGS", SettingsFrame(0).serialize()),
    ("PING", PingFrame(0, opaque_data=b"12345678").serialize()),
    ("RST_STREAM", RstStreamFrame(1, error_code=8).serialize()),
    ("extension", b"\x00\x00\x00\xfa\x00\x00\x00\x00\x00"),
]


def test_floods() -> None:
    for name, frame in FLOODS:
        g = guard()
        violation = g.scan(frame * 3000, 0.0)
        assert violation is not None and violation.code == ENHANCE_YOUR_CALM, name
        assert name in violation.why


def test_paddedEmptyDataIsEmpty() -> None:
    """
    A DATA frame whose payload is all padding (its pad length byte, then
    that many bytes) carries no data: it spends the empty DATA budget as
    a frame of length 0 does.  One with a byte of data does not.
    """
    for padding in (0, 1, 200):
        g = guard()
        frame = DataFrame(1, data=b"", pad_length=padding, flags=["PADDED"]).serialize()
        assert frame[9] == padding and len(frame) == 9 + 1 + padding
        violation = g.scan(frame * 2000, 0.0)
        assert violation is not None and violation.code == ENHANCE_YOUR_CALM, padding
        assert "empty DATA" in violation.why
    g = guard()
    carrying = DataFrame(1, data=b"x", pad_length=0, flags=["PADDED"]).serialize()
    assert g.scan(carrying * 2000, 0.0) is None


def test_paddedEmptyDataSplitAfterItsPadLength() -> None:
    """The pad length byte read in the frame header's read is enough."""
    g = guard()
    frame = DataFrame(1, data=b"", pad_length=10, flags=["PADDED"]).serialize()
    spent = []
    for _ in range(200):
        spent.append(g.scan(frame[:10], 0.0))
        spent.append(g.scan(frame[10:], 0.0))
    assert any(v is not None and v.code == ENHANCE_YOUR_CALM for v in spent)


def test_floodBudgetsRefill() -> None:
    """A steady, modest rate is never cut."""
    g = guard()
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    for second in range(1000):
        assert g.scan(ping * 5, float(second)) is None


def test_acksAndUsefulFramesAreFree() -> None:
    g = guard()
    frames = (
        SettingsFrame(0, flags=["ACK"]).serialize()
        + PingFrame(0, flags=["ACK"], opaque_data=b"12345678").serialize()
        + DataFrame(1, data=b"x").serialize()
        + DataFrame(1, flags=["END_STREAM"]).serialize()
        + WindowUpdateFrame(0, window_increment=1).serialize()
    )
    assert g.scan(frames * 10000, 0.0) is None


def test_resetsCreditedByAnswers() -> None:
    g = guard()
    for _ in range(int(BUDGETS[RESETS].burst) * 3):
        g.credit(RESETS)
        assert g.spend(RESETS, 0.0) is None


def test_cutsAfterEachBatchOfNewStreams() -> None:
    g = guard(batch=3)
    frames = [headers(stream) for stream in range(1, 20, 2)]
    data = b"".join(frames)
    assert g.scan(data, 0.0) is None
    size = len(frames[0])
    assert g.cuts == [3 * size, 6 * size, 9 * size]


def test_goAwayReadAlone() -> None:
    """
    A GOAWAY is cut out of its read (before and after it), however the
    read is split, so that the library reads it alone (a read ending in
    the first bytes of its header gives the library none of its frames).
    """
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    goaway = GoAwayFrame(0, last_stream_id=0, error_code=0, additional_data=b"bye").serialize()
    data = ping + goaway + ping
    g = guard()
    assert g.scan(data, 0.0) is None
    assert g.cuts == [len(ping), len(ping) + len(goaway)]
    for split in range(len(ping) + 1, len(ping) + len(goaway)):
        g = guard()
        g.scan(data[:split], 0.0)
        assert g.cuts == (None if split < len(ping) + 9 else [len(ping)])
        g.scan(data[split:], 0.0)
        assert g.cuts == [len(ping) + len(goaway) - split]
    g = guard()
    g.scan(goaway, 0.0)
    assert g.cuts is None


def test_noCutForOldStreams() -> None:
    """Trailers on a known stream open nothing."""
    g = guard(batch=1)
    g.scan(headers(5, end=False) + b"", 0.0)
    g = guard(batch=1)
    data = headers(5) + headers(3) + headers(7)
    g.scan(data, 0.0)
    assert g.cuts == [len(headers(5))]


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_anyBytesAnyCut(data: bytes, cut: int) -> None:
    """Whatever the bytes and however they are cut, the same verdict."""
    whole = guard()
    expected = whole.scan(data, 0.0)
    parts = guard()
    first = parts.scan(data[:cut], 0.0)
    second = first or parts.scan(data[cut:], 0.0)
    assert (expected is None) == (second is None)
    if expected is not None:
        assert second is not None and expected.code == second.code
    else:
        assert whole.incomplete == parts.incomplete


def test_requestsAlone() -> None:
    """
    A read of whole HEADERS frames opening new streams: where each header
    block is, its stream, and whether it ends the stream.
    """
    g = guard()
    data = headers(1) + HeadersFrame(3, data=b"\x82\x84", flags=["END_HEADERS"]).serialize()
    assert g.scan(data, 0.0) is None
    assert g.requests == [(9, 10, 1, True), (19, 21, 3, False)]
    assert data[19:21] == b"\x82\x84"
    # The next read may go on with new streams.
    assert g.scan(headers(5), 0.0) is None
    assert g.requests == [(9, 10, 5, True)]


@pytest.mark.parametrize(
    "data",
    [
        # Another frame in the read.
        headers(1) + PingFrame(0).serialize(),
        WindowUpdateFrame(0, window_increment=1).serialize() + headers(1),
        # A frame cut at the end of the read.
        headers(1) + headers(3)[:5],
        headers(1) + headers(3)[:9],
        # Padding, priority, a header block that goes on, an even stream.
        HeadersFrame(1, data=b"\x82", pad_length=2, flags=["END_HEADERS", "PADDED"]).serialize(),
        HeadersFrame(1, data=b"\x82", depends_on=0, stream_weight=16, flags=["END_HEADERS", "PRIORITY"]).serialize(),
        HeadersFrame(1, data=b"\x82", flags=["END_STREAM"]).serialize(),
        headers(2),
        # Not a new stream (trailers, or going back).
        headers(1) + headers(1),
        headers(5) + headers(3),
        # An empty read.
        b"",
    ],
)
def test_notRequestsAlone(data: bytes) -> None:
    g = guard()
    assert g.scan(data, 0.0) is None
    assert g.requests is None


def test_requestsAloneOnlyFromAFrameBoundary() -> None:
    """A read that starts inside a frame, or before the client's first
    frame is in, is left to the library."""
    g = FrameGuard(16384, 100)
    assert g.scan(PREFACE + SettingsFrame(0).serialize() + headers(1), 0.0) is None
    assert g.requests is None
    frame = headers(3)
    assert g.scan(frame[:4], 0.0) is None
    assert g.scan(frame[4:] + headers(5), 0.0) is None
    assert g.requests is None
    data = DataFrame(7, data=b"x" * 10).serialize()
    assert g.scan(headers(7, end=False) + data[:12], 0.0) is None
    assert g.scan(data[12:] + headers(9), 0.0) is None
    assert g.requests is None
    assert g.scan(headers(11), 0.0) is None
    assert g.requests == [(9, 10, 11, True)]
