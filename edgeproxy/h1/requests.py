# -*- test-case-name: tests.test_h1 -*-
"""
Request heads: reading them from a client (strictly) and writing them to a
backend.

L{parseRequestHead} turns the bytes of a whole head into a L{RequestHead} or
raises L{RemoteProtocolError} with the status to answer.  It refuses
everything a front end and a back end could read two ways (RFC 9112 and the
smuggling history behind it), in this order, so the status a client gets
does not depend on how its bytes were cut:

  1. the request line: exactly C{method SP target SP version}; a version
     other than C{HTTP/1.0}/C{HTTP/1.1} gets C{505} when it is well formed
     (C{HTTP/x.y}), C{400} otherwise; a method that is not a token; a
     target with SP, controls or non-ASCII; C{CONNECT} (C{501}: a reverse
     proxy does not tunnel to arbitrary authorities); a target in none of
     origin-, absolute- (http/https) or asterisk-form (only for
     C{OPTIONS});
  2. each field line: obs-fold (refused, not unfolded: RFC 9112 5.2), no
     colon, a name that is not a token (also whitespace before the colon,
     RFC 9112 5.1), a control other than HTAB in the value, more fields than
     allowed (C{431}), a second or malformed C{Content-Length} (a list such
     as C{5, 5} included), a second or malformed C{Host};
  3. the head as a whole: no C{Host} on HTTP/1.1; an absolute-form
     authority that differs from C{Host} (so no component ever sees two
     hosts); C{Transfer-Encoding} on HTTP/1.0, or with C{Content-Length},
     or other than one final C{chunked} (C{501} when C{chunked} is final
     but preceded by codings we do not implement).

L{splitHead} finds where a head ends in a buffer and applies the size limit:
C{431} for a head over it, C{414} when the request line alone is.  One
empty line before a request is tolerated (RFC 9112 2.2), a second one is
not.  Lines end in CRLF only: a bare LF is part of a line, and so ends up
refused by the checks above.

L{writeRequestHead} writes a head for a backend: the framing field its body
needs, then the fields in their canonical spelling.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from edgeproxy.h1.errors import LocalProtocolError, RemoteProtocolError
from edgeproxy.h1.fields import LINES, Fields, noteLine
from edgeproxy.h1.syntax import (
    CONTROLS_EXCEPT_HTAB,
    TARGET_FORBIDDEN,
    isToken,
    linePrefix,
    listTokens,
    validHost,
)

__all__ = [
    "RequestHead",
    "checkRequestLine",
    "parseRequestHead",
    "splitHead",
    "writeRequestHead",
]

SUPPORTED_VERSIONS = frozenset((b"HTTP/1.0", b"HTTP/1.1"))

KNOWN_METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT")
)
"""Tokens all: no pattern match needed for them."""

_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_ABSOLUTE_FORM = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)", re.DOTALL)

MAX_CONTENT_LENGTH_DIGITS = 18
"""Anything longer cannot be a real body and may overflow other parsers."""


class RequestHead(NamedTuple):
    """
    A request head as read from a client.
    """

    method: bytes
    target: bytes
    """Origin-form (an absolute-form target is rewritten to it), or C{*}."""
    version: bytes
    """C{HTTP/1.1} or C{HTTP/1.0}."""
    fields: Fields
    """Every field as received; C{host} is set from an absolute-form target
    on an HTTP/1.0 request that had no C{Host}."""
    host: bytes
    """The C{Host} value (empty on an HTTP/1.0 request without one)."""
    length: int | None
    """The body's length: C{0} for none, L{None} for a chunked body."""
    persistent: bool
    """Whether the connection may carry another request after this one
    (RFC 9112 9.3: HTTP/1.1 unless C{Connection: close}; never for
    HTTP/1.0, as before)."""
    expectContinue: bool
    """C{Expect: 100-continue} on an HTTP/1.1 request."""


