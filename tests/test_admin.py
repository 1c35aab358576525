"""
Tests for L{edgeproxy.admin}: a real L{EdgeService} (certificates, pools,
listeners on a memory reactor) and its admin site, spoken to over memory
transports.  Assertions are on the bytes an operator's client gets (status,
headers, the JSON, the Prometheus text) and on what an action changes for
traffic (which backend the pool picks).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from edgeproxy import __version__
from edgeproxy.admin.site import (
    HEADER_TIMEOUT,
    MAX_BODY_SIZE,
    MAX_CONNECTIONS,
    AdminSite,
)
from edgeproxy.admin.status import statusDocument
from edgeproxy.config.model import (
    Config,
    Listener,
    ProxySettings,
    Route,
    Server,
    TLSSettings,
    Upstream,
)
from edgeproxy.config.stagemodel import CacheSettings, RouteCache
from edgeproxy.errors import ServiceUnavailable
from edgeproxy.metrics import CONTENT_TYPE
from edgeproxy.serve.service import EdgeService
from edgeproxy.systemd import Notifier
from edgeproxy.upstream.backend import BackendState, CheckResult
from tests.certutil import CertificateAuthority
from tests.metricsutil import samplesOf

TOKEN = "0123456789abcdef-token"
PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def makeConfig(certdir: Path, token: str | None = TOKEN, cache: CacheSettings | None = None) -> Config:
    return Config(
        path="/etc/edgeproxy/edge.ini",
        proxy=ProxySettings(access_log=None, admin="tcp:9901:interface=127.0.0.1", admin_token=token),
        tls=TLSSettings(certificates=(str(certdir),), default=str(certdir / "default.pem")),
        listeners=(
            Listener(name="https", endpoint="tcp:8443:interface=127.0.0.1", tls=True),
            Listener(name="plain", endpoint="tcp:8080:interface=127.0.0.1", tls=False),
        ),
        upstreams={
            "app": Upstream(
                name="app",
                servers=(Server("127.0.0.1", 9001, weight=2), Server("127.0.0.1", 9002, backup=True)),
            ),
            "v6": Upstream(name="v6", servers=(Server("::1", 9003),), balance="least_conn",
                           health_path="/healthz"),
        },
        routes=(
            Route(
                name="app", hosts=("*",), paths=("/",), upstream="app",
                cache=None if cache is None else RouteCache(),
            ),
        ),
        cache=cache,
    )


class Admin:
    """A started service and its admin site."""

    def __init__(self, root: Path, token: str | None = TOKEN, cache: CacheSettings | None = None) -> None:
        self.ca = CertificateAuthority("admin test root")
        certdir = root / "certs"
        certdir.mkdir()
        self.ca.issue(["localhost"]).writePEM(certdir / "default.pem")
        self.ca.issue(["a.example", "b.example"]).writePEM(certdir / "a.pem")
        self.reactor = MemoryReactorClock()
        self.reactor.advance(time.time())
        self.service = EdgeService(
            makeConfig(certdir, token, cache), self.reactor, notifier=Notifier({}), installSignalHandlers=False
        )
        self.service.startService()
        [adminFactory] = [f for port, f, _, _ in self.reactor.tcpServers if port == 9901]
        assert isinstance(adminFactory, AdminSite)
        self.site: AdminSite = adminFactory
        self.pool = self.service.currentRuntime().pools["app"]

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(PEER)
        assert protocol is not None
        transport = StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        return protocol, transport

    def ask(self, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        protocol, transport = self.connect()
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body:
            lines.append(f"Content-Length: {len(body)}")
        protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body)
        return parseResponse(transport.value())

    def act(self, action: str, address: str = "127.0.0.1:9001", upstream: str = "app",
            token: str | None = TOKEN) -> tuple[int, dict[str, str], bytes]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return self.ask("POST", f"/upstreams/{upstream}/backends/{address}/{action}", headers)


def parseResponse(wire: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = wire.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    return Admin(tmp_path)


@pytest.fixture
def events() -> Any:
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def logged(events: list[dict[str, Any]], text: str) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if text in formatEvent(e)]


# GET /status


def test_statusDocument(admin: Admin) -> None:
    status, headers, body = admin.ask("GET", "/status")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert "server" not in headers
    document = json.loads(body)
    assert document["version"] == __version__
    assert isinstance(document["pid"], int)
    assert document["started"] == pytest.approx(admin.reactor.seconds())
    assert document["workers"] == 1
    assert document["listeners"] == [
        {"name": "https", "endpoint": "tcp:8443:interface=127.0.0.1", "tls": True,
         "address": "0.0.0.0:8443", "connections": 0, "in_flight": 0},
        {"name": "plain", "endpoint": "tcp:8080:interface=127.0.0.1", "tls": False,
         "address": "0.0.0.0:8080", "connections": 0, "in_flight": 0},
    ]
    certificates = sorted(document["certificates"], key=lambda c: c["names"])
    assert [c["names"] for c in certificates] == [["a.example", "b.example"], ["localhost"]]
    assert [c["default"] for c in certificates] == [False, True]
    for certificate in certificates:
        assert certificate["file"].endswith(".pem")
        assert certificate["not_after"].endswith("Z")
        assert 0 < certificate["expires_in_days"] < 400
        assert certificate["not_after_timestamp"] > admin.reactor.seconds()
    app = document["upstreams"]["app"]
    assert (app["balance"], app["health_checks"]) == ("round_robin", False)
    assert app["backends"] == [
        {"address": "127.0.0.1:9001", "server": "127.0.0.1:9001", "state": "up", "reason": None,
         "available": True, "weight": 2, "effective_weight": 2.0, "backup": False, "max_conns": 0, "in_flight": 0,
         "ejected_until": None, "ejections": 0, "last_check": None},
        {"address": "127.0.0.1:9002", "server": "127.0.0.1:9002", "state": "up", "reason": None,
         "available": True, "weight": 1, "effective_weight": 1.0, "backup": True, "max_conns": 0, "in_flight": 0,
         "ejected_until": None, "ejections": 0, "last_check": None},
    ]
    v6 = document["upstreams"]["v6"]
    assert (v6["balance"], v6["health_checks"]) == ("least_conn", True)
    assert [b["address"] for b in v6["backends"]] == ["[::1]:9003"]


def test_statusFollowsTheLiveObjects(admin: Admin) -> None:
    """State, last check, ejection and in-flight come from the backends and the pool as they are now."""
    first, second = admin.pool.backends
    first.state = BackendState.DOWN
    first.reason = "3 failed checks in a row: connection refused"
    first.lastCheck = CheckResult(ok=False, at=1000.5, detail="connection refused", duration=0.002)
    second.ejectedUntil = 2000.0
    second.ejections = 3
    admin.pool.balancer.acquired(second)
    document = json.loads(admin.ask("GET", "/status")[2])
    one, two = document["upstreams"]["app"]["backends"]
    assert (one["state"], one["reason"], one["available"]) == (
        "down", "3 failed checks in a row: connection refused", False)
    assert one["last_check"] == {"ok": False, "at": 1000.5, "detail": "connection refused",
                                 "duration": 0.002}
    assert (two["ejected_until"], two["ejections"], two["available"], two["in_flight"]) == (
        2000.0, 3, False, 1)


def test_statusShowsSlowStartAndFailOpen(admin: Admin) -> None:
    """effective_weight follows the slow-start ramp; an unknown backend is available only while none is up."""
    first, second = admin.pool.backends
    first.startSlowStart(10.0)
    admin.reactor.advance(5.0)
    [one, _] = json.loads(admin.ask("GET", "/status")[2])["upstreams"]["app"]["backends"]
    assert one["effective_weight"] == pytest.approx(2 * (0.1 + 0.9 * 0.5))
    first.state = second.state = BackendState.UNKNOWN
    one, two = json.loads(admin.ask("GET", "/status")[2])["upstreams"]["app"]["backends"]
    assert (one["available"], two["available"]) == (True, True)
    second.state = BackendState.UP
    one, two = json.loads(admin.ask("GET", "/status")[2])["upstreams"]["app"]["backends"]
    assert (one["state"], one["available"], two["available"]) == ("unknown", False, True)


def test_statusCountsConnections(admin: Admin) -> None:
    site = admin.service.sites[1]
    protocol = site.buildProtocol(PEER)
    protocol.makeConnection(StringTransport(peerAddress=PEER))
    document = json.loads(admin.ask("GET", "/status")[2])
    assert [listener["connections"] for listener in document["listeners"]] == [0, 1]


def test_statusDocumentIsJSONSerialisable(admin: Admin) -> None:
    """The builder other processes reuse (the workers' supervisor) returns plain JSON values."""
    document = statusDocument(admin.service)
    assert json.loads(json.dumps(document)) == document


def test_headStatus(admin: Admin) -> None:
    status, headers, body = admin.ask("HEAD", "/status")
    assert (status, body) == (200, b"")
    assert headers["content-type"] == "application/json"


# GET /metrics


def test_metricsEndpoint(admin: Admin) -> None:
    first = admin.pool.backends[0]
    first.state = BackendState.DRAINING
    admin.pool.balancer.acquired(first)
    site = admin.service.sites[0]
    # Counted as accepted (and open) on "https" once connected.
    site.buildProtocol(PEER).makeConnection(StringTransport(peerAddress=PEER))
    status, headers, body = admin.ask("GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE
    samples = samplesOf(body)

    def get(metric: str, **labels: str) -> float | None:
        return samples.get((metric, tuple(sorted(labels.items()))))

    assert get("edgeproxy_info", version=__version__) == 1
    assert get("edgeproxy_start_time_seconds") == pytest.approx(admin.reactor.seconds())
    assert get("edgeproxy_connections_active", listener="https") == 1
    assert get("edgeproxy_connections_active", listener="plain") == 0
    assert get("edgeproxy_connections_total", listener="https") == 1
    for state in BackendState:
        assert get("edgeproxy_backend_state", upstream="app", backend="127.0.0.1:9001",
                   state=state.value) == (1 if state is BackendState.DRAINING else 0)
    assert get("edgeproxy_backend_state", upstream="app", backend="127.0.0.1:9002", state="up") == 1
    assert get("edgeproxy_backend_in_flight", upstream="app", backend="127.0.0.1:9001") == 1
    assert get("edgeproxy_backend_ejected", upstream="app", backend="127.0.0.1:9002") == 0
    [entry] = [e for e in admin.service.store.current.entries if "b.example" in e.names]
    expiry = get("edgeproxy_certificate_expiry_timestamp_seconds", name="b.example", file=entry.path)
    assert expiry == entry.notAfter.timestamp()
    assert expiry > admin.reactor.seconds()
    assert all(name.startswith(("edgeproxy_", "process_")) for name, _ in samples)


# Routing and methods


@pytest.mark.parametrize("path", ["/", "/status/", "/statusx", "/upstreams/app", "/%ff"])
def test_unknownPath(admin: Admin, path: str) -> None:
    status, headers, body = admin.ask("GET", path)
    assert status == 404
    assert json.loads(body) == {"error": "not found"}


@pytest.mark.parametrize("method,path,allow", [
    ("POST", "/status", "GET, HEAD"),
    ("DELETE", "/metrics", "GET, HEAD"),
    ("GET", "/upstreams/app/backends/127.0.0.1:9001/drain", "POST"),
])
def test_wrongMethod(admin: Admin, method: str, path: str, allow: str) -> None:
    status, headers, _ = admin.ask(method, path)
    assert status == 405
    assert headers["allow"] == allow


def askOn(admin: Admin, local: str, host: str | None) -> int:
    """The status of GET /status on a connection to C{local}, with C{Host}."""
    protocol = admin.site.buildProtocol(PEER)
    assert protocol is not None
    transport = StringTransport(hostAddress=IPv4Address("TCP", local, 9901), peerAddress=PEER)
    protocol.makeConnection(transport)
    head = "GET /status HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
    protocol.dataReceived((head + "\r\n").encode("ascii"))
    return parseResponse(transport.value())[0]


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:9901", "127.0.0.1:9901", "[::1]:9901", "prometheus.localhost"]
)
def test_loopbackAnswersLocalNames(admin: Admin, host: str) -> None:
    assert askOn(admin, "127.0.0.1", host) == 200


def test_loopbackRefusesOtherNames(admin: Admin, events: list[dict[str, Any]]) -> None:
    """
    DNS rebinding: a page on evil.example rebinds its name to 127.0.0.1 and
    reads the loopback admin listener; the Host it must send gives it away.
    """
    assert askOn(admin, "127.0.0.1", "evil.example:9901") == 403
    assert logged(events, "refused GET /status") == [
        "admin: refused GET /status from 127.0.0.1:40000 for Host evil.example:9901"
        " (a loopback admin listener answers only IP addresses and localhost)"
    ]


def test_otherAddressesAnswerAnyName(admin: Admin) -> None:
    """A listener on a management address is scraped by name; no browser rebinds to it."""
    assert askOn(admin, "10.1.2.3", "edge-1.mgmt.example:9901") == 200


def test_statusNeedsNoToken(admin: Admin) -> None:
    assert admin.ask("GET", "/status", {"Authorization": "Bearer wrong"})[0] == 200


# Actions


def test_actionsOffWithoutToken(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    admin = Admin(tmp_path, token=None)
    status, headers, body = admin.act("drain", token="anything-at-all-here")
    assert status == 403
    assert "admin actions are off" in json.loads(body)["error"]
    assert admin.pool.backends[0].state is BackendState.UP
    assert logged(events, "admin actions are off")


@pytest.mark.parametrize("authorization", [None, "Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"])
def test_actionsNeedTheToken(admin: Admin, events: list[dict[str, Any]], authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    status, response, _ = admin.ask("POST", "/upstreams/app/backends/127.0.0.1:9001/drain", headers)
    assert status == 401
    assert response["www-authenticate"] == 'Bearer realm="edgeproxy admin"'
    assert admin.pool.backends[0].state is BackendState.UP
    [line] = logged(events, "admin: 127.0.0.1:40000 refused")
    assert TOKEN not in line


def test_schemeIsCaseInsensitive(admin: Admin) -> None:
    status, _, _ = admin.ask("POST", "/upstreams/app/backends/127.0.0.1:9001/drain",
                             {"Authorization": f"bEaReR {TOKEN}"})
    assert status == 200


def test_drainDisableEnable(admin: Admin, events: list[dict[str, Any]]) -> None:
    first, second = admin.pool.backends
    status, headers, body = admin.act("drain")
    assert status == 200 and headers["content-type"] == "application/json"
    entry = json.loads(body)
    assert (entry["address"], entry["state"], entry["available"]) == ("127.0.0.1:9001", "draining", False)
    assert entry["reason"] == "admin: drain by 127.0.0.1:40000"
    assert first.state is BackendState.DRAINING
    # Traffic sees it: only the other backend is picked now.
    assert {admin.pool.pickServer() for _ in range(6)} == {second}
    assert logged(events, "admin: 127.0.0.1:40000 drain backend 127.0.0.1:9001 of upstream app: up -> draining")

    status, _, body = admin.act("disable", "127.0.0.1:9002")
    assert (status, json.loads(body)["state"]) == (200, "disabled")
    with pytest.raises(ServiceUnavailable):
        admin.pool.pickServer()

    status, _, body = admin.act("enable")
    assert (status, json.loads(body)["state"]) == (200, "up")
    assert {admin.pool.pickServer() for _ in range(6)} == {first}
    # /status says the same as the answers.
    backends = json.loads(admin.ask("GET", "/status")[2])["upstreams"]["app"]["backends"]
    assert [b["state"] for b in backends] == ["up", "disabled"]
    samples = samplesOf(admin.ask("GET", "/metrics")[2])
    assert samples[("edgeproxy_backend_transitions_total",
                    (("backend", "127.0.0.1:9001"), ("state", "draining"), ("upstream", "app")))] == 1


def test_ipv6BackendPercentEncoded(admin: Admin) -> None:
    status, _, body = admin.act("disable", "%5B%3A%3A1%5D%3A9003", upstream="v6")
    assert (status, json.loads(body)["address"], json.loads(body)["state"]) == (200, "[::1]:9003", "disabled")


@pytest.mark.parametrize("upstream,address,message", [
    ("nope", "127.0.0.1:9001", "no upstream nope"),
    ("app", "127.0.0.1:9999", "no backend 127.0.0.1:9999 in upstream app"),
])
def test_unknownUpstreamOrBackend(admin: Admin, upstream: str, address: str, message: str) -> None:
    status, _, body = admin.act("drain", address, upstream=upstream)
    assert (status, json.loads(body)) == (404, {"error": message})


def test_unknownActionIsNotFound(admin: Admin) -> None:
    assert admin.act("explode")[0] == 404


# Bounds


def test_largeBodyRefused(admin: Admin) -> None:
    protocol, transport = admin.connect()
    protocol.dataReceived(
        b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_SIZE + 1)
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting


def test_largeChunkedBodyRefused(admin: Admin) -> None:
    protocol, transport = admin.connect()
    protocol.dataReceived(b"POST /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 1024
    for _ in range(MAX_BODY_SIZE // 1024 + 1):
        protocol.dataReceived(b"400\r\n" + chunk + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting


def test_headerDeadline(admin: Admin) -> None:
    protocol, transport = admin.connect()
    protocol.dataReceived(b"GET /status HTTP/1.1\r\nHost: x\r\n")
    admin.reactor.advance(HEADER_TIMEOUT - 0.1)
    protocol.dataReceived(b"X-Slow: 1\r\n")  # a byte does not push the deadline back
    assert transport.value() == b""
    admin.reactor.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


def test_keptAliveConnectionGetsADeadlinePerRequest(admin: Admin) -> None:
    protocol, transport = admin.connect()
    protocol.dataReceived(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    admin.reactor.advance(HEADER_TIMEOUT * 2)  # idle between requests: no 408 (idle timeout is longer)
    assert not transport.disconnecting
    transport.clear()
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\n")
    admin.reactor.advance(HEADER_TIMEOUT + 0.1)
    assert transport.value().startswith(b"HTTP/1.1 408 ")


def test_largeHeadRefused(admin: Admin) -> None:
    protocol, transport = admin.connect()
    protocol.dataReceived(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 431 ")
    assert transport.disconnecting
    # Many small lines add up the same way.
    protocol, transport = admin.connect()
    protocol.dataReceived(b"GET /status HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-%d: %s\r\n" % (i, b"a" * 3000) for i in range(3)) + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert transport.disconnecting


def test_connectionLimit(admin: Admin) -> None:
    open_ = [admin.connect() for _ in range(MAX_CONNECTIONS)]
    assert admin.site.buildProtocol(PEER) is None
    protocol, _ = open_[0]
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    protocol.connectionLost(Failure(ConnectionDone()))
    assert admin.site.buildProtocol(PEER) is not None


def test_noAccessLogLines(admin: Admin, events: list[dict[str, Any]]) -> None:
    admin.ask("GET", "/status")
    admin.ask("GET", "/metrics")
    assert not [e for e in events if e.get("log_namespace") == "edgeproxy.access"]
    assert not logged(events, "GET /status")


# Reload


INI = """
[edgeproxy]
access_log = off
{admin}
admin_token = {token}

[listen:plain]
endpoint = tcp:8080:interface=127.0.0.1

[upstream:app]
servers = 127.0.0.1:9001

[route:app]
hosts = *
paths = /
upstream = app
"""


def test_reloadFollowsAdminSettings(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    """A reload moves the admin listener to its new endpoint, closes it when removed, and uses the new token."""
    from edgeproxy.config import load

    path = tmp_path / "edge.ini"
    path.write_text(INI.format(admin="admin = tcp:9901:interface=127.0.0.1", token=TOKEN))
    reactor = MemoryReactorClock()
    service = EdgeService(load(str(path)), reactor, notifier=Notifier({}), installSignalHandlers=False)
    service.startService()
    assert [p for p, _, _, _ in reactor.tcpServers] == [8080, 9901]
    first = service.adminPort

    newToken = "another-token-0123456789"
    path.write_text(INI.format(admin="admin = tcp:9902:interface=127.0.0.1", token=newToken))
    service.reloadConfiguration()
    assert [p for p, _, _, _ in reactor.tcpServers] == [8080, 9901, 9902]
    assert service.adminPort is not None and service.adminPort is not first
    site = reactor.tcpServers[-1][1]

    def drain(token: str) -> int:
        protocol = site.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        protocol.dataReceived(
            b"POST /upstreams/app/backends/127.0.0.1:9001/drain HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n\r\n")
        return parseResponse(transport.value())[0]

    assert drain(TOKEN) == 401
    assert drain(newToken) == 200

    path.write_text(INI.format(admin="", token=newToken).replace("admin_token = " + newToken, ""))
    service.reloadConfiguration()
    assert service.adminPort is None
    assert logged(events, "Admin listener closed (no longer configured)")


# A service that answers later (the workers' supervisor)


def test_aggregatedAnswersWhenReady(admin: Admin) -> None:
    """A service with aggregateStatus/aggregateMetrics (the supervisor) answers when they fire."""
    from twisted.internet.defer import Deferred

    status: Deferred[dict[str, Any]] = Deferred()
    metrics: Deferred[bytes] = Deferred()
    asked: list[float] = []
    admin.service.aggregateStatus = lambda now: asked.append(now) or status  # type: ignore[attr-defined]
    admin.service.aggregateMetrics = lambda: metrics  # type: ignore[attr-defined]
    protocol, transport = admin.connect()
    protocol.dataReceived(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value() == b"" and asked == [admin.reactor.seconds()]
    status.callback({"workers": 2, "worker_processes": []})
    code, headers, body = parseResponse(transport.value())
    assert (code, headers["content-type"], json.loads(body)) == (
        200, "application/json", {"workers": 2, "worker_processes": []})
    transport.clear()
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value() == b""
    metrics.callback(b"# edgeproxy: 2 of 2 workers answered\nedgeproxy_info{version=\"x\"} 1.0\n")
    code, headers, body = parseResponse(transport.value())
    assert (code, headers["content-type"]) == (200, CONTENT_TYPE)
    assert body.startswith(b"# edgeproxy: 2 of 2 workers answered\n")


def test_aggregateFailureIs500(admin: Admin) -> None:
    from twisted.internet.defer import fail

    admin.service.aggregateStatus = lambda now: fail(RuntimeError("boom"))  # type: ignore[attr-defined]
    status, _, body = admin.ask("GET", "/status")
    assert (status, json.loads(body)) == (500, {"error": "internal error, see the log"})


def test_adminPortInUseStopsTheStart(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    """Like a listener's, an admin port that cannot be bound stops the start (exit status 1)."""
    from twisted.internet.error import CannotListenError

    class Busy(MemoryReactorClock):
        def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            if port == 9901:
                raise CannotListenError(interface, port, OSError(98, "Address already in use"))
            return super().listenTCP(port, factory, backlog, interface)

    certdir = tmp_path / "certs"
    certdir.mkdir()
    CertificateAuthority("busy").issue(["localhost"]).writePEM(certdir / "default.pem")
    reactor = Busy()
    reactor.advance(time.time())
    service = EdgeService(makeConfig(certdir), reactor, notifier=Notifier({}), installSignalHandlers=False)
    with pytest.raises(SystemExit) as exited:
        service.startService()
    assert exited.value.code == 1
    assert service.adminPort is None and service.ports == []
    [line] = logged(events, "[edgeproxy] admin")
    assert "/etc/edgeproxy/edge.ini: [edgeproxy] admin 'tcp:9901:interface=127.0.0.1': cannot listen" in line
    assert "Address already in use" in line


def test_everyMetricIsDocumented(tmp_path: Path) -> None:
    """docs/operations.rst ("Metrics") lists exactly the families /metrics can serve."""
    import re

    admin = Admin(tmp_path, cache=CacheSettings(disk=str(tmp_path / "cache")))
    metrics = admin.service.metrics
    # One event of each kind, so that every family has a sample.
    metrics.requestDone("app", "app", 200, 0.1)
    metrics.backendResponded("app", "10.0.0.1:80", 200, 0.1)
    metrics.upstreamFailed("app", 502)
    metrics.bytesTransferred("https", 1, 1)
    metrics.connectionAccepted("https")
    metrics.handshakeDone("https", "1.3", "h2")
    metrics.handshakeFailed("https")
    metrics.healthChecked("app", "127.0.0.1:9001", True)
    metrics.backendTransition("app", "127.0.0.1:9001", "up")
    metrics.ejected("app", "127.0.0.1:9001")
    metrics.retried("app", "connect")
    metrics.retryRefused("app")
    metrics.queueTimedOut("app")
    metrics.reloaded(True)
    metrics.acmeOrdered(False)
    metrics.acmeObtained(True)
    metrics.acmeFailed("rateLimited")
    metrics.backendRequest("app", "127.0.0.1:9001")
    metrics.backendResponded("app", "127.0.0.1:9001", 200, 0.1)
    metrics.backendTraffic("app", "127.0.0.1:9001").received += 1
    metrics.compressed("br", 100, 10)
    metrics.imageConverted("avif", 100, 50, 0.1)
    metrics.imageKept("webp", "larger")
    served = {family.name for family in text_string_to_metric_families(admin.ask("GET", "/metrics")[2].decode())}
    docs = (Path(__file__).parents[1] / "docs" / "operations.rst").read_text()
    section = docs[docs.index("\nMetrics\n-------\n") + 17:]
    following = re.search(r"\n[^\n]+\n-{3,}\n", section)  # the next section's heading
    if following is not None:
        section = section[:following.start()]
    documented = {
        re.sub(r"_total$", "", name)
        for name in re.findall(r"``((?:edgeproxy|process)_[a-z_]+)``", section)
    }
    assert served == documented
