# -*- test-case-name: tests.test_request -*-
"""
L{EdgeSite}: the Twisted C{Site} one listener serves.

It wires the listener's settings into every connection (strict channel with
the listener's limits and idle timeout, ALPN offer), creates the request
objects (L{ProxyRequest}, or the redirecting request on a C{redirect_https}
listener), hands finished requests to the access log, and keeps the live
connections and in-flight requests visible so the service can drain them on
SIGTERM.  It serves no resources: routing happens in L{ProxyRequest}.

With a L{Metrics}, it also counts what happens on its listener's
connections (L{_ConnectionMeter}): connections accepted, bytes read and
written (HTTP bytes: after TLS decryption, before encryption), TLS
handshakes completed (with the version and the ALPN protocol) and failed,
and one request (route, upstream, status class, duration) per access-log
event.
"""

from __future__ import annotations

from typing import Any, Callable

from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener
from twisted.web import server
from zope.interface import alsoProvides

from edgeproxy.accesslog import routeAndUpstream
from edgeproxy.config.model import Listener
from edgeproxy.http.channel import edgeChannelProtocolFactory
from edgeproxy.http.request import ProxyRequest
from edgeproxy.metrics import Metrics, Traffic


class EdgeSite(server.Site):
    """
    @ivar listener: the configuration of the listener this site serves.
    @ivar currentRuntime: returns the L{Runtime} new requests use.
    @ivar limits: the listener's limits (read by the channel factory).
    @ivar channels: the connections (protocols built here) still open.
    @ivar inflight: the requests received and not yet finished or lost.
    @ivar metrics: where connections, bytes, handshakes and requests are
        counted, or L{None}.
    """

    protocol = edgeChannelProtocolFactory
    displayTracebacks = False

    def __init__(
        self,
        currentRuntime: Callable[[], Any],
        listener: Listener,
        reactor: Any,
        accessLog: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        if listener.redirect_https:
            from edgeproxy.http.redirect import RedirectRequest

            requestFactory: Any = RedirectRequest
        else:
            requestFactory = ProxyRequest
        super().__init__(
            None,
            requestFactory,
            timeout=listener.limits.client_idle_timeout or None,
            reactor=reactor,
            parsePOSTFormSubmission=False,
        )
        self.currentRuntime = currentRuntime
        self.listener = listener
        self.limits = listener.limits
        self.accessLog = accessLog
        self.channels: set[Any] = set()
        self.inflight: set[Any] = set()
        self.metrics = metrics

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is None:
            return None
        self.channels.add(protocol)
        metrics = self.metrics
        if metrics is None:
            meter = _ConnectionMeter(self, protocol, None, None)
        else:
            name = self.listener.name
            metrics.connectionAccepted(name)
            meter = _ConnectionMeter(self, protocol, metrics, metrics.traffic(name))
            # Count the connection, its bytes and (on a TLS listener) its
            # handshake by wrapping methods of this one protocol and of its
            # transport (no wrapper object: edgeproxy.service reads the
            # protocol's own attributes).
            protocol.dataReceived = meter.dataReceived
            protocol.makeConnection = meter.makeConnection
        protocol.connectionLost = meter.connectionLost
        return protocol

    def acceptableProtocols(self) -> list[bytes]:
        if not self.listener.http2:
            return [b"http/1.1"]
        return list(super().acceptableProtocols())

    def log(self, request: Any) -> None:
        """
        One access-log event per request: called by Twisted when a response
        finishes, and by L{ProxyRequest} for requests that end otherwise
        (answered then closed, aborted, client gone).
        """
        # The access log owns formatting; Twisted's own combined log file
        # is never opened.
        if getattr(request, "accessLogged", False):
            return
        request.accessLogged = True
        if self.accessLog is not None:
            self.accessLog.log(request)
        metrics = self.metrics
        if metrics is not None:
            route, upstream = routeAndUpstream(request)
            started = getattr(request, "edgeStarted", None)
            seconds = 0.0 if started is None else max(0.0, self.reactor.seconds() - started)
            metrics.requestDone(route or "", upstream or "", int(request.code), seconds)

    def startFactory(self) -> None:
        # HTTPFactory.startFactory keeps a once-a-second timer for its own
        # log timestamps, which the access log does not use.
        pass

    def stopFactory(self) -> None:
        pass


class _ConnectionMeter:
    """
    What L{EdgeSite} keeps per connection: the methods it puts on the
    protocol and its transport to forget the connection when it is lost and,
    with a L{Metrics}, to count its bytes and its TLS handshake.

    One object with slots and bound methods rather than a closure per
    wrapped method: it is alive for as long as the connection, idle or not,
    and closures with their cells cost about three times as much (R4,
    docs/performance.rst Run 6).
    """

    __slots__ = (
        "site",
        "protocol",
        "metrics",
        "traffic",
        "handshakeDone",
        "inSequence",
        "transport",
        "_dataReceived",
        "_makeConnection",
        "_connectionLost",
        "_write",
        "_writeSequence",
    )

    def __init__(
        self, site: EdgeSite, protocol: Any, metrics: Metrics | None, traffic: Traffic | None
    ) -> None:
        self.site = site
        self.protocol = protocol
        self.metrics = metrics
        self.traffic = traffic
        self.handshakeDone = False
        self.inSequence = False
        self._connectionLost = protocol.connectionLost
        if metrics is not None:
            self._dataReceived = protocol.dataReceived
            self._makeConnection = protocol.makeConnection

    def dataReceived(self, data: bytes) -> None:
        self.traffic.received += len(data)  # type: ignore[union-attr]
        self._dataReceived(data)

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._countWrites(transport)
        if self.site.listener.tls:
            # TLSMemoryBIOProtocol tells its wrapped protocol when the
            # handshake is done, if the protocol says it listens.
            alsoProvides(self.protocol, IHandshakeListener)
            self.protocol.handshakeCompleted = self.handshakeCompleted
        self._makeConnection(transport)

    def handshakeCompleted(self) -> None:
        self.handshakeDone = True
        version, alpn = _negotiated(self.transport)
        self.metrics.handshakeDone(self.site.listener.name, version, alpn)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any) -> None:
        site = self.site
        site.channels.discard(self.protocol)
        if (
            self.metrics is not None
            and site.listener.tls
            and not self.handshakeDone
            and _isTLSFailure(reason)
        ):
            self.metrics.handshakeFailed(site.listener.name)
        self._connectionLost(reason)

    # --- bytes written ---------------------------------------------------

    def _countWrites(self, transport: Any) -> None:
        """
        Add every byte written to C{transport} to C{traffic.sent}.

        A transport may implement C{writeSequence} with its own C{write}
        (C{TLSMemoryBIOProtocol} does) or not (TCP): the bytes of a sequence
        are counted once, in C{writeSequence}, and the C{write} calls it
        makes meanwhile are not counted again.
        """
        self._write = transport.write
        self._writeSequence = transport.writeSequence
        transport.write = self.write
        transport.writeSequence = self.writeSequence

    def write(self, data: bytes) -> None:
        if not self.inSequence:
            self.traffic.sent += len(data)  # type: ignore[union-attr]
        self._write(data)

    def writeSequence(self, data: Any) -> None:
        data = list(data)
        self.traffic.sent += sum(map(len, data))  # type: ignore[union-attr]
        self.inSequence = True
        try:
            self._writeSequence(data)
        finally:
            self.inSequence = False


def _negotiated(transport: Any) -> tuple[str, str]:
    """
    The TLS version (C{"1.3"}) and ALPN protocol (C{"h2"}, C{"http/1.1"},
    or C{"none"}) of a completed handshake on a C{TLSMemoryBIOProtocol}.
    """
    version = "unknown"
    try:
        name = transport.getHandle().get_protocol_version_name()
        version = name[4:] if name.startswith("TLSv") else name
    except Exception:
        pass
    alpn = getattr(transport, "negotiatedProtocol", None)
    return version, alpn.decode("ascii", "replace") if alpn else "none"


def _isTLSFailure(reason: Any) -> bool:
    """
    Whether a connection lost before its handshake completed was lost to a
    TLS error (an alert, garbage, no common version or cipher), not merely
    closed by the client.
    """
    check = getattr(reason, "check", None)
    return check is not None and check(SSL.Error) is not None
