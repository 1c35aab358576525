# -*- test-case-name: tests.test_request -*-
"""
L{EdgeSite}: the Twisted C{Site} one listener serves.

It wires the listener's settings into every connection (strict channel with
the listener's limits and idle timeout, ALPN offer), creates the request
objects (L{ProxyRequest}, or the redirecting request on a C{redirect_https}
listener), hands finished requests to the access log, and keeps the live
connections and in-flight requests visible so the service can drain them on
SIGTERM.  It serves no resources: routing happens in L{ProxyRequest}.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.web import server

from edgeproxy.config.model import Listener
from edgeproxy.http.channel import edgeChannelProtocolFactory
from edgeproxy.http.request import ProxyRequest


class EdgeSite(server.Site):
    """
    @ivar listener: the configuration of the listener this site serves.
    @ivar currentRuntime: returns the L{Runtime} new requests use.
    @ivar limits: the listener's limits (read by the channel factory).
    @ivar channels: the connections (protocols built here) still open.
    @ivar inflight: the requests received and not yet finished or lost.
    """

    protocol = edgeChannelProtocolFactory
    displayTracebacks = False

    def __init__(
        self,
        currentRuntime: Callable[[], Any],
        listener: Listener,
        reactor: Any,
        accessLog: Any = None,
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

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is None:
            return None
        self.channels.add(protocol)
        connectionLost = protocol.connectionLost

        def lost(reason: Any) -> None:
            self.channels.discard(protocol)
            connectionLost(reason)

        protocol.connectionLost = lost
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

    def startFactory(self) -> None:
        # HTTPFactory.startFactory keeps a once-a-second timer for its own
        # log timestamps, which the access log does not use.
        pass

    def stopFactory(self) -> None:
        pass
