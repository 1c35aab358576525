"""
Tests for L{edgeproxy.cache.conditional}: a client's preconditions against
a stored response (RFC 9110 13.2.2), the 304 it then gets, the validating
request, and the merge of a 304 into the stored response (RFC 9111 3.2).
"""

from __future__ import annotations

import pytest

from edgeproxy.cache.conditional import (
    evaluate,
    ifRangeAllows,
    merge,
    notModified,
    validating,
)
from edgeproxy.cache.directives import formatHTTPDate
from edgeproxy.cache.entry import Entry
from edgeproxy.cache.freshness import Policy, Rules
from edgeproxy.h1.fields import Fields

NOW = 1_700_000_000.0
LM = formatHTTPDate(NOW - 3600)
BEFORE = formatHTTPDate(NOW - 7200)
AFTER = formatHTTPDate(NOW - 60)

STORED = Fields([(b"etag", b'"v1"'), (b"last-modified", LM), (b"content-type", b"text/plain")])


def entry(fields: Fields = STORED, **changes: object) -> Entry:
    made = Entry(
        key=b"https://a.example/x", url=b"https://a.example/x", status=200, reason=b"OK", fields=fields,
        length=5, responseTime=NOW, initialAge=0.0, policy=Policy(60.0), body=b"hello",
    )
    return made._replace(**changes)


def F(*pairs: tuple[bytes, bytes]) -> Fields:
    return Fields(pairs)


@pytest.mark.parametrize(
    "method, request_, expected",
    [
        (b"GET", F(), None),
        (b"GET", F((b"if-none-match", b'"v1"')), 304),
        (b"GET", F((b"if-none-match", b'W/"v1"')), 304),
        (b"GET", F((b"if-none-match", b'"v0", "v1"')), 304),
        (b"GET", F((b"if-none-match", b"*")), 304),
        (b"HEAD", F((b"if-none-match", b'"v1"')), 304),
        (b"GET", F((b"if-none-match", b'"v2"')), None),
        # If-None-Match present: If-Modified-Since is ignored (RFC 9110 13.2.2).
        (b"GET", F((b"if-none-match", b'"v2"'), (b"if-modified-since", AFTER)), None),
        (b"GET", F((b"if-modified-since", AFTER)), 304),
        (b"GET", F((b"if-modified-since", LM)), 304),
        (b"GET", F((b"if-modified-since", BEFORE)), None),
        (b"GET", F((b"if-modified-since", b"garbage")), None),
        (b"GET", F((b"if-match", b'"v1"')), None),
        (b"GET", F((b"if-match", b'"v2"')), 412),
        # If-Match is strong: a weak tag never matches.
        (b"GET", F((b"if-match", b'W/"v1"')), 412),
        (b"GET", F((b"if-match", b"*")), None),
        (b"GET", F((b"if-unmodified-since", AFTER)), None),
        (b"GET", F((b"if-unmodified-since", BEFORE)), 412),
        # If-Match present: If-Unmodified-Since is ignored.
        (b"GET", F((b"if-match", b'"v1"'), (b"if-unmodified-since", BEFORE)), None),
        # 412 comes before 304.
        (b"GET", F((b"if-match", b'"v2"'), (b"if-none-match", b'"v1"')), 412),
    ],
)
def test_evaluate(method: bytes, request_: Fields, expected: int | None) -> None:
    assert evaluate(method, request_, STORED) == expected


def test_evaluateWithoutValidators() -> None:
    assert evaluate(b"GET", F((b"if-none-match", b'"v1"')), F()) is None
    assert evaluate(b"GET", F((b"if-modified-since", AFTER)), F()) is None
    assert evaluate(b"GET", F((b"if-match", b'"v1"')), F()) == 412


def test_notModifiedKeepsWhatA304Carries() -> None:
    fields = F(
        (b"etag", b'"v1"'), (b"cache-control", b"max-age=60"), (b"content-type", b"text/plain"),
        (b"content-language", b"en"), (b"vary", b"accept"), (b"date", AFTER), (b"age", b"3"),
    )
    assert list(notModified(fields)) == [b"etag", b"cache-control", b"vary", b"date", b"age"]


def test_validatingReplacesTheClientsConditionals() -> None:
    request_ = F(
        (b"host", b"a.example"), (b"if-none-match", b'"mine"'), (b"if-match", b'"x"'), (b"range", b"bytes=0-1"),
        (b"if-range", b'"v1"'), (b"accept", b"*/*"),
    )
    fields = validating(request_, entry())
    assert fields.getAll(b"if-none-match") == [b'"v1"']
    assert fields.getAll(b"if-modified-since") == [LM]
    assert b"if-match" not in fields and b"range" not in fields and b"if-range" not in fields
    assert fields.get(b"accept") == b"*/*"


def test_validatingWithoutValidators() -> None:
    fields = validating(F((b"if-none-match", b'"mine"')), entry(fields=F()))
    assert b"if-none-match" not in fields and b"if-modified-since" not in fields


def test_mergeUpdatesFieldsAndFreshness() -> None:
    stored = entry(fields=F((b"etag", b'"v1"'), (b"cache-control", b"max-age=60"), (b"x-a", b"old"),
                            (b"content-length", b"5"), (b"date", formatHTTPDate(NOW))))
    notModified304 = F((b"cache-control", b"max-age=600"), (b"x-a", b"new"), (b"content-length", b"0"),
                       (b"date", formatHTTPDate(NOW + 100)))
    merged = merge(stored, notModified304, NOW + 99, NOW + 100, Rules(), None, None)
    assert merged.fields.get(b"x-a") == b"new"
    assert merged.fields.get(b"cache-control") == b"max-age=600"
    # RFC 9111 3.2: never the stored body's own Content-Length.
    assert merged.fields.get(b"content-length") == b"5"
    assert merged.policy.lifetime == 600.0
    assert merged.responseTime == NOW + 100
    assert merged.initialAge == 1.0
    assert merged.body == b"hello"


def test_mergeWithoutDateDatesItNow() -> None:
    merged = merge(entry(), F((b"cache-control", b"max-age=5")), NOW, NOW + 10, Rules(), None, None)
    assert merged.fields.get(b"date") == formatHTTPDate(NOW + 10)


def test_mergeTargetedAndTags() -> None:
    stored = entry(targeted=(b"max-age=30",), tags=(b"a",))
    kept = merge(stored, F((b"cache-control", b"max-age=5")), NOW, NOW, Rules(), None, None)
    assert kept.policy.lifetime == 30.0 and kept.tags == (b"a",)
    replaced = merge(stored, F(), NOW, NOW, Rules(), (b"max-age=90",), (b"b", b"c"))
    assert replaced.policy.lifetime == 90.0 and replaced.tags == (b"b", b"c")


@pytest.mark.parametrize(
    "ifRange, allows",
    [
        (None, True),
        (b'"v1"', True),
        (b'"v2"', False),
        (b'W/"v1"', False),
        (LM, True),
        (AFTER, False),
    ],
)
def test_ifRange(ifRange: bytes | None, allows: bool) -> None:
    request_ = F() if ifRange is None else F((b"if-range", ifRange))
    assert ifRangeAllows(request_, entry()) is allows
