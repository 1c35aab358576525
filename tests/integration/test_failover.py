"""
Backend health over real sockets on 127.0.0.1.

  - L{test_checksOverRealConnections}: the active checker against real
    backends (plain, TLS, a certificate from another CA, a certificate for
    another name, a closed port, a silent one, a failing status), in a child
    process running the real reactor (C{python -m
    tests.integration.test_failover checks DIR}), which writes what each
    backend's check concluded.
  - L{test_failover}: a real C{twistd edgeproxy} in front of three real
    backends (each its own process, C{... origin PORT DIR NAME}); one is
    killed while a steady stream of requests flows, and restarted.

Every wait is bounded; the children are killed whatever happens.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.backends import readRecords
from tests.proc import Twistd, freePort, processEnvironment

ROOT = Path(__file__).resolve().parents[2]


def _child(args: list[str], directory: Path, name: str) -> subprocess.Popen[bytes]:
    with (directory / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.integration.test_failover", *args],
            cwd=ROOT,
            env=processEnvironment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _waitFor(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


# The active checker against real backends ----------------------------------------


def runChecks(directory: Path) -> None:
    """The child of L{test_checksOverRealConnections}."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import LoopingCall
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from edgeproxy.config.model import Server, Upstream
    from edgeproxy.metrics import Metrics
    from edgeproxy.tls.client import loadUpstreamTLS
    from edgeproxy.upstream.health import HealthChecker
    from edgeproxy.upstream.pool import UpstreamPool
    from tests.backends import OriginFactory, Recorder, _serverOptions
    from tests.certutil import CertificateAuthority

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    recorder = Recorder(directory)
    ca = CertificateAuthority("health backend CA")
    otherCA = CertificateAuthority("some other CA")
    caFile = directory / "backend-ca.pem"
    caFile.write_bytes(ca.certificatePEM)

    def origin(name: str) -> Any:
        return OriginFactory(name, recorder, reactor)

    class Silent(Protocol):
        """Accepts, reads, never answers."""

    ports = {
        "plain": reactor.listenTCP(0, origin("plain"), interface="127.0.0.1"),
        "tls": reactor.listenSSL(
            0, origin("tls"), _serverOptions(ca.issue(["backend.test"]), [b"http/1.1"]),
            interface="127.0.0.1",
        ),
        "otherca": reactor.listenSSL(
            0, origin("otherca"), _serverOptions(otherCA.issue(["backend.test"]), [b"http/1.1"]),
            interface="127.0.0.1",
        ),
        "silent": reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1"),
    }
    numbers = {name: port.getHost().port for name, port in ports.items()}
    numbers["dead"] = freePort()
    base: dict[str, Any] = dict(health_path="/healthz", health_interval=5.0, health_timeout=0.5)
    tls: dict[str, Any] = dict(tls=True, ca=str(caFile), server_name="backend.test")
    settings: dict[str, dict[str, Any]] = {
        "plain": {},
        "tls": tls,
        "otherca": tls,
        "othername": dict(tls, server_name="other.test"),
        "dead": {},
        "silent": {},
        "failing": dict(health_path="/status/503"),
    }
    portOf = {"othername": numbers["tls"], "failing": numbers["plain"]}
    pools = {}
    checkers = []
    for name, extra in settings.items():
        upstream = Upstream(
            name, (Server("127.0.0.1", portOf.get(name, numbers.get(name, 0))),), **dict(base, **extra)
        )
        pool = UpstreamPool(reactor, upstream, loadUpstreamTLS(upstream))
        # The pool of helper B carries these; set them on an older one.
        if not isinstance(getattr(pool, "metrics", None), Metrics):
            pool.metrics = Metrics()  # type: ignore[attr-defined]
        if not isinstance(getattr(pool, "observers", None), list):
            pool.observers = []  # type: ignore[attr-defined]
        checker = HealthChecker(reactor, pool)
        checker.start()
        pools[name] = pool
        checkers.append(checker)

    def report(final: bool = False) -> None:
        backends = {name: pool.backends[0] for name, pool in pools.items()}
        if not final and any(b.lastCheck is None for b in backends.values()):
            return
        results = {
            name: {
                "state": b.state.value,
                "reason": b.reason,
                "detail": None if b.lastCheck is None else b.lastCheck.detail,
                "port": b.port,
            }
            for name, b in backends.items()
        }
        (directory / "results.json").write_text(json.dumps(results))
        for checker in checkers:
            checker.stop()
        if reactor.running:
            reactor.stop()

    poll = LoopingCall(report)
    poll.clock = reactor
    poll.start(0.05)
    reactor.callLater(10, report, True)
    reactor.run()


