# -*- test-case-name: tests.test_headers -*-
"""
Header rules between client and backend: which fields cross the proxy, and
which the proxy adds.  Pure functions over L{Headers}; bytes end to end.

Request (L{upstreamRequestHeaders}):
  - hop-by-hop fields go (RFC 9110 7.6.1): C{Connection}, every field it
    names, C{Keep-Alive}, C{Proxy-Connection}, C{TE}, C{Trailer},
    C{Transfer-Encoding}, C{Upgrade}; for a WebSocket tunnel the proxy sends
    its own C{Connection: upgrade} and C{Upgrade};
  - C{Content-Length} goes too: the Agent writes the framing header itself
    from the body producer's length, a copied one would be sent twice;
  - C{Expect} goes: the edge has already answered C{100-continue};
  - names containing C{_} go (CGI/WSGI map C{-} and C{_} to the same
    variable, so C{X_Forwarded_For} could pose as C{X-Forwarded-For});
  - the proxy's own fields (C{Host}, C{X-Forwarded-*}, C{Forwarded},
    C{Via}) can never be removed by a client's C{Connection} tokens;
  - C{X-Forwarded-For} and C{Forwarded}: replaced by this hop's element for
    an untrusted peer; for a trusted peer (a proxy in front of us) its
    values are kept, in order, and this hop's element is appended, each as
    a single field line;
  - C{X-Forwarded-Proto} and C{X-Forwarded-Host} describe the original
    request, not a hop: replaced for an untrusted peer; for a trusted peer
    the first value it sent is kept (the one closest to the client), and
    ours is used when it sent none;
  - C{Host}: the client's (or the upstream's configured C{host_header});
  - C{Via}: C{1.1 <pseudonym>} added after any received C{Via} values.
Every other field is copied with all its values, in order.

Response (L{clientResponseHeaders}): hop-by-hop fields and C{Server},
C{X-Powered-By} go; C{Content-Length} stays (and cannot be removed by a
C{Connection} token) so responses are not needlessly re-chunked.

L{checkResponseHeaders} refuses backend heads with ambiguous framing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import NoReturn

from twisted.web.http_headers import Headers, _nameEncoder

from edgeproxy.errors import UpstreamProtocolError

HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    )
)
"""Lower-case names of the fields that only concern one connection."""

PROXY_ADDED = frozenset(
    (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via")
)
"""Lower-case names of the fields the proxy sets on upstream requests."""

_NOT_COPIED_UPSTREAM = HOP_BY_HOP | PROXY_ADDED | frozenset((b"content-length", b"expect"))
_NOT_COPIED_DOWNSTREAM = HOP_BY_HOP | frozenset((b"server", b"x-powered-by"))
_PROTECTED_DOWNSTREAM = frozenset((b"content-length",))

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"


# ---------------------------------------------------------------------------
# Twisted private surface.
#
# Headers keeps its fields in _rawHeaders: a dict from the canonical name
# (what twisted.web.http_headers._nameEncoder.encode makes of a name: a
# token, in Header-Case) to the list of values, each already free of line
# breaks.  Every public method encodes the name and sanitises the values
# again on every call; on the hot path the proxy reads and fills the dict
# directly instead (the Headers methods were about 20% of the in-memory R1
# profile).  This block is the only code outside the upstream client that
# touches it; TwistedPrivateSurfaceTests in tests/test_headers.py fails if
# Twisted changes it.
# ---------------------------------------------------------------------------


def rawFields(headers: Headers) -> dict[bytes, list[bytes]]:
    """
    The fields of C{headers}, as C{Headers} keeps them: canonical name to
    values, in insertion order.  Changing the dict changes C{headers}.
    """
    return headers._rawHeaders


def headersFrom(fields: dict[bytes, list[bytes]]) -> Headers:
    """
    A L{Headers} holding C{fields} (not a copy), whose keys must already be
    canonical names (L{canonicalName}) and whose values must be free of CR
    and LF.
    """
    headers = Headers.__new__(Headers)
    headers._rawHeaders = fields
    return headers


def canonicalName(name: bytes) -> bytes:
    """
    The key C{Headers} files a field named C{name} under.

    @raise ValueError: C{name} is not a token (Twisted's
        C{InvalidHeaderName}).
    """
    return _nameEncoder.encode(name)


# ---------------------------------------------------------------------------


def connectionTokens(headers: Headers) -> frozenset[bytes]:
    """
    The lower-case field names listed in every C{Connection} field of
    C{headers} (RFC 9110 7.6.1).
    """
    return _tokensOf(rawFields(headers).get(b"Connection", ()))


def _listElements(values: Iterable[bytes]) -> list[bytes]:
    elements = []
    for value in values:
        for element in value.split(b","):
            element = element.strip(b" \t")
            if element:
                elements.append(element)
    return elements


def _splitPeer(peer: str) -> tuple[str, str | None]:
    """
    C{"192.0.2.1"}, C{"192.0.2.1:4711"}, C{"2001:db8::1"} or
    C{"[2001:db8::1]:4711"} into (address, port or None).
    """
    if peer.startswith("["):
        address, _, rest = peer[1:].partition("]")
        return address, rest[1:] if rest.startswith(":") else None
    if peer.count(":") == 1:
        address, _, port = peer.partition(":")
        return address, port
    return peer, None


def _quoted(value: bytes) -> bytes:
    if _TOKEN.fullmatch(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_peerNodes: dict[str, tuple[bytes, bytes]] = {}
"""Peer text to (its C{X-Forwarded-For} node, its C{Forwarded} C{for=}
parameter).  Parsing an address with C{ipaddress} on every request was
about 3% of the R1 profile, for an answer that is the same for every request
of a client.  Bounded: emptied when full."""
_MAX_PEER_NODES = 4096


def _nodesOf(peer: str) -> tuple[bytes, bytes]:
    nodes = _peerNodes.get(peer)
    if nodes is not None:
        return nodes
    address, port = _splitPeer(peer)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        xff = node = b"unknown"
    else:
        xff = str(ip).encode()
        node = b"[" + xff + b"]" if ip.version == 6 else xff
        if port and port.isdigit():
            node += b":" + port.encode()
    nodes = (xff, b"for=" + _quoted(node))
    if len(_peerNodes) >= _MAX_PEER_NODES:
        _peerNodes.clear()
    _peerNodes[peer] = nodes
    return nodes


def forwardedElement(peer: str, scheme: bytes, host: bytes) -> bytes:
    """
    One RFC 7239 C{Forwarded} element for this hop, e.g.
    C{for="[2001:db8::1]";host=example.com;proto=https}.  A peer that is not
    an IP address (a UNIX socket) is C{unknown} (RFC 7239 6.2).
    """
    key = (peer, scheme, host)
    element = _elements.get(key)
    if element is not None:
        return element
    forParameter = _nodesOf(peer)[1]
    if host:
        element = b"%s;host=%s;proto=%s" % (forParameter, _quoted(host), _quoted(scheme.lower()))
    else:
        element = b"%s;proto=%s" % (forParameter, _quoted(scheme.lower()))
    if len(_elements) >= _MAX_PEER_NODES:
        _elements.clear()
    _elements[key] = element
    return element


_elements: dict[tuple[str, bytes, bytes], bytes] = {}
"""(peer, scheme, host) to this hop's C{Forwarded} element: the same for
every request of a client to a site; bounded like L{_peerNodes}."""


def _forwardedFor(peer: str) -> bytes:
    return _nodesOf(peer)[0]


def upstreamRequestHeaders(
    incoming: Headers,
    *,
    peer: str,
    trustedPeer: bool,
    scheme: bytes,
    host: bytes,
    via: bytes | None = None,
    upgrade: bytes | None = None,
    hostOverride: bytes | None = None,
    receivedProtocol: bytes = b"1.1",
) -> Headers:
    """
    The headers to send to the backend for a client request.

    @param incoming: The client's request headers (not modified).
    @param peer: The client's address as text: an IP address, optionally
        with a port (C{"[v6]:port"} for IPv6 with a port).
    @param trustedPeer: Whether C{peer} is one of C{trusted_proxies}: then
        its forwarding fields are appended to instead of replaced.
    @param scheme: C{b"http"} or C{b"https"}: how the client reached us.
    @param host: The client's C{Host} (or HTTP/2 C{:authority}).
    @param via: The C{Via} pseudonym; L{None} adds no C{Via}.
    @param upgrade: For a protocol upgrade (WebSocket), the C{Upgrade}
        value to send along with C{Connection: upgrade}.
    @param hostOverride: The upstream's configured C{Host}, if any.
    @param receivedProtocol: The client's protocol version for C{Via}
        (RFC 9110 7.6.3): C{b"1.1"}, C{b"1.0"} or C{b"2"}.
    """
    # Built as Headers keeps fields (see rawFields): the incoming keys are
    # already canonical and its values already free of line breaks, and
    # what the proxy adds is made of them, of addresses and of configured
    # tokens; so the output is what addRawHeader/setRawHeaders would make,
    # in the same order, without re-encoding and re-sanitising each field.
    if b"\r" in host or b"\n" in host:
        host = _sanitized(host)
    if b"\r" in scheme or b"\n" in scheme:
        scheme = _sanitized(scheme)
    fields = rawFields(incoming)
    out: dict[bytes, list[bytes]] = {
        b"Host": [_sanitized(hostOverride) if hostOverride is not None else host]
    }
    connection = fields.get(b"Connection")
    named = _tokensOf(connection) if connection else _NOTHING
    upstreamNames = _upstreamNames
    for name, values in fields.items():
        known = upstreamNames.get(name)
        if known is None:
            known = _upstreamName(name)
        copied, lowered = known
        if copied and lowered not in named:
            out[name] = list(values)

    node = _forwardedFor(peer)
    element = forwardedElement(peer, scheme, host)
    if trustedPeer:
        xff = _listElements(fields.get(b"X-Forwarded-For", ()))
        forwarded = _listElements(fields.get(b"Forwarded", ()))
        proto = _listElements(fields.get(b"X-Forwarded-Proto", ()))[:1] or [scheme]
        forwardedHost = _listElements(fields.get(b"X-Forwarded-Host", ()))[:1] or [host]
    else:
        xff, forwarded, proto, forwardedHost = [], [], [scheme], [host]
    out[b"X-Forwarded-For"] = [b", ".join(xff + [node]) if xff else node]
    out[b"X-Forwarded-Proto"] = [proto[0]]
    if forwardedHost[0]:
        out[b"X-Forwarded-Host"] = [forwardedHost[0]]
    out[b"Forwarded"] = [b", ".join(forwarded + [element]) if forwarded else element]

    received = list(fields.get(b"Via", ()))
    if via is not None:
        received.append(receivedProtocol + b" " + _sanitized(via))
    if received:
        out[b"Via"] = received
    if upgrade is not None:
        out[b"Connection"] = [b"upgrade"]
        out[b"Upgrade"] = [_sanitized(upgrade)]
    return headersFrom(out)


def _sanitized(value: bytes) -> bytes:
    # What Headers does to a value it is given (a line break becomes a
    # space), for the values that do not come from a Headers.
    if b"\r" in value or b"\n" in value:
        return b" ".join(value.splitlines())
    return value


_NOTHING: frozenset[bytes] = frozenset()

_upstreamNames: dict[bytes, tuple[bool, bytes]] = {}
"""Request field names to (whether the field may be copied to the backend
at all, its lower-case form); bounded."""


def _upstreamName(name: bytes) -> tuple[bool, bytes]:
    lowered = name.lower()
    known = (lowered not in _NOT_COPIED_UPSTREAM and b"_" not in name, lowered)
    if len(_upstreamNames) < _MAX_VALID_NAMES:
        _upstreamNames[name] = known
    return known


def clientResponseHeaders(incoming: Headers, *, upgrade: bool = False) -> Headers:
    """
    The headers to send to the client for a backend response.

    @param incoming: The backend's response headers (not modified).
    @param upgrade: The response is a C{101} for a tunnel: keep C{Upgrade}
        and send C{Connection: upgrade}.
    """
    fields = rawFields(incoming)
    out: dict[bytes, list[bytes]] = {}
    named = _tokensOf(fields.get(b"Connection", ())) - _PROTECTED_DOWNSTREAM
    for name, values in fields.items():
        lowered = name.lower()
        if lowered in _NOT_COPIED_DOWNSTREAM or lowered in named:
            continue
        out[name] = list(values)
    if upgrade:
        upgrades = fields.get(b"Upgrade")
        if upgrades:
            out[b"Upgrade"] = list(upgrades)
        out[b"Connection"] = [b"upgrade"]
    return headersFrom(out)


_MAX_VALID_NAMES = 10_000
"""Bound on the caches of field names below."""


def responseHeadersForClient(
    headers: Headers, connectionHeaders: Headers | None = None
) -> Headers:
    """
    L{checkResponseHeaders} then L{clientResponseHeaders} of a backend
    response whose fields arrive in two sets (Twisted's client, and
    L{edgeproxy.upstream.client}, keep the connection control fields apart),
    in one pass and without first merging them into a copy: the same result,
    the same errors, for about half the work on every response.

    @param headers: the response's C{headers}.
    @param connectionHeaders: its connection control fields, taken as coming
        after C{headers} (as C{fullResponseHeaders} merges them).
    @raise UpstreamProtocolError: what L{checkResponseHeaders} raises.
    """
    fields = rawFields(headers)
    if connectionHeaders is None:
        items: Iterable[tuple[bytes, list[bytes]]] = fields.items()
    else:
        control = rawFields(connectionHeaders)
        for name in control:
            if name in fields:
                # A name in both sets (never from a parser that splits them
                # by name): merge the slow, obvious way.
                merged = headers.copy()
                for extraName, extraValues in connectionHeaders.getAllRawHeaders():
                    for value in extraValues:
                        merged.addRawHeader(extraName, value)
                checkResponseHeaders(merged)
                return clientResponseHeaders(merged)
        items = [*fields.items(), *control.items()] if control else fields.items()
    lengths = codings = None
    connection: Sequence[bytes] | None = None
    # The Connection field, looked up by its canonical name to filter in the
    # same pass; checked against the one the pass finds (by lower-case name,
    # the last one), and filtered again if they differ.
    expected = fields.get(b"Connection")
    if connectionHeaders is not None:
        expected = control.get(b"Connection", expected)
    # (Content-Length is never removed by a Connection token: it is not a
    # _COPY field, the only kind this filters.)
    named = _tokensOf(expected) if expected else _NOTHING
    out: dict[bytes, list[bytes]] = {}
    allValues: list[bytes] = []
    responseNames = _responseNames
    for name, values in items:
        known = responseNames.get(name)
        if known is None:
            known = _responseName(name)
            if known is None:
                _raiseFirstFieldError(items)
        kind, lower = known
        # Every value is checked, below, in one pass over all of them.
        allValues += values
        if kind is _COPY:
            if lower not in named:
                out[name] = list(values)
        elif kind is _LENGTH:
            lengths = values or None
            out[name] = list(values)
        elif kind is _CODINGS:
            codings = values or None
        elif kind is _CONNECTION:
            connection = values
    if len(allValues) == 1:
        text = allValues[0]
    else:
        text = b" ".join(allValues)
    if len(text.translate(None, _BAD_VALUE)) != len(text):
        _raiseFirstFieldError(items)
    _checkFraming(lengths, codings)
    if connection is not expected:
        # Only with names Headers would not have filed as they are.
        out = {}
        named = _tokensOf(connection or ()) - _PROTECTED_DOWNSTREAM
        for name, values in items:
            kind, lower = responseNames.get(name) or _responseName(name)  # type: ignore[misc]
            if (kind is _COPY and lower not in named) or kind is _LENGTH:
                out[name] = list(values)
    return headersFrom(out)


# What responseHeadersForClient does with a field, by name.
_COPY = "copy"
_LENGTH = "length"
_CODINGS = "codings"
_CONNECTION = "connection"
_DROP = "drop"

_responseNames: dict[bytes, tuple[str, bytes]] = {}
"""Response field names already found to be tokens, to (what
L{responseHeadersForClient} does with the field, its lower-case form);
bounded like the channel's cache of request field names."""