def splitHead(buffer: bytes, maxSize: int) -> tuple[bytes, int] | None:
    """
    Find a complete request head at the start of C{buffer}.

    @param maxSize: the most bytes a head may take, counting its line ends
        and the empty line that ends it (and a tolerated empty line before
        it).
    @return: C{(head, end)}: the head without the empty line that ends it
        (and without one leading CRLF), and the offset of the first byte
        after it; or L{None} when more bytes are needed.
    @raise RemoteProtocolError: C{414} when the request line alone cannot
        fit, C{431} when the head cannot.
    """
    start = 2 if buffer[:2] == b"\r\n" else 0
    end = buffer.find(b"\r\n\r\n", start)
    if end == -1:
        if len(buffer) > maxSize:
            raise _tooLarge(buffer, start, maxSize)
        return None
    if end + 4 > maxSize:
        raise _tooLarge(buffer, start, maxSize)
    return buffer[start:end], end + 4


def _tooLarge(buffer: bytes, start: int, maxSize: int) -> RemoteProtocolError:
    line = buffer.find(b"\r\n", start)
    if line == -1 or line + 2 > maxSize:
        return RemoteProtocolError("request line too long", 414)
    return RemoteProtocolError("request head too large", 431)


def checkRequestLine(line: bytes) -> tuple[bytes, bytes, bytes, bytes | None]:
    """
    Check a request line (without its CRLF).

    @return: the method, the target (origin-form or C{*}), the version, and
        the authority of an absolute-form target (lower case) or L{None}.
    @raise RemoteProtocolError: see the module docstring, point 1.
    """
    parts = line.split(b" ")
    if len(parts) != 3:
        raise RemoteProtocolError("malformed request line")
    method, target, version = parts
    if version not in SUPPORTED_VERSIONS:
        if _VERSION.fullmatch(version):
            raise RemoteProtocolError("unsupported HTTP version", 505)
        raise RemoteProtocolError("malformed HTTP version")
    if method not in KNOWN_METHODS and not isToken(method):
        raise RemoteProtocolError("invalid method")
    if not target or len(target.translate(None, TARGET_FORBIDDEN)) != len(target):
        raise RemoteProtocolError("invalid request-target")
    if method == b"CONNECT":
        raise RemoteProtocolError("CONNECT not implemented", 501)
    if target[:1] == b"/":
        return method, target, version, None
    if target == b"*":
        # RFC 9112 3.2.4: asterisk-form is only for server-wide OPTIONS.
        if method != b"OPTIONS":
            raise RemoteProtocolError("asterisk-form target without OPTIONS")
        return method, target, version, None
    origin, authority = _absoluteForm(target)
    return method, origin, version, authority


def _absoluteForm(target: bytes) -> tuple[bytes, bytes]:
    """
    Check an absolute-form target: its origin-form and its authority.  RFC
    9112 3.2.2 makes the authority win over C{Host}; we only accept the two
    when they agree (checked once the fields are read).
    """
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        raise RemoteProtocolError("request-target is not origin, absolute or asterisk form")
    scheme, authority, rest = match.groups()
    if scheme.lower() not in (b"http", b"https"):
        raise RemoteProtocolError("absolute-form target with unsupported scheme")
    if b"@" in authority or not validHost(authority):
        raise RemoteProtocolError("invalid authority in absolute-form target")
    if not rest:
        return b"/", authority.lower()
    if rest[:1] == b"?":
        return b"/" + rest, authority.lower()
    return rest, authority.lower()


_NOTED = frozenset(
    (
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"expect",
        b"upgrade",
        b"referer",
        b"user-agent",
        b"authorization",
        b"cache-control",
        b"pragma",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"range",
    )
)
"""The fields the parser notes as it reads: what it checks itself (framing,
host, persistence, expectations) and what the proxy asks of nearly every
request (an upgrade, the access log's fields, the credentials of a route
with C{auth} and the cache's check of them, the directives, conditionals
and range a cache hit looks for).  Asking the parsed fields for one of them
makes no dictionary (L{Fields.fromLines})."""

_CHECKED = frozenset((b"content-length", b"transfer-encoding", b"host"))

_MAX_CACHED = 4096
_MAX_CACHED_LINE = 1024
"""Lines longer than this are not remembered (the caches stay small)."""

_fieldLines: dict[bytes, tuple[bytes, bytes, bool]] = {}
"""Field lines already checked, to their lower-case name, their value and
whether the field frames the message or names its host.  Most lines of a
request are lines some earlier request sent (C{Host}, C{User-Agent},
C{Accept}...): looking the whole line up skips splitting, stripping and
checking it again.  Only lines that passed every check are kept; bounded."""

