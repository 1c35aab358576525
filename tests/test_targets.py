"""
Tests for L{edgeproxy.targets}.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.errors import BadRequest
from edgeproxy.targets import normaliseTarget

NORMALISED = [
    (b"/", b"/", b""),
    (b"/a/b", b"/a/b", b""),
    (b"/a/b?x=1&y=%zz", b"/a/b", b"?x=1&y=%zz"),
    (b"/a?", b"/a", b"?"),
    (b"/a/./b", b"/a/b", b""),
    (b"/a/b/../c", b"/a/c", b""),
    (b"/a/b/..", b"/a/", b""),
    (b"/a/b/.", b"/a/b/", b""),
    (b"/a/..", b"/", b""),
    (b"/.", b"/", b""),
    (b"/a/%2e%2E/b", b"/b", b""),
    (b"/a/.%2e/b", b"/b", b""),
    (b"/%7euser/%41%62c", b"/~user/Abc", b""),
    (b"/%2D%2e%5f%7E", b"/-._~", b""),
    (b"/a%2fb".replace(b"%2f", b"%3a"), b"/a%3Ab", b""),
    (b"/%e2%82%ac", b"/%E2%82%AC", b""),
    (b"/%20", b"/%20", b""),
    (b"/a//b", b"/a//b", b""),
    (b"//", b"//", b""),
    (b"/a//../b", b"/a/b", b""),
    (b"/.well-known/acme", b"/.well-known/acme", b""),
    (b"/a/..b/c.", b"/a/..b/c.", b""),
    (b"/{x}|^`<>[]\"", b"/%7Bx%7D%7C%5E%60%3C%3E%5B%5D%22", b""),
    (b"/a:b@c!$&'()*+,;=", b"/a:b@c!$&'()*+,;=", b""),
    (b"/p?q=/../x", b"/p", b"?q=/../x"),
]


@pytest.mark.parametrize("target,path,query", NORMALISED)
def test_normalised(target: bytes, path: bytes, query: bytes) -> None:
    assert normaliseTarget(target) == (path, query)


REJECTED = [
    b"/..",
    b"/../x",
    b"/a/../../x",
    b"/%2e%2e/x",
    b"/%2E./x",
    b"/a/%2e%2e/%2e%2e/x",
    b"/a%2fb",
    b"/a%2Fb",
    b"/a%5cb",
    b"/a%5Cb",
    b"/a\\..\\b",
    b"/a\\b",
    b"/%",
    b"/%4",
    b"/%zz",
    b"/%%41",
    b"/a%00b",
    b"/a%0d%0ab",
    b"/a%7f",
    b"/a\x00b",
    b"/a b",
    b"/a\tb",
    b"/a\x7fb",
    b"/caf\xc3\xa9",
    b"/a#frag",
    b"/a?q#frag",
    b"/a?q=\x00",
    b"/a?q= x",
    b"/a?q=\xff",
    b"",
    b"a/b",
    b"http://example.com/",
    b"example.com:443",
    b"*",
]


@pytest.mark.parametrize("target", REJECTED)
def test_rejected(target: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        normaliseTarget(target)
    assert caught.value.status == 400


def test_asteriskWhenAllowed() -> None:
    assert normaliseTarget(b"*", allowAsterisk=True) == (b"*", b"")
    with pytest.raises(BadRequest):
        normaliseTarget(b"*/x", allowAsterisk=True)


_VALID_PATH = re.compile(rb"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-F]{2})*")
_SEGMENT_ALPHABET = st.sampled_from(
    [b"a", b"B", b"0", b"-", b"_", b"~", b".", b"..", b"%2e", b"%2E", b"%41", b"%7e", b"%e9", b"%3a",
     b"!", b"$", b"=", b":", b"@", b"{", b"|", b"[", b'"', b"", b"%20"]
)
_SEGMENTS = st.lists(st.lists(_SEGMENT_ALPHABET, max_size=4).map(b"".join), max_size=8)
_TARGETS = _SEGMENTS.map(lambda segments: b"/" + b"/".join(segments))


def _normalisedOrNone(target: bytes) -> tuple[bytes, bytes] | None:
    try:
        return normaliseTarget(target)
    except BadRequest:
        return None


@settings(max_examples=500)
@given(_TARGETS)
def test_idempotent(target: bytes) -> None:
    result = _normalisedOrNone(target)
    if result is not None:
        assert normaliseTarget(result[0] + result[1]) == result


@settings(max_examples=500)
@given(_TARGETS)
def test_noDotSegmentsAndOnlyValidCharacters(target: bytes) -> None:
    result = _normalisedOrNone(target)
    if result is None:
        return
    path = result[0]
    assert _VALID_PATH.fullmatch(path), path
    segments = path.split(b"/")
    assert b"." not in segments and b".." not in segments, path
    assert b"/./" not in path + b"/" and b"/../" not in path + b"/"


@settings(max_examples=500)
@given(st.binary(max_size=40))
def test_arbitraryBytesNeverCrashAndStayValid(raw: bytes) -> None:
    """
    Whatever follows the slash, the result is either a BadRequest or a
    valid, dot-free path.
    """
    result = _normalisedOrNone(b"/" + raw)
    if result is None:
        return
    assert _VALID_PATH.fullmatch(result[0]), result
    assert b"/../" not in result[0] + b"/"
    assert normaliseTarget(result[0] + result[1]) == result


@settings(max_examples=300)
@given(_SEGMENTS)
def test_climbingAboveRootIsRefused(segments: list[bytes]) -> None:
    """
    A path with more ".." than real segments before them is refused, never
    silently clamped to the root.
    """
    depth = 0
    escapes = False
    for segment in segments:
        decoded = segment.replace(b"%2e", b".").replace(b"%2E", b".")
        if decoded == b"..":
            if depth == 0:
                escapes = True
                break
            depth -= 1
        elif decoded != b".":
            depth += 1
    target = b"/" + b"/".join(segments)
    if escapes:
        assert _normalisedOrNone(target) is None
