"""
Tests for L{edgeproxy.systemd}: the datagrams a real C{AF_UNIX} socket
receives, as systemd would.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from edgeproxy.config.model import ProxySettings
from edgeproxy.systemd import Notifier
from tests.fastpaths import SHOW_DEPRECATIONS

pytestmark = SHOW_DEPRECATIONS


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """
    A bound datagram socket in a short temporary directory (C{sun_path} is
    limited to 108 bytes, which pytest's own tmp_path can exceed).
    """
    directory = tempfile.mkdtemp(prefix="sdn")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory)


@pytest.fixture
def captured() -> Iterator[list[dict]]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_readyDatagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready() is True
    assert sock.recv(4096) == b"READY=1"


def test_readyWithStatus(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    Notifier({"NOTIFY_SOCKET": path}).ready("serving 2 listeners")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 listeners"


def test_reloadingCarriesMonotonicClock(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    Notifier({"NOTIFY_SOCKET": path}, monotonic=lambda: 123456789).reloading()
    assert sock.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=123456789"


def test_reloadingDefaultClockIsMonotonicMicroseconds(
    receiver: tuple[socket.socket, str]
) -> None:
    import time

    sock, path = receiver
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier({"NOTIFY_SOCKET": path}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = sock.recv(4096).split(b"\n")
    assert lines[0] == b"RELOADING=1"
    key, value = lines[1].split(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stoppingAndStatus(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.stopping()
    notifier.status("line one\nline two")
    assert sock.recv(4096) == b"STOPPING=1"
    # A newline would be read as the start of another field.
    assert sock.recv(4096) == b"STATUS=line one line two"


def test_arbitraryFieldsInOrder(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    Notifier({"NOTIFY_SOCKET": path}).notify(STATUS="x", MAINPID=42)
    assert sock.recv(4096) == b"STATUS=x\nMAINPID=42"


def test_abstractNamespace() -> None:
    name = f"edgeproxy-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.address == b"\0" + name.encode()
        assert notifier.ready() is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_absentVariableDoesNothing(captured: list[dict]) -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert captured == []


def test_emptyVariableDoesNothing() -> None:
    assert Notifier({"NOTIFY_SOCKET": ""}).ready() is False


def test_failureNeverRaisesAndWarnsOnce(captured: list[dict]) -> None:
    directory = tempfile.mkdtemp(prefix="sdn")
    try:
        notifier = Notifier({"NOTIFY_SOCKET": os.path.join(directory, "nobody")})
        assert notifier.ready() is False
        assert notifier.reloading() is False
        assert notifier.stopping() is False
    finally:
        shutil.rmtree(directory)
    warnings = [e for e in captured if e.get("log_namespace") == "edgeproxy.systemd"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == LogLevel.warn
    assert "nobody" in repr(warnings[0]["address"])


# The unit files shipped in docs/systemd.

UNITS = Path(__file__).resolve().parent.parent / "docs" / "systemd"


def unitValues(name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unitsParseCleanly(tmp_path: Path) -> None:
    """
    systemd-analyze verify reads the units as systemd would (PID 1 need not
    be systemd); the binaries are replaced by stand-ins that exist.
    """
    binaries = tmp_path / "bin"
    binaries.mkdir()
    for name in ("twistd", "edgeproxy"):
        (binaries / name).symlink_to(shutil.which("true") or "/bin/true")
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/opt/edgeproxy/bin/", f"{binaries}/")
        (tmp_path / unit.name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no",
         *(str(tmp_path / u.name) for u in sorted(UNITS.iterdir()))],
        capture_output=True, text=True, timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Unknown" not in output and "Failed" not in output, output


def test_unitsAgreeWithEachOther() -> None:
    service = unitValues("edgeproxy.service")
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    # The check first (tests/test_systemd_units.py has the why).
    assert service["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"][0].endswith(
        "twistd --nodaemon --pidfile= edgeproxy --config /etc/edgeproxy/edge.ini"
    )
    assert service["ExecStartPre"][0].endswith("edgeproxy check --quiet --config /etc/edgeproxy/edge.ini")
    # The drain must end before systemd gives up and kills.
    stopSeconds = float(service["TimeoutStopSec"][0].rstrip("s"))
    assert stopSeconds > ProxySettings().shutdown_timeout
    names = {}
    for unit in ("edgeproxy.socket", "edgeproxy-http.socket"):
        values = unitValues(unit)
        assert values["Service"] == ["edgeproxy.service"]
        assert len(values["FileDescriptorName"]) == 1
        names[values["FileDescriptorName"][0]] = values["ListenStream"]
        assert unit in service["Sockets"][0].split()
    assert names == {"https": ["[::]:443"], "http": ["[::]:80"]}


def test_passedSocketsAsTwistedSeesThem() -> None:
    """
    L{passedSockets} is what Twisted's systemd: endpoints adopt from (its
    private parser state): if Twisted changes that, this fails.
    """
    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs

    from edgeproxy.systemd import passedSockets

    assert isinstance(passedSockets(), ListenFDs)
    assert passedSockets() is _SystemdParser._sddaemon


def test_notPassedMessage() -> None:
    """A socket that was not passed: the names that were, and what to change."""
    from twisted.python.systemd import ListenFDs

    from edgeproxy.systemd import notPassedMessage

    passed = ListenFDs([3, 4], ("https", "http"))
    assert notPassedMessage("systemd:domain=INET6:name=web", passed) == (
        "systemd passed no socket named 'web' (it passed: https, http); give a socket unit "
        "FileDescriptorName=web, name that unit in the service's Sockets= and restart the "
        "service (a running process cannot receive new sockets)"
    )
    assert "there is no index 5" in notPassedMessage("systemd:domain=INET:index=5", passed)
    assert notPassedMessage("systemd:domain=INET:name=https", ListenFDs([], ())).startswith(
        "systemd passed no sockets to this process"
    )
