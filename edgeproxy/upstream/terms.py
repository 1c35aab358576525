# -*- test-case-name: tests.test_pool -*-
"""
L{Terms}: how the requests of one route are sent through a pool: the
connect and response timeouts and the retries (the route's own, else the
upstream's), and C{request_timeout}, the bound on what the client waits for
the response head in all (the queue, every attempt, every retry).

A pool has one L{Terms} of its upstream's own values
(L{edgeproxy.upstream.pool.UpstreamPool.terms}), which every route without
timeouts of its own uses; a route that sets some gets one from
L{edgeproxy.upstream.pool.UpstreamPool.termsFor}, one per distinct set of
values.  Each L{Terms} keeps the response deadlines of its attempts on one
timer (L{ResponseDeadlines}: one timeout per timer).

C{request_timeout} when it is not set is L{defaultRequestTimeout}: as long
as one attempt may take (the queue, the connection, the response), so that
it never cuts a first attempt short and a route costs nothing for it; it
bounds the retries.  An exchange arms a timer for its request deadline
only when its next step could outlast it (L{Terms.cutsResponse} for the
first attempt).
"""

from __future__ import annotations

from typing import Any

from edgeproxy.config.model import Upstream
from edgeproxy.config.stagemodel import RouteForwarding
from edgeproxy.upstream.timeouts import ResponseDeadlines

__all__ = ["Terms", "defaultRequestTimeout"]


def defaultRequestTimeout(upstream: Upstream, connectTimeout: float, responseTimeout: float) -> float:
    """
    The C{request_timeout} of a route that sets none: C{queue_timeout +
    connect_timeout + response_timeout} (75 s with the defaults), what one
    attempt may take from the queue to the response head.
    """
    return upstream.queue_timeout + connectTimeout + responseTimeout


class Terms:
    """
    The timeouts and retries requests are sent with (see the module
    docstring).

    @ivar connectTimeout: seconds to connect to a backend.
    @ivar responseTimeout: seconds from the end of the request to the
        response head, per attempt.
    @ivar retries: further attempts allowed after a failure.
    @ivar requestTimeout: seconds from the moment the proxy has the whole
        request (a request without a body: when it is sent; with one: once
        the body was passed on whole) to the response head, across the
        queue and every attempt.
    @ivar dialTimeout: the connect timeout to dial new connections with;
        L{None} when it is the upstream's (the pool's own endpoints).
    @ivar cutsResponse: whether C{requestTimeout} may end a first attempt
        before its C{responseTimeout} does (then the request timer is armed
        at once).
    @ivar deadlines: the response deadlines of the attempts sent on these
        terms.
    """

    __slots__ = (
        "connectTimeout", "responseTimeout", "retries", "requestTimeout", "dialTimeout",
        "cutsResponse", "deadlines",
    )

    def __init__(self, clock: Any, upstream: Upstream, route: RouteForwarding | None = None) -> None:
        """
        @param clock: the reactor (its C{seconds} and C{callLater}).
        @param route: the route's own values; L{None}: the upstream's.
        """
        if route is None:
            route = RouteForwarding()
        connect = upstream.connect_timeout if route.connect_timeout is None else route.connect_timeout
        response = upstream.response_timeout if route.response_timeout is None else route.response_timeout
        self.connectTimeout = connect
        self.responseTimeout = response
        self.retries = upstream.retries if route.retries is None else route.retries
        self.requestTimeout = (
            defaultRequestTimeout(upstream, connect, response)
            if route.request_timeout is None
            else route.request_timeout
        )
        self.dialTimeout = None if connect == upstream.connect_timeout else connect
        self.cutsResponse = self.requestTimeout < response
        self.deadlines = ResponseDeadlines(clock, response, upstream.name)

    def key(self) -> tuple[float, float, int, float]:
        """What makes two terms the same (L{UpstreamPool.termsFor} shares them)."""
        return (self.connectTimeout, self.responseTimeout, self.retries, self.requestTimeout)
