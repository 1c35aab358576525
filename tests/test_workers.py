"""
Tests for the workers mode, in memory: the control channel and the merging
of metrics (L{edgeproxy.workers}), the worker's configuration and agent
(L{edgeproxy.worker}), and the supervisor (L{edgeproxy.serve.supervisor}) driving
processes of a memory reactor.  The real processes are in
C{tests/integration/test_workers.py}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, eventAsJSON, formatEvent, formatEventAsClassicLogText, globalLogPublisher
from twisted.python.failure import Failure

import edgeproxy
from edgeproxy.serve import aggregate
from edgeproxy.serve import slots
from edgeproxy.serve import supervisor as supervisorModule
from edgeproxy.config import load
from edgeproxy.config.model import (
    Config,
    Listener,
    ProxySettings,
    Route,
    Server,
    Upstream,
)
from edgeproxy.metrics import Metrics
from edgeproxy.serve.supervisor import Supervisor
from edgeproxy.systemd import Notifier
from edgeproxy.worker import ControlNotifier
from edgeproxy.workers import (
    ControlChannel,
    NoAnswer,
    answer,
    mergeExpositions,
    systemdEndpoint,
    workerConfig,
)
from tests.metricsutil import samplesOf
from tests.proc import NotifyReceiver


def makeConfig(path: str = "/etc/edgeproxy/edge.ini", workers: int = 2, **proxy: Any) -> Config:
    upstream = Upstream(name="app", servers=(Server("127.0.0.1", 9001), Server("127.0.0.1", 9002)))
    return Config(
        path=path,
        proxy=ProxySettings(access_log=None, workers=workers, **proxy),
        tls=None,
        listeners=(
            Listener(name="web", endpoint="tcp:8080:interface=127.0.0.1", tls=False),
            Listener(name="web6", endpoint="tcp6:8081:interface=\\:\\:1", tls=False),
        ),
        upstreams={"app": upstream},
        routes=(Route(name="all", hosts=("*",), paths=("/",), upstream="app"),),
    )


@pytest.fixture
def events() -> Any:
    captured: list[dict] = []
    globalLogPublisher.addObserver(captured.append)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(captured.append)


def connectedChannel(clock: Clock | None = None) -> tuple[ControlChannel, StringTransport, list[dict]]:
    received: list[dict] = []
    channel = ControlChannel(received.append, clock or Clock(), "worker 1")
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, received


def sentMessages(transport: StringTransport) -> list[dict]:
    return [json.loads(line) for line in transport.value().splitlines()]


# The control channel ------------------------------------------------------


def test_sendWritesOneJSONObjectPerLine() -> None:
    channel, transport, _ = connectedChannel()
    channel.send({"op": "verdict", "upstream": "app", "address": "127.0.0.1:9001",
                  "state": "down", "reason": "timeout\nwith a newline"})
    raw = transport.value()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert sentMessages(transport) == [{
        "op": "verdict", "upstream": "app", "address": "127.0.0.1:9001",
        "state": "down", "reason": "timeout\nwith a newline",
    }]


def test_receivedMessagesGoToTheHandlerEvenInPieces() -> None:
    channel, _, received = connectedChannel()
    channel.dataReceived(b'{"op": "notify", "fie')
    channel.dataReceived(b'lds": {"READY": "1"}}\n{"op": "status", "id": 3}\n')
    assert received == [{"op": "notify", "fields": {"READY": "1"}}, {"op": "status", "id": 3}]


def test_garbageIsLoggedAndIgnored(events: list[dict]) -> None:
    channel, _, received = connectedChannel()
    channel.dataReceived(b"not json\n[1, 2]\n{\"no\": \"op\"}\n{\"op\": \"notify\"}\n")
    assert received == [{"op": "notify"}]
    warnings = [e for e in events if e.get("peer") == "worker 1"]
    assert len(warnings) == 3


def test_aHandlerThatRaisesDoesNotBreakTheChannel(events: list[dict]) -> None:
    def broken(message: dict) -> None:
        raise ValueError("boom")

    channel = ControlChannel(broken, Clock(), "worker 1")
    channel.makeConnection(StringTransport())
    channel.dataReceived(b'{"op": "verdict"}\n{"op": "verdict"}\n')
    assert len([e for e in events if e.get("log_failure") is not None]) == 2
    assert channel.connected


def test_askMatchesTheAnswerById() -> None:
    channel, transport, received = connectedChannel()
    first = channel.ask("status", 1.0)
    second = channel.ask("metrics", 1.0)
    questions = sentMessages(transport)
    assert [q["op"] for q in questions] == ["status", "metrics"]
    assert questions[0]["id"] != questions[1]["id"]
    results: list[Any] = []
    first.addCallback(results.append)
    second.addCallback(results.append)
    channel.dataReceived(
        json.dumps(answer(questions[1], text="m")).encode() + b"\n"
        + json.dumps(answer(questions[0], status={"pid": 7})).encode() + b"\n"
    )
    assert [r.get("text") or r.get("status") for r in results] == ["m", {"pid": 7}]
    # Answers are not questions for the handler.
    assert received == []


def test_askTimesOut() -> None:
    clock = Clock()
    channel, transport, _ = connectedChannel(clock)
    failures: list[Any] = []
    channel.ask("metrics", 1.0).addErrback(failures.append)
    clock.advance(0.9)
    assert failures == []
    clock.advance(0.2)
    assert len(failures) == 1 and failures[0].check(NoAnswer)
    # A late answer is dropped quietly (not handed to the handler as a
    # question).
    question = sentMessages(transport)[0]
    channel.dataReceived(json.dumps(answer(question, text="late")).encode() + b"\n")
    assert clock.getDelayedCalls() == []


def test_askFailsWhenTheChannelCloses() -> None:
    clock = Clock()
    channel, _, _ = connectedChannel(clock)
    failures: list[Any] = []
    channel.ask("status", 5.0).addErrback(failures.append)
    lost: list[Any] = []
    channel.lost.addCallback(lost.append)
    channel.connectionLost(None)
    assert len(failures) == 1 and failures[0].check(NoAnswer)
    assert lost == [None]
    assert clock.getDelayedCalls() == []
    after: list[Any] = []
    channel.ask("status", 5.0).addErrback(after.append)
    assert len(after) == 1 and after[0].check(NoAnswer)


def test_anOversizedLineIsDroppedAndTheNextOneRead(events: list[dict]) -> None:
    channel, _, received = connectedChannel()
    channel.MAX_LENGTH = 64
    # A line that does not end within MAX_LENGTH bytes is not kept growing.
    channel.dataReceived(b'{"op": "notify", "x": "' + b"a" * 100)
    channel.dataReceived(b"a" * 100)
    channel.dataReceived(b'"}\n{"op": "status", "id": 1}\n')
    assert received == [{"op": "status", "id": 1}]
    assert any("dropped" in (e.get("log_format") or "") for e in events)


# The worker's configuration -------------------------------------------------


def test_workerConfigAdoptsTheInheritedSockets() -> None:
    config = makeConfig(admin="tcp:9901:interface=127.0.0.1")
    served = workerConfig(config, {"web": socket.AF_INET, "web6": socket.AF_INET6})
    assert [(l.name, l.endpoint) for l in served.listeners] == [
        ("web", "systemd:domain=INET:name=web"),
        ("web6", "systemd:domain=INET6:name=web6"),
    ]
    # The admin listener runs in the supervisor only.
    assert served.proxy.admin is None
    # Everything else is the same configuration.
    assert served.upstreams == config.upstreams
    assert served.routes == config.routes
    assert served.proxy.workers == config.proxy.workers
    assert served.listeners[0].limits == config.listeners[0].limits


def test_workerConfigLeavesOutListenersWithoutASocket() -> None:
    served = workerConfig(makeConfig(), {"web": socket.AF_INET})
    assert [l.name for l in served.listeners] == ["web"]


def test_systemdEndpointOfAUnixSocket() -> None:
    assert systemdEndpoint(socket.AF_UNIX, "local") == "systemd:domain=UNIX:name=local"


# Metrics --------------------------------------------------------------------




def test_mergeSumsCountersHistogramsAndGauges() -> None:
    own, one, two = Metrics(), Metrics(), Metrics()
    own.healthChecked("app", "127.0.0.1:9001", True)
    one.requestDone("all", "app", 200, 0.003)
    one.requestDone("all", "app", 502, 0.2)
    two.requestDone("all", "app", 200, 0.004)
    two.connectionAccepted("web")
    one.setStateSource(lambda: [("connections_active", "Open.", {"listener": "web"}, 3.0)])
    two.setStateSource(lambda: [("connections_active", "Open.", {"listener": "web"}, 4.0)])
    merged = samplesOf(mergeExpositions(own.exposition(), [one.exposition(), two.exposition()]))
    assert merged[("edgeproxy_requests_total", (("code", "2xx"), ("route", "all"), ("upstream", "app")))] == 2
    assert merged[("edgeproxy_requests_total", (("code", "5xx"), ("route", "all"), ("upstream", "app")))] == 1
    assert merged[("edgeproxy_request_duration_seconds_count", (("route", "all"),))] == 3
    assert merged[("edgeproxy_request_duration_seconds_bucket", (("le", "0.005"), ("route", "all")))] == 2
    assert merged[("edgeproxy_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "all")))] == 3
    assert merged[("edgeproxy_request_duration_seconds_sum", (("route", "all"),))] == pytest.approx(0.207)
    assert merged[("edgeproxy_connections_total", (("listener", "web"),))] == 1
    assert merged[("edgeproxy_connections_active", (("listener", "web"),))] == 7
    assert merged[("edgeproxy_health_checks_total",
                   (("backend", "127.0.0.1:9001"), ("result", "ok"), ("upstream", "app")))] == 1


def test_mergeTakesTheNotSummedFamiliesFromOneProcess() -> None:
    own, one, two = Metrics(), Metrics(), Metrics()
    state = ("backend_state", "State.", {"upstream": "app", "backend": "b", "state": "up"}, 1.0)
    expiry = ("certificate_expiry_timestamp_seconds", "Expiry.", {"name": "a", "file": "f"}, 1e9)
    own.setStateSource(lambda: [state])
    one.setStateSource(lambda: [state, expiry])
    two.setStateSource(lambda: [state, expiry])
    merged = samplesOf(mergeExpositions(
        own.exposition(), [one.exposition(), two.exposition()],
        {"edgeproxy_backend_state", "edgeproxy_certificate_expiry_timestamp_seconds"},
    ))
    assert merged[("edgeproxy_backend_state",
                   (("backend", "b"), ("state", "up"), ("upstream", "app")))] == 1
    # Not in the supervisor's: the first worker's.
    assert merged[("edgeproxy_certificate_expiry_timestamp_seconds", (("file", "f"), ("name", "a")))] == 1e9


def test_mergeKeepsTheExpositionFormat() -> None:
    one = Metrics()
    one.requestDone("all", "app", 200, 0.01)
    merged = mergeExpositions(Metrics().exposition(), [one.exposition()]).decode()
    assert "# TYPE edgeproxy_requests_total counter\n" in merged
    assert "# HELP edgeproxy_requests_total Requests answered" in merged
    assert 'edgeproxy_requests_total{code="2xx",route="all",upstream="app"} 1.0\n' in merged
    # Every family once.
    assert merged.count("# TYPE edgeproxy_request_duration_seconds histogram") == 1


def test_mergeEscapesLabelValues() -> None:
    one = Metrics()
    one.requestDone('r"1\\', "app", 200, 0.01)
    merged = mergeExpositions(b"", [one.exposition(), one.exposition()])
    assert samplesOf(merged)[("edgeproxy_requests_total",
                            (("code", "2xx"), ("route", 'r"1\\'), ("upstream", "app")))] == 2


# The supervisor ---------------------------------------------------------------


class HeldPort:
    """A real listening socket standing in for Twisted's port: the
    supervisor only needs its descriptor, address and stop."""

    def __init__(self, interface: str) -> None:
        self.socket = socket.socket()
        self.socket.bind((interface or "127.0.0.1", 0))
        self.socket.listen(5)
        self.reading = True
        self.stopped = False

    def fileno(self) -> int:
        return self.socket.fileno()

    def stopReading(self) -> None:
        self.reading = False

    def getHost(self) -> IPv4Address:
        host, port = self.socket.getsockname()
        return IPv4Address("TCP", host, port)

    def stopListening(self) -> None:
        self.stopped = True
        self.socket.close()


class FakeProcess:
    """The transport of a spawned process: what was written and signalled."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: dict[int, bytes] = {}
        self.signals: list[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written[fd] = self.written.get(fd, b"") + data

    def closeChildFD(self, fd: int) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in self.written.get(0, b"").splitlines()]


