"""
Tests for L{edgeproxy.h1}: bytes in, values out and back, with no I/O.

The strictness tables that used to run against the HTTP/1.1 channel run
here against the parsers directly; L{tests.test_server} checks that the
protocol answers them with the status they carry.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.h1 import (
    CHUNKED,
    CLOSE_DELIMITED,
    NO_BODY,
    ChunkedReader,
    CloseReader,
    Fields,
    LengthReader,
    LocalProtocolError,
    RemoteProtocolError,
    bodyFraming,
    canonicalName,
    chunk,
    checkRequestLine,
    parseRequestHead,
    parseResponseHead,
    splitHead,
    splitResponseHead,
    validHost,
    writeRequestHead,
    writeResponseHead,
    LAST_CHUNK,
)

H = b"Host: example.com\r\n"

REJECTED = [
    # (id, raw request head, expected status)
    ("cl-and-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-and-cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
    ("cl-twice-equal", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("cl-twice-differ", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length:  5 , 5\r\n\r\nhello", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\n", 400),
    ("cl-inner-space", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 0\r\n\r\n", 400),
    ("cl-huge", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: " + b"9" * 40 + b"\r\n\r\n", 400),
    ("cl-unicode-digit", b"POST / HTTP/1.1\r\n" + H + "Content-Length: \u0665\r\n\r\n".encode("utf-8"), 400),
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("te-split-gzip-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    ("te-chunked-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    ("te-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n", 400),
    ("te-chunked-twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("te-chunked-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n", 400),
    ("te-xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n", 400),
    ("te-empty", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \r\n\r\n", 400),
    ("te-on-1.0", b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-Long: a\r\n b\r\n\r\n", 400),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\n" + H + b"X-Long: a\r\n\tb\r\n\r\n", 400),
    ("obs-fold-first", b"GET / HTTP/1.1\r\n Host: example.com\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    ("bare-lf-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\nb\r\n\r\n", 400),
    ("ctl-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\n" + H + b"Content-Length : 5\r\n\r\nhello", 400),
    ("tab-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A\t: 1\r\n\r\n", 400),
    ("bad-name-char", b"GET / HTTP/1.1\r\n" + H + b"X(A): 1\r\n\r\n", 400),
    ("nul-in-name", b"GET / HTTP/1.1\r\n" + H + b"X\x00A: 1\r\n\r\n", 400),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": 1\r\n\r\n", 400),
    ("no-colon", b"GET / HTTP/1.1\r\n" + H + b"garbage\r\n\r\n", 400),
    ("no-host-1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    ("two-hosts-differ", b"GET / HTTP/1.1\r\n" + H + b"Host: evil.example\r\n\r\n", 400),
    ("empty-host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
    ("host-with-path", b"GET / HTTP/1.1\r\nHost: a.example/x\r\n\r\n", 400),
    ("host-with-userinfo", b"GET / HTTP/1.1\r\nHost: user@a.example\r\n\r\n", 400),
    ("host-bad-port", b"GET / HTTP/1.1\r\nHost: a.example:99999\r\n\r\n", 400),
    ("host-bad-v6", b"GET / HTTP/1.1\r\nHost: [zz::1]\r\n\r\n", 400),
    ("host-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("http2-version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("http-0.9", b"GET /\r\n\r\n", 400),
    ("lowercase-version", b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    ("garbage-line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    ("double-space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bad-method", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("non-ascii-target", b"GET /\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("del-in-target", b"GET /\x7f HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bare-lf-request-line", b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    ("two-empty-lines-first", b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("asterisk-get", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("authority-form", b"GET example.com:80 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("connect", b"CONNECT example.com:443 HTTP/1.1\r\n" + H + b"\r\n", 501),
    ("absolute-other-host", b"GET http://evil.example/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("absolute-userinfo", b"GET http://u@example.com/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("absolute-ftp", b"GET ftp://example.com/ HTTP/1.1\r\n" + H + b"\r\n", 400),
]
"""Every head a front end and a back end could read two ways, with the
status it gets.  L{tests.test_server} runs the same table through the
protocol."""


def readRequest(raw: bytes, maxSize: int = 16384, maxFields: int = 100):
    """What a server makes of C{raw}: the head it found, or the error."""
    found = splitHead(raw, maxSize)
    assert found is not None, "incomplete head"
    head, end = found
    return parseRequestHead(head, maxFields), raw[end:]


@pytest.mark.parametrize("raw,status", [(r, s) for _, r, s in REJECTED], ids=[i for i, _, _ in REJECTED])
def test_rejectedHeads(raw: bytes, status: int) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        readRequest(raw)
    assert caught.value.status == status


def test_requestHeadValues() -> None:
    head, rest = readRequest(
        b"POST /a/b?c=d HTTP/1.1\r\nHost: Example.com:8443\r\nX-A:  1 \r\nx-a:\t2\r\n"
        b"X-B: a\tb\r\nContent-Length: 3\r\nExpect: 100-Continue\r\n\r\nabcNEXT"
    )
    assert head.method == b"POST"
    assert head.target == b"/a/b?c=d"
    assert head.version == b"HTTP/1.1"
    assert head.host == b"Example.com:8443"
    assert head.fields.getAll(b"x-a") == [b"1", b"2"]
    assert head.fields.get(b"x-b") == b"a\tb"
    assert head.length == 3
    assert head.persistent
    assert head.expectContinue
    assert rest == b"abcNEXT"


def test_chunkedLengthIsNone() -> None:
    head, _ = readRequest(b"PUT /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\n")
    assert head.length is None


@pytest.mark.parametrize(
    "raw,persistent",
    [
        (b"GET / HTTP/1.1\r\n" + H + b"\r\n", True),
        (b"GET / HTTP/1.1\r\n" + H + b"Connection: foo\r\nConnection: bar,close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\n" + H + b"Connection: keep-alive, CLOSE\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),
    ],
)
def test_persistence(raw: bytes, persistent: bool) -> None:
    """RFC 9112 9.3: any Connection field, any list member; 1.0 closes."""
    assert readRequest(raw)[0].persistent is persistent


def test_absoluteFormBecomesOriginForm() -> None:
    head, _ = readRequest(b"GET HTTP://Example.COM?q=1 HTTP/1.1\r\n" + H + b"\r\n")
    assert head.target == b"/?q=1"
    head, _ = readRequest(b"GET http://example.com/a/b HTTP/1.0\r\n\r\n")
    assert (head.target, head.host, head.fields.get(b"host")) == (b"/a/b", b"example.com", b"example.com")


def test_optionsAsteriskAndLeadingEmptyLine() -> None:
    assert readRequest(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n")[0].target == b"*"
    assert readRequest(b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n")[0].target == b"/"


def test_sizeLimits() -> None:
    """
    C{431} for a head over the limit (counting its line ends and the empty
    line), C{414} when the request line alone is; a head exactly at the
    limit passes, wherever the bytes are cut.
    """
    raw = b"GET / HTTP/1.1\r\n" + H + b"X-Pad: "
    raw += b"p" * (200 - len(raw) - 4) + b"\r\n\r\n"
    assert len(raw) == 200
    assert readRequest(raw, maxSize=200)[0].fields.get(b"x-pad")
    with pytest.raises(RemoteProtocolError) as caught:
        splitHead(raw, 199)
    assert caught.value.status == 431
    for cut in range(len(raw)):
        assert splitHead(raw[:cut], 200) is None
    with pytest.raises(RemoteProtocolError) as caught:
        splitHead(b"GET /" + b"a" * 2000, 1024)
    assert caught.value.status == 414
    with pytest.raises(RemoteProtocolError) as caught:
        splitHead(b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 2000, 1024)
    assert caught.value.status == 431


def test_fieldCount() -> None:
    many = b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % (i,) for i in range(9)) + b"\r\n"
    assert len(readRequest(many, maxFields=10)[0].fields) == 10
    with pytest.raises(RemoteProtocolError) as caught:
        readRequest(many, maxFields=9)
    assert caught.value.status == 431


def test_requestLineCheckedAlone() -> None:
    """The request line can be refused before the rest of the head arrives."""
    assert checkRequestLine(b"GET /x HTTP/1.1") == (b"GET", b"/x", b"HTTP/1.1", None)
    assert checkRequestLine(b"GET http://A.example/x HTTP/1.1")[1:] == (b"/x", b"HTTP/1.1", b"a.example")
    with pytest.raises(RemoteProtocolError):
        checkRequestLine(b"\x16\x03\x01")


def test_validHosts() -> None:
    for host in (b"example.com", b"EXAMPLE.com.", b"a.example:8443", b"192.0.2.1", b"[2001:db8::1]", b"[::1]:80", b"a:"):
        assert validHost(host), host
    for host in (b"", b":80", b"[::1", b"[::1]x", b"a b", b"a%20b", b"a,b", b"a:1:2", b"[v1.x]"):
        assert not validHost(host), host


# Bodies ----------------------------------------------------------------------

BAD_BODIES = [
    ("size-0x", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("size-plus", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("size-minus", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("size-leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("size-trailing-space", b"5 \r\nhello\r\n0\r\n\r\n"),
    ("size-empty", b"\r\nhello\r\n0\r\n\r\n"),
    ("size-overlong", b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n"),
    ("size-not-hex", b"5g\r\nhello\r\n0\r\n\r\n"),
    ("size-underscore", b"1_0\r\nhello\r\n0\r\n\r\n"),
    ("size-bare-lf", b"5\nhello\r\n0\r\n\r\n"),
    ("data-not-crlf", b"5\r\nhelloXX0\r\n\r\n"),
    ("data-bare-lf", b"5\r\nhello\n0\r\n\r\n"),
    ("ext-unbalanced-quote", b'5;a="x\r\nhello\r\n0\r\n\r\n'),
    ("ext-no-name", b"5;=x\r\nhello\r\n0\r\n\r\n"),
    ("ext-bad-char", b"5;a=b c\r\nhello\r\n0\r\n\r\n"),
    ("ext-bare-cr", b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
    ("ext-too-long-line", b"5;a=" + b"b" * 2000 + b"\r\nhello\r\n0\r\n\r\n"),
    ("ext-abuse-total", b"".join(b"1;x=" + b"y" * 900 + b"\r\na\r\n" for _ in range(6)) + b"0\r\n\r\n"),
    ("trailer-obs-fold", b"0\r\nX-T: 1\r\n 2\r\n\r\n"),
    ("trailer-bad-name", b"0\r\nX T: 1\r\n\r\n"),
    ("trailer-nul", b"0\r\nX-T: \x00\r\n\r\n"),
    ("trailer-bare-lf", b"0\r\nX-T: 1\n\r\n"),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_BODIES], ids=[i for i, _ in BAD_BODIES])
def test_badChunkedBodies(body: bytes) -> None:
    """Refused whole and refused byte by byte."""
    with pytest.raises(RemoteProtocolError):
        ChunkedReader().feed(body)
    reader = ChunkedReader()
    with pytest.raises(RemoteProtocolError):
        for i in range(len(body)):
            reader.feed(body[i : i + 1])


def readAll(reader, pieces: list[bytes]) -> tuple[bytes, bytes]:
    """Feed C{pieces} as a server would: what follows the body is the rest."""
    out = []
    rest = b""
    for piece in pieces:
        if reader.done:
            rest += piece
        else:
            out.append(reader.feed(piece))
            rest = reader.rest
    return b"".join(out), rest


def cutsOf(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(raw)) for cut in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in zip(points, points[1:])] or [b""]


CHUNKED_BODY = (
    b"5;name=value;q=\"a \\\" b\"\r\nhello\r\n"
    b"000006\r\n world\r\n"
    b"0\r\nX-Checksum: abc\r\n\r\nNEXT"
)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(CHUNKED_BODY)), max_size=6))
def test_chunkedCutAnywhere(cuts: list[int]) -> None:
    reader = ChunkedReader()
    body, rest = readAll(reader, cutsOf(CHUNKED_BODY, cuts))
    assert (body, rest, reader.done) == (b"hello world", b"NEXT", True)
    assert reader.trailers.get(b"x-checksum") == b"abc"


def test_lengthAndCloseReaders() -> None:
    reader = LengthReader(5)
    assert readAll(reader, [b"abc", b"deNEXT"]) == (b"abcde", b"NEXT")
    reader = LengthReader(5)
    reader.feed(b"abc")
    with pytest.raises(RemoteProtocolError):
        reader.eof()
    assert LengthReader(0).done
    reader = CloseReader()
    assert reader.feed(b"anything") == b"anything"
    reader.eof()
    assert reader.done
    reader = ChunkedReader()
    reader.feed(b"3\r\nxyz\r\n")
    with pytest.raises(RemoteProtocolError):
        reader.eof()


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=8), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_chunkWriterReadBack(pieces: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(chunk(piece) for piece in pieces) + LAST_CHUNK
    reader = ChunkedReader()
    assert readAll(reader, cutsOf(wire, cuts)) == (b"".join(pieces), b"")


# Writing and reading back -------------------------------------------------------

_names = st.sampled_from([b"x-a", b"accept", b"user-agent", b"x-forwarded-for", b"etag", b"te-x", b"set-cookie"])
_values = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20
).map(str.encode)


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(_names, _values), max_size=8),
    method=st.sampled_from([b"GET", b"POST", b"PURGE"]),
    length=st.sampled_from([0, 7, None]),
    cut=st.integers(0, 600),
)
def test_requestWrittenIsReadBack(pairs, method: bytes, length, cut: int) -> None:
    fields = Fields([(b"Host", b"backend.example"), *pairs])
    wire = writeRequestHead(method, b"/p?q", fields, length)
    assert splitHead(wire[:cut], 16384) is None or cut >= len(wire)
    head, rest = readRequest(wire)
    assert rest == b""
    assert (head.method, head.target, head.host) == (method, b"/p?q", b"backend.example")
    assert head.fields.without(b"content-length", b"transfer-encoding") == fields
    expected = length if length is not None else None
    if length == 0 and method != b"POST":
        expected = 0
    assert head.length == expected


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(_names, _values), max_size=8),
    status=st.sampled_from([200, 204, 301, 404, 503]),
    length=st.sampled_from([None, 0, 12]),
    chunked=st.booleans(),
    close=st.booleans(),
)
def test_responseWrittenIsReadBack(pairs, status: int, length, chunked: bool, close: bool) -> None:
    fields = Fields(pairs)
    wire = writeResponseHead(b"HTTP/1.1", status, b"Some Reason", fields, length, chunked and length is None, close)
    found = splitResponseHead(wire, 65536)
    assert found is not None and found[1] == len(wire)
    head = parseResponseHead(found[0])
    assert (head.status, head.reason, head.fields) == (status, b"Some Reason", fields)
    assert head.length == length
    assert head.chunked == (chunked and length is None)
    assert head.persistent == (not close)


# Responses from a backend -----------------------------------------------------------


def readResponse(raw: bytes):
    found = splitResponseHead(raw, 65536)
    assert found is not None
    return parseResponseHead(found[0]), raw[found[1]:]


def test_responsePolicy() -> None:
    """
    Bare LF accepted, obs-fold unfolded with one SP (the same for every
    response), hop-by-hop fields and the fields Connection names kept apart,
    Content-Length kept as the length.
    """
    head, rest = readResponse(
        b"HTTP/1.1 200 OK\nServer: x\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Folded: a\r\n  b\r\n\r\nhello"
    )
    assert head.fields == Fields([(b"server", b"x"), (b"folded", b"a b")])
    assert (head.length, head.chunked, head.persistent, rest) == (5, False, True, b"hello")
    assert bodyFraming(head, b"GET") == 5
    assert bodyFraming(head, b"HEAD") == NO_BODY


@pytest.mark.parametrize(
    "raw,persistent",
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n", True),
        (b"HTTP/1.1 200\r\n\r\n", True),
    ],
)
def test_responsePersistence(raw: bytes, persistent: bool) -> None:
    assert readResponse(raw)[0].persistent is persistent


def test_responseFraming() -> None:
    chunked = readResponse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")[0]
    assert bodyFraming(chunked, b"GET") == CHUNKED
    close = readResponse(b"HTTP/1.1 200 OK\r\n\r\n")[0]
    assert bodyFraming(close, b"GET") == CLOSE_DELIMITED
    for status in (101, 103, 204, 304):
        assert bodyFraming(readResponse(b"HTTP/1.1 %d X\r\nContent-Length: 9\r\n\r\n" % status)[0], b"GET") == NO_BODY
    upgrade = readResponse(b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")[0]
    assert upgrade.upgrade == (b"websocket",)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX A: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n: empty\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n no field before\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 20x OK\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
    ],
)
def test_responsesRefused(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        readResponse(raw)


def test_responseHeadTooLong() -> None:
    with pytest.raises(RemoteProtocolError):
        splitResponseHead(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000, 65536)


# Fields and writers ------------------------------------------------------------------


def test_fieldsAreImmutableValues() -> None:
    fields = Fields([(b"X-A", b"1"), (b"x-a", b"2"), (b"B", b"3")])
    assert list(fields.pairs()) == [(b"x-a", b"1"), (b"x-a", b"2"), (b"b", b"3")]
    changed = fields.withField(b"X-A", b"9").withAdded(b"c", b"4").without(b"B")
    assert list(changed.pairs()) == [(b"x-a", b"9"), (b"c", b"4")]
    assert list(fields.pairs()) == [(b"x-a", b"1"), (b"x-a", b"2"), (b"b", b"3")]
    for bad in [(b"X A", b"1"), (b"X", b"a\r\nb"), (b"X", b" lead")]:
        with pytest.raises(LocalProtocolError):
            Fields([bad])


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(_names, _values), max_size=8), extra=st.lists(_values, max_size=2))
def test_fieldsAsLinesWrittenAsTheirDictionary(pairs, extra: list[bytes]) -> None:
    """A stored response's fields held as lines (and lines added after
    them) are written, read and looked up as the dictionary they came from."""
    fields = Fields(pairs)
    prepared = fields.asLines()
    assert prepared == fields and prepared.raw() is fields.raw()
    for name in fields:
        assert name in prepared and prepared.getAll(name) == fields.getAll(name)
    assert writeResponseHead(b"HTTP/1.1", 200, b"OK", prepared, 3) == writeResponseHead(
        b"HTTP/1.1", 200, b"OK", fields, 3
    )
    added = [b"X-Added-%d: %s" % (i, value) for i, value in enumerate(extra)]
    reference = Fields.trusted(
        {**fields.raw(), **{b"x-added-%d" % i: [value] for i, value in enumerate(extra)}}
    )
    withAdded = prepared.withLinesAfter(added)
    assert writeResponseHead(b"HTTP/1.1", 200, b"OK", withAdded, 3) == writeResponseHead(
        b"HTTP/1.1", 200, b"OK", reference, 3
    )
    assert withAdded == reference
    for name in reference:
        assert name in withAdded and withAdded.getAll(name) == reference.getAll(name)


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.sampled_from([b"Range", b"If-None-Match", b"Pragma", b"Accept", b"X-A"]), _values),
        max_size=4,
    ),
    names=st.sets(st.sampled_from([b"range", b"if-none-match", b"pragma", b"accept", b"x-b"]), min_size=1),
)
def test_parsedFieldsHaveAnyAsTheirDictionary(pairs, names: set[bytes]) -> None:
    """Asked without their dictionary (noted fields, lines), parsed fields
    answer as the dictionary would."""
    wire = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in pairs)
    wanted = frozenset(names)
    expected = not wanted.isdisjoint(Fields([(b"host", b"a"), *pairs]).raw())
    assert readRequest(wire + b"\r\n")[0].fields.hasAny(wanted) == expected


def test_canonicalSpelling() -> None:
    assert canonicalName(b"x-forwarded-for") == b"X-Forwarded-For"
    assert canonicalName(b"etag") == b"ETag"
    assert canonicalName(b"www-authenticate") == b"WWW-Authenticate"


def test_writersRefuseWhatCannotBeSent() -> None:
    with pytest.raises(LocalProtocolError):
        writeRequestHead(b"GET", b"/", Fields(), 0)
    with pytest.raises(LocalProtocolError):
        writeRequestHead(b"G T", b"/", Fields([(b"host", b"a")]), 0)
    with pytest.raises(LocalProtocolError):
        writeRequestHead(b"GET", b"/a b", Fields([(b"host", b"a")]), 0)
    with pytest.raises(LocalProtocolError):
        writeResponseHead(b"HTTP/1.1", 200, b"O\r\nK", Fields(), 0)


HANDSHAKE = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"\r\n"
)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(HANDSHAKE) + 4), max_size=8))
def test_responseHeadFoundWhereverTheBytesAreCut(cuts: list[int]) -> None:
    """
    A response head is found (and what follows it kept) whatever pieces it
    arrives in, as a reader accumulating them sees it.
    """
    data = HANDSHAKE + b"tail"
    buffer = b""
    found = None
    for piece in cutsOf(data, cuts):
        buffer += piece
        found = splitResponseHead(buffer, 65536)
        if found is not None:
            break
    assert found is not None
    head = parseResponseHead(found[0])
    assert (head.status, head.reason, head.upgrade) == (101, b"Switching Protocols", (b"websocket",))
    assert head.fields.get(b"sec-websocket-accept") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert data[found[1]:] == b"tail"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 5\r\nConnection: keep-alive\r\nX-A: 1",
        b"HTTP/1.1 200 OK\nX-A: 1\n folded\nTransfer-Encoding: chunked\r",
        b"HTTP/1.0 204",
    ],
)
def test_headReadAgainIsTheSame(head: bytes) -> None:
    """
    A head read before is answered from memory: the same value as a
    fresh read, whose fields are shared (they are immutable).
    """
    from edgeproxy.h1 import responses

    responses._readHeads.clear()
    fresh = parseResponseHead(head)
    again = parseResponseHead(bytes(bytearray(head)))
    assert again is fresh
    responses._readHeads.clear()
    assert parseResponseHead(head) == fresh
    assert list(parseResponseHead(head).fields.pairs()) == list(fresh.fields.pairs())


def test_refusedHeadRefusedAgain() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6"
    for _ in range(2):
        with pytest.raises(RemoteProtocolError):
            parseResponseHead(head)


def test_headsReadAreBounded() -> None:
    from edgeproxy.h1 import responses

    for n in range(responses._MAX_HEADS * 2):
        parseResponseHead(b"HTTP/1.1 200 OK\r\nX-N: %d" % n)
    parseResponseHead(b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * responses._MAX_HEAD)
    assert 0 < len(responses._readHeads) <= responses._MAX_HEADS
    assert all(len(head) <= responses._MAX_HEAD for head in responses._readHeads)


def test_responseReasonMayBeEmpty() -> None:
    head, rest = readResponse(b"HTTP/1.0 404\r\n\r\nbody")
    assert (head.status, head.reason, rest) == (404, b"", b"body")
    head, _ = readResponse(b"HTTP/1.1 403 Forbidden\nServer: x\n\n")
    assert (head.status, head.fields.get(b"server")) == (403, b"x")
