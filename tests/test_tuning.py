"""
Tests for L{edgeproxy.tuning}: what the garbage collector does after
L{tuneGarbageCollector} (start-up objects out of its scans, later garbage
still collected) and the line it logs.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from twisted.logger import LogEvent, globalLogPublisher

from edgeproxy.tuning import tuneGarbageCollector


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfreezing() -> Iterator[None]:
    # The test process is not the proxy: give its objects back to the
    # collector afterwards.
    try:
        yield
    finally:
        gc.unfreeze()


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
