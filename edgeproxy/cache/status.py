# -*- test-case-name: tests.test_cache_memory,tests.test_cache_responses -*-
"""
The C{Cache-Status} field (RFC 9211) this cache adds to every response it
touched: its name (C{[cache] name}), then either C{hit} (with C{ttl}, the
freshness left, negative when served stale) or C{fwd=REASON} with
C{fwd-status} (the status the next hop gave), C{stored} when the response
is being stored, C{collapsed} when this request waited for another's
fetch, C{ttl} of what was stored, and a C{detail} for the cases the
registered parameters do not tell apart (C{stale-if-error}, a refusal to
store, C{no-response} when the next hop gave none and the status is the
proxy's own error).  What the cache answers itself without a stored
response (C{only-if-cached}'s 504, C{PURGE}) carries the name and a
C{detail} alone (L{CacheStatus.own}).

A member is appended after those of the caches nearer the origin (RFC 9211
2: the first member is the cache closest to the origin).

    >>> CacheStatus(b"edge").hit(42)
    b'edge; hit; ttl=42'
    >>> CacheStatus(b"edge").forward(b"uri-miss", 200, stored=True, ttl=60)
    b'edge; fwd=uri-miss; fwd-status=200; stored; ttl=60'
    >>> CacheStatus(b"edge").own(b"only-if-cached")
    b'edge; detail=only-if-cached'
"""

from __future__ import annotations

import re

from edgeproxy.errors import ProxyError
from edgeproxy.h1.fields import Fields

__all__ = ["CacheStatus", "marked", "withStatus"]

_SF_TOKEN = re.compile(rb"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*\Z")
_DETAIL = re.compile(rb"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*\Z")


class CacheStatus:
    """The C{Cache-Status} members of one cache (one name)."""

    __slots__ = ("prefix",)

    def __init__(self, name: bytes) -> None:
        if _SF_TOKEN.match(name):
            self.prefix = name + b"; "
        else:
            self.prefix = b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"; '

    def hit(self, ttl: float, detail: bytes = b"") -> bytes:
        member = self.prefix + b"hit; ttl=%d" % (int(ttl) if ttl >= 0 else -int(-ttl + 0.999999),)
        if detail:
            member += b"; detail=" + _detail(detail)
        return member

    def forward(
        self,
        reason: bytes,
        status: int | None = None,
        stored: bool = False,
        ttl: float | None = None,
        collapsed: bool = False,
        detail: bytes = b"",
    ) -> bytes:
        parts = [self.prefix + b"fwd=" + reason]
        if status is not None:
            parts.append(b"fwd-status=%d" % (status,))
        if stored:
            parts.append(b"stored")
        if collapsed:
            parts.append(b"collapsed")
        if ttl is not None:
            parts.append(b"ttl=%d" % (int(ttl),))
        if detail:
            parts.append(b"detail=" + _detail(detail))
        return b"; ".join(parts)


    def own(self, detail: bytes) -> bytes:
        """Neither a hit nor forwarded: an answer of the cache's own."""
        return self.prefix + b"detail=" + _detail(detail)


def _detail(detail: bytes) -> bytes:
    if _DETAIL.match(detail):
        return detail
    return b'"' + detail.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def withStatus(fields: Fields, member: bytes) -> Fields:
    """C{fields} with C{member} appended to their C{Cache-Status}."""
    raw = dict(fields.raw())
    existing = raw.get(b"cache-status")
    raw[b"cache-status"] = [*existing, member] if existing else [member]
    return Fields.trusted(raw)


def marked(error: ProxyError, member: bytes) -> ProxyError:
    """
    C{error} with C{member} in the C{Cache-Status} of the page it becomes:
    an error keeps travelling as an error (the client side makes its page,
    L{edgeproxy.http.errorpages}, custom pages and connection handling
    included), its own fields carrying the member.
    """
    error.fields = (*error.fields, (b"cache-status", member))
    return error
