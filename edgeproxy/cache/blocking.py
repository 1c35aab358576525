# -*- test-case-name: tests.test_cache_disk,tests.test_cache_kind -*-
"""
Where the disk tier runs what blocks (C{fsync}, renames, unlinking many
files, the start-up check): L{Blocking}, run in the reactor's thread pool
(L{ThreadBlocking}) or at once in the caller's thread (L{InlineBlocking}:
tests, the memory reactor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed

__all__ = ["Blocking", "InlineBlocking", "ThreadBlocking"]


class Blocking(Protocol):
    """Runs what blocks away from the reactor's thread."""

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]: ...


class InlineBlocking:
    """Runs it at once, in the caller's thread (tests; the memory reactor)."""

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        try:
            return succeed(function(*args))
        except Exception as e:
            failed: Deferred[Any] = Deferred()
            failed.errback(e)
            return failed


class ThreadBlocking:
    """Runs it in the reactor's thread pool."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), function, *args)

