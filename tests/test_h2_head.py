"""
Tests for L{edgeproxy.http.h2.head}: HTTP/2 request header lists, read or
refused.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.http.h2.head import Malformed, Refused, readRequestHead

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"), (b":path", b"/")]


def read(headers: list[tuple[bytes, bytes]], maxFields: int = 100, maxSize: int = 16384, connect: bool = True):
    return readRequestHead(headers, maxFields, maxSize, connect)


def test_plainRequest() -> None:
    head = read(BASE + [(b"accept", b"*/*"), (b"content-length", b"12")])
    assert (head.method, head.target, head.host, head.length, head.protocol) == (
        b"GET", b"/", b"example.com", 12, None
    )
    assert list(head.fields.pairs()) == [
        (b"host", b"example.com"), (b"accept", b"*/*"), (b"content-length", b"12")
    ]


def test_hostFieldWithoutAuthority() -> None:
    head = read([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", b"a.test")])
    assert head.host == b"a.test" and head.fields.getAll(b"host") == [b"a.test"]


def test_hostFieldAgreeingWithAuthority() -> None:
    head = read(BASE + [(b"host", b"EXAMPLE.com")])
    assert head.fields.getAll(b"host") == [b"example.com"]


def test_cookiesJoined() -> None:
    head = read(BASE + [(b"cookie", b"a=1"), (b"x", b"y"), (b"cookie", b"b=2"), (b"cookie", b"c=3")])
    assert head.fields.getAll(b"cookie") == [b"a=1; b=2; c=3"]


def test_extendedConnect() -> None:
    head = read(
        [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
         (b":authority", b"example.com"), (b":path", b"/chat")]
    )
    assert head.protocol == b"websocket" and head.target == b"/chat"


MALFORMED = [
    ("uppercase name", BASE + [(b"Accept", b"x")]),
    ("space in name", BASE + [(b"x y", b"x")]),
    ("colon in name", BASE + [(b"x:y", b"x")]),
    ("non-ASCII name", BASE + [(b"\xc3\xa9", b"x")]),
    ("empty name", BASE + [(b"", b"x")]),
    ("NUL in value", BASE + [(b"x", b"a\x00b")]),
    ("CR in value", BASE + [(b"x", b"a\rb")]),
    ("LF in value", BASE + [(b"x", b"a\nb")]),
    ("leading space", BASE + [(b"x", b" a")]),
    ("trailing tab", BASE + [(b"x", b"a\t")]),
    ("connection", BASE + [(b"connection", b"close")]),
    ("keep-alive", BASE + [(b"keep-alive", b"5")]),
    ("proxy-connection", BASE + [(b"proxy-connection", b"x")]),
    ("transfer-encoding", BASE + [(b"transfer-encoding", b"chunked")]),
    ("upgrade", BASE + [(b"upgrade", b"websocket")]),
    ("te gzip", BASE + [(b"te", b"gzip")]),
    ("unknown pseudo", BASE + [(b":foo", b"x")]),
    ("response pseudo", BASE + [(b":status", b"200")]),
    ("pseudo after regular", [(b":method", b"GET"), (b"x", b"y"), (b":scheme", b"https"), (b":path", b"/")]),
    ("repeated method", BASE + [(b":method", b"GET")]),
    ("repeated path", [(b":path", b"/"), *BASE]),
    ("repeated scheme", [(b":scheme", b"http"), *BASE]),
    ("repeated authority", [(b":authority", b"a"), *BASE]),
    ("no method", BASE[1:]),
    ("no scheme", [BASE[0], BASE[2], BASE[3]]),
    ("no path", BASE[:3]),
    ("empty path", BASE[:3] + [(b":path", b"")]),
    ("protocol without CONNECT", BASE + [(b":protocol", b"websocket")]),
    ("CONNECT with path", [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")]),
    ("CONNECT without authority", [(b":method", b"CONNECT")]),
    ("host differs", BASE + [(b"host", b"other.test")]),
    ("several hosts", [BASE[0], BASE[1], BASE[3], (b"host", b"a"), (b"host", b"a")]),
]


@pytest.mark.parametrize("headers", [h for _, h in MALFORMED], ids=[i for i, _ in MALFORMED])
def test_malformed(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Malformed):
        read(headers)


def test_protocolWithoutTheSetting() -> None:
    with pytest.raises(Malformed):
        read(
            [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
             (b":authority", b"example.com"), (b":path", b"/chat")],
            connect=False,
        )


REFUSED = [
    ("CONNECT", [(b":method", b"CONNECT"), (b":authority", b"a.test:443")], 501),
    ("other protocol", [(b":method", b"CONNECT"), (b":protocol", b"h3"), (b":scheme", b"https"),
                        (b":authority", b"a.test"), (b":path", b"/")], 501),
    ("name not a token", BASE + [(b"x(y)", b"1")], 400),
    ("control in value", BASE + [(b"x", b"a\x01b")], 400),
    ("method not a token", [(b":method", b"G(T"), *BASE[1:]], 400),
    ("space in path", BASE[:3] + [(b":path", b"/a b")], 400),
    ("absolute path", BASE[:3] + [(b":path", b"http://a/")], 400),
    ("asterisk for GET", BASE[:3] + [(b":path", b"*")], 400),
    ("scheme", [BASE[0], (b":scheme", b"ftp"), BASE[2], BASE[3]], 400),
    ("no authority", [BASE[0], BASE[1], BASE[3]], 400),
    ("bad authority", [BASE[0], BASE[1], (b":authority", b"a@b"), BASE[3]], 400),
    ("long length", BASE + [(b"content-length", b"9" * 19)], 400),
]


@pytest.mark.parametrize("headers,status", [(h, s) for _, h, s in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_refused(headers: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(Refused) as caught:
        read(headers)
    assert caught.value.status == status


def test_asteriskForOptions() -> None:
    assert read([(b":method", b"OPTIONS"), *BASE[1:3], (b":path", b"*")]).target == b"*"


def test_fieldCountAsHTTP1() -> None:
    """C{max_headers} counts fields as HTTP/1.1 would: host and the joined
    cookie once each."""
    headers = BASE + [(b"x-%d" % n, b"v") for n in range(8)] + [(b"cookie", b"a=%d" % n) for n in range(5)]
    assert read(headers, maxFields=10).fields
    with pytest.raises(Refused) as caught:
        read(headers, maxFields=9)
    assert caught.value.status == 431


def test_headSizeAsHTTP1() -> None:
    """C{max_header_size} counts the bytes the head would have over HTTP/1.1."""
    headers = BASE + [(b"x-big", b"v" * 100)]
    size = len(b"GET / HTTP/1.1\r\n" b"host: example.com\r\n" b"x-big: " + b"v" * 100 + b"\r\n")
    assert read(headers, maxSize=size).fields
    with pytest.raises(Refused) as caught:
        read(headers, maxSize=size - 1)
    assert caught.value.status == 431


@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=12)), max_size=12))
def test_anyListReadOrRefused(extra: list[tuple[bytes, bytes]]) -> None:
    """Whatever the list, the answer is a head, Malformed or Refused."""
    try:
        head = read(BASE + extra)
    except (Malformed, Refused):
        return
    for name, value in head.fields.pairs():
        assert name == name.lower() and b"\r" not in value and b"\n" not in value


_names = st.sampled_from([b"accept", b"x-a", b"cookie", b"user-agent", b"host", b"x_b", b"te"])
_values = st.binary(max_size=10).filter(lambda v: not v[:1].isspace() and not v[-1:].isspace())


@given(st.lists(st.tuples(_names, _values), max_size=8))
def test_fieldsAreTheLinesHTTP1WouldSend(extra: list[tuple[bytes, bytes]]) -> None:
    """
    The fields of a request read are held as HTTP/1.1 field lines, which
    the HTTP/1.1 parser reads back as the same fields.
    """
    from edgeproxy.h1.requests import parseRequestHead

    try:
        head = read(BASE + extra)
    except (Malformed, Refused):
        return
    lines = head.fields.lines()
    assert lines is not None and lines[0] == b"Host: example.com"
    parsed = parseRequestHead(b"\r\n".join([b"GET / HTTP/1.1", *lines]), 100)
    assert parsed.fields.copyRaw() == head.fields.copyRaw()
    assert list(parsed.fields.pairs()) == list(head.fields.pairs())
