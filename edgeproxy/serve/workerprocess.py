# -*- test-case-name: tests.test_workers -*-
"""
L{WorkerProcess}: one worker process seen from its supervisor
(L{edgeproxy.serve.supervisor}): how it is started (L{workerCommand}: it
inherits the listening sockets the way systemd hands them over), the
control channel over its standard input and a file descriptor of its own
(L{edgeproxy.workers}), its signals, and its output, which becomes the
supervisor's log, each line tagged with the worker's number
(C{[worker 2 edgeproxy.service#info]}).

What the worker says (C{notify}: its C{READY=1}, its errors) and that it
ended are handed to the supervisor (L{Supervising}), which decides what
follows (readiness, restart).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, Logger, LogLevel, eventFromJSON
from twisted.python.failure import Failure

import edgeproxy
from edgeproxy.workers import ControlChannel

__all__ = [
    "RECORD_SEPARATOR",
    "Supervising",
    "WorkerCommand",
    "WorkerProcess",
    "describeExit",
    "workerCommand",
]

# The supervisor's lines: see edgeproxy.serve.supervisor.
log = Logger(namespace="edgeproxy.supervisor")


class Supervising(Protocol):
    """What a L{WorkerProcess} tells its supervisor, and reads of it."""

    clock: Any
    workersACME: Any
    """Where a worker's on-demand certificate requests go; L{None} without
    ACME (a test's supervisor may not have it at all)."""

    def workerNotified(self, worker: WorkerProcess, fields: dict[str, str]) -> None: ...

    def workerEnded(self, worker: WorkerProcess, reason: Failure) -> None: ...


RECORD_SEPARATOR = "\x1e"
"""Starts each JSON log event a worker writes on its standard error
(C{jsonFileLogObserver}); other lines are plain output."""


def describeExit(reason: Failure) -> str:
    """How a log line says a worker process ended."""
    value = reason.value
    signalNumber = getattr(value, "signal", None)
    if signalNumber is not None:
        try:
            name = signal.Signals(signalNumber).name
        except ValueError:
            name = str(signalNumber)
        return f"killed by signal {signalNumber} ({name})"
    return f"exited with status {getattr(value, 'exitCode', None)}"


@dataclass(frozen=True, slots=True)
class WorkerCommand:
    """How one worker process is started."""

    args: list[str]
    env: dict[str, str]
    childFDs: dict[int, int | str]
    """Its file descriptors: standard input (the supervisor writes the
    control channel there), output and error (read for the log), the
    inherited sockets from 3 on, then its end of the control channel."""
    controlFd: int


def workerCommand(
    executable: str,
    path: str,
    number: int,
    inherited: list[tuple[str, int]],
    environ: Mapping[str, str] = os.environ,
) -> WorkerCommand:
    """
    The command, descriptors and environment of worker C{number}.

    The environment is the supervisor's, without what only the supervisor
    may use (C{NOTIFY_SOCKET}, its own C{LISTEN_*}, the watchdog), with
    C{LISTEN_FDS}/C{LISTEN_FDNAMES} describing the inherited sockets the
    way systemd does (the worker sets C{LISTEN_PID} to itself) and this
    C{edgeproxy} package first on the path.

    @param path: the configuration file the worker reads.
    @param inherited: (listener name, the supervisor's descriptor), in the
        order they are handed over.
    """
    controlFd = 3 + len(inherited)
    childFDs: dict[int, int | str] = {0: "w", 1: "r", 2: "r", controlFd: "r"}
    for index, (_, fd) in enumerate(inherited):
        childFDs[3 + index] = fd
    args = [
        executable, "-m", "edgeproxy.worker",
        "--config", path,
        "--number", str(number),
        "--control", str(controlFd),
    ]
    env = {key: value for key, value in environ.items() if key not in _SUPERVISOR_ONLY}
    env["LISTEN_FDS"] = str(len(inherited))
    env["LISTEN_FDNAMES"] = ":".join(name for name, _ in inherited)
    root = os.path.dirname(os.path.dirname(os.path.abspath(edgeproxy.__file__)))
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not existing else os.pathsep.join([root, existing])
    return WorkerCommand(args, env, childFDs, controlFd)


_SUPERVISOR_ONLY = frozenset({
    "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID",
})


class _ToWorker:
    """
    The transport of the supervisor's end of a control channel: the
    worker's standard input (a process transport is not a stream transport
    on its own: it has no C{disconnecting}).
    """

    disconnecting = False

    def __init__(self, process: Any) -> None:
        self._process = process

    def write(self, data: bytes) -> None:
        self._process.writeToChild(0, data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._process.writeToChild(0, b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._process.closeChildFD(0)


class WorkerProcess(ProcessProtocol):
    """
    One running worker process, seen from the supervisor: its control
    channel and its output, which becomes the supervisor's log.

    @ivar number: the worker's slot, from 1.
    @ivar channel: the control channel to the worker.
    @ivar ready: whether the worker reported C{READY=1} since it started.
    @ivar ended: fires with the exit reason when the process is gone.
    """

    def __init__(
        self,
        supervisor: Supervising,
        number: int,
        controlFd: int,
        publisher: ILogObserver,
    ) -> None:
        self.supervisor = supervisor
        self.number = number
        self.controlFd = controlFd
        self.publisher = publisher
        self.channel = ControlChannel(self._controlMessage, supervisor.clock, f"worker {number}")
        self.ready = False
        self.reloading = False
        self.startedAt = supervisor.clock.seconds()
        self.pid: int | None = None
        self.ended: Deferred[BaseException] = Deferred()
        self._partial: dict[int, bytes] = {1: b"", 2: b""}

    # Process events --------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.channel.makeConnection(_ToWorker(self.transport))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == self.controlFd:
            self.channel.dataReceived(data)
            return
        if childFD not in self._partial:
            return
        buffered = self._partial[childFD] + data
        *lines, rest = buffered.split(b"\n")
        # A line with no end in sight is logged in pieces rather than kept
        # growing.
        if len(rest) > 65536:
            lines.append(rest)
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            self._outputLine(childFD, line)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == self.controlFd:
            self.channel.connectionLost(None)
        elif childFD in self._partial and self._partial[childFD]:
            self._outputLine(childFD, self._partial[childFD])
            self._partial[childFD] = b""

    def processEnded(self, reason: Failure) -> None:
        for fd in (1, 2):
            if self._partial[fd]:
                self._outputLine(fd, self._partial[fd])
                self._partial[fd] = b""
        if self.channel.connected:
            self.channel.connectionLost(None)
        self.supervisor.workerEnded(self, reason)
        # The exception, not the Failure: a Deferred fired with a Failure
        # fails, and nobody has to handle an exit as an error.
        self.ended.callback(reason.value)

    # What the worker says ----------------------------------------------------

    def _outputLine(self, fd: int, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        tag = f"worker {self.number}"
        if fd == 2 and text.startswith(RECORD_SEPARATOR):
            try:
                event = eventFromJSON(text[len(RECORD_SEPARATOR):])
            except ValueError:
                event = None
            if isinstance(event, dict):
                level = event.get("log_level")
                levelName = getattr(level, "name", "info")
                event["log_system"] = f"{tag} {event.get('log_namespace', '-')}#{levelName}"
                event["edgeproxy_worker"] = self.number
                self.publisher(event)
                return
        if not text:
            return
        # Plain output: the access log (access_log = -) on stdout,
        # tracebacks and interpreter messages on stderr.
        Logger(namespace="edgeproxy.worker", observer=self.publisher).emit(
            LogLevel.info if fd == 1 else LogLevel.warn,
            "{line}",
            line=text,
            log_system=tag,
            edgeproxy_worker=self.number,
        )

    def _controlMessage(self, message: dict[str, Any]) -> None:
        if message["op"] == "acme-demand" and getattr(self.supervisor, "workersACME", None) is not None:
            self.supervisor.workersACME.demand(self, message)
        elif message["op"] == "cache-purged":
            from edgeproxy.cache.operate import relayFromWorker

            relayFromWorker(self.supervisor, self, message)
        elif message["op"] == "notify":
            fields = message.get("fields")
            if isinstance(fields, dict):
                self.supervisor.workerNotified(self, {str(k): str(v) for k, v in fields.items()})
        else:
            log.warn(
                "worker {number}: unexpected control message {op}, ignored",
                number=self.number,
                op=message["op"],
            )

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(message)

    def signal(self, name: str) -> None:
        """Send a signal (C{"TERM"}, C{"HUP"}, C{"KILL"}) if still running."""
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except (ProcessExitedAlready, OSError):
            pass
