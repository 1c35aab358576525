# -*- test-case-name: tests.test_cache_directives -*-
"""
Reading the fields the cache decides on: C{Cache-Control} (RFC 9111 5.2),
a targeted cache-control field such as C{CDN-Cache-Control} (RFC 9213, a
structured dictionary, RFC 8941 3.2), HTTP dates (RFC 9110 5.6.7), C{Age}
(RFC 9111 5.1) and entity tags (RFC 9110 8.8.3).

Pure functions over bytes; nothing here knows what a cache does with the
values.  A value that cannot be read is never taken for a harmless one: a
malformed or repeated-and-conflicting lifetime reads as L{INVALID}, which
the freshness rules treat as "stale" (RFC 9111 4.2.1), never as zero or
absent.
"""

from __future__ import annotations

import calendar
import email.utils
import re
from collections.abc import Sequence
from typing import Final

__all__ = [
    "INVALID",
    "MAX_DELTA",
    "STAR",
    "Directives",
    "formatHTTPDate",
    "parseAge",
    "parseCacheControl",
    "parseETags",
    "parseHTTPDate",
    "parseTargeted",
    "strongMatch",
    "weakMatch",
]


class _Invalid:
    """A directive or field whose value cannot be used (see the module)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()

MAX_DELTA = 2147483648
"""RFC 9111 1.2.2: a delta-seconds too large to represent is this."""

# RFC 9111 5.2: cache-directive = token [ "=" ( token / quoted-string ) ]
_DIRECTIVE = re.compile(
    rb"""[ \t]*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)[ \t]*"""
    rb"""(?:=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([!#$%&'*+\-.^_`|~0-9A-Za-z]*)))?[ \t]*(,|\Z)"""
)
_DIGITS = re.compile(rb"[0-9]+\Z")
_UNQUOTE = re.compile(rb"\\(.)")


class Directives:
    """
    The directives of one message's cache-control field(s): lower-case
    name to its argument (L{None} when it has none).

    @ivar values: name -> argument.
    @ivar conflicting: names given twice with different arguments (their
        lifetime reads as L{INVALID}).
    """

    __slots__ = ("conflicting", "values")

    def __init__(self, values: dict[bytes, bytes | None], conflicting: frozenset[bytes] = frozenset()) -> None:
        self.values = values
        self.conflicting = conflicting

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def __bool__(self) -> bool:
        return bool(self.values)

    def __repr__(self) -> str:
        return f"Directives({self.values!r})"

    def argument(self, name: bytes) -> bytes | None:
        return self.values.get(name)

    def seconds(self, name: bytes) -> int | _Invalid | None:
        """
        The delta-seconds argument of C{name}: L{None} when absent,
        L{INVALID} when it is not a number (or given twice, differently).
        """
        if name not in self.values:
            return None
        if name in self.conflicting:
            return INVALID
        return _deltaSeconds(self.values[name])

    def optionalSeconds(self, name: bytes) -> int | _Invalid | None:
        """
        For directives whose argument is optional (C{max-stale}): L{None}
        when absent, L{MAX_DELTA} when present without one.
        """
        if name in self.values and self.values[name] is None:
            return MAX_DELTA
        return self.seconds(name)


def _deltaSeconds(argument: bytes | None) -> int | _Invalid:
    if argument is None or not _DIGITS.match(argument):
        return INVALID
    # RFC 9111 1.2.2: the greatest value a cache needs.
    return min(int(argument[:11]), MAX_DELTA)


EMPTY = Directives({})


def parseCacheControl(values: Sequence[bytes]) -> Directives:
    """
    The directives of C{Cache-Control} field lines (RFC 9111 5.2).

    Names are case-insensitive; an argument in quotes is unquoted
    (C{private="a, b"} keeps its comma).  A member that does not parse is
    skipped up to the next comma.  The first occurrence of a directive
    wins; one repeated with another argument is recorded as conflicting.
    """
    if not values:
        return EMPTY
    found: dict[bytes, bytes | None] = {}
    conflicting: set[bytes] = set()
    for value in values:
        position = 0
        end = len(value)
        while position < end:
            match = _DIRECTIVE.match(value, position)
            if match is None:
                comma = value.find(b",", position)
                if comma < 0:
                    break
                position = comma + 1
                continue
            name = match.group(1).lower()
            quoted, plain = match.group(2), match.group(3)
            argument = _UNQUOTE.sub(rb"\1", quoted) if quoted is not None else plain
            if name in found:
                if found[name] != argument:
                    conflicting.add(name)
            else:
                found[name] = argument
            position = match.end()
            if position == match.start():
                break
    return Directives(found, frozenset(conflicting))


# RFC 8941 3.2 (dictionaries) and 3.3 (bare items), enough of it for
# cache directives: keys, and integer, decimal, string, token, byte-sequence
# and boolean values, with parameters (read and ignored).
_SF_KEY = re.compile(rb"[a-z*][a-z0-9_\-.*]*")
_SF_INTEGER = re.compile(rb"-?[0-9]{1,15}(\.[0-9]{1,3})?")
_SF_TOKEN = re.compile(rb"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_SF_STRING = re.compile(rb'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_SF_BYTES = re.compile(rb":[A-Za-z0-9+/=]*:")


class _NotStructured(ValueError):
    pass


def _bareItem(text: bytes, position: int) -> tuple[object, int]:
    """A bare item at C{position}: (value, next position)."""
    if text[position : position + 1] == b"?":
        flag = text[position + 1 : position + 2]
        if flag not in (b"0", b"1"):
            raise _NotStructured("boolean")
        return flag == b"1", position + 2
    for pattern, kind in (
        (_SF_INTEGER, "number"),
        (_SF_STRING, "string"),
        (_SF_TOKEN, "token"),
        (_SF_BYTES, "bytes"),
    ):
        match = pattern.match(text, position)
        if match is not None:
            raw = match.group(0)
            if kind == "number":
                value: object = float(raw) if b"." in raw else int(raw)
            elif kind == "string":
                value = _UNQUOTE.sub(rb"\1", match.group(1))
            else:
                value = raw
            return value, match.end()
    raise _NotStructured("item")


def _skipParameters(text: bytes, position: int) -> int:
    while text[position : position + 1] == b";":
        position += 1
        while text[position : position + 1] == b" ":
            position += 1
        key = _SF_KEY.match(text, position)
        if key is None:
            raise _NotStructured("parameter")
        position = key.end()
        if text[position : position + 1] == b"=":
            _, position = _bareItem(text, position + 1)
    return position


def _structuredDictionary(text: bytes) -> dict[bytes, object]:
    members: dict[bytes, object] = {}
    position = 0
    text = text.strip(b" ")
    end = len(text)
    while position < end:
        key = _SF_KEY.match(text, position)
        if key is None:
            raise _NotStructured("key")
        name = key.group(0)
        position = key.end()
        value: object = True
        if text[position : position + 1] == b"=":
            if text[position + 1 : position + 2] == b"(":
                # An inner list: no cache directive takes one.
                raise _NotStructured("inner list")
            value, position = _bareItem(text, position + 1)
        position = _skipParameters(text, position)
        # RFC 8941 4.2.2: a later member of the same key wins.
        members[name] = value
        while text[position : position + 1] in (b" ", b"\t"):
            position += 1
        if position >= end:
            break
        if text[position : position + 1] != b",":
            raise _NotStructured("separator")
        position += 1
        while text[position : position + 1] in (b" ", b"\t"):
            position += 1
        if position >= end:
            raise _NotStructured("trailing comma")
    return members


def parseTargeted(values: Sequence[bytes]) -> Directives | None:
    """
    The directives of a targeted cache-control field (RFC 9213 2.1), or
    L{None} when the field is absent, empty or not a valid structured
    dictionary: then the cache goes by C{Cache-Control} and C{Expires}
    instead.

    Values become what L{parseCacheControl} would give: an integer its
    digits, C{true} no argument, C{false} absence; a directive with a value
    of another type (C{max-age="60"}) is kept with an argument that reads
    as L{INVALID}.
    """
    if not values:
        return None
    try:
        members = _structuredDictionary(b",".join(values))
    except _NotStructured:
        return None
    if not members:
        return None
    found: dict[bytes, bytes | None] = {}
    for name, value in members.items():
        if value is True:
            found[name] = None
        elif value is False:
            continue
        elif isinstance(value, int) and value >= 0:
            found[name] = b"%d" % value
        elif isinstance(value, bytes) and name in (b"private", b"no-cache"):
            # Field-name lists: kept as given (RFC 9213 2.1 reuses 9111's).
            found[name] = value
        else:
            found[name] = b"invalid"
    return Directives(found)


def parseHTTPDate(value: bytes | None) -> float | None:
    """
    An HTTP-date (RFC 9110 5.6.7: IMF-fixdate, or the obsolete RFC 850 and
    asctime forms) as POSIX seconds, or L{None} when it is not one.
    """
    if not value:
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    parsed = email.utils.parsedate_tz(text)
    if parsed is None:
        return None
    try:
        stamp = calendar.timegm(parsed[:6] + (0, 0, 0))
    except (OverflowError, ValueError):
        return None
    # HTTP dates are always GMT; a stray zone is folded in as email does.
    return float(stamp - (parsed[9] or 0))


def formatHTTPDate(when: float) -> bytes:
    """POSIX seconds as an IMF-fixdate (RFC 9110 5.6.7)."""
    return email.utils.formatdate(int(when), usegmt=True).encode("ascii")


def parseAge(values: Sequence[bytes]) -> int | _Invalid | None:
    """
    The C{Age} of a response (RFC 9111 5.1): L{None} without one, the
    first member of a list, and L{INVALID} for anything but a
    non-negative integer (such a response's freshness is not to be
    trusted: it is not stored).
    """
    if not values:
        return None
    first = values[0].split(b",")[0].strip(b" \t")
    if not _DIGITS.match(first):
        return INVALID
    return min(int(first[:11]), MAX_DELTA)


class _Star:
    __slots__ = ()

    def __repr__(self) -> str:
        return "STAR"


STAR: Final = _Star()
"""C{If-None-Match: *} / C{If-Match: *}."""

_ENTITY_TAG = re.compile(rb'[ \t]*((?:W/)?"[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|\Z)')


def parseETags(values: Sequence[bytes]) -> list[bytes] | _Star | None:
    """
    The entity tags of an C{If-None-Match} or C{If-Match} (RFC 9110
    13.1.1-2): L{STAR}, the list (each with its C{W/} if weak), or L{None}
    when the field is absent or malformed (a malformed condition is
    ignored rather than guessed at).
    """
    if not values:
        return None
    joined = b",".join(values).strip(b" \t")
    if joined == b"*":
        return STAR
    tags: list[bytes] = []
    position = 0
    while position < len(joined):
        if joined[position : position + 1] in (b",", b" ", b"\t"):
            position += 1
            continue
        match = _ENTITY_TAG.match(joined, position)
        if match is None:
            return None
        tags.append(match.group(1))
        position = match.end()
    return tags or None


def _opaque(tag: bytes) -> bytes:
    return tag[2:] if tag.startswith(b"W/") else tag


def weakMatch(a: bytes, b: bytes) -> bool:
    """RFC 9110 8.8.3.2 weak comparison."""
    return _opaque(a) == _opaque(b)


def strongMatch(a: bytes, b: bytes) -> bool:
    """RFC 9110 8.8.3.2 strong comparison: neither weak, same opaque tag."""
    return not a.startswith(b"W/") and a == b