_requestLines: dict[bytes, tuple[bytes, bytes, bytes, bytes | None]] = {}
"""Request lines already checked, to what L{checkRequestLine} returned;
bounded like L{_fieldLines}."""


def _fieldLine(line: bytes) -> tuple[bytes, bytes, bool]:
    """
    Check one field line (RFC 9112 5, RFC 9110 5.5) and remember it.

    @raise RemoteProtocolError: obs-fold, no colon, a name that is not a
        token, a control other than HTAB in the value.
    """
    if line[:1] in (b" ", b"\t"):
        # RFC 9112 5.2: obs-fold is refused, not unfolded.
        raise RemoteProtocolError("obsolete line folding")
    name, colon, value = line.partition(b":")
    if not colon or not isToken(name):
        # Also catches whitespace before the colon (RFC 9112 5.1).
        raise RemoteProtocolError("invalid field name")
    value = value.strip(b" \t")
    if len(value.translate(None, CONTROLS_EXCEPT_HTAB)) != len(value):
        raise RemoteProtocolError("control character in field value")
    lower = name.lower()
    known = (lower, value, lower in _NOTED)
    if len(line) <= _MAX_CACHED_LINE:
        if len(_fieldLines) >= _MAX_CACHED:
            _fieldLines.clear()
        _fieldLines[line] = known
        noteLine(line, lower, value)
    return known


def parseRequestHead(head: bytes, maxFields: int) -> RequestHead:
    """
    Read a request head.

    @param head: the request line and the field lines, joined by CRLF,
        without the empty line that ends the head (what L{splitHead} gives).
    @param maxFields: the most field lines allowed (C{431} past it).
    @raise RemoteProtocolError: the head is refused; its C{status} is the
        one to answer with.
    """
    lines = head.split(b"\r\n")
    requestLine = lines[0]
    checked = _requestLines.get(requestLine)
    if checked is None:
        checked = checkRequestLine(requestLine)
        if len(requestLine) <= _MAX_CACHED_LINE:
            if len(_requestLines) >= _MAX_CACHED:
                _requestLines.clear()
            _requestLines[requestLine] = checked
    method, target, version, authority = checked
    if len(lines) - 1 > maxFields:
        # Refused as the line past the limit would be, once the lines
        # before it passed their checks.
        for line in lines[1 : maxFields + 2]:
            if line not in _fieldLines:
                _fieldLine(line)
        raise RemoteProtocolError("too many header fields", 431)
    cache = _fieldLines
    lengths: bytes | None = None
    codings: list[bytes] | None = None
    host: bytes | None = None
    noted: dict[bytes, list[bytes]] | None = None
    del lines[0]
    for line in lines:
        known = cache.get(line)
        if known is None:
            known = _fieldLine(line)
        if known[2]:
            lower = known[0]
            value = known[1]
            if noted is None:
                noted = {lower: [value]}
            else:
                values = noted.get(lower)
                if values is None:
                    noted[lower] = [value]
                else:
                    values.append(value)
            if lower in _CHECKED:
                if lower == b"host":
                    if host is not None:
                        raise RemoteProtocolError("several Host fields")
                    if not validHost(value):
                        raise RemoteProtocolError("invalid Host")
                    host = value
                elif lower == b"content-length":
                    if lengths is not None:
                        raise RemoteProtocolError("several Content-Length fields")
                    lengths = value
                    _contentLength(value)
                elif codings is None:
                    codings = [value]
                else:
                    codings.append(value)

    if host is None:
        if version == b"HTTP/1.1":
            # RFC 9112 3.2: a 1.1 request without Host MUST get a 400.
            raise RemoteProtocolError("missing Host")
        host = authority or b""
        if authority is not None:
            line = b"Host: " + authority
            lines.append(line)
            noteLine(line, b"host", authority)
            if noted is None:
                noted = {}
            noted[b"host"] = [authority]
    elif authority is not None and host.lower() != authority:
        raise RemoteProtocolError("absolute-form authority differs from Host")

    length: int | None
    if codings is not None:
        if version != b"HTTP/1.1":
            # RFC 9112 6.1: Transfer-Encoding in 1.0 means faulty framing.
            raise RemoteProtocolError("Transfer-Encoding in HTTP/1.0")
        if lengths is not None:
            # RFC 9112 6.1: a request smuggling vector; refuse it.
            raise RemoteProtocolError("both Content-Length and Transfer-Encoding")
        _checkCodings(codings)
        length = None
    elif lengths is not None:
        length = _contentLength(lengths)
    else:
        length = 0

    persistent = version == b"HTTP/1.1"
    expectContinue = False
    if noted is not None:
        connection = noted.get(b"connection")
        if persistent and connection is not None and b"close" in listTokens(connection):
            persistent = False
        expect = noted.get(b"expect")
        expectContinue = (
            version == b"HTTP/1.1" and expect is not None and expect[0].lower() == b"100-continue"
        )
    return RequestHead(
        method,
        target,
        version,
        Fields.fromLines(lines, noted, _NOTED),
        host,
        length,
        persistent,
        expectContinue,
    )


