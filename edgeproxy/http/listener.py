# -*- test-case-name: tests.test_server -*-
"""
L{ListenerFactory}: what one C{[listen:NAME]} serves its connections with.

It builds one L{HTTP1Connection} per accepted connection (which switches to
HTTP/2 when ALPN chose it), offers the listener's ALPN protocols, keeps the
listener's timeouts (one L{DeadlineQueue} per timeout for all its
connections), the connections still open and the requests in flight (so
the service can drain them), and chooses what serves a request: the route's
stages, or on a C{redirect_https} listener the redirect to https.  It
writes one access-log line per request and counts connections, bytes,
handshakes and requests in the metrics.

Settings a reload changes (limits, idle timeout, redirect) apply to new
connections: L{ListenerFactory.reconfigure}.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy._compat.twisted.tcp import LeanServer
from edgeproxy._compat.twisted.tls import EdgeTLSTransport
from edgeproxy.config.model import Listener
from edgeproxy.errors import (
    BadRequest,
    ContentTooLarge,
    MisdirectedRequest,
    NoRoute,
    ProxyError,
    RequestHeadRefused,
)
from edgeproxy.h1.fields import Fields
from edgeproxy.http.acmehook import http01Stage
from edgeproxy.http.deadlines import DeadlineQueue
from edgeproxy.http.errorpages import pagesFor, rejection
from edgeproxy.http.h2 import HTTP2Connection
from edgeproxy.http.redirect import RedirectStage
from edgeproxy.http.server import HTTP1Connection, isTLSFailure
from edgeproxy.logs import reasonOf, refusals
from edgeproxy.metrics import Metrics, Traffic
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.forwarded import clientAddress, isTrusted
from edgeproxy.pipeline.values import ConnectionInfo, Request
from edgeproxy.routing import normaliseHost
from edgeproxy.security.paths import backendView, mayDiffer
from edgeproxy.targets import normaliseTarget
from edgeproxy.tls.failures import handshakeFailureReason

__all__ = ["ListenerFactory"]

log = Logger()

_REJECTED = {
    408: "header timeout",
    414: "request line too long",
    431: "head too large",
    501: "unsupported framing",
    505: "unsupported version",
}
"""Labels of the parser's refusals in the process log's summary."""

LINE_LIMIT = 1024
"""Bytes of a refused request's line (or HTTP/2 C{:path}) its access-log
line keeps: a 414's line is longer than any log line should be."""

_NO_FIELDS = Fields(())


class _Shared:
    """
    One copy of each value that many connections' L{ConnectionInfo} hold
    alike (the local address, the SNI name, the TLS version, the ALPN
    protocol), where each connection would otherwise keep copies of its
    own: about 220 bytes a connection, a tenth of what the proxy's own
    objects hold for an idle one (R4 in C{docs/performance.rst}).  At most
    L{LIMIT} values are kept, so that clients sending names at random
    cannot grow it: past that, values are used as they come.
    """

    LIMIT = 1024

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[Any, Any] = {}

    def __call__(self, value: Any) -> Any:
        values = self._values
        kept = values.get(value)
        if kept is None:
            if len(values) >= self.LIMIT:
                return value
            kept = values[value] = value
        return kept


