"""
Tests for the workers mode, in memory: the control channel and the merging
of metrics (L{edgeproxy.workers}), the worker's configuration and agent
(L{edgeproxy.worker}), and the supervisor (L{edgeproxy.supervisor}) driving
processes of a memory reactor.  The real processes are in
C{tests/integration/test_workers.py}.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from edgeproxy.config.model import (
    Config,
    Listener,
    ProxySettings,
    Route,
    Server,
    Upstream,
)
from edgeproxy.metrics import Metrics
from edgeproxy.workers import (
    ControlChannel,
    NoAnswer,
    answer,
    mergeExpositions,
    systemdEndpoint,
    workerConfig,
)


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


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_mergeSumsCountersHistogramsAndGauges() -> None:
    own, one, two = Metrics(), Metrics(), Metrics()
    own.healthChecked("app", "127.0.0.1:9001", True)
    one.requestDone("all", "app", 200, 0.003)
    one.requestDone("all", "app", 502, 0.2)
    two.requestDone("all", "app", 200, 0.004)
    two.connectionAccepted("web")
    one.setStateSource(lambda: [("connections_active", "Open.", {"listener": "web"}, 3.0)])
    two.setStateSource(lambda: [("connections_active", "Open.", {"listener": "web"}, 4.0)])
    merged = samples(mergeExpositions(own.exposition(), [one.exposition(), two.exposition()]))
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
    merged = samples(mergeExpositions(
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
    assert samples(merged)[("edgeproxy_requests_total",
                            (("code", "2xx"), ("route", 'r"1\\'), ("upstream", "app")))] == 2