class Spawned:
    def __init__(self, protocol: Any, args: list[str], env: dict[str, str], childFDs: dict, transport: FakeProcess) -> None:
        self.protocol = protocol
        self.args = args
        self.env = env
        self.childFDs = childFDs
        self.transport = transport

    def say(self, message: dict) -> None:
        """The worker writes a control message."""
        self.protocol.childDataReceived(self.protocol.controlFd, json.dumps(message).encode() + b"\n")

    def ready(self) -> None:
        self.say({"op": "notify", "fields": {"READY": "1", "STATUS": "serving"}})

    def end(self, reason: Exception) -> None:
        self.protocol.processEnded(Failure(reason))


class ProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []
        self.ports: list[HeldPort] = []
        self._pid = 1000

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> HeldPort:
        held = HeldPort(interface)
        self.ports.append(held)
        return held

    def spawnProcess(self, protocol: Any, executable: str, args: Any = (), env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = 0,
                     childFDs: Any = None) -> FakeProcess:
        self._pid += 1
        transport = FakeProcess(self._pid)
        self.spawned.append(Spawned(protocol, list(args), dict(env or {}), dict(childFDs or {}), transport))
        protocol.makeConnection(transport)
        return transport


@pytest.fixture
def receiver() -> Any:
    r = NotifyReceiver()
    try:
        yield r
    finally:
        r.close()


