"""
Tests for L{edgeproxy.upstream.health.rules}: the health rules as tables of
(state before, input) -> (state after, effects), with plain asserts.  Their
effects applied (log lines, metrics, timers, observers) are tested in
C{tests/test_health.py}.
"""

from __future__ import annotations

from typing import Any

import pytest

from edgeproxy.config.model import Server, Upstream
from edgeproxy.upstream.backend import BackendState, CheckResult
from edgeproxy.upstream.health.rules import (
    CheckFailedWhileUp,
    CheckRun,
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
    Verdict,
    ejectionEnded,
    initialState,
    judgeCheck,
    judgeFailure,
    transitionRule,
)

UP, DOWN, UNKNOWN = BackendState.UP, BackendState.DOWN, BackendState.UNKNOWN
DRAINING, DISABLED = BackendState.DRAINING, BackendState.DISABLED


def upstream(**settings: Any) -> Upstream:
    return Upstream("app", (Server("127.0.0.1", 8000),), **settings)


def test_initialState() -> None:
    assert initialState(upstream()) is UP  # no active checks
    assert initialState(upstream(health_path="/healthz")) is UNKNOWN
    assert initialState(upstream(health_path="/healthz", health_initial="up")) is UP


# The transition rule ----------------------------------------------------------------

TRANSITIONS = [
    # (shown, health, state, health verdict?) -> (shown, health, reason, effects)
    ((UNKNOWN, UNKNOWN, UP, True), (UP, UP, "new", (Moved(UNKNOWN, UP), Notify()))),
    ((DOWN, DOWN, UP, True), (UP, UP, "new", (Moved(DOWN, UP), SlowStart(), EndEjection(), Notify()))),
    ((UP, UP, DOWN, True), (DOWN, DOWN, "new", (Moved(UP, DOWN), Notify()))),
    ((UP, UP, UP, True), (UP, UP, "new", ())),
    # A health verdict an administrative state hides: remembered only.
    ((DRAINING, UP, DOWN, True), (DRAINING, DOWN, "old", (Hidden(DOWN, DRAINING),))),
    ((DISABLED, None, UP, True), (DISABLED, UP, "old", (Hidden(UP, DISABLED),))),
    # What an administrator (or a supervisor) says is authoritative.
    ((DRAINING, DOWN, UP, False), (UP, UP, "new", (Moved(DRAINING, UP), SlowStart(), Notify()))),
    ((UP, UP, DISABLED, False), (DISABLED, UP, "new", (Moved(UP, DISABLED), Notify()))),
    ((DISABLED, DOWN, DOWN, False), (DOWN, DOWN, "new", (Moved(DISABLED, DOWN), Notify()))),
]


@pytest.mark.parametrize("given, expected", TRANSITIONS)
def test_transitionRule(given: tuple[Any, ...], expected: tuple[Any, ...]) -> None:
    shown, health, state, isHealth = given
    after, effects = transitionRule(Shown(shown, health, "old"), state, "new", health=isHealth)
    assert (after.state, after.health, after.reason, effects) == expected


# Rise and fall ----------------------------------------------------------------------

RISE_FALL = upstream(health_path="/healthz", rise=2, fall=3)


def result(ok: bool, detail: str = "") -> CheckResult:
    return CheckResult(ok, 0.0, detail or ("200" if ok else "connection refused"))


CHECKS = [
    # (shown, health, run, ok) -> (run, effects)
    ((UNKNOWN, UNKNOWN, CheckRun(), True), (CheckRun(1, 0), (Verdict(UP, "first check passed: 200"),))),
    ((UNKNOWN, None, CheckRun(), False),
     (CheckRun(0, 1), (Verdict(DOWN, "first check failed: connection refused"),))),
    ((UP, UP, CheckRun(5, 0), False),
     (CheckRun(0, 1), (CheckFailedWhileUp(1, 3, "connection refused"),))),
    ((UP, UP, CheckRun(0, 1), False),
     (CheckRun(0, 2), (CheckFailedWhileUp(2, 3, "connection refused"),))),
    ((UP, UP, CheckRun(0, 2), False),
     (CheckRun(0, 3), (Verdict(DOWN, "3 failed checks in a row: connection refused"),))),
    ((UP, UP, CheckRun(0, 2), True), (CheckRun(1, 0), ())),
    ((DOWN, DOWN, CheckRun(0, 4), True), (CheckRun(1, 0), ())),
    ((DOWN, DOWN, CheckRun(1, 0), True), (CheckRun(2, 0), (Verdict(UP, "2 passing checks in a row: 200"),))),
    ((DOWN, DOWN, CheckRun(0, 4), False), (CheckRun(0, 5), ())),
    # An administrative state hides the verdict, and the failing check of a
    # backend that does not show up is not logged.
    ((DRAINING, UP, CheckRun(0, 2), False),
     (CheckRun(0, 3), (Verdict(DOWN, "3 failed checks in a row: connection refused"),))),
    ((DISABLED, UP, CheckRun(), False), (CheckRun(0, 1), ())),
]


@pytest.mark.parametrize("given, expected", CHECKS)
def test_judgeCheck(given: tuple[Any, ...], expected: tuple[Any, ...]) -> None:
    shown, health, run, ok = given
    assert judgeCheck(Shown(shown, health, ""), run, result(ok), RISE_FALL) == expected


