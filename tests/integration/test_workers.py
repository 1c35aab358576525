"""
C{[edgeproxy] workers = 2} for real: C{twistd edgeproxy} runs a supervisor
and two worker processes sharing the listening sockets.  Both workers serve
(each access log line on standard output is tagged with its worker's
number), a worker killed with SIGKILL is logged and restarted while requests
keep succeeding, SIGHUP reaches every worker, SIGTERM drains and exits 0,
socket activation keeps working, and only the supervisor talks to systemd.

Everything listens on 127.0.0.1 (ports picked free), certificates are made
at test time, and every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.certutil import CertificateAuthority
from tests.proc import (
    startTwistd,
    Backend,
    NotifyReceiver,
    Twistd,
    freePort,
    handshake,
    refused,
    request,
    socketActivationPrefix,
    tlsConnection,
)

START_TIMEOUT = 30.0


@dataclass
class Site:
    workdir: Path
    config: Path
    cafile: Path
    httpsPort: int
    httpPort: int
    backend: Backend


def writeConfig(site: Path, https: str, http: str, backendPort: int, workers: int = 2) -> Path:
    config = site / "edge.ini"
    config.write_text(
        f"""
[edgeproxy]
workers = {workers}
access_log = -
shutdown_timeout = 10s

[tls]
certificates = certs/

[listen:https]
endpoint = {https}
tls = yes

[listen:http]
endpoint = {http}
tls = no

[upstream:app]
servers = 127.0.0.1:{backendPort}

[route:app]
hosts = *
paths = /
upstream = app
"""
    )
    return config


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    ca = CertificateAuthority("edgeproxy workers root")
    cafile = ca.writeCertificate(tmp_path / "ca.pem")
    certdir = tmp_path / "certs"
    certdir.mkdir()
    ca.issue(["localhost", "127.0.0.1"]).writePEM(certdir / "default.pem")
    backend = Backend(slowSeconds=1.5)
    httpsPort, httpPort = freePort(), freePort()
    config = writeConfig(
        tmp_path,
        f"tcp:{httpsPort}:interface=127.0.0.1",
        f"tcp:{httpPort}:interface=127.0.0.1",
        backend.port,
    )
    try:
        yield Site(tmp_path, config, cafile, httpsPort, httpPort, backend)
    finally:
        backend.close()


def start(site: Site, notify: NotifyReceiver, **kwargs: object) -> Twistd:
    return startTwistd(site.config, site.workdir, notify, **kwargs)


def get(port: int, target: str) -> int:
    """One request on a new plain connection; the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        status, _, _ = request(conn, target, "localhost", "Connection: close\r\n")
    return status


def workerPids(proc: Twistd) -> dict[int, int]:
    """Worker number -> pid of its latest start, from the supervisor's log."""
    pids: dict[int, int] = {}
    for number, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", proc.output()):
        pids[int(number)] = int(pid)
    return pids


def servedBy(proc: Twistd, target: str) -> set[int]:
    """The workers whose access log lines show a request for C{target}."""
    return {
        int(number)
        for number in re.findall(rf"\[worker (\d+)\] 127\.0\.0\.1 .*\"GET {re.escape(target)} HTTP/1\.1\" 200", proc.output())
    }


def waitFor(condition: object, timeout: float, what: str, proc: Twistd) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s:\n{proc.output()}")
        time.sleep(0.05)


