# -*- test-case-name: tests.test_cache_collapse -*-
"""
L{CollapseTable}: concurrent misses for one key wait for one fetch.

The first request that misses a key leads: it fetches, and the others
that miss the same key meanwhile wait for it (each at most C{timeout}
seconds, then it fetches on its own).  When the leader's response is
stored, the waiters are told L{STORED} and look the key up again (a hit);
when it turns out not storable (or is cut short), they are told
L{ALONE} and each fetches on its own.

With a disk tier shared by worker processes, leading is also a lock on the
key's slot in the tier's C{locks} file (L{edgeproxy.cache.disk.DiskTier.tryLock}):
a process whose first miss finds the lock taken waits as the others do,
and looks again (L{RETRY}) when the other process released it, having
stored the response on disk (or given up, and then this process leads).
The kernel releases the lock of a process that dies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ALONE", "POLL_INTERVAL", "RETRY", "STORED", "CollapseTable"]

STORED = "stored"
"""The leader's response is stored: look it up."""
ALONE = "alone"
"""Fetch on your own (not storable, cut short, or waited too long)."""
RETRY = "retry"
"""Another process's fetch is over: look up, and lead if still missing."""

POLL_INTERVAL = 0.02
"""Seconds between attempts at another process's key lock."""

Waiter = Callable[[str], None]


class Fetch:
    """One fetch in flight: the leader's handle (L{CollapseTable.done})."""

    __slots__ = ("expiry", "key", "locked", "poll", "waiters")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.waiters: list[list[Any]] = []
        self.locked = False
        self.poll: Any = None
        self.expiry: Any = None


class CollapseTable:
    """
    @ivar timeout: seconds a waiter waits at most.
    """

    def __init__(self, clock: Any, timeout: float, disk: Any = None) -> None:
        self._clock = clock
        self.timeout = timeout
        self._disk = disk
        self._fetches: dict[bytes, Fetch] = {}

    def __len__(self) -> int:
        return len(self._fetches)

    def busy(self, key: bytes) -> bool:
        """Whether a fetch of C{key} is in flight (here)."""
        return key in self._fetches

    def lead(self, key: bytes) -> Fetch | None:
        """
        Lead the fetch of C{key} if nobody does: its handle, to give to
        L{done} when it is over.  L{None}: someone does (here, or in
        another process); then the caller L{wait}s.

        A leader not heard from within C{timeout} is given up (its waiters
        fetch on their own, its key may be led again).
        """
        if key in self._fetches:
            return None
        fetch = Fetch(key)
        self._fetches[key] = fetch
        disk = self._disk
        if disk is not None:
            try:
                locked = disk.tryLock(key)
            except OSError:
                locked = True  # no lock file: collapse in this process only
            if not locked:
                fetch.poll = self._clock.callLater(POLL_INTERVAL, self._pollRemote, fetch)
                return None
            fetch.locked = True
        fetch.expiry = self._clock.callLater(self.timeout, self.done, key, False, fetch)
        return fetch

    def wait(self, key: bytes, waiter: Waiter, deadline: float | None = None) -> Callable[[], None]:
        """
        Wait for the fetch of C{key}: C{waiter(outcome)} is called once,
        with L{STORED}, L{ALONE} or L{RETRY}.

        @param deadline: when to give up (L{ALONE}); default C{timeout}
            from now.
        @return: cancels the wait (the client went away).
        """
        fetch = self._fetches.get(key)
        if fetch is None:
            waiter(RETRY)
            return lambda: None
        now = self._clock.seconds()
        delay = max(0.0, (deadline if deadline is not None else now + self.timeout) - now)
        slot: list[Any] = [waiter, None]
        slot[1] = self._clock.callLater(delay, self._expired, fetch, slot)
        fetch.waiters.append(slot)

        def cancel() -> None:
            if slot in fetch.waiters:
                fetch.waiters.remove(slot)
                if slot[1].active():
                    slot[1].cancel()

        return cancel

    def done(self, key: bytes, stored: bool, handle: Fetch | None = None) -> None:
        """
        The leader's fetch of C{key} is over (its response stored or not).

        @param handle: what L{lead} gave (a fetch given up meanwhile, whose
            key another leads now, is left alone).
        """
        fetch = self._fetches.get(key)
        if fetch is None or (handle is not None and fetch is not handle):
            return
        del self._fetches[key]
        if fetch.expiry is not None and fetch.expiry.active():
            fetch.expiry.cancel()
        if fetch.locked:
            fetch.locked = False
            self._disk.unlock(key)
        self._wake(fetch, STORED if stored else ALONE)

    def _wake(self, fetch: Fetch, outcome: str) -> None:
        waiters, fetch.waiters = fetch.waiters, []
        for waiter, timer in waiters:
            if timer.active():
                timer.cancel()
        for waiter, _ in waiters:
            waiter(outcome)

    def _expired(self, fetch: Fetch, slot: list[Any]) -> None:
        if slot in fetch.waiters:
            fetch.waiters.remove(slot)
            slot[0](ALONE)
        if not fetch.waiters and fetch.poll is not None and self._fetches.get(fetch.key) is fetch:
            # Nobody waits on the other process any more.
            self._stopPolling(fetch)

    def _pollRemote(self, fetch: Fetch) -> None:
        fetch.poll = None
        if self._fetches.get(fetch.key) is not fetch:
            return
        try:
            free = self._disk.tryLock(fetch.key)
        except OSError:
            free = True
        if not free:
            if fetch.waiters:
                fetch.poll = self._clock.callLater(POLL_INTERVAL, self._pollRemote, fetch)
            else:
                del self._fetches[fetch.key]
            return
        # The other process is done: this one looks again (and leads anew
        # if it must).
        self._disk.unlock(fetch.key)
        del self._fetches[fetch.key]
        self._wake(fetch, RETRY)

    def _stopPolling(self, fetch: Fetch) -> None:
        if fetch.poll is not None and fetch.poll.active():
            fetch.poll.cancel()
        fetch.poll = None
        del self._fetches[fetch.key]