EDGE_INI = """\
[edgeproxy]
workers = {workers}
access_log = off
shutdown_timeout = 10s

[listen:web]
endpoint = tcp:0:interface=127.0.0.1
tls = no

[listen:other]
endpoint = tcp:0:interface=127.0.0.1
tls = no

[upstream:app]
servers = 127.0.0.1:9001, 127.0.0.1:9002

[route:all]
hosts = *
paths = /
upstream = app
"""


class Harness:
    def __init__(self, tmp: Path, receiver: Receiver, workers: int = 2) -> None:
        self.path = tmp / "edge.ini"
        self.path.write_text(EDGE_INI.format(workers=workers))
        self.reactor = ProcessReactor()
        self.logged: list[dict] = []
        self.receiver = receiver
        self.supervisor = Supervisor(
            load(str(self.path)),
            self.reactor,
            notifier=Notifier(environ={"NOTIFY_SOCKET": receiver.path}),
            installSignalHandlers=False,
            publisher=self.logged.append,
        )

    def start(self) -> None:
        self.supervisor.privilegedStartService()
        self.supervisor.startService()

    def latest(self, number: int) -> Spawned:
        return [s for s in self.reactor.spawned if s.protocol.number == number][-1]


@pytest.fixture
def harness(tmp_path: Path, receiver: Receiver) -> Any:
    h = Harness(tmp_path, receiver)
    yield h
    for port in h.reactor.ports:
        if not port.stopped:
            port.stopListening()


