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
connections (L{EdgeSite._instrument}): connections accepted, bytes read and
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
        connectionLost = protocol.connectionLost
        metrics = self.metrics
        handshake: dict[str, bool] | None = None
        if metrics is not None:
            handshake = self._instrument(protocol, metrics)

        def lost(reason: Any) -> None:
            self.channels.discard(protocol)
            if handshake is not None and not handshake["done"] and _isTLSFailure(reason):
                assert metrics is not None
                metrics.handshakeFailed(self.listener.name)
            connectionLost(reason)

        protocol.connectionLost = lost
        return protocol

    def _instrument(self, protocol: Any, metrics: Metrics) -> dict[str, bool] | None:
        """
        Count the connection, its bytes and (on a TLS listener) its
        handshake, by wrapping methods of this one protocol and of its
        transport (no wrapper object: C{edgeproxy.service} reads the
        protocol's own attributes).

        @return: on a TLS listener, C{{"done": bool}}, whether the handshake
            completed; else L{None}.
        """
        name = self.listener.name
        metrics.connectionAccepted(name)
        traffic = metrics.traffic(name)
        dataReceived = protocol.dataReceived

        def received(data: bytes) -> None:
            traffic.received += len(data)
            dataReceived(data)

        protocol.dataReceived = received
        makeConnection = protocol.makeConnection
        handshake = {"done": False} if self.listener.tls else None

        def made(transport: Any) -> None:
            _countWrites(transport, traffic)
            if handshake is not None:

                def handshakeCompleted() -> None:
                    handshake["done"] = True
                    version, alpn = _negotiated(transport)
                    metrics.handshakeDone(name, version, alpn)

                # TLSMemoryBIOProtocol tells its wrapped protocol when the
                # handshake is done, if the protocol says it listens.
                alsoProvides(protocol, IHandshakeListener)
                protocol.handshakeCompleted = handshakeCompleted
            makeConnection(transport)

        protocol.makeConnection = made
        return handshake

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


def _countWrites(transport: Any, traffic: Traffic) -> None:
    """
    Add every byte written to C{transport} to C{traffic.sent}.

    A transport may implement C{writeSequence} with its own C{write}
    (C{TLSMemoryBIOProtocol} does) or not (TCP): the bytes of a sequence are
    counted once, in C{writeSequence}, and the C{write} calls it makes
    meanwhile are not counted again.
    """
    write = transport.write
    writeSequence = transport.writeSequence
    inSequence = False

    def countedWrite(data: bytes) -> None:
        if not inSequence:
            traffic.sent += len(data)
        write(data)

    def countedWriteSequence(data: Any) -> None:
        nonlocal inSequence
        data = list(data)
        traffic.sent += sum(map(len, data))
        inSequence = True
        try:
            writeSequence(data)
        finally:
            inSequence = False

    transport.write = countedWrite
    transport.writeSequence = countedWriteSequence


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
