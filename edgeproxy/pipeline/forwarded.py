# -*- test-case-name: tests.test_forwarded -*-
"""
Which fields cross the proxy, and which the proxy adds.  Pure functions over
L{Fields}; bytes end to end.

Request (L{upstreamFields}):
  - hop-by-hop fields go (RFC 9110 7.6.1): C{Connection}, every field it
    names, C{Keep-Alive}, C{Proxy-Connection}, C{TE}, C{Trailer},
    C{Transfer-Encoding}, C{Upgrade}; for a WebSocket tunnel the proxy sends
    its own C{Connection: upgrade} and C{Upgrade};
  - C{Content-Length} goes too: the backend connection writes the framing
    field from the body's length;
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
  - C{Via}: C{1.1 <pseudonym>} added after any received C{Via} values;
  - C{X-Real-IP} goes, always: backends read it as the client's address,
    and only the proxy knows that; with C{[edgeproxy] client_ip_header}
    set (C{X-Real-IP}, say) the proxy sends that field with the client's
    address (after trusted proxies), any copy the client sent removed;
  - the request ID's field (C{[edgeproxy] request_id}): the request's ID,
    in place of any the client sent (L{edgeproxy.headers.requestid} keeps
    a trusted proxy's);
  - C{Expect} is kept: the backend answers C{100-continue} itself.
Every other field is copied with all its values, in order.  The fields the
proxy sets of its own accord beyond the forwarding ones (the last two) are
an L{OwnFields}, made once per configuration.

Response (L{clientFields}): C{Server} and C{X-Powered-By} go (hop-by-hop
fields never reach a stage: the HTTP/1.1 parser keeps them apart), and so
does the request ID's field: the client side sends the request's own (the
one the backend was sent and the access log has) in every response.

L{clientAddress} is who the client is when trusted proxies stand in front:
the right-most address of C{X-Forwarded-For} that is not one of them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

from edgeproxy.h1.fields import LINES, Fields, linesWithout, noteLine
from edgeproxy.h1.responses import HOP_BY_HOP
from edgeproxy.h1.syntax import linePrefix

__all__ = [
    "NO_OWN_FIELDS",
    "PROXY_ADDED",
    "OwnFields",
    "clientAddress",
    "clientFields",
    "forwardedElement",
    "isTrusted",
    "ownFields",
    "sanitized",
    "upstreamFields",
]

PROXY_ADDED = frozenset(
    (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via")
)
"""The fields the proxy sets on upstream requests."""

_NOT_COPIED_UPSTREAM = HOP_BY_HOP | PROXY_ADDED | frozenset((b"content-length", b"x-real-ip"))
_NOT_RETURNED = frozenset((b"server", b"x-powered-by"))

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_MAX_CACHED = 4096


def _listElements(values: Iterable[bytes]) -> list[bytes]:
    elements = []
    for value in values:
        for element in value.split(b","):
            element = element.strip(b" \t")
            if element:
                elements.append(element)
    return elements


def _tokensOf(values: Sequence[bytes]) -> frozenset[bytes]:
    if len(values) == 1:
        # One field, usually one of a few values ("keep-alive", "close").
        tokens = _singleFieldTokens.get(values[0])
        if tokens is None:
            tokens = frozenset(element.lower() for element in _listElements(values))
            if len(_singleFieldTokens) >= 1024:
                _singleFieldTokens.clear()
            _singleFieldTokens[values[0]] = tokens
        return tokens
    return frozenset(element.lower() for element in _listElements(values))


_singleFieldTokens: dict[bytes, frozenset[bytes]] = {}


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
parameter): the same for every request of a client; bounded."""


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
    if len(_peerNodes) >= _MAX_CACHED:
        _peerNodes.clear()
    _peerNodes[peer] = nodes
    return nodes


_elements: dict[tuple[str, bytes, bytes], bytes] = {}


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
    if len(_elements) >= _MAX_CACHED:
        _elements.clear()
    _elements[key] = element
    return element


