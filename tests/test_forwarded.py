"""
Tests for L{edgeproxy.pipeline.forwarded}: which fields cross the proxy and
which it adds, as pure functions over L{Fields}.  The response side is the
HTTP/1.1 parser (L{edgeproxy.h1}, which keeps hop-by-hop fields and the
framing apart) followed by L{clientFields}; both are checked together here.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.h1 import HOP_BY_HOP, Fields, RemoteProtocolError, parseResponseHead, splitResponseHead
from edgeproxy.pipeline.forwarded import (
    PROXY_ADDED,
    clientAddress,
    clientFields,
    forwardedElement,
    isTrusted,
    ownFields,
    sanitized,
    upstreamFields,
)


def fields(*pairs: tuple[bytes, bytes]) -> Fields:
    return Fields(pairs)


def wire(result: Fields) -> list[tuple[bytes, bytes]]:
    """The (lower-case name, value) lines as they would be written."""
    return list(result.pairs())


def upstream(incoming: Fields, **kwargs: object) -> Fields:
    arguments: dict[str, object] = dict(peer="192.0.2.7", trustedPeer=False, scheme=b"https", host=b"example.com")
    arguments.update(kwargs)
    return upstreamFields(incoming, **arguments)  # type: ignore[arg-type]


def fromBackend(pairs: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> tuple[Fields, int | None]:
    """
    What the client gets of a backend's response fields: the HTTP/1.1
    parser's fields (hop-by-hop and framing apart) through L{clientFields},
    and the body length the parser found.
    """
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in pairs) + b"\r\n"
    found = splitResponseHead(raw, 65536)
    assert found is not None
    head = parseResponseHead(found[0])
    return clientFields(head.fields), head.length


def test_hopByHopRemoved() -> None:
    """
    Hop-by-hop fields, the fields Connection names and Content-Length go;
    Expect stays (the backend answers 100-continue itself now).
    """
    incoming = fields(
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Connection", b"x-other"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Checksum"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"X-Secret", b"s"),
        (b"X-Other", b"o"),
        (b"Content-Length", b"5"),
        (b"Expect", b"100-continue"),
        (b"Accept", b"text/html"),
    )
    names = {name for name, _ in wire(upstream(incoming))}
    assert names == {
        b"host", b"accept", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded",
    }


def test_untrustedPeerForwardingReplaced() -> None:
    incoming = fields(
        (b"Host", b"example.com"),
        (b"X-Forwarded-For", b"203.0.113.1"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"evil.example"),
        (b"Forwarded", b"for=203.0.113.1"),
    )
    result = wire(upstream(incoming))
    assert result == [
        (b"host", b"example.com"),
        (b"x-forwarded-for", b"192.0.2.7"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"example.com"),
        (b"forwarded", b"for=192.0.2.7;host=example.com;proto=https"),
    ]


def test_trustedPeerForwardingAppended() -> None:
    incoming = fields(
        (b"X-Forwarded-For", b"203.0.113.1, 198.51.100.2"),
        (b"X-Forwarded-For", b"198.51.100.3"),
        (b"X-Forwarded-Proto", b"https, http"),
        (b"X-Forwarded-Host", b"public.example"),
        (b"Forwarded", b"for=203.0.113.1;proto=https"),
    )
    result = dict(wire(upstream(incoming, trustedPeer=True, scheme=b"http", host=b"internal")))
    assert result[b"x-forwarded-for"] == b"203.0.113.1, 198.51.100.2, 198.51.100.3, 192.0.2.7"
    assert result[b"x-forwarded-proto"] == b"https"
    assert result[b"x-forwarded-host"] == b"public.example"
    assert result[b"forwarded"] == b"for=203.0.113.1;proto=https, for=192.0.2.7;host=internal;proto=http"


def test_trustedPeerWithoutForwardingFields() -> None:
    result = dict(wire(upstream(Fields(), trustedPeer=True)))
    assert result[b"x-forwarded-for"] == b"192.0.2.7"
    assert result[b"x-forwarded-proto"] == b"https"
    assert result[b"x-forwarded-host"] == b"example.com"


@pytest.mark.parametrize(
    "peer,host,element",
    [
        ("192.0.2.1", b"example.com", b"for=192.0.2.1;host=example.com;proto=https"),
        ("2001:db8::1", b"example.com", b'for="[2001:db8::1]";host=example.com;proto=https'),
        ("[2001:db8::1]:4711", b"a:8443", b'for="[2001:db8::1]:4711";host="a:8443";proto=https'),
        ("192.0.2.1:4711", b"[::1]:443", b'for="192.0.2.1:4711";host="[::1]:443";proto=https'),
        ("/run/edge.sock", b"a", b"for=unknown;host=a;proto=https"),
    ],
)
def test_forwardedElement(peer: str, host: bytes, element: bytes) -> None:
    assert forwardedElement(peer, b"HTTPS", host) == element


def test_forwardedForIPv6() -> None:
    result = dict(wire(upstream(Fields(), peer="2001:db8:0::1")))
    assert result[b"x-forwarded-for"] == b"2001:db8::1"
    assert result[b"forwarded"].startswith(b'for="[2001:db8::1]"')


def test_connectionCannotRemoveProxyFields() -> None:
    incoming = fields(
        (b"Connection", b"Host, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Forwarded, Via"),
        (b"Host", b"example.com"),
    )
    names = [name for name, _ in wire(upstream(incoming, via=b"edge"))]
    for name in PROXY_ADDED:
        assert name in names


def test_hostOverrideAndOriginalHostForwarded() -> None:
    result = dict(wire(upstream(fields((b"Host", b"example.com")), hostOverride=b"backend.internal")))
    assert result[b"host"] == b"backend.internal"
    assert result[b"x-forwarded-host"] == b"example.com"


def test_via() -> None:
    incoming = fields((b"Via", b"1.0 fred"), (b"Via", b"1.1 p.example"))
    result = upstream(incoming, via=b"edge", receivedProtocol=b"2")
    assert result.getAll(b"via") == [b"1.0 fred", b"1.1 p.example", b"2 edge"]
    assert upstream(Fields(), via=b"edge").getAll(b"via") == [b"1.1 edge"]
    assert b"via" not in upstream(Fields())


def test_upgrade() -> None:
    incoming = fields((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", b"k"))
    result = upstream(incoming, upgrade=b"websocket")
    assert result.getAll(b"connection") == [b"upgrade"]
    assert result.getAll(b"upgrade") == [b"websocket"]
    assert result.getAll(b"sec-websocket-key") == [b"k"]
    plain = upstream(incoming)
    assert b"upgrade" not in plain and b"connection" not in plain


def test_underscoreNamesDropped() -> None:
    incoming = fields((b"X_Forwarded_For", b"1.2.3.4"), (b"X-Real-Thing", b"1"), (b"My_Header", b"x"))
    names = [name for name, _ in wire(upstream(incoming))]
    assert b"x_forwarded_for" not in names and b"my_header" not in names
    assert b"x-real-thing" in names


def test_repeatedValuesKeepOrder() -> None:
    incoming = fields((b"Cookie", b"a=1"), (b"Accept", b"x"), (b"Cookie", b"b=2"), (b"cookie", b"c=3"))
    assert upstream(incoming).getAll(b"cookie") == [b"a=1", b"b=2", b"c=3"]


def test_incomingNotModified() -> None:
    incoming = fields(
        (b"Connection", b"x-a"), (b"X-A", b"1"), (b"Transfer-Encoding", b"chunked"), (b"Server", b"s"),
    )
    before = wire(incoming)
    raw = incoming.copyRaw()
    upstream(incoming)
    clientFields(incoming)
    assert wire(incoming) == before
    assert incoming.raw() == raw


def test_clientResponseFields() -> None:
    """
    Hop-by-hop fields, the fields Connection names, Server and X-Powered-By
    never reach the client; the backend's Content-Length survives (as the
    length the client side frames the body with) even when Connection
    names it.
    """
    result, length = fromBackend(
        [
            (b"Server", b"gunicorn"),
            (b"X-Powered-By", b"PHP/5"),
            (b"Connection", b"close, X-Internal, Content-Length"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Internal", b"1"),
            (b"Content-Length", b"12"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
            (b"Upgrade", b"h2c"),
        ]
    )
    assert wire(result) == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
    assert length == 12


def test_clientFieldsUnchangedWhenNothingToDrop() -> None:
    """The common case costs no copy: the same object comes back."""
    backend = fields((b"Content-Type", b"text/plain"), (b"ETag", b'"x"'))
    assert clientFields(backend) is backend


@pytest.mark.parametrize(
    "pairs",
    [
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Content-Length", b"5"), (b"Content-Length", b"6")],
        [(b"Content-Length", b"5, 6")],
        [(b"Content-Length", b"+5")],
        [(b"Content-Length", b"-1")],
        [(b"Content-Length", b"")],
        [(b"Content-Length", b"0x10")],
        [(b"Content-Length", b"9" * 30)],
        [(b"Transfer-Encoding", b"gzip")],
        [(b"Transfer-Encoding", b"chunked, gzip")],
        [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"identity")],
        # RFC 9112 7: the one policy for backends is "exactly chunked"
        # (the Headers-based check accepted a coding before it).
        [(b"Transfer-Encoding", b"gzip, Chunked")],
        [(b"X-A", b"a\x00b")],
        [(b"X-A", b"a\x01b")],
    ],
)
def test_ambiguousBackendFramingRefused(pairs: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(RemoteProtocolError):
        fromBackend(pairs)


@pytest.mark.parametrize(
    "pairs,length",
    [
        ([], None),
        ([(b"Content-Length", b"5")], 5),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"5")], 5),
        ([(b"Content-Length", b"5, 5")], 5),
        ([(b"Transfer-Encoding", b"chunked")], None),
        ([(b"Transfer-Encoding", b"Chunked")], None),
        ([(b"X-A", b"a\tb")], None),
    ],
)
def test_backendFramingAccepted(pairs: list[tuple[bytes, bytes]], length: int | None) -> None:
    assert fromBackend(pairs)[1] == length


def test_builtFieldsEqualCheckedOnes() -> None:
    """
    What the proxy builds without checking (L{Fields.trusted}) is what the
    checking constructor builds for the same fields: same names, same
    values, same order.
    """
    incoming = fields((b"accept", b"*/*"), (b"etag", b'"x"'), (b"X-A", b"1"), (b"x-a", b"2"))
    result = upstream(incoming, via=b"edge", hostOverride=b"backend.internal")
    reference = Fields(
        [
            (b"Host", b"backend.internal"),
            (b"Accept", b"*/*"),
            (b"ETag", b'"x"'),
            (b"X-A", b"1"),
            (b"X-A", b"2"),
            (b"X-Forwarded-For", b"192.0.2.7"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"example.com"),
            (b"Forwarded", b"for=192.0.2.7;host=example.com;proto=https"),
            (b"Via", b"1.1 edge"),
        ]
    )
    assert result == reference
    assert wire(result) == wire(reference)
    assert Fields(wire(result)) == result


def test_oddHostAndViaStayOneLine() -> None:
    """
    A configured value with a line break never splits a field line: the
    forward stage makes C{via} and C{host_header} L{sanitized} when it is
    built.
    """
    result = upstream(Fields(), hostOverride=sanitized(b"a\r\nX-Evil: 1"), via=sanitized(b"e\ndge"))
    assert result.getAll(b"host") == [b"a X-Evil: 1"]
    assert result.getAll(b"via") == [b"1.1 e dge"]
    assert b"x-evil" not in result


# Who the client is ------------------------------------------------------------

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    "peer,xff,client",
    [
        # Nobody in front: the peer, whatever it claims.
        ("192.0.2.7", [b"203.0.113.1"], "192.0.2.7"),
        # A trusted proxy: the right-most address it does not vouch for.
        ("10.0.0.1", [b"203.0.113.1"], "203.0.113.1"),
        ("10.0.0.1", [b"198.51.100.9, 203.0.113.1, 10.0.0.2"], "203.0.113.1"),
        ("10.0.0.1", [b"198.51.100.9", b"203.0.113.1"], "203.0.113.1"),
        # Every hop trusted: the left-most one.
        ("10.0.0.1", [b"10.0.0.3, 10.0.0.2"], "10.0.0.3"),
        # Ports and brackets as proxies write them.
        ("10.0.0.1", [b"203.0.113.1:4711"], "203.0.113.1"),
        ("2001:db8::1", [b"[2001:db9::5]:443"], "2001:db9::5"),
        # Nothing usable: the peer.
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", [b"unknown"], "10.0.0.1"),
    ],
)
def test_clientAddress(peer: str, xff: list[bytes], client: str) -> None:
    incoming = Fields([(b"x-forwarded-for", value) for value in xff])
    assert clientAddress(peer, incoming, TRUSTED) == client
    assert clientAddress(peer, incoming, ()) == peer


def test_isTrusted() -> None:
    assert isTrusted("10.1.2.3", TRUSTED)
    assert isTrusted("2001:db8::7", TRUSTED)
    assert not isTrusted("192.0.2.1", TRUSTED)
    assert not isTrusted("", TRUSTED)
    assert not isTrusted("10.1.2.3", ())


# Property tests.

_NAMES = st.sampled_from(
    [
        b"Accept", b"Cookie", b"X-A", b"X-B", b"Content-Type", b"Connection", b"Keep-Alive", b"TE", b"Trailer",
        b"Transfer-Encoding", b"Upgrade", b"Proxy-Connection", b"Host", b"X-Forwarded-For", b"Forwarded",
        b"X-Forwarded-Proto", b"X-Forwarded-Host", b"Via", b"Server", b"X-Powered-By", b"Content-Length",
    ]
)
_TOKENS = st.sampled_from(
    [b"close", b"keep-alive", b"x-a", b"X-B", b"cookie", b"host", b"x-forwarded-for", b"forwarded", b"via",
     b"x-forwarded-proto", b"x-forwarded-host", b"content-type", b"upgrade", b"content-length"]
)
_VALUES = st.text(alphabet="abc123=;, ", max_size=8).map(lambda s: s.strip().encode() or b"v")
_FIELD = st.one_of(
    st.tuples(_NAMES, _VALUES),
    st.tuples(st.just(b"Connection"), st.lists(_TOKENS, min_size=1, max_size=4).map(b", ".join)),
)
_FIELDS = st.lists(_FIELD, max_size=12)


def _named(incoming: Fields) -> set[bytes]:
    named: set[bytes] = set()
    for value in incoming.getAll(b"connection"):
        named.update(t.strip().lower() for t in value.split(b","))
    return named


@settings(max_examples=300)
@given(_FIELDS, st.booleans(), st.one_of(st.none(), st.just(b"edge")))
def test_noHopByHopSurvivesUpstream(pairs: list[tuple[bytes, bytes]], trusted: bool, via: bytes | None) -> None:
    incoming = Fields(pairs)
    named = _named(incoming)
    result = upstream(incoming, trustedPeer=trusted, via=via)
    names = [name for name, _ in wire(result)]
    for name in names:
        assert name not in HOP_BY_HOP
        assert name not in named or name in PROXY_ADDED
    for required in (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"):
        assert names.count(required) == 1
    if via is not None:
        assert result.getAll(b"via")[-1] == b"1.1 edge"


def _framingless(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # The parser refuses ambiguous framing (tested above); these tests are
    # about what crosses, so the framing fields are left out.
    return [(n, v) for n, v in pairs if n.lower() not in (b"content-length", b"transfer-encoding")]


@settings(max_examples=300)
@given(_FIELDS)
def test_noHopByHopSurvivesDownstream(pairs: list[tuple[bytes, bytes]]) -> None:
    pairs = _framingless(pairs)
    named = _named(Fields(pairs))
    result, _ = fromBackend(pairs)
    for name, _ in wire(result):
        assert name not in HOP_BY_HOP and name not in (b"server", b"x-powered-by")
        assert name not in named


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from([b"Cookie", b"X-A", b"Accept"]), _VALUES), max_size=10))
def test_repeatedOrderPreserved(pairs: list[tuple[bytes, bytes]]) -> None:
    incoming = Fields(pairs)
    up = upstream(incoming)
    down, _ = fromBackend(pairs)
    for name in (b"cookie", b"x-a", b"accept"):
        expected = [value for n, value in pairs if n.lower() == name]
        assert list(up.getAll(name)) == expected
        assert list(down.getAll(name)) == expected


_fieldNames = st.sampled_from(
    [b"accept", b"user-agent", b"cookie", b"via", b"x-forwarded-for", b"forwarded", b"connection",
     b"keep-alive", b"te", b"x_custom", b"x-custom", b"content-length", b"upgrade", b"expect",
     b"x-real-ip", b"X-Real-IP", b"x-request-id", b"X-Client-IP", b"server"]
)
_fieldValues = st.sampled_from(
    [b"a", b"keep-alive", b"close", b"x-custom", b"1.0 old", b"203.0.113.9", b"x-real-ip"]
)
_ownNames = st.sampled_from(
    [(None, None), ("X-Request-ID", None), ("X-Request-ID", "X-Real-IP"), ("X-Trace", "X-Client-IP")]
)


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(_fieldNames, _fieldValues), max_size=8),
    via=st.sampled_from([None, b"edge"]),
    override=st.sampled_from([None, b"backend.internal"]),
    names=_ownNames,
)
def test_linesPathGivesTheSameFields(
    pairs: list[tuple[bytes, bytes]], via: bytes | None, override: bytes | None,
    names: tuple[str | None, str | None],
) -> None:
    """
    Fields still held as the lines they were read as take a path of their
    own (no dictionary made); it gives the same fields as the general one,
    the proxy's own fields (request ID, client address) included.
    """
    lines = [name + b": " + value for name, value in pairs]
    own = ownFields(*names)
    kwargs: dict[str, Any] = dict(
        peer="192.0.2.7", trustedPeer=False, scheme=b"https", host=b"site.example",
        via=via, hostOverride=override, own=own, requestId=b"0123abcd", client="192.0.2.7",
    )
    fromLines = upstreamFields(Fields.fromLines(lines), **kwargs)
    general = upstreamFields(Fields(pairs), **kwargs)
    assert fromLines == general
    assert clientFields(Fields.fromLines(lines), own) == clientFields(Fields(pairs), own)


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(_fieldNames, _fieldValues), max_size=8),
    trusted=st.booleans(),
    upgrade=st.sampled_from([None, b"websocket"]),
    asLines=st.booleans(),
    names=_ownNames,
)
def test_noSpoofedClientAddressReachesABackend(
    pairs: list[tuple[bytes, bytes]], trusted: bool, upgrade: bytes | None, asLines: bool,
    names: tuple[str | None, str | None],
) -> None:
    """
    Whatever the client sent, on every path (lines or dictionary, trusted
    peer or not, an upgrade): no X-Real-IP but the proxy's, the client
    address field holds the client's address alone, and the request ID
    field the request's ID alone.
    """
    incoming = Fields.fromLines([n + b": " + v for n, v in pairs]) if asLines else Fields(pairs)
    own = ownFields(*names)
    out = upstreamFields(
        incoming, peer="192.0.2.7", trustedPeer=trusted, scheme=b"https", host=b"site.example",
        upgrade=upgrade, own=own, requestId=b"0123abcd", client="198.51.100.4",
    )
    client = b"198.51.100.4" if trusted else b"192.0.2.7"
    if own.clientIp is None:
        assert list(out.getAll(b"x-real-ip")) == []
    else:
        assert list(out.getAll(own.clientIp)) == [client]
        if own.clientIp != b"x-real-ip":
            assert list(out.getAll(b"x-real-ip")) == []
    if own.requestId is not None:
        assert list(out.getAll(own.requestId)) == [b"0123abcd"]


def test_clientAddressField() -> None:
    """
    The client address field: the peer's address (without its port) for
    an untrusted peer, the one trusted proxies vouch for otherwise; a
    client's copy, and any X-Real-IP, never reach the backend.
    """
    sent = fields((b"X-Real-IP", b"10.0.0.1"), (b"x-real-ip", b"10.0.0.2"), (b"Accept", b"*/*"))
    plain = upstream(sent)
    assert b"x-real-ip" not in plain and plain.getAll(b"accept") == [b"*/*"]
    real = upstream(sent, own=ownFields(None, "X-Real-IP"), peer="[2001:db8::7]:4711", client="2001:db8::7")
    assert list(real.getAll(b"x-real-ip")) == [b"2001:db8::7"]
    behind = upstream(
        sent, own=ownFields(None, "X-Client"), trustedPeer=True, peer="10.1.1.1", client="203.0.113.50",
    )
    assert list(behind.getAll(b"x-client")) == [b"203.0.113.50"]
    assert b"x-real-ip" not in behind
    # The field as the backend reads it, written by the proxy.
    lines = upstream(Fields.fromLines([b"X-Real-IP: 10.0.0.1"]), own=ownFields("X-Request-ID", "X-Real-IP"), requestId=b"ab")
    assert lines.lines() is not None
    assert [line for line in lines.lines() if line.lower().startswith((b"x-real-ip", b"x-request-id"))] == [
        b"X-Real-IP: 192.0.2.7", b"X-Request-ID: ab",
    ]


def test_requestIdField() -> None:
    """The request's ID replaces whatever the client sent in its field."""
    own = ownFields("X-Request-ID", None)
    out = upstream(fields((b"X-Request-Id", b"forged"), (b"X-Request-ID", b"again")), own=own, requestId=b"abc")
    assert list(out.getAll(b"x-request-id")) == [b"abc"]
    # Off: the client's field passes as any other.
    out = upstream(fields((b"X-Request-ID", b"theirs")))
    assert list(out.getAll(b"x-request-id")) == [b"theirs"]


def test_backendRequestIdDropped() -> None:
    """A backend's copy of the request ID field does not reach the client
    (the client side sends the request's own)."""
    backend = Fields.fromLines([b"X-Request-ID: backend-id", b"Content-Type: text/plain"])
    assert list(clientFields(backend, ownFields("X-Request-ID", None)).pairs()) == [
        (b"content-type", b"text/plain"),
    ]
    assert clientFields(backend) is backend
    assert clientFields(backend, ownFields(None, "X-Real-IP")) is backend
