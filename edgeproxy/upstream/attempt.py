# -*- test-case-name: tests.test_pool -*-
"""
L{BackendAttempt}: one attempt of an L{edgeproxy.upstream.exchange.Exchange}
on one backend.

The attempt is what the pool's client reports to (an
L{edgeproxy.upstream.response.UpstreamReceiver}, by plain calls): it counts
as in flight for the balancer from its dispatch until its response body is
over, is watched by its terms' response deadlines from the moment the
request (or its body) is sent to the response head, and reports a response
to the per-backend metrics and to passive health before handing it to the
exchange's receiver (or closing it, when the exchange is over).  A failure
goes back to the exchange, which decides on a retry.

What it uses of its exchange is L{_Exchange}, so this module never imports
the exchange.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from edgeproxy.config.model import Upstream
from edgeproxy.h1 import Fields
from edgeproxy.logs import Repeats
from edgeproxy.metrics import Metrics
from edgeproxy.upstream.backend import Backend
from edgeproxy.upstream.failures import classifyFailure
from edgeproxy.upstream.response import UpstreamReceiver, UpstreamResponse

if TYPE_CHECKING:
    from edgeproxy.upstream.client import Handle
    from edgeproxy.upstream.health import PassiveHealth
    from edgeproxy.upstream.terms import Terms

__all__ = ["BackendAttempt"]


class _Pool(Protocol):
    """What an attempt uses of its exchange's pool."""

    upstream: Upstream
    metrics: Metrics
    passive: PassiveHealth
    log: Logger
    repeats: Repeats
    seconds: Callable[[], float]

    def release(self, backend: Backend) -> None:
        """A request to C{backend} is no longer in flight."""


class _Exchange(Protocol):
    """What an attempt uses of its L{edgeproxy.upstream.exchange.Exchange}."""

    receiver: UpstreamReceiver | None
    over: bool
    started: float | None
    attempt: BackendAttempt | None

    @property
    def pool(self) -> _Pool: ...

    @property
    def terms(self) -> Terms: ...

    @property
    def method(self) -> bytes: ...

    @property
    def body(self) -> object: ...

    @property
    def retriesDone(self) -> int: ...

    @property
    def timer(self) -> Any: ...

    def boundBy(self, needed: float) -> None:
        """Arm the request timer if C{needed} seconds could outlast the request."""

    def stopTimer(self) -> None: ...

    def attemptFailed(self, backend: Backend, failure: Failure, timedOut: bool) -> None:
        """Retry, or fail the request."""

    def fail(self, error: Exception, code: int | None) -> None: ...

    def triedText(self) -> str:
        """The backends tried, for the log."""


