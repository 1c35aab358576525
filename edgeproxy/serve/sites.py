# -*- test-case-name: tests.test_sites -*-
"""
What the service knows of the HTTP server it runs: the one module to change
when the server protocol (the site class, its channels) is replaced.

Two seams, and nothing else of the server is touched by L{edgeproxy.serve}:

  - I{the site of a listener}: L{makeSite} builds it, L{reconfigureSite}
    gives an open listener's site the settings of a reload,
    L{useAccessLog} switches its access log, L{connectionsOf} lists its
    open connections (C{site.channels}) and L{inFlightOf} counts its
    requests in flight (C{site.inflight});
  - I{one connection of a site} (an object of C{site.channels}), what the
    drain on C{SIGTERM} (L{edgeproxy.serve.drain}) does with it:
    L{channelBusy}, L{closeAfterResponse}, L{closeIdle}, L{transportOf}.

The connection helpers read Twisted attributes that are not documented API,
and this is the one place that does: C{_GenericHTTPChannelProtocol._channel}
(the HTTP/1.1 or HTTP/2 protocol behind what C{Site.buildProtocol} returns),
C{HTTPChannel.requests} (requests received and not yet answered),
C{HTTPChannel.persistent} and C{H2Connection.streams} (open streams) and
C{.conn} (its h2 state machine).  C{tests/test_sites.py} checks them
against real Twisted objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web.http import HTTPChannel

from edgeproxy.config.model import Listener
from edgeproxy.metrics import Metrics

__all__ = [
    "channelBusy",
    "closeAfterResponse",
    "closeIdle",
    "connectionsOf",
    "inFlightOf",
    "makeSite",
    "reconfigureSite",
    "transportOf",
    "useAccessLog",
]


# The site of a listener ------------------------------------------------------


def makeSite(
    currentRuntime: Callable[[], Any],
    listener: Listener,
    reactor: Any,
    accessLog: Any,
    metrics: Metrics,
) -> Any:
    """
    The server factory C{listener}'s port serves (a TLS listener wraps it in
    its TLS factory: L{edgeproxy.serve.listeners.tlsServerFactory}).

    @param currentRuntime: returns the runtime a new request is routed
        with (read once per request: a reload rebinds it).
    """
    from edgeproxy.http.site import EdgeSite

    return EdgeSite(currentRuntime, listener, reactor, accessLog=accessLog, metrics=metrics)


def reconfigureSite(site: Any, listener: Listener) -> None:
    """
    Give an open listener's C{site} the settings a reload brought (limits,
    idle timeout, C{redirect_https}): for its new connections only; open
    ones keep what they were built with.
    """
    # New connections read these from the site (Site.buildProtocol,
    # edgeChannelProtocolFactory, the request's site.listener).
    from edgeproxy.http.redirect import RedirectRequest
    from edgeproxy.http.request import ProxyRequest

    site.listener = listener
    site.limits = listener.limits
    site.timeOut = listener.limits.client_idle_timeout or None
    site.requestFactory = RedirectRequest if listener.redirect_https else ProxyRequest


def useAccessLog(site: Any, accessLog: Any) -> None:
    """Make C{site} log its next requests to C{accessLog} (a reload)."""
    site.accessLog = accessLog


def connectionsOf(site: Any) -> list[Any]:
    """C{site}'s open connections (a copy: the drain closes some)."""
    return list(getattr(site, "channels", ()))


def inFlightOf(site: Any) -> int:
    """How many requests C{site} received and has not finished."""
    return len(getattr(site, "inflight", ()))


# One connection of a site ----------------------------------------------------


def channelBusy(channel: object) -> bool:
    """Whether a connection of a site has a request in flight."""
    inner = getattr(channel, "_channel", channel)
    requests = getattr(inner, "requests", None)
    if requests is not None:
        return bool(requests)
    streams = getattr(inner, "streams", None)
    if streams is not None:
        return bool(streams)
    return False


def closeAfterResponse(channel: object) -> None:
    """
    Make an HTTP/1.1 connection close once its current response is complete,
    and say so in that response when its head is not sent yet (RFC 9112
    §9.6).  An HTTP/2 connection is left alone: it is closed by the drain
    loop as soon as it has no open stream.
    """
    inner = getattr(channel, "_channel", channel)
    requests = getattr(inner, "requests", None)
    if requests is None or not hasattr(inner, "persistent"):
        return
    inner.persistent = False
    for request in requests:
        if not request.startedWriting:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])


def closeIdle(channel: object) -> None:
    """
    Close a connection that has no request in flight, cleanly.

    An HTTP/1.1 channel is closed through its own C{loseConnection}, which
    unregisters the channel as its transport's producer first: a TLS
    transport does not send its close_notify (and so never closes) while a
    producer is registered.  An HTTP/2 connection first gets a GOAWAY
    (RFC 9113 §6.8), as Twisted's own idle timeout does, and is
    unregistered from its transport the same way.
    """
    inner: Any = getattr(channel, "_channel", channel)
    if isinstance(inner, HTTPChannel):
        inner.loseConnection()
        return
    transport = getattr(inner, "transport", None)
    if transport is None:
        return
    conn = getattr(inner, "conn", None)
    if conn is not None:
        try:
            conn.close_connection()
            transport.write(conn.data_to_send())
        except Exception:
            # Already closing or closed at the HTTP/2 level: just close.
            pass
    # The ALPN switcher registers the H2Connection as its transport's
    # producer; TLS would wait for it to go away before closing.
    try:
        transport.unregisterProducer()
    except RuntimeError:
        # A test transport with nothing registered; real ones ignore it.
        pass
    transport.loseConnection()


def transportOf(channel: Any) -> Any:
    """
    The transport of a connection of a site (to see whether it is closing
    already, and to abort it at the drain's deadline), or L{None}.
    """
    # _GenericHTTPChannelProtocol proxies IProtocol only: the transport is
    # its inner channel's.
    inner = getattr(channel, "_channel", channel)
    return getattr(inner, "transport", None)
