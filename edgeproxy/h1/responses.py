# -*- test-case-name: tests.test_h1 -*-
"""
Response heads: reading them from a backend and writing them to a client.

A backend is trusted to speak HTTP, not to speak it unambiguously, so the
reading is tolerant where RFC 9112 allows a recipient to be and strict
where two readers could disagree about the framing:

  - lines may end in a bare LF (RFC 9112 2.2: a recipient MAY accept it);
  - obs-fold is replaced by one SP (RFC 9112 5.2: a proxy either does that
    or answers 502; the same rule holds for every response, a WebSocket
    handshake's included);
  - the status line is C{HTTP/1.x SP 3DIGIT [SP reason]}, the reason
    optional as some servers omit it;
  - field names must be tokens and values free of controls other than
    HTAB;
  - C{Content-Length} may be repeated with equal values (C{42, 42}, RFC 9110
    8.6 allows a recipient to accept that); differing or malformed values
    are refused;
  - C{Transfer-Encoding} must be exactly C{chunked}: a proxy cannot frame a
    body in another coding for its client, and C{Content-Length} beside it
    is refused (RFC 9112 6.3 3 calls it an error to handle).

L{parseResponseHead} keeps the message's own fields apart from the fields
about this connection and its framing (RFC 9110 7.6.1: C{Connection} and
every field it names, C{Keep-Alive}, C{Proxy-Connection}, C{TE},
C{Trailer}, C{Transfer-Encoding}, C{Upgrade}; C{Content-Length} becomes
L{ResponseHead.length}), so what a proxy forwards is L{ResponseHead.fields}
as it is.
"""

from __future__ import annotations

from typing import NamedTuple

from edgeproxy.h1.errors import LocalProtocolError, RemoteProtocolError
from edgeproxy.h1.fields import LINES, Fields, noteLine
from edgeproxy.h1.syntax import (
    CONTROLS_EXCEPT_HTAB,
    LINE_PREFIXES,
    isToken,
    linePrefix,
    listTokens,
)

__all__ = [
    "CLOSE_DELIMITED",
    "CHUNKED",
    "NO_BODY",
    "ResponseHead",
    "bodyFraming",
    "parseResponseHead",
    "splitResponseHead",
    "writeResponseHead",
]

HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    )
)
"""Lower-case names of the fields that only concern one connection (RFC 9110
7.6.1)."""

_NOT_MESSAGE = HOP_BY_HOP | {b"content-length"}

MAX_CONTENT_LENGTH_DIGITS = 18


class ResponseHead(NamedTuple):
    """A response head as read from a backend."""

    version: bytes
    """C{HTTP/1.1} or C{HTTP/1.0} (C{HTTP/1.x} for a later minor)."""
    status: int
    reason: bytes
    fields: Fields
    """The message's own fields: none of L{HOP_BY_HOP}, none named by
    C{Connection}, no C{Content-Length}."""
    length: int | None
    """The C{Content-Length}, or L{None} when there is none."""
    chunked: bool
    """Whether the body is in the chunked coding."""
    persistent: bool
    """Whether the head lets the connection carry another request (RFC
    9112 9.3: not after C{Connection: close}, nor on HTTP/1.0 without
    C{keep-alive})."""
    upgrade: tuple[bytes, ...]
    """The C{Upgrade} values (what a C{101} switches to)."""


NO_BODY = -1
"""L{bodyFraming}: the response has no body."""
CHUNKED = -2
"""L{bodyFraming}: the body is chunked."""
CLOSE_DELIMITED = -3
"""L{bodyFraming}: the body ends when the connection closes."""


def bodyFraming(head: ResponseHead, method: bytes) -> int:
    """
    How the body of C{head} is delimited on the wire (RFC 9112 6.3).

    @param method: the method of the request it answers.
    @return: the body's length (a count of bytes, C{0} included), or
        L{NO_BODY}, L{CHUNKED} or L{CLOSE_DELIMITED}.
    """
    status = head.status
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    if head.chunked:
        return CHUNKED
    if head.length is None:
        return CLOSE_DELIMITED
    return head.length


