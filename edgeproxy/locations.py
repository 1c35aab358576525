# -*- test-case-name: tests.test_locations -*-
"""
What a redirect may put in C{Location}, for both redirects the proxy makes:
the C{redirect_https} listener's (L{edgeproxy.http.redirect}) and a route's
C{redirect} (L{edgeproxy.pipeline.redirect}).

Whatever the client sent, a Location built here is printable ASCII without
space: the request's own parts are percent-encoded where they hold
anything else (L{encodeURIPart}), the C{Host} is used only when it is a
plain host name or IP literal (L{validHost}), and a route's template was
checked when the configuration was read (L{edgeproxy.config.redirects}:
its literal text is printable ASCII, its host is written out or
C{$host}), so nothing the client sends can end the field (CR, LF), add
one, or move the redirect to another authority: a value substituted after
C{https://example.com} stays in the path, and a relative template starts
with a written path segment (C{//evil.example} cannot come first).

L{expand} fills a route's template from a request:

  - C{$request_uri}: the path and query (C{/a/b?x=1}); the path as routing
    saw it (normalised, see L{edgeproxy.targets}), after the route's
    prefix when the route has C{strip_prefix};
  - C{$path}: that path; C{$query} and C{$args}: the query without its
    C{?}; C{$is_args}: C{?} when there is a query, else nothing;
  - C{$host}: the request's host, lower case, without its port;
  - C{$scheme}: C{http} or C{https}, as the client came in.

So C{https://example.com$request_uri} on C{GET /a?b HTTP/1.1} to
C{www.example.com} gives C{https://example.com/a?b}, and
C{https://example.com/new$path} on a route of C{paths = /old} with
C{strip_prefix = yes} gives C{https://example.com/new/x} for C{/old/x}.

Pure: no Twisted.
"""

from __future__ import annotations

import ipaddress
import re


__all__ = [
    "REDIRECT_PHRASES",
    "encodeURIPart",
    "expand",
    "validHost",
]

REDIRECT_PHRASES: dict[int, bytes] = {
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
}
"""The redirect statuses (RFC 9110 15.4) and their phrases."""

# RFC 3986 3.2.2 reg-name restricted to what DNS names use (letters, digits,
# hyphen, dot; underscore too, as seen in the wild), RFC 1035 length limits.
_REG_NAME = re.compile(rb"[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?\.?\Z")
_PORT = re.compile(rb"[0-9]{1,5}\Z")

# RFC 3986 2.2, 2.3, 3.3, 3.4: what a path and a query may hold as it is
# (unreserved, sub-delims, ":", "@", "/", "?"); "%" only as the start of an
# escape.  Everything else (controls, space, non-ASCII, '"<>\\^`{|}[]#') is
# percent-encoded.
_URI_SAFE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~" b"!$&'()*+,;=" b":@/?"
)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = [b"%%%02X" % byte for byte in range(256)]


def validHost(raw: bytes | None) -> str | None:
    """
    The host part of a C{Host} header value, lower-cased and without port,
    or L{None} when the value is not a plain host name or IP literal with an
    optional port (RFC 9110 §7.2, RFC 3986 §3.2.2).
    """
    if raw is None:
        return None
    value = raw.strip(b" \t").lower()
    if not value or len(value) > 261:
        return None
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        try:
            ipaddress.IPv6Address(host.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        name = "[" + host.decode("ascii") + "]"
    else:
        host, sep, port = value.partition(b":")
        rest = b":" + port if sep else b""
        if not _REG_NAME.match(host):
            return None
        name = host.decode("ascii")
    if rest:
        if not rest.startswith(b":") or not _PORT.match(rest[1:]) or int(rest[1:]) > 65535:
            return None
    return name


def encodeURIPart(data: bytes) -> bytes:
    """
    C{data} (a path, a query, or both) with every byte a URI may not hold
    there percent-encoded, and escapes already there kept as they are.
    """
    out = bytearray()
    size = len(data)
    for index, byte in enumerate(data):
        if byte in _URI_SAFE:
            out.append(byte)
        elif (
            byte == 0x25
            and index + 2 < size
            and data[index + 1] in _HEX
            and data[index + 2] in _HEX
        ):
            out.append(byte)
        else:
            out += _ESCAPES[byte]
    return bytes(out)


def expand(
    parts: tuple[tuple[str, str], ...],
    scheme: bytes,
    host: str | None,
    path: bytes,
    query: bytes,
) -> bytes:
    """
    A route's redirect template filled from a request (see the module
    docstring).

    @param parts: the template as L{edgeproxy.config.redirects} read it:
        C{("text", TEXT)} and C{("var", NAME)} in order.
    @param host: the request's host from L{validHost} (only read when the
        template uses C{$host}).
    @param path: the path (after the route's prefix with C{strip_prefix}).
    @param query: the query with its C{?}, or C{b""}.
    """
    out: list[bytes] = []
    for kind, value in parts:
        if kind == "text":
            out.append(value.encode("ascii"))
        elif value == "request_uri":
            out.append(encodeURIPart(path + query))
        elif value == "path":
            out.append(encodeURIPart(path))
        elif value in ("query", "args"):
            out.append(encodeURIPart(query[1:]))
        elif value == "is_args":
            out.append(b"?" if query else b"")
        elif value == "host":
            assert host is not None
            out.append(host.encode("ascii"))
        elif value == "scheme":
            out.append(b"https" if scheme == b"https" else b"http")
        else:
            raise ValueError(f"unknown redirect variable ${value}")
    return b"".join(out)
