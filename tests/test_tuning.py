"""
Tests for L{edgeproxy.tuning} (and L{edgeproxy._compat.twisted.reactor}):
what the garbage collector does after L{tuneGarbageCollector} (start-up
objects out of its scans, later garbage still collected) and the line it
logs; that an epoll reactor tuned by L{tuneEventDispatch} (with the fast
paths; left alone without them) still delivers reads, writes and
hang-ups, and that a failing connection is logged and dropped without
stopping the others.
"""

from __future__ import annotations

import gc
import socket
import weakref
from collections.abc import Iterator

import pytest
from twisted.logger import LogEvent, globalLogPublisher

from edgeproxy.tuning import tuneEventDispatch, tuneGarbageCollector
from tests.fastpaths import SHOW_DEPRECATIONS, fastPaths  # noqa: F401 (fixture)

pytestmark = SHOW_DEPRECATIONS


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfreezing() -> Iterator[None]:
    # The test process is not the proxy: give its objects back to the
    # collector afterwards, with its thresholds.
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_startUpObjectsLeaveTheCollectorsScans(unfreezing: None) -> None:
    startUp = Node()
    assert tracked(startUp)
    # Frozen objects freed by reference counting leave the count, so it
    # is only a lower bound on what froze: > 0 is what can be asserted.
    assert tuneGarbageCollector() > 0
    assert not tracked(startUp)
    gc.unfreeze()
    assert tracked(startUp)


def test_laterCyclicGarbageIsStillCollected(unfreezing: None) -> None:
    tuneGarbageCollector()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None


def test_objectsInUseStartNoCollection(unfreezing: None) -> None:
    """
    What a busy HTTP/2 connection does: thousands of objects allocated and
    kept for a while (its streams' requests) start no collection, which
    would only find them in use.
    """
    tuneGarbageCollector()
    collections: list[int] = []

    def collected(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(collected)
    try:
        inUse = [Node() for _ in range(5_000)]
    finally:
        gc.callbacks.remove(collected)
    assert len(inUse) == 5_000
    assert collections == []


def test_logsHowManyObjectsWereFrozen(unfreezing: None) -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        frozen = tuneGarbageCollector()
    finally:
        globalLogPublisher.removeObserver(events.append)
    mine = [e for e in events if e.get("log_namespace") == "edgeproxy.tuning"]
    assert [e["frozen"] for e in mine] == [frozen]
    assert mine[0]["log_format"] == "garbage collector: {frozen} start-up objects frozen"


class Reader:
    """A selectable around one end of a socket pair."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.data: list[bytes] = []
        self.lost: list[object] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader"

    def doRead(self) -> object:
        if self.fail:
            raise RuntimeError("handler bug")
        data = self.sock.recv(100)
        if not data:
            from twisted.internet.main import CONNECTION_DONE

            return CONNECTION_DONE
        self.data.append(data)
        return None

    def connectionLost(self, reason: object) -> None:
        self.lost.append(reason)


@pytest.fixture
def epoll() -> Iterator[object]:
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    try:
        yield reactor
    finally:
        reactor.removeAll()
        reactor._poller.close()
        for end in (reactor.waker.i, reactor.waker.o):
            try:
                os_close(end)
            except OSError:
                pass


def os_close(fd: int) -> None:
    import os

    os.close(fd)


def test_tunedEpollReactorDeliversReadsAndHangups(epoll: object, fastPaths: bool) -> None:
    """
    With the fast paths the reactor's loop is replaced (and still delivers
    reads and hang-ups); without them it is left as it is, and does.
    """
    assert tuneEventDispatch(epoll) is fastPaths
    assert ("doIteration" in vars(epoll)) is fastPaths
    a, b = socket.socketpair()
    reader = Reader(a)
    epoll.addReader(reader)  # type: ignore[attr-defined]
    b.sendall(b"hello")
    epoll.doIteration(0.5)  # type: ignore[attr-defined]
    assert reader.data == [b"hello"]
    b.close()
    epoll.doIteration(0.5)  # type: ignore[attr-defined]
    assert len(reader.lost) == 1
    a.close()


def test_failingHandlerIsLoggedAndOthersStillServed(epoll: object, fastPaths: bool) -> None:
    tuneEventDispatch(epoll)
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    bad, good = Reader(a1, fail=True), Reader(a2)
    epoll.addReader(bad)  # type: ignore[attr-defined]
    epoll.addReader(good)  # type: ignore[attr-defined]
    b1.sendall(b"x")
    b2.sendall(b"y")
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        epoll.doIteration(0.5)  # type: ignore[attr-defined]
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert good.data == [b"y"]
    # Twisted's handler logs the exception and disconnects the selectable.
    assert len(bad.lost) == 1
    assert any("handler bug" in repr(e.get("log_failure", e.get("failure"))) for e in events)
    epoll.removeAll()  # type: ignore[attr-defined]
    for s in (a1, b1, a2, b2):
        s.close()


def test_otherReactorsAreLeftAlone() -> None:
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    assert tuneEventDispatch(reactor) is False
    assert "doIteration" not in vars(reactor)
