# -*- test-case-name: tests.test_service -*-
"""
The drain on C{SIGTERM}, once no port listens any more: the open
connections are given C{shutdown_timeout} to finish what they are doing
(L{drainConnections}), then the upstream pools a bounded moment to close
(L{closePools}).

What a connection is (busy or idle, how it is closed) is asked of
L{edgeproxy.serve.sites}; the order of the whole stop (notifications,
ports, connections, pools, admin listener) is the service's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from edgeproxy.runtime import stopPool
from edgeproxy.serve.sites import channelBusy, closeAfterResponse, closeIdle, transportOf
from edgeproxy.upstream.pool import UpstreamPool

__all__ = ["DRAIN_POLL_INTERVAL", "POOL_CLOSE_TIMEOUT", "closePools", "drainConnections"]

# The lines of the single-process service: see edgeproxy.serve.service.
log = Logger(namespace="edgeproxy.service")

DRAIN_POLL_INTERVAL = 0.1
"""Seconds between checks for finished requests while draining."""

POOL_CLOSE_TIMEOUT = 2.0
"""Seconds the upstream pools get to close their connections at stop."""


async def drainConnections(
    clock: Any,
    connections: Callable[[], list[Any]],
    timeout: float,
    forced: Callable[[], bool],
) -> None:
    """
    Close every connection as soon as it has nothing in flight.

    A busy HTTP/1.1 connection is told to close after its current response
    (and its response says so when its head is not sent yet); an idle one
    is closed at once, an HTTP/2 one after a GOAWAY.  Connections still busy
    after C{timeout} seconds, or once C{forced()} says so (a second signal),
    are aborted, and the log says how many.

    @param clock: provides C{IReactorTime}.
    @param connections: returns the connections still open (it is asked
        again at each round: connections close meanwhile).
    """
    deadline = clock.seconds() + timeout
    for channel in connections():
        if channelBusy(channel):
            closeAfterResponse(channel)
    while True:
        remaining = []
        for channel in connections():
            if channelBusy(channel):
                remaining.append(channel)
            else:
                transport = transportOf(channel)
                if transport is not None and not getattr(transport, "disconnecting", False):
                    closeIdle(channel)
        if not remaining:
            return
        if forced() or clock.seconds() >= deadline:
            if forced():
                log.warn(
                    "Stop forced by a second signal: aborting {count} connection(s)"
                    " with requests in flight",
                    count=len(remaining),
                )
            else:
                log.warn(
                    "Shutdown timeout ({timeout}s) reached: aborting {count} connection(s)"
                    " with requests in flight",
                    timeout=timeout,
                    count=len(remaining),
                )
            for channel in remaining:
                transport = transportOf(channel)
                if transport is not None:
                    transport.abortConnection()
            return
        await deferLater(clock, min(DRAIN_POLL_INTERVAL, max(0.0, deadline - clock.seconds())))


async def closePools(clock: Any, pools: Iterable[UpstreamPool]) -> None:
    """
    Stop the pools' health checks and re-resolution, and close their
    connections, waiting at most L{POOL_CLOSE_TIMEOUT} seconds.
    """
    pools = list(pools)
    for pool in pools:
        stopPool(pool)
    closed = DeferredList([maybeDeferred(pool.close) for pool in pools], consumeErrors=True)
    # A backend that never acknowledges the close must not hold the
    # process: the pools get a bounded moment, then the process exits
    # and the kernel closes what is left.
    closed.addTimeout(POOL_CLOSE_TIMEOUT, clock)
    try:
        await closed
    except Exception:
        log.warn("Closing the upstream pools took over {seconds}s; exiting anyway",
                 seconds=POOL_CLOSE_TIMEOUT)
