"""
Tests for L{edgeproxy.cache.stores}: the stores a runtime's routes share,
across the life of a service: a reload that changes C{[cache]} but keeps
C{disk} hands the open disk tier over (the directory is not opened again),
the stores a reload retires are closed (and those of a build that
failed), and a stop writes the last uses still batched; and how an object
found on disk is copied into the memory tier without stalling the
reactor's thread.  A real L{EdgeService} on a memory reactor, reloaded from
real files; the open descriptors are the process's own (C{/proc/self/fd}).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from edgeproxy.cache.blocking import InlineBlocking
from edgeproxy.cache.entry import Entry
from edgeproxy.cache.kind import storesOf
from edgeproxy.cache.stores import PROMOTE_INLINE, CacheStores
from edgeproxy.config import load
from edgeproxy.config.model import Config, ProxySettings, Route
from edgeproxy.config.stagemodel import CacheSettings, RouteCache
from edgeproxy.pipeline.stages import buildPipelines
from edgeproxy.serve.service import EdgeService
from edgeproxy.systemd import Notifier
from tests.memorypool import MemoryPool
from tests.test_cache_disk import head
from tests.test_cache_diskrecover import HeldBlocking
from tests.test_cache_kind import UPSTREAM
from tests.test_service import Reactor, result

INI = """
[edgeproxy]
access_log = off
shutdown_timeout = 5s

[listen:plain]
endpoint = tcp:8080:interface=127.0.0.1

[upstream:app]
servers = 127.0.0.1:9001

[route:app]
hosts = *
upstream = app
cache = yes

[cache]
memory = {memory}
disk = {disk}
"""

FDS = "/proc/self/fd"

pytestmark = pytest.mark.skipif(not os.path.isdir(FDS), reason="needs /proc/self/fd")


def openFiles() -> list[str]:
    """Where the process's open descriptors lead."""
    found = []
    for fd in os.listdir(FDS):
        try:
            found.append(os.readlink(os.path.join(FDS, fd)))
        except OSError:
            pass
    return found


def under(directory: Path) -> int:
    return sum(1 for path in openFiles() if path.startswith(str(directory)))


def writeIni(tmp_path: Path, memory: str = "1MiB", disk: str = "cache") -> str:
    path = tmp_path / "edge.ini"
    path.write_text(INI.format(memory=memory, disk=tmp_path / disk))
    return str(path)


def started(tmp_path: Path, reactor: Reactor) -> EdgeService:
    service = EdgeService(load(writeIni(tmp_path)), reactor, notifier=Notifier({}), installSignalHandlers=False)
    service.startService()
    return service


def stop(service: EdgeService, reactor: Reactor) -> float:
    """Stop the service as the process would (nothing runs after it);
    the seconds it took."""
    stopped = service.stopService()
    took = 0.0
    while not stopped.called and took < 20:
        reactor.advance(0.1)
        took += 0.1
    result(stopped)
    return took


def test_reloadsKeepingTheDirectoryOpenItOnce(tmp_path: Path) -> None:
    reactor = Reactor()
    service = started(tmp_path, reactor)
    first = storesOf(service.runtime.pipelines)
    assert first is not None and first.disk is not None
    before = len(openFiles())
    cache = tmp_path / "cache"
    held = under(cache)
    for number in range(20):
        writeIni(tmp_path, memory=f"{number + 2}MiB")
        assert result(service.reload()) is True
    assert under(cache) == held
    assert len(openFiles()) <= before
    stores = storesOf(service.runtime.pipelines)
    assert stores is not first and stores.settings.memory == 21 * 2**20  # type: ignore[union-attr]
    assert stores.disk is first.disk  # type: ignore[union-attr]
    stop(service, reactor)
    assert under(cache) == 0


def test_aRetiredDirectoryIsClosed(tmp_path: Path) -> None:
    reactor = Reactor()
    service = started(tmp_path, reactor)
    old = tmp_path / "cache"
    assert under(old) > 0
    writeIni(tmp_path, disk="moved")
    assert result(service.reload()) is True
    assert under(old) == 0
    assert under(tmp_path / "moved") > 0
    assert os.path.exists(old / "index.sqlite")  # left as it was
    stop(service, reactor)
    assert under(tmp_path / "moved") == 0


def test_retiredStoresCloseOnceTheirWritesAreDone(tmp_path: Path) -> None:
    reactor = Reactor()
    service = started(tmp_path, reactor)
    stores = storesOf(service.runtime.pipelines)
    assert stores is not None
    done: list[object] = []
    writer = stores.writer(head(b"http://a/x"), 5, done.append)
    assert writer is not None
    writeIni(tmp_path, disk="moved")
    assert result(service.reload()) is True
    reactor.advance(2)
    assert under(tmp_path / "cache") > 0  # a response is still being stored
    writer.write(b"hello")
    writer.finish()
    assert done and done[0] is not None
    reactor.advance(1)
    assert under(tmp_path / "cache") == 0
    stop(service, reactor)


