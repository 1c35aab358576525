"""
Tests for L{edgeproxy.cache.disk}: the disk tier in a real directory:
objects stored and found again by another instance (a restart), least
recently used evicted under C{disk_size}, crash safety (a writer killed
halfway, a crash between rename and index, a file gone, a damaged
index), purges, and the key locks other processes see.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet.task import Clock

from edgeproxy.cache.blocking import InlineBlocking
from edgeproxy.cache.disk import DiskTier
from edgeproxy.cache.diskrecover import recoverDirectory
from edgeproxy.cache.entry import Entry, Variants, decodeMeta
from edgeproxy.cache.freshness import Policy
from edgeproxy.cache.stores import expired
from edgeproxy.h1.fields import Fields

REPO = Path(__file__).resolve().parent.parent


def head(key: bytes, url: bytes | None = None, tags: tuple[bytes, ...] = ()) -> Entry:
    return Entry(
        key=key, url=url or key, status=200, reason=b"OK",
        fields=Fields([(b"content-type", b"text/plain"), (b"etag", b'"1"')]), length=-1,
        responseTime=1000.0, initialAge=2.0, policy=Policy(60.0, staleIfError=30.0), tags=tags,
    )


def tier(path: Path, capacity: int = 10**8, clock: Clock | None = None, maxObject: int = 10**7) -> DiskTier:
    return DiskTier(str(path), capacity, maxObject, clock or Clock(), InlineBlocking())


def store(disk: DiskTier, key: bytes, body: bytes, **kw: object) -> Entry:
    writer = disk.writer(head(key, **kw))  # type: ignore[arg-type]
    assert writer is not None
    for start in range(0, len(body), 7):
        assert writer.write(body[start : start + 7])
    results: list[Entry | None] = []
    writer.finish(head(key, **kw)).addCallback(results.append)  # type: ignore[arg-type]
    [stored] = results
    assert stored is not None
    return stored


def test_storedAndFoundAfterARestart(tmp_path: Path) -> None:
    disk = tier(tmp_path)
    stored = store(disk, b"https://a/x", b"hello world", tags=(b"t",))
    assert stored.length == 11 and stored.path is not None
    disk.close()
    again = tier(tmp_path)
    found = again.get(b"https://a/x")
    assert isinstance(found, Entry)
    assert found.fields == head(b"").fields and found.policy == Policy(60.0, staleIfError=30.0)
    assert found.initialAge == 2.0 and found.tags == (b"t",) and found.length == 11
    assert again.readBody(found) == b"hello world"
    assert again.totals()[1] == 1
    assert os.listdir(tmp_path / "tmp") == []


def test_variantsMarker(tmp_path: Path) -> None:
    disk = tier(tmp_path)
    marker = Variants(b"https://a/x", b"https://a/x", (b"accept", b"accept-encoding"), (b"accept-encoding",))
    disk.insert(marker, None, 0, 0)
    assert disk.get(b"https://a/x") == marker
    assert tier(tmp_path).get(b"https://a/x") == marker


def test_variantsMarkerOfAnEarlierVersion() -> None:
    """
    A marker written before markers said which fields are keyed on a
    stage's choice is read as all of them: its lookups then use parts
    (C{name:choice}) the entries it was written with do not have, and
    none of those is served (some hold a variant their key does not say).
    """
    earlier = b'{"v":1,"kind":"variants","key":"https://a/x","url":"https://a/x","names":["accept-encoding"]}'
    assert decodeMeta(earlier) == Variants(
        b"https://a/x", b"https://a/x", (b"accept-encoding",), (b"accept-encoding",)
    )


def test_replacingRemovesTheOldFile(tmp_path: Path) -> None:
    disk = tier(tmp_path)
    first = store(disk, b"k", b"one")
    second = store(disk, b"k", b"two!")
    assert not os.path.exists(first.path)  # type: ignore[arg-type]
    assert disk.readBody(second) == b"two!"
    assert disk.totals()[1] == 1


def test_leastRecentlyUsedEvicted(tmp_path: Path) -> None:
    clock = Clock()
    disk = tier(tmp_path, clock=clock)
    body = b"x" * 1000
    stored = {}
    for name in (b"a", b"b", b"c", b"d"):
        clock.advance(1)
        stored[name] = store(disk, name, body)
    # Room for four and a half objects (each charged its file and its row).
    disk.capacity = int(disk.totals()[0] / 4 * 4.5)
    clock.advance(1)
    assert disk.get(b"a") is not None  # used: b is now the least recent
    clock.advance(5)  # the use is written
    clock.advance(1)
    store(disk, b"e", body)
    size, _ = disk.totals()
    assert size <= disk.capacity
    assert disk.get(b"b") is None
    assert not os.path.exists(stored[b"b"].path)  # type: ignore[arg-type]
    assert disk.get(b"a") is not None and disk.get(b"e") is not None
    assert disk.counters.evicted["disk"] > 0


def test_pastMaxObjectSizeNothingIsLeft(tmp_path: Path) -> None:
    disk = tier(tmp_path, maxObject=10)
    writer = disk.writer(head(b"k"))
    assert writer is not None
    assert writer.write(b"12345")
    assert not writer.write(b"678901")
    assert os.listdir(tmp_path / "tmp") == []
    assert disk.get(b"k") is None


WRITER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from twisted.internet.task import Clock
from edgeproxy.cache.blocking import InlineBlocking
from edgeproxy.cache.disk import DiskTier
from tests.test_cache_disk import head
disk = DiskTier({path!r}, 10**8, 10**7, Clock(), InlineBlocking())
writer = disk.writer(head(b"https://a/big"))
writer.write(b"x" * 100000)
print("written", flush=True)
{end}
"""