def sanitized(value: bytes) -> bytes:
    """
    A configured value made fit for a field (a line break becomes a
    space): done once, when the stage is built, for C{via} and
    C{host_header}.
    """
    if b"\r" in value or b"\n" in value:
        return b" ".join(value.splitlines())
    return value


class OwnFields:
    """
    The fields the proxy sets on upstream requests of its own accord, by
    configuration: the request ID's and the client address's (either
    L{None}: not sent).  Made by L{ownFields}.

    @ivar requestId: the request ID's field name (lower case), or L{None}.
    @ivar clientIp: the client address's field name (lower case), or L{None}.
    @ivar copied: request field names to whether they may be copied to a
        backend at all; bounded.
    """

    __slots__ = (
        "clientIp", "copied", "notCopied", "notReturned", "requestId", "requestIdPrefix",
    )

    def __init__(self, requestId: bytes | None, clientIp: bytes | None) -> None:
        self.requestId = requestId
        self.clientIp = clientIp
        own = frozenset(name for name in (requestId, clientIp) if name is not None)
        self.notCopied = _NOT_COPIED_UPSTREAM | own
        self.notReturned = _NOT_RETURNED if requestId is None else _NOT_RETURNED | {requestId}
        self.copied: dict[bytes, bool] = {}
        self.requestIdPrefix = b"" if requestId is None else linePrefix(requestId)
        """The start of the request ID's field line."""


_own: dict[tuple[str | None, str | None], OwnFields] = {}


def ownFields(requestId: str | None, clientIp: str | None) -> OwnFields:
    """
    The L{OwnFields} for C{[edgeproxy] request_id} and C{client_ip_header}
    (field names as configured, or L{None}); one per pair of names, so that
    what it learns of field names is shared.
    """
    key = (None if requestId is None else requestId.lower(), None if clientIp is None else clientIp.lower())
    own = _own.get(key)
    if own is None:
        if len(_own) >= 64:
            _own.clear()
        own = _own[key] = OwnFields(
            None if key[0] is None else key[0].encode("ascii"),
            None if key[1] is None else key[1].encode("ascii"),
        )
    return own


NO_OWN_FIELDS = ownFields(None, None)
"""Neither a request ID nor a client address field."""