def splitResponseHead(buffer: bytes, maxSize: int) -> tuple[bytes, int] | None:
    """
    Find a complete response head at the start of C{buffer}.

    @return: C{(head, end)}: the head (status line and field lines, without
        the empty line that ends it; its line ends are CRLF or LF) and the
        offset of the first byte after it; L{None} when more is needed.
    @raise RemoteProtocolError: the head is over C{maxSize} bytes.
    """
    crlf = buffer.find(b"\n\r\n")
    # A bare LF end before it is rare: look for one only up to there.
    bare = buffer.find(b"\n\n", 0, crlf + 1) if crlf != -1 else buffer.find(b"\n\n")
    if bare != -1:
        end, rest = bare, bare + 2
    elif crlf != -1:
        end, rest = crlf, crlf + 3
    else:
        if len(buffer) > maxSize:
            raise RemoteProtocolError("response head too long", 502)
        return None
    if end > maxSize:
        raise RemoteProtocolError("response head too long", 502)
    return buffer[:end], rest


_VERSIONS = {b"HTTP/1.1": b"HTTP/1.1", b"HTTP/1.0": b"HTTP/1.0"}

_responseNames: dict[bytes, tuple[bytes, int]] = {}
"""Response field names found to be tokens, to their lower-case form and
their kind (as L{_fieldLines}); bounded."""
_MAX_NAMES = 10_000

_CONTROL = 1
"""A field kept apart from the message's own (framing, this connection's)."""
_NOTED = 2
"""A field of the message's own that the proxy asks of every response."""

_NOTED_NAMES = frozenset((b"date",))
"""The fields noted as the head is read (L{Fields.fromLines}): asking for
them makes no dictionary."""

_fieldLines: dict[bytes, tuple[bytes, int, bytes]] = {}
"""Field lines of clean heads already read, to their lower-case name, their
kind (0, L{_CONTROL} or L{_NOTED}) and their value: most lines
of a backend's responses repeat (C{Server}, C{Content-Type},
C{Connection}...), and a line seen before is not split and stripped again.
Bounded, short lines only."""

_readStatusLines: dict[bytes, tuple[int, bytes, bytes]] = {}
"""Status lines already read (a handful per backend); bounded."""

_MAX_LINES = 4096
_MAX_LINE = 256


_readHeads: dict[bytes, ResponseHead] = {}
"""Whole heads already read, to what they were read as: a backend sends
the same head again and again (but for its C{Date}, once a second).  What
is kept is shared by every response with that head, which its immutable
fields allow; bounded, short heads only."""

_MAX_HEADS = 256
_MAX_HEAD = 1024


def parseResponseHead(head: bytes) -> ResponseHead:
    """
    Read a response head (what L{splitResponseHead} found).

    @raise RemoteProtocolError: not an HTTP/1.x response head, or one whose
        framing or fields could be read two ways (see the module
        docstring).
    """
    known = _readHeads.get(head)
    if known is not None:
        return known
    whole = head
    if head[-1:] == b"\r":
        # The CR of the last line's CRLF (the head ends before its LF).
        head = head[:-1]
    # A head whose only controls (HTAB aside) are its CRLF line ends (what
    # servers send) splits into lines with nothing left to strip and values
    # with nothing to refuse, which one pass over it shows; anything else
    # takes the careful path.
    if len(head) - len(head.translate(None, CONTROLS_EXCEPT_HTAB)) == 2 * head.count(b"\r\n"):
        parsed = _readHead(head.split(b"\r\n"), True)
    else:
        parsed = _readHead(_unfold(head.split(b"\n")), False)
    if len(whole) <= _MAX_HEAD:
        if len(_readHeads) >= _MAX_HEADS:
            _readHeads.clear()
        _readHeads[whole] = parsed
    return parsed


_KEEP_ALIVE = [b"keep-alive"]

_NEVER_NAMED = frozenset((b"content-length", b"close", b"keep-alive"))
"""Connection tokens that name no field to drop: Content-Length is framing,
C{close} and C{keep-alive} are options."""


def _lineName(line: bytes) -> bytes:
    known = LINES.get(line)
    return known[0] if known is not None else line.partition(b":")[0].lower()


