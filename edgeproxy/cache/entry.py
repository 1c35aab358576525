# -*- test-case-name: tests.test_cache_disk,tests.test_cache_memory,tests.test_cache_variants -*-
"""
What the cache stores: L{Entry}, one complete response with what its
freshness depends on, and L{Variants}, the marker that a URL's responses
vary (on which request fields).

Both are immutable: a validation that refreshes an entry (a C{304}) makes
a new one.  An entry's body is in memory (C{body}) or in a file of the
disk tier (C{path}, the body starting at C{offset}); the fields are those
the client gets (no framing, no C{Surrogate-Key}, no targeted field), with
a C{Date}.

L{encodeMeta} and L{decodeMeta} turn everything but the body into bytes
for the disk tier (its index, and the head of each object file, from which
the index can be rebuilt).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from edgeproxy.cache.freshness import Policy, currentAge
from edgeproxy.h1.errors import LocalProtocolError
from edgeproxy.h1.fields import Fields

__all__ = ["OVERHEAD", "Entry", "Variants", "decodeMeta", "encodeMeta"]

OVERHEAD = 256
"""Bytes charged to each stored object beyond its body and fields (the
memory tier's bound counts them, so many tiny objects cannot exceed it)."""


class Entry(NamedTuple):
    """One stored response."""

    key: bytes
    """The full key: primary, then the secondary key when it varies."""
    url: bytes
    """The URL part of the key (what purges by URL and prefix compare)."""
    status: int
    reason: bytes
    fields: Fields
    length: int
    """The body's length."""
    responseTime: float
    """When the response (or the 304 that refreshed it) arrived."""
    initialAge: float
    """Its corrected initial age (RFC 9111 4.2.3)."""
    policy: Policy
    tags: tuple[bytes, ...] = ()
    """Surrogate keys (C{Surrogate-Key}, C{Cache-Tag}) to purge it by."""
    targeted: tuple[bytes, ...] = ()
    """The targeted field's values (taken out of C{fields}; a 304 that
    brings none keeps these)."""
    body: bytes | None = None
    """The body, for the memory tier."""
    path: str | None = None
    """The file holding the body, for the disk tier."""
    offset: int = 0
    """Where the body starts in C{path}."""

    def age(self, now: float) -> float:
        return currentAge(self.initialAge, self.responseTime, now)

    @property
    def size(self) -> int:
        """Bytes the memory tier charges for it."""
        fields = sum(len(name) + sum(len(v) + 4 for v in values) for name, values in self.fields.raw().items())
        return self.length + fields + len(self.key) + len(self.url) + OVERHEAD

    def etag(self) -> bytes | None:
        return self.fields.get(b"etag")

    def lastModified(self) -> bytes | None:
        return self.fields.get(b"last-modified")


class Variants(NamedTuple):
    """
    The marker stored under a primary key whose responses vary: the
    request fields (C{Vary}) their secondary keys are made of, and which of
    them are keyed on a later stage's choice rather than on their value
    (L{edgeproxy.cache.key.secondaryKey}), as the last response stored for
    the URL was.
    """

    key: bytes
    url: bytes
    names: tuple[bytes, ...]
    chosen: tuple[bytes, ...] = ()
    """The names keyed on the choice of the stage that made the response."""

    @property
    def size(self) -> int:
        return len(self.key) + len(self.url) + sum(len(n) for n in self.names + self.chosen) + OVERHEAD


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _bytes(value: str) -> bytes:
    return value.encode("latin-1")


def encodeMeta(item: Entry | Variants) -> bytes:
    """Everything of C{item} but a body, as bytes (JSON)."""
    if isinstance(item, Variants):
        document: dict[str, Any] = {
            "v": 1,
            "kind": "variants",
            "key": _text(item.key),
            "url": _text(item.url),
            "names": [_text(name) for name in item.names],
            "chosen": [_text(name) for name in item.chosen],
        }
    else:
        policy = item.policy
        document = {
            "v": 1,
            "kind": "entry",
            "key": _text(item.key),
            "url": _text(item.url),
            "status": item.status,
            "reason": _text(item.reason),
            "fields": [[_text(n), _text(v)] for n, v in item.fields.pairs()],
            "length": item.length,
            "responseTime": item.responseTime,
            "initialAge": item.initialAge,
            "policy": [
                policy.lifetime,
                policy.mustRevalidate,
                policy.noCache,
                policy.staleWhileRevalidate,
                policy.staleIfError,
                policy.heuristic,
            ],
            "tags": [_text(t) for t in item.tags],
            "targeted": [_text(t) for t in item.targeted],
        }
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def decodeMeta(data: bytes, path: str | None = None, offset: int = 0) -> Entry | Variants:
    """
    The item L{encodeMeta} wrote (with its body in C{path} at C{offset}).

    @raise ValueError: not such bytes.
    """
    try:
        document = json.loads(data)
        if document.get("v") != 1:
            raise ValueError("unknown version")
        if document["kind"] == "variants":
            names = tuple(_bytes(n) for n in document["names"])
            # A marker written before "chosen" was: its entries were keyed
            # on the stages' choices, some wrongly.  Read as chosen, its
            # lookups use the "name:choice" parts that none of them has:
            # they are never served, and age out.
            chosen = tuple(_bytes(n) for n in document["chosen"]) if "chosen" in document else names
            return Variants(_bytes(document["key"]), _bytes(document["url"]), names, chosen)
        lifetime, mustRevalidate, noCache, swr, sie, heuristic = document["policy"]
        return Entry(
            key=_bytes(document["key"]),
            url=_bytes(document["url"]),
            status=int(document["status"]),
            reason=_bytes(document["reason"]),
            # Checked again: a damaged file must not put a line break on the wire.
            fields=Fields((_bytes(n), _bytes(v)) for n, v in document["fields"]),
            length=int(document["length"]),
            responseTime=float(document["responseTime"]),
            initialAge=float(document["initialAge"]),
            policy=Policy(float(lifetime), bool(mustRevalidate), bool(noCache), swr, sie, bool(heuristic)),
            tags=tuple(_bytes(t) for t in document["tags"]),
            targeted=tuple(_bytes(t) for t in document["targeted"]),
            path=path,
            offset=offset,
        )
    except (KeyError, TypeError, ValueError, UnicodeError, LocalProtocolError) as e:
        raise ValueError(f"not a stored object's metadata: {e}") from None
