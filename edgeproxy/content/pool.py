# -*- test-case-name: tests.test_content_pool -*-
"""
L{ConversionPool}: the bounded set of conversion processes
(L{edgeproxy.content.worker}) image conversions run in, off the reactor.

Why processes and not threads (C{docs/performance.rst}, "Images"): a
conversion holds the GIL in its Python parts and would delay the reactor
thread at every switch interval; a lower-priority process cannot hold
anything the reactor needs, a decoder crash on a hostile image takes down
one conversion process rather than the proxy, and a conversion that runs
too long is ended by killing its process.

The pool admits at most C{workers + queue} images at once
(L{ConversionPool.reserve}): an image response is admitted I{before} its
body is read, so the memory held for images is bounded too; when the pool
is full the original goes out at once.  Up to C{workers} processes run, one
conversion each, started when first needed and kept; the admitted images
beyond those wait in order.  A conversion that has not finished after
C{deadline} seconds is given up (its process killed and replaced); one
whose process dies fails alone.  Every outcome is a L{Result}: the pool
never fails a Deferred it returned, except by cancellation.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

import edgeproxy
from edgeproxy.content.job import FRAME, Job, Result

__all__ = ["DEADLINE", "ConversionPool"]

log = Logger()

DEADLINE = 10.0
"""Seconds a conversion may take, queueing excluded."""

_MAX_META = 64 * 1024
_MAX_RESULT = 256 * 1024 * 1024
"""Frames a conversion process may send back: larger means it misbehaves."""

_CHILD_FDS = {0: "w", 1: "r", 2: "r"}


def _childEnvironment() -> dict[str, str]:
    """This process's environment, with edgeproxy importable from where
    this process imported it."""
    env = dict(os.environ)
    home = os.path.dirname(os.path.dirname(os.path.abspath(edgeproxy.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH", "")) if p)
    return env


class _Worker(protocol.ProcessProtocol):
    """One conversion process, as the pool sees it."""

    def __init__(self, pool: ConversionPool) -> None:
        self.pool = pool
        self.busy: Deferred[Result] | None = None
        self.timer: Any = None
        self.buffer = bytearray()
        self.ended = False
        self.retiring = False

    @property
    def process(self) -> Any:
        """The process transport (C{IProcessTransport})."""
        return self.transport

    def run(self, job: Job, data: bytes, done: Deferred[Result]) -> None:
        self.busy = done
        meta = _encode(job._asdict())
        self.process.write(FRAME.pack(len(meta), len(data)) + meta + data)
        self.timer = self.pool.reactor.callLater(self.pool.deadline, self._overdue)

    def retire(self) -> None:
        """End when idle: the process exits at the end of its input."""
        self.retiring = True
        if self.busy is None and not self.ended:
            self.process.closeStdin()

    def outReceived(self, data: bytes) -> None:
        if self.busy is None and self.retiring:
            # The late answer of a conversion given up on.
            return
        buffer = self.buffer
        buffer += data
        if len(buffer) < FRAME.size:
            return
        metaLength, dataLength = FRAME.unpack_from(buffer)
        if metaLength > _MAX_META or dataLength > _MAX_RESULT or self.busy is None:
            self._kill("sent a frame it had no reason to send")
            return
        end = FRAME.size + metaLength + dataLength
        if len(buffer) < end:
            return
        try:
            meta = _decode(bytes(buffer[FRAME.size : FRAME.size + metaLength]))
            result = Result(
                str(meta["outcome"]),
                bytes(buffer[FRAME.size + metaLength : end]),
                str(meta["contentType"]),
                int(meta["width"]),  # type: ignore[call-overload]
                int(meta["height"]),  # type: ignore[call-overload]
                str(meta["detail"]),
            )
        except (ValueError, KeyError, TypeError):
            self._kill("sent a frame that is not a result")
            return
        del buffer[:end]
        self._finish(result)
        self.pool._idle(self)

    def errReceived(self, data: bytes) -> None:
        log.warn(
            "image conversion process {pid} said: {text}",
            pid=self.process.pid,
            text=data.decode("utf-8", "replace").rstrip(),
        )

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self._finish(Result("failed", detail=f"conversion process ended: {reason.getErrorMessage()}"))
        self.pool._ended(self)

    def _overdue(self) -> None:
        self.timer = None
        self._finish(Result("timeout", detail=f"no result after {self.pool.deadline} s"))
        self._kill(None)

    def _kill(self, why: str | None) -> None:
        if why is not None:
            log.warn("image conversion process {pid} {why}: killed", pid=self.process.pid, why=why)
            self._finish(Result("failed", detail=why))
        self.retiring = True
        try:
            self.process.signalProcess("KILL")
        except Exception:
            # Gone already: processEnded follows or has run.
            pass

    def _finish(self, result: Result) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        done, self.busy = self.busy, None
        if done is not None:
            self.pool._done(done, result)


def _encode(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields).encode("utf-8")


def _decode(data: bytes) -> dict[str, object]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


class ConversionPool:
    """
    Conversion processes and their queue (see the module docstring).

    @ivar reserved: images admitted and not finished (converting, waiting
        for a process, or still being read).
    """

    def __init__(
        self,
        reactor: Any,
        workers: int,
        queue: int,
        deadline: float = DEADLINE,
        spawn: Callable[[protocol.ProcessProtocol], Any] | None = None,
    ) -> None:
        """
        @param spawn: starts one conversion process for the protocol given
            (tests give their own); by default C{python -m
            edgeproxy.content.worker} with C{reactor.spawnProcess}.
        """
        self.reactor = reactor
        self.workers = workers
        self.queue = queue
        self.deadline = deadline
        self._spawn = spawn if spawn is not None else self._spawnProcess
        self.reserved = 0
        self._processes: list[_Worker] = []
        self._free: list[_Worker] = []
        self._waiting: deque[tuple[Job, bytes, Deferred[Result]]] = deque()
        self._stopped = False

    def _spawnProcess(self, worker: protocol.ProcessProtocol) -> Any:
        executable = sys.executable
        return self.reactor.spawnProcess(
            worker,
            executable,
            [executable, "-m", "edgeproxy.content.worker"],
            env=_childEnvironment(),
            childFDs=_CHILD_FDS,
        )

    # Admission ------------------------------------------------------------

    def reserve(self) -> bool:
        """Admit one image, if there is room (then L{convert} or L{release})."""
        if self._stopped or self.reserved >= self.workers + self.queue:
            return False
        self.reserved += 1
        return True

    def release(self) -> None:
        """Give back an admission that will not be converted."""
        self.reserved -= 1

    # Conversions ----------------------------------------------------------

    def convert(self, job: Job, data: bytes) -> Deferred[Result]:
        """
        Convert C{data} in a conversion process, with an admission from
        L{reserve} (given back when the conversion ends).  Cancelling the
        result gives the admission back at once when the conversion has
        not started; one that has started runs to its end (its process is
        busy until then), its result dropped.
        """
        entry: tuple[Job, bytes, Deferred[Result]]

        def cancel(deferred: Deferred[Result]) -> None:
            try:
                self._waiting.remove(entry)
            except ValueError:
                return
            self.release()

        done: Deferred[Result] = Deferred(cancel)
        entry = (job, data, done)
        if self._stopped:
            self._done(done, Result("failed", detail="stopping"))
            return done
        self._waiting.append(entry)
        self._dispatch()
        return done

    def _dispatch(self) -> None:
        while self._waiting:
            if self._free:
                worker = self._free.pop()
            elif len(self._processes) < self.workers:
                worker = _Worker(self)
                try:
                    self._spawn(worker)
                except Exception:
                    log.failure("cannot start an image conversion process")
                    job, data, done = self._waiting.popleft()
                    self._done(done, Result("failed", detail="cannot start a conversion process"))
                    continue
                self._processes.append(worker)
            else:
                return
            job, data, done = self._waiting.popleft()
            worker.run(job, data, done)

    def _done(self, done: Deferred[Result], result: Result) -> None:
        self.release()
        if not done.called:
            done.callback(result)

    def _idle(self, worker: _Worker) -> None:
        if worker.retiring or len(self._processes) > self.workers:
            if worker in self._processes:
                self._processes.remove(worker)
            worker.retire()
        else:
            self._free.append(worker)
        self._dispatch()

    def _ended(self, worker: _Worker) -> None:
        if worker in self._processes:
            self._processes.remove(worker)
        if worker in self._free:
            self._free.remove(worker)
        if not self._stopped:
            self._dispatch()

    # Life -----------------------------------------------------------------

    def resize(self, workers: int, queue: int) -> None:
        """New bounds (a reload): extra processes end once idle."""
        self.workers = workers
        self.queue = queue
        while len(self._processes) > workers and self._free:
            worker = self._free.pop()
            self._processes.remove(worker)
            worker.retire()
        self._dispatch()

    def stop(self) -> None:
        """
        Stop at shutdown: waiting images get their original, the processes
        end after their current conversion (their input closes).
        """
        self._stopped = True
        waiting, self._waiting = self._waiting, deque()
        for _, _, done in waiting:
            self._done(done, Result("failed", detail="stopping"))
        for worker in list(self._processes):
            worker.retire()
        self._free.clear()