def _readHead(lines: list[bytes], clean: bool) -> ResponseHead:
    """
    L{parseResponseHead} of the lines of a head, C{clean} when they are
    known to hold no control character but HTAB.
    """
    statusLine = lines[0]
    parsed = _readStatusLines.get(statusLine) if clean else None
    if parsed is None:
        parsed = _statusLine(statusLine)
        if clean:
            if len(_readStatusLines) >= _MAX_LINES:
                _readStatusLines.clear()
            _readStatusLines[statusLine] = parsed
    status, version, reason = parsed
    kept: list[bytes] = []
    control: dict[bytes, list[bytes]] = {}
    noted: dict[bytes, list[bytes]] | None = None
    names = _responseNames
    seen = _fieldLines
    allValues = []
    del lines[0]
    for line in lines:
        known = seen.get(line) if clean else None
        if known is None:
            name, colon, value = line.partition(b":")
            kind = names.get(name) if colon else None
            if kind is None:
                if clean and line[:1] in (b" ", b"\t"):
                    # obs-fold (RFC 9112 5.2), rare: unfolded, then read again.
                    return _readHead(_unfold([statusLine, *lines]), True)
                if not colon or not isToken(name):
                    raise RemoteProtocolError(f"invalid response field {line[:64]!r}", 502)
                lowered = name.lower()
                kind = (
                    lowered,
                    _CONTROL if lowered in _NOT_MESSAGE else _NOTED if lowered in _NOTED_NAMES else 0,
                )
                if len(names) < _MAX_NAMES:
                    names[name] = kind
            value = value.strip(b" \t")
            known = (kind[0], kind[1], value)
            if clean:
                if len(line) <= _MAX_LINE:
                    if len(seen) >= _MAX_LINES:
                        seen.clear()
                    seen[line] = known
                    noteLine(line, kind[0], value)
            else:
                allValues.append(value)
                # An unfolded line is not the line that came: kept as the
                # field it means, in its usual spelling.
                line = linePrefix(kind[0]) + value
                noteLine(line, kind[0], value)
        lineKind = known[1]
        if not lineKind:
            kept.append(line)
        elif lineKind is _CONTROL:
            lower = known[0]
            values = control.get(lower)
            if values is None:
                control[lower] = [known[2]]
            else:
                values.append(known[2])
        else:
            kept.append(line)
            lower = known[0]
            if noted is None:
                noted = {lower: [known[2]]}
            elif lower in noted:
                noted[lower].append(known[2])
            else:
                noted[lower] = [known[2]]
    if not clean:
        text = b"".join(allValues)
        if len(text.translate(None, CONTROLS_EXCEPT_HTAB)) != len(text):
            raise RemoteProtocolError("control character in a response field", 502)

    length = chunked = None
    persistent = version == b"HTTP/1.1"
    upgrade: tuple[bytes, ...] = ()
    if control:
        connection = control.get(b"connection")
        if connection is not None:
            # What most servers send needs no list parsing.
            tokens = _KEEP_ALIVE if connection == _KEEP_ALIVE else listTokens(connection)
            if b"close" in tokens:
                persistent = False
            elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                persistent = True
            named = set(tokens) - _NEVER_NAMED
            if named:
                # RFC 9110 7.6.1: the fields Connection names are this
                # connection's; Content-Length is framing, never dropped.
                kept = [line for line in kept if _lineName(line) not in named]
                if noted is not None:
                    noted = {name: values for name, values in noted.items() if name not in named}
        codings = control.get(b"transfer-encoding")
        lengths = control.get(b"content-length")
        if codings is not None:
            if listTokens(codings) != [b"chunked"]:
                raise RemoteProtocolError("response Transfer-Encoding is not chunked", 502)
            if lengths is not None:
                raise RemoteProtocolError(
                    "response has both Content-Length and Transfer-Encoding", 502
                )
            chunked = True
        elif lengths is not None:
            length = _contentLength(lengths)
        upgrades = control.get(b"upgrade")
        if upgrades is not None:
            upgrade = tuple(upgrades)
    return ResponseHead(
        version,
        status,
        reason,
        Fields.fromLines(kept, noted, _NOTED_NAMES),
        length,
        bool(chunked),
        persistent,
        upgrade,
    )


