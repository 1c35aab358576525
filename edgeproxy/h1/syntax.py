# -*- test-case-name: tests.test_h1 -*-
"""
The grammar pieces of RFC 9110 and RFC 9112 that the parsers and writers of
L{edgeproxy.h1} share: tokens, field values, hosts and field-name case.

Each check keeps a small bounded cache of the answers it gave: real traffic
uses a few dozen field names and a handful of hosts, and a peer inventing
new ones only empties the cache, it cannot grow it.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "CONTROLS_EXCEPT_HTAB",
    "LINE_PREFIXES",
    "canonicalName",
    "linePrefix",
    "isToken",
    "listTokens",
    "validHost",
]

TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
"""RFC 9110 5.6.2 C{token}, as a pattern."""

_TOKEN = re.compile(TOKEN)

CONTROLS_EXCEPT_HTAB = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"
"""What a field value may not hold.  RFC 9110 5.5 allows VCHAR, obs-text,
SP and HTAB; NUL, CR and LF MUST be refused (a value holding them would let
a peer smuggle a field or a message), and every other control is refused
too."""

TARGET_FORBIDDEN = bytes(range(0x21)) + bytes(range(0x7F, 0x100))
"""What a request-target may not hold (RFC 9112 3.2: no SP, no control, no
non-ASCII)."""

_HOST_REGNAME = re.compile(rb"[A-Za-z0-9\-._~]+")

_MAX_CACHED = 4096


def isToken(value: bytes) -> bool:
    """RFC 9110 5.6.2 C{token}."""
    return _TOKEN.fullmatch(value) is not None


def listTokens(values: list[bytes] | tuple[bytes, ...]) -> list[bytes]:
    """
    The lower-case elements of a comma-separated list field (RFC 9110
    5.6.1), empty elements dropped, over every field line C{values} holds.
    """
    return [
        element
        for value in values
        for element in (part.strip(b" \t").lower() for part in value.split(b","))
        if element
    ]


_validHosts: dict[bytes, bool] = {}


def validHost(value: bytes) -> bool:
    """
    Whether C{value} is an acceptable C{Host} (or authority): C{uri-host
    [":" port]} (RFC 9110 7.2) where the host is a bracketed IPv6 literal
    or a non-empty name of unreserved characters (which includes IPv4
    addresses).  Percent-encoding and sub-delims, legal in reg-name but
    never sent by real clients, are refused so that routing compares plain
    names; an empty host is invalid for http(s) URIs (RFC 9110 4.2.1).
    """
    known = _validHosts.get(value)
    if known is None:
        known = _checkHost(value)
        if len(_validHosts) >= _MAX_CACHED:
            _validHosts.clear()
        _validHosts[value] = known
    return known


def _checkHost(value: bytes) -> bool:
    if value.startswith(b"["):
        end = value.find(b"]")
        if end == -1:
            return False
        try:
            ipaddress.IPv6Address(value[1:end].decode("ascii"))
        except ValueError:
            return False
        rest = value[end + 1 :]
    else:
        host, colon, port = value.partition(b":")
        if _HOST_REGNAME.fullmatch(host) is None:
            return False
        rest = colon + port
    if not rest:
        return True
    if rest[:1] != b":":
        return False
    port = rest[1:]
    return port == b"" or (
        port.isdigit() and port.isascii() and len(port) <= 5 and int(port) <= 65535
    )


_SPECIAL_CASE = {
    b"content-md5": b"Content-MD5",
    b"dnt": b"DNT",
    b"etag": b"ETag",
    b"p3p": b"P3P",
    b"te": b"TE",
    b"www-authenticate": b"WWW-Authenticate",
    b"x-real-ip": b"X-Real-IP",
    b"x-request-id": b"X-Request-ID",
    b"x-xss-protection": b"X-XSS-Protection",
}
"""The names whose usual spelling is not plain Header-Case (the list
Twisted's C{Headers} uses, so backends see what they saw before, and the
two fields the proxy itself sets, as nginx and Heroku spell them)."""

_canonical: dict[bytes, bytes] = {}


def canonicalName(lower: bytes) -> bytes:
    """
    The spelling a field name is written with on HTTP/1.1: Header-Case
    (C{x-forwarded-for} is C{X-Forwarded-For}), or the usual spelling of
    the few names that differ.  Field names are case-insensitive (RFC 9110
    5.1); this only keeps what backends see stable.

    @param lower: a lower-case field name.
    """
    name = _canonical.get(lower)
    if name is None:
        name = _SPECIAL_CASE.get(lower)
        if name is None:
            name = b"-".join(part[:1].upper() + part[1:] for part in lower.split(b"-"))
        if len(_canonical) >= _MAX_CACHED:
            _canonical.clear()
        _canonical[lower] = name
    return name


LINE_PREFIXES: dict[bytes, bytes] = {}
"""Lower-case field names to the start of their field line (C{Name: }), as
L{linePrefix} makes them; bounded."""


def linePrefix(lower: bytes) -> bytes:
    """The start of a field line for the field C{lower}: C{Name: }."""
    prefix = LINE_PREFIXES.get(lower)
    if prefix is None:
        prefix = canonicalName(lower) + b": "
        if len(LINE_PREFIXES) >= _MAX_CACHED:
            LINE_PREFIXES.clear()
        LINE_PREFIXES[lower] = prefix
    return prefix