def test_bothWorkersServeAndAKilledOneIsRestarted(site: Site, notify: NotifyReceiver) -> None:
    proc = start(site, notify)
    try:
        pids = workerPids(proc)
        assert sorted(pids) == [1, 2]
        assert proc.pid not in pids.values()
        # Only one READY=1, from the supervisor, once both workers are ready.
        output = proc.output()
        assert "worker 1 (pid" in output and "worker 2 (pid" in output
        assert "All 2 workers ready" in output

        # Both workers accept on the shared sockets: new connections until
        # each has served at least one (bounded).
        deadline = time.monotonic() + 20
        count = 0
        while servedBy(proc, f"/spread") != {1, 2}:
            assert time.monotonic() < deadline, f"one worker served everything:\n{proc.output()}"
            assert get(site.httpPort, "/spread") == 200
            count += 1
            if count % 20 == 0:
                time.sleep(0.2)
        # TLS is served by the workers too.
        conn = tlsConnection(site.httpsPort, "localhost", site.cafile)
        with conn:
            status, _, body = request(conn, "/tls", "localhost")
        assert (status, body) == (200, b"backend saw /tls\n")

        # SIGKILL one worker: the supervisor logs it and starts another.
        victim = pids[1]
        os.kill(victim, signal.SIGKILL)
        proc.waitForOutput(f"worker 1 (pid {victim}) killed by signal 9 (SIGKILL)", 10)
        # Requests keep succeeding while it is gone and after.
        for _ in range(30):
            assert get(site.httpPort, "/during") == 200
        waitFor(lambda: workerPids(proc).get(1) not in (None, victim), 10, "worker 1 restarted", proc)
        restarted = workerPids(proc)[1]
        proc.waitForOutput(f"worker 1 (pid {restarted}) ready", 20)
        deadline = time.monotonic() + 20
        while 1 not in servedBy(proc, "/after"):
            assert time.monotonic() < deadline, f"the restarted worker serves nothing:\n{proc.output()}"
            assert get(site.httpPort, "/after") == 200
        # The systemd notifications came from the supervisor only: one
        # READY=1 for the start, none for the restart.
        with pytest.raises(TimeoutError):
            notify.waitFor(b"READY=1", 0.3)

        # SIGHUP reaches every worker; READY=1 once both reloaded.
        proc.signal(signal.SIGHUP)
        notify.waitFor(b"RELOADING=1", 5)
        notify.waitFor(b"READY=1", 10)
        output = proc.output()
        assert "[worker 1 edgeproxy.service#info] SIGHUP: reloading" in output
        assert "[worker 2 edgeproxy.service#info] SIGHUP: reloading" in output
        assert get(site.httpPort, "/reloaded") == 200

        # SIGTERM: the workers drain, the supervisor exits 0.
        proc.signal(signal.SIGTERM)
        notify.waitFor(b"STOPPING=1", 5)
        assert proc.wait(20) == 0
        output = proc.output()
        assert f"worker 1 (pid {restarted}) exited with status 0" in output
        assert f"worker 2 (pid {pids[2]}) exited with status 0" in output
        assert refused(site.httpPort)
    finally:
        proc.stop()