def test_writerKilledHalfwayLeavesNothingServed(tmp_path: Path) -> None:
    """
    A process killed while it writes an object: its temporary file is
    removed at the next start, and the key is a miss (never a partial
    body).
    """
    code = WRITER.format(repo=str(REPO), path=str(tmp_path), end="os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert len(os.listdir(tmp_path / "tmp")) == 1
    disk = tier(tmp_path)
    assert os.listdir(tmp_path / "tmp") == []
    assert disk.get(b"https://a/big") is None


def test_liveWriterIsLeftAlone(tmp_path: Path) -> None:
    """The start-up check of one process never removes another's file in progress."""
    code = WRITER.format(repo=str(REPO), path=str(tmp_path), end="sys.stdin.read()")
    writer = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "written"  # type: ignore[union-attr]
        assert recoverDirectory(str(tmp_path))["temporary"] == 0
        assert len(os.listdir(tmp_path / "tmp")) == 1
    finally:
        writer.stdin.close()  # type: ignore[union-attr]
        writer.wait(30)


def test_crashBetweenRenameAndIndex(tmp_path: Path) -> None:
    """A complete object file the index does not name is entered at start."""
    disk = tier(tmp_path)
    stored = store(disk, b"https://a/x", b"complete")
    disk._db.execute("DELETE FROM objects")
    old = time.time() - 3600
    os.utime(stored.path, (old, old))  # type: ignore[arg-type]
    disk.close()
    again = tier(tmp_path)
    found = again.get(b"https://a/x")
    assert isinstance(found, Entry)
    assert again.readBody(found) == b"complete"


def test_missingFileDropsItsRow(tmp_path: Path) -> None:
    disk = tier(tmp_path)
    stored = store(disk, b"k", b"body")
    os.unlink(stored.path)  # type: ignore[arg-type]
    found = disk.get(b"k")
    assert isinstance(found, Entry)
    assert disk.readBody(found) is None
    assert disk.get(b"k") is None
    store(disk, b"j", b"body")
    os.unlink(disk.get(b"j").path)  # type: ignore[union-attr, arg-type]
    assert recoverDirectory(str(tmp_path))["missing"] == 1
    assert disk.get(b"j") is None


def test_damagedIndexIsRebuiltFromTheObjects(tmp_path: Path) -> None:
    disk = tier(tmp_path)
    stored = store(disk, b"https://a/x", b"kept", tags=(b"t",))
    disk.close()
    old = time.time() - 3600
    os.utime(stored.path, (old, old))  # type: ignore[arg-type]
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(tmp_path / "index.sqlite") + suffix):
            os.unlink(str(tmp_path / "index.sqlite") + suffix)
    (tmp_path / "index.sqlite").write_bytes(b"this is not a database" * 100)
    again = tier(tmp_path)
    found = again.get(b"https://a/x")
    assert isinstance(found, Entry) and again.readBody(found) == b"kept"
    assert again.keysForTag(b"t") == [b"https://a/x"]
    assert any(name.startswith("index.sqlite.damaged-") for name in os.listdir(tmp_path))


def test_purges(tmp_path: Path) -> None:
    disk = tier(tmp_path)
    store(disk, b"https://a/x", b"1", tags=(b"red",))
    store(disk, b"https://a/x\x01ae=br", b"2", url=b"https://a/x")
    store(disk, b"https://a/y", b"3", tags=(b"red", b"blue"))
    store(disk, b"https://b/y", b"4")
    assert sorted(disk.keysForURL(b"https://a/x")) == [b"https://a/x", b"https://a/x\x01ae=br"]
    assert sorted(disk.keysForPrefix(b"https://a/")) == [b"https://a/x", b"https://a/x\x01ae=br", b"https://a/y"]
    assert sorted(disk.keysForTag(b"red")) == [b"https://a/x", b"https://a/y"]
    assert disk.purge(disk.keysForTag(b"blue"), soft=True, expire=expired) == 1
    soft = disk.get(b"https://a/y")
    assert isinstance(soft, Entry) and soft.policy.lifetime == 0.0
    assert disk.purge(disk.keysForURL(b"https://a/x"), soft=False, expire=expired) == 2
    assert disk.get(b"https://a/x") is None
    assert disk.keysForTag(b"red") == [b"https://a/y"]
    assert disk.totals()[1] == 2


HOLDER = """
import sys
sys.path.insert(0, {repo!r})
from twisted.internet.task import Clock
from edgeproxy.cache.blocking import InlineBlocking
from edgeproxy.cache.disk import DiskTier
disk = DiskTier({path!r}, 10**8, 10**7, Clock(), InlineBlocking(), recover=False)
assert disk.tryLock(b"https://a/x")
print("locked", flush=True)
sys.stdin.read()
"""


def test_keyLocksAcrossProcesses(tmp_path: Path) -> None:
    disk = tier(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(repo=str(REPO), path=str(tmp_path))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"  # type: ignore[union-attr]
        assert not disk.tryLock(b"https://a/x")
        assert disk.tryLock(b"https://a/other")
    finally:
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(30)
    # The kernel released the lock of the process that ended.
    assert disk.tryLock(b"https://a/x")
    disk.unlock(b"https://a/x")
