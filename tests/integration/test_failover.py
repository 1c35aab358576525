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


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "checks":
        runChecks(Path(rest[0]))
    elif mode == "origin":
        runOrigin(int(rest[0]), Path(rest[1]), rest[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
