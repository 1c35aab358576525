"""
Tests for L{edgeproxy.serve.workerprocess}: how a worker is started.  The
worker seen through its supervisor (output, control channel, exits) is
tested in C{tests/test_workers.py}.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

import edgeproxy
from edgeproxy.serve.workerprocess import describeExit, workerCommand


def test_aWorkerInheritsTheSocketsAsFromSystemd() -> None:
    environ = {
        "HOME": "/root", "NOTIFY_SOCKET": "/run/systemd/notify", "LISTEN_PID": "1",
        "LISTEN_FDS": "1", "LISTEN_FDNAMES": "edge", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1",
        "PYTHONPATH": "/elsewhere",
    }
    command = workerCommand(sys.executable, "/etc/edge.ini", 2, [("web", 7), ("other", 9)], environ)
    assert command.args == [
        sys.executable, "-m", "edgeproxy.worker", "--config", "/etc/edge.ini", "--number", "2", "--control", "5",
    ]
    assert command.controlFd == 5
    assert command.childFDs == {0: "w", 1: "r", 2: "r", 3: 7, 4: 9, 5: "r"}
    root = str(Path(edgeproxy.__file__).resolve().parent.parent)
    assert command.env == {
        "HOME": "/root", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:other",
        "PYTHONPATH": os.pathsep.join([root, "/elsewhere"]),
    }


def test_exitsAsTheLogSaysThem() -> None:
    assert describeExit(Failure(ProcessDone(0))) == "exited with status 0"
    assert describeExit(Failure(ProcessTerminated(exitCode=3))) == "exited with status 3"
    assert describeExit(Failure(ProcessTerminated(signal=9))) == "killed by signal 9 (SIGKILL)"
