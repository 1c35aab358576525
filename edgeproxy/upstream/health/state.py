# -*- test-case-name: tests.test_health -*-
"""
Backend state changes and passive ejection.

  - L{transition} is the only way a L{Backend}'s state changes, whoever
    decides it (a health verdict, an admin action, a supervisor's verdict
    in workers mode): it logs, counts, starts slow start and tells the
    pool's observers.
  - L{PassiveHealth} counts the failures of real traffic and ejects a
    backend for C{eject_time} (doubling on repeated ejection, capped at
    C{eject_max_time}) after C{max_fails} within C{fail_window}.
  - L{availability} is the predicate the balancer picks by: up and not
    ejected, or unknown while no backend of the upstream is up (fail open
    at start, before the first checks answered).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from edgeproxy.config.model import Upstream
from edgeproxy.metrics import Metrics
from edgeproxy.upstream.backend import Backend, BackendState

__all__ = [
    "ADMIN_STATES",
    "HEALTH_STATES",
    "PassiveHealth",
    "Pool",
    "availability",
    "enable",
    "healthState",
    "initialState",
    "transition",
]

# One namespace for the lines of backend health, whichever module says them.
log = Logger(namespace="edgeproxy.upstream.health")

HEALTH_STATES = frozenset({BackendState.UNKNOWN, BackendState.UP, BackendState.DOWN})
"""States a health verdict sets."""

ADMIN_STATES = frozenset({BackendState.DRAINING, BackendState.DISABLED})
"""States only an administrator (or the C{down} server option) sets; health
verdicts never move a backend out of them."""

_HEALTH = "health"
"""C{backend.extra} key of the last health verdict (a L{BackendState})."""


class Pool(Protocol):
    """What this module uses of an L{edgeproxy.upstream.pool.UpstreamPool}."""

    upstream: Upstream
    backends: tuple[Backend, ...]
    metrics: Metrics
    observers: list[Callable[[Backend], None]]

    def endpointFor(self, server: Backend) -> IStreamClientEndpoint: ...


# Transitions -------------------------------------------------------------------


def initialState(upstream: Upstream) -> BackendState:
    """
    @return: the state a new backend of C{upstream} starts in: L{UP
        <BackendState.UP>} without active checks or with C{health_initial =
        up}, else L{UNKNOWN <BackendState.UNKNOWN>}.
    """
    if upstream.health_path is None or upstream.health_initial == "up":
        return BackendState.UP
    return BackendState.UNKNOWN


def healthState(pool: Pool, backend: Backend) -> BackendState:
    """
    @return: what health says of C{backend}, whatever it shows: its last
        verdict, else L{initialState}; always L{UP <BackendState.UP>} for an
        upstream without active checks.
    """
    if pool.upstream.health_path is None:
        return BackendState.UP
    verdict = backend.extra.get(_HEALTH)
    if isinstance(verdict, BackendState):
        return verdict
    return initialState(pool.upstream)


def transition(
    pool: Pool,
    backend: Backend,
    state: BackendState,
    reason: str,
    *,
    health: bool = False,
    logged: bool = True,
) -> None:
    """
    Move C{backend} to C{state}: the only way a backend's state changes.

    Logs one line (upstream, backend, old and new state, reason), counts
    C{edgeproxy_backend_transitions}, starts slow start when the backend
    becomes available again, then calls every C{pool.observers} callable
    with the backend.  Nothing of that happens when the state is unchanged
    (only C{backend.reason} is updated).

    @param state: the new state.  A health state (C{unknown}, C{up},
        C{down}) is also remembered as the backend's health verdict.
    @param reason: why, for the log and C{/status}.
    @param health: C{True} for the verdicts of this process's own health
        checks: they do not move a backend out of an administrative state
        (C{draining}, C{disabled}), they are only remembered for L{enable}.
        Everything else (an admin action, a supervisor's verdict) is
        authoritative.
    @param logged: C{False} for a verdict a supervisor decided and logged
        already: a worker applying it would repeat the line once per worker.
    """
    if state in HEALTH_STATES:
        backend.extra[_HEALTH] = state
        if health and backend.state in ADMIN_STATES:
            log.debug(
                "upstream {upstream} backend {backend} health {verdict} ({reason}), "
                "stays {state}",
                upstream=pool.upstream.name,
                backend=backend.address,
                verdict=state.value,
                reason=reason,
                state=backend.state.value,
            )
            return
    old = backend.state
    backend.reason = reason
    if old is state:
        return
    backend.state = state
    if logged:
        emit = log.warn if state is BackendState.DOWN else log.info
        emit(
            "upstream {upstream} backend {backend}: {old} -> {new} ({reason})",
            upstream=pool.upstream.name,
            backend=backend.address,
            old=old.value,
            new=state.value,
            reason=reason,
        )
    metrics = metricsOf(pool)
    if metrics is not None:
        metrics.backendTransition(pool.upstream.name, backend.address, state.value)
    # "Becomes available again": a first verdict (from unknown) is not a
    # recovery; an upstream starting up has nothing to protect it from.
    if state is BackendState.UP and old is not BackendState.UNKNOWN:
        backend.startSlowStart(pool.upstream.slow_start)
    if state is BackendState.UP and old is BackendState.DOWN:
        # Health checks have seen it recover since whatever got it
        # ejected (Envoy's successful_active_health_check_uneject_host).
        passive = getattr(pool, "passive", None)
        if isinstance(passive, PassiveHealth):
            passive.readmit(backend, reason)
    notifyObservers(pool, backend)


def metricsOf(pool: Pool) -> Metrics | None:
    # A pool-like object without metrics (a test's, an older pool) still
    # gets its transitions; it just is not counted.
    return getattr(pool, "metrics", None)


def notifyObservers(pool: Pool, backend: Backend) -> None:
    for observer in list(getattr(pool, "observers", ())):
        try:
            observer(backend)
        except Exception:
            # One broken observer must not stop the others nor the caller
            # (a health check or an admin request).
            log.failure(
                "observer {observer} failed for backend {backend}",
                observer=observer,
                backend=backend.address,
            )


def enable(pool: Pool, backend: Backend, reason: str = "admin: enable") -> None:
    """
    The admin action C{enable}: end C{draining} or C{disabled} and show
    what health says (L{healthState}).  A backend in a health state is left
    alone.
    """
    if backend.state in ADMIN_STATES:
        transition(pool, backend, healthState(pool, backend), reason)


def availability(pool: Pool) -> Callable[[Backend], bool]:
    """
    The balancer's predicate for C{pool}'s backends (its C{available=}).

    A backend is available when it is up and not ejected.  An unknown
    backend (not checked yet) is available, unless ejected, only while no
    backend of the upstream is up and not ejected: at start every backend
    is unknown for the few milliseconds the first checks take, and they all
    take traffic rather than none; once one has passed, the unknown ones
    wait for their own verdict.
    """

    def available(backend: Backend) -> bool:
        if backend.ejectedUntil is not None:
            return False
        state = backend.state
        if state is BackendState.UP:
            return True
        if state is not BackendState.UNKNOWN:
            return False
        for other in pool.backends:
            if other.state is BackendState.UP and other.ejectedUntil is None:
                return False
        return True

    return available


# Passive health ---------------------------------------------------------------

_FAILURES = "passive.failures"
_STREAK = "passive.streak"
_LAST_END = "passive.lastEnd"
_LAST_LENGTH = "passive.lastLength"


class PassiveHealth:
    """
    Ejection of backends by the results of real traffic (C{max_fails}
    failures within C{fail_window}).

    Never ejects the last backend of an upstream that could take traffic:
    failures counted from traffic may come from the requests themselves (a
    C{fail_status} a bad request provokes), and turning a partial failure
    into every request getting 503 helps nobody (Envoy's
    C{max_ejection_percent} and nginx's reset of an all-failed upstream do
    the same).  The active checker still takes such a backend down.
    """

    def __init__(self, pool: Pool, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock
        self._timers: dict[Backend, IDelayedCall] = {}

    def failure(self, backend: Backend, reason: str) -> None:
        """
        A request to C{backend} failed: connect failure, reset, timeout,
        unparseable response.
        """
        upstream = self._pool.upstream
        if upstream.max_fails <= 0 or backend.ejectedUntil is not None:
            return
        if backend.state not in (BackendState.UP, BackendState.UNKNOWN):
            return  # takes no new requests anyway: an in-flight one ending
        now = self._clock.seconds()
        failures = backend.extra.get(_FAILURES)
        if not isinstance(failures, deque):
            failures = backend.extra[_FAILURES] = deque()
        failures.append(now)
        while failures and failures[0] <= now - upstream.fail_window:
            failures.popleft()
        if len(failures) < upstream.max_fails:
            return
        failures.clear()
        if not self._othersAvailable(backend):
            log.warn(
                "upstream {upstream} backend {backend}: {count} failures within "
                "{window} (last: {reason}), not ejected: it is the last "
                "available backend",
                upstream=upstream.name,
                backend=backend.address,
                count=upstream.max_fails,
                window=formatSeconds(upstream.fail_window),
                reason=reason,
            )
            return
        self._eject(backend, now, reason)

    def responded(self, backend: Backend, status: int) -> None:
        """
        C{backend} answered a response head with C{status}: a failure when
        C{status} is in C{fail_status}.
        """
        if status in self._pool.upstream.fail_status:
            self.failure(backend, f"status {status}")

    def readmit(self, backend: Backend, why: str) -> None:
        """
        End C{backend}'s ejection now (L{transition} does when health
        checks bring it back up); nothing when it is not ejected.
        """
        if backend.ejectedUntil is None:
            return
        timer = self._timers.pop(backend, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._readmit(backend, why)

    def stop(self) -> None:
        """Cancel the timers ending ejections (a retired pool)."""
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def _othersAvailable(self, backend: Backend) -> bool:
        return any(
            other is not backend
            and other.ejectedUntil is None
            and other.state in (BackendState.UP, BackendState.UNKNOWN)
            for other in self._pool.backends
        )

    def _eject(self, backend: Backend, now: float, reason: str) -> None:
        upstream = self._pool.upstream
        lastEnd = backend.extra.get(_LAST_END)
        lastLength = backend.extra.get(_LAST_LENGTH)
        streak = 0
        if isinstance(lastEnd, float) and isinstance(lastLength, float):
            # "Without a healthy period in between": back in service for
            # less time than it was last kept out.
            if now - lastEnd < lastLength:
                streak = int(backend.extra.get(_STREAK, 0)) + 1  # type: ignore[call-overload]
        length = float(upstream.eject_time)
        for _ in range(streak):
            if length >= upstream.eject_max_time:
                break
            length *= 2
        length = min(length, max(upstream.eject_max_time, upstream.eject_time))
        backend.extra[_STREAK] = streak
        backend.extra[_LAST_LENGTH] = length
        backend.ejectedUntil = now + length
        backend.ejections += 1
        metrics = metricsOf(self._pool)
        if metrics is not None:
            metrics.ejected(upstream.name, backend.address)
        log.warn(
            "upstream {upstream} backend {backend} ejected for {length}: {count} "
            "failures within {window}, last: {reason}",
            upstream=upstream.name,
            backend=backend.address,
            length=formatSeconds(length),
            count=upstream.max_fails,
            window=formatSeconds(upstream.fail_window),
            reason=reason,
        )
        self._timers[backend] = self._clock.callLater(length, self._readmit, backend)

    def _readmit(self, backend: Backend, why: str | None = None) -> None:
        self._timers.pop(backend, None)
        backend.ejectedUntil = None
        backend.extra[_LAST_END] = float(self._clock.seconds())
        backend.startSlowStart(self._pool.upstream.slow_start)
        if why is None:
            log.info(
                "upstream {upstream} backend {backend}: ejection over after {length}",
                upstream=self._pool.upstream.name,
                backend=backend.address,
                length=formatSeconds(float(backend.extra.get(_LAST_LENGTH, 0.0))),  # type: ignore[arg-type]
            )
        else:
            log.info(
                "upstream {upstream} backend {backend}: ejection ended early ({why})",
                upstream=self._pool.upstream.name,
                backend=backend.address,
                why=why,
            )


def formatSeconds(value: float) -> str:
    return f"{value:g}s"
