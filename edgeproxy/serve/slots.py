# -*- test-case-name: tests.test_workers -*-
"""
L{WorkerSlots}: the worker processes of a L{edgeproxy.serve.supervisor.Supervisor},
by slot number (1 to C{workers}).

It owns the life of each slot's process: started (L{WorkerSlots.spawn}:
the command of L{edgeproxy.serve.workerprocess}, the initial state the
supervisor gives), killed when not ready within L{READY_TIMEOUT},
restarted when it dies (at once after a long healthy run, else with a
growing delay), and the supervisor stopped with status 1 when it cannot
start L{MAX_START_ATTEMPTS} times in a row; a worker replaced by one with
new sockets (L{WorkerSlots.replace}), draining once its replacement is
ready; the workers of the slots a smaller C{workers} removes, retired
(L{WorkerSlots.resize}).  What a worker says is handled by the
supervisor, which tells the slots what they need to know.
"""

from __future__ import annotations

import os
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

from twisted.logger import ILogObserver, Logger

from edgeproxy.config.model import Config
from edgeproxy.serve.heldsockets import HeldSockets
from edgeproxy.serve.workerprocess import Supervising, WorkerProcess, workerCommand

__all__ = [
    "MAX_RESTART_DELAY",
    "MAX_START_ATTEMPTS",
    "READY_TIMEOUT",
    "RESTART_DELAY",
    "STABLE_AFTER",
    "WorkerSlots",
]

# The supervisor's lines: see edgeproxy.serve.supervisor.
log = Logger(namespace="edgeproxy.supervisor")

MAX_START_ATTEMPTS = 5
"""Starts in a row that may fail (exit or hang before ready) before the
supervisor gives up."""

STABLE_AFTER = 10.0
"""Seconds after which a running worker counts as healthy: when it dies
later, it is restarted at once and its failure count starts over."""

RESTART_DELAY = 0.5
"""Delay before restarting a worker after its first quick failure; it
doubles with each further quick failure, up to L{MAX_RESTART_DELAY}."""

MAX_RESTART_DELAY = 30.0

READY_TIMEOUT = 60.0
"""Seconds a worker has to report itself ready before it is killed (and
counted as a failed start)."""


class _Supervisor(Supervising, Protocol):
    """What the slots ask of their supervisor."""

    config: Config
    sockets: HeldSockets

    @property
    def stopping(self) -> bool: ...

    def initialState(self) -> list[dict[str, Any]]: ...

    def fatal(self, message: str) -> None: ...


