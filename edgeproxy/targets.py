# -*- test-case-name: tests.test_targets -*-
"""
Request-target normalisation: the one place a path is interpreted.

L{normaliseTarget} turns an origin-form request-target into the path that
routing matches and the backend receives, so that the proxy and the backend
cannot disagree about which resource a request names:

  - dot segments are removed (RFC 3986 5.2.4), and a path that would climb
    above the root (C{/../x}, C{/a/../../x}, also spelled with C{%2E}) is
    refused rather than clamped;
  - percent-encoded unreserved characters (RFC 3986 2.3: ALPHA DIGIT
    C{-._~}) are decoded and the hex digits of every other escape are
    upper-cased (RFC 3986 6.2.2.1, 6.2.2.2);
  - printable ASCII that is not allowed raw in a path (C{"<>^`{|}[]}) is
    percent-encoded, so the result holds only RFC 3986 path characters;
  - an encoded C{/} or C{\\} (C{%2F}, C{%5C}), a raw C{\\}, an encoded
    control character, an invalid escape, a raw control, space, C{#} or
    non-ASCII byte is refused with L{BadRequest}: backends decode and split
    these differently, which is how path-based routing gets bypassed.

Nothing else is collapsed.  In particular repeated slashes are kept: RFC 3986
makes C{/a//b} a different path from C{/a/b}, some applications (object
stores, signed URLs) depend on the difference, and merging them here would
make the proxy forward a path the client did not ask for.  Routing matches
the normalised path as is, so C{//admin} does not match a C{/admin} prefix.

The query is checked (no control, space, C{#} or non-ASCII byte) but passed
through byte for byte: its meaning belongs to the application, and
rewriting it would break signed query strings.

Pure: no Twisted.
"""

from __future__ import annotations

import re

from edgeproxy.errors import BadRequest

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# RFC 3986 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@".
_PATH_RAW_OK = bytes(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~" b"!$&'()*+,;=" b":@/"
)
_PATH_ENCODE = frozenset(b'"<>^`{|}[]')
"""Printable, not allowed raw in a path, harmless once encoded."""
_SIMPLE_PATH = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
_QUERY_FORBIDDEN = bytes(range(0x21)) + b"#" + bytes(range(0x7F, 0x100))

_normalised: dict[bytes, tuple[bytes, bytes]] = {}
"""Targets already normalised (popular paths come again and again), to the
result; bounded, short targets only.  Refused targets are not kept."""
_MAX_CACHED = 4096
_MAX_CACHED_TARGET = 256


def normaliseTarget(target: bytes, *, allowAsterisk: bool = False) -> tuple[bytes, bytes]:
    """
    Normalise an origin-form request-target.

    @param target: The request-target as received (the protocol has already
        turned an absolute-form target into origin-form).
    @param allowAsterisk: Accept C{b"*"} (for C{OPTIONS *}); it is returned
        as C{(b"*", b"")}.
    @return: C{(path, query)}; C{query} is C{b""} or starts with C{b"?"}.
    @raise BadRequest: the target is not acceptable (see the module
        docstring).
    """
    known = _normalised.get(target)
    if known is not None:
        return known
    if target == b"*":
        if allowAsterisk:
            return b"*", b""
        raise BadRequest("asterisk-form request-target not allowed here")
    if target[:1] != b"/":
        raise BadRequest(f"request-target is not origin-form: {target[:64]!r}")
    path, question, query = target.partition(b"?")
    if question and len(query.translate(None, _QUERY_FORBIDDEN)) != len(query):
        raise BadRequest("invalid byte in query")
    if _SIMPLE_PATH.fullmatch(path) is not None and b"/." not in path:
        # Fast path: nothing to decode, encode or resolve.
        result = (path, question + query)
    else:
        result = (_removeDotSegments(_normaliseEscapes(path)), question + query)
    if len(target) <= _MAX_CACHED_TARGET:
        if len(_normalised) >= _MAX_CACHED:
            _normalised.clear()
        _normalised[target] = result
    return result


def _normaliseEscapes(path: bytes) -> bytes:
    pieces = path.split(b"%")
    out = [_rawPart(pieces[0])]
    for piece in pieces[1:]:
        escape = piece[:2]
        if len(escape) != 2 or not _HEX.issuperset(escape):
            raise BadRequest("invalid percent-escape in path")
        value = int(escape, 16)
        if value in _UNRESERVED:
            out.append(bytes((value,)))
        elif value in (0x2F, 0x5C):
            # An encoded separator names a different resource to a backend
            # that does not decode it than to one that does.
            raise BadRequest("encoded slash or backslash in path")
        elif value < 0x20 or value == 0x7F:
            raise BadRequest("encoded control character in path")
        else:
            out.append(b"%" + escape.upper())
        out.append(_rawPart(piece[2:]))
    return b"".join(out)


def _rawPart(raw: bytes) -> bytes:
    unusual = raw.translate(None, _PATH_RAW_OK)
    if not unusual:
        return raw
    for byte in unusual:
        if byte == 0x5C:
            # Some servers treat "\" as "/": "/a\..\admin" must not pass.
            raise BadRequest("backslash in path")
        if byte not in _PATH_ENCODE:
            raise BadRequest("invalid byte in path")
    return b"".join(b"%%%02X" % (b,) if b in _PATH_ENCODE else bytes((b,)) for b in raw)


def _removeDotSegments(path: bytes) -> bytes:
    """
    RFC 3986 5.2.4 on an absolute path whose escapes are already
    normalised (so C{%2E} is C{.} by now), refusing root escapes.
    """
    segments = path[1:].split(b"/")
    last = len(segments) - 1
    out: list[bytes] = []
    for index, segment in enumerate(segments):
        if segment == b".":
            if index == last:
                out.append(b"")
        elif segment == b"..":
            if not out:
                raise BadRequest("path climbs above the root")
            out.pop()
            if index == last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)