def _contentLength(value: bytes) -> int:
    # RFC 9110 8.6: Content-Length = 1*DIGIT.  A list ("5, 5"), a sign or
    # inner whitespace is refused rather than interpreted (RFC 9112 6.3 5).
    if not value.isdigit() or not value.isascii() or len(value) > MAX_CONTENT_LENGTH_DIGITS:
        raise RemoteProtocolError("invalid Content-Length")
    return int(value)


def _checkCodings(values: list[bytes]) -> None:
    codings = [c.strip(b" \t").lower() for v in values for c in v.split(b",")]
    if codings.count(b"chunked") != 1 or codings[-1] != b"chunked":
        # RFC 9112 6.3 4: chunked not final (or repeated, or absent) means
        # the length cannot be determined: 400 and close.
        raise RemoteProtocolError("Transfer-Encoding is not a single final chunked")
    if len(codings) > 1:
        if all(isToken(c) for c in codings):
            # RFC 9112 6.1: a transfer coding we do not implement gets 501.
            raise RemoteProtocolError("unsupported transfer coding", 501)
        raise RemoteProtocolError("invalid Transfer-Encoding")


_NOT_WRITTEN = frozenset((b"content-length", b"transfer-encoding"))
_NO_NAME = (b"",)


def writeRequestHead(
    method: bytes,
    target: bytes,
    fields: Fields,
    length: int | None,
    persistent: bool = True,
) -> bytes:
    """
    A request head for a backend, in one string.

    @param fields: the fields to send; must hold exactly one C{host}.  Any
        C{content-length} or C{transfer-encoding} in it is ignored: the
        framing comes from C{length}.
    @param length: the body's length (C{0}: no body), or L{None} for a body
        of unknown length, sent chunked.
    @param persistent: when false, C{Connection: close} is sent (RFC 9112
        9.6) and C{fields} should hold no C{connection}.
    @raise LocalProtocolError: an invalid method or target, or not exactly
        one C{host}.
    """
    if method not in KNOWN_METHODS and not isToken(method):
        raise LocalProtocolError(f"invalid method {method!r}")
    if not target or len(target.translate(None, TARGET_FORBIDDEN)) != len(target):
        raise LocalProtocolError(f"invalid request-target {target[:64]!r}")
    lines = fields.lines()
    if lines is None:
        raw = fields.raw()
        hosts = raw.get(b"host")
        if hosts is None or len(hosts) != 1:
            raise LocalProtocolError("exactly one Host field is required")
    elif not lines or LINES.get(lines[0], _NO_NAME)[0] != b"host":
        # Fields held as lines are written as they are: the forward
        # stage's put the one Host first and no framing field in them.
        raise LocalProtocolError("fields held as lines must start with their one Host")
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    if not persistent:
        parts.append(b"Connection: close\r\n")
    if length is None:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif length or method in (b"PUT", b"POST"):
        # RFC 9110 8.6: a body-less PUT or POST still says its length.
        parts.append(b"Content-Length: %d\r\n" % (length,))
    if lines is not None:
        parts.append(b"\r\n".join(lines))
        parts.append(b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)
    append = parts.append
    for name, values in raw.items():
        if name in _NOT_WRITTEN:
            continue
        prefix = linePrefix(name)
        for value in values:
            append(prefix)
            append(value)
            append(b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
