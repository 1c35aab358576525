# -*- test-case-name: tests.test_health -*-
"""
Backend state changes and passive ejection, applied: the effects the pure
rules of L{edgeproxy.upstream.health.rules} decide, turned into log lines,
metrics, slow starts, timers and calls to the pool's observers.

  - L{transition} is the only way a L{Backend}'s state changes, whoever
    decides it (a health verdict, an admin action, a supervisor's verdict
    in workers mode).
  - L{PassiveHealth} counts the failures of real traffic and ejects a
    backend (L{edgeproxy.upstream.health.rules.judgeFailure}), and ends the
    ejection with a timer, or early when health checks see it recover.
  - L{availability} is the predicate the balancer picks by.

What the rules remember of a backend is kept in C{backend.extra}: its last
health verdict (even while an administrative state is what it shows, so
L{enable} can put it back where its health says) and its
L{EjectionState}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger, LogLevel

from edgeproxy.config.model import Upstream
from edgeproxy.logs import repeats
from edgeproxy.metrics import Metrics
from edgeproxy.upstream.backend import Backend, BackendState
from edgeproxy.upstream.health.rules import (
    ADMIN_STATES,
    Effect,
    Ejected,
    EjectionOver,
    EjectionState,
    EndEjection,
    Hidden,
    KeptLastAvailable,
    Moved,
    Notify,
    Shown,
    SlowStart,
    ejectionEnded,
    initialState,
    judgeFailure,
    transitionRule,
)

__all__ = [
    "PassiveHealth",
    "Pool",
    "availability",
    "enable",
    "healthState",
    "transition",
]

# One namespace for the lines of backend health, whichever module says them.
log = Logger(namespace="edgeproxy.upstream.health")

_HEALTH = "health"
"""C{backend.extra} key of the last health verdict (a L{BackendState})."""

_EJECTION = "passive"
"""C{backend.extra} key of passive health's L{EjectionState}."""


class Pool(Protocol):
    """What backend health uses of an L{edgeproxy.upstream.pool.UpstreamPool}."""

    upstream: Upstream
    backends: tuple[Backend, ...]
    metrics: Metrics
    observers: list[Callable[[Backend], None]]

    def endpointFor(self, server: Backend) -> IStreamClientEndpoint: ...


def formatSeconds(value: float) -> str:
    return f"{value:g}s"


# What is remembered of a backend -------------------------------------------------


def healthVerdictOf(backend: Backend) -> BackendState | None:
    """The last health verdict of C{backend}, or L{None} before any."""
    verdict = backend.extra.get(_HEALTH)
    return verdict if isinstance(verdict, BackendState) else None


def rememberHealth(backend: Backend, verdict: BackendState | None) -> None:
    if verdict is not None:
        backend.extra[_HEALTH] = verdict


def healthState(pool: Pool, backend: Backend) -> BackendState:
    """
    @return: what health says of C{backend}, whatever it shows: its last
        verdict, else L{initialState}; always L{UP <BackendState.UP>} for an
        upstream without active checks.
    """
    if pool.upstream.health_path is None:
        return BackendState.UP
    verdict = healthVerdictOf(backend)
    return verdict if verdict is not None else initialState(pool.upstream)


def _ejectionOf(backend: Backend) -> EjectionState:
    state = backend.extra.get(_EJECTION)
    if not isinstance(state, EjectionState):
        state = EjectionState()
    # The backend's own field is what the balancer and /status read.
    return state if state.until == backend.ejectedUntil else EjectionState(
        state.failures, backend.ejectedUntil, state.streak, state.lastEnd, state.lastLength
    )


