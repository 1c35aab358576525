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
connections (L{_Metered}): connections accepted, bytes read and
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
from zope.interface import classImplements

from edgeproxy.accesslog import routeAndUpstream
from edgeproxy.config.model import Listener
from edgeproxy.http.channel import edgeChannelProtocolFactory
from edgeproxy.http.request import ProxyRequest
from edgeproxy.metrics import Metrics, Traffic
from edgeproxy.tls.transport import EdgeTLSTransport


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
        # One bound method for every connection's timers: Twisted's
        # HTTPFactory.buildProtocol gives each connection its own (R4).
        self._callLater = self.reactor.callLater
        # The channels' idle timeouts and header deadlines, one queue (and
        # one DelayedCall) per timeout for all of them instead of two
        # DelayedCalls per connection (R4); kept by
        # edgeproxy.http.channel._deadlineQueue.
        self._edgeDeadlineQueues: dict[Any, Any] = {}

    def buildProtocol(self, addr: Any) -> Any:
        built = super().buildProtocol(addr)
        if built is None:
            return None
        # Count the connection, its bytes and (on a TLS listener) its
        # handshake, and forget it when it is lost, in methods of the
        # protocol's class: no wrapper object (edgeproxy.serve.sites reads the
        # protocol's own attributes) and nothing allocated per connection
        # but two attributes (R4).
        protocol = _rebuiltAs(_meteredClass(type(built)), built)
        protocol.callLater = self._callLater
        self.channels.add(protocol)
        protocol._edgeSite = self
        metrics = self.metrics
        if metrics is not None:
            name = self.listener.name
            metrics.connectionAccepted(name)
            protocol._edgeTraffic = metrics.traffic(name)
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


class _Metered:
    """
    Mixed into the class of every protocol L{EdgeSite} builds (see
    L{_meteredClass}): forgets the connection when it is lost and, with a
    L{Metrics}, counts its bytes and its TLS handshake.

    Methods of a class rather than wrappers put on each protocol: the
    protocol is Twisted's ALPN switch (C{_GenericHTTPChannelProtocol}),
    whose C{connectionLost} and C{makeConnection} are proxies to the channel
    inside it, so wrappers set on it landed on the HTTP/1.1 channel and were
    lost with it when a connection switched to HTTP/2 (the connection then
    stayed in C{site.channels} for good).  And per connection they cost a
    slotted object and eleven bound methods, about 0.8 KiB for as long as
    the connection lives (R4); now two attributes.  On a TLS connection the
    transport (an L{EdgeTLSTransport}) counts the bytes written itself; on
    another transport its C{write} and C{writeSequence} are wrapped by a
    L{_WriteCounter}.
    """

    _edgeSite: Any = None
    _edgeTraffic: Traffic | None = None
    _edgeHandshakeDone = False

    def dataReceived(self, data: bytes) -> None:
        traffic = self._edgeTraffic
        if traffic is not None:
            traffic.received += len(data)
        super().dataReceived(data)  # type: ignore[misc]

    def makeConnection(self, transport: Any) -> None:
        traffic = self._edgeTraffic
        if traffic is not None:
            if type(transport) is EdgeTLSTransport:
                transport.traffic = traffic
            else:
                _WriteCounter(transport, traffic)
        super().makeConnection(transport)  # type: ignore[misc]

    def handshakeCompleted(self) -> None:
        """
        Called by Twisted's TLS layer when the handshake is done (the
        protocol provides L{IHandshakeListener}).
        """
        self._edgeHandshakeDone = True
        site = self._edgeSite
        metrics = site.metrics
        if metrics is not None:
            # The ALPN switch keeps the transport on the channel inside it
            # (Twisted's private _channel); the handshake ends before any
            # switch to HTTP/2, so that is the HTTP/1.1 channel's, the TLS
            # transport.
            channel = getattr(self, "_channel", self)
            version, alpn = _negotiated(channel.transport)
            metrics.handshakeDone(site.listener.name, version, alpn)
        handshakeCompleted = getattr(super(), "handshakeCompleted", None)
        if handshakeCompleted is not None:
            handshakeCompleted()

    def connectionLost(self, reason: Any) -> None:
        site = self._edgeSite
        site.channels.discard(self)
        metrics = site.metrics
        if (
            metrics is not None
            and site.listener.tls
            and not self._edgeHandshakeDone
            and _isTLSFailure(reason)
        ):
            metrics.handshakeFailed(site.listener.name)
        super().connectionLost(reason)  # type: ignore[misc]


_meteredClasses: dict[type, type] = {}


def _meteredClass(base: type) -> type:
    """
    C{base} with L{_Metered} mixed in, made once per protocol class.
    C{IHandshakeListener} is declared on the class, not on each protocol.
    """
    cls = _meteredClasses.get(base)
    if cls is None:
        cls = type("Metered" + base.__name__, (_Metered, base), {})
        classImplements(cls, IHandshakeListener)
        _meteredClasses[base] = cls
    return cls


def _rebuiltAs(cls: type, protocol: Any) -> Any:
    """
    A C{cls} instance with C{protocol}'s attributes, C{protocol} left to
    the garbage collector.

    Rather than C{protocol.__class__ = cls}: CPython 3.11 then gives the
    object a dictionary of its own (64 bytes more for as long as the
    connection lives, R4), where a new instance keeps its attributes in the
    table its class shares.
    """
    rebuilt = cls.__new__(cls)
    for name, value in vars(protocol).items():
        object.__setattr__(rebuilt, name, value)
    return rebuilt


class _WriteCounter:
    """
    Adds every byte written to a transport other than an L{EdgeTLSTransport}
    (plain TCP) to C{traffic.sent}, by wrapping its C{write} and
    C{writeSequence}.

    A transport may implement C{writeSequence} with its own C{write} or not
    (TCP): the bytes of a sequence are counted once, in C{writeSequence},
    and the C{write} calls it makes meanwhile are not counted again.
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
