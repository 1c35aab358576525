"""
The HTTP cache for real: C{twistd edgeproxy} with C{cache = yes} in front
of the test origin (L{tests.backends}, C{--origin}), everything on
127.0.0.1 and every wait bounded:

  - 100 concurrent misses of one URL, over two worker processes sharing a
    disk tier, reach the origin once;
  - a restart serves what was stored from the disk tier;
  - a process killed in the middle of storing a response leaves nothing
    that is served: the next start removes the unfinished file and the
    next request fetches again;
  - a purge reaches the memory tier of every worker (the admin API's, and a
    C{PURGE} request's through the supervisor), and so does the
    invalidation of a URL by a C{POST};
  - with the origin down, C{stale_if_error} serves what was stored.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.backends import readRecords
from tests.proc import (
    REPO,
    NotifyReceiver,
    freePort,
    processEnvironment,
    readResponse,
    startTwistd,
)

TOKEN = "cache-test-token-0123456789"


class Origin:
    """The test origin in a process of its own (so it can be killed)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.backends", "--origin", str(directory)],
            cwd=REPO, env=processEnvironment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not (directory / "ports.json").exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise AssertionError("the origin did not start")
            time.sleep(0.05)
        self.port = json.loads((directory / "ports.json").read_text())["plain"]

    def requests(self, path: str) -> int:
        return sum(
            1 for record in readRecords(self.directory)
            if record.get("event") == "request" and record["target"].split("?")[0] == path
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    directory = tmp_path / "origin"
    directory.mkdir()
    started = Origin(directory)
    try:
        yield started
    finally:
        started.stop()


def writeConfig(
    tmp_path: Path, origin: Origin, port: int, workers: int = 1, cache: str = "", route: str = "",
    admin: int | None = None,
) -> Path:
    config = tmp_path / "edge.ini"
    adminLines = f"admin = tcp:{admin}:interface=127.0.0.1\nadmin_token = {TOKEN}\n" if admin else ""
    config.write_text(
        f"""
[edgeproxy]
workers = {workers}
access_log = off
shutdown_timeout = 5s
{adminLines}
[listen:http]
endpoint = tcp:{port}:interface=127.0.0.1

[upstream:origin]
servers = 127.0.0.1:{origin.port}
response_timeout = 30s

[route:app]
hosts = *
upstream = origin
cache = yes
{route}

[cache]
{cache}
"""
    )
    return config


def get(port: int, target: str, method: str = "GET", timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        return readResponse(sock)


def adminPurge(port: int, query: str) -> dict[str, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /cache/purge?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        status, _, body = readResponse(sock)
    assert status == 200, body
    return json.loads(body)


def test_concurrentMissesReachTheOriginOnce(tmp_path: Path, origin: Origin, notify: NotifyReceiver) -> None:
    port = freePort()
    config = writeConfig(tmp_path, origin, port, workers=2, cache=f"disk = {tmp_path / 'disk'}")
    proxy = startTwistd(config, tmp_path, notify)
    try:
        target = "/cache/collapse?delay=1&cc=max-age%3D300&size=5000"
        results: list[tuple[int, dict[str, str], bytes] | BaseException] = []
        barrier = threading.Barrier(100)

        def one() -> None:
            try:
                barrier.wait(30)
                results.append(get(port, target))
            except BaseException as e:  # noqa: BLE001 - reported below
                results.append(e)

        threads = [threading.Thread(target=one) for _ in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        assert len(results) == 100
        bodies = {r[2] for r in results}  # type: ignore[index]
        assert {r[0] for r in results} == {200} and len(bodies) == 1  # type: ignore[index]
        assert origin.requests("/cache/collapse") == 1
        statuses = [r[1]["cache-status"] for r in results]  # type: ignore[index]
        assert sum("stored" in s for s in statuses) == 1
    finally:
        proxy.stop()


def test_restartServesFromDisk(tmp_path: Path, origin: Origin, notify: NotifyReceiver) -> None:
    port = freePort()
    config = writeConfig(tmp_path, origin, port, cache=f"disk = {tmp_path / 'disk'}")
    target = "/cache/kept?cc=max-age%3D600&etag=k1&size=100000"
    proxy = startTwistd(config, tmp_path, notify)
    try:
        status, fields, body = get(port, target)
        assert status == 200 and "stored" in fields["cache-status"]
    finally:
        proxy.stop()
    assert proxy.wait(10) == 0
    proxy = startTwistd(config, tmp_path, notify)
    try:
        status, fields, again = get(port, target)
        assert status == 200 and again == body
        assert fields["cache-status"].startswith("edgeproxy; hit")
        assert origin.requests("/cache/kept") == 1
    finally:
        proxy.stop()


def test_crashInTheMiddleOfAWrite(tmp_path: Path, origin: Origin, notify: NotifyReceiver) -> None:
    port = freePort()
    disk = tmp_path / "disk"
    config = writeConfig(tmp_path, origin, port, cache=f"disk = {disk}")
    target = "/cache/half?cc=max-age%3D600&size=4000000&pause=30"
    proxy = startTwistd(config, tmp_path, notify)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            received = b""
            while len(received) < 1_000_000:
                chunk = sock.recv(65536)
                assert chunk, "closed early"
                received += chunk
            # Half the body is in the proxy's temporary file: kill it now.
            assert len(os.listdir(disk / "tmp")) == 1
            proxy.signal(signal.SIGKILL)
            proxy.wait(10)
    finally:
        proxy.stop()
    notify.all()
    proxy = startTwistd(config, tmp_path, notify)
    try:
        deadline = time.monotonic() + 10
        while os.listdir(disk / "tmp") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(disk / "tmp") == []
        status, fields, body = get(port, target.replace("&pause=30", ""), timeout=60)
        assert status == 200 and len(body) == 4_000_000
        assert fields["cache-status"].startswith("edgeproxy; fwd=uri-miss")
        assert origin.requests("/cache/half") == 2
    finally:
        proxy.stop()


def storeInBothWorkers(port: int, target: str, origin: Origin, expected: int) -> None:
    """Get C{target} until the origin was asked for it C{expected} times:
    connections open at once land on both workers, and each worker's first
    request for the URL is a miss of its own memory tier."""
    path = target.split("?")[0]
    for _ in range(50):
        sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
        try:
            for sock in sockets:
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            for sock in sockets:
                assert readResponse(sock)[0] == 200
        finally:
            for sock in sockets:
                sock.close()
        if origin.requests(path) >= expected:
            return
    raise AssertionError("the connections never reached both workers")


def test_purgeReachesEveryWorker(tmp_path: Path, origin: Origin, notify: NotifyReceiver) -> None:
    port = freePort()
    adminPort = freePort()
    config = writeConfig(
        tmp_path, origin, port, workers=2, admin=adminPort,
        cache="purge_from = 127.0.0.1",
    )
    target = "/cache/purged?cc=max-age%3D600"
    url = f"http://127.0.0.1:{port}/cache/purged?cc=max-age%3D600"
    proxy = startTwistd(config, tmp_path, notify)

    def storedInBothWorkers(expected: int) -> None:
        storeInBothWorkers(port, target, origin, expected)

    try:
        storedInBothWorkers(2)
        assert origin.requests("/cache/purged") == 2
        answer = adminPurge(adminPort, "url=" + quote(url, safe=""))
        assert answer["memory"] == 2 and answer["purged"] == 2, answer
        storedInBothWorkers(4)
        # A PURGE request purges the worker that serves it, which tells the
        # other through the supervisor...
        status, _, body = get(port, target, method="PURGE")
        assert status == 200 and json.loads(body)["memory"] == 1
        deadline = time.monotonic() + 5
        while True:
            # ... so that nothing is left for the admin API to purge.
            answer = adminPurge(adminPort, "prefix=" + quote(f"http://127.0.0.1:{port}/cache/", safe=""))
            if answer["memory"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer["memory"] == 0, answer
    finally:
        proxy.stop()


def test_invalidationReachesEveryWorker(tmp_path: Path, origin: Origin, notify: NotifyReceiver) -> None:
    """A POST answered 2xx by one worker removes the URL from the other
    worker's memory tier too (RFC 9111 4.4, relayed by the supervisor)."""
    port = freePort()
    adminPort = freePort()
    config = writeConfig(tmp_path, origin, port, workers=2, admin=adminPort)
    target = "/cache/posted?cc=max-age%3D600"
    proxy = startTwistd(config, tmp_path, notify)
    try:
        storeInBothWorkers(port, target, origin, 2)
        assert get(port, target, method="POST")[0] == 200
        prefix = "prefix=" + quote(f"http://127.0.0.1:{port}/cache/", safe="")
        deadline = time.monotonic() + 5
        while True:
            # Soft: counts what is left in the memory tiers, removes nothing.
            answer = adminPurge(adminPort, prefix + "&soft=1")
            if answer["memory"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert answer["memory"] == 0 and answer["disk"] == 0, answer
    finally:
        proxy.stop()


def test_originDownServesStaleIfError(tmp_path: Path, origin: Origin, notify: NotifyReceiver) -> None:
    port = freePort()
    config = writeConfig(tmp_path, origin, port, route="stale_if_error = 1m")
    target = "/cache/fallback?cc=max-age%3D1&size=64"
    proxy = startTwistd(config, tmp_path, notify)
    try:
        status, _, body = get(port, target)
        assert status == 200
        origin.stop()
        time.sleep(1.5)
        status, fields, again = get(port, target)
        assert status == 200 and again == body
        assert "detail=stale-if-error" in fields["cache-status"]
        assert int(fields["age"]) >= 1
        # Without a stored response, the failure is the client's.
        assert get(port, "/cache/never?cc=max-age%3D1")[0] == 502
    finally:
        proxy.stop()