@implementer(IProtocolNegotiationFactory)
class ListenerFactory(Factory):
    """
    @ivar listener: the settings new connections get.
    @ivar channels: the connections still open.
    @ivar inflight: the calls (requests) received and not over.
    """

    noisy = False

    clientAuth: Any = None
    """The listener's client certificate policy
    (L{edgeproxy.security.listening.ClientAuth}), or L{None}: set where
    its port is built."""

    acmeChallenges: Any = None
    """The L{edgeproxy.acme.challenges.ChallengeStore} whose HTTP-01 tokens
    this listener answers (L{edgeproxy.http.acmehook}); L{None} without
    ACME (set by the service)."""

    requestIds: Any = None
    """The L{edgeproxy.headers.requestid.RequestIds} of the runtime the
    latest request was prepared with (the protocols name the ID's field in
    responses with it), or L{None}."""

    def __init__(
        self,
        currentRuntime: Callable[[], Any],
        listener: Listener,
        reactor: Any,
        accessLog: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.currentRuntime = currentRuntime
        self.clock = reactor
        self.reactor = reactor
        self.accessLog = accessLog
        self.metrics = metrics
        self.channels: set[Any] = set()
        self.http2: set[Any] = set()
        self._websockets: dict[int, bool] = {}
        self.inflight: set[Call] = set()
        self._queues: dict[tuple[str, float], DeadlineQueue] = {}
        self._shared = _Shared()
        self.reconfigure(listener)

    def reconfigure(self, listener: Listener) -> None:
        """
        Take C{listener}'s settings for the connections opened from now on
        (a reload that kept the port).
        """
        self.listener = listener
        self.limits = listener.limits
        self.headQueue = self._queue("head", listener.limits.client_header_timeout)
        self.idleQueue = self._queue("idle", listener.limits.client_idle_timeout)
        self._redirect = RedirectStage(self) if listener.redirect_https else None
        self.goAway()

    def _queue(self, kind: str, period: float) -> DeadlineQueue:
        key = (kind, period)
        queue = self._queues.get(key)
        if queue is None:
            expire = _headExpired if kind == "head" else _idleExpired
            queue = self._queues[key] = DeadlineQueue(period, expire, self.clock.callLater)
        return queue

    # Connections -----------------------------------------------------------

    def buildProtocol(self, addr: Any) -> HTTP1Connection:
        return HTTP1Connection(self)

    def acceptableProtocols(self) -> list[bytes]:
        if self.listener.http2:
            return [b"h2", b"http/1.1"]
        return [b"http/1.1"]

    def buildHTTP2(self, connection: HTTP1Connection) -> Any:
        """The protocol of a connection whose ALPN chose C{h2}."""
        runtime = self.currentRuntime()
        # RFC 8441 3: extended CONNECT is offered when some route takes
        # WebSockets.
        websockets = self._websockets.get(id(runtime))
        if websockets is None:
            config = getattr(runtime, "config", None)
            websockets = config is not None and any(route.websocket for route in config.routes)
            self._websockets = {id(runtime): websockets}
        protocol = HTTP2Connection(self, websockets)
        self.http2.add(protocol)
        return protocol

    def http2Lost(self, protocol: Any) -> None:
        """An HTTP/2 connection is gone."""
        self.http2.discard(protocol)

    def goAway(self) -> None:
        """
        Tell every HTTP/2 client to take no further stream on its connection
        (GOAWAY with the last stream taken, RFC 9113 6.8): after a reload
        their next requests go to new connections, with the new settings.
        """
        for protocol in list(self.http2):
            protocol.goAway()

    def connectionMade(self, connection: HTTP1Connection, transport: Any) -> None:
        self.channels.add(connection)
        noDelay(transport)
        metrics = self.metrics
        if metrics is not None:
            name = self.listener.name
            metrics.connectionAccepted(name)
            traffic = metrics.traffic(name)
            connection._traffic = traffic
            if type(transport) is EdgeTLSTransport or type(transport) is LeanServer:
                transport.traffic = traffic
            else:
                _WriteCounter(transport, traffic)

    def connectionLost(self, connection: HTTP1Connection, reason: Failure) -> None:
        self.channels.discard(connection)
        metrics = self.metrics
        if (
            metrics is not None
            and self.listener.tls
            and not connection._handshakeDone
            and isTLSFailure(reason)
        ):
            # Why, for the metric's reason label (edgeproxy.tls.failures).
            metrics.handshakeFailed(
                self.listener.name, handshakeFailureReason(reason, _handleOf(connection.transport))
            )

    def handshakeCompleted(self, connection: HTTP1Connection) -> None:
        metrics = self.metrics
        if metrics is not None:
            version, alpn = _negotiated(connection.transport)
            metrics.handshakeDone(self.listener.name, version, alpn)

    def connectionInfo(self, transport: Any) -> ConnectionInfo:
        """What every request of the connection on C{transport} shares."""
        peer = transport.getPeer()
        host = getattr(peer, "host", "") or ""
        port = getattr(peer, "port", 0) or 0
        local = transport.getHost()
        shared = self._shared
        localHost, localPort = shared((getattr(local, "host", "") or "", getattr(local, "port", 0) or 0))
        getHandle = getattr(transport, "getHandle", None)
        if getHandle is None or not self.listener.tls:
            return ConnectionInfo(
                host, port, b"http", self.listener, local=localHost, localPort=localPort
            )
        serverName = version = alpn = certificate = None
        try:
            handle = getHandle()
            name = handle.get_servername()
            serverName = shared(name.lower()) if name else None
            versionName = handle.get_protocol_version_name()
            version = shared(versionName[4:] if versionName.startswith("TLSv") else versionName)
            alpn = shared(getattr(transport, "negotiatedProtocol", None))
            if self.clientAuth is not None:
                from edgeproxy.security.listening import certificateFacts

                certificate = certificateFacts(handle)
        except Exception:
            pass
        return ConnectionInfo(
            host, port, b"https", self.listener, serverName, version, alpn, certificate,
            localHost, localPort,
        )

    # Requests --------------------------------------------------------------

    def select(self, runtime: Any, host: bytes, path: bytes, info: ConnectionInfo) -> Any:
        """
        What serves a request for C{host} and C{path}: a route match of the
        runtime's router (L{None} when nothing matches), or on a redirect
        listener the redirect.
        """
        # The ACME HTTP-01 hook: a pending challenge's token is answered
        # before the redirect and before routing (RFC 8555 §8.3).
        if self.acmeChallenges is not None:
            answer = http01Stage(self.acmeChallenges, self.listener.tls, host, path)
            if answer is not None:
                return answer
        if self._redirect is not None:
            return self._redirect
        return runtime.router.match(host, path)

    def prepare(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        fields: Fields,
        host: bytes,
        length: int | None,
        info: ConnectionInfo,
        refused: RequestHeadRefused | None = None,
    ) -> tuple[Request, tuple[Any, ...], float, int, ProxyError | None]:
        """
        Everything a protocol needs to hand a request whose head is complete
        to its stages, the same for HTTP/1.1 and HTTP/2: the target
        normalised (L{edgeproxy.targets}), the route chosen, the request
        value made.

        @param refused: the protocol's reader refused the head already
            (HTTP/2): the request is not routed, and this is its error.
        @return: the L{Request}, the stages that serve it, the idle timeout
            of its body, the most body bytes it may send (0: no limit), and
            the L{ProxyError} to answer with instead when the request is
            refused from its head (400 target, 404 no route, 421 another
            host's TLS name, 413 a declared body over the limit; the stages
            are then empty).
        """
        runtime = self.currentRuntime()
        error: ProxyError | None = None
        route = None
        prefix = b""
        path = query = b""
        stages: tuple[Any, ...] = ()
        idleTimeout = 0.0
        maxBody = self.limits.max_body_size
        if refused is not None:
            error = refused
            target = target[:LINE_LIMIT]
        else:
            try:
                path, query = normaliseTarget(target)
            except BadRequest as badTarget:
                error = badTarget
        if error is None:
            match = self.select(runtime, host, path, info)
            if match is None:
                error = _unrouted(host, path, info)
            elif mayDiffer(path) and _routedElsewhere(self, runtime, host, path, info, match):
                # edgeproxy.security.paths: "//admin" or "/admin;x" would
                # reach /admin's resource through another route.
                error = BadRequest("path routes differently with slashes merged or ';' dropped")
            else:
                route = match.route
                prefix = match.prefix
                pipeline = match.pipeline if route is None else runtime.pipelines[route.name]
                stages = pipeline.stages
                idleTimeout = pipeline.idleTimeout
                if pipeline.quietPaths and path in pipeline.quietPaths:
                    # Never logged with its query, whoever answers it
                    # (an access rule, a rate limit, the auth stage).
                    target = target.partition(b"?")[0]
                if route is not None and route.max_body_size is not None:
                    maxBody = route.max_body_size
                if maxBody and length is not None and length > maxBody:
                    error = ContentTooLarge(f"declared body {length} over limit {maxBody}")
                clientAuth = self.clientAuth
                if clientAuth is not None and clientAuth.misdirected(host, info.serverName):
                    # edgeproxy.security.listening: this connection's
                    # client certificate policy is another name's.
                    error = MisdirectedRequest(f"host {host!r}: other client certificate policy than SNI")
        if error is not None:
            stages = ()
        trusted = runtime.trustedProxies
        ids = self.requestIds = runtime.requestIds
        requestId = b""
        if ids is not None:
            requestId = ids.forRequest(fields, bool(trusted) and isTrusted(info.peer, trusted))
        request = Request(
            method,
            path,
            query,
            version,
            fields,
            host,
            clientAddress(info.peer, fields, trusted) if trusted else info.peer,
            info,
            # None when no route took it (refused, unrouted): every reader
            # of Request.route allows for that; its annotation does not.
            route,
            prefix,
            length,
            target,
            requestId,
        )
        return request, stages, idleTimeout, maxBody, error

    def callStarted(self, call: Call) -> None:
        self.inflight.add(call)

    def callEnded(self, call: Call, reason: Failure | None) -> None:
        """
        A request is over (answered, or cut short by C{reason}): one
        access-log line and the request metrics, once.
        """
        self.inflight.discard(call)
        if call.logged:
            return
        call.logged = True
        if call.endHooks is not None:
            call.ended()
        accessLog = self.accessLog
        if accessLog is not None:
            accessLog.log(call)
        metrics = self.metrics
        if metrics is not None:
            route = call.request.route
            metrics.requestDone(
                "" if route is None else route.name,
                call.upstreamName or "",
                call.status,
                max(0.0, self.clock.seconds() - call.started),
                call.request.method,
            )

    def refused(self, call: Call, error: ProxyError) -> None:
        """
        A request refused from its head (400, 404, 421, 413; HTTP/2's reader's
        400, 431, 501): its outcome is its access-log line; the process log
        gets a summary per interval.
        """
        if isinstance(error, RequestHeadRefused):
            reason = _REJECTED.get(error.status, "malformed request")
        else:
            reason = reasonOf(error)
        refusals(self.clock).note(error.status, reason)

    def rejectHead(self, status: int, connection: Any, received: bytes, call: Call | None = None) -> bytes:
        """
        The whole answer of an HTTP/1.1 C{connection} to a request head its
        parser refused (or whose deadline passed), to write before it
        closes; the request gets its record as any request does (one
        access-log line, the request metrics, an ID the answer carries) and
        a count in the process log's summary.

        @param received: the head's bytes as far as they were read; the
            record holds its request line (L{LINE_LIMIT} bytes of it).
            Nothing (a connection that sent no byte before the header
            deadline) makes no record: it made no request.
        @param call: the request whose body's framing was refused after its
            head was taken: the answer carries its ID, and its own end
            makes its record.
        """
        refusals(self.clock).note(status, _REJECTED.get(status, "malformed request"))
        record = None
        if call is None and received:
            runtime = self.currentRuntime()
            ids = self.requestIds = getattr(runtime, "requestIds", None)
            requestId = b"" if ids is None else ids.generate()
            request = _rejectedRequest(received, self.connectionInfo(connection.transport), requestId)
            call = record = Call(request, None, connection, (), self.clock.seconds())
        idLine = b""
        ids = self.requestIds
        if call is not None and call.request.requestId and ids is not None:
            idLine = ids.line(call.request.requestId)
        # Refused before routing: the global pages.
        response = rejection(status, pagesFor(None, self.currentRuntime), idLine)
        if call is not None:
            call.status = status
            call.sent = len(response) - response.index(b"\r\n\r\n") - 4
        if record is not None:
            self.callEnded(record, None)
        return response

    # Twisted Factory -----------------------------------------------------------

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        # The port closed (drain, or a reload without this listener).
        self.goAway()


def _routedElsewhere(
    factory: ListenerFactory, runtime: Any, host: bytes, path: bytes, info: ConnectionInfo, match: Any
) -> bool:
    other = factory.select(runtime, host, backendView(path), info)
    return other is not None and (other.route is not match.route or other.prefix != match.prefix)


def _unrouted(host: bytes, path: bytes, info: ConnectionInfo) -> ProxyError:
    """404, or 421 when the client's TLS name is another host's (RFC 9110
    15.5.20: its connection's certificate was chosen for another name; it
    may retry on a connection of its own)."""
    name = normaliseHost(host)
    sni = info.serverName
    if sni is not None and normaliseHost(sni) != name:
        return MisdirectedRequest(f"no route for host {name!r} (SNI {sni!r})")
    return NoRoute(f"no route for host {name!r} path {path!r}")


def _rejectedRequest(received: bytes, info: ConnectionInfo, requestId: bytes) -> Request:
    """
    The request a refused HTTP/1.1 head stands for in the access log: the
    request line as far as it was read (bounded: L{LINE_LIMIT}), cut at its
    spaces into method, target and version (what is missing stays empty),
    and nothing else of the head, which was not read as fields.
    """
    start = 2 if received[:2] == b"\r\n" else 0
    end = received.find(b"\r\n", start, start + LINE_LIMIT)
    line = received[start : end if end != -1 else start + LINE_LIMIT]
    parts = line.split(b" ", 2)
    parts += [b""] * (3 - len(parts))
    method, target, version = parts
    route: Any = None  # never routed
    return Request(
        method, b"", b"", version, _NO_FIELDS, b"", info.peer, info, route, b"", 0, target, requestId
    )


def _headExpired(connection: HTTP1Connection) -> None:
    connection.headExpired()


def _idleExpired(connection: HTTP1Connection) -> None:
    connection.idleExpired()


class _WriteCounter:
    """
    Adds every byte written to a transport that does not count them itself
    (not an L{EdgeTLSTransport} nor a L{LeanServer}) to C{traffic.sent}, by
    wrapping its C{write} and C{writeSequence}; the bytes of a sequence are
    counted once, whether the transport writes it with its own C{write} or
    not.
    """

    __slots__ = ("traffic", "inSequence", "_write", "_writeSequence")

    def __init__(self, transport: Any, traffic: Traffic) -> None:
        self.traffic = traffic
        self.inSequence = False
        self._write = transport.write
        self._writeSequence = transport.writeSequence
        transport.write = self.write
        transport.writeSequence = self.writeSequence

    def write(self, data: bytes) -> None:
        if not self.inSequence:
            self.traffic.sent += len(data)
        self._write(data)

    def writeSequence(self, data: Any) -> None:
        data = list(data)
        self.traffic.sent += sum(map(len, data))
        self.inSequence = True
        try:
            self._writeSequence(data)
        finally:
            self.inSequence = False


def noDelay(transport: Any) -> None:
    """
    Send what the connection writes without waiting (C{TCP_NODELAY}), as
    nginx does on its keep-alive connections: with Nagle's algorithm on,
    the last, short TLS record of a large response waits for the client's
    ACK of the bytes before it, which the client delays up to 40 ms (1 MiB
    responses went at a third of the speed, each held that long).  A TLS
    transport passes the call to its TCP connection; a UNIX socket has no
    such option and is left as it is.
    """
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is None:
        return
    try:
        setTcpNoDelay(True)
    except OSError:
        pass


def _negotiated(transport: Any) -> tuple[str, str]:
    """
    The TLS version (C{"1.3"}) and ALPN protocol (C{"h2"}, C{"http/1.1"},
    or C{"none"}) of a completed handshake.
    """
    version = "unknown"
    try:
        name = transport.getHandle().get_protocol_version_name()
        version = name[4:] if name.startswith("TLSv") else name
    except Exception:
        pass
    alpn = getattr(transport, "negotiatedProtocol", None)
    return version, alpn.decode("ascii", "replace") if alpn else "none"


def _handleOf(transport: Any) -> Any:
    """The server's C{SSL.Connection} under C{transport}, if it has one."""
    getHandle = getattr(transport, "getHandle", None)
    try:
        return getHandle() if getHandle is not None else None
    except Exception:
        return None
