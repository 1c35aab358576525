"""
Tests for L{edgeproxy.http.channel}: raw bytes into an L{EdgeHTTPChannel}
built by a real C{Site}, assertions on the bytes the client gets back, on
whether the request object was ever told about the request, and on the
connection being closed.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from edgeproxy.config.model import Limits
from edgeproxy.http import channel as channelModule
from edgeproxy.http.channel import (
    ChunkedDecoder,
    EdgeHTTPChannel,
    MalformedBody,
    edgeChannelProtocolFactory,
    errorResponse,
    requestLineOf,
    validHost,
)


class RecordingRequest(server.Request):
    """
    Records what a proxy request would act on: C{gotLength} (where the real
    request starts talking to a backend) and C{requestReceived}; answers
    with the method, target and body it got.
    """

    def gotLength(self, length: int | None) -> None:
        self.channel.site.events.append(("gotLength", requestLineOf(self.channel), length))
        super().gotLength(length)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.channel.site.events.append(("requestReceived", command, path, version))
        super().requestReceived(command, path, version)

    def process(self) -> None:
        body = self.content.read()
        answer = b"%s %s %s" % (self.method, self.uri, body)
        self.setHeader(b"Content-Type", b"text/plain")
        self.setHeader(b"Content-Length", b"%d" % (len(answer),))
        self.write(answer)
        self.finish()


class RecordingSite(server.Site):
    protocol = edgeChannelProtocolFactory

    def __init__(self, limits: Limits, clock: Clock) -> None:
        super().__init__(Resource(), requestFactory=RecordingRequest, reactor=clock)
        self.limits = limits
        self.events: list[Any] = []


class Connection:
    def __init__(self, limits: Limits | None = None) -> None:
        self.clock = Clock()
        self.site = RecordingSite(limits or Limits(), self.clock)
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.protocol.makeConnection(self.transport)

    @property
    def channel(self) -> EdgeHTTPChannel:
        return self.protocol._channel

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        return self.transport.value()

    def kinds(self) -> list[str]:
        return [event[0] for event in self.site.events]


H = b"Host: example.com\r\n"

REJECTED = [
    # (id, raw request, expected status line)
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


@pytest.mark.parametrize("raw,status", [(r, s) for _, r, s in REJECTED], ids=[i for i, _, _ in REJECTED])
def test_rejectedBeforeReachingTheRequest(raw: bytes, status: int) -> None:
    """
    Malformed and ambiguous heads get the exact error status line, the
    connection is closed, and the request object never got C{gotLength}
    (so a proxy request never started talking to a backend).
    """
    connection = Connection()
    connection.send(raw)
    assert connection.received() == errorResponse(status)
    assert connection.received().startswith(b"HTTP/1.1 %d " % (status,))
    assert connection.kinds() == []
    assert connection.transport.disconnecting


@pytest.mark.parametrize("raw,status", [(r, s) for _, r, s in REJECTED], ids=[i for i, _, _ in REJECTED])
def test_rejectedByteByByte(raw: bytes, status: int) -> None:
    """
    Splitting the same bytes at every position changes nothing.
    """
    connection = Connection()
    for i in range(len(raw)):
        connection.send(raw[i : i + 1])
    assert connection.received() == errorResponse(status)
    assert connection.kinds() == []
    assert connection.transport.disconnecting


def test_errorResponseShape() -> None:
    """
    The one error response: status line, Connection: close, a short plain
    body with the right length, no Server header.
    """
    response = errorResponse(431)
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b"Connection: close" in lines
    assert b"Content-Length: %d" % (len(body),) in lines
    assert not any(line.lower().startswith(b"server:") for line in lines)
    assert body == b"Request Header Fields Too Large\n"


def test_lineWithoutColonRejectedEvenIfNameSeenBefore() -> None:
    """
    A field line without a colon is refused even when the same text was
    earlier accepted as a field name.
    """
    connection = Connection()
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"X-Seen: 1\r\n\r\n")
    assert connection.kinds() == ["gotLength", "requestReceived"]
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"X-Seen\r\n\r\n")
    assert connection.received().endswith(errorResponse(400))
    assert connection.kinds() == ["gotLength", "requestReceived"]


def test_nothingAfterRejectionIsParsed() -> None:
    """
    A valid request pipelined after a rejected one is never seen.
    """
    connection = Connection()
    connection.send(
        b"GET / HTTP/1.1\r\n" + H + b"X A: 1\r\n\r\n" + b"GET /second HTTP/1.1\r\n" + H + b"\r\n"
    )
    connection.send(b"GET /third HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.received() == errorResponse(400)
    assert connection.kinds() == []


# Body-level errors: the head was fine, so gotLength has run (a proxy has
# started the upstream request), but the request is never completed and the
# request object is told the connection is gone.

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
def test_badChunkedBody(body: bytes) -> None:
    """
    Ambiguous chunked framing gets a 400 and a closed connection; the
    request is never completed (no C{requestReceived}) and learns of the
    disconnection.
    """
    connection = Connection()
    lost: list[Any] = []
    connection.send(b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
    assert connection.kinds() == ["gotLength"]
    connection.channel.requests[-1].notifyFinish().addErrback(lost.append)
    connection.send(body)
    assert connection.received() == errorResponse(400)
    assert connection.kinds() == ["gotLength"]
    assert connection.transport.disconnecting
    connection.protocol.connectionLost(Exception("closed"))
    assert len(lost) == 1


def test_contentLengthBody() -> None:
    connection = Connection()
    connection.send(b"POST /x?y=1 HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhel")
    assert connection.site.events == [("gotLength", (b"POST", b"/x?y=1", b"HTTP/1.1"), 5)]
    connection.send(b"lo")
    assert connection.site.events[1] == ("requestReceived", b"POST", b"/x?y=1", b"HTTP/1.1")
    assert connection.received().startswith(b"HTTP/1.1 200 OK\r\n")
    assert connection.received().endswith(b"\r\n\r\nPOST /x?y=1 hello")
    assert not connection.transport.disconnecting


def test_chunkedBody() -> None:
    """
    A chunked body with a valid extension and a trailer passes; the declared
    length is L{None}.
    """
    connection = Connection()
    connection.send(
        b"PUT /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\n"
        b"5;name=value;q=\"a \\\" b\"\r\nhello\r\n"
        b"000006\r\n world\r\n"
        b"0\r\nX-Checksum: abc\r\n\r\n"
    )
    assert connection.site.events[0] == ("gotLength", (b"PUT", b"/c", b"HTTP/1.1"), None)
    assert connection.kinds() == ["gotLength", "requestReceived"]
    assert connection.received().endswith(b"PUT /c hello world")
    assert not connection.transport.disconnecting


def test_chunkedBodyByteByByte() -> None:
    connection = Connection()
    raw = b"PUT /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\na\r\n0123456789\r\n0\r\n\r\n"
    for i in range(len(raw)):
        connection.send(raw[i : i + 1])
    assert connection.received().endswith(b"PUT /c hello0123456789")


def test_pipelinedAnsweredInOrder() -> None:
    connection = Connection()
    connection.send(
        b"GET /one HTTP/1.1\r\n" + H + b"\r\n"
        b"POST /two HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"
        b"GET /three HTTP/1.1\r\n" + H + b"\r\n"
    )
    received = connection.received()
    one, two, three = (received.index(b"GET /one "), received.index(b"POST /two abc"), received.index(b"GET /three "))
    assert one < two < three
    assert received.count(b"HTTP/1.1 200 OK") == 3
    assert connection.kinds() == ["gotLength", "requestReceived"] * 3
    assert not connection.transport.disconnecting


def test_pipelinedBadRequestAfterGoodOne() -> None:
    """
    The good request is answered first, then the 400, then the close.
    """
    connection = Connection()
    connection.send(b"GET /one HTTP/1.1\r\n" + H + b"\r\n" + b"GET /two HTTP/1.1\r\n" + H + H + b"\r\n")
    received = connection.received()
    assert received.endswith(errorResponse(400))
    assert b"GET /one " in received[: -len(errorResponse(400))]
    assert connection.kinds() == ["gotLength", "requestReceived"]
    assert connection.transport.disconnecting


def test_absoluteFormMatchingHost() -> None:
    """
    An absolute-form target whose authority equals Host (case aside) reaches
    the request as origin-form.
    """
    connection = Connection()
    connection.send(b"GET HTTP://Example.COM?q=1 HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.site.events[0] == ("gotLength", (b"GET", b"/?q=1", b"HTTP/1.1"), 0)
    connection2 = Connection()
    connection2.send(b"GET http://example.com/a/b HTTP/1.0\r\n\r\n")
    assert connection2.site.events[0] == ("gotLength", (b"GET", b"/a/b", b"HTTP/1.0"), 0)
    assert connection2.received().endswith(b"GET /a/b ")


def test_optionsAsterisk() -> None:
    connection = Connection()
    connection.send(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.site.events[0] == ("gotLength", (b"OPTIONS", b"*", b"HTTP/1.1"), 0)


def test_oneLeadingEmptyLineTolerated() -> None:
    connection = Connection()
    connection.send(b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.kinds() == ["gotLength", "requestReceived"]


def test_validHosts() -> None:
    for host in (b"example.com", b"EXAMPLE.com.", b"a.example:8443", b"192.0.2.1", b"[2001:db8::1]", b"[::1]:80", b"a:"):
        assert validHost(host), host
    for host in (b"", b":80", b"[::1", b"[::1]x", b"a b", b"a%20b", b"a,b", b"a:1:2", b"[v1.x]"):
        assert not validHost(host), host


def test_headerTooLarge() -> None:
    limits = Limits(max_header_size=1024)
    connection = Connection(limits)
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 90) for i in range(12)))
    assert connection.received() == errorResponse(431)
    assert connection.kinds() == []
    assert connection.transport.disconnecting


def test_singleHugeLineWithoutEnd() -> None:
    """
    A header line that never ends is refused once it cannot fit, without
    waiting for (or buffering past) its end.
    """
    connection = Connection(Limits(max_header_size=1024))
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"X-Big: ")
    for _ in range(20):
        connection.send(b"v" * 100)
    assert connection.received() == errorResponse(431)
    assert connection.kinds() == []


def test_requestLineTooLong() -> None:
    connection = Connection(Limits(max_header_size=1024))
    connection.send(b"GET /" + b"a" * 2000)
    assert connection.received() == errorResponse(414)
    assert connection.transport.disconnecting


def test_headExactlyAtLimitPasses() -> None:
    head = b"GET / HTTP/1.1\r\n" + H + b"X-Pad: "
    padding = 200 - len(head) - 4
    raw = head + b"p" * padding + b"\r\n\r\n"
    assert len(raw) == 200
    connection = Connection(Limits(max_header_size=200))
    connection.send(raw)
    assert connection.kinds() == ["gotLength", "requestReceived"]
    connection = Connection(Limits(max_header_size=199))
    connection.send(raw)
    assert connection.received() == errorResponse(431)


def test_tooManyHeaders() -> None:
    limits = Limits(max_headers=10)
    connection = Connection(limits)
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % (i,) for i in range(9)) + b"\r\n")
    assert connection.kinds() == ["gotLength", "requestReceived"]
    connection = Connection(limits)
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % (i,) for i in range(10)) + b"\r\n")
    assert connection.received() == errorResponse(431)
    assert connection.kinds() == []


def test_limitsResetBetweenRequests() -> None:
    """
    The size and count budgets are per request head, not per connection.
    """
    limits = Limits(max_header_size=200, max_headers=3)
    connection = Connection(limits)
    one = b"GET / HTTP/1.1\r\n" + H + b"A: 1\r\nB: 2\r\n\r\n"
    connection.send(one * 5)
    assert connection.kinds() == ["gotLength", "requestReceived"] * 5


def test_slowlorisGets408() -> None:
    """
    A client trickling one header byte every two seconds is cut at
    client_header_timeout even though every byte resets the idle timeout.
    """
    connection = Connection(Limits(client_header_timeout=10, client_idle_timeout=60))
    trickle = b"GET / HTTP/1.1\r\n" + H + b"X-Slow: " + b"a" * 100
    for i in range(4):
        connection.send(trickle[i : i + 1])
        connection.clock.advance(2)
    assert connection.received() == b""
    assert not connection.transport.disconnecting
    for i in range(4, 8):
        connection.send(trickle[i : i + 1])
        connection.clock.advance(2)
    assert connection.received() == errorResponse(408)
    assert connection.transport.disconnecting
    assert connection.kinds() == []


def test_slowlorisAbortedWhenCloseStalls() -> None:
    """
    A client that stops reading cannot keep the connection open after the
    rejection: it is aborted abortTimeout seconds later.
    """
    connection = Connection(Limits(client_header_timeout=5))
    connection.send(b"GET")
    connection.clock.advance(5)
    assert connection.transport.disconnecting
    assert not connection.transport.disconnected
    connection.clock.advance(EdgeHTTPChannel.abortTimeout)
    assert connection.transport.disconnected


def test_silentConnectionGets408() -> None:
    connection = Connection(Limits(client_header_timeout=3))
    connection.clock.advance(3)
    assert connection.received() == errorResponse(408)
    assert connection.transport.disconnecting


def test_headerDeadlineDoesNotCoverTheBody() -> None:
    """
    Once the head is complete the header deadline is gone; a slow body is
    the idle timeout's business.
    """
    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=60))
    connection.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\n")
    for i in range(10):
        connection.clock.advance(2)
        connection.send(b"x")
    assert connection.kinds() == ["gotLength", "requestReceived"]
    assert not connection.transport.disconnecting


def test_keepAliveIdleThenSlowHead() -> None:
    """
    Between requests the idle timeout applies (silent close); the header
    deadline restarts at the first byte of the next request.
    """
    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=20))
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    first = connection.received()
    connection.clock.advance(15)
    assert not connection.transport.disconnecting
    connection.send(b"G")
    connection.clock.advance(2)
    connection.send(b"E")
    assert not connection.transport.disconnecting
    connection.clock.advance(1)
    assert connection.received() == first + errorResponse(408)
    assert connection.transport.disconnecting


def test_nextHeadStartedBeforeThePreviousDeadlineGetsAFullDeadline() -> None:
    """
    The header deadline is one timer per connection, moved rather than
    re-created (the path this exercises): a head started 1 s after the
    previous one still has the whole deadline from its own first byte, and
    the earlier deadline passing in between changes nothing.
    """
    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=20))
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    first = connection.received()
    connection.clock.advance(1)
    connection.send(b"GET / HT")
    connection.clock.advance(2.5)  # past the first head's deadline (t=3)
    assert not connection.transport.disconnecting
    assert connection.received() == first
    connection.clock.advance(0.4)  # t=3.9: still within 3 s of t=1
    assert not connection.transport.disconnecting
    connection.clock.advance(0.2)  # t=4.1
    assert connection.received() == first + errorResponse(408)
    assert connection.transport.disconnecting


def test_keepAliveIdleTimeout() -> None:
    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=20))
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    first = connection.received()
    connection.clock.advance(20)
    assert connection.transport.disconnecting
    assert connection.received() == first


def test_headerDeadlineStopsWhenALPNSelectsHTTP2() -> None:
    """
    When ALPN picks h2, Twisted swaps in its HTTP/2 connection; the HTTP/1.1
    channel's header deadline must not later write a 408 into it.
    """
    pytest.importorskip("h2")
    connection = Connection(Limits(client_header_timeout=5))
    connection.transport.negotiatedProtocol = b"h2"
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    connection.send(preface)
    assert not isinstance(connection.protocol._channel, EdgeHTTPChannel)
    connection.clock.advance(30)
    assert b"HTTP/1.1" not in connection.received()
    assert not connection.transport.disconnecting


def test_connectionClose() -> None:
    """
    Connection: close anywhere in any Connection field ends the connection
    after the response (Twisted only looks at space-separated tokens of the
    first field).
    """
    connection = Connection()
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"Connection: foo\r\nConnection: bar,close\r\n\r\n")
    assert b"Connection: close" in connection.received()
    assert connection.transport.disconnecting


def test_http10ClosesAfterResponse() -> None:
    connection = Connection()
    connection.send(b"GET / HTTP/1.0\r\n\r\nGET /ignored HTTP/1.0\r\n\r\n")
    assert connection.kinds() == ["gotLength", "requestReceived"]
    assert connection.transport.disconnecting


def test_expectContinueNotAfterEarlyResponse() -> None:
    """
    100-continue is sent for a request still waiting for its body, and
    never after the request object answered in gotLength.
    """
    connection = Connection()
    connection.send(b"PUT / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert connection.received() == b"HTTP/1.1 100 Continue\r\n\r\n"

    class Refusing(RecordingRequest):
        def gotLength(self, length: int | None) -> None:
            super().gotLength(length)
            # Twisted sets clientproto only in requestReceived; a request
            # answering from gotLength must set it itself.
            self.clientproto = b"HTTP/1.1"
            self.setResponseCode(413)
            self.setHeader(b"Content-Length", b"0")
            self.setHeader(b"Connection", b"close")
            self.write(b"")

    connection = Connection()
    connection.channel.requestFactory = Refusing
    connection.send(b"PUT / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert connection.received().startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in connection.received()


def test_requestClosingFromGotLengthStopsParsing() -> None:
    """
    A request that answers and closes from gotLength (413 on a declared
    length, say): the body bytes that follow are never parsed as a head.
    """

    class Closing(RecordingRequest):
        def gotLength(self, length: int | None) -> None:
            super().gotLength(length)
            self.clientproto = b"HTTP/1.1"
            self.setResponseCode(413)
            self.setHeader(b"Content-Length", b"0")
            self.write(b"")
            self.channel.loseConnection()

    connection = Connection()
    connection.channel.requestFactory = Closing
    connection.send(
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 40\r\n\r\n" + b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
    )
    connection.send(b"GET /more HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.kinds() == ["gotLength"]
    assert connection.received().startswith(b"HTTP/1.1 413 ")
    assert connection.received().count(b"HTTP/1.1 ") == 1


def test_limitsFromFactory() -> None:
    connection = Connection(Limits(max_headers=7, client_idle_timeout=33))
    assert connection.channel.limits.max_headers == 7
    assert connection.channel.timeOut == 33


class TwistedPrivateSurfaceTests:
    """
    The private parts of Twisted this module depends on.  When one of these
    fails, Twisted changed: update the functions under "Twisted private
    surface" in edgeproxy/http/channel.py.
    """

    def _plainChannel(self, factory: Any) -> tuple[http.HTTPChannel, StringTransport]:
        channel = http.HTTPChannel()
        channel.requestFactory = factory
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_requestLineDuringGotLength(self) -> None:
        seen: list[Any] = []

        class Probe(http.Request):
            def gotLength(self, length: int | None) -> None:
                seen.append(requestLineOf(self.channel))
                super().gotLength(length)

            def process(self) -> None:
                seen.append(self.path)
                self.finish()

        channel, _ = self._plainChannel(Probe)
        channel.dataReceived(b"DELETE /thing HTTP/1.1\r\nHost: a\r\n\r\n")
        assert seen == [(b"DELETE", b"/thing", b"HTTP/1.1"), b"/thing"]
        # allContentReceived consumes them: outside the window they are gone.
        with pytest.raises(AttributeError):
            requestLineOf(channel)

    def test_storedRequestLineReachesRequestReceived(self) -> None:
        seen: list[Any] = []

        class Probe(http.Request):
            def gotLength(self, length: int | None) -> None:
                channelModule._storeRequestLine(self.channel, b"GET", b"/rewritten", b"HTTP/1.1")
                super().gotLength(length)

            def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
                seen.append((command, path, version))
                self.finish()

        channel, _ = self._plainChannel(Probe)
        channel.dataReceived(b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert seen == [(b"GET", b"/rewritten", b"HTTP/1.1")]

    def test_installedDecoderFeedsBodyAndMalformedBodyIs400(self) -> None:
        chunks: list[bytes] = []

        class Probe(http.Request):
            def gotLength(self, length: int | None) -> None:
                super().gotLength(length)
                channel = self.channel
                channel.length = None
                channelModule._installBodyDecoder(
                    channel, lambda finish: ChunkedDecoder(chunks.append, finish)
                )

        channel, transport = self._plainChannel(Probe)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        channel.dataReceived(b"3\r\nabc\r\n")
        assert chunks == [b"abc"]
        channel.dataReceived(b"zz\r\n")
        assert transport.value().startswith(b"HTTP/1.1 400 ")
        assert transport.disconnecting
        assert isinstance(MalformedBody("x"), Exception)

    def test_h2StreamRequestLine(self) -> None:
        pytest.importorskip("h2")
        from twisted.web._http2 import H2Stream

        seen: list[Any] = []

        class Probe(http.Request):
            def gotLength(self, length: int | None) -> None:
                seen.append((requestLineOf(self.channel), length))
                super().gotLength(length)

        class Connection:
            def getPeer(self) -> IPv4Address:
                return IPv4Address("TCP", "192.0.2.1", 1)

            getHost = getPeer

        H2Stream(
            1,
            Connection(),
            [(b":method", b"POST"), (b":path", b"/h2"), (b":authority", b"a"), (b"content-length", b"4")],
            Probe,
            None,
            None,
        )
        assert seen == [((b"POST", b"/h2", b"HTTP/2"), 4)]

    def test_protocolFactoryWrapsForALPN(self) -> None:
        clock = Clock()
        site = RecordingSite(Limits(max_headers=5), clock)
        protocol = site.buildProtocol(None)
        assert isinstance(protocol, http._GenericHTTPChannelProtocol)
        assert isinstance(protocol._channel, EdgeHTTPChannel)
        assert protocol._channel.limits.max_headers == 5
        assert protocol.callLater == clock.callLater
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        assert site.events[0][0] == "gotLength"


def test_twistedPrivateSurface() -> None:
    """Runs L{TwistedPrivateSurfaceTests} (pytest does not collect it: no Test prefix)."""
    suite = TwistedPrivateSurfaceTests()
    for name in dir(suite):
        if name.startswith("test_"):
            getattr(suite, name)()


def test_headersUntouchedByValidation() -> None:
    """
    Field values reach the request with surrounding whitespace trimmed and
    repeated fields in order.
    """
    seen: list[Headers] = []

    class Probe(RecordingRequest):
        def gotLength(self, length: int | None) -> None:
            seen.append(self.requestHeaders)
            super().gotLength(length)

    connection = Connection()
    connection.channel.requestFactory = Probe
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"X-A:  1 \r\nx-a:\t2\r\nX-B: a\tb\r\n\r\n")
    assert seen[0].getRawHeaders(b"X-A") == [b"1", b"2"]
    assert seen[0].getRawHeaders(b"X-B") == [b"a\tb"]


def test_decodersReportIncompleteBodies() -> None:
    """
    noMoreData tells a finished body from a truncated one.
    """
    received: list[bytes] = []
    finished: list[bytes] = []
    identity = channelModule.IdentityDecoder(5, received.append, finished.append)
    identity.dataReceived(b"abc")
    with pytest.raises(channelModule.IncompleteBody):
        identity.noMoreData()
    identity.dataReceived(b"deNEXT")
    identity.noMoreData()
    assert (received, finished) == ([b"abc", b"de"], [b"NEXT"])

    chunked = ChunkedDecoder(received.append, finished.append)
    chunked.dataReceived(b"3\r\nxyz\r\n")
    with pytest.raises(channelModule.IncompleteBody):
        chunked.noMoreData()
    chunked.dataReceived(b"0\r\n\r\nrest")
    chunked.noMoreData()
    assert received[-1] == b"xyz" and finished[-1] == b"rest"
    with pytest.raises(RuntimeError):
        chunked.dataReceived(b"more")


_VALID_HEADS = [
    b"GET / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET /a?b=c HTTP/1.1\r\n" + H + b"User-Agent: x\r\nAccept: */*\r\nx-a: 1\r\nX-A:  2 \r\netag: e\r\n\r\n",
    b"\r\nGET / HTTP/1.0\r\n\r\n",
    b"POST /p HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nCookie: a=b\r\n\r\nabc",
    b"PUT /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET http://example.com/x HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"\r\n" + b"GET /2 HTTP/1.1\r\n" + H + b"X-B: b\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"Connection: keep-alive, close\r\n\r\nGET /ignored HTTP/1.1\r\n\r\n",
]


def _served(pieces: list[bytes], limits: Limits | None = None) -> tuple[Any, ...]:
    seen: list[Any] = []

    class Probe(RecordingRequest):
        def gotLength(self, length: int | None) -> None:
            seen.append(list(self.requestHeaders.getAllRawHeaders()))
            super().gotLength(length)

    connection = Connection(limits)
    connection.channel.requestFactory = Probe
    for piece in pieces:
        connection.send(piece)
    return connection.received(), connection.site.events, seen, connection.transport.disconnecting


@settings(max_examples=300, deadline=None)
@given(
    raw=st.sampled_from(_VALID_HEADS + [raw for _, raw, _ in REJECTED]),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=4),
    maxHeaderSize=st.sampled_from([60, 100, 16384]),
)
def test_wholeHeadParsedAsLineByLine(raw: bytes, cuts: list[int], maxHeaderSize: int) -> None:
    """
    A head that arrives whole (parsed in one pass) and the same bytes cut
    anywhere (parsed line by line as they come) give the same response
    bytes, the same request events, the same fields (names, values, order)
    and the same connection state, within and over the size limit.
    """
    points = sorted({min(cut, len(raw)) for cut in cuts} | {0, len(raw)})
    pieces = [raw[a:b] for a, b in zip(points, points[1:])]
    limits = Limits(max_header_size=maxHeaderSize)
    assert _served(pieces, limits) == _served([raw], limits)
    assert _served([bytes([b]) for b in raw], limits) == _served([raw], limits)


def test_idleTimeoutSuspendedWhileAnsweringAndRestartedAfter() -> None:
    """
    The idle timeout does not cut a request that takes longer than it to
    answer; once the response is done it counts again from then.  One
    timer per connection serves every request (moved, not re-created).
    """
    pending: list[Any] = []

    class Slow(RecordingRequest):
        def process(self) -> None:
            pending.append(self)

    connection = Connection(Limits(client_header_timeout=3, client_idle_timeout=20))
    connection.channel.requestFactory = Slow
    timers = set(connection.clock.getDelayedCalls())
    for answering in (1, 2, 1, 50):
        connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        connection.clock.advance(answering)
        assert not connection.transport.disconnecting
        request = pending.pop()
        request.setHeader(b"Content-Length", b"0")
        request.finish()
        if answering < 3:
            assert set(connection.clock.getDelayedCalls()) <= timers
    connection.clock.advance(19)
    assert not connection.transport.disconnecting
    connection.clock.advance(1)
    assert connection.transport.disconnecting
    assert connection.received().count(b"HTTP/1.1 200 OK") == 4


def test_channelAttributesStayInTheClassSharedTable() -> None:
    """
    R4: after the paths a connection usually takes (requests with and
    without a body, pipelining, a rejection, a header timeout on other
    connections), an idle channel's attributes still fit its class's shared
    table (CPython 3.11 gives an instance a combined dictionary of its own,
    about 1.6 KiB instead of 0.3, once its class has seen 30 attribute
    names): the names Twisted's classes and EdgeHTTPChannel set live in
    its slots, whatever other tests of this run did to channels before.
    """
    import sys

    for raw in (
        b"GET / HTTP/1.1\r\n" + H + b"\r\n",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"GET /a HTTP/1.1\r\n" + H + b"\r\nGET /b HTTP/1.1\r\n" + H + b"\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + H,
    ):
        other = Connection()
        other.send(raw)
        other.clock.advance(3600)
    connection = Connection()
    connection.send(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert connection.received().startswith(b"HTTP/1.1 200 OK")
    attributes = vars(connection.channel)
    assert len(attributes) < 30
    assert sys.getsizeof(attributes) < 700, sorted(attributes)


class SiteConnections:
    """
    Several connections of one site on one clock, as a listener has them.
    """

    def __init__(self, limits: Limits) -> None:
        self.clock = Clock()
        self.site = RecordingSite(limits, self.clock)
        self.transports: list[StringTransport] = []
        self.protocols: list[Any] = []

    def open(self) -> int:
        protocol = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        self.transports.append(transport)
        return len(self.protocols) - 1

    def closed(self) -> list[int]:
        return [i for i, transport in enumerate(self.transports) if transport.disconnecting]

    def lose(self, index: int) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocols[index].connectionLost(Failure(ConnectionDone()))


def test_connectionsOfOneSiteShareTheirTimers() -> None:
    """
    The connections of one site share one timer per timeout however many
    there are (R4: a DelayedCall per connection cost about 0.4 KiB), and
    each still gets its own header deadline: connections opened a second
    apart and sending nothing get their 408 a second apart, each
    client_header_timeout after it opened.
    """
    connections = SiteConnections(Limits(client_header_timeout=3, client_idle_timeout=20))
    for index in range(3):
        if index:
            connections.clock.advance(1)
        connections.open()
    # t=2.  One header deadline, one idle timeout.
    assert len(connections.clock.getDelayedCalls()) == 2
    connections.clock.advance(0.5)
    assert connections.closed() == []
    connections.clock.advance(0.5)
    assert connections.closed() == [0]
    assert connections.transports[0].value() == errorResponse(408)
    connections.clock.advance(1)
    assert connections.closed() == [0, 1]
    connections.clock.advance(1)
    assert connections.closed() == [0, 1, 2]
    assert all(transport.value() == errorResponse(408) for transport in connections.transports)
    for index in range(3):
        connections.lose(index)
    # Nothing left to fire once the connections are gone.
    assert connections.clock.getDelayedCalls() == []


def test_idleTimeoutPerConnectionWithSharedTimer() -> None:
    """
    Each kept-alive connection is closed client_idle_timeout after its own
    last byte or response, whatever the others do: activity on the oldest
    connection moves it behind the others.
    """
    connections = SiteConnections(Limits(client_header_timeout=30, client_idle_timeout=10))
    request = b"GET / HTTP/1.1\r\n" + H + b"\r\n"
    for index in range(3):
        if index:
            connections.clock.advance(1)
        connections.open()
        connections.protocols[index].dataReceived(request)
    # t=2: all three answered (RecordingRequest finishes at once); idle
    # deadlines at t=10, 11, 12.
    assert all(transport.value().startswith(b"HTTP/1.1 200 ") for transport in connections.transports)
    connections.clock.advance(1)
    connections.protocols[0].dataReceived(b"G")  # t=3: moves 0's to t=13
    connections.clock.advance(7.5)
    assert connections.closed() == []
    connections.clock.advance(0.5)
    assert connections.closed() == [1]
    connections.clock.advance(1)
    assert connections.closed() == [1, 2]
    connections.clock.advance(0.5)
    assert connections.closed() == [1, 2]
    connections.clock.advance(0.5)
    assert connections.closed() == [0, 1, 2]
    # Closed silently: the one response each got, nothing after it.
    assert all(transport.value().count(b"HTTP/1.1 ") == 1 for transport in connections.transports)
    for index in range(3):
        connections.lose(index)
    assert connections.clock.getDelayedCalls() == []


def test_sharedTimerSurvivesAConnectionLost() -> None:
    """
    A connection lost while its deadline is the first due leaves the others'
    deadlines intact: the next one still fires on time.
    """
    connections = SiteConnections(Limits(client_header_timeout=4, client_idle_timeout=30))
    connections.open()
    connections.clock.advance(1)
    connections.open()
    connections.lose(0)  # t=1; 1's deadline is t=5
    connections.clock.advance(3.5)
    assert connections.closed() == []
    connections.clock.advance(0.5)
    assert connections.closed() == [1]
    assert connections.transports[1].value() == errorResponse(408)


def test_connectionsOnOneLocalAddressShareItsObject() -> None:
    """
    R4: the local address a request sees is right, and connections accepted
    on the same local address hold one object for it, not one each.
    """
    seen = []
    site = RecordingSite(Limits(), Clock())
    for port in (40000, 40001):
        peer = IPv4Address("TCP", "192.0.2.7", port)
        protocol = site.buildProtocol(peer)
        # Equal, distinct objects, as getsockname() gives each connection.
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8443), peerAddress=peer
        )
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
        assert transport.value().startswith(b"HTTP/1.1 200 OK")
        seen.append(protocol._channel.getHost())
    assert seen[0] == IPv4Address("TCP", "127.0.0.1", 8443)
    assert seen[0] is seen[1]
