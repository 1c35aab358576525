# -*- test-case-name: tests.test_pool -*-
"""
L{RequestQueue}: the requests of one L{edgeproxy.upstream.pool.UpstreamPool}
waiting for a backend below its C{max_conns}.

First come, first served: the head of the queue waits for a place before
any other.  At most C{queue_size} requests wait, each at most
C{queue_timeout} seconds; past either the request fails with a 503 (a
queued retry with the failure it would have had without it,
L{edgeproxy.upstream.exchange.Exchange.failWaiting}).  The pool drains the
queue whenever a place may have come free: a request no longer in flight,
a backend changed, added or removed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Set
from typing import Any, Protocol

from twisted.logger import Logger, LogLevel

from edgeproxy.config.model import Upstream
from edgeproxy.errors import ServiceUnavailable
from edgeproxy.logs import Repeats
from edgeproxy.metrics import Metrics
from edgeproxy.upstream.backend import Backend
from edgeproxy.upstream.exchange import FULL, Exchange, Full

__all__ = ["RequestQueue"]


class _Pool(Protocol):
    """What this module uses of an L{edgeproxy.upstream.pool.UpstreamPool}."""

    upstream: Upstream
    metrics: Metrics
    log: Logger
    repeats: Repeats

    def choose(
        self, key: bytes | None, tried: Set[Backend], untriedOnly: bool = False
    ) -> Backend | Full | None:
        """A backend for the next attempt; L{FULL}: every one is at its C{max_conns}."""


class RequestQueue:
    """
    The requests of one pool waiting for a backend below C{max_conns}.

    @ivar waiting: the queued requests, oldest first.
    """

    def __init__(self, reactor: Any, pool: _Pool) -> None:
        """
        @param reactor: the clock of the queue timeouts.
        @param pool: the pool the requests wait for (its log, metrics and
            choice of backend).
        """
        self._reactor = reactor
        self._pool = pool
        self.waiting: deque[Exchange] = deque()
        self._draining = False
        self._drainAgain = False

    def enqueue(self, exchange: Exchange) -> None:
        """
        Queue C{exchange} until a backend is below C{max_conns} (or fail it
        at once when the queue is full).
        """
        pool = self._pool
        upstream = pool.upstream
        if len(self.waiting) >= upstream.queue_size:
            pool.repeats.emit(
                pool.log,
                LogLevel.warn,
                f"upstream {upstream.name}: queue full, 503",
                "upstream {upstream}: every available backend is at max_conns and "
                "the queue is full ({size}): 503",
                upstream=upstream.name,
                size=upstream.queue_size,
            )
            exchange.failWaiting(ServiceUnavailable(f"upstream {upstream.name}: queue full"))
            return
        self.waiting.append(exchange)
        exchange.queueTimer = self._reactor.callLater(
            upstream.queue_timeout, self._timedOut, exchange
        )

    def dequeue(self, exchange: Exchange) -> None:
        """Take C{exchange} out of the queue (served, timed out or cancelled)."""
        try:
            self.waiting.remove(exchange)
        except ValueError:
            pass
        timer, exchange.queueTimer = exchange.queueTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timedOut(self, exchange: Exchange) -> None:
        exchange.queueTimer = None
        self.dequeue(exchange)
        pool = self._pool
        pool.metrics.queueTimedOut(pool.upstream.name)
        pool.repeats.emit(
            pool.log,
            LogLevel.warn,
            f"upstream {pool.upstream.name}: queue timeout, 503",
            "upstream {upstream}: no backend below max_conns within {timeout}s: 503",
            upstream=pool.upstream.name,
            timeout=pool.upstream.queue_timeout,
        )
        exchange.failWaiting(
            ServiceUnavailable(f"upstream {pool.upstream.name}: queue timeout")
        )

    def drain(self) -> None:
        """
        Give backends with room to the queued requests, first come first
        served; the head of the queue waits for a place before any other.
        """
        if self._draining:
            # Called back from a request sent below (it failed at once):
            # the loop below looks again.
            self._drainAgain = True
            return
        self._draining = True
        try:
            while True:
                self._drainAgain = False
                while self.waiting:
                    exchange = self.waiting[0]
                    choice = self._pool.choose(
                        exchange.hashKey, exchange.tried, exchange.untriedOnly
                    )
                    if choice is FULL:
                        break
                    self.dequeue(exchange)
                    exchange.placed(choice)  # type: ignore[arg-type]
                if not self._drainAgain:
                    break
        finally:
            self._draining = False
