# -*- test-case-name: tests.test_admin -*-
"""
L{AdminSite}: the site of the admin listener, and L{listenAdmin}.

A small plain-HTTP C{twisted.web} site of its own (not an
L{edgeproxy.http.listener.ListenerFactory}: no routing, no access log)
serving L{edgeproxy.admin.resource.AdminResource}.  It is meant for
operators on loopback or a management network, but it is bounded all the
same: few connections, small heads, a header deadline, an idle timeout,
request bodies of a few KiB at most.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.web import http, server

from edgeproxy.admin.resource import AdminResource
from edgeproxy.logs import formatAddress

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall
    from twisted.python.failure import Failure

__all__ = ["AdminSite", "listenAdmin"]

# The admin listener's namespace, as its other lines.
log = Logger(namespace="edgeproxy.admin")

MAX_CONNECTIONS = 32
"""Admin connections open at once; more are closed as they arrive."""
MAX_HEADER_SIZE = 8 * 1024
"""Bytes of request line plus header lines."""
MAX_HEADERS = 50
MAX_BODY_SIZE = 4 * 1024
"""Bytes of request body (the actions take none)."""
HEADER_TIMEOUT = 10.0
"""Seconds a client has to send a complete request head."""
IDLE_TIMEOUT = 30.0
"""Seconds a kept-alive admin connection may sit idle (above the usual
Prometheus scrape interval of 15 s, so a scraper keeps its connection)."""


class _AdminRequest(server.Request):
    """A request whose body may not exceed L{MAX_BODY_SIZE} (chunked ones
    are counted as they arrive)."""

    _bodySize = 0
    channel: _AdminChannel
    """The admin site's channels are all L{_AdminChannel}s (L{None} once
    the connection is lost, which Twisted's type leaves out)."""

    def handleContentChunk(self, data: bytes) -> None:
        self._bodySize += len(data)
        if self._bodySize > MAX_BODY_SIZE:
            channel = self.channel
            if channel is not None and not getattr(channel, "_refused", False):
                channel.refuse(413, b"Content Too Large")
            return
        super().handleContentChunk(data)


class _AdminChannel(http.HTTPChannel):
    """
    Twisted's HTTP/1.1 channel with small limits and a deadline for each
    request head (Twisted's own idle timeout restarts on every byte, so a
    client trickling a head would hold a connection forever).
    """

    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_SIZE
    MAX_LENGTH = MAX_HEADER_SIZE
    _deadline: Any = None
    _refused = False
    callLater: Callable[..., IDelayedCall]
    """The reactor's, which C{HTTPFactory.buildProtocol} puts in place of
    C{TimeoutMixin}'s two-argument method."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        self._deadline = self.callLater(HEADER_TIMEOUT, self.refuse, 408, b"Request Timeout")

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def lineReceived(self, line: bytes) -> None:
        if self._deadline is None:
            # The first line of the next request on a kept-alive connection.
            self._arm()
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would close without a word.
        self.refuse(431, b"Request Header Fields Too Large")

    def allHeadersReceived(self) -> None:
        self._disarm()
        if self.length is not None and self.length > MAX_BODY_SIZE:
            self.refuse(413, b"Content Too Large")
            return
        super().allHeadersReceived()

    def refuse(self, status: int, phrase: bytes) -> None:
        """Answer with C{status} outside any request, and close."""
        self._disarm()
        if self._refused:
            return
        self._refused = True
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (status, phrase)
        )
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)


class AdminSite(server.Site):
    """
    The site of the admin listener.

    @ivar channels: the connections open now (at most L{MAX_CONNECTIONS}).
    """

    # A plain channel rather than the _GenericHTTPChannelProtocol wrapper
    # HTTPFactory is typed for: Site.buildProtocol takes either.
    protocol = _AdminChannel  # type: ignore[assignment]
    requestFactory = _AdminRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, service: Any, reactor: Any) -> None:
        super().__init__(AdminResource(service, reactor), timeout=IDLE_TIMEOUT, reactor=reactor)
        self.requestFactory = _AdminRequest
        self.channels: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.channels) >= MAX_CONNECTIONS:
            log.warn(
                "admin: connection from {peer} refused: {count} admin connections open",
                peer=formatAddress(addr), count=len(self.channels),
            )
            return None
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        connectionLost = channel.connectionLost

        def lost(reason: Any) -> None:
            self.channels.discard(channel)
            connectionLost(reason)

        channel.connectionLost = lost
        return channel

    def log(self, request: Any) -> None:
        # Scrapes every few seconds are not worth a line each; actions and
        # refusals are logged by AdminResource.
        pass

    def startFactory(self) -> None:
        # No once-a-second timestamp timer: log() writes nothing.
        pass

    def stopFactory(self) -> None:
        pass


def listenAdmin(service: Any, reactor: Any, description: str) -> Deferred[IListeningPort]:
    """
    Listen with a new L{AdminSite} for C{service} on the server endpoint
    C{description} (C{[edgeproxy] admin}).

    @return: fires with the port, or fails with why it cannot listen.
    """
    site = AdminSite(service, reactor)
    return maybeDeferred(lambda: serverFromString(reactor, description).listen(site))
