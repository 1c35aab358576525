# -*- test-case-name: tests.test_h2_head -*-
"""
L{readRequestHead}: the header list of an HTTP/2 request (as HPACK decoded
it) to the method, target, host and fields every protocol hands to
L{edgeproxy.http.listener.ListenerFactory.prepare}, or the refusal.

Refused as malformed (RFC 9113 8.1.1: a stream error of type
C{PROTOCOL_ERROR}, L{Malformed}):

  - a field name with upper case, a control, a space, non-ASCII or a colon
    (8.2.1); a value with NUL, CR or LF, or leading or trailing whitespace
    (8.2.1);
  - a connection-specific field (C{connection}, C{keep-alive},
    C{proxy-connection}, C{transfer-encoding}, C{upgrade}), or C{te} other
    than C{trailers} (8.2.2);
  - a pseudo-header that is unknown, repeated, after a regular field, or
    missing (C{:method}, C{:scheme} and C{:path}, the last not empty; for
    C{CONNECT} C{:authority} and neither C{:scheme} nor C{:path}) (8.3);
  - C{:protocol} when the connection did not enable extended CONNECT, or
    on a method other than C{CONNECT} (RFC 8441 4);
  - a C{host} field that names another authority than C{:authority}
    (8.3.1), or several C{host} fields.

Answered with a status (L{Refused}), as the same request over HTTP/1.1
would be: C{400} for what HTTP/2 allows but cannot be forwarded over
HTTP/1.1 (a field name that is not a token, a control other than HTAB in a
value, a method that is not a token, a target with a space or a control,
a target in neither origin nor asterisk form, a scheme other than http and
https, no authority at all, an invalid one, a C{content-length} too long to
be real), C{431} over the listener's field count or head size (the size the
head would have over HTTP/1.1), and C{501} for C{CONNECT} (a reverse proxy
does not tunnel to arbitrary authorities) and for an extended C{CONNECT}
whose protocol is not C{websocket}.

C{:authority} becomes the C{host} field (first), and C{cookie} crumbs are
joined with C{"; "} into one field (RFC 9113 8.2.3), so that stages and
backends see what an HTTP/1.1 client would have sent.  The fields are held
as the field lines it would have sent (L{Fields.fromLines}, names in their
usual spelling), as an HTTP/1.1 request's are, so that they take the same
paths through the stages and to the backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from edgeproxy.errors import RequestHeadRefused
from edgeproxy.h1.fields import Fields, linesOf
from edgeproxy.h1.requests import KNOWN_METHODS, MAX_CONTENT_LENGTH_DIGITS
from edgeproxy.h1.syntax import (
    CONTROLS_EXCEPT_HTAB,
    TARGET_FORBIDDEN,
    isToken,
    validHost,
)

__all__ = ["Malformed", "Refused", "RequestHead", "readRequestHead"]


class Malformed(Exception):
    """A malformed request: reset its stream with C{PROTOCOL_ERROR}."""


class Refused(RequestHeadRefused):
    """
    A request answered with C{status} (and never forwarded).

    @ivar head: what its pseudo-header fields said (method, C{:path},
        authority; no other field), for its access-log line.
    """

    head: RequestHead


class RequestHead(NamedTuple):
    """An HTTP/2 request's head, as the pipeline takes it."""

    method: bytes
    target: bytes
    """The C{:path}: origin-form, or C{*}."""
    host: bytes
    """The C{:authority} (or the C{host} field when there was none)."""
    fields: Fields
    """The regular fields, C{host} first, cookies joined."""
    length: int | None
    """The C{content-length} when sent, else L{None}."""
    protocol: bytes | None
    """The C{:protocol} of an extended CONNECT (RFC 8441), else L{None}."""


_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)

_NAME_FORBIDDEN = bytes(range(0x21)) + bytes(range(0x41, 0x5B)) + bytes(range(0x7F, 0x100)) + b":"
"""RFC 9113 8.2.1: what a field name may not hold (and a colon, which only
starts a pseudo-header)."""

