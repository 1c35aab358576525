"""
Tests for L{edgeproxy.config.units}: the one duration and size syntax of
C{edge.ini}.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.config.units import formatDuration, formatSize, parseDuration, parseSize


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("5s", 5.0),
        ("250ms", 0.25),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("14d", 14 * 86400.0),
        ("1h30m", 5400.0),
        ("1d12h", 129600.0),
        ("1m30s500ms", 90.5),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("250 ms", 0.25),
        ("  10s  ", 10.0),
        ("30", 30.0),
        ("0.1", 0.1),
        ("0", 0.0),
        ("0s", 0.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parseDuration(text) == seconds


@pytest.mark.parametrize(
    "text, hint",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("-5s", "negative"),
        ("-1", "negative"),
        ("5x", "unknown unit 'x'"),
        ("5S", "unknown unit 'S'"),
        ("5sec", "unknown unit 'sec'"),
        ("5 minutes", "unknown unit 'minutes'"),
        ("5s1m", "largest first"),
        ("1m1m", "largest first"),
        ("nan", "got 'nan'"),
        ("inf", "got 'inf'"),
        ("1e3", "unknown unit 'e'"),
        ("s", "got 's'"),
        ("5s junk", "got '5s junk'"),
        ("1,5s", "got '1,5s'"),
    ],
)
def test_badDurations(text: str, hint: str) -> None:
    with pytest.raises(ValueError) as raised:
        parseDuration(text)
    message = str(raised.value)
    assert "expected a duration such as 250ms, 5s" in message
    assert hint in message


@pytest.mark.parametrize(
    "text, size",
    [
        ("512", 512),
        ("0", 0),
        ("512B", 512),
        ("512 b", 512),
        ("64KiB", 65536),
        ("64kib", 65536),
        ("10MiB", 10 * 1024 * 1024),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("1.5MiB", 1536 * 1024),
        ("0.5KiB", 512),
        (" 16 KiB ", 16384),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parseSize(text) == size


@pytest.mark.parametrize(
    "text, hint",
    [
        ("", "empty"),
        ("-1", "negative"),
        ("-1KiB", "negative"),
        ("64KB", "'KB' is ambiguous"),
        ("64kb", "'kb' is ambiguous"),
        ("10M", "'M' is ambiguous"),
        ("1G", "'G' is ambiguous"),
        ("1k", "'k' is ambiguous"),
        ("0.1KiB", "not a whole number of bytes"),
        ("1.5", "not a whole number of bytes"),
        ("10 bytes", "unknown unit 'bytes'"),
        ("1PiB", "unknown unit 'PiB'"),
        ("lots", "got 'lots'"),
        ("1e6", "got '1e6'"),
    ],
)
def test_badSizes(text: str, hint: str) -> None:
    with pytest.raises(ValueError) as raised:
        parseSize(text)
    message = str(raised.value)
    assert "expected a size such as 512 (bytes), 64KiB" in message
    assert hint in message


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (0.25, "250ms"), (90, "1m30s"), (5400, "1h30m"), (14 * 86400, "14d"), (1.5, "1s500ms")],
)
def test_formatDuration(seconds: float, text: str) -> None:
    assert formatDuration(seconds) == text


@pytest.mark.parametrize(
    "size, text", [(0, "0"), (512, "512"), (1000, "1000"), (65536, "64KiB"), (1536 * 1024, "1536KiB"), (1024**3, "1GiB")]
)
def test_formatSize(size: int, text: str) -> None:
    assert formatSize(size) == text


def test_formatRejectsNegatives() -> None:
    with pytest.raises(ValueError):
        formatDuration(-1)
    with pytest.raises(ValueError):
        formatSize(-1)


@given(st.integers(min_value=0, max_value=10**15))
def test_sizeRoundTrip(size: int) -> None:
    assert parseSize(formatSize(size)) == size


@given(st.integers(min_value=0, max_value=10**12))
def test_millisecondDurationRoundTrip(milliseconds: int) -> None:
    seconds = milliseconds / 1000
    assert parseDuration(formatDuration(seconds)) == seconds


@given(st.floats(min_value=0, max_value=10**9, allow_nan=False, allow_infinity=False))
def test_anyDurationRoundTrip(seconds: float) -> None:
    assert parseDuration(formatDuration(seconds)) == seconds


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from([("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3), ("B", 1), ("", 1)]),
)
def test_sizeUnits(number: int, unit: tuple[str, int]) -> None:
    name, factor = unit
    assert parseSize(f"{number}{name}") == number * factor


@given(st.text(max_size=12))
def test_garbageNeverCrashes(text: str) -> None:
    """Anything either parses or raises ValueError with the expected form."""
    for parser in (parseDuration, parseSize):
        try:
            value = parser(text)
        except ValueError as e:
            assert "expected a" in str(e)
        else:
            assert value >= 0
