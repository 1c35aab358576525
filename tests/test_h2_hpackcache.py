"""
Tests for L{edgeproxy.http.h2.hpackcache}: the caching encoder and decoder
give exactly what the library's own give, block after block.
"""

from __future__ import annotations

import hpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgeproxy.http.h2.hpackcache import CachingDecoder, CachingEncoder, indexedOnly, neverIndexed

NAMES = [b":status", b"content-type", b"date", b"x-a", b"set-cookie", b"server"]
VALUES = [b"200", b"404", b"text/plain", b"v1", b"v2", b"x" * 40, b""]

headerLists = st.lists(
    st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), min_size=1, max_size=6),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300)
@given(headerLists, st.lists(st.sampled_from([0, 256, 4096]), max_size=3))
def test_encoderMatchesTheLibrary(lists: list[list[tuple[bytes, bytes]]], sizes: list[int]) -> None:
    """
    The same blocks as the library's encoder, for lists repeated or not,
    with table size changes in between; and a decoder reads them back.
    """
    plain = hpack.Encoder()
    caching = CachingEncoder()
    decoder = hpack.Decoder()
    for index, headers in enumerate(lists):
        if sizes and index % 7 == 3:
            size = sizes[index % len(sizes)]
            plain.header_table_size = size
            caching.header_table_size = size
        expected = plain.encode(list(headers))
        block = caching.encode(list(headers))
        assert block == expected
        assert [tuple(h) for h in decoder.decode(block, raw=True)] == headers



@settings(max_examples=300)
@given(
    headerLists,
    st.lists(st.tuples(st.integers(min_value=0, max_value=6), st.sampled_from([1, 126, 127, 128, 300])), max_size=3),
    st.lists(st.sampled_from([0, 256, 4096]), max_size=3),
)
@example(
    # A table size update before a block opening with a never-indexed field
    # (remembered blocks then refer to evicted entries).
    lists=[[(b":status", b"text/plain"), (b":status", b"200")]] * 4,
    marks=[(0, 1)],
    sizes=[0],
)
def test_neverIndexedFieldsAsTheLibraryReadsThem(
    lists: list[list[tuple[bytes, bytes]]], marks: list[tuple[int, int]], sizes: list[int]
) -> None:
    """
    Lists with never-indexed fields (a request ID, new each time, of any
    length) among the others, with table size changes in between: the
    library's decoder reads the same fields back, those still never to be
    indexed, and the tables end as the library's encoder leaves its own;
    the runs of other fields are written as the library writes them.
    """
    plain = hpack.Encoder()
    caching = CachingEncoder()
    decoder = hpack.Decoder(max_header_list_size=1 << 20)
    for number, headers in enumerate(lists):
        if sizes and number % 7 == 3:
            size = sizes[number % len(sizes)]
            plain.header_table_size = size
            caching.header_table_size = size
        marked: list[tuple[bytes, bytes]] = list(headers)
        for position, length in marks:
            value = (b"%d-" % number).ljust(length, b"v")
            marked.insert(min(position, len(marked)), hpack.NeverIndexedHeaderTuple(b"x-request-id", value))
        block = caching.encode(list(marked))
        plain.encode(list(marked))
        decoded = decoder.decode(block, raw=True)
        assert [tuple(h) for h in decoded] == [tuple(h) for h in marked]
        assert [h.indexable for h in decoded] == [getattr(h, "indexable", True) for h in marked]
        assert caching.header_table.dynamic_entries == plain.header_table.dynamic_entries
        assert decoder.header_table.dynamic_entries == plain.header_table.dynamic_entries
    unmarked = lists[-1]
    assert caching.encode(list(unmarked)) == plain.encode(list(unmarked))


def test_neverIndexedIntegers() -> None:
    """RFC 7541 C.1: the integers of the string lengths, past their prefix."""
    assert neverIndexed(b"a", b"") == b"\x10\x01a\x00"
    assert neverIndexed(b"n", b"v" * 127)[3:5] == b"\x7f\x00"
    assert neverIndexed(b"n", b"v" * 1337)[3:6] == b"\x7f\xba\x09"