def _raiseFirstFieldError(items: Iterable[tuple[bytes, Sequence[bytes]]]) -> NoReturn:
    """
    Raise what L{checkResponseHeaders} raises for the first bad field of
    C{items}, in order: its name, then its values.
    """
    for name, values in items:
        if _TOKEN.fullmatch(name) is None:
            raise UpstreamProtocolError(f"invalid response header name {name[:64]!r}")
        for value in values:
            if len(value.translate(None, _BAD_VALUE)) != len(value):
                raise UpstreamProtocolError(f"control character in response header {name!r}")
    raise AssertionError("no bad field")  # pragma: no cover


def _responseName(name: bytes) -> tuple[str, bytes] | None:
    """
    What L{responseHeadersForClient} does with a field named C{name}, and
    its lower-case form; L{None} when C{name} is not a token.
    """
    if _TOKEN.fullmatch(name) is None:
        return None
    lower = name.lower()
    if lower == b"content-length":
        kind = _LENGTH
    elif lower == b"transfer-encoding":
        kind = _CODINGS
    elif lower == b"connection":
        kind = _CONNECTION
    elif lower in _NOT_COPIED_DOWNSTREAM:
        kind = _DROP
    else:
        kind = _COPY
    known = (kind, lower)
    if len(_responseNames) < _MAX_VALID_NAMES:
        _responseNames[name] = known
    return known


