# -*- test-case-name: tests.test_h2_hpackcache -*-
"""
HPACK (RFC 7541) for one HTTP/2 connection: the C{hpack} library's encoder
and decoder, with the answer for a header block that only names entries of
the tables kept for as long as the tables do not change.

A client sending the same request again (a poll, a load generator, most
requests of a page after the first) sends a block made only of indexed
field representations (RFC 7541 6.1): one byte per field once every field
is in the dynamic table.  Decoding such a block changes nothing in the
table, so the same bytes decode to the same fields until a block that is
not made only of indexed representations is decoded (only those can add
entries, evict them or resize the table).  The same holds the other way for
a response sent again: once its fields are in the encoder's table they
are all written as indexed representations, and writing them changes
nothing.  L{CachingDecoder} and L{CachingEncoder} keep those answers, and
forget them all as soon as a block that may have changed a table goes
through.

A block is "indexed only" when every byte has its high bit set (the
indexed representation, RFC 7541 6.1) and none is C{0xff} (the start of a
multi-byte index): then every byte is one field.  Anything else (literals,
a table size update, a long index) goes through the library unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hpack import Decoder, Encoder

__all__ = ["CachingDecoder", "CachingEncoder", "indexedOnly"]

_NOT_SINGLE_INDEX = bytes(range(0x80, 0xFF))
"""The bytes that are a whole indexed field representation on their own
(RFC 7541 5.1: a 7-bit prefix below its maximum)."""

MAX_CACHED = 64
"""Blocks remembered per table; more empties the cache (a peer sending
ever new blocks only makes it useless, never large)."""


def indexedOnly(block: bytes) -> bool:
    """
    Whether the header block C{block} is made only of one-byte indexed field
    representations, and so changes no table when decoded.
    """
    return not block.translate(None, _NOT_SINGLE_INDEX)


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
        if not raw or not indexedOnly(block):
            if known:
                known.clear()
            return Decoder.decode(self, block, raw)
        hit = known.get(block)
        if hit is not None:
            headers, size = hit
            if size <= self.max_header_list_size:
                # A copy: the caller may keep or change what it gets.
                return list(headers)
        headers = Decoder.decode(self, block, raw)
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
        known = self._known
        if self.header_table.resized or not isinstance(headers, list) or not huffman:
            # A table size update is due (RFC 7541 4.2): it starts the next
            # block, which then changes the table.
            if known:
                known.clear()
            return Encoder.encode(self, headers, huffman)
        key = tuple(headers)
        block = known.get(key)
        if block is not None:
            return block
        block = Encoder.encode(self, headers, huffman)
        if indexedOnly(block):
            if len(known) >= MAX_CACHED:
                known.clear()
            known[key] = block
        elif known:
            known.clear()
        return block
