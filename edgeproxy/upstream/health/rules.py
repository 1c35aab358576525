# -*- test-case-name: tests.test_health_rules -*-
"""
The rules of backend health, as pure functions: each takes what it decides
on (a backend's state, a check's or a request's result, the upstream's
settings, the time) and returns the backend's next state and the effects
to apply, in order.  Nothing here logs, counts, schedules or reads a
clock; L{edgeproxy.upstream.health.state} and
L{edgeproxy.upstream.health.checker} apply the effects.

  - L{transitionRule}: what moving a backend to a state does.  A health
    verdict does not move a backend out of an administrative state
    (C{draining}, C{disabled}): it is only remembered, for C{enable}.
  - L{judgeCheck}: C{rise} passing checks in a row bring a C{down} backend
    up, C{fall} failed ones bring an C{up} one down; the first check
    decides for an C{unknown} one.
  - L{judgeFailure}: C{max_fails} failures of real traffic within
    C{fail_window} eject a backend for C{eject_time}, doubled for each
    ejection that follows a return to service shorter than the last
    ejection (at most C{eject_max_time}); never the last backend that could
    take traffic.  L{ejectionEnded} is the end of one.

Worked example, C{rise = 2}, C{fall = 3}, a backend C{up}::

    fail, fail          -> up (1 of 3, 2 of 3: FailedWhileUp logged)
    fail                -> down ("3 failed checks in a row")
    pass                -> down (1 passing check, rise is 2)
    pass                -> up ("2 passing checks in a row")
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgeproxy.config.model import Upstream
from edgeproxy.upstream.backend import BackendState, CheckResult

__all__ = [
    "ADMIN_STATES",
    "HEALTH_STATES",
    "CheckFailedWhileUp",
    "CheckRun",
    "EjectionState",
    "Ejected",
    "EjectionOver",
    "EndEjection",
    "Hidden",
    "KeptLastAvailable",
    "Moved",
    "Notify",
    "Shown",
    "SlowStart",
    "Verdict",
    "ejectionEnded",
    "initialState",
    "judgeCheck",
    "judgeFailure",
    "transitionRule",
]

HEALTH_STATES = frozenset({BackendState.UNKNOWN, BackendState.UP, BackendState.DOWN})
"""States a health verdict sets."""

ADMIN_STATES = frozenset({BackendState.DRAINING, BackendState.DISABLED})
"""States only an administrator (or the C{down} server option) sets; health
verdicts never move a backend out of them."""

_TAKES_TRAFFIC = frozenset({BackendState.UP, BackendState.UNKNOWN})


def initialState(upstream: Upstream) -> BackendState:
    """
    @return: the state a new backend of C{upstream} starts in: L{UP
        <BackendState.UP>} without active checks or with C{health_initial =
        up}, else L{UNKNOWN <BackendState.UNKNOWN>}.
    """
    if upstream.health_path is None or upstream.health_initial == "up":
        return BackendState.UP
    return BackendState.UNKNOWN


# Effects ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Moved:
    """The backend shows another state: one log line (warning when it is
    C{down}), C{edgeproxy_backend_transitions} counted."""

    old: BackendState
    new: BackendState


@dataclass(frozen=True, slots=True)
class Hidden:
    """A health verdict an administrative state hides (a debug line)."""

    verdict: BackendState
    shown: BackendState


@dataclass(frozen=True, slots=True)
class SlowStart:
    """The backend takes traffic again: its weight ramps up over
    C{slow_start}."""


@dataclass(frozen=True, slots=True)
class EndEjection:
    """Health checks saw the backend recover since whatever got it ejected:
    a passive ejection ends now (Envoy's
    C{successful_active_health_check_uneject_host})."""


@dataclass(frozen=True, slots=True)
class Notify:
    """The pool's observers are told (the balancer, a supervisor's
    workers)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Health says the backend is C{state}: apply with the transition rule
    (as a health verdict)."""

    state: BackendState
    reason: str


@dataclass(frozen=True, slots=True)
class CheckFailedWhileUp:
    """A failed check of a backend still up: logged, so that the log
    explains a coming C{down}.  (A passing check is not logged: a line per
    backend every interval would bury the lines that matter.)"""

    fails: int
    fall: int
    detail: str


@dataclass(frozen=True, slots=True)
class Ejected:
    """The backend is ejected for C{length} seconds, until C{until}: one
    warning, C{edgeproxy_ejections_total} counted, a timer ends it."""

    length: float
    until: float
    count: int
    """The failures that got it ejected (C{max_fails})."""
    window: float
    reason: str
    """The last failure."""


@dataclass(frozen=True, slots=True)
class KeptLastAvailable:
    """C{max_fails} failures, but the backend is the last that could take
    traffic: not ejected, one warning."""

    count: int
    window: float
    reason: str


@dataclass(frozen=True, slots=True)
class EjectionOver:
    """An ejection ended: at its time (C{why} is L{None}) or early."""

    length: float
    why: str | None


Effect = Moved | Hidden | SlowStart | EndEjection | Notify | Verdict | CheckFailedWhileUp | Ejected | KeptLastAvailable | EjectionOver


# Transitions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shown:
    """A backend as the transition rule sees it."""

    state: BackendState
    """What it shows (C{/status}, the balancer)."""
    health: BackendState | None
    """Its last health verdict, L{None} before any."""
    reason: str


def transitionRule(
    before: Shown, state: BackendState, reason: str, *, health: bool = False
) -> tuple[Shown, tuple[Effect, ...]]:
    """
    Move a backend to C{state}.

    @param state: the new state.  A health state (C{unknown}, C{up},
        C{down}) is also remembered as the backend's health verdict.
    @param reason: why, for the log and C{/status}.
    @param health: C{True} for the verdicts of this process's own health
        checks: they do not move a backend out of an administrative state,
        they are only remembered.  Everything else (an admin action, a
        supervisor's verdict) is authoritative.
    @return: the backend afterwards, and the effects: none but the reason
        when the state is unchanged; else L{Moved}, L{SlowStart} when it
        becomes available again (not on a first verdict: an upstream
        starting up has nothing to protect it from), L{EndEjection} on
        C{down} -> C{up}, and L{Notify}.
    """
    remembered = state if state in HEALTH_STATES else before.health
    if state in HEALTH_STATES and health and before.state in ADMIN_STATES:
        return replace(before, health=remembered), (Hidden(state, before.state),)
    after = Shown(state, remembered, reason)
    old = before.state
    if old is state:
        return after, ()
    effects: list[Effect] = [Moved(old, state)]
    if state is BackendState.UP and old is not BackendState.UNKNOWN:
        effects.append(SlowStart())
    if state is BackendState.UP and old is BackendState.DOWN:
        effects.append(EndEjection())
    effects.append(Notify())
    return after, tuple(effects)


# Active checks: rise and fall ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckRun:
    """The current run of one backend's check results."""

    passes: int = 0
    fails: int = 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def judgeCheck(
    before: Shown, run: CheckRun, result: CheckResult, upstream: Upstream
) -> tuple[CheckRun, tuple[Effect, ...]]:
    """
    One active check's result.

    @param before: the backend; C{before.health} L{None} counts as
        L{initialState}.
    @param run: the results in a row so far.
    @return: the run with C{result}, and the effects: a L{Verdict} when the
        run decides, a L{CheckFailedWhileUp} for a failed check of a
        backend that still shows C{up} afterwards.
    """
    verdict = before.health if before.health is not None else initialState(upstream)
    decided: Verdict | None = None
    if result.ok:
        run = CheckRun(passes=run.passes + 1, fails=0)
        if verdict is BackendState.UNKNOWN:
            decided = Verdict(BackendState.UP, f"first check passed: {result.detail}")
        elif verdict is BackendState.DOWN and run.passes >= upstream.rise:
            decided = Verdict(
                BackendState.UP, f"{_count(run.passes, 'passing check')} in a row: {result.detail}"
            )
    else:
        run = CheckRun(passes=0, fails=run.fails + 1)
        if verdict is BackendState.UNKNOWN:
            decided = Verdict(BackendState.DOWN, f"first check failed: {result.detail}")
        elif verdict is BackendState.UP and run.fails >= upstream.fall:
            decided = Verdict(
                BackendState.DOWN, f"{_count(run.fails, 'failed check')} in a row: {result.detail}"
            )
    effects: list[Effect] = []
    shown = before.state
    if decided is not None:
        effects.append(decided)
        shown = transitionRule(before, decided.state, decided.reason, health=True)[0].state
    if not result.ok and shown is BackendState.UP:
        effects.append(CheckFailedWhileUp(run.fails, upstream.fall, result.detail))
    return run, tuple(effects)


# Passive health: ejection ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EjectionState:
    """What passive health remembers of one backend."""

    failures: tuple[float, ...] = ()
    """When the failures still within C{fail_window} happened."""
    until: float | None = None
    """When the current ejection ends; L{None} when not ejected."""
    streak: int = 0
    """Ejections in a row without a healthy period in between."""
    lastEnd: float | None = None
    """When the last ejection ended."""
    lastLength: float | None = None
    """How long the last ejection lasted, in seconds."""


def judgeFailure(
    before: EjectionState,
    shown: BackendState,
    othersAvailable: bool,
    reason: str,
    upstream: Upstream,
    now: float,
) -> tuple[EjectionState, tuple[Effect, ...]]:
    """
    A request to the backend failed (connect failure, reset, timeout,
    unparseable response, a C{fail_status}).

    Never ejects the last backend of an upstream that could take traffic:
    failures counted from traffic may come from the requests themselves (a
    C{fail_status} a bad request provokes), and turning a partial failure
    into every request getting 503 helps nobody (Envoy's
    C{max_ejection_percent} and nginx's reset of an all-failed upstream do
    the same).  The active checker still takes such a backend down.

    @param shown: the state the backend shows; one that takes no new
        requests (C{down}, C{draining}, C{disabled}) is not judged: an
        in-flight request is ending.
    @param othersAvailable: whether another backend of the upstream is
        neither ejected nor out of service.
    @return: the state afterwards, and L{Ejected} or L{KeptLastAvailable}
        when C{max_fails} is reached.
    """
    if upstream.max_fails <= 0 or before.until is not None or shown not in _TAKES_TRAFFIC:
        return before, ()
    failures = tuple(t for t in before.failures + (now,) if t > now - upstream.fail_window)
    if len(failures) < upstream.max_fails:
        return replace(before, failures=failures), ()
    after = replace(before, failures=())
    if not othersAvailable:
        return after, (KeptLastAvailable(upstream.max_fails, upstream.fail_window, reason),)
    streak = 0
    if before.lastEnd is not None and before.lastLength is not None:
        # "Without a healthy period in between": back in service for less
        # time than it was last kept out.
        if now - before.lastEnd < before.lastLength:
            streak = before.streak + 1
    length = float(upstream.eject_time)
    for _ in range(streak):
        if length >= upstream.eject_max_time:
            break
        length *= 2
    length = min(length, max(upstream.eject_max_time, upstream.eject_time))
    after = replace(after, until=now + length, streak=streak, lastLength=length)
    return after, (Ejected(length, now + length, upstream.max_fails, upstream.fail_window, reason),)


def ejectionEnded(
    before: EjectionState, now: float, why: str | None = None
) -> tuple[EjectionState, tuple[Effect, ...]]:
    """
    An ejection ends: at its time (C{why} L{None}) or early (C{why}: health
    checks saw the backend recover).  Nothing when it is not ejected.

    @return: the state afterwards, and L{SlowStart} and L{EjectionOver}.
    """
    if before.until is None:
        return before, ()
    after = replace(before, until=None, lastEnd=now)
    return after, (SlowStart(), EjectionOver(before.lastLength or 0.0, why))