def upstreamFields(
    incoming: Fields,
    *,
    peer: str,
    trustedPeer: bool,
    scheme: bytes,
    host: bytes,
    via: bytes | None = None,
    upgrade: bytes | None = None,
    hostOverride: bytes | None = None,
    receivedProtocol: bytes = b"1.1",
    own: OwnFields = NO_OWN_FIELDS,
    requestId: bytes = b"",
    client: str = "",
) -> Fields:
    """
    The fields to send to the backend for a client request.

    @param incoming: the client's fields.
    @param peer: the client's address as text: an IP address, optionally
        with a port (C{"[v6]:port"} for IPv6 with a port).
    @param trustedPeer: whether C{peer} is one of C{trusted_proxies}: then
        its forwarding fields are appended to instead of replaced.
    @param scheme: C{b"http"} or C{b"https"}: how the client reached us.
    @param host: the client's C{Host} (or HTTP/2 C{:authority}).
    @param via: the C{Via} pseudonym (L{sanitized}); L{None} adds no C{Via}.
    @param upgrade: for a protocol upgrade (WebSocket), the C{Upgrade}
        value to send along with C{Connection: upgrade}.
    @param hostOverride: the upstream's configured C{Host} (L{sanitized}), if
        any.
    @param receivedProtocol: the client's protocol version for C{Via}
        (RFC 9110 7.6.3): C{b"1.1"}, C{b"1.0"} or C{b"2"}.
    @param own: the fields the proxy sets of its own accord (L{ownFields}).
    @param requestId: the request's ID, sent in C{own}'s field.
    @param client: the client's address after trusted proxies (for a
        trusted C{peer}), sent in C{own}'s client address field; for an
        untrusted peer that is the peer's.
    """
    lines = incoming.lines()
    if lines is not None and not trustedPeer and upgrade is None:
        kept = _upstreamLines(
            lines, peer, scheme, host, via, hostOverride, receivedProtocol, own, requestId
        )
        if kept is not None:
            return Fields.fromLines(kept)
    fields = incoming.raw()
    # A parsed Host (and a configured host_header, encoded at start) holds
    # no line break: the writer's check covers anything else.
    out: dict[bytes, list[bytes]] = {b"host": [hostOverride if hostOverride is not None else host]}
    connection = fields.get(b"connection")
    named = _tokensOf(connection) if connection else _NOTHING
    copied = own.copied
    notCopied = own.notCopied
    for name, values in fields.items():
        allowed = copied.get(name)
        if allowed is None:
            allowed = name not in notCopied and b"_" not in name
            if len(copied) < _MAX_CACHED:
                copied[name] = allowed
        if allowed and name not in named:
            out[name] = list(values)

    node = _nodesOf(peer)[0]
    element = forwardedElement(peer, scheme, host)
    if trustedPeer:
        xff = _listElements(fields.get(b"x-forwarded-for", ()))
        forwarded = _listElements(fields.get(b"forwarded", ()))
        proto = _listElements(fields.get(b"x-forwarded-proto", ()))[:1] or [scheme]
        forwardedHost = _listElements(fields.get(b"x-forwarded-host", ()))[:1] or [host]
    else:
        xff, forwarded, proto, forwardedHost = [], [], [scheme], [host]
    out[b"x-forwarded-for"] = [b", ".join(xff + [node]) if xff else node]
    out[b"x-forwarded-proto"] = [proto[0]]
    if forwardedHost[0]:
        out[b"x-forwarded-host"] = [forwardedHost[0]]
    out[b"forwarded"] = [b", ".join(forwarded + [element]) if forwarded else element]

    received = list(fields.get(b"via", ()))
    if via is not None:
        received.append(receivedProtocol + b" " + via)
    if received:
        out[b"via"] = received
    if own.clientIp is not None:
        out[own.clientIp] = [client.encode("ascii") if trustedPeer and client else node]
    if own.requestId is not None and requestId:
        out[own.requestId] = [requestId]
    if upgrade is not None:
        out[b"connection"] = [b"upgrade"]
        out[b"upgrade"] = [upgrade]
    return Fields.trusted(out)


_NOTHING: frozenset[bytes] = frozenset()
_OPTIONS = frozenset((b"close", b"keep-alive"))


def _upstreamLines(
    lines: list[bytes],
    peer: str,
    scheme: bytes,
    host: bytes,
    via: bytes | None,
    hostOverride: bytes | None,
    receivedProtocol: bytes,
    own: OwnFields,
    requestId: bytes,
) -> list[bytes] | None:
    """
    L{upstreamFields} for fields still held as the lines they were read as,
    from an untrusted peer and without an upgrade: the same fields, as
    lines, without making the name-to-values dictionary (the lines kept are
    the client's own, as it spelled them).  L{None} when the request needs
    the general path (a C{Connection} naming fields to drop).
    """
    known = LINES
    copied = own.copied
    notCopied = own.notCopied
    out = [_hostLine(hostOverride if hostOverride is not None else host)]
    for line in lines:
        pair = known.get(line)
        lower = pair[0] if pair is not None else line.partition(b":")[0].lower()
        allowed = copied.get(lower)
        if allowed is None:
            allowed = lower not in notCopied and b"_" not in lower
            if len(copied) < _MAX_CACHED:
                copied[lower] = allowed
        if allowed:
            out.append(line)
        elif lower == b"via":
            # Received Via values are kept, in order, before this hop's.
            out.append(line)
        elif lower == b"connection":
            value = pair[1] if pair is not None else line.partition(b":")[2].strip(b" \t")
            if not _tokensOf([value]) <= _OPTIONS:
                return None
    out += _hopLines(peer, scheme, host, via, receivedProtocol, own.clientIp)
    if requestId and own.requestId is not None:
        # One line per request: never noted (it would crowd out the lines
        # that come again).
        out.append(own.requestIdPrefix + requestId)
    return out


