# -*- test-case-name: tests.test_headers_requestid -*-
"""
Request IDs: one per request (C{[edgeproxy] request_id = X-Request-ID}, the
default), sent to the backend, returned to the client and written in the
access log, so that one line of each can be found from the other.

An ID is 128 random bits as 32 lower-case hex digits, from the operating
system's CSPRNG (an ID returned to one client must not tell it anything
about the IDs of others), read in batches so that a request costs a list
pop rather than a system call.  A request from a trusted proxy
(C{trusted_proxies}) that carries one well-formed ID keeps it, so that one
ID follows the request through every hop; from anyone else the field is
replaced, as the proxy's own forwarding fields are
(L{edgeproxy.pipeline.forwarded}).  Well-formed: 1 to L{MAX_LENGTH}
characters, each a token character (RFC 9110 5.6.2) or C{/} and C{=}
(base64): never a space, quote or control character that could bend a log
line.

L{RequestIds} is made once per runtime from the configuration; the
listener asks it for the ID of each request (L{RequestIds.forRequest}).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from edgeproxy.h1.fields import Fields
from edgeproxy.h1.syntax import linePrefix

__all__ = ["MAX_LENGTH", "RequestIds", "isWellFormed"]

MAX_LENGTH = 200
"""The longest ID accepted from a trusted proxy (Heroku's bound; the
pattern below says it too)."""

_WELL_FORMED = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z/=]{1,200}\Z")

_BATCH = 128
"""IDs made from one read of the random source."""


def isWellFormed(value: bytes) -> bool:
    """Whether C{value} may be kept as a request ID (see the module docstring)."""
    return _WELL_FORMED.match(value) is not None


class RequestIds:
    """
    The request-ID policy of one configuration.

    @ivar name: the field's name, lower case (C{b"x-request-id"}).
    @ivar prefix: the start of its HTTP/1.1 field line (C{b"X-Request-ID: "}).
    """

    __slots__ = ("_pool", "_random", "name", "prefix")

    def __init__(self, name: str, randomBytes: Callable[[int], bytes] = os.urandom) -> None:
        """
        @param name: the field's name (a token, as configured).
        @param randomBytes: the random source (tests pass a seeded one).
        """
        self.name = name.lower().encode("ascii")
        self.prefix = linePrefix(self.name)
        self._random = randomBytes
        self._pool: list[bytes] = []

    def generate(self) -> bytes:
        """A fresh ID: 32 hex digits."""
        pool = self._pool
        if not pool:
            self._refill()
        return pool.pop()

    def _refill(self) -> None:
        text = self._random(16 * _BATCH).hex().encode("ascii")
        self._pool.extend([text[i : i + 32] for i in range(0, len(text), 32)])

    def forRequest(self, fields: Fields, trustedPeer: bool) -> bytes:
        """
        The ID of a request with C{fields}: the one a trusted proxy sent
        when it sent exactly one well-formed value, else a fresh one
        (L{generate}, inlined: this is once per request).
        """
        if trustedPeer:
            values = fields.getAll(self.name)
            if len(values) == 1 and isWellFormed(values[0]):
                return values[0]
        pool = self._pool
        if not pool:
            self._refill()
        return pool.pop()

    def line(self, value: bytes) -> bytes:
        """The HTTP/1.1 field line (without CRLF) carrying C{value}."""
        return self.prefix + value