def test_workersInheritTheSocketsAsSystemdWould(harness: Harness, monkeypatch: Any) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("LISTEN_PID", "1")
    harness.start()
    assert [s.protocol.number for s in harness.reactor.spawned] == [1, 2]
    web, other = harness.reactor.ports
    # The supervisor never accepts: the workers do.
    assert not web.reading and not other.reading
    for spawned in harness.reactor.spawned:
        assert spawned.args[:3] == [sys.executable, "-m", "edgeproxy.worker"]
        assert spawned.args[3:] == [
            "--config", str(harness.path), "--number", str(spawned.protocol.number), "--control", "5",
        ]
        assert spawned.childFDs == {0: "w", 1: "r", 2: "r", 3: web.fileno(), 4: other.fileno(), 5: "r"}
        assert spawned.env["LISTEN_FDS"] == "2"
        assert spawned.env["LISTEN_FDNAMES"] == "web:other"
        # Only the supervisor talks to systemd; LISTEN_PID is set by the
        # worker itself.
        assert "NOTIFY_SOCKET" not in spawned.env and "LISTEN_PID" not in spawned.env
        root = str(Path(edgeproxy.__file__).resolve().parent.parent)
        assert spawned.env["PYTHONPATH"].split(os.pathsep)[0] == root


def test_readyOnceEveryWorkerIsReady(harness: Harness, receiver: Receiver) -> None:
    harness.start()
    harness.latest(1).ready()
    assert receiver.all() == []
    harness.latest(2).ready()
    [datagram] = receiver.all()
    assert datagram.split(b"\n")[0] == b"READY=1"
    assert b"with 2 workers" in datagram
    assert harness.supervisor.ready.called


def test_aWorkerGetsEveryBackendStateFirst(harness: Harness) -> None:
    harness.start()
    first = harness.latest(1)
    states = [
        {"op": "verdict", "upstream": "app", "address": "127.0.0.1:9001", "state": "up", "reason": ""},
        {"op": "verdict", "upstream": "app", "address": "127.0.0.1:9002", "state": "up", "reason": ""},
    ]
    # Before it accepts anything (it reads them before listening)...
    assert first.transport.messages() == [*states, {"op": "state-end"}]
    # ... and again once ready (started or reloaded, its pools may be new).
    first.ready()
    assert first.transport.messages() == [*states, {"op": "state-end"}, *states]


def test_aWorkerThatDiesIsLoggedAndRestartedWithBackoff(harness: Harness, events: list[dict]) -> None:
    harness.start()
    first = harness.latest(1)
    first.ready()
    first.end(ProcessTerminated(signal=9))
    [line] = [formatEventAsClassicLogText(e) for e in _errors(events)] or [""]
    assert f"worker 1 (pid {first.transport.pid}) killed by signal 9 (SIGKILL)" in line
    assert len(harness.reactor.spawned) == 2
    harness.reactor.advance(slots.RESTART_DELAY)
    assert len(harness.reactor.spawned) == 3
    second = harness.latest(1)
    assert second.transport.pid != first.transport.pid
    # A second quick death waits twice as long.
    second.ready()
    second.end(ProcessDone(0))
    harness.reactor.advance(slots.RESTART_DELAY * 2 - 0.01)
    assert len(harness.reactor.spawned) == 3
    harness.reactor.advance(0.02)
    assert len(harness.reactor.spawned) == 4


def test_aWorkerThatRanLongIsRestartedAtOnce(harness: Harness) -> None:
    harness.start()
    first = harness.latest(1)
    first.ready()
    harness.reactor.advance(slots.STABLE_AFTER + 1)
    first.end(ProcessTerminated(exitCode=1))
    harness.reactor.advance(0)
    assert len(harness.reactor.spawned) == 3


def test_aWorkerThatCannotStartStopsTheSupervisor(
    harness: Harness, receiver: Receiver, events: list[dict]
) -> None:
    harness.start()
    for attempt in range(slots.MAX_START_ATTEMPTS):
        harness.latest(2).end(ProcessTerminated(exitCode=1))
        harness.reactor.advance(slots.MAX_RESTART_DELAY)
    assert harness.supervisor.exitCode == 1
    critical = [
        formatEventAsClassicLogText(e) for e in events
        if e.get("log_level") is not None and e["log_level"].name == "critical"
    ]
    assert any(f"worker 2 could not start {slots.MAX_START_ATTEMPTS} times in a row" in c for c in critical)
    assert any(b"ERRNO=1" in d for d in receiver.all())
    # And it is not started again.
    count = len(harness.reactor.spawned)
    harness.reactor.advance(slots.MAX_RESTART_DELAY * 2)
    assert len(harness.reactor.spawned) == count


def test_aWorkerNotReadyInTimeIsKilled(harness: Harness) -> None:
    harness.start()
    harness.latest(1).ready()
    harness.reactor.advance(slots.READY_TIMEOUT)
    assert harness.latest(1).transport.signals == []
    assert harness.latest(2).transport.signals == ["KILL"]


def test_workerOutputIsLoggedTaggedWithItsNumber(harness: Harness) -> None:
    harness.start()
    worker = harness.latest(2).protocol
    event = {
        "log_format": "Listening on {address}",
        "address": "127.0.0.1:8443",
        "log_namespace": "edgeproxy.service",
        "log_level": LogLevel.info,
        "log_time": 1800000000.0,
    }
    encoded = ("\x1e" + eventAsJSON(event) + "\n").encode()
    # In pieces, with an access log line on standard output.
    worker.childDataReceived(2, encoded[:10])
    worker.childDataReceived(2, encoded[10:])
    worker.childDataReceived(1, b'127.0.0.1 - - [x] "GET / HTTP/1.1" 200 2 "-" "-"\n')
    lines = [formatEventAsClassicLogText(e) for e in harness.logged if e.get("edgeproxy_worker") == 2]
    assert lines[0].endswith("[worker 2 edgeproxy.service#info] Listening on 127.0.0.1:8443\n")
    assert lines[1].endswith('[worker 2] 127.0.0.1 - - [x] "GET / HTTP/1.1" 200 2 "-" "-"\n')


