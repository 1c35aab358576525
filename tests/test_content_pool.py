"""
The conversion pool: admission (a full pool), order, deadlines, dying and
misbehaving conversion processes, resizing and stopping, with processes the
test plays; and the conversion process itself, run for real.
"""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from edgeproxy.content.convert import Job, Result, convert
from edgeproxy.content.pool import ConversionPool
from edgeproxy.content.job import FRAME
from edgeproxy.content.lowpriority import SLICE_NS
from edgeproxy.content.worker import readFrame, writeFrame
from tests.imageutil import decode, photoJPEG

ROOT = Path(__file__).resolve().parents[1]
JOB = Job("webp", 80, 25_000_000)


class FakeProcess:
    """The transport of a conversion process the test plays."""

    pid = 4242

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.written = b""
        self.signals: list[str] = []
        self.stdinClosed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)

    def job(self) -> tuple[dict[str, Any], bytes]:
        """The last frame the pool sent."""
        frame = readFrame(io.BytesIO(self.written))
        assert frame is not None
        self.written = b""
        return frame

    def answer(self, result: Result, pieces: int = 1) -> None:
        out = io.BytesIO()
        writeFrame(out, {k: getattr(result, k) for k in Result._fields if k != "data"}, result.data)
        data = out.getvalue()
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            self.worker.outReceived(data[i : i + step])

    def end(self) -> None:
        self.worker.processEnded(Failure(ProcessTerminated(signal=9)))


class Spawner:
    def __init__(self) -> None:
        self.processes: list[FakeProcess] = []

    def __call__(self, worker: Any) -> FakeProcess:
        process = FakeProcess(worker)
        worker.makeConnection(process)
        self.processes.append(process)
        return process


def makePool(workers: int = 2, queue: int = 1) -> tuple[ConversionPool, Spawner, MemoryReactorClock]:
    clock = MemoryReactorClock()
    spawner = Spawner()
    return ConversionPool(clock, workers, queue, deadline=5.0, spawn=spawner), spawner, clock


def results(deferred: Deferred[Result]) -> list[Result]:
    got: list[Result] = []
    deferred.addCallback(got.append)
    return got


def test_conversionRunsInAProcessAndComesBack() -> None:
    pool, spawner, _ = makePool()
    assert pool.reserve()
    got = results(pool.convert(JOB, b"image bytes"))
    [process] = spawner.processes
    fields, data = process.job()
    assert Job(**fields) == JOB and data == b"image bytes"
    process.answer(Result("converted", b"webp bytes", "image/webp", 10, 20), pieces=7)
    assert got == [Result("converted", b"webp bytes", "image/webp", 10, 20)]
    assert pool.reserved == 0


def test_fullPoolAdmitsNoMore() -> None:
    """workers + queue images at once; the next is refused (its original goes out)."""
    pool, spawner, _ = makePool(workers=2, queue=1)
    assert [pool.reserve() for _ in range(4)] == [True, True, True, False]
    waits = [results(pool.convert(JOB, b"%d" % i)) for i in range(3)]
    assert len(spawner.processes) == 2, "no more processes than workers"
    first, second = spawner.processes
    assert first.job()[1] == b"0" and second.job()[1] == b"1"
    first.answer(Result("larger"))
    assert waits[0] == [Result("larger")]
    # The waiting image goes to the process that became free.
    assert first.job()[1] == b"2"
    assert pool.reserve(), "one admission was given back"
    assert pool.reserved == 3


def test_overdueConversionIsGivenUpAndItsProcessKilled() -> None:
    pool, spawner, clock = makePool(workers=1, queue=1)
    pool.reserve()
    pool.reserve()
    first = results(pool.convert(JOB, b"slow"))
    second = results(pool.convert(JOB, b"next"))
    [process] = spawner.processes
    process.job()
    clock.advance(5.0)
    assert first[0].outcome == "timeout"
    assert process.signals == ["KILL"]
    process.answer(Result("converted", b"late"))  # ignored
    process.end()
    # A new process takes the waiting image.
    assert len(spawner.processes) == 2
    assert spawner.processes[1].job()[1] == b"next"
    spawner.processes[1].answer(Result("converted", b"ok", "image/webp", 1, 1))
    assert second[0].data == b"ok"
    assert pool.reserved == 0


def test_deadProcessFailsItsConversionOnly() -> None:
    pool, spawner, _ = makePool(workers=2)
    pool.reserve()
    pool.reserve()
    crashed = results(pool.convert(JOB, b"a"))
    fine = results(pool.convert(JOB, b"b"))
    a, b = spawner.processes
    a.end()
    assert crashed[0].outcome == "failed" and "ended" in crashed[0].detail
    b.answer(Result("converted", b"x", "image/webp", 1, 1))
    assert fine[0].outcome == "converted"
    assert pool.reserved == 0