def test_slowRequestFinishesOnSIGTERM(site: Site, notify: NotifyReceiver) -> None:
    proc = start(site, notify)
    try:
        conn = socket.create_connection(("127.0.0.1", site.httpPort), timeout=10)
        conn.sendall(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert site.backend.slowStarted.wait(10)
        proc.signal(signal.SIGTERM)
        from tests.proc import readResponse

        status, headers, body = readResponse(conn)
        conn.close()
        assert (status, body) == (200, b"backend saw /slow\n")
        assert proc.wait(20) == 0
    finally:
        proc.stop()


def test_socketActivationWithWorkers(site: Site, notify: NotifyReceiver) -> None:
    writeConfig(
        site.workdir,
        "systemd:domain=INET:name=https",
        "systemd:domain=INET:name=http",
        site.backend.port,
    )
    prefix = socketActivationPrefix(site.workdir, {"https": site.httpsPort, "http": site.httpPort})
    proc = Twistd(site.config, site.workdir, notify=notify, prefix=prefix)
    try:
        notify.waitFor(b"READY=1", START_TIMEOUT, alive=proc.alive)
        assert sorted(workerPids(proc)) == [1, 2]
        handshake(site.httpsPort, "localhost", site.cafile)
        assert get(site.httpPort, "/activated") == 200
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


def test_aWorkerThatCannotStartStopsTheSupervisor(site: Site, notify: NotifyReceiver) -> None:
    """
    Workers that cannot start (here: the certificates removed after the
    supervisor started) are retried with a growing delay, then the
    supervisor gives up with status 1 and says why.
    """
    import edgeproxy.serve.slots as slots

    proc = start(site, notify)
    try:
        for pem in (site.workdir / "certs").iterdir():
            pem.unlink()
        for pid in workerPids(proc).values():
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(60) == 1
        output = proc.output()
        assert f"could not start {slots.MAX_START_ATTEMPTS} times in a row" in output
        # Each failed start said why, tagged with its worker.
        assert re.search(r"\[worker \d edgeproxy.worker#critical\] worker \d cannot start: ", output), output
        notify.waitFor(b"ERRNO=1", 1)
    finally:
        proc.stop()


def test_oneHealthCheckerAndTheAdminListenerInTheSupervisor(tmp_path: Path, notify: NotifyReceiver) -> None:
    import json
    import urllib.request

    origin = Backend()
    httpPort, adminPort, deadPort = freePort(), freePort(), freePort()
    config = tmp_path / "edge.ini"
    config.write_text(
        f"""
[edgeproxy]
workers = 2
access_log = off
admin = tcp:{adminPort}:interface=127.0.0.1

[listen:http]
endpoint = tcp:{httpPort}:interface=127.0.0.1
tls = no

[upstream:app]
servers = 127.0.0.1:{origin.port}, 127.0.0.1:{deadPort}
health_path = /health
health_interval = 200ms
health_timeout = 150ms
rise = 1
fall = 1

[route:app]
hosts = *
paths = /
upstream = app
"""
    )
    proc = Twistd(config, tmp_path, notify=notify)
    try:
        notify.waitFor(b"READY=1", START_TIMEOUT, alive=proc.alive)

        def status() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{adminPort}/status", timeout=5) as response:
                return json.loads(response.read())

        def states() -> dict[str, str]:
            return {b["address"]: b["state"] for b in status()["upstreams"]["app"]["backends"]}

        waitFor(lambda: states() == {f"127.0.0.1:{origin.port}": "up", f"127.0.0.1:{deadPort}": "down"},
                10, "the dead backend down", proc)
        # The workers follow the supervisor's verdicts: every request goes to
        # the live backend, none waits for the dead one.
        for _ in range(20):
            assert get(httpPort, "/x") == 200
        document = status()
        assert [(w["worker"], w["answered"]) for w in document["worker_processes"]] == [(1, True), (2, True)]
        assert document["workers_missing"] == []
        with urllib.request.urlopen(f"http://127.0.0.1:{adminPort}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert metrics.startswith("# edgeproxy: 2 of 2 workers answered\n")
        total = sum(
            float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith("edgeproxy_requests_total{") and 'route="app"' in line
        )
        assert total == 20
        # process_* per process, labelled; the reload gauge is the
        # supervisor's, not a sum; per-backend counts are summed.
        from tests.metricsutil import samplesOf

        samples = samplesOf(metrics.encode())
        started = {dict(labels).get("worker") for name, labels in samples if name == "process_start_time_seconds"}
        assert started == {"supervisor", "1", "2"}
        assert samples[("edgeproxy_config_last_reload_success", ())] == 1
        assert samples[(
            "edgeproxy_backend_requests_total",
            (("backend", f"127.0.0.1:{origin.port}"), ("upstream", "app")),
        )] == 20
        # One checker for the instance, not one per process: about
        # 3 s / 200 ms checks of the live backend, far fewer than 3 times
        # that.
        before = origin.paths.count("/health")
        time.sleep(3)
        checks = origin.paths.count("/health") - before
        assert 5 <= checks <= 20, checks
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()
        origin.close()


def test_aListenerAddedByAReload(site: Site, notify: NotifyReceiver) -> None:
    proc = start(site, notify)
    try:
        before = workerPids(proc)
        extraPort = freePort()
        text = site.config.read_text()
        site.config.write_text(text + f"""
[listen:extra]
endpoint = tcp:{extraPort}:interface=127.0.0.1
tls = no
""")
        proc.signal(signal.SIGHUP)
        notify.waitFor(b"RELOADING=1", 5)
        notify.waitFor(b"READY=1", 20)
        assert get(extraPort, "/extra") == 200
        assert get(site.httpPort, "/still") == 200
        for number, pid in before.items():
            proc.waitForOutput(f"worker {number} (pid {pid}) exited with status 0", 15)
        after = workerPids(proc)
        assert sorted(after) == [1, 2] and set(after.values()).isdisjoint(before.values())
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert refused(extraPort)
    finally:
        proc.stop()