class BackendAttempt:
    """
    One attempt of an exchange on one backend: it receives the outcome
    from the client directly (no Deferred in between), counts as in flight
    for the balancer until its response body is over, and is watched by
    the pool's response deadlines from the moment the request is sent (or
    its body is) to the response head.

    @ivar handle: what cancels the request (L{UpstreamClient.send}).
    @ivar deadline: when the response head is due; L{None} while not
        watched.
    """

    __slots__ = (
        "exchange", "backend", "started", "handle", "deadline", "timedOut",
        "answered", "counted",
    )

    def __init__(self, exchange: _Exchange, backend: Backend, now: float) -> None:
        self.exchange = exchange
        self.backend = backend
        self.started = now
        self.handle: Handle | None = None
        self.deadline: float | None = None
        self.timedOut = False
        self.answered = False
        # Counted by the pool's dispatch, which follows at once.
        self.counted = True
        # Per-backend metrics (edgeproxy_backend_*): one request per attempt.
        pool = exchange.pool
        pool.metrics.backendRequest(pool.upstream.name, backend.address)

    def release(self) -> None:
        """
        End the in-flight count (once; every path may call it).  The freed
        place goes to the queue.
        """
        if self.counted:
            self.counted = False
            self.exchange.pool.release(self.backend)

    def startTimer(self, _: object = None) -> None:
        if not self.answered and self.deadline is None:
            exchange = self.exchange
            terms = exchange.terms
            terms.deadlines.watch(self)
            if exchange.started is None:
                # The body was passed on whole: the request is complete,
                # and its request_timeout counts from now.
                exchange.started = exchange.pool.seconds()
                if terms.cutsResponse:
                    exchange.boundBy(terms.responseTimeout)

    def timeOut(self) -> None:
        """The response head is overdue: give up on it (a 504)."""
        self.timedOut = True
        if self.handle is not None:
            self.handle.abandon(self)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.abandon(self)

    def _over(self) -> None:
        self.answered = True
        exchange = self.exchange
        if self.deadline is not None:
            exchange.terms.deadlines.unwatch(self)
        if exchange.attempt is self:
            exchange.attempt = None

    def upstreamInterim(self, status: int, reason: bytes, fields: Fields) -> None:
        exchange = self.exchange
        if exchange.attempt is self and exchange.receiver is not None:
            exchange.receiver.upstreamInterim(status, reason, fields)

    def upstreamResponded(self, response: UpstreamResponse) -> None:
        self._over()
        exchange = self.exchange
        pool = exchange.pool
        upstream = pool.upstream
        backend = self.backend
        # The backend stays in flight until the body is delivered (or
        # fails): the response calls this once, without a reference cycle.
        response.whenDelivered = self.release
        # Per-backend metrics: the response, its time, and the body bytes
        # both ways (the response counts what it delivers into traffic).
        metrics = pool.metrics
        traffic = metrics.backendTraffic(upstream.name, backend.address)
        metrics.backendResponded(
            upstream.name, backend.address, response.status, pool.seconds() - self.started
        )
        traffic.sent += _bodyBytes(exchange.body)
        response.traffic = traffic
        pool.passive.responded(backend, response.status)
        if exchange.over:
            # Cancelled (or past its request_timeout) meanwhile: nobody
            # reads it.
            response.deliverBody(_DISCARDING)
            return
        if exchange.retriesDone:
            pool.repeats.emit(
                pool.log,
                LogLevel.info,
                f"upstream {upstream.name}: answered by {backend.address} after retries",
                "upstream {upstream}: {method} answered by {backend} after "
                "{retries} retries (tried {tried})",
                upstream=upstream.name,
                method=exchange.method.decode("ascii", "replace"),
                backend=backend.address,
                retries=exchange.retriesDone,
                tried=exchange.triedText(),
            )
        exchange.over = True
        if exchange.timer is not None:
            exchange.stopTimer()
        receiver, exchange.receiver = exchange.receiver, None
        # The exchange was not over (above), so it still had its receiver:
        # it clears it only when it sets over.
        receiver.upstreamResponded(response)  # type: ignore[union-attr]

    def upstreamFailed(self, failure: Failure) -> None:
        self._over()
        self.release()
        exchange = self.exchange
        if exchange.over:
            return  # cancelled by the caller: nothing to report
        try:
            exchange.attemptFailed(self.backend, failure, self.timedOut)
        except Exception:
            # A bug here must still answer the client, not leave the
            # request hanging.
            pool = exchange.pool
            pool.log.failure(
                "upstream {upstream}: handling a failed attempt failed",
                upstream=pool.upstream.name,
            )
            exchange.fail(classifyFailure(failure, self.timedOut), code=None)


def _bodyBytes(body: object) -> int:
    """
    The request body bytes an answered attempt carried, for the metrics:
    what a replayable body received from the client (C{received}), else its
    declared length.
    """
    if body is None:
        return 0
    for name in ("received", "length"):
        count = getattr(body, name, None)
        if isinstance(count, int) and not isinstance(count, bool):
            return count
    return 0


class _Discarding:
    """Closes the connection of a response nobody reads."""

    __slots__ = ()

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


_DISCARDING = _Discarding()
