"""
Tests for L{edgeproxy.cache.diskrecover} with a crash between the index
letting go of an object and its file being unlinked: a purged, removed,
replaced or evicted response must never come back at the next start (the
start-up check enters complete files the index does not name, so the
index records the doomed files in the transaction that drops their rows).

The crash is simulated: the disk tier's thread pool holds its work
(L{HeldBlocking}), and the process "dies" with that work never done.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from edgeproxy.cache.blocking import InlineBlocking
from edgeproxy.cache.disk import DiskTier
from edgeproxy.cache.diskrecover import recoverDirectory
from edgeproxy.cache.entry import Entry, Variants
from edgeproxy.cache.stores import expired
from tests.test_cache_disk import head

BODY = b"the response body"


class HeldBlocking:
    """A thread pool whose work waits until L{runAll}: what it still holds
    when the test drops it is work a crash lost."""

    def __init__(self) -> None:
        self.work: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.work.append((function, args, done))
        return done

    def runAll(self) -> None:
        while self.work:
            function, args, done = self.work.pop(0)
            done.callback(function(*args))


def stored(disk: DiskTier, blocking: HeldBlocking, key: bytes) -> Entry:
    """Store an object under C{key} (its file a day old, past the check's
    orphan age) and let the pool finish all it was given."""
    writer = disk.writer(head(key))
    assert writer is not None
    writer.write(BODY)
    results: list[Entry | None] = []
    writer.finish(head(key)).addCallback(results.append)
    blocking.runAll()
    [entry] = results
    assert entry is not None and entry.path is not None
    old = time.time() - 86400
    os.utime(entry.path, (old, old))
    return entry


def restart(path: Path) -> DiskTier:
    """A new process's tier on the directory, its start-up check done."""
    return DiskTier(str(path), 10**8, 10**7, Clock(), InlineBlocking())


def purge(disk: DiskTier) -> None:
    disk.purge(disk.keysForURL(b"https://a/x"), soft=False, expire=expired)


def remove(disk: DiskTier) -> None:
    disk.remove(b"https://a/x")


def evict(disk: DiskTier) -> None:
    # The tier shrinks under what it holds: entering anything (a marker
    # here, evicted too) evicts.
    disk.capacity = 1
    disk.unlink(disk.insert(Variants(b"https://a/m", b"https://a/m", (b"accept",)), None, 0, 0))


@pytest.mark.parametrize("letGo", [purge, remove, evict])
def test_whatTheIndexLetGoOfDoesNotComeBack(tmp_path: Path, letGo: Callable[[DiskTier], None]) -> None:
    blocking = HeldBlocking()
    disk = DiskTier(str(tmp_path), 10**8, 10**7, Clock(), blocking, recover=False)
    entry = stored(disk, blocking, b"https://a/x")
    letGo(disk)
    assert disk.get(b"https://a/x") is None
    # The crash: the unlinking queued for the thread pool never runs.
    assert blocking.work
    disk.close()
    again = restart(tmp_path)
    assert again.get(b"https://a/x") is None
    assert not os.path.exists(entry.path)  # type: ignore[arg-type]
    assert again.totals()[1] == 0


def test_replacedObjectDoesNotComeBack(tmp_path: Path) -> None:
    blocking = HeldBlocking()
    disk = DiskTier(str(tmp_path), 10**8, 10**7, Clock(), blocking, recover=False)
    first = stored(disk, blocking, b"https://a/x")
    writer = disk.writer(head(b"https://a/x"))
    assert writer is not None
    writer.write(b"the new body")
    writer.finish(head(b"https://a/x"))
    # The new object is committed; the crash comes before the old file goes.
    function, args, done = blocking.work.pop(0)
    done.callback(function(*args))
    assert blocking.work
    disk.close()
    os.utime(first.path, (0, 0))  # type: ignore[arg-type]
    again = restart(tmp_path)
    found = again.get(b"https://a/x")
    assert isinstance(found, Entry) and again.readBody(found) == b"the new body"
    assert not os.path.exists(first.path)  # type: ignore[arg-type]
    assert again.totals()[1] == 1


def test_doomedNamesClearedOnceUnlinked(tmp_path: Path) -> None:
    blocking = HeldBlocking()
    disk = DiskTier(str(tmp_path), 10**8, 10**7, Clock(), blocking, recover=False)
    entry = stored(disk, blocking, b"https://a/x")
    purge(disk)
    blocking.runAll()
    assert not os.path.exists(entry.path)  # type: ignore[arg-type]
    disk.close()
    assert recoverDirectory(str(tmp_path))["doomed"] == 0


def test_recoveryCountsTheDoomed(tmp_path: Path) -> None:
    blocking = HeldBlocking()
    disk = DiskTier(str(tmp_path), 10**8, 10**7, Clock(), blocking, recover=False)
    stored(disk, blocking, b"https://a/x")
    stored(disk, blocking, b"https://a/y")
    disk.purge(disk.keysForPrefix(b"https://a/"), soft=False, expire=expired)
    disk.close()
    assert recoverDirectory(str(tmp_path)) == {"temporary": 0, "doomed": 2, "missing": 0, "entered": 0, "removed": 0}