def test_sighupReachesEveryWorker(harness: Harness, receiver: Receiver) -> None:
    harness.start()
    for number in (1, 2):
        harness.latest(number).ready()
    receiver.all()
    harness.supervisor.reload()
    assert [harness.latest(n).transport.signals for n in (1, 2)] == [["HUP"], ["HUP"]]
    assert receiver.all()[0].startswith(b"RELOADING=1\n")
    harness.latest(1).ready()
    assert receiver.all() == []
    harness.latest(2).ready()
    assert [d.split(b"\n")[0] for d in receiver.all()] == [b"READY=1"]


def test_aBrokenFileIsRefusedBySupervisorAndWorkersAlike(harness: Harness) -> None:
    """
    The supervisor validates the file as C{edgeproxy check} (and each
    worker) does: a broken one changes nothing and says why.
    """
    harness.start()
    before = harness.supervisor.config
    harness.path.write_text(harness.path.read_text().replace("shutdown_timeout = 10s", "shutdown_timeout = soon"))
    lines: list[str] = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        assert harness.supervisor.reloadOwnView() is False
    finally:
        globalLogPublisher.removeObserver(observer)
    assert harness.supervisor.config is before
    refusals = [line for line in lines if line.startswith("Reload refused, still serving the previous configuration: ")]
    assert refusals and "shutdown_timeout" in refusals[0]