def test_neverIndexedFieldKeepsTheRestRemembered() -> None:
    encoder = CachingEncoder()
    headers = [(b":status", b"200"), (b"content-type", b"text/plain")]
    encoder.encode(headers + [hpack.NeverIndexedHeaderTuple(b"x-request-id", b"1")])
    remembered = encoder.encode(headers)
    block = encoder.encode(headers + [hpack.NeverIndexedHeaderTuple(b"x-request-id", b"2")])
    # RFC 7541 6.2.3: a literal never indexed, with a literal name; no
    # Huffman coding (5.2).
    assert block == remembered + b"\x10\x0cx-request-id\x012"
    assert len(encoder.header_table.dynamic_entries) == 1

sensitiveLists = st.lists(
    st.lists(
        st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES), st.booleans()), min_size=1, max_size=6
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300)
@given(sensitiveLists, st.lists(st.integers(min_value=0, max_value=29), max_size=10))
def test_decoderMatchesTheLibrary(lists: list[list[tuple[bytes, bytes, bool]]], again: list[int]) -> None:
    """
    Blocks with indexed fields, literals indexed and never indexed, some
    sent again later: the caching decoder reads what the library reads.
    """
    encoder = hpack.Encoder()
    plain = hpack.Decoder()
    caching = CachingDecoder(65536)
    blocks = []
    for index, headers in enumerate(lists):
        block = encoder.encode(headers)
        blocks.append(block)
        assert caching.decode(block, raw=True) == plain.decode(block, raw=True)
        if index in again:
            # The same bytes once more (a cached answer when nothing changed).
            assert caching.decode(block, raw=True) == plain.decode(block, raw=True)
    for index in again:
        # An earlier block after the tables moved on: whatever it means now
        # (or fails as), the same for both.
        if index < len(blocks):
            assert _outcome(caching, blocks[index]) == _outcome(plain, blocks[index])


def _outcome(decoder: hpack.Decoder, block: bytes) -> object:
    try:
        return decoder.decode(block, raw=True)
    except hpack.HPACKError as error:
        return type(error)


def test_repeatedBlocksAreIndexedOnly() -> None:
    encoder = CachingEncoder()
    headers = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-a", b"v1")]
    first = encoder.encode(headers)
    assert not indexedOnly(first)
    second = encoder.encode(headers)
    assert indexedOnly(second) and len(second) == 3
    assert encoder.encode(headers) is second


def test_cachedDecodeKeepsTheListSizeLimit() -> None:
    encoder = hpack.Encoder()
    decoder = CachingDecoder(65536)
    headers = [(b"x-big", b"v" * 1000)]
    decoder.decode(encoder.encode(headers), raw=True)
    block = encoder.encode(headers)
    assert decoder.decode(block, raw=True) == [(b"x-big", b"v" * 1000)]
    decoder.max_header_list_size = 100
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(block, raw=True)


def test_decodedListIsTheCallers() -> None:
    encoder = hpack.Encoder()
    decoder = CachingDecoder(65536)
    headers = [(b"x-a", b"v1")]
    decoder.decode(encoder.encode(headers), raw=True)
    block = encoder.encode(headers)
    first = decoder.decode(block, raw=True)
    first.append((b"mine", b"x"))
    assert decoder.decode(block, raw=True) == [(b"x-a", b"v1")]


def test_literalsWithoutIndexingAreRemembered() -> None:
    """
    nghttp2 sends C{:path} as a literal without indexing (RFC 7541 6.2.2):
    such a block changes no table, and is decoded once.
    """
    block = bytes.fromhex("04032f316b87")  # :path /1k (no indexing), :scheme https
    decoder = CachingDecoder(65536)
    first = decoder.decode(block, raw=True)
    calls: list[bytes] = []
    original = hpack.Decoder.decode

    def counting(self: hpack.Decoder, data: bytes, raw: bool = False) -> object:
        calls.append(data)
        return original(self, data, raw)

    hpack.Decoder.decode = counting  # type: ignore[method-assign]
    try:
        assert decoder.decode(block, raw=True) == first == [(b":path", b"/1k"), (b":scheme", b"https")]
    finally:
        hpack.Decoder.decode = original  # type: ignore[method-assign]
    assert calls == []


def test_blockThatIndexesForgetsTheOthers() -> None:
    encoder = hpack.Encoder()
    decoder = CachingDecoder(65536)
    plain = hpack.Decoder()
    literal = bytes.fromhex("04032f316b")
    assert decoder.decode(literal, raw=True) == plain.decode(literal, raw=True)
    indexing = encoder.encode([(b"x-new", b"1")])
    assert decoder.decode(indexing, raw=True) == plain.decode(indexing, raw=True)
    assert decoder._known == {}