def test_judgeCheckWithoutAVerdictYetStartsFromTheInitialState() -> None:
    startsUp = upstream(health_path="/healthz", health_initial="up", fall=1)
    assert judgeCheck(Shown(UP, None, ""), CheckRun(), result(False, "timeout"), startsUp) == (
        CheckRun(0, 1), (Verdict(DOWN, "1 failed check in a row: timeout"),),
    )


def test_theWorkedExampleOfTheModule() -> None:
    shown = Shown(UP, UP, "")
    run = CheckRun()
    said = []
    for ok in (False, False, False, True, True):
        run, effects = judgeCheck(shown, run, result(ok), RISE_FALL)
        for effect in effects:
            said.append(effect)
            if isinstance(effect, Verdict):
                shown = transitionRule(shown, effect.state, effect.reason, health=True)[0]
    assert said == [
        CheckFailedWhileUp(1, 3, "connection refused"),
        CheckFailedWhileUp(2, 3, "connection refused"),
        Verdict(DOWN, "3 failed checks in a row: connection refused"),
        Verdict(UP, "2 passing checks in a row: 200"),
    ]
    assert shown.state is UP


# Passive ejection ---------------------------------------------------------------------

PASSIVE = upstream(max_fails=3, fail_window=10.0, eject_time=30.0, eject_max_time=200.0)

FAILURES = [
    # (state, shown, others available, now) -> (state, effects)
    ((EjectionState(), UP, True, 100.0), (EjectionState(failures=(100.0,)), ())),
    ((EjectionState(failures=(95.0,)), UNKNOWN, True, 100.0), (EjectionState(failures=(95.0, 100.0)), ())),
    # The first failure left the window (10s).
    ((EjectionState(failures=(89.0, 95.0)), UP, True, 100.0), (EjectionState(failures=(95.0, 100.0)), ())),
    ((EjectionState(failures=(90.0, 95.0)), UP, True, 100.0), (EjectionState(failures=(95.0, 100.0)), ())),
    ((EjectionState(failures=(91.0, 95.0)), UP, True, 100.0),
     (EjectionState(until=130.0, lastLength=30.0), (Ejected(30.0, 130.0, 3, 10.0, "reset"),))),
    # The last backend that could take traffic is kept.
    ((EjectionState(failures=(91.0, 95.0)), UP, False, 100.0),
     (EjectionState(), (KeptLastAvailable(3, 10.0, "reset"),))),
    # Not judged: ejected already, or taking no new requests.
    ((EjectionState(failures=(99.0,), until=120.0), UP, True, 100.0),
     (EjectionState(failures=(99.0,), until=120.0), ())),
    ((EjectionState(), DOWN, True, 100.0), (EjectionState(), ())),
    ((EjectionState(), DRAINING, True, 100.0), (EjectionState(), ())),
    # Ejected again soon after the last one (back for 5s < 30s): doubled.
    ((EjectionState(failures=(98.0, 99.0), lastEnd=95.0, lastLength=30.0), UP, True, 100.0),
     (EjectionState(until=160.0, streak=1, lastEnd=95.0, lastLength=60.0), (Ejected(60.0, 160.0, 3, 10.0, "reset"),))),
    # ... up to the cap ...
    ((EjectionState(failures=(98.0, 99.0), streak=3, lastEnd=95.0, lastLength=200.0), UP, True, 100.0),
     (EjectionState(until=300.0, streak=4, lastEnd=95.0, lastLength=200.0),
      (Ejected(200.0, 300.0, 3, 10.0, "reset"),))),
    # ... and back to eject_time after a healthy period as long as the last.
    ((EjectionState(failures=(98.0, 99.0), streak=3, lastEnd=60.0, lastLength=30.0), UP, True, 100.0),
     (EjectionState(until=130.0, streak=0, lastEnd=60.0, lastLength=30.0), (Ejected(30.0, 130.0, 3, 10.0, "reset"),))),
]


@pytest.mark.parametrize("given, expected", FAILURES)
def test_judgeFailure(given: tuple[Any, ...], expected: tuple[Any, ...]) -> None:
    state, shown, others, now = given
    assert judgeFailure(state, shown, others, "reset", PASSIVE, now) == expected


def test_passiveHealthOff() -> None:
    off = upstream(max_fails=0)
    assert judgeFailure(EjectionState(), UP, True, "reset", off, 1.0) == (EjectionState(), ())


def test_doublingSequence() -> None:
    """Failing again one second after each return: 30, 60, 120, then the cap."""
    state, now, lengths = EjectionState(), 0.0, []
    for _ in range(5):
        for _ in range(3):
            state, effects = judgeFailure(state, UP, True, "reset", PASSIVE, now)
        [ejected] = effects
        assert isinstance(ejected, Ejected)
        lengths.append(ejected.length)
        now = ejected.until
        state, _ = ejectionEnded(state, now)
        now += 1
    assert lengths == [30.0, 60.0, 120.0, 200.0, 200.0]


def test_ejectionEnded() -> None:
    ejected = EjectionState(until=130.0, streak=1, lastLength=30.0)
    assert ejectionEnded(ejected, 130.0) == (
        EjectionState(streak=1, lastEnd=130.0, lastLength=30.0),
        (SlowStart(), EjectionOver(30.0, None)),
    )
    assert ejectionEnded(ejected, 110.0, "1 passing check in a row: 200")[1] == (
        SlowStart(), EjectionOver(30.0, "1 passing check in a row: 200"),
    )
    assert ejectionEnded(EjectionState(), 110.0) == (EjectionState(), ())