class WorkerSlots:
    """
    The worker processes of a supervisor, by slot number.

    @ivar workers: slot number -> the running worker process, if any.
    """

    def __init__(self, supervisor: _Supervisor, reactor: Any, executable: str, publisher: ILogObserver) -> None:
        self._supervisor = supervisor
        self._reactor = reactor
        self._executable = executable
        self._publisher = publisher
        self.workers: dict[int, WorkerProcess] = {}
        self._failures: dict[int, int] = {}
        self._startFailures: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self._readyTimers: dict[int, Any] = {}
        # Workers of slots removed by a reload (workers lowered): they drain
        # and are not restarted.
        self._retiring: set[WorkerProcess] = set()
        # Slot -> the worker a new one replaces (new sockets after a
        # reload); it drains once its replacement is ready.
        self._replacing: dict[int, WorkerProcess] = {}

    @property
    def retiring(self) -> AbstractSet[WorkerProcess]:
        """The workers draining and not restarted (their slot removed, or replaced)."""
        return self._retiring

    def taken(self, number: int) -> bool:
        """Whether slot C{number} has a worker, or one starting soon."""
        return number in self.workers or number in self._restarts

    def spawn(self, number: int) -> None:
        """Start the worker of slot C{number}."""
        self._restarts.pop(number, None)
        supervisor = self._supervisor
        command = workerCommand(self._executable, supervisor.config.path, number, supervisor.sockets.inherited())
        worker = WorkerProcess(supervisor, number, command.controlFd, self._publisher)
        self.workers[number] = worker
        try:
            self._reactor.spawnProcess(
                worker,
                self._executable,
                command.args,
                env=command.env,
                path=os.getcwd(),
                childFDs=command.childFDs,
            )
        except Exception as e:
            del self.workers[number]
            log.error("worker {number}: cannot start: {error}", number=number, error=str(e))
            self._afterFailure(number, ready=False, why=str(e))
            return
        log.info("worker {number} started (pid {pid})", number=number, pid=worker.pid)
        # What the worker reads before it accepts its first connection
        # (edgeproxy.worker.readInitialState).
        for message in supervisor.initialState():
            worker.send(message)
        self._readyTimers[number] = self._reactor.callLater(READY_TIMEOUT, self._notReady, worker)

    def _notReady(self, worker: WorkerProcess) -> None:
        self._readyTimers.pop(worker.number, None)
        if worker.ready or self.workers.get(worker.number) is not worker:
            return
        log.error(
            "worker {number} (pid {pid}) not ready after {timeout}s: killing it",
            number=worker.number,
            pid=worker.pid,
            timeout=READY_TIMEOUT,
        )
        worker.signal("KILL")

    def ready(self, worker: WorkerProcess) -> bool:
        """
        C{worker} said C{READY=1}: it is no longer timed.

        @return: whether it is the first time (a start, not a reload).
        """
        timer = self._readyTimers.pop(worker.number, None)
        if timer is not None and timer.active():
            timer.cancel()
        first = not worker.ready
        worker.ready = True
        self._startFailures[worker.number] = 0
        return first

    def retireReplaced(self, number: int) -> None:
        """The new worker of slot C{number} is ready: the one it replaces drains."""
        replaced = self._replacing.pop(number, None)
        if replaced is not None:
            log.info(
                "worker {number} (pid {pid}) replaced: draining",
                number=number,
                pid=replaced.pid,
            )
            replaced.signal("TERM")

    def ended(self, worker: WorkerProcess) -> bool:
        """
        The process of C{worker} is gone: its slot is free.

        @return: whether it was retiring (nothing follows then).
        """
        number = worker.number
        if worker in self._retiring:
            self._retiring.discard(worker)
            if self.workers.get(number) is worker:
                del self.workers[number]
            return True
        if self.workers.get(number) is worker:
            del self.workers[number]
        timer = self._readyTimers.pop(number, None)
        if timer is not None and timer.active():
            timer.cancel()
        return False

    def restartAfter(self, worker: WorkerProcess, why: str) -> None:
        """Start the slot of C{worker}, which died of C{why}, again (or give up)."""
        healthy = worker.ready and self._reactor.seconds() - worker.startedAt >= STABLE_AFTER
        self._afterFailure(worker.number, ready=worker.ready, why=why, healthy=healthy)

    def _afterFailure(self, number: int, ready: bool, why: str, healthy: bool = False) -> None:
        if self._supervisor.stopping:
            return
        if not ready:
            self._startFailures[number] = self._startFailures.get(number, 0) + 1
            if self._startFailures[number] >= MAX_START_ATTEMPTS:
                self._supervisor.fatal(
                    f"worker {number} could not start {MAX_START_ATTEMPTS} times in a row "
                    f"(last: {why}; its log lines above say why)"
                )
                return
        if healthy:
            self._failures[number] = 0
            delay = 0.0
        else:
            self._failures[number] = self._failures.get(number, 0) + 1
            delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (self._failures[number] - 1))
        log.info("worker {number}: restarting in {delay}s", number=number, delay=delay)
        self._restarts[number] = self._reactor.callLater(delay, self.spawn, number)

    def replace(self, number: int) -> None:
        """Start a new worker in slot C{number} (with the new sockets)."""
        old = self.workers[number]
        self._retiring.add(old)
        previous = self._replacing.pop(number, None)
        if previous is not None:
            # Replaced twice before the first replacement was ready.
            previous.signal("TERM")
        self._replacing[number] = old
        log.info(
            "worker {number} (pid {pid}) is replaced by a worker with the new sockets",
            number=number,
            pid=old.pid,
        )
        self.spawn(number)

    def resize(self, before: int, after: int) -> None:
        """C{workers} went from C{before} to C{after}: retire or start the difference."""
        log.info("workers: {before} -> {after}", before=before, after=after)
        for number in range(after + 1, before + 1):
            call = self._restarts.pop(number, None)
            if call is not None and call.active():
                call.cancel()
            worker = self.workers.get(number)
            if worker is not None:
                self._retiring.add(worker)
                worker.signal("TERM")
        for number in range(before + 1, after + 1):
            self.spawn(number)

    def cancelTimers(self) -> None:
        """Stopping: no restart, no ready timeout any more."""
        for call in list(self._restarts.values()) + list(self._readyTimers.values()):
            if call.active():
                call.cancel()
        self._restarts = {}
        self._readyTimers = {}