# Transitions -------------------------------------------------------------------


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
    Move C{backend} to C{state}: the only way a backend's state changes
    (the rule: L{edgeproxy.upstream.health.rules.transitionRule}).

    Logs one line (upstream, backend, old and new state, reason), counts
    C{edgeproxy_backend_transitions}, starts slow start when the backend
    becomes available again, then calls every C{pool.observers} callable
    with the backend.  Nothing of that happens when the state is unchanged
    (only C{backend.reason} is updated).

    @param health: C{True} for the verdicts of this process's own health
        checks: they do not move a backend out of an administrative state
        (C{draining}, C{disabled}), they are only remembered for L{enable}.
    @param logged: C{False} for a verdict a supervisor decided and logged
        already: a worker applying it would repeat the line once per worker.
    """
    before = Shown(backend.state, healthVerdictOf(backend), backend.reason)
    after, effects = transitionRule(before, state, reason, health=health)
    rememberHealth(backend, after.health)
    backend.state = after.state
    backend.reason = after.reason
    for effect in effects:
        _apply(pool, backend, effect, reason, logged)


def _apply(pool: Pool, backend: Backend, effect: Effect, reason: str, logged: bool) -> None:
    if isinstance(effect, Hidden):
        log.debug(
            "upstream {upstream} backend {backend} health {verdict} ({reason}), "
            "stays {state}",
            upstream=pool.upstream.name,
            backend=backend.address,
            verdict=effect.verdict.value,
            reason=reason,
            state=effect.shown.value,
        )
    elif isinstance(effect, Moved):
        if logged:
            emit = log.warn if effect.new is BackendState.DOWN else log.info
            emit(
                "upstream {upstream} backend {backend}: {old} -> {new} ({reason})",
                upstream=pool.upstream.name,
                backend=backend.address,
                old=effect.old.value,
                new=effect.new.value,
                reason=reason,
            )
        metrics = metricsOf(pool)
        if metrics is not None:
            metrics.backendTransition(pool.upstream.name, backend.address, effect.new.value)
    elif isinstance(effect, SlowStart):
        backend.startSlowStart(pool.upstream.slow_start)
    elif isinstance(effect, EndEjection):
        passive = getattr(pool, "passive", None)
        if isinstance(passive, PassiveHealth):
            passive.readmit(backend, reason)
    elif isinstance(effect, Notify):
        notifyObservers(pool, backend)


def metricsOf(pool: Pool) -> Metrics | None:
    # A pool-like object without metrics (a test's, an older pool) still
    # gets its transitions; it just is not counted.
    return getattr(pool, "metrics", None)


def notifyObservers(pool: Pool, backend: Backend) -> None:
    """Call every C{pool.observers} callable with C{backend}."""
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


class PassiveHealth:
    """
    Ejection of backends by the results of real traffic (C{max_fails}
    failures within C{fail_window}; the rule:
    L{edgeproxy.upstream.health.rules.judgeFailure}).  Never ejects the last
    backend of an upstream that could take traffic.
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
        after, effects = judgeFailure(
            _ejectionOf(backend),
            backend.state,
            self._othersAvailable(backend),
            reason,
            self._pool.upstream,
            self._clock.seconds(),
        )
        self._keep(backend, after, effects)

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

    def _readmit(self, backend: Backend, why: str | None = None) -> None:
        # The timer's call, or readmit's: the ejection ends now.
        self._timers.pop(backend, None)
        after, effects = ejectionEnded(_ejectionOf(backend), self._clock.seconds(), why)
        self._keep(backend, after, effects)

    def _keep(self, backend: Backend, after: EjectionState, effects: tuple[Effect, ...]) -> None:
        """Remember C{after} and apply C{effects}."""
        backend.extra[_EJECTION] = after
        backend.ejectedUntil = after.until
        upstream = self._pool.upstream
        for effect in effects:
            if isinstance(effect, Ejected):
                backend.ejections += 1
                metrics = metricsOf(self._pool)
                if metrics is not None:
                    metrics.ejected(upstream.name, backend.address)
                log.warn(
                    "upstream {upstream} backend {backend} ejected for {length}: {count} "
                    "failures within {window}, last: {reason}",
                    upstream=upstream.name,
                    backend=backend.address,
                    length=formatSeconds(effect.length),
                    count=effect.count,
                    window=formatSeconds(effect.window),
                    reason=effect.reason,
                )
                self._timers[backend] = self._clock.callLater(effect.length, self._readmit, backend)
            elif isinstance(effect, KeptLastAvailable):
                # Once per failure past the threshold: the first of an
                # interval in full, then a count.
                repeats(self._clock).emit(
                    log,
                    LogLevel.warn,
                    f"upstream {upstream.name} backend {backend.address} not ejected (last available)",
                    "upstream {upstream} backend {backend}: {count} failures within "
                    "{window} (last: {reason}), not ejected: it is the last "
                    "available backend",
                    upstream=upstream.name,
                    backend=backend.address,
                    count=effect.count,
                    window=formatSeconds(effect.window),
                    reason=effect.reason,
                )
            elif isinstance(effect, SlowStart):
                backend.startSlowStart(upstream.slow_start)
            elif isinstance(effect, EjectionOver):
                if effect.why is None:
                    log.info(
                        "upstream {upstream} backend {backend}: ejection over after {length}",
                        upstream=upstream.name,
                        backend=backend.address,
                        length=formatSeconds(effect.length),
                    )
                else:
                    log.info(
                        "upstream {upstream} backend {backend}: ejection ended early ({why})",
                        upstream=upstream.name,
                        backend=backend.address,
                        why=effect.why,
                    )
