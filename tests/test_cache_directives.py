"""
Tests for L{edgeproxy.cache.directives}: Cache-Control, targeted fields,
dates, Age and entity tags, read as RFC 9111, 9213, 8941 and 9110 say.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.cache.directives import (
    INVALID,
    MAX_DELTA,
    STAR,
    formatHTTPDate,
    parseAge,
    parseCacheControl,
    parseETags,
    parseHTTPDate,
    parseTargeted,
    strongMatch,
    weakMatch,
)


@pytest.mark.parametrize(
    "values, name, seconds",
    [
        ([b"max-age=60"], b"max-age", 60),
        ([b"Max-Age=60"], b"max-age", 60),
        ([b"public, max-age=60"], b"max-age", 60),
        ([b"max-age=\"60\""], b"max-age", 60),
        ([b"max-age = 60"], b"max-age", 60),
        ([b"max-age=abc"], b"max-age", INVALID),
        ([b"max-age="], b"max-age", INVALID),
        ([b"max-age"], b"max-age", INVALID),
        ([b"max-age=-1"], b"max-age", INVALID),
        ([b"max-age=99999999999999"], b"max-age", MAX_DELTA),
        # RFC 9111 4.2.1: the same directive twice, differently: stale.
        ([b"max-age=60", b"max-age=70"], b"max-age", INVALID),
        ([b"max-age=60, max-age=60"], b"max-age", 60),
        ([b"s-maxage=5"], b"max-age", None),
        ([], b"max-age", None),
        ([b"no-cache"], b"max-age", None),
    ],
)
def test_seconds(values: list[bytes], name: bytes, seconds: object) -> None:
    assert parseCacheControl(values).seconds(name) == seconds


def test_quotedArgumentsKeepTheirCommas() -> None:
    directives = parseCacheControl([b'private="set-cookie, x-a", no-cache, max-age=5'])
    assert directives.argument(b"private") == b"set-cookie, x-a"
    assert b"no-cache" in directives
    assert directives.seconds(b"max-age") == 5


def test_garbageIsSkippedToTheNextComma() -> None:
    directives = parseCacheControl([b"max-age=5 junk junk, no-store, =x, public"])
    assert b"no-store" in directives and b"public" in directives


def test_optionalSeconds() -> None:
    assert parseCacheControl([b"max-stale"]).optionalSeconds(b"max-stale") == MAX_DELTA
    assert parseCacheControl([b"max-stale=5"]).optionalSeconds(b"max-stale") == 5
    assert parseCacheControl([b"no-cache"]).optionalSeconds(b"max-stale") is None


@given(st.lists(st.binary(max_size=40), max_size=4))
def test_neverRaises(values: list[bytes]) -> None:
    parseCacheControl(values)
    parseTargeted(values)
    parseETags(values)
    parseAge(values)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([b"max-age=60"], {b"max-age": b"60"}),
        ([b"max-age=60, no-store"], {b"max-age": b"60", b"no-store": None}),
        ([b"no-store=?0, max-age=5"], {b"max-age": b"5"}),
        ([b"no-store=?1"], {b"no-store": None}),
        ([b"max-age=60;a=1, must-revalidate"], {b"max-age": b"60", b"must-revalidate": None}),
        ([b"max-age=60", b"s-maxage=10"], {b"max-age": b"60", b"s-maxage": b"10"}),
        # Wrong types are kept as unreadable, never as absent.
        ([b'max-age="60"'], {b"max-age": b"invalid"}),
        ([b"max-age=6.5"], {b"max-age": b"invalid"}),
        ([b"max-age=-1"], {b"max-age": b"invalid"}),
    ],
)
def test_targeted(values: list[bytes], expected: dict[bytes, bytes | None]) -> None:
    directives = parseTargeted(values)
    assert directives is not None
    assert directives.values == expected


@pytest.mark.parametrize(
    "values",
    [[], [b""], [b"Max-Age=60"], [b"max-age=60,"], [b"max-age=(1 2)"], [b"max-age 60"], [b"60"]],
)
def test_targetedInvalidIsIgnored(values: list[bytes]) -> None:
    """RFC 9213 2.1: an invalid targeted field is as if absent."""
    assert parseTargeted(values) is None


def test_targetedWrongTypeReadsInvalid() -> None:
    assert parseTargeted([b'max-age="60"']).seconds(b"max-age") is INVALID  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0),
        (b"Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0),
        (b"Sun Nov  6 08:49:37 1994", 784111777.0),
        (b"0", None),
        (b"", None),
        (None, None),
        (b"yesterday", None),
        (b"\xff\xfe", None),
    ],
)
def test_dates(value: bytes | None, expected: float | None) -> None:
    assert parseHTTPDate(value) == expected


def test_formatDateRoundTrips() -> None:
    assert formatHTTPDate(784111777.4) == b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert parseHTTPDate(formatHTTPDate(1700000000)) == 1700000000.0


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], None),
        ([b"0"], 0),
        ([b"12"], 12),
        ([b"12, 13"], 12),
        ([b"12", b"13"], 12),
        # RFC 9111 5.1: not a non-negative integer: not usable (never 0).
        ([b"-1"], INVALID),
        ([b"1.5"], INVALID),
        ([b"abc"], INVALID),
        ([b""], INVALID),
    ],
)
def test_age(values: list[bytes], expected: object) -> None:
    assert parseAge(values) == expected


@pytest.mark.parametrize(
    "values, expected",
    [
        ([b"*"], STAR),
        ([b'"a"'], [b'"a"']),
        ([b'"a", W/"b"'], [b'"a"', b'W/"b"']),
        ([b'"a"', b'"b"'], [b'"a"', b'"b"']),
        ([b"a"], None),
        ([b'"a'], None),
        ([], None),
    ],
)
def test_etags(values: list[bytes], expected: object) -> None:
    assert parseETags(values) == expected


@pytest.mark.parametrize(
    "a, b, weak, strong",
    [
        (b'"1"', b'"1"', True, True),
        (b'W/"1"', b'"1"', True, False),
        (b'W/"1"', b'W/"1"', True, False),
        (b'"1"', b'"2"', False, False),
    ],
)
def test_comparison(a: bytes, b: bytes, weak: bool, strong: bool) -> None:
    """RFC 9110 8.8.3.2's table."""
    assert weakMatch(a, b) is weak
    assert strongMatch(a, b) is strong
