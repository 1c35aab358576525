"""
Tests for L{edgeproxy.cache.collapse}: one leader per key, waiters told
how it ended, bounded waits, and the lock of another process.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from edgeproxy.cache.collapse import ALONE, POLL_INTERVAL, RETRY, STORED, CollapseTable


class Locks:
    """Stands in for the disk tier's key locks held by other processes."""

    def __init__(self) -> None:
        self.others: set[bytes] = set()
        self.mine: set[bytes] = set()

    def tryLock(self, key: bytes) -> bool:
        if key in self.others:
            return False
        self.mine.add(key)
        return True

    def unlock(self, key: bytes) -> None:
        self.mine.discard(key)


def test_oneLeaderTheOthersWait() -> None:
    clock = Clock()
    table = CollapseTable(clock, timeout=10.0)
    outcomes: list[str] = []
    assert table.lead(b"k")
    assert not table.lead(b"k")
    table.wait(b"k", outcomes.append)
    table.wait(b"k", outcomes.append)
    assert table.lead(b"other")
    table.done(b"k", stored=True)
    assert outcomes == [STORED, STORED]
    assert table.lead(b"k")


def test_notStoredSendsEachAlone() -> None:
    table = CollapseTable(Clock(), timeout=10.0)
    outcomes: list[str] = []
    table.lead(b"k")
    table.wait(b"k", outcomes.append)
    table.done(b"k", stored=False)
    assert outcomes == [ALONE]


def test_waitIsBounded() -> None:
    clock = Clock()
    table = CollapseTable(clock, timeout=10.0)
    outcomes: list[str] = []
    table.lead(b"k")
    table.wait(b"k", outcomes.append)
    clock.advance(9.9)
    assert outcomes == []
    clock.advance(0.2)
    assert outcomes == [ALONE]
    table.done(b"k", stored=True)
    assert outcomes == [ALONE]


def test_aLeaderNeverHeardFromIsForgotten() -> None:
    """A fetch abandoned without a word does not hold its key for ever."""
    clock = Clock()
    table = CollapseTable(clock, timeout=10.0)
    table.lead(b"k")
    clock.advance(10.1)
    assert table.lead(b"k")


def test_cancelledWaiterIsNotCalled() -> None:
    clock = Clock()
    table = CollapseTable(clock, timeout=10.0)
    outcomes: list[str] = []
    table.lead(b"k")
    cancel = table.wait(b"k", outcomes.append)
    cancel()
    table.done(b"k", stored=True)
    clock.advance(20)
    assert outcomes == [] and not clock.getDelayedCalls()


def test_anotherProcessLeads() -> None:
    clock = Clock()
    locks = Locks()
    locks.others.add(b"k")
    table = CollapseTable(clock, timeout=10.0, disk=locks)
    outcomes: list[str] = []
    assert not table.lead(b"k")
    table.wait(b"k", outcomes.append)
    assert not table.lead(b"k")
    table.wait(b"k", outcomes.append)
    clock.advance(POLL_INTERVAL)
    assert outcomes == []
    locks.others.discard(b"k")
    clock.advance(POLL_INTERVAL)
    # Everyone looks again (the other process stored it, or not).
    assert outcomes == [RETRY, RETRY]
    assert b"k" not in locks.mine


def test_leaderHoldsTheProcessLockUntilDone() -> None:
    locks = Locks()
    table = CollapseTable(Clock(), timeout=10.0, disk=locks)
    assert table.lead(b"k")
    assert b"k" in locks.mine
    table.done(b"k", stored=True)
    assert b"k" not in locks.mine
