"""
Tests for L{edgeproxy.locations}: what a redirect's Location may hold,
whatever the request holds.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.config.redirects import parseTemplate
from edgeproxy.locations import encodeURIPart, expand, validHost
from edgeproxy.pipeline.redirect import redirectResponse

_PRINTABLE = set(range(0x21, 0x7F))


def test_encodeKeepsWhatAURIMayHoldAndItsEscapes() -> None:
    assert encodeURIPart(b"/a/b;c=d?x=1&y=%2F") == b"/a/b;c=d?x=1&y=%2F"
    assert encodeURIPart(b"/a b\r\nSet-Cookie: x") == b"/a%20b%0D%0ASet-Cookie:%20x"
    assert encodeURIPart(b"/\\evil/\x00\x7f\xff") == b"/%5Cevil/%00%7F%FF"
    # A "%" that starts no escape is encoded itself.
    assert encodeURIPart(b"/100%/%4") == b"/100%25/%254"
    assert encodeURIPart(b'/"<>^`{|}[]#') == b"/%22%3C%3E%5E%60%7B%7C%7D%5B%5D%23"


@given(st.binary(max_size=64))
def test_encodedIsAlwaysPrintableASCII(data: bytes) -> None:
    assert set(encodeURIPart(data)) <= _PRINTABLE


@given(path=st.binary(max_size=40), query=st.binary(max_size=40))
def test_expandedTemplatesKeepTheirHost(path: bytes, query: bytes) -> None:
    # Whatever the path and query hold, the Location is one printable
    # field value that names the template's host (or is a path that does
    # not start with //).
    path = b"/" + path
    query = b"?" + query if query else b""
    for template, prefix in [
        ("https://example.com$request_uri", b"https://example.com/"),
        ("https://example.com$path$is_args$args", b"https://example.com/"),
        ("https://$host$request_uri", b"https://good.example/"),
        ("/new$request_uri", b"/new/"),
        ("/new/?from=$path&q=$query", b"/new/?from=/"),
    ]:
        location = expand(parseTemplate(template), b"https", "good.example", path, query)
        assert set(location) <= _PRINTABLE
        assert location.startswith(prefix), (template, location)


def test_variables() -> None:
    parts = parseTemplate("$scheme://$host/x$request_uri|$path|$query|$args|$is_args")
    assert expand(parts, b"https", "a.example", b"/p/q", b"?k=v") == (
        b"https://a.example/x/p/q?k=v|/p/q|k=v|k=v|?"
    )
    assert expand(parts, b"http", "a.example", b"/", b"") == b"http://a.example/x/|/|||"


def test_validHost() -> None:
    assert validHost(b"WWW.Example.com:8443") == "www.example.com"
    assert validHost(b"[2001:DB8::1]:80") == "[2001:db8::1]"
    for bad in (b"evil.example/@good", b"a b", b"a\r\nb", b"", None, b"x:99999"):
        assert validHost(bad) is None


def test_redirectResponse() -> None:
    response = redirectResponse(308, b"https://example.com/")
    assert (response.status, response.reason) == (308, b"Permanent Redirect")
    assert response.fields.get(b"location") == b"https://example.com/"
    assert response.body.takeBody() == b"308 Permanent Redirect: https://example.com/\n"  # type: ignore[union-attr]