def test_misbehavingProcessIsKilled() -> None:
    pool, spawner, _ = makePool()
    pool.reserve()
    got = results(pool.convert(JOB, b"a"))
    [process] = spawner.processes
    process.worker.outReceived(FRAME.pack(10**9, 0))
    assert got[0].outcome == "failed"
    assert process.signals == ["KILL"]


def test_cancelWhileWaitingGivesTheAdmissionBack() -> None:
    pool, spawner, _ = makePool(workers=1, queue=1)
    pool.reserve()
    pool.reserve()
    pool.convert(JOB, b"running")
    waiting = pool.convert(JOB, b"waiting")
    waiting.addErrback(lambda f: None)
    waiting.cancel()
    assert pool.reserved == 1
    assert spawner.processes[0].job()[1] == b"running"
    spawner.processes[0].answer(Result("larger"))
    assert pool.reserved == 0
    assert spawner.processes[0].written == b"", "the cancelled image was not sent"


def test_resizeRetiresIdleProcesses() -> None:
    pool, spawner, _ = makePool(workers=2)
    for name in (b"a", b"b"):
        pool.reserve()
        pool.convert(JOB, name)
    for process in spawner.processes:
        process.answer(Result("larger"))
    pool.resize(1, 0)
    assert [p.stdinClosed for p in spawner.processes] == [False, True] or [
        p.stdinClosed for p in spawner.processes
    ] == [True, False]
    assert pool.workers == 1 and pool.queue == 0


def test_stopAnswersWaitingImagesAndEndsProcesses() -> None:
    pool, spawner, _ = makePool(workers=1, queue=2)
    for _ in range(2):
        pool.reserve()
    running = results(pool.convert(JOB, b"a"))
    waiting = results(pool.convert(JOB, b"b"))
    pool.stop()
    assert waiting[0].outcome == "failed"
    assert not pool.reserve()
    [process] = spawner.processes
    process.answer(Result("converted", b"x", "image/webp", 1, 1))
    assert running[0].outcome == "converted"
    assert process.stdinClosed


def _schedulingReport() -> str:
    """Python source printing, on standard error, what the kernel says of
    the process's priority: nice, session leader, autogroup, time slice."""
    return (
        "import os, sys\n"
        "def read(path):\n"
        "    try:\n"
        "        with open(path) as f: return f.read()\n"
        "    except OSError: return ''\n"
        "slices = [l.split(':')[1].strip() for l in read('/proc/self/sched').splitlines() if l.startswith('se.slice')]\n"
        "print(os.nice(0), os.getsid(0) == os.getpid(), read('/proc/self/autogroup').split(' nice ')[-1].strip() or '-',"
        " slices[0] if slices else '-', file=sys.stderr)\n"
    )


def _kernelAtLeast(major: int, minor: int) -> bool:
    release = os.uname().release.split(".")
    try:
        return (int(release[0]), int(release[1].split("-")[0])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def test_conversionProcessForReal() -> None:
    """
    C{python -m edgeproxy.content.worker} converts frame after frame at a
    lower priority, and ends when its input does.  The priority is what the
    kernel reports for the process: nice 10, a session of its own whose
    scheduling group is at nice 19 (where the kernel has autogroups), and a
    0.1 ms time slice (Linux 6.12 and later).
    """
    source = photoJPEG(320, 240)
    frames = io.BytesIO()
    for target in ("webp", "avif"):
        writeFrame(frames, Job(target, 70, 25_000_000)._asdict(), source)
    process = subprocess.run(
        [sys.executable, "-c",
         "import os, sys; sys.path.insert(0, sys.argv[1]); "
         "from edgeproxy.content.worker import main; main()\n" + _schedulingReport(),
         str(ROOT)],
        input=frames.getvalue(),
        capture_output=True,
        timeout=60,
        # As the pool starts it: not a process group or session leader.
        start_new_session=False,
    )
    assert process.returncode == 0, process.stderr
    nice, leader, groupNice, slice_ = process.stderr.decode().split()
    assert nice == "10"
    if sys.platform == "linux":
        assert leader == "True"
        if os.path.exists("/proc/self/autogroup"):
            assert groupNice == "19"
        if slice_ != "-" and _kernelAtLeast(6, 12) and platform.machine() in ("x86_64", "aarch64"):
            assert int(slice_) == SLICE_NS
    out = io.BytesIO(process.stdout)
    for target in ("webp", "avif"):
        frame = readFrame(out)
        assert frame is not None
        meta, data = frame
        assert meta["outcome"] == "converted" and meta["contentType"] == f"image/{target}"
        assert decode(data).size == (320, 240)
        assert data == convert(source, Job(target, 70, 25_000_000)).data
    assert readFrame(out) is None
