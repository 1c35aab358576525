# -*- test-case-name: tests.test_pool -*-
"""
L{Exchange}: one request through an L{edgeproxy.upstream.pool.UpstreamPool},
from the first pick of a backend to the response head or the last failure:
its attempts (each a L{edgeproxy.upstream.attempt.BackendAttempt}), its
retries (decided by L{edgeproxy.upstream.retry}) and its time in the pool's
C{max_conns} queue.  Every attempt's outcome is reported to passive health
and to the metrics: a response by its attempt, a failure here.

The pool owns the choice of backend, the queue and the connections; this
module owns what happens to one request.  The two talk through L{_Pool}, the
handful of things an exchange asks of its pool, so this module never
imports the pool.

The request is sent on the L{Terms} of its route: the response timeout of
each attempt, the retries, and C{request_timeout}, the bound on the whole
(a timer of the exchange's own, armed only when the next step could
outlast it).  A timed-out attempt is retried only on a backend the request
was not tried on: a backend that did not answer in time is not asked
again, and one backend alone is tried once.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from edgeproxy.config.model import Upstream
from edgeproxy.errors import ProxyError, ServiceUnavailable, UpstreamTimeout
from edgeproxy.h1 import Fields
from edgeproxy.logs import Repeats
from edgeproxy.metrics import Metrics, methodClass
from edgeproxy.upstream.backend import Backend
from edgeproxy.upstream.failures import (
    attemptOutcome,
    classifyFailure,
    failureDetail,
    leafReasons,
)
from edgeproxy.upstream.attempt import BackendAttempt
from edgeproxy.upstream.response import UpstreamReceiver
from edgeproxy.upstream.retry import Attempt, RetryBudget, decide
from edgeproxy.upstream.sending import BodyProducer

if TYPE_CHECKING:
    from edgeproxy.upstream.client import Handle
    from edgeproxy.upstream.health import PassiveHealth
    from edgeproxy.upstream.terms import Terms

__all__ = ["FULL", "Exchange", "Full", "ReplayableBody", "UpstreamReceiver"]


class ReplayableBody(Protocol):
    """
    A request body the pool can send more than once
    (L{edgeproxy.bodies.BodyPipe}): each attempt reads it from its first
    byte through a producer of its own.
    """

    @property
    def replayable(self) -> bool:
        """Whether it can still be sent again from its first byte."""

    def keepForReplay(self, limit: int) -> None:
        """Keep a copy of up to C{limit} bytes so a sent body stays replayable."""

    def newAttempt(self) -> AttemptBody:
        """The producer of the next attempt."""

    def stopProducing(self) -> None:
        """No attempt will read the rest: let it drain."""


class AttemptBody(BodyProducer, Protocol):
    """The body of one attempt."""

    def whenFinished(self) -> Deferred[None]:
        """Fires once the whole body was handed to the connection."""


class _Pool(Protocol):
    """What this module uses of an L{edgeproxy.upstream.pool.UpstreamPool}."""

    upstream: Upstream
    metrics: Metrics
    passive: PassiveHealth
    budget: RetryBudget
    log: Logger
    repeats: Repeats
    seconds: Callable[[], float]
    callLater: Callable[..., Any]
    backends: tuple[Backend, ...]

    def choose(
        self, hashKey: bytes | None, tried: Set[Backend], untriedOnly: bool = False
    ) -> Backend | Full | None:
        """A backend for the next attempt (never one of C{tried} with
        C{untriedOnly}); L{FULL}: wait; L{None}: none at all."""

    def enqueue(self, exchange: Exchange) -> None:
        """Wait for a backend below C{max_conns} (or fail at once, queue full)."""

    def dequeue(self, exchange: Exchange) -> None:
        """Stop waiting (served, timed out or cancelled)."""

    def dispatch(
        self,
        backend: Backend,
        method: bytes,
        target: bytes,
        fields: Fields,
        body: BodyProducer | None,
        receiver: UpstreamReceiver,
        proxyHeader: bytes | None = None,
        connectTimeout: float | None = None,
    ) -> Handle:
        """Count one more request in flight on C{backend} and send it there
        (on a new connection starting with C{proxyHeader}, when given; a
        new connection dialled with C{connectTimeout} when given)."""

    def release(self, backend: Backend) -> None:
        """A request to C{backend} is no longer in flight."""


class Full:
    """
    The pool's answer when every available backend is at its C{max_conns}:
    the request waits in the queue.
    """


FULL = Full()

_TIMEOUTS = frozenset({"response_timeout", "connect_timeout"})
"""The labels of L{attemptOutcome} that are a backend not answering in
time: retried only on a backend not tried yet."""

_UNBOUNDED = float("inf")
"""How long sending a request body again may take (as long as the backend
takes to read it)."""


def _ignore(_: object) -> None:
    pass


class Exchange:
    """
    One request through the pool: its attempts, retries and time in the
    queue.

    @ivar receiver: who gets the outcome (L{UpstreamReceiver}); L{None}
        once it has it, or once the request was cancelled.
    @ivar tried: the backends an attempt was made on.
    @ivar terms: the timeouts and retries it is sent on.
    @ivar started: when its C{request_timeout} started counting (L{None}
        while a body is still being passed on).
    @ivar timer: the C{request_timeout} timer, armed only when the next
        step could outlast it.
    @ivar untriedOnly: a retry goes only to a backend not tried yet (after
        a timeout).
    """

    __slots__ = (
        "pool", "method", "target", "fields", "body", "hashKey", "receiver",
        "tried", "triedOrder", "retriesDone", "attempt", "queueTimer", "over",
        "lastError", "proxyHeader", "terms", "started", "timer", "untriedOnly",
    )

    def __init__(
        self,
        pool: _Pool,
        method: bytes,
        target: bytes,
        fields: Fields,
        body: ReplayableBody | None,
        hashKey: bytes | None,
        receiver: UpstreamReceiver,
        terms: Terms,
    ) -> None:
        self.pool = pool
        self.method = method
        self.target = target
        self.fields = fields
        self.body = body
        self.hashKey = hashKey
        self.receiver: UpstreamReceiver | None = receiver
        self.tried: set[Backend] = set()
        self.triedOrder: list[Backend] = []
        self.retriesDone = 0
        self.attempt: BackendAttempt | None = None
        self.queueTimer: IDelayedCall | None = None
        self.over = False
        self.lastError: ProxyError | None = None
        self.proxyHeader: bytes | None = None
        """The PROXY protocol header each attempt's connection starts with
        (C{[upstream] proxy_protocol}), or L{None}."""
        self.terms = terms
        self.started: float | None = None
        self.timer: Any = None
        self.untriedOnly = False

    # Placing an attempt -----------------------------------------------------

    def place(self) -> None:
        """Pick a backend now, or queue, or fail with 503."""
        pool = self.pool
        choice = pool.choose(self.hashKey, self.tried)
        if choice is FULL:
            self._enqueue()
        else:
            self.placed(choice)  # type: ignore[arg-type]

    def _enqueue(self) -> None:
        """Wait in the pool's queue, within the request's deadline."""
        pool = self.pool
        if self.started is None and self.body is None:
            # The request is complete: its time in the queue counts.
            self.started = pool.seconds()
        pool.enqueue(self)
        if not self.over:
            self.boundBy(
                pool.upstream.queue_timeout
                + (self.terms.responseTimeout if self.body is None else _UNBOUNDED)
            )

    def placed(self, backend: Backend | None) -> None:
        if self.over:
            return
        if backend is None:
            pool = self.pool
            if self.lastError is not None:
                # A queued retry whose backends all went away: the client
                # gets the failure it would have had without the retry.
                self.fail(self.lastError, code=None)
                return
            # Per request: the first of an interval in full, then counted.
            name = pool.upstream.name
            pool.repeats.emit(
                pool.log,
                LogLevel.warn,
                f"upstream {name}: no server available",
                "upstream {upstream}: no server available",
                upstream=name,
            )
            self.fail(
                ServiceUnavailable(f"upstream {pool.upstream.name}: no server available"),
                code=503,
            )
            return
        self.send(backend)

    def send(self, backend: Backend) -> None:
        body = self.body
        producer: AttemptBody | None = None
        if body is not None:
            if not body.replayable:
                # Failed or abandoned while this request waited in the
                # queue: the request layer has answered already.
                self.fail(CancelledError("request body gone"), code=None)
                return
            producer = body.newAttempt()
        self.tried.add(backend)
        self.triedOrder.append(backend)
        pool = self.pool
        terms = self.terms
        now = pool.seconds()
        attempt = BackendAttempt(self, backend, now)
        self.attempt = attempt
        if producer is None:
            if self.started is None:
                # A request without a body is complete: its request_timeout
                # counts from now (a first attempt needs no timer unless the
                # route's request_timeout is below its response_timeout).
                self.started = now
                if terms.cutsResponse:
                    self.boundBy(terms.responseTimeout)
            elif self.retriesDone:
                self.boundBy(terms.responseTimeout)
        elif self.retriesDone:
            self.boundBy(_UNBOUNDED)
        attempt.handle = pool.dispatch(
            backend, self.method, self.target, self.fields, producer, attempt, self.proxyHeader,
            terms.dialTimeout,
        )
        if producer is None:
            attempt.startTimer()
        else:
            # The response timeout starts once the body is sent.
            producer.whenFinished().addCallbacks(attempt.startTimer, _ignore)

    # The request's deadline (request_timeout) -----------------------------

    def boundBy(self, needed: float) -> None:
        """
        The next step may take up to C{needed} seconds: arm the request
        timer if that could outlast the request's deadline (once armed, it
        stays until the request is over).
        """
        started = self.started
        if started is None or self.timer is not None or self.over:
            return
        left = started + self.terms.requestTimeout - self.pool.seconds()
        if needed > left:
            self.timer = self.pool.callLater(max(left, 0.0), self._requestTimedOut)

    def stopTimer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _requestTimedOut(self) -> None:
        """
        C{request_timeout} passed with no response head: the client gets
        504, the attempt in flight is abandoned (or the queue left), no
        retry follows.
        """
        self.timer = None
        if self.over:
            return
        pool = self.pool
        pool.repeats.emit(
            pool.log,
            LogLevel.warn,
            f"upstream {pool.upstream.name}: request_timeout, 504",
            "upstream {upstream}: {method} had no response head within its request_timeout "
            "({timeout:g}s; tried {tried}): 504",
            upstream=pool.upstream.name,
            method=self.method.decode("ascii", "replace"),
            timeout=self.terms.requestTimeout,
            tried=self.triedText() or "none",
        )
        pool.dequeue(self)
        attempt, self.attempt = self.attempt, None
        self.fail(UpstreamTimeout("no response head within the request timeout"), code=504)
        if attempt is not None:
            # Not the backend's failure: its outcome reaches nobody.
            attempt.cancel()

    # Outcomes -------------------------------------------------------------------

    def attemptFailed(self, backend: Backend, failure: Failure, timedOut: bool) -> None:
        pool = self.pool
        upstream = pool.upstream
        kind, label = attemptOutcome(failure, timedOut)
        if kind is Attempt.LOCAL:
            # The client went away or its body failed: not the backend's
            # doing, and nobody waits for a retry.
            pool.log.debug(
                "upstream {upstream} request to {backend} abandoned: {why}",
                upstream=upstream.name,
                backend=backend.address,
                why=failure.getErrorMessage(),
            )
            if any(leaf.check(CancelledError) for leaf in leafReasons(failure)):
                self.fail(CancelledError(), code=None)
            else:
                self.fail(classifyFailure(failure, False), code=None)
            return
        error = classifyFailure(failure, timedOut)
        pool.repeats.emit(
            pool.log,
            LogLevel.warn,
            f"upstream {upstream.name} backend {backend.address} failed ({error.status} {label})",
            "upstream {upstream} backend {backend} failed: {status} {why}",
            upstream=upstream.name,
            backend=backend.address,
            status=error.status,
            why=str(error),
        )
        pool.metrics.upstreamFailed(upstream.name, error.status)
        terms = self.terms
        pool.passive.failure(
            backend, failureDetail(failure, timedOut, terms.connectTimeout, terms.responseTimeout)
        )
        body = self.body
        replayable = body is None or body.replayable
        decision = decide(self.method, kind, replayable, self.retriesDone, terms.retries)
        if not decision.retry:
            # Without retries configured there is nothing to explain.
            self._notRetried(error, decision.why if terms.retries else None)
            return
        if label in _TIMEOUTS:
            # A backend that did not answer in time is not asked again: it
            # would most likely keep the client waiting as long once more.
            self.untriedOnly = True
        if self.untriedOnly and all(other in self.tried for other in pool.backends):
            self._notRetried(error, "a timeout is retried only on a backend not tried yet")
            return
        started = self.started
        if started is not None and pool.seconds() >= started + terms.requestTimeout:
            self._notRetried(error, f"its request_timeout ({terms.requestTimeout:g}s) is spent")
            return
        if not pool.budget.tryRetry():
            pool.metrics.retryRefused(upstream.name)
            self._notRetried(error, "retry budget spent", warn=True)
            return
        # The next attempt must have a backend: when none is available now
        # (the failing one was just ejected, say), the client gets this
        # failure, not a 503 for a retry it never asked for.
        choice = pool.choose(self.hashKey, self.tried, self.untriedOnly)
        if choice is None:
            self._notRetried(error, "no other backend available")
            return
        self.retriesDone += 1
        self.lastError = error
        pool.metrics.retried(upstream.name, label)
        pool.repeats.emit(
            pool.log,
            LogLevel.info,
            f"upstream {upstream.name}: retried after {backend.address} failed ({label})",
            "upstream {upstream}: retrying {method} after {backend} failed ({reason}); "
            "retry {count} of {allowed}",
            upstream=upstream.name,
            method=self.method.decode("ascii", "replace"),
            backend=backend.address,
            reason=label,
            count=self.retriesDone,
            allowed=terms.retries,
        )
        if choice is FULL:
            self._enqueue()
        else:
            self.send(choice)  # type: ignore[arg-type]

    def failWaiting(self, error: ServiceUnavailable) -> None:
        """
        No place for this request under C{max_conns}: 503, or for a retry
        the failure it would have had without the retry.
        """
        if self.lastError is not None:
            self.fail(self.lastError, code=None)
        else:
            self.fail(error, code=503)

    def fail(self, error: Exception, code: int | None) -> None:
        """
        End the request with C{error}.

        @param code: the status to count in C{edgeproxy_upstream_errors} for
            a failure that no attempt counted (503s of the pool itself).
        """
        if self.over:
            return
        self.over = True
        if self.timer is not None:
            self.stopTimer()
        if code is not None:
            self.pool.metrics.upstreamFailed(self.pool.upstream.name, code)
        if self.triedOrder and isinstance(error, ProxyError):
            # The access log's backend (never sent to the client).
            error.backend = self.triedOrder[-1].address
        body = self.body
        if body is not None and not isinstance(error, CancelledError):
            # No further attempt: let the rest of the body drain.
            body.stopProducing()
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.upstreamFailed(Failure(error))

    def cancel(self) -> None:
        """
        The caller gave up (the client went away): leave the queue or abort
        the attempt in progress; no retry follows, and the receiver hears
        nothing more.
        """
        if self.over:
            return
        self.over = True
        self.receiver = None
        if self.timer is not None:
            self.stopTimer()
        self.pool.dequeue(self)
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.cancel()
        self.pool.log.debug(
            "upstream {upstream} request cancelled by the client",
            upstream=self.pool.upstream.name,
        )

    def _notRetried(self, error: ProxyError, why: str | None, warn: bool = False) -> None:
        """
        Give the client C{error} instead of another attempt, saying C{why}
        in the log (at warning level with C{warn}; not at all without a
        C{why}).
        """
        if why is not None:
            pool = self.pool
            name = pool.upstream.name
            method = self.method.decode("ascii", "replace")
            # The count's name holds no method of the client's own making.
            kind = why if methodClass(method) != "other" else why.replace(method, "other method")
            pool.repeats.emit(
                pool.log,
                LogLevel.warn if warn else LogLevel.info,
                f"upstream {name}: not retried ({kind})",
                "upstream {upstream}: {method} not retried: {why} (tried {tried})",
                upstream=name,
                method=method,
                why=why,
                tried=self.triedText(),
            )
        self.fail(error, code=None)

    def triedText(self) -> str:
        return ", ".join(backend.address for backend in self.triedOrder)