_hostLines: dict[bytes, bytes] = {}


def _hostLine(host: bytes) -> bytes:
    line = _hostLines.get(host)
    if line is None:
        line = b"Host: " + host
        noteLine(line, b"host", host)
        if len(_hostLines) >= _MAX_CACHED:
            _hostLines.clear()
        _hostLines[host] = line
    return line


_hopBlocks: dict[tuple[str, bytes, bytes, bytes | None, bytes, bytes | None], list[bytes]] = {}
"""(peer, scheme, host, via, protocol, client address field) to the field
lines this hop adds for an untrusted peer: the same for every request of a
client to a site; bounded."""


def _hopLines(
    peer: str,
    scheme: bytes,
    host: bytes,
    via: bytes | None,
    receivedProtocol: bytes,
    clientIp: bytes | None,
) -> list[bytes]:
    key = (peer, scheme, host, via, receivedProtocol, clientIp)
    block = _hopBlocks.get(key)
    if block is None:
        pairs = [
            (b"x-forwarded-for", _nodesOf(peer)[0]),
            (b"x-forwarded-proto", scheme),
        ]
        if host:
            pairs.append((b"x-forwarded-host", host))
        pairs.append((b"forwarded", forwardedElement(peer, scheme, host)))
        if via is not None:
            pairs.append((b"via", receivedProtocol + b" " + via))
        if clientIp is not None:
            # An untrusted peer is the client.
            pairs.append((clientIp, _nodesOf(peer)[0]))
        block = []
        for lower, value in pairs:
            line = linePrefix(lower) + value
            noteLine(line, lower, value)
            block.append(line)
        if len(_hopBlocks) >= _MAX_CACHED:
            _hopBlocks.clear()
        _hopBlocks[key] = block
    return block


def clientFields(fields: Fields, own: OwnFields | None = None) -> Fields:
    """
    The fields of a backend's response the client gets.

    @param own: the fields the proxy sets of its own accord (L{ownFields}):
        a backend's copy of the request ID's field goes too.
    """
    dropped = _NOT_RETURNED if own is None else own.notReturned
    lines = fields.lines()
    if lines is not None:
        kept = linesWithout(lines, dropped)
        if len(kept) == len(lines):
            return fields
        return fields.withoutLines(kept, dropped)
    raw = fields.raw()
    for name in dropped:
        if name in raw:
            break
    else:
        return fields
    return Fields.trusted({name: values for name, values in raw.items() if name not in dropped})


def isTrusted(host: str, networks: tuple[Any, ...]) -> bool:
    """Whether the address C{host} is in one of C{networks}."""
    if not networks:
        # The default: nobody is trusted, and parsing the peer's address on
        # every request would be wasted.
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def clientAddress(peer: str, fields: Fields, networks: tuple[Any, ...]) -> str:
    """
    Who the client is: C{peer}, or when C{peer} is a trusted proxy, the
    right-most address in C{X-Forwarded-For} that is not one (the closest
    hop nobody we trust vouches for; anything left of it could be forged).
    """
    if not networks or not isTrusted(peer, networks):
        return peer
    chain = _listElements(fields.getAll(b"x-forwarded-for"))
    for index in range(len(chain) - 1, -1, -1):
        # Field values are bytes; an address is text (anything not ASCII
        # is then no address, and ip_address refuses it).
        address, _ = _splitPeer(chain[index].decode("latin-1"))
        if index and isTrusted(address, networks):
            continue
        # The first hop nobody trusted vouches for, or the left-most one
        # when every hop is trusted.
        try:
            return str(ipaddress.ip_address(address))
        except ValueError:
            return peer
    return peer
