"""
A conversion pool for the tests, whose conversion processes are played in
the test's own process (L{InProcess}): each job is converted with the real
conversion (L{edgeproxy.content.convert}), at once or (C{hold}) when the
test says so, over the same frames a real conversion process reads and
writes (L{edgeproxy.content.worker}).
"""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from edgeproxy.content.convert import convert
from edgeproxy.content.job import Job, Result
from edgeproxy.content.pool import ConversionPool
from edgeproxy.content.worker import readFrame, writeFrame

__all__ = ["InProcess", "Processes", "makePool"]


class InProcess:
    """
    A conversion process played in this process: converts each frame it is
    written with the real conversion, at once or (C{hold}) when the test
    says so.
    """

    pid = 1

    def __init__(self, worker: Any, hold: bool) -> None:
        self.worker = worker
        self.hold = hold
        self.held: list[tuple[dict[str, Any], bytes]] = []
        self.jobs: list[Job] = []

    def write(self, data: bytes) -> None:
        frame = readFrame(io.BytesIO(data))
        assert frame is not None
        self.jobs.append(Job(**frame[0]))
        if self.hold:
            self.held.append(frame)
        else:
            self.answer(*frame)

    def answer(self, fields: dict[str, Any], data: bytes) -> None:
        result = convert(data, Job(**fields))
        out = io.BytesIO()
        writeFrame(out, {k: getattr(result, k) for k in Result._fields if k != "data"}, result.data)
        self.worker.outReceived(out.getvalue())

    def release(self) -> None:
        while self.held:
            self.answer(*self.held.pop(0))

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, signal: str) -> None:
        pass


class Processes:
    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.started: list[InProcess] = []

    def __call__(self, worker: Any) -> InProcess:
        process = InProcess(worker, self.hold)
        worker.makeConnection(process)
        self.started.append(process)
        return process

    @property
    def jobs(self) -> list[Job]:
        return [job for process in self.started for job in process.jobs]


def makePool(workers: int = 2, queue: int = 2, hold: bool = False) -> tuple[ConversionPool, Processes]:
    processes = Processes(hold)
    return ConversionPool(MemoryReactorClock(), workers, queue, spawn=processes), processes