def test_checksOverRealConnections(tmp_path: Path) -> None:
    child = _child(["checks", str(tmp_path)], tmp_path, "checks")
    try:
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
    log = (tmp_path / "checks.log").read_text(errors="replace")
    assert (tmp_path / "results.json").exists(), log
    results = json.loads((tmp_path / "results.json").read_text())

    assert results["plain"] == dict(
        results["plain"], state="up", reason="first check passed: 200", detail="200"
    ), log
    assert results["tls"]["state"] == "up", results["tls"]
    assert results["failing"]["state"] == "down"
    assert results["failing"]["reason"] == "first check failed: status 503"
    assert results["dead"]["detail"] == "connection refused"
    assert results["silent"]["detail"] == "timeout after 0.5s"
    assert results["otherca"]["state"] == "down"
    assert results["otherca"]["detail"].startswith("TLS: ")
    assert "certificate verify failed" in results["otherca"]["detail"]
    assert results["othername"]["state"] == "down"
    assert results["othername"]["detail"] == "TLS: certificate does not match other.test"

    # What the backends saw: the documented request, with the Host traffic
    # would carry (the verified name on TLS upstreams).
    requests = {
        r["backend"]: r
        for r in readRecords(tmp_path)
        if r["event"] == "request" and r["target"] == "/healthz"
    }
    plain = requests["plain"]
    assert plain["requestLine"] == "GET /healthz HTTP/1.1"
    headers = [(k.lower(), v) for k, v in plain["headers"]]
    assert headers == [
        ("host", f"127.0.0.1:{results['plain']['port']}"),
        ("connection", "close"),
        ("user-agent", "edgeproxy-health"),
    ]
    tlsHeaders = dict((k.lower(), v) for k, v in requests["tls"]["headers"])
    assert tlsHeaders["host"] == f"backend.test:{results['tls']['port']}"
    assert "otherca" not in requests and "othername" not in requests


# Failover through the real proxy ---------------------------------------------------


def runOrigin(port: int, directory: Path, name: str) -> None:
    """One backend process of L{test_failover}."""
    from twisted.internet import reactor

    from tests.backends import OriginFactory, Recorder

    reactor.listenTCP(port, OriginFactory(name, Recorder(directory), reactor), interface="127.0.0.1")
    reactor.run()


INTERVAL = 0.5
FALL = 2
RISE = 2


class Origin:
    """One backend process on a fixed port, which can be killed and restarted."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.port = freePort()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = _child(["origin", str(self.port), str(self.directory), self.name],
                              self.directory, self.name)
        _waitFor(self._accepting, 10, f"backend {self.name} listening on {self.port}")

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Traffic(threading.Thread):
    """A steady stream of GETs through the proxy (at most C{limit}), each
    on its own connection, recording every status."""

    def __init__(self, port: int, limit: int = 3000) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.limit = limit
        self.results: list[tuple[float, int | str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        for number in range(self.limit):
            if self.done.is_set():
                return
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                connection.request("GET", f"/stream/{number}", headers={"Host": "app.test"})
                response = connection.getresponse()
                response.read()
                outcome: int | str = response.status
            except OSError as error:
                outcome = f"{type(error).__name__}: {error}"
            finally:
                connection.close()
            self.results.append((time.monotonic(), outcome))
            time.sleep(0.01)


def _status(adminPort: int) -> dict[str, str]:
    """Each backend's state as C{GET /status} on the admin listener shows it."""
    connection = http.client.HTTPConnection("127.0.0.1", adminPort, timeout=2)
    try:
        connection.request("GET", "/status")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 200, body
    document = json.loads(body)
    return {b["address"]: b["state"] for b in document["upstreams"]["app"]["backends"]}


