# -*- test-case-name: tests.test_retry -*-
"""
Whether a failed attempt to a backend may be tried again, and how many
retries an upstream can afford: the pure part of retrying.

L{decide} is the safety rule of C{retries} in C{docs/configuration.rst}: a
request is tried again on another backend only when that cannot make the
backend act on it twice, or act on half of it.  L{RetryBudget} keeps a
failing fleet from being hit twice as hard (C{retry_budget}).  Executing a
retry (picking the other backend, replaying the body, logging, metrics) is
L{edgeproxy.upstream.pool}'s business.

This module is pure: no Twisted, the clock is a callable injected by the
caller.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "BUDGET_FLOOR",
    "BUDGET_WINDOW",
    "IDEMPOTENT_METHODS",
    "Attempt",
    "Decision",
    "RetryBudget",
    "decide",
]

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""RFC 9110 §9.2.2: a request with one of these methods can be sent again
after a failure without a different effect on the server."""

BUDGET_WINDOW = 10
"""Seconds of requests the C{retry_budget} fraction applies to."""

BUDGET_FLOOR = 3
"""Retries per second allowed on top of the fraction, so that a quiet
upstream (a few requests per minute) can still retry at all."""


class Attempt(enum.Enum):
    """
    How far a failed attempt got, which is all the safety rule needs to
    know about the failure.
    """

    NOT_SENT = "not_sent"
    """Nothing of the request reached the backend: the connection was
    refused or timed out, the TLS handshake failed, or the client library
    never wrote the request."""

    NO_RESPONSE = "no_response"
    """(Part of) the request may have reached the backend, and no byte of a
    response came back: reset, closed, or no response head in time."""

    RESPONSE_STARTED = "response_started"
    """Some of a response arrived before the failure (a broken head, or the
    connection lost in the middle of it)."""

    LOCAL = "local"
    """The failure is ours or the client's, not the backend's: the client
    went away, its body failed or grew over the limit."""


class Decision(NamedTuple):
    """The answer of L{decide}: C{retry}, and why (for the log)."""

    retry: bool
    why: str


def decide(
    method: bytes,
    attempt: Attempt,
    bodyReplayable: bool,
    retriesDone: int,
    retries: int,
) -> Decision:
    """
    Whether a request whose last attempt failed may be sent again, on the
    rules C{docs/configuration.rst} gives for C{retries}.

    @param method: the request method.
    @param attempt: how far the failed attempt got.
    @param bodyReplayable: whether the request has no body, or one that can
        still be sent again from its first byte.
    @param retriesDone: retries already made for this request.
    @param retries: the upstream's C{retries}.
    @return: the decision; the retry budget is asked afterwards, by the
        caller, only when this says yes.
    """
    if attempt is Attempt.LOCAL:
        return Decision(False, "the failure was not the backend's")
    if attempt is Attempt.RESPONSE_STARTED:
        # The backend answered (in part): it has acted on the request, and a
        # second answer could not be stitched to the first.
        return Decision(False, "the response had started")
    if retriesDone >= retries:
        return Decision(False, f"no retries left ({retries} allowed)")
    if attempt is Attempt.NO_RESPONSE and method not in IDEMPOTENT_METHODS:
        # RFC 9110 §9.2.2: the backend may have acted on it; only an
        # idempotent request may be repeated without asking the user.
        return Decision(False, f"{method.decode('ascii', 'replace')} is not idempotent")
    if not bodyReplayable:
        return Decision(False, "the request body cannot be sent again")
    return Decision(True, "safe to retry")


class RetryBudget:
    """
    The retry budget of one upstream: retries may add at most C{ratio} of
    the requests of the last L{BUDGET_WINDOW} seconds, plus L{BUDGET_FLOOR}
    retries per second.

    Requests and retries are counted in one-second slots; the window is the
    current slot and the L{BUDGET_WINDOW} - 1 before it, so a request counts
    for between 9 and 10 seconds.  A retry is charged to the per-second
    floor first and, when that is spent for the current second, to the
    fraction.  Over any window the retries therefore stay below
    C{ratio} x requests + L{BUDGET_FLOOR} x L{BUDGET_WINDOW}.

    @ivar ratio: the C{retry_budget} fraction (0.2 for 20%).
    """

    def __init__(self, clock: Callable[[], float], ratio: float) -> None:
        """
        @param clock: the current time in seconds (C{reactor.seconds}).
        @param ratio: see L{ratio}.
        """
        self._clock = clock
        self.ratio = ratio
        self._slot = int(clock())
        # Per one-second slot, oldest first: requests seen, and retries
        # charged to the fraction; the last slot is the current second.
        self._requests = [0] * BUDGET_WINDOW
        self._charged = [0] * BUDGET_WINDOW
        self._floorSlot = self._slot
        self._floorUsed = 0

    def _advance(self) -> int:
        """Move the window to the current second; return its index."""
        now = int(self._clock())
        gap = now - self._slot
        if gap > 0:
            if gap >= BUDGET_WINDOW:
                self._requests = [0] * BUDGET_WINDOW
                self._charged = [0] * BUDGET_WINDOW
            else:
                self._requests = self._requests[gap:] + [0] * gap
                self._charged = self._charged[gap:] + [0] * gap
            self._slot = now
        return BUDGET_WINDOW - 1

    def requestStarted(self) -> None:
        """A client request to the upstream started (not a retry of one)."""
        if int(self._clock()) <= self._slot:
            # Still the current second (most calls): nothing to shift.
            self._requests[-1] += 1
            return
        # _advance first: it may replace the list being indexed.
        current = self._advance()
        self._requests[current] += 1

    def tryRetry(self) -> bool:
        """
        Ask for one retry now.

        @return: whether it is within the budget; when it is, it has been
            counted.
        """
        current = self._advance()
        if self._floorSlot != self._slot:
            self._floorSlot = self._slot
            self._floorUsed = 0
        if self._floorUsed < BUDGET_FLOOR:
            self._floorUsed += 1
            return True
        if sum(self._charged) + 1 <= self.ratio * sum(self._requests):
            self._charged[current] += 1
            return True
        return False
