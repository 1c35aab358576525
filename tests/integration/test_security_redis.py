"""
Rate limits shared through a real C{redis-server} started by the test on
127.0.0.1 (Debian's package; C{.ci/run} installs it): two edgeproxy
processes share one limit and together let through no more than its rate
plus one burst; Redis killed mid-run makes them follow C{on_store_error},
with one log line per outage and not one per request.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proc import Backend, NotifyReceiver, Twistd, freePort, logContaining, startTwistd

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


class Redis:
    def __init__(self, directory: Path) -> None:
        self.port = freePort()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def backend() -> Iterator[Backend]:
    served = Backend()
    try:
        yield served
    finally:
        served.close()


CONFIG = """\
[edgeproxy]
access_log = access.log

[listen:web]
endpoint = tcp:{port}:interface=127.0.0.1

[upstream:app]
servers = 127.0.0.1:{backend}

[redis]
url = redis://127.0.0.1:{redis}/0
timeout = 200ms

[ratelimit:shared]
rate = {rate}
burst = {burst}
key = route
store = redis
on_store_error = {onError}

[route:app]
hosts = *
upstream = app
rate_limit = shared
"""


def proxy(tmp_path: Path, name: str, redis: Redis, backend: Backend, **settings: object) -> tuple[Twistd, int, NotifyReceiver]:
    directory = tmp_path / name
    directory.mkdir()
    port = freePort()
    values = {"rate": "5/s", "burst": 5, "onError": "open"}
    values.update(settings)
    config = directory / "edge.ini"
    config.write_text(CONFIG.format(port=port, backend=backend.port, redis=redis.port, **values))
    notify = NotifyReceiver()
    return startTwistd(config, directory, notify), port, notify


def get(connection: http.client.HTTPConnection) -> http.client.HTTPResponse:
    connection.request("GET", "/x", headers={"Host": "app.example"})
    response = connection.getresponse()
    response.read()
    return response


def test_twoProcessesShareOneLimit(tmp_path: Path, redis: Redis, backend: Backend) -> None:
    first, firstPort, n1 = proxy(tmp_path, "one", redis, backend)
    second, secondPort, n2 = proxy(tmp_path, "two", redis, backend)
    try:
        connections = [
            http.client.HTTPConnection("127.0.0.1", port, timeout=10) for port in (firstPort, secondPort)
        ]
        allowed = {firstPort: 0, secondPort: 0}
        refused = []
        started = time.monotonic()
        count = 0
        while time.monotonic() - started < 2.0:
            connection = connections[count % 2]
            response = get(connection)
            count += 1
            if response.status == 200:
                allowed[connection.port] += 1
            else:
                refused.append(response)
        elapsed = time.monotonic() - started
        total = sum(allowed.values())
        # The limit and one burst, for both processes together (one more
        # for a refill landing between the clock reads).
        assert total <= 5 + 5 * elapsed + 1, (total, elapsed, allowed)
        assert total >= 5 + 5 * (elapsed - 0.5) - 1, (total, elapsed, allowed)
        assert allowed[firstPort] > 0 and allowed[secondPort] > 0
        assert refused and all(r.status == 429 for r in refused)
        last = refused[-1]
        assert last.getheader("Retry-After") is not None
        assert last.getheader("RateLimit-Policy") == '"shared";q=5;w=1'
        assert last.getheader("RateLimit", "").startswith('"shared";r=0;t=')
    finally:
        first.stop()
        second.stop()
        n1.close()
        n2.close()


@pytest.mark.parametrize("onError, status", [("open", 200), ("closed", 503)])
def test_redisKilledMidRun(tmp_path: Path, redis: Redis, backend: Backend, onError: str, status: int) -> None:
    edge, port, notify = proxy(tmp_path, "edge", redis, backend, rate="1000/s", burst=1000, onError=onError)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert get(connection).status == 200
        redis.kill()
        statuses = []
        started = time.monotonic()
        for _ in range(40):
            statuses.append(get(connection).status)
        # Down: no request waits for Redis's timeout each.
        assert time.monotonic() - started < 5
        assert set(statuses[2:]) == {status}, statuses
        if status == 503:
            response = get(connection)
            assert response.status == 503 and response.getheader("Retry-After") == "1"
        output = edge.output()
        assert output.count("does not answer") == 1, output
        log = logContaining(
            tmp_path / "edge" / "access.log", *(['rule="ratelimit store unavailable"'] if status == 503 else [])
        )
        if status == 503:
            assert 'rule="ratelimit store unavailable"' in log
        # Back: the limits are shared again, and that is said once.
        redis.start()
        deadline = time.monotonic() + 20
        while "answers again" not in edge.output():
            assert time.monotonic() < deadline, edge.output()
            get(connection)
            time.sleep(0.2)
        assert get(connection).status == 200
    finally:
        edge.stop()
        notify.close()


def test_sharedConcurrency(tmp_path: Path, redis: Redis) -> None:
    """concurrency = 1 with store = redis: one request in flight for both
    processes together; its place is given back when it ends."""
    import threading

    slow = Backend(slowSeconds=1.5)
    config = CONFIG.replace("rate = {rate}\nburst = {burst}\n", "concurrency = 1\n")
    directories = []
    processes = []
    try:
        for name in ("one", "two"):
            directory = tmp_path / name
            directory.mkdir()
            port = freePort()
            (directory / "edge.ini").write_text(
                config.format(port=port, backend=slow.port, redis=redis.port, onError="closed")
            )
            notify = NotifyReceiver()
            processes.append((startTwistd(directory / "edge.ini", directory, notify), port, notify))
            directories.append(directory)
        statuses: list[int] = []

        def slowRequest() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", processes[0][1], timeout=10)
            connection.request("GET", "/slow", headers={"Host": "app.example"})
            statuses.append(connection.getresponse().status)

        first = threading.Thread(target=slowRequest)
        first.start()
        assert slow.slowStarted.wait(5)
        other = http.client.HTTPConnection("127.0.0.1", processes[1][1], timeout=10)
        refused = get(other)
        assert refused.status == 429
        assert refused.getheader("RateLimit-Policy") == '"shared-concurrency";q=1'
        first.join(10)
        assert statuses == [200]
        # The place is given back when the first process has sent its
        # response's last byte: a command to Redis after the client may
        # already have read it, so the next request may come a moment early.
        deadline = time.monotonic() + 2
        while (status := get(other).status) == 429 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
    finally:
        for process, _, notify in processes:
            process.stop()
            notify.close()
        slow.close()