def test_stopWritesTheLastUses(tmp_path: Path) -> None:
    reactor = Reactor()
    service = started(tmp_path, reactor)
    stores = storesOf(service.runtime.pipelines)
    assert stores is not None and stores.disk is not None
    writer = stores.disk.writer(head(b"http://a/x"))
    assert writer is not None
    writer.write(b"hello")
    writer.finish(head(b"http://a/x"))
    index = str(tmp_path / "cache" / "index.sqlite")
    [(stored,)] = sqlite3.connect(index).execute("SELECT atime FROM objects").fetchall()
    reactor.advance(100)
    assert stores.disk.get(b"http://a/x") is not None  # a use, batched
    assert stop(service, reactor) < 2.0  # TOUCH_DELAY: the batch is not due yet
    [(used,)] = sqlite3.connect(index).execute("SELECT atime FROM objects").fetchall()
    assert used >= stored + 100


def test_closedStoresAreAMissQuietly(tmp_path: Path) -> None:
    """What a request of a retired runtime that outlived its
    shutdown_timeout asks of its closed stores: a miss, no log line."""
    clock = Clock()
    clock.advance(1000)
    stores = CacheStores(CacheSettings(memory=0, disk=str(tmp_path)), clock, InlineBlocking())
    stores.close()
    stores.close()
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert stores.lookup(b"http://a/x") is None
        assert stores.collapsing.lead(b"http://a/x") is not None
        stores.collapsing.done(b"http://a/x", False)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events == []
    assert under(tmp_path) == 0


def test_aFailedBuildClosesTheStoresItMade(tmp_path: Path) -> None:
    routes = (
        Route(name="a", hosts=("a.example",), paths=("/",), upstream="app", cache=RouteCache()),
        # Its pool is missing: the build fails after the stores were made.
        Route(name="b", hosts=("b.example",), paths=("/",), upstream="gone"),
    )
    made = Config(
        path="/etc/edge.ini", proxy=ProxySettings(), tls=None, listeners=(), upstreams={"app": UPSTREAM},
        routes=routes, cache=CacheSettings(disk=str(tmp_path / "cache")),
    )
    with pytest.raises(KeyError):
        buildPipelines(
            made, {"app": MemoryPool(UPSTREAM)},  # type: ignore[dict-item]
            context={"reactor": Clock(), "blocking": InlineBlocking()},
        )
    assert under(tmp_path / "cache") == 0


# Copying disk objects into memory --------------------------------------------------


def onDisk(tmp_path: Path, body: bytes, key: bytes = b"http://a/x") -> tuple[CacheStores, HeldBlocking]:
    """Stores (a new process: the memory tier empty) whose disk tier holds
    C{body} under C{key}; their thread pool holds its work."""
    blocking = HeldBlocking()
    stores = CacheStores(CacheSettings(memory=64 * 2**20, disk=str(tmp_path / "cache")), Clock(), blocking)
    assert stores.disk is not None and stores.memory is not None
    writer = stores.disk.writer(head(key))
    assert writer is not None
    writer.write(body)
    writer.finish(head(key))
    blocking.runAll()
    assert stores.memory.get(key) is None
    return stores, blocking


def test_aSmallDiskObjectIsCopiedIntoMemoryAtOnce(tmp_path: Path) -> None:
    stores, blocking = onDisk(tmp_path, b"s" * PROMOTE_INLINE)
    found = stores.lookup(b"http://a/x")
    assert isinstance(found, Entry) and found.body == b"s" * PROMOTE_INLINE
    assert blocking.work == []
    assert stores.memory.get(b"http://a/x") is not None  # type: ignore[union-attr]


def test_aLargerDiskObjectIsReadIntoMemoryInAThread(tmp_path: Path) -> None:
    body = os.urandom(2 * 2**20)
    stores, blocking = onDisk(tmp_path, body)
    found = stores.lookup(b"http://a/x")
    # This request streams it from its file; the reactor's thread has not
    # read it.
    assert isinstance(found, Entry) and found.body is None and found.path is not None
    assert stores.memory.get(b"http://a/x") is None  # type: ignore[union-attr]
    assert stores.lookup(b"http://a/x").body is None  # type: ignore[union-attr]
    assert len(blocking.work) == 1  # one read, however many lookups meanwhile
    blocking.runAll()
    kept = stores.memory.get(b"http://a/x")  # type: ignore[union-attr]
    assert isinstance(kept, Entry) and kept.body == body
    assert stores.buffered == 0


def test_aPurgeDuringTheReadWins(tmp_path: Path) -> None:
    stores, blocking = onDisk(tmp_path, b"p" * (2 * PROMOTE_INLINE))
    stores.lookup(b"http://a/x")
    stores.purge("url", b"http://a/x", soft=False)
    blocking.runAll()
    assert stores.lookup(b"http://a/x") is None


def test_aSoftPurgeDuringTheReadWins(tmp_path: Path) -> None:
    stores, blocking = onDisk(tmp_path, b"p" * (2 * PROMOTE_INLINE))
    stores.lookup(b"http://a/x")
    stores.purge("url", b"http://a/x", soft=True)
    blocking.runAll()
    kept = stores.memory.get(b"http://a/x")  # type: ignore[union-attr]
    assert isinstance(kept, Entry) and kept.policy.lifetime == 0.0
