"""
Tests for L{edgeproxy.http.h2.hpackcache}: the caching encoder and decoder
give exactly what the library's own give, block after block.
"""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.http.h2.hpackcache import CachingDecoder, CachingEncoder, indexedOnly

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
@given(headerLists)
def test_decoderMatchesTheLibrary(lists: list[list[tuple[bytes, bytes]]]) -> None:
    encoder = hpack.Encoder()
    plain = hpack.Decoder()
    caching = CachingDecoder(65536)
    for headers in lists:
        block = encoder.encode(headers)
        expected = plain.decode(block, raw=True)
        assert caching.decode(block, raw=True) == expected
        # Again: a repeated indexed-only block comes from the cache.
        if indexedOnly(block):
            assert caching.decode(block, raw=True) == expected
            plain.decode(block, raw=True)


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