def test_anAdminListenerThatCannotListenStopsTheStart(tmp_path: Path, receiver: Receiver) -> None:
    from twisted.internet.error import CannotListenError

    harness = Harness(tmp_path, receiver)
    harness.path.write_text(harness.path.read_text().replace(
        "access_log = off", "access_log = off\nadmin = tcp:9999:interface=127.0.0.1"))
    harness.supervisor = Supervisor(load(str(harness.path)), harness.reactor, installSignalHandlers=False)
    listenTCP = harness.reactor.listenTCP

    def refuseAdmin(port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port == 9999:
            raise CannotListenError(interface, port, OSError("address in use"))
        return listenTCP(port, factory, backlog, interface)

    harness.reactor.listenTCP = refuseAdmin  # type: ignore[method-assign]
    with pytest.raises(SystemExit) as exited:
        harness.supervisor.privilegedStartService()
    assert exited.value.code == 1
    assert len(harness.reactor.ports) == 2 and all(port.stopped for port in harness.reactor.ports)
    assert harness.supervisor.ports == {}


def test_anAdminListenerThatCannotListenAfterAReloadLeavesTheSocketsAlone(harness: Harness) -> None:
    """
    At start, an admin listener that cannot listen stops everything; after a
    reload it is only logged: the listening sockets the workers inherit stay
    open (a worker started later still gets them).
    """
    from twisted.internet.error import CannotListenError

    harness.start()
    for number in (1, 2):
        harness.latest(number).ready()
    held = dict(harness.supervisor.ports)

    def refuse(port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError("address in use"))

    harness.reactor.listenTCP = refuse  # type: ignore[method-assign]
    harness.path.write_text(harness.path.read_text().replace(
        "access_log = off", "access_log = off\nadmin = tcp:9999:interface=127.0.0.1"))
    lines: list[str] = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        assert harness.supervisor.reloadOwnView() is True
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any("cannot listen" in line and line.endswith("; no admin listener") for line in lines), lines
    assert harness.supervisor.ports == held
    assert not any(port.stopped for port in held.values())
    harness.latest(1).end(ProcessTerminated(signal=9))
    harness.reactor.advance(slots.MAX_RESTART_DELAY)
    assert harness.latest(1).env["LISTEN_FDNAMES"] == "web:other"


def test_stopDrainsTheWorkers(harness: Harness, receiver: Receiver) -> None:
    harness.start()
    for number in (1, 2):
        harness.latest(number).ready()
    stopped = harness.supervisor.stopService()
    assert [harness.latest(n).transport.signals for n in (1, 2)] == [["TERM"], ["TERM"]]
    assert all(port.stopped for port in harness.reactor.ports)
    assert any(d == b"STOPPING=1" for d in receiver.all())
    harness.reactor.advance(0)
    harness.latest(1).end(ProcessDone(0))
    assert not stopped.called
    # Not restarted while stopping.
    harness.reactor.advance(1)
    assert len(harness.reactor.spawned) == 2
    harness.latest(2).end(ProcessDone(0))
    harness.reactor.advance(0)
    assert stopped.called


def test_furtherSignalsArePassedOnToTheWorkers(harness: Harness, receiver: Receiver) -> None:
    harness.start()
    for number in (1, 2):
        harness.latest(number).ready()
    harness.supervisor.stopService()
    assert [harness.latest(n).transport.signals for n in (1, 2)] == [["TERM"], ["TERM"]]
    # A second SIGTERM: each worker's second one aborts what it has in
    # flight; a third is passed on again.
    lines: list[str] = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        harness.supervisor.signals.force(signal.SIGTERM)
        harness.supervisor.signals.force(signal.SIGTERM)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [harness.latest(n).transport.signals for n in (1, 2)] == [["TERM"] * 3, ["TERM"] * 3]
    assert lines.count("Received SIGTERM again: the workers abort what is still in flight") == 2


def test_stopKillsStragglers(harness: Harness) -> None:
    harness.start()
    stopped = harness.supervisor.stopService()
    harness.reactor.advance(0)
    harness.latest(1).end(ProcessDone(0))
    harness.reactor.advance(10.0 + supervisorModule.STOP_MARGIN)
    assert harness.latest(2).transport.signals == ["TERM", "KILL"]
    harness.latest(2).end(ProcessTerminated(signal=9))
    harness.reactor.advance(0)
    assert stopped.called


def _errors(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("log_level") is not None and e["log_level"].name == "error"]


def _answer(spawned: Spawned, op: str, **fields: Any) -> None:
    [question] = [m for m in spawned.transport.messages() if m["op"] == op]
    spawned.say(answer(question, **fields))


def test_metricsOfTheInstanceSumTheWorkers(harness: Harness) -> None:
    harness.start()
    for number in (1, 2):
        harness.latest(number).ready()
    one, two = Metrics(), Metrics()
    one.requestDone("all", "app", 200, 0.01)
    two.requestDone("all", "app", 200, 0.01)
    two.requestDone("all", "app", 200, 0.01)
    result: list[bytes] = []
    harness.supervisor.aggregateMetrics().addCallback(result.append)
    _answer(harness.latest(1), "metrics", text=one.exposition().decode())
    _answer(harness.latest(2), "metrics", text=two.exposition().decode())
    [text] = result
    assert text.startswith(b"# edgeproxy: 2 of 2 workers answered\n")
    assert samplesOf(text)[("edgeproxy_requests_total", (("code", "2xx"), ("route", "all"), ("upstream", "app")))] == 3
    # The supervisor's own: one info series, the backend states it decides.
    assert samplesOf(text)[("edgeproxy_info", (("version", edgeproxy.__version__),))] == 1
    # The last reload is the supervisor's (not 3, a sum of processes);
    # process_* is one series per process.
    samples = samplesOf(text)
    assert samples[("edgeproxy_config_last_reload_success", ())] == 1
    assert {
        dict(labels)["worker"] for name, labels in samples if name == "process_open_fds"
    } == {"supervisor", "1", "2"}


def test_aWorkerThatDoesNotAnswerIsLeftOut(harness: Harness) -> None:
    harness.start()
    for number in (1, 2):
        harness.latest(number).ready()
    one = Metrics()
    one.requestDone("all", "app", 200, 0.01)
    result: list[bytes] = []
    harness.supervisor.aggregateMetrics().addCallback(result.append)
    _answer(harness.latest(1), "metrics", text=one.exposition().decode())
    assert result == []
    harness.reactor.advance(aggregate.ASK_TIMEOUT)
    [text] = result
    assert text.startswith(b"# edgeproxy: 1 of 2 workers answered; missing: worker 2\n")
    assert samplesOf(text)[("edgeproxy_requests_total", (("code", "2xx"), ("route", "all"), ("upstream", "app")))] == 1


def test_statusOfTheInstance(harness: Harness) -> None:
    harness.start()
    for number in (1, 2):
        harness.latest(number).ready()
    result: list[dict] = []
    harness.supervisor.aggregateStatus(now=0.0).addCallback(result.append)
    for number, (connections, inflight) in ((1, (3, 1)), (2, (4, 2))):
        _answer(harness.latest(number), "status", status={
            "worker": number, "pid": harness.latest(number).transport.pid,
            "connections": {"web": connections, "other": 0},
            "listeners_in_flight": {"web": inflight},
            "in_flight": inflight,
            "backends": {"app": {"127.0.0.1:9001": inflight, "127.0.0.1:9002": 0}},
        })
    [document] = result
    web = [l for l in document["listeners"] if l["name"] == "web"][0]
    assert web["connections"] == 7 and web["in_flight"] == 3
    assert web["address"] == "127.0.0.1:%d" % harness.reactor.ports[0].getHost().port
    backends = document["upstreams"]["app"]["backends"]
    assert [(b["address"], b["state"], b["in_flight"]) for b in backends] == [
        ("127.0.0.1:9001", "up", 3), ("127.0.0.1:9002", "up", 0),
    ]
    assert [(w["worker"], w["answered"], w["connections"]) for w in document["worker_processes"]] == [
        (1, True, 3), (2, True, 4),
    ]
    assert document["workers_missing"] == []
    assert document["workers"] == 2


def test_anAccessLogThatCannotBeOpenedStopsTheStart(tmp_path: Path, receiver: Receiver) -> None:
    path = tmp_path / "edge.ini"
    (tmp_path / "gone").mkdir()
    path.write_text(EDGE_INI.format(workers=2).replace(
        "access_log = off", f"access_log = {tmp_path}/gone/access.log"))
    config = load(str(path))
    # Removed between the check and the start.
    (tmp_path / "gone").rmdir()
    with pytest.raises(OSError):
        Supervisor(config, ProcessReactor(), installSignalHandlers=False)


# The worker -----------------------------------------------------------------


def test_importingTheWorkerLeavesListenFdsAlone() -> None:
    """
    Twisted reads LISTEN_* when twisted.internet.endpoints is imported; the
    worker must set LISTEN_PID before that happens.
    """
    code = "import sys, edgeproxy.worker; print('twisted.internet.endpoints' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.stdout.strip() == "False", out.stderr


def test_theWorkersNotificationsGoToTheSupervisor() -> None:
    channel, transport, _ = connectedChannel()
    notifier = ControlNotifier(channel)
    assert notifier.enabled
    notifier.ready(status="serving 1 listener(s)")
    notifier.stopping()
    assert sentMessages(transport) == [
        {"op": "notify", "fields": {"READY": "1", "STATUS": "serving 1 listener(s)"}},
        {"op": "notify", "fields": {"STOPPING": "1"}},
    ]


def test_backendStateChangesReachEveryReadyWorker(harness: Harness) -> None:
    from edgeproxy.upstream import health
    from edgeproxy.upstream.backend import BackendState

    harness.start()
    harness.latest(1).ready()
    before = {n: len(harness.latest(n).transport.messages()) for n in (1, 2)}
    pool = harness.supervisor.runtime.pools["app"]
    health.transition(pool, pool.backends[1], BackendState.DOWN, "connection refused")
    verdict = {"op": "verdict", "upstream": "app", "address": "127.0.0.1:9002",
               "state": "down", "reason": "connection refused"}
    assert harness.latest(1).transport.messages()[before[1]:] == [verdict]
    # Not ready yet: it gets everything when it is.
    assert harness.latest(2).transport.messages()[before[2]:] == []
    harness.latest(2).ready()
    assert verdict in harness.latest(2).transport.messages()


def workerService(tmp_path: Path) -> Any:
    from edgeproxy.serve.service import EdgeService

    path = tmp_path / "edge.ini"
    path.write_text(EDGE_INI.format(workers=2))
    return EdgeService(
        load(str(path)), MemoryReactorClock(), notifier=Notifier(environ={}),
        installSignalHandlers=False, activeChecks=False,
    )


def test_theWorkerAppliesTheSupervisorsVerdicts(tmp_path: Path) -> None:
    from edgeproxy.worker import WorkerAgent

    service = workerService(tmp_path)
    agent = WorkerAgent(service, 1)
    agent.handle({"op": "verdict", "upstream": "app", "address": "127.0.0.1:9002",
                  "state": "down", "reason": "timeout"})
    pool = service.currentRuntime().pools["app"]
    assert [(b.address, b.state.value) for b in pool.backends] == [
        ("127.0.0.1:9001", "up"), ("127.0.0.1:9002", "down"),
    ]
    # Requests only go to the backend the supervisor says is up.
    assert {pool.pickServer().address for _ in range(10)} == {"127.0.0.1:9001"}
    # A verdict for an upstream this worker does not have (yet) is ignored.
    agent.handle({"op": "verdict", "upstream": "other", "address": "x:1", "state": "down", "reason": ""})


def test_theWorkerAnswersStatusAndMetrics(tmp_path: Path) -> None:
    from edgeproxy.worker import WorkerAgent

    service = workerService(tmp_path)
    agent = WorkerAgent(service, 2)
    channel, transport, _ = connectedChannel()
    agent.channel = channel
    service.metrics.requestDone("all", "app", 200, 0.01)
    agent.handle({"op": "status", "id": 7})
    agent.handle({"op": "metrics", "id": 8})
    status, metrics = sentMessages(transport)
    assert status["op"] == "status" and status["id"] == 7 and status["answer"] is True
    assert status["status"]["worker"] == 2 and status["status"]["pid"] == os.getpid()
    assert status["status"]["backends"] == {"app": {"127.0.0.1:9001": 0, "127.0.0.1:9002": 0}}
    assert (metrics["op"], metrics["id"]) == ("metrics", 8)
    assert samplesOf(metrics["text"].encode())[
        ("edgeproxy_requests_total", (("code", "2xx"), ("route", "all"), ("upstream", "app")))] == 1


def test_aListenerAddedByAReloadGetsNewWorkers(harness: Harness, receiver: Receiver) -> None:
    harness.start()
    for number in (1, 2):
        harness.latest(number).ready()
    old = {n: harness.latest(n) for n in (1, 2)}
    receiver.all()
    harness.path.write_text(EDGE_INI.format(workers=2) + """
[listen:third]
endpoint = tcp:0:interface=127.0.0.1
tls = no
""")
    harness.supervisor.reload()
    third = harness.reactor.ports[2]
    assert not third.reading
    new = {n: harness.latest(n) for n in (1, 2)}
    assert all(new[n] is not old[n] for n in (1, 2))
    for spawned in new.values():
        assert spawned.env["LISTEN_FDNAMES"] == "web:other:third"
        assert spawned.childFDs[5] == third.fileno()
    # The old workers serve on until their replacements are ready.
    assert [old[n].transport.signals for n in (1, 2)] == [[], []]
    new[1].ready()
    assert old[1].transport.signals == ["TERM"] and old[2].transport.signals == []
    assert [d.split(b"\n")[0] for d in receiver.all()] == [b"RELOADING=1"]
    new[2].ready()
    assert old[2].transport.signals == ["TERM"]
    assert [d.split(b"\n")[0] for d in receiver.all()] == [b"READY=1"]
    # A replaced worker that exits is not restarted.
    count = len(harness.reactor.spawned)
    old[1].end(ProcessDone(0))
    harness.reactor.advance(slots.MAX_RESTART_DELAY)
    assert len(harness.reactor.spawned) == count
    assert harness.supervisor.workers[1] is new[1].protocol


def test_aListenerRemovedByAReloadIsClosed(harness: Harness) -> None:
    harness.start()
    for number in (1, 2):
        harness.latest(number).ready()
    harness.path.write_text(EDGE_INI.format(workers=2).replace(
        "[listen:other]\nendpoint = tcp:0:interface=127.0.0.1\ntls = no\n", ""))
    harness.supervisor.reload()
    web, other = harness.reactor.ports
    assert other.stopped and not web.stopped
    # No new socket: the workers reload themselves.
    assert [harness.latest(n).transport.signals for n in (1, 2)] == [["HUP"], ["HUP"]]
    assert len(harness.reactor.spawned) == 2


def test_twistdRunsASupervisorOnlyForMoreThanOneWorker(tmp_path: Path) -> None:
    from edgeproxy.serve.service import EdgeService
    from edgeproxy.tap import Options

    path = tmp_path / "edge.ini"
    for workers, kind in ((2, Supervisor), (1, EdgeService)):
        path.write_text(EDGE_INI.format(workers=workers))
        options = Options()
        options.parseOptions(["--config", str(path)])
        assert type(options.service) is kind


def test_theWorkerReadsTheInitialStateBeforeListening() -> None:
    from edgeproxy.worker import readInitialState

    read, write = os.pipe()
    try:
        os.write(write, b'{"op": "verdict", "address": "a"}\n{"op": "verdict", "address": "b"}\n'
                        b'{"op": "state-end"}\n{"op": "status", "id": 1}\n{"op": "met')
        messages, rest = readInitialState(read, 5.0)
        assert [m["address"] for m in messages] == ["a", "b"]
        # What follows is left for the channel.
        assert rest == b'{"op": "status", "id": 1}\n{"op": "met'
    finally:
        os.close(read)
        os.close(write)


def test_theWorkerStartsWithoutTheInitialStateWhenNoneComes(events: list[dict]) -> None:
    from edgeproxy.worker import readInitialState

    read, write = os.pipe()
    try:
        os.write(write, b'{"op": "verdict", "address": "a"}\n{"op": "verd')
        messages, rest = readInitialState(read, 0.05)
        assert [m["address"] for m in messages] == ["a"] and rest == b'{"op": "verd'
        assert any("no backend states" in (e.get("log_format") or "") for e in events)
        os.close(write)
        write = -1
        assert readInitialState(read, 5.0) == ([], b"")
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


def test_aSingleProcessSaysAChangeOfWorkersNeedsARestart(tmp_path: Path, events: list[dict]) -> None:
    from edgeproxy.serve.service import EdgeService

    path = tmp_path / "edge.ini"
    path.write_text(EDGE_INI.format(workers=1))
    service = EdgeService(load(str(path)), MemoryReactorClock(), notifier=Notifier(environ={}),
                          installSignalHandlers=False)
    path.write_text(EDGE_INI.format(workers=4))
    assert service.reloadConfiguration() is not None
    warnings = [formatEventAsClassicLogText(e) for e in events
                if e.get("log_level") is not None and e["log_level"].name == "warn"]
    assert any("[edgeproxy] workers = 4: takes effect at the next restart" in w for w in warnings)


def test_aReloadDuringTheStartDoesNotSayReadyEarly(harness: Harness, receiver: Receiver) -> None:
    harness.start()
    harness.latest(1).ready()
    harness.supervisor.reload()
    # Worker 1 reloads; worker 2, still starting, reads the file anyway.
    assert harness.latest(1).transport.signals == ["HUP"]
    assert harness.latest(2).transport.signals == []
    assert [d.split(b"\n")[0] for d in receiver.all()] == [b"RELOADING=1"]
    harness.latest(1).ready()
    assert receiver.all() == []
    harness.latest(2).ready()
    assert [d.split(b"\n")[0] for d in receiver.all()] == [b"READY=1"]


def test_processSeriesLabelledPerProcess() -> None:
    """
    process_* of each process becomes its own series (a start time or an
    open-descriptor count summed over processes means nothing); other
    families are left alone, to be summed.
    """
    from edgeproxy.workers import labelled, mergeExpositions
    from tests.metricsutil import samplesOf

    def exposition(start: float, requests: float) -> str:
        return (
            "# HELP process_start_time_seconds Start time.\n# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {start}\n"
            "# HELP edgeproxy_requests Requests.\n# TYPE edgeproxy_requests counter\n"
            f'edgeproxy_requests_total{{code="2xx"}} {requests}\n'
        )

    merged = mergeExpositions(
        labelled(exposition(100.0, 0.0), "process_", "worker", "supervisor"),
        [labelled(exposition(200.0, 3.0), "process_", "worker", "1"),
         labelled(exposition(300.0, 4.0), "process_", "worker", "2")],
    )
    samples = samplesOf(merged)
    assert samples[("process_start_time_seconds", (("worker", "supervisor"),))] == 100.0
    assert samples[("process_start_time_seconds", (("worker", "1"),))] == 200.0
    assert samples[("process_start_time_seconds", (("worker", "2"),))] == 300.0
    assert samples[("edgeproxy_requests_total", (("code", "2xx"),))] == 7.0
