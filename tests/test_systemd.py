"""
Tests for L{edgeproxy.systemd}: the datagrams a real C{AF_UNIX} socket
receives, as systemd would.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from edgeproxy.systemd import Notifier


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
