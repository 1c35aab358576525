# -*- test-case-name: tests.test_h2_hpackcache -*-
"""
HPACK (RFC 7541) for one HTTP/2 connection: the C{hpack} library's encoder
and decoder, with the answer for a header block that changed nothing in the
tables kept for as long as the tables do not change.

A client sending the same request again (a poll, a load generator, most
requests of a page after the first) sends the same block again: its fields
are indexed representations of entries already in the tables (RFC 7541
6.1), or literals "without indexing" (6.2.2, as nghttp2 sends C{:path}).
Decoding such a block changes nothing in the dynamic table, so the same
bytes decode to the same fields until a block that does change it (a
literal with incremental indexing, a table size update) is decoded.  The
same holds the other way for a response sent again: once its fields are in
the encoder's table they are all written as indexed representations, and
writing them changes nothing.  L{CachingDecoder} and L{CachingEncoder} keep
those answers, and forget them all as soon as a block changes a table.

A field the server marks never to be indexed (a C{NeverIndexedHeaderTuple},
such as a request ID, whose value is new in every response) is a literal
that changes no table (RFC 7541 6.2.3): the encoder writes it on its own
and keeps the answers for the fields around it, so one such field does not
make every block new.  It is written as a literal name and value without
Huffman coding (which RFC 7541 5.2 leaves to the encoder): its value is new
each time, and coding it costs more than the few bytes it saves.

Whether a block changed a table is read from the table itself: its size
limit, its number of entries and its newest entry (every insertion puts a
new one first) are the same before and after.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hpack import Decoder, Encoder, HeaderTuple

__all__ = ["CachingDecoder", "CachingEncoder", "indexedOnly", "neverIndexed"]

_NOT_SINGLE_INDEX = bytes(range(0x80, 0xFF))
"""The bytes that are a whole indexed field representation on their own
(RFC 7541 5.1: a 7-bit prefix below its maximum)."""

MAX_CACHED = 64
"""Blocks remembered per table; more empties the cache (a peer sending
ever new blocks only makes it useless, never large)."""


def indexedOnly(block: bytes) -> bool:
    """
    Whether the header block C{block} is made only of one-byte indexed field
    representations (and so can change no table).
    """
    return not block.translate(None, _NOT_SINGLE_INDEX)


def neverIndexed(name: bytes, value: bytes) -> bytes:
    """
    The representation of a field never to be indexed, its name a literal
    (RFC 7541 6.2.3, index 0), both strings without Huffman coding (5.2).
    """
    return b"\x10" + _string(name) + _string(value)


def _string(data: bytes) -> bytes:
    """A string literal without Huffman coding (RFC 7541 5.2)."""
    return _integer(len(data), 7) + data


def _integer(value: int, prefixBits: int) -> bytes:
    """An integer with an N-bit prefix (RFC 7541 5.1), the prefix's other
    bits zero."""
    limit = (1 << prefixBits) - 1
    if value < limit:
        return bytes((value,))
    octets = [limit]
    value -= limit
    while value >= 0x80:
        octets.append(value & 0x7F | 0x80)
        value >>= 7
    octets.append(value)
    return bytes(octets)


def _state(table: Any) -> tuple[int, int, Any]:
    """What changes in a header table whenever its contents change."""
    entries = table.dynamic_entries
    return (table.maxsize, len(entries), entries[0] if entries else None)


def _same(before: tuple[int, int, Any], after: tuple[int, int, Any]) -> bool:
    return before[0] == after[0] and before[1] == after[1] and before[2] is after[2]


class CachingDecoder(Decoder):
    """
    L{hpack.Decoder} that answers an indexed-only block it decoded before
    without decoding it again, while the dynamic table is unchanged.
    """

    def __init__(self, maxHeaderListSize: int) -> None:
        Decoder.__init__(self, maxHeaderListSize)
        self._known: dict[bytes, tuple[list[Any], int]] = {}

    def decode(self, data: bytes, raw: bool = False) -> Iterable[Any]:
        block = bytes(data)
        known = self._known
        if raw:
            hit = known.get(block)
            if hit is not None:
                remembered, size = hit
                if size <= self.max_header_list_size:
                    # A copy: the caller may keep or change what it gets.
                    return list(remembered)
        before = _state(self.header_table)
        headers = list(Decoder.decode(self, block, raw))
        if not raw or not _same(before, _state(self.header_table)):
            if known:
                known.clear()
            return headers
        if len(known) >= MAX_CACHED:
            known.clear()
        # RFC 7541 4.1: what the decoder counted against the list size.
        known[block] = (list(headers), sum(len(n) + len(v) + 32 for n, v in headers))
        return headers


class CachingEncoder(Encoder):
    """
    L{hpack.Encoder} that writes a header list it wrote before as the same
    bytes, while that writing was indexed only and the table is unchanged.

    Only lists of C{(name, value)} pairs of bytes are remembered (what the
    server writes); anything else is encoded as the library does.
    """

    def __init__(self) -> None:
        Encoder.__init__(self)
        self._known: dict[tuple[Any, ...], bytes] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if not isinstance(headers, list) or not huffman:
            if self._known:
                self._known.clear()
            return Encoder.encode(self, headers, huffman)
        # The block is the fields' representations in order (RFC 7541 3.2):
        # the runs between never-indexed fields, each remembered, and those
        # fields.
        parts: list[bytes] = []
        start = 0
        for index, pair in enumerate(headers):
            if isinstance(pair, HeaderTuple) and not pair.indexable:
                if index > start:
                    parts.append(self._encodeRun(headers[start:index]))
                if self.header_table.resized:
                    # RFC 7541 4.2: a table size update opens the block,
                    # and may have evicted what remembered blocks refer to.
                    self._known.clear()
                    parts.append(Encoder.encode(self, []))
                parts.append(neverIndexed(pair[0], pair[1]))
                start = index + 1
        if not parts:
            return self._encodeRun(headers)
        if start < len(headers):
            parts.append(self._encodeRun(headers[start:]))
        return b"".join(parts)

    def _encodeRun(self, headers: list[Any]) -> bytes:
        """C{headers} (no never-indexed field among them) as the library
        writes them, remembered while that changes no table."""
        known = self._known
        key = tuple(headers)
        table = self.header_table
        if not table.resized:
            block = known.get(key)
            if block is not None:
                return block
        before = _state(table)
        resized = table.resized
        block = Encoder.encode(self, headers)
        if resized or not _same(before, _state(table)):
            # A table size update (RFC 7541 4.2) or new entries: every
            # block remembered may now mean something else.
            if known:
                known.clear()
            return block
        if len(known) >= MAX_CACHED:
            known.clear()
        known[key] = block
        return block
