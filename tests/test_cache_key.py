"""
Tests for L{edgeproxy.cache.key}: what a key is made of, and what it is
never made of (the inputs an attacker could use to poison one URL's entry
from another request).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.cache.key import (
    hostOf,
    includedParts,
    normaliseField,
    parseKeyIncludes,
    purgeURL,
    secondaryKey,
    urlOf,
)
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.testing import makeRequest


@pytest.mark.parametrize(
    "scheme, host, expected",
    [
        (b"https", b"Example.COM", b"example.com"),
        (b"https", b"example.com.", b"example.com"),
        (b"https", b"example.com:443", b"example.com"),
        (b"https", b"example.com.:443", b"example.com"),
        (b"https", b"example.com:8443", b"example.com:8443"),
        (b"http", b"example.com:80", b"example.com"),
        (b"http", b"example.com:443", b"example.com:443"),
        (b"https", b"[2001:DB8::1]:443", b"[2001:db8::1]"),
        (b"https", b"[2001:db8::1]:8443", b"[2001:db8::1]:8443"),
    ],
)
def test_host(scheme: bytes, host: bytes, expected: bytes) -> None:
    assert hostOf(scheme, host) == expected


def test_url() -> None:
    assert urlOf(b"https", b"A.example", b"/p/q", b"?x=1&y") == b"https://a.example/p/q?x=1&y"
    assert urlOf(b"https", b"a.example", b"/p", b"?") == b"https://a.example/p?"
    assert urlOf(b"https", b"a.example", b"/p", b"") == b"https://a.example/p"


def test_schemesAreDifferentKeys() -> None:
    assert urlOf(b"http", b"a.example", b"/", b"") != urlOf(b"https", b"a.example", b"/", b"")


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30))
def test_unkeyedFieldsNeverChangeTheKey(text: str) -> None:
    """
    Fields an origin may read but the key ignores (X-Forwarded-Host,
    X-Original-URL, Forwarded...) cannot give one URL another's entry: the
    key is the same whatever they hold.
    """
    parts = parseKeyIncludes(["header:x-device"])
    base = Fields([(b"host", b"a.example"), (b"x-device", b"phone")])
    value = text.encode("ascii")
    poisoned = base.withField(b"x-forwarded-host", value).withField(
        b"x-original-url", b"/admin"
    ).withField(b"forwarded", b"host=evil.example")
    assert includedParts(parts, base) == includedParts(parts, poisoned)


def test_includedParts() -> None:
    parts = parseKeyIncludes(["header:x-device", "cookie:lang"])
    one = Fields([(b"x-device", b"phone"), (b"cookie", b"a=1; lang=fr; b=2")])
    two = Fields([(b"x-device", b"phone"), (b"cookie", b"lang=de")])
    none = Fields([])
    assert includedParts(parts, one) == b"\x00h:x-device=phone\x00c:lang=fr"
    assert includedParts(parts, two) == b"\x00h:x-device=phone\x00c:lang=de"
    assert includedParts(parts, none) == b"\x00h:x-device=\x00c:lang="
    # A cookie named like another one's suffix is not it.
    assert includedParts(parts, Fields([(b"cookie", b"xlang=fr")])) == b"\x00h:x-device=\x00c:lang="


@pytest.mark.parametrize(
    "name, values, expected",
    [
        (b"accept-encoding", [b"gzip, br"], b"br,gzip"),
        (b"accept-encoding", [b"br;q=1.0, gzip;q=0.5", b"identity"], b"br,gzip,identity"),
        (b"accept-encoding", [b"gzip;q=0, br"], b"br"),
        (b"accept-encoding", [b"gzip, x-made-up-" + b"a" * 100], b"gzip"),
        (b"accept-encoding", [], b""),
        (b"accept-language", [b"EN-us,  fr;q=0.5"], b"en-us,fr;q=0.5"),
        (b"x-custom", [b"A,  B", b"C"], b"A,B,C"),
    ],
)
def test_normaliseField(name: bytes, values: list[bytes], expected: bytes) -> None:
    assert normaliseField(name, values) == expected


class Compressing:
    """A later stage that chooses a variant (the pipeline's contract)."""

    varyField = b"accept-encoding"

    def variant(self, request: object) -> bytes:
        fields = request.fields  # type: ignore[attr-defined]
        return b"br" if b"br" in (fields.get(b"accept-encoding") or b"") else b"identity"


def test_secondaryKeyUsesTheLaterStagesVariantWhenChosen() -> None:
    variants = {b"accept-encoding": Compressing()}
    a = makeRequest(fields=[(b"host", b"a"), (b"accept-encoding", b"br, gzip, deflate, zstd")])
    b = makeRequest(fields=[(b"host", b"a"), (b"accept-encoding", b"br;q=0.9, made-up")])
    c = makeRequest(fields=[(b"host", b"a"), (b"accept-encoding", b"gzip")])
    names = (b"accept-encoding",)
    chosen = names
    assert secondaryKey(names, a, variants, chosen) == secondaryKey(names, b, variants, chosen)
    assert secondaryKey(names, a, variants, chosen) != secondaryKey(names, c, variants, chosen)
    # Not chosen (the stage did not make the response), or no such stage:
    # the field's normalised value.
    assert secondaryKey(names, a, variants) != secondaryKey(names, b, variants)
    assert secondaryKey(names, a, {}, chosen) == secondaryKey(names, a, variants)


@given(st.text(alphabet="abrgzipdeflate:=,; ", max_size=20))
def test_aChoiceNeverReadsAsAValue(written: str) -> None:
    """
    However a client writes the field, its value's part of the key is never
    the part of a stage's choice (an entry stored as the br variant is not
    found by a client whose own field normalises to "br").
    """
    variants = {b"accept-encoding": Compressing()}
    names = (b"accept-encoding",)
    chooser = makeRequest(fields=[(b"host", b"a"), (b"accept-encoding", b"br")])
    other = makeRequest(fields=[(b"host", b"a"), (b"accept-encoding", written.strip().encode("ascii"))])
    assert secondaryKey(names, chooser, variants, names) != secondaryKey(names, other, variants)


@pytest.mark.parametrize(
    "text, prefix, expected",
    [
        ("https://A.example/x?y=1", False, b"https://a.example/x?y=1"),
        ("https://a.example:443/x", False, b"https://a.example/x"),
        ("https://a.example/./x/../y", False, b"https://a.example/y"),
        ("https://a.example/%7Euser", False, b"https://a.example/~user"),
        ("https://a.example", False, b"https://a.example/"),
        ("https://a.example", True, b"https://a.example/"),
        ("https://a.example/img", True, b"https://a.example/img"),
        ("http://a.example:8080/", False, b"http://a.example:8080/"),
    ],
)
def test_purgeURL(text: str, prefix: bool, expected: bytes) -> None:
    assert purgeURL(text, prefix) == expected


@pytest.mark.parametrize("text", ["a.example/x", "ftp://a.example/", "https:///x", "https://u@a.example/"])
def test_purgeURLRefused(text: str) -> None:
    with pytest.raises(ValueError):
        purgeURL(text)


def test_purgeURLIsTheRequestsKey() -> None:
    request = makeRequest(path=b"/a/b", query=b"?q=1", host=b"Shop.Example:443")
    assert purgeURL("https://shop.example/a/b?q=1") == urlOf(
        request.connection.scheme, request.host, request.path, request.query
    )