_OK, _MALFORMED, _NOT_TOKEN, _SPECIAL = range(4)

_names: dict[bytes, int] = {}
"""Field name to what it is (L{_OK}...); bounded."""
_MAX_NAMES = 4096

_WHITESPACE = (0x20, 0x09)

_SPECIAL_NAMES = frozenset((b"te", b"cookie", b"host", b"content-length"))

_REQUEST_LINE_EXTRA = len(b"  HTTP/1.1\r\n")
_FIELD_LINE_EXTRA = len(b": \r\n")


def _nameKind(name: bytes) -> int:
    kind = _names.get(name)
    if kind is None:
        if not name or len(name.translate(None, _NAME_FORBIDDEN)) != len(name) or name in _CONNECTION_SPECIFIC:
            kind = _MALFORMED
        elif name in _SPECIAL_NAMES:
            kind = _SPECIAL
        elif not isToken(name):
            kind = _NOT_TOKEN
        else:
            kind = _OK
        if len(_names) >= _MAX_NAMES:
            _names.clear()
        _names[name] = kind
    return kind


def readRequestHead(
    headers: Sequence[tuple[bytes, bytes]],
    maxFields: int,
    maxSize: int,
    connectProtocol: bool,
) -> RequestHead:
    """
    Read the header list of a request.

    @param maxFields: the listener's C{max_headers}.
    @param maxSize: the listener's C{max_header_size}.
    @param connectProtocol: whether the connection sent
        C{SETTINGS_ENABLE_CONNECT_PROTOCOL} (RFC 8441 3).
    @raise Malformed: see the module docstring.
    @raise Refused: see the module docstring; its C{head} is set.
    """
    try:
        return _readRequestHead(headers, maxFields, maxSize, connectProtocol)
    except Refused as refused:
        refused.head = _pseudoHead(headers)
        raise