def _tokensOf(values: Sequence[bytes]) -> frozenset[bytes]:
    if len(values) == 1:
        # One field, usually one of a few values ("keep-alive", "close").
        value = values[0]
        tokens = _singleFieldTokens.get(value)
        if tokens is None:
            tokens = _tokensOfEach(values)
            if len(_singleFieldTokens) >= 1024:
                _singleFieldTokens.clear()
            _singleFieldTokens[value] = tokens
        return tokens
    return _tokensOfEach(values)


_singleFieldTokens: dict[bytes, frozenset[bytes]] = {}
"""A list field's value to its lower-case tokens; bounded."""


def _tokensOfEach(values: Iterable[bytes]) -> frozenset[bytes]:
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip(b" \t").lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def checkResponseHeaders(headers: Headers) -> None:
    """
    Refuse a backend response head whose framing or fields could be read
    two ways.

    @raise UpstreamProtocolError: C{Content-Length} with
        C{Transfer-Encoding}; differing or malformed C{Content-Length}
        values; a C{Transfer-Encoding} not ending in a single C{chunked};
        a field name that is not a token; a control character (other than
        HTAB) in a value.
    """
    for name, values in headers.getAllRawHeaders():
        if _TOKEN.fullmatch(name) is None:
            raise UpstreamProtocolError(f"invalid response header name {name[:64]!r}")
        for value in values:
            if len(value.translate(None, _BAD_VALUE)) != len(value):
                raise UpstreamProtocolError(f"control character in response header {name!r}")
    _checkFraming(
        headers.getRawHeaders(b"Content-Length"), headers.getRawHeaders(b"Transfer-Encoding")
    )


def _checkFraming(
    lengths: Sequence[bytes] | None, codings: Sequence[bytes] | None
) -> None:
    if lengths is not None and codings is not None:
        raise UpstreamProtocolError("response has both Content-Length and Transfer-Encoding")
    if lengths is not None and codings is None and len(lengths) == 1:
        length = lengths[0]
        if length.isdigit() and length.isascii() and len(length) <= 18:
            # The usual case: one plain value.
            return
    if lengths is not None:
        elements = [element.strip(b" \t") for value in lengths for element in value.split(b",")]
        for element in elements:
            if not element.isdigit() or not element.isascii() or len(element) > 18:
                raise UpstreamProtocolError(f"invalid response Content-Length {element[:32]!r}")
        if len({int(element) for element in elements}) != 1:
            raise UpstreamProtocolError("conflicting response Content-Length values")
    if codings is not None:
        elements = [element.strip(b" \t").lower() for value in codings for element in value.split(b",")]
        if not elements or elements[-1] != b"chunked" or elements.count(b"chunked") != 1:
            raise UpstreamProtocolError("response Transfer-Encoding does not end in a single chunked")
        if not all(_TOKEN.fullmatch(element) for element in elements):
            raise UpstreamProtocolError("invalid response Transfer-Encoding")
