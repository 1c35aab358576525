# -*- test-case-name: tests.test_forward -*-
"""
L{Forward}: the last stage of every route, the only code that talks to an
upstream pool.

It rewrites the request's fields for the backend
(L{edgeproxy.pipeline.forwarded.upstreamFields}), strips the route's prefix
when asked, computes the balancing key, and sends the request with the
client's body through the pool (which picks the backend, retries, queues
and times out).  The pool reports to the call; this stage turns the
backend's response into the pipeline's L{Response} (L{clientFields}) and
its failure into the L{ProxyError} the client gets.

A route with timeouts or retries of its own (C{[route:NAME]}
C{connect_timeout}, C{response_timeout}, C{retries}, C{request_timeout})
sends on the pool's L{edgeproxy.upstream.terms.Terms} for them, asked for
once when the stage is built; a route without sends as the pool's own.

A WebSocket opening handshake on a route that allows WebSockets is handed
to the client side's C{tunnel} (the HTTP/1.1 connection is taken over);
any other C{Upgrade} is dropped with the other hop-by-hop fields.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.config.model import ProxySettings, Route, Upstream
from edgeproxy.errors import ProxyError
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.forwarded import (
    clientFields,
    isTrusted,
    ownFields,
    sanitized,
    upstreamFields,
)
from edgeproxy.pipeline.values import Request, Response
from edgeproxy.proxyheader import header as proxyHeader
from edgeproxy.upstream.balance import requestHashKey

__all__ = ["Forward", "isWebSocketUpgrade", "stripPrefix"]

log = Logger()

_VIA_PROTOCOLS = {b"HTTP/1.0": b"1.0", b"HTTP/1.1": b"1.1", b"HTTP/2": b"2"}

_SENDING: Any = object()
"""C{call.cancelHook} while the pool's C{send} runs: its outcome may come
before C{send} returns (no backend available)."""


def stripPrefix(path: bytes, prefix: bytes) -> bytes:
    """
    Remove the matched route prefix from C{path}, keeping it absolute:
    C{/api/x} under C{/api} gives C{/x}, C{/api} itself gives C{/}.
    """
    rest = path[len(prefix.rstrip(b"/")) :]
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest


def _listTokens(values: Any) -> list[bytes]:
    return [
        token
        for value in values
        for token in (part.strip(b" \t").lower() for part in value.split(b","))
        if token
    ]


def isWebSocketUpgrade(request: Request) -> bool:
    """
    Is C{request} a WebSocket opening handshake the proxy may forward?

    RFC 6455 4.1: an HTTP/1.1 C{GET} whose C{Upgrade} lists C{websocket}
    and whose C{Connection} lists C{upgrade} (case aside).  A request with a
    body is not one (its body would have to be read before the connection
    could switch, and a handshake has none); HTTP/1.0 ignores C{Upgrade}
    (RFC 9110 7.8).  Over HTTP/2 it is an extended CONNECT (RFC 8441).
    """
    fields = request.fields
    if request.version == b"HTTP/2":
        # RFC 8441 4: an extended CONNECT, whose :protocol the HTTP/2
        # protocol hands on as the Upgrade field it stands for.
        return request.method == b"CONNECT" and fields.get(b"upgrade") == b"websocket"
    return (
        request.method == b"GET"
        and request.version == b"HTTP/1.1"
        and request.length == 0
        and b"websocket" in _listTokens(fields.getAll(b"upgrade"))
        and b"upgrade" in _listTokens(fields.getAll(b"connection"))
    )


class Forward:
    """
    Send the request to the route's upstream pool.

    @ivar pool: the pool of the route's upstream (in this runtime); its
        C{seconds} is the clock the backend's answer is timed with.
    """

    __slots__ = (
        "pool", "upstream", "route", "_trusted", "_via", "_hostOverride", "_hashKey", "_terms",
        "_own",
    )

    def __init__(self, route: Route, pool: Any, proxy: ProxySettings) -> None:
        self.pool = pool
        # The route's own timeouts and retries (None: the pool's own).
        self._terms = None
        if route.forwarding is not None:
            terms = pool.termsFor(route.forwarding)
            if terms is not pool.terms:
                self._terms = terms
        self.route = route
        upstream: Upstream = pool.upstream
        self.upstream = upstream
        self._trusted = proxy.trusted_proxies
        self._via = None if proxy.via is None else sanitized(proxy.via.encode("ascii"))
        self._hostOverride = (
            None if upstream.host_header is None else sanitized(upstream.host_header.encode("idna"))
        )
        self._hashKey = upstream.hash_key if upstream.balance == "hash" else None
        self._own = ownFields(proxy.request_id, proxy.client_ip_header)

    def handle(self, call: Call) -> None:
        request = call.request
        connection = request.connection
        peer = connection.peer
        upgrade = None
        if (
            request.fields.get(b"upgrade") is not None
            and self.route.websocket
            and isWebSocketUpgrade(request)
        ):
            upgrade = b"websocket"
        fields = upstreamFields(
            request.fields,
            peer=peer,
            trustedPeer=isTrusted(peer, self._trusted) if self._trusted else False,
            scheme=connection.scheme,
            host=request.host,
            via=self._via,
            upgrade=upgrade,
            hostOverride=self._hostOverride,
            receivedProtocol=_VIA_PROTOCOLS.get(request.version, b"1.1"),
            own=self._own,
            requestId=request.requestId,
            client=request.client,
        )
        path = request.path
        if self.route.strip_prefix:
            path = stripPrefix(path, request.prefix)
        # The query keeps its "?" (an empty one too).
        path += request.query
        hashKey = None
        if self._hashKey is not None:
            # The client's own fields, before they were rewritten for the
            # backend, and the path as routed (before strip_prefix).
            hashKey = requestHashKey(self._hashKey, request.client, request.fields, request.path)
        call.upstreamName = self.upstream.name
        if upgrade is not None:
            call.client.tunnel(call, self.pool, fields, path, hashKey)
            return
        call.forwarder = self
        call.cancelHook = _SENDING
        proxyVersion = self.upstream.proxy_protocol
        terms = self._terms
        if proxyVersion is not None or terms is not None:
            proxyHeader = None
            if proxyVersion is not None:
                proxyHeader = requestHeader(proxyVersion, request)
            exchange = self.pool.send(
                request.method, path, fields, call.body, call, hashKey, proxyHeader, terms
            )
        else:
            exchange = self.pool.send(request.method, path, fields, call.body, call, hashKey)
        if call.cancelHook is _SENDING:
            call.cancelHook = exchange.cancel

    # The pool's outcome (through the call) ----------------------------------

    def responded(self, call: Call, response: Any) -> None:
        # For the access log only (never the client): which backend
        # answered, and when its head came.
        call.upstreamHead = self.pool.seconds()
        call.backend = response.backend
        call.respond(
            Response(
                response.status,
                response.reason,
                clientFields(response.fields, self._own),
                response.length,
                response,
            )
        )

    def failed(self, call: Call, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, ProxyError):
            log.failure("unexpected failure while proxying", failure=failure)
            error = ProxyError(str(error))
        # For the access log only: the backend that failed, or did not
        # answer in time.
        call.backend = error.backend
        call.fail(error)


def requestHeader(version: str, request: Request) -> bytes:
    """
    The PROXY protocol header that starts the backend connection of
    C{request}: its client (after trusted proxies and the PROXY protocol of
    the listener) and the address it connected to.  The client's port is
    known only when the client is the connection's peer; 0 otherwise.
    """
    connection = request.connection
    port = connection.peerPort if request.client == connection.peer else 0
    return proxyHeader(version, request.client, port, connection.local, connection.localPort)
