"""
Negotiation tables: the content coding chosen from C{Accept-Encoding}, the
image format from C{Accept}, for the offers routes make.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.content.negotiate import chooseEncoding, chooseImageFormat, parseWeighted

ALL = (b"zstd", b"br", b"gzip")


@pytest.mark.parametrize(
    "header, offered, expected",
    [
        # Ties go to the route's order, whatever the client's order.
        (b"gzip, deflate, br, zstd", ALL, b"zstd"),
        (b"gzip, deflate, br", ALL, b"br"),
        (b"gzip, deflate", ALL, b"gzip"),
        (b"gzip, deflate, br, zstd", (b"gzip", b"br"), b"gzip"),
        # q-values rank before the offer's order.
        (b"gzip;q=1, br;q=0.5", ALL, b"gzip"),
        (b"zstd;q=0.2, br;q=0.9, gzip;q=0.9", ALL, b"br"),
        (b"zstd; q=0.2 ,br ;Q=0.900", ALL, b"br"),
        # Case does not matter; x-gzip is gzip (RFC 9110 8.4.1.3).
        (b"GZIP", ALL, b"gzip"),
        (b"x-gzip", ALL, b"gzip"),
        # q=0 means "not acceptable".
        (b"zstd;q=0, br;q=0, gzip", ALL, b"gzip"),
        (b"gzip;q=0", ALL, b"identity"),
        # "*" matches what is not named.
        (b"*", ALL, b"zstd"),
        (b"*, zstd;q=0", ALL, b"br"),
        (b"*;q=0.5, gzip", ALL, b"gzip"),
        (b"*;q=0", ALL, b"identity"),
        # identity preferred by the client wins; excluded identity does not
        # make a coding the client refused acceptable.
        (b"br;q=0.5, identity", ALL, b"identity"),
        (b"br, identity;q=0.5", ALL, b"br"),
        (b"identity;q=0", ALL, b"identity"),
        (b"identity;q=0, gzip;q=0.1", ALL, b"gzip"),
        (b"identity", ALL, b"identity"),
        # An empty field accepts identity only; unknown codings are ignored.
        (b"", ALL, b"identity"),
        (b"deflate, compress", ALL, b"identity"),
        # A malformed weight drops its entry, not the field.
        (b"zstd;q=2, br;q=abc, gzip;q=0.5", ALL, b"gzip"),
        (b"zstd;q=0.1234, gzip", ALL, b"gzip"),
        # Other parameters are ignored.
        (b"br;level=3;q=0.8, gzip;q=0.7", ALL, b"br"),
        # Nothing offered matches.
        (b"br", (b"gzip",), b"identity"),
    ],
)
def test_chooseEncoding(header: bytes, offered: tuple[bytes, ...], expected: bytes) -> None:
    assert chooseEncoding([header], offered) == expected


def test_noAcceptEncodingIsIdentity() -> None:
    assert chooseEncoding([], ALL) == b"identity"


def test_severalFieldLinesAreOneList() -> None:
    assert chooseEncoding([b"gzip;q=0.5", b"br"], ALL) == b"br"


@pytest.mark.parametrize(
    "header, offered, expected",
    [
        # Chrome, Firefox, Safari (image requests).
        (b"image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8", (b"avif", b"webp"), b"avif"),
        (b"image/avif,image/webp,*/*", (b"webp", b"avif"), b"webp"),
        (b"image/webp,*/*", (b"avif", b"webp"), b"webp"),
        (b"image/webp,image/avif,image/jxl,image/heic,image/*,*/*;q=0.8", (b"avif", b"webp"), b"avif"),
        # Only a type named explicitly counts.
        (b"image/*", (b"avif", b"webp"), None),
        (b"*/*", (b"avif", b"webp"), None),
        (b"image/png,image/jpeg", (b"avif", b"webp"), None),
        # Weights rank first, excluded types are not chosen.
        (b"image/avif;q=0.5,image/webp", (b"avif", b"webp"), b"webp"),
        (b"image/avif;q=0,image/webp;q=0.1", (b"avif", b"webp"), b"webp"),
        (b"IMAGE/AVIF", (b"avif",), b"avif"),
        (b"image/avif", (b"webp",), None),
        (b"", (b"avif", b"webp"), None),
    ],
)
def test_chooseImageFormat(header: bytes, offered: tuple[bytes, ...], expected: bytes | None) -> None:
    assert chooseImageFormat([header], offered) == expected


def test_noAcceptIsNoConversion() -> None:
    assert chooseImageFormat([], (b"avif", b"webp")) is None


def test_parseWeighted() -> None:
    assert parseWeighted([b"a;q=0.5, b ; x=1 ; q=1.0, c;q=1.1, a;q=1, ,d"]) == {
        b"a": 0.5,
        b"b": 1.0,
        b"d": 1.0,
    }


@given(st.lists(st.sampled_from([b"gzip", b"br", b"zstd", b"identity", b"*", b"deflate"]), max_size=6),
       st.lists(st.sampled_from([b"", b";q=0", b";q=0.5", b";q=1", b";q=0.001", b";q=x"]), min_size=6, max_size=6))
def test_choiceIsAlwaysAcceptableOrIdentity(names: list[bytes], weights: list[bytes]) -> None:
    """
    Whatever the field says, the choice is identity or an offered coding the
    client gave a weight above zero (directly or through "*").
    """
    header = b", ".join(name + weight for name, weight in zip(names, weights))
    chosen = chooseEncoding([header], ALL)
    if chosen == b"identity":
        return
    assert chosen in ALL
    parsed = parseWeighted([header])
    weight = parsed.get(chosen, parsed.get(b"*"))
    assert weight is not None and weight > 0
