# -*- test-case-name: tests.test_sites -*-
"""
What the service knows of the HTTP server it runs: the one module to change
when the server protocol is replaced.

Two seams, and nothing else of the server is touched by L{edgeproxy.serve}:

  - I{the factory of a listener}
    (L{edgeproxy.http.listener.ListenerFactory}): L{makeSite} builds it,
    L{reconfigureSite} gives an open listener's factory the settings of a
    reload, L{useAccessLog} switches its access log, L{connectionsOf} lists
    its open connections and L{inFlightOf} counts its requests in flight;
  - I{one connection of a listener} (an
    L{edgeproxy.http.server.HTTP1Connection}, which passes the questions on
    to the HTTP/2 protocol it switched to, if any): what the drain on
    C{SIGTERM} (L{edgeproxy.serve.drain}) does with it: L{channelBusy},
    L{closeAfterResponse}, L{closeIdle}, L{transportOf}.

Only public methods of our own protocol are used: no private Twisted API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


# The factory of a listener -----------------------------------------------------


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
    from edgeproxy.http.listener import ListenerFactory

    return ListenerFactory(currentRuntime, listener, reactor, accessLog=accessLog, metrics=metrics)


def reconfigureSite(site: Any, listener: Listener) -> None:
    """
    Give an open listener's factory the settings a reload brought (limits,
    timeouts, C{redirect_https}): for its new connections only; open ones
    keep what they were built with.
    """
    site.reconfigure(listener)


def useAccessLog(site: Any, accessLog: Any) -> None:
    """Make C{site} log its next requests to C{accessLog} (a reload)."""
    site.accessLog = accessLog


def connectionsOf(site: Any) -> list[Any]:
    """C{site}'s open connections (a copy: the drain closes some)."""
    return list(getattr(site, "channels", ()))


def inFlightOf(site: Any) -> int:
    """How many requests C{site} received and has not finished."""
    return len(getattr(site, "inflight", ()))


# One connection of a listener ------------------------------------------------


def channelBusy(channel: Any) -> bool:
    """Whether a connection has a request (or an HTTP/2 stream) in flight."""
    return bool(channel.busy())


def closeAfterResponse(channel: Any) -> None:
    """
    Make a connection close once its current response is complete, saying
    so in that response when its head is not sent yet (RFC 9112 9.6); an
    HTTP/2 connection sends GOAWAY and closes once its streams are done.
    """
    channel.closeAfterResponse()


def closeIdle(channel: Any) -> None:
    """
    Close a connection that has no request in flight, cleanly (an HTTP/2
    connection with a GOAWAY first, RFC 9113 6.8).
    """
    channel.closeIdle()


def transportOf(channel: Any) -> Any:
    """
    The transport of a connection (to see whether it is closing already,
    and to abort it at the drain's deadline), or L{None}.
    """
    return getattr(channel, "transport", None)
