"""
Tests for L{edgeproxy.upstream.retry}: the retry safety rule as a decision
table, and the retry budget driven by a fake clock.
"""

from __future__ import annotations

import pytest

from edgeproxy.upstream.retry import (
    BUDGET_FLOOR,
    BUDGET_WINDOW,
    Attempt,
    RetryBudget,
    decide,
)

NOT_SENT = Attempt.NOT_SENT
NO_RESPONSE = Attempt.NO_RESPONSE
STARTED = Attempt.RESPONSE_STARTED
LOCAL = Attempt.LOCAL


@pytest.mark.parametrize(
    "method, attempt, replayable, done, retries, expected",
    [
        # Nothing reached the backend: any method, if the body can be resent.
        (b"POST", NOT_SENT, True, 0, 2, True),
        (b"PATCH", NOT_SENT, True, 1, 2, True),
        (b"GET", NOT_SENT, True, 0, 2, True),
        (b"POST", NOT_SENT, False, 0, 2, False),
        # No response byte: only idempotent methods (RFC 9110 §9.2.2).
        (b"GET", NO_RESPONSE, True, 0, 2, True),
        (b"HEAD", NO_RESPONSE, True, 0, 2, True),
        (b"OPTIONS", NO_RESPONSE, True, 0, 2, True),
        (b"TRACE", NO_RESPONSE, True, 0, 2, True),
        (b"PUT", NO_RESPONSE, True, 0, 2, True),
        (b"DELETE", NO_RESPONSE, True, 0, 2, True),
        (b"POST", NO_RESPONSE, True, 0, 2, False),
        (b"PATCH", NO_RESPONSE, True, 0, 2, False),
        (b"CONNECT", NO_RESPONSE, True, 0, 2, False),
        (b"get", NO_RESPONSE, True, 0, 2, False),  # methods are case-sensitive
        # An idempotent request whose streamed body cannot be replayed.
        (b"PUT", NO_RESPONSE, False, 0, 2, False),
        # Never once the response started, never for our own failures.
        (b"GET", STARTED, True, 0, 2, False),
        (b"GET", LOCAL, True, 0, 2, False),
        (b"POST", LOCAL, True, 0, 2, False),
        # Bounded by retries.
        (b"GET", NOT_SENT, True, 2, 2, False),
        (b"GET", NO_RESPONSE, True, 1, 2, True),
        (b"GET", NOT_SENT, True, 0, 0, False),
    ],
)
def test_decisionTable(
    method: bytes, attempt: Attempt, replayable: bool, done: int, retries: int, expected: bool
) -> None:
    decision = decide(method, attempt, replayable, done, retries)
    assert decision.retry is expected
    assert decision.why


def test_decisionSaysWhy() -> None:
    assert "not idempotent" in decide(b"POST", NO_RESPONSE, True, 0, 2).why
    assert "response had started" in decide(b"GET", STARTED, True, 0, 2).why
    assert "2 allowed" in decide(b"GET", NOT_SENT, True, 2, 2).why
    assert "body" in decide(b"PUT", NO_RESPONSE, False, 0, 2).why


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spend(budget: RetryBudget) -> int:
    granted = 0
    while budget.tryRetry():
        granted += 1
        assert granted < 10_000
    return granted


def test_floorForAQuietUpstream() -> None:
    clock = Clock()
    budget = RetryBudget(clock, 0.2)
    # No requests at all: only the floor, 3 per second.
    assert spend(budget) == BUDGET_FLOOR
    clock.now += 0.5
    assert not budget.tryRetry()  # same second
    clock.now += 0.5
    assert spend(budget) == BUDGET_FLOOR


def test_fractionOfRecentRequests() -> None:
    clock = Clock()
    budget = RetryBudget(clock, 0.2)
    for _ in range(100):
        budget.requestStarted()
    # 20% of 100, plus this second's floor.
    assert spend(budget) == 20 + BUDGET_FLOOR


def test_zeroBudgetLeavesTheFloor() -> None:
    clock = Clock()
    budget = RetryBudget(clock, 0.0)
    for _ in range(1000):
        budget.requestStarted()
    assert spend(budget) == BUDGET_FLOOR


def test_requestsAgeOutOfTheWindow() -> None:
    clock = Clock()
    budget = RetryBudget(clock, 0.5)
    for _ in range(40):
        budget.requestStarted()
    clock.now += BUDGET_WINDOW - 1  # still in the window
    assert spend(budget) == 20 + BUDGET_FLOOR
    clock.now += 1  # the requests (and the retries charged) have aged out
    assert spend(budget) == BUDGET_FLOOR


def test_chargedRetriesAgeOutWithTheirSecond() -> None:
    clock = Clock()
    budget = RetryBudget(clock, 0.1)
    for _ in range(100):
        budget.requestStarted()
    assert spend(budget) == 10 + BUDGET_FLOOR
    clock.now += 5
    for _ in range(100):
        budget.requestStarted()
    # 200 requests in the window, 10 retries already charged.
    assert spend(budget) == 10 + BUDGET_FLOOR
    clock.now += 5
    # The first 100 requests and their 10 retries left the window.
    assert spend(budget) == 0 + BUDGET_FLOOR


def test_failingFleetIsNotHitTwiceAsHard() -> None:
    # Every request fails and asks for a retry: over a minute of steady
    # traffic the extra load stays near the budget, not 100%.
    clock = Clock()
    budget = RetryBudget(clock, 0.2)
    requests = retries = 0
    for tick in range(600):  # 100 requests/s for 60 s
        for _ in range(10):
            budget.requestStarted()
            requests += 1
            if budget.tryRetry():
                retries += 1
        clock.now += 0.1
    assert retries <= 0.2 * requests + BUDGET_FLOOR * 60
    assert retries >= 0.2 * requests * 0.9


def test_clockGoingBackwardsIsHarmless() -> None:
    clock = Clock()
    budget = RetryBudget(clock, 0.2)
    budget.requestStarted()
    clock.now -= 100
    budget.requestStarted()
    assert spend(budget) == BUDGET_FLOOR
