# -*- test-case-name: tests.test_cache_conditional -*-
"""
Conditional requests around stored responses, as pure functions:

  - L{evaluate}: a client's own preconditions (RFC 9110 13.2.2: C{If-Match},
    C{If-Unmodified-Since}, C{If-None-Match}, C{If-Modified-Since}) against
    a stored response: C{304}, C{412}, or serve it;
  - L{notModified}: the C{304} the client then gets (RFC 9110 15.4.5);
  - L{validating}: the request that validates a stored response with its
    origin (RFC 9111 4.3.1): the client's conditionals and C{Range} out, the
    stored C{ETag} and C{Last-Modified} in;
  - L{merge}: the stored response freshened by the C{304} that validated
    it (RFC 9111 3.2 and 4.3.4);
  - L{ifRangeAllows}: whether C{If-Range} lets a range be served (RFC
    9110 13.1.5).
"""

from __future__ import annotations

from edgeproxy.cache.directives import (
    STAR,
    formatHTTPDate,
    parseETags,
    parseHTTPDate,
    strongMatch,
    weakMatch,
)
from edgeproxy.cache.entry import Entry
from edgeproxy.cache.freshness import Rules, initialAge, responsePolicy
from edgeproxy.h1.fields import Fields

__all__ = [
    "CLIENT_CONDITIONALS",
    "NOT_MODIFIED_FIELDS",
    "evaluate",
    "hasConditionals",
    "ifRangeAllows",
    "merge",
    "notModified",
    "validating",
]

CLIENT_CONDITIONALS = (
    b"if-match",
    b"if-none-match",
    b"if-modified-since",
    b"if-unmodified-since",
    b"if-range",
)

NOT_MODIFIED_FIELDS = frozenset(
    (b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified",
     b"cache-status", b"age")
)
"""What a 304 carries of the stored response (RFC 9110 15.4.5)."""

NOT_MERGED = frozenset(
    (b"content-length", b"content-encoding", b"content-range", b"transfer-encoding", b"content-type")
)
"""Fields of a 304 that never replace the stored ones: the stored body's
own framing and encoding (RFC 9111 3.2)."""


def hasConditionals(fields: Fields) -> bool:
    raw = fields.raw()
    return any(name in raw for name in CLIENT_CONDITIONALS)


def evaluate(method: bytes, fields: Fields, stored: Fields) -> int | None:
    """
    RFC 9110 13.2.2: the status the client's preconditions (in C{fields})
    call for against a response with the fields C{stored} (C{304} or
    C{412}), or L{None} to serve it.
    """
    etag = stored.get(b"etag")
    lastModified = parseHTTPDate(stored.get(b"last-modified"))
    ifMatch = fields.getAll(b"if-match")
    if ifMatch:
        tags = parseETags(ifMatch)
        if tags is not STAR and tags is not None:
            if etag is None or not any(strongMatch(tag, etag) for tag in tags):  # type: ignore[union-attr]
                return 412
    else:
        since = parseHTTPDate(fields.get(b"if-unmodified-since"))
        if since is not None and lastModified is not None and lastModified > since:
            return 412
    ifNoneMatch = fields.getAll(b"if-none-match")
    if ifNoneMatch:
        tags = parseETags(ifNoneMatch)
        matched = tags is STAR or (
            tags is not None and etag is not None and any(weakMatch(tag, etag) for tag in tags)  # type: ignore[union-attr]
        )
        if matched:
            return 304 if method in (b"GET", b"HEAD") else 412
        return None
    if method in (b"GET", b"HEAD"):
        since = parseHTTPDate(fields.get(b"if-modified-since"))
        if since is not None and lastModified is not None and lastModified <= since:
            return 304
    return None


def notModified(fields: Fields) -> Fields:
    """The fields of the C{304} answering from a stored response's C{fields}."""
    raw = fields.raw()
    return Fields.trusted({name: values for name, values in raw.items() if name in NOT_MODIFIED_FIELDS})


def validating(fields: Fields, entry: Entry) -> Fields:
    """
    The request fields that validate C{entry}: the client's own
    conditionals and C{Range} removed (the stored response answers them
    afterwards), the stored validators added.
    """
    raw = {
        name: values
        for name, values in fields.raw().items()
        if name not in CLIENT_CONDITIONALS and name != b"range"
    }
    etag = entry.fields.get(b"etag")
    if etag is not None:
        raw[b"if-none-match"] = [etag]
    lastModified = entry.fields.get(b"last-modified")
    if lastModified is not None:
        raw[b"if-modified-since"] = [lastModified]
    return Fields.trusted(raw)


def merge(
    entry: Entry,
    fields: Fields,
    requestTime: float,
    responseTime: float,
    rules: Rules,
    targeted: tuple[bytes, ...] | None,
    tags: tuple[bytes, ...] | None,
) -> Entry:
    """
    C{entry} freshened by the C{304} whose C{fields} validated it (RFC
    9111 3.2): each field it carries replaces the stored ones of that name
    (but L{NOT_MERGED}), and the age and lifetime start again from it.

    @param fields: the 304's fields, without the targeted field and the
        tag fields (given apart: L{None} when it had none, and then the
        stored ones stay).
    """
    raw = dict(entry.fields.raw())
    for name, values in fields.raw().items():
        if name in NOT_MERGED or name == b"cache-status":
            continue
        raw[name] = list(values)
    if parseHTTPDate(fields.get(b"date")) is None:
        # RFC 9110 6.6.1: a message without a (valid) Date gets the time
        # it was received; the stored one is older than this validation.
        raw[b"date"] = [formatHTTPDate(responseTime)]
    merged = Fields.trusted(raw)
    newTargeted = entry.targeted if targeted is None else targeted
    policyFields = merged
    if newTargeted and rules.targetedField:
        policyFields = merged.withField(rules.targetedField, *newTargeted)
    return entry._replace(
        fields=merged,
        responseTime=responseTime,
        initialAge=initialAge(fields, requestTime, responseTime),
        policy=responsePolicy(policyFields, entry.status, rules, responseTime),
        targeted=newTargeted,
        tags=entry.tags if tags is None else tags,
    )


def ifRangeAllows(fields: Fields, entry: Entry) -> bool:
    """
    RFC 9110 13.1.5: whether a C{Range} may be served given the request's
    C{If-Range} (no C{If-Range}: yes).  An entity tag must match strongly;
    a date must be the stored C{Last-Modified} exactly.
    """
    value = fields.get(b"if-range")
    if value is None:
        return True
    value = value.strip(b" \t")
    if value.startswith(b'"') or value.startswith(b"W/"):
        etag = entry.fields.get(b"etag")
        return etag is not None and strongMatch(value, etag)
    since = parseHTTPDate(value)
    lastModified = parseHTTPDate(entry.fields.get(b"last-modified"))
    return since is not None and lastModified is not None and since == lastModified