def _statusLine(line: bytes) -> tuple[int, bytes, bytes]:
    parts = line.split(b" ", 2)
    if len(parts) == 3:
        versionText, code, reason = parts
    elif len(parts) == 2:
        versionText, code = parts
        reason = b""
    else:
        raise RemoteProtocolError(f"malformed status line {line[:64]!r}", 502)
    version = _VERSIONS.get(versionText)
    if version is None:
        if not (
            len(versionText) == 8
            and versionText[:7] == b"HTTP/1."
            and versionText[7:8].isdigit()
        ):
            raise RemoteProtocolError(f"not an HTTP/1.x response: {versionText[:16]!r}", 502)
        version = versionText
    if len(code) != 3 or not code.isdigit() or not code.isascii():
        raise RemoteProtocolError(f"invalid status code {code[:16]!r}", 502)
    if len(reason.translate(None, CONTROLS_EXCEPT_HTAB)) != len(reason):
        raise RemoteProtocolError("control character in the reason phrase", 502)
    return int(code), version, reason


def _unfold(lines: list[bytes]) -> list[bytes]:
    """
    The lines of a head with their CR ends stripped and every obs-fold
    continuation (RFC 9112 5.2) joined to the line it continues with one
    SP.
    """
    out = [lines[0][:-1] if lines[0][-1:] == b"\r" else lines[0]]
    for line in lines[1:]:
        if line[-1:] == b"\r":
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            if len(out) == 1:
                raise RemoteProtocolError("continuation line without a field", 502)
            out[-1] = out[-1].rstrip(b" \t") + b" " + line.strip(b" \t")
            continue
        out.append(line)
    return out


def _contentLength(values: list[bytes]) -> int:
    if len(values) == 1:
        value = values[0]
        if value.isdigit() and value.isascii() and len(value) <= MAX_CONTENT_LENGTH_DIGITS:
            return int(value)
    lengths = set()
    for value in values:
        for element in value.split(b","):
            element = element.strip(b" \t")
            if (
                not element.isdigit()
                or not element.isascii()
                or len(element) > MAX_CONTENT_LENGTH_DIGITS
            ):
                raise RemoteProtocolError(f"invalid response Content-Length {element[:32]!r}", 502)
            lengths.add(int(element))
    if len(lengths) != 1:
        raise RemoteProtocolError("conflicting response Content-Length values", 502)
    return lengths.pop()


_writtenStatusLines: dict[tuple[bytes, int, bytes], bytes] = {}


def writeResponseHead(
    version: bytes,
    status: int,
    reason: bytes,
    fields: Fields,
    length: int | None,
    chunked: bool = False,
    close: bool = False,
    extra: bytes = b"",
) -> bytes:
    """
    A response head in one string: the status line, the framing field,
    C{Connection: close} when asked, then C{fields} in their usual
    spelling.

    @param version: the status line's version (C{HTTP/1.1}; C{HTTP/1.0}
        to a 1.0 client).
    @param fields: the message's fields; framing and connection fields in
        it are the caller's business (they are written as they are).
    @param length: written as C{Content-Length} when not L{None}.
    @param chunked: write C{Transfer-Encoding: chunked} (with C{length}
        L{None}).
    @param extra: more field lines, already formatted (each ending in CRLF).
    @raise LocalProtocolError: a status outside 100-999, or a reason with a
        control character.
    """
    key = (version, status, reason)
    line = _writtenStatusLines.get(key)
    if line is None:
        if not 100 <= status <= 999 or len(reason.translate(None, CONTROLS_EXCEPT_HTAB)) != len(
            reason
        ):
            raise LocalProtocolError(f"invalid status {status} {reason[:32]!r}")
        line = b"%s %d %s\r\n" % (version, status, reason)
        if len(_writtenStatusLines) < 256:
            _writtenStatusLines[key] = line
    parts = [line]
    if length is not None:
        parts.append(b"Content-Length: %d\r\n" % (length,))
    elif chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    lines = fields.lines()
    if lines is not None:
        # Fields as they were read: written as they came.
        if lines:
            parts.append(b"\r\n".join(lines))
            parts.append(b"\r\n")
    else:
        append = parts.append
        prefixes = LINE_PREFIXES
        for name, values in fields.raw().items():
            prefix = prefixes.get(name)
            if prefix is None:
                prefix = linePrefix(name)
            for value in values:
                append(prefix)
                append(value)
                append(b"\r\n")
    if extra:
        parts.append(extra)
    parts.append(b"\r\n")
    return b"".join(parts)