def _pseudoHead(headers: Sequence[tuple[bytes, bytes]]) -> RequestHead:
    """What the pseudo-header fields of a refused request said."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name[:1] != b":":
            if name == b"host":
                found.setdefault(b":authority", value)
            continue
        found.setdefault(name, value)
    return RequestHead(
        found.get(b":method", b""),
        found.get(b":path", b""),
        found.get(b":authority", b""),
        _NO_FIELDS,
        None,
        None,
    )


_NO_FIELDS = Fields(())


def _readRequestHead(
    headers: Iterable[tuple[bytes, bytes]],
    maxFields: int,
    maxSize: int,
    connectProtocol: bool,
) -> RequestHead:
    method = scheme = path = authority = protocol = None
    fields: dict[bytes, list[bytes]] = {b"host": []}
    cookies: list[bytes] | None = None
    lengths: list[bytes] | None = None
    regular = False
    notToken = False
    controls = False
    count = 0
    size = 0
    for name, value in headers:
        if len(value.translate(None, CONTROLS_EXCEPT_HTAB)) != len(value):
            if b"\x00" in value or b"\r" in value or b"\n" in value:
                raise Malformed("NUL, CR or LF in a field value")
            controls = True
        if value and (value[0] in _WHITESPACE or value[-1] in _WHITESPACE):
            raise Malformed("whitespace around a field value")
        if name[:1] == b":":
            if regular:
                raise Malformed("pseudo-header after a regular field")
            if name == b":method":
                if method is not None:
                    raise Malformed("repeated :method")
                method = value
            elif name == b":path":
                if path is not None:
                    raise Malformed("repeated :path")
                path = value
            elif name == b":scheme":
                if scheme is not None:
                    raise Malformed("repeated :scheme")
                scheme = value
            elif name == b":authority":
                if authority is not None:
                    raise Malformed("repeated :authority")
                authority = value
            elif name == b":protocol":
                if protocol is not None:
                    raise Malformed("repeated :protocol")
                protocol = value
            else:
                raise Malformed("unknown or response pseudo-header")
            continue
        regular = True
        kind = _names.get(name)
        if kind is None:
            kind = _nameKind(name)
        if kind:
            if kind == _MALFORMED:
                raise Malformed("invalid or connection-specific field name")
            if kind == _NOT_TOKEN:
                notToken = True
            elif name == b"te":
                if value != b"trailers":
                    raise Malformed("te other than trailers")
            elif name == b"cookie":
                if cookies is None:
                    cookies = [value]
                else:
                    cookies.append(value)
                continue
            elif name == b"content-length":
                if lengths is None:
                    lengths = [value]
                else:
                    lengths.append(value)
        count += 1
        size += len(name) + len(value)
        values = fields.get(name)
        if values is None:
            fields[name] = [value]
        else:
            values.append(value)

    if method is None:
        raise Malformed("no :method")
    if protocol is not None:
        if not connectProtocol:
            raise Malformed(":protocol without SETTINGS_ENABLE_CONNECT_PROTOCOL")
        if method != b"CONNECT":
            raise Malformed(":protocol on a method other than CONNECT")
    if method == b"CONNECT" and protocol is None:
        # RFC 9113 8.5.
        if authority is None or scheme is not None or path is not None:
            raise Malformed("CONNECT with :scheme or :path, or without :authority")
        raise Refused("CONNECT not implemented", 501)
    if scheme is None or path is None:
        raise Malformed("no :scheme or :path")
    if not path:
        raise Malformed("empty :path")

    hosts = fields[b"host"]
    if len(hosts) > 1:
        raise Malformed("several host fields")
    if authority is None:
        if not hosts:
            raise Refused("no :authority and no host", 400)
        authority = hosts[0]
    elif hosts:
        if hosts[0].lower() != authority.lower():
            raise Malformed("host differs from :authority")
        hosts[0] = authority
    else:
        hosts.append(authority)
        count += 1
        size += 4 + len(authority)

    if cookies is not None:
        # RFC 9113 8.2.3: one field again, for HTTP/1.1.
        cookie = b"; ".join(cookies)
        fields[b"cookie"] = [cookie]
        count += 1
        size += len(cookie) + 6
    size += count * _FIELD_LINE_EXTRA + len(method) + len(path) + _REQUEST_LINE_EXTRA
    if count > maxFields:
        raise Refused("too many header fields", 431)
    if size > maxSize:
        raise Refused("header fields too large", 431)

    if notToken or controls:
        raise Refused("field not writable over HTTP/1.1", 400)
    if method not in KNOWN_METHODS and not isToken(method):
        raise Refused("invalid method", 400)
    if scheme != b"https" and scheme != b"http":
        raise Refused("unsupported :scheme", 400)
    if len(path.translate(None, TARGET_FORBIDDEN)) != len(path):
        raise Refused("invalid :path", 400)
    if path[:1] != b"/" and (path != b"*" or method != b"OPTIONS"):
        raise Refused(":path in neither origin nor asterisk form", 400)
    if not validHost(authority):
        raise Refused("invalid :authority", 400)
    if protocol is not None and protocol != b"websocket":
        raise Refused("extended CONNECT for another protocol than websocket", 501)

    length: int | None = None
    if lengths is not None:
        # The library checked they are digits and agree (RFC 9110 8.6).
        if len(lengths[0]) > MAX_CONTENT_LENGTH_DIGITS:
            raise Refused("content-length too long", 400)
        length = int(lengths[0])
    return RequestHead(method, path, authority, _asLines(fields), length, protocol)


def _asLines(fields: dict[bytes, list[bytes]]) -> Fields:
    """
    C{fields} (names lower-case tokens, values checked above: no control
    but HTAB, no whitespace around) as the HTTP/1.1 field lines they read
    back as.
    """
    return Fields.fromLines(linesOf(fields))