def _statusOrNothing(adminPort: int) -> dict[str, str]:
    try:
        return _status(adminPort)
    except OSError:
        return {}


@pytest.fixture
def origins(tmp_path: Path) -> Iterator[list[Origin]]:
    started = [Origin(tmp_path, f"b{i}") for i in range(3)]
    try:
        for origin in started:
            origin.start()
        yield started
    finally:
        for origin in started:
            origin.kill()


def test_failover(tmp_path: Path, origins: list[Origin]) -> None:
    proxyPort, adminPort = freePort(), freePort()
    config = tmp_path / "edge.ini"
    config.write_text(
        f"""
[edgeproxy]
access_log = off
admin = tcp:{adminPort}:interface=127.0.0.1
shutdown_timeout = 2s

[listen:http]
endpoint = tcp:{proxyPort}:interface=127.0.0.1

[upstream:app]
servers = {", ".join(o.address for o in origins)}
connect_timeout = 1s
response_timeout = 5s
retries = 2
health_path = /healthz
health_interval = {INTERVAL}s
health_timeout = 0.4s
fall = {FALL}
rise = {RISE}

[route:app]
hosts = *
upstream = app
"""
    )
    proxy = Twistd(config, tmp_path)
    traffic: Traffic | None = None
    try:
        allUp = {o.address: "up" for o in origins}
        _waitFor(lambda: _statusOrNothing(adminPort) == allUp, 15,
                 f"every backend up in /status ({proxy.output()[-2000:]})")
        traffic = Traffic(proxyPort)
        traffic.start()
        _waitFor(lambda: len(traffic.results) >= 20, 10, "traffic flowing")

        victim = origins[1]
        victim.kill()
        killed = time.monotonic()
        _waitFor(lambda: _status(adminPort)[victim.address] == "down",
                 FALL * INTERVAL * 1.1 + 1.0, f"{victim.address} down in /status")
        detected = time.monotonic() - killed
        assert detected <= FALL * INTERVAL * 1.1 + 1.0
        sentWhileDown = len(traffic.results)

        restarted = time.time()
        victim.start()
        _waitFor(lambda: _status(adminPort)[victim.address] == "up",
                 RISE * INTERVAL * 1.1 + 2.0, f"{victim.address} up again in /status")
        back = time.monotonic()
        # Back in the rotation: passive ejection (5 refused connects while
        # it was dead) ends with the passing checks, it does not last 30s.
        _waitFor(
            lambda: any(
                r.get("event") == "request" and r.get("backend") == victim.name
                and r.get("target", "").startswith("/stream/") and r.get("at", 0) > restarted
                for r in readRecords(tmp_path)
            ) and len(traffic.results) > sentWhileDown + 20,
            5, f"traffic reaching {victim.address} again",
        )
    finally:
        if traffic is not None:
            traffic.done.set()
            traffic.join(15)
        proxy.stop()

    failures = [(t, outcome) for t, outcome in traffic.results if outcome != 200]
    assert failures == [], proxy.output()[-4000:]
    assert len(traffic.results) >= 60
    # The kill happened while requests flowed: some were answered between
    # the kill and the restart, all of them successfully.
    assert any(killed <= t <= back for t, _ in traffic.results)
    log = proxy.output()
    assert f"backend {victim.address}: up -> down" in log
    assert f"backend {victim.address}: down -> up ({RISE} passing checks in a row: 200)" in log


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "checks":
        runChecks(Path(rest[0]))
    elif mode == "origin":
        runOrigin(int(rest[0]), Path(rest[1]), rest[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
