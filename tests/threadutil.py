"""
A stand-in for the reactor's thread pool in tests: work handed to a thread
waits until the test lets it run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred


class HeldCalls:
    """
    A C{runInThread} that runs nothing until told: each call waits in
    L{calls}, as it would for a slow storage directory, until L{release}
    or L{releaseHeld}.

    @ivar calls: the calls held: (function, arguments, the Deferred the
        caller got).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *a: Any) -> Deferred[Any]:
        result: Deferred[Any] = Deferred()
        self.calls.append((f, a, result))
        return result

    def release(self, keep: int | None = None) -> None:
        """
        Run the calls held, and those they lead to, in order.

        @param keep: the index of one call held now to hold on.
        """
        kept = None if keep is None else self.calls.pop(keep)
        while self.calls:
            f, a, result = self.calls.pop(0)
            maybeDeferred(f, *a).chainDeferred(result)
        if kept is not None:
            self.calls.append(kept)

    def releaseHeld(self) -> None:
        """Run the calls held now, in order; those they lead to are held."""
        calls, self.calls = self.calls, []
        for f, a, result in calls:
            maybeDeferred(f, *a).chainDeferred(result)
