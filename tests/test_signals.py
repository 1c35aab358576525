"""
Tests for L{edgeproxy.serve.signals}: the handlers the service of the
process installs, called as the kernel would call them, on a memory reactor
that records what is handed to its thread.  The real signals reach a real
process in C{tests/integration/test_twistd.py} and
C{tests/integration/test_workers.py}.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent

from edgeproxy.serve.signals import ProcessSignals
from tests.fastpaths import SHOW_DEPRECATIONS

pytestmark = SHOW_DEPRECATIONS


class Reactor(MemoryReactorClock):
    """Records callFromThread (what a signal handler hands the loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.fromThreads: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.fromThreads.append((f, args))

    def runFromThreads(self) -> None:
        waiting, self.fromThreads = self.fromThreads, []
        for f, args in waiting:
            f(*args)


@pytest.fixture(autouse=True)
def restoreSignals() -> Iterator[None]:
    saved = {number: signal.getsignal(number) for number in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


class Harness:
    def __init__(self, keepCatching: bool = False) -> None:
        self.reactor = Reactor()
        self.lines: list[str] = []
        self.reloads = 0
        self.forces = 0
        self.stopping = False
        self.signals = ProcessSignals(
            self.reactor,
            Logger(namespace="edgeproxy.test", observer=lambda e: self.lines.append(formatEvent(e))),
            reload=self.reload,
            stopping=lambda: self.stopping,
            draining="draining",
            forcing="aborting what is still in flight",
            onForce=self.force,
            keepCatching=keepCatching,
        )

    def reload(self) -> None:
        self.reloads += 1

    def force(self) -> None:
        self.forces += 1

    def takeOver(self) -> None:
        """Install, then run the reactor (as twistd does after the start)."""
        self.signals.installTermination()
        self.signals.installTermination()  # once only
        assert len(self.reactor.whenRunningHooks) == 1
        self.reactor.running = True
        for hook, args, kwargs in self.reactor.whenRunningHooks:
            hook(*args, **kwargs)


def test_hangupReloadsOnTheReactorThreadAndIsRestored() -> None:
    harness = Harness()
    previous = signal.getsignal(signal.SIGHUP)
    harness.signals.installHangup()
    handler = signal.getsignal(signal.SIGHUP)
    assert handler == harness.signals.onHangup
    handler(signal.SIGHUP, None)  # type: ignore[operator]
    # Not in the handler: on the loop.
    assert harness.reloads == 0
    harness.reactor.runFromThreads()
    assert harness.reloads == 1
    harness.signals.restoreHangup()
    assert signal.getsignal(signal.SIGHUP) == previous


def test_firstTerminationStopsTheReactorWithoutRecordingTheSignal() -> None:
    harness = Harness()
    harness.takeOver()
    assert signal.getsignal(signal.SIGTERM) == harness.signals.onTerminate
    harness.signals.onTerminate(signal.SIGTERM, None)
    harness.reactor.runFromThreads()
    assert harness.reactor.hasStopped
    assert getattr(harness.reactor, "_exitSignal", None) is None
    assert harness.lines == ["Received SIGTERM, draining"]
    assert not harness.signals.forced


def test_secondTerminationForcesOnceThenTheKernelDecides() -> None:
    harness = Harness()
    harness.takeOver()
    harness.signals.onTerminate(signal.SIGTERM, None)
    harness.signals.onTerminate(signal.SIGTERM, None)
    # A third one is not caught any more.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    harness.reactor.runFromThreads()
    harness.signals.force(signal.SIGTERM)
    assert harness.signals.forced and harness.forces == 1
    assert harness.lines == [
        "Received SIGTERM, draining",
        "Received SIGTERM again: aborting what is still in flight",
    ]


def test_keepCatchingForcesAtEveryFurtherSignal() -> None:
    """A supervisor passes every further signal on to its workers."""
    harness = Harness(keepCatching=True)
    harness.takeOver()
    for _ in range(3):
        harness.signals.onTerminate(signal.SIGTERM, None)
    assert signal.getsignal(signal.SIGTERM) == harness.signals.onTerminate
    harness.reactor.runFromThreads()
    assert harness.forces == 2
    assert harness.lines.count("Received SIGTERM again: aborting what is still in flight") == 2


def test_nothingTakenOverOnceStopping() -> None:
    """
    Taken over while the stop has begun, the next signal would count as the
    first: the reactor's handler stays.
    """
    harness = Harness()
    previous = signal.getsignal(signal.SIGTERM)
    harness.stopping = True
    harness.takeOver()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_interruptTakenOverOnlyWhereTheReactorTookIt() -> None:
    harness = Harness()
    harness.reactor.sigInt = lambda *args: None  # type: ignore[attr-defined]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    harness.takeOver()
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    signal.signal(signal.SIGINT, harness.reactor.sigInt)  # type: ignore[attr-defined]
    harness.signals.takeOverTermination()
    assert signal.getsignal(signal.SIGINT) == harness.signals.onTerminate


def test_exitCleanlyForgetsTheSignalTheReactorRecorded() -> None:
    """
    A real reactor's own SIGTERM handler records the signal in
    C{_exitSignal}, which twistd re-raises once the reactor stopped: this
    fails if Twisted stops doing so.
    """
    from twisted.internet.selectreactor import SelectReactor

    reactor = SelectReactor()
    try:
        reactor.sigTerm(signal.SIGTERM, None)
        assert reactor._exitSignal == signal.SIGTERM
        signals = ProcessSignals(
            reactor, Logger(), reload=lambda: None, stopping=lambda: False, draining="", forcing=""
        )
        signals.exitCleanly()
        assert reactor._exitSignal is None
    finally:
        reactor.waker.connectionLost(None)  # type: ignore[union-attr]
