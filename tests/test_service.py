"""
Tests for L{edgeproxy.serve.service} and L{edgeproxy.tap}, in memory: listeners on
a L{MemoryReactorClock}, notifications to a real C{AF_UNIX} socket, reload
with real certificate files, and the drain of real channels over
L{StringTransport}s.  The real process is in
C{tests/integration/test_twistd.py}.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure

from edgeproxy.config.model import (
    Config,
    Listener,
    ProxySettings,
    Route,
    Server,
    TLSSettings,
    Upstream,
)
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.serve.service import EdgeService
from edgeproxy.serve.sites import channelBusy, closeAfterResponse, closeIdle
from edgeproxy.systemd import Notifier
from tests.certutil import CertificateAuthority
from tests.fastpaths import using
from tests.proc import NotifyReceiver


class Reactor(MemoryReactorClock):
    """A memory reactor that runs callFromThread calls when asked."""

    def __init__(self, refuse: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__()
        # Certificates are checked against this clock: start at the real time.
        self.advance(time.time())
        self.fromThreads: list[Any] = []
        self._refuse = refuse
        # Like the kernel: a port listened on cannot be bound again until
        # it is closed.
        self.bound: set[int] = set()
        self.refuseTLS = False

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.fromThreads.append((f, args, kwargs))

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self._refuse or port in self.bound or (
            self.refuseTLS and isinstance(factory, TLSMemoryBIOFactory)
        ):
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        listening = super().listenTCP(port, factory, backlog, interface)
        listening.disconnected = False
        self.bound.add(port)
        stop = listening.stopListening

        def stopListening() -> Any:
            listening.disconnected = True
            self.bound.discard(port)
            return stop()

        listening.stopListening = stopListening
        return listening


@pytest.fixture
def receiver() -> Iterator[NotifyReceiver]:
    r = NotifyReceiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def events() -> Iterator[list[dict]]:
    captured: list[dict] = []
    globalLogPublisher.addObserver(captured.append)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(captured.append)


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Any]:
    ca = CertificateAuthority()
    directory = tmp_path / "certs"
    directory.mkdir()
    default = ca.issue(["localhost"])
    a = ca.issue(["a.example"])
    default.writePEM(directory / "default.pem")
    a.writePEM(directory / "a.pem")
    return {"ca": ca, "dir": directory, "default": default, "a": a}


def makeConfig(certs: dict[str, Any], insecure: bool = False, shutdown: float = 5.0) -> Config:
    return Config(
        path="/etc/edgeproxy/edge.ini",
        proxy=ProxySettings(access_log=None, shutdown_timeout=shutdown),
        tls=TLSSettings(
            certificates=(str(certs["dir"]),),
            default=str(certs["dir"] / "default.pem"),
        ),
        listeners=(
            Listener(name="https", endpoint="tcp:8443:interface=127.0.0.1", tls=True),
            Listener(name="plain", endpoint="tcp:8080:interface=127.0.0.1", tls=False),
            Listener(name="http", endpoint="tcp:8081", tls=False, redirect_https=True),
        ),
        upstreams={
            "app": Upstream(
                name="app", servers=(Server("127.0.0.1", 9),), tls=insecure, insecure=insecure
            )
        },
        routes=(Route(name="app", hosts=("*",), paths=("/",), upstream="app"),),
    )


def build(certs: dict[str, Any], receiver: NotifyReceiver, reactor: Reactor | None = None, **kw: Any) -> EdgeService:
    return EdgeService(
        makeConfig(certs, **kw),
        reactor if reactor is not None else Reactor(),
        notifier=Notifier({"NOTIFY_SOCKET": receiver.path}),
        installSignalHandlers=False,
    )


def test_listensAndIsReadyAfterwards(certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]) -> None:
    reactor = Reactor()
    service = build(certs, receiver, reactor)
    assert receiver.all() == []
    service.startService()
    try:
        assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
            (8443, "127.0.0.1"), (8080, "127.0.0.1"), (8081, ""),
        ]
        tlsFactory = reactor.tcpServers[0][1]
        assert isinstance(tlsFactory, TLSMemoryBIOFactory)
        assert isinstance(tlsFactory.wrappedFactory, ListenerFactory)
        assert isinstance(reactor.tcpServers[1][1], ListenerFactory)
        assert receiver.all() == [
            b"READY=1\nSTATUS=serving 3 listener(s) (https, plain, http), 2 certificate(s)"
        ]
        assert service.ready.called
        messages = [e.get("log_format", "") for e in events if e.get("log_namespace") == "edgeproxy.service"]
        assert any("Listening on" in m for m in messages)
        certificateLogs = [e for e in events if e.get("verb") == "Serving"]
        assert sorted(e["names"] for e in certificateLogs) == ["a.example", "localhost"]
        # Sites read the service's current runtime: rebinding it switches them.
        site = tlsFactory.wrappedFactory
        assert site.currentRuntime() is service.runtime
        original = service.runtime
        replacement = object()
        service.runtime = replacement  # type: ignore[assignment]
        assert site.currentRuntime() is replacement
        service.runtime = original
    finally:
        service.stopService()
        reactor.advance(1)


def test_listenFailureExitsWithoutReady(certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]) -> None:
    reactor = Reactor(refuse={8080})
    service = build(certs, receiver, reactor)
    with pytest.raises(SystemExit) as raised:
        service.privilegedStartService()
    assert raised.value.code == 1
    assert receiver.all() == []
    assert not service.ready.called
    critical = [e for e in events if e["log_level"] == LogLevel.critical]
    assert len(critical) == 1
    assert critical[0]["message"].startswith(
        "/etc/edgeproxy/edge.ini: [listen:plain] endpoint 'tcp:8080:interface=127.0.0.1': cannot listen:"
    )
    assert "Address already in use" in critical[0]["message"]


def test_insecureUpstreamWarnedAtStart(certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]) -> None:
    reactor = Reactor()
    service = build(certs, receiver, reactor, insecure=True)
    service.startService()
    warnings = [e for e in events if e["log_level"] == LogLevel.warn and e.get("name") == "app"]
    assert len(warnings) == 1
    assert "NOT verified" in warnings[0]["log_format"]
    assert warnings[0]["servers"] == "127.0.0.1:9"
    service.stopService()
    reactor.advance(1)


INI = """
[edgeproxy]
access_log = {access_log}
shutdown_timeout = 5s

[tls]
certificates = {certdir}
default = {certdir}/default.pem

[listen:https]
endpoint = tcp:8443:interface=127.0.0.1
tls = yes

[listen:plain]
endpoint = tcp:8080:interface=127.0.0.1

[listen:http]
endpoint = tcp:8081
redirect_https = yes

[upstream:app]
servers = 127.0.0.1:9001

[upstream:api]
servers = 127.0.0.1:9002

[route:app]
hosts = *
paths = /
upstream = app
"""


def writeIni(tmp_path: Path, certs: dict[str, Any], text: str | None = None, access_log: str = "off") -> Path:
    path = tmp_path / "edge.ini"
    if text is None:
        text = INI
    path.write_text(text.format(certdir=certs["dir"], access_log=access_log))
    return path


def fromFile(path: Path, receiver: NotifyReceiver, reactor: Reactor) -> EdgeService:
    from edgeproxy.config import load

    return EdgeService(
        load(str(path)),
        reactor,
        notifier=Notifier({"NOTIFY_SOCKET": receiver.path}),
        installSignalHandlers=False,
    )


def result(d: Any) -> Any:
    """The result of a Deferred that has fired."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def connectTo(reactor: Reactor, site: Any, request: bytes) -> tuple[Any, StringTransport]:
    """A client connection on C{site} that sent C{request}."""
    channel, transport = connect(site)
    channel.dataReceived(request)
    return channel, transport


def test_reload(tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]) -> None:
    reactor = Reactor()
    service = fromFile(writeIni(tmp_path, certs), receiver, reactor)
    service.startService()
    receiver.all()
    store = service.store
    assert store is not None

    renewed = certs["ca"].issue(["a.example", "new.example"])
    renewed.writePEM(certs["dir"] / "a.pem")
    assert result(service.reload()) is True
    datagrams = receiver.all()
    assert datagrams[0].startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert datagrams[1].startswith(b"READY=1\n")
    served = {e.certificate.serial_number for e in store.current.entries}
    assert renewed.serial in served and certs["a"].serial not in served
    assert any(e.get("verb") == "Now serving" and "new.example" in e["names"] for e in events)

    # A key that belongs to another certificate: refused, the renewed set kept.
    other = certs["ca"].issue(["a.example"])
    (certs["dir"] / "a.pem").write_bytes(other.keyPEM + renewed.certificatePEM)
    del events[:]
    assert result(service.reload()) is False
    assert [d.split(b"\n")[0] for d in receiver.all()] == [b"RELOADING=1", b"READY=1"]
    assert renewed.serial in {e.certificate.serial_number for e in store.current.entries}
    errors = [e for e in events if e["log_level"] == LogLevel.error]
    assert len(errors) == 1
    assert str(certs["dir"] / "a.pem") in errors[0]["problem"]
    assert "does not match" in errors[0]["problem"]
    assert b'edgeproxy_reloads_total{result="ok"} 1.0' in service.metrics.exposition()
    assert b'edgeproxy_reloads_total{result="failed"} 1.0' in service.metrics.exposition()
    service.stopService()
    reactor.advance(1)


def test_reloadWithBadHtpasswdKeepsTheUsers(
    tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]
) -> None:
    """
    An htpasswd file edited into one the edge cannot use: the reload is
    refused with the file, section and key named, and the users read
    before are still those the route checks.
    """
    import bcrypt

    htpasswd = tmp_path / "users.htpasswd"
    htpasswd.write_text("ann:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode() + "\n")
    text = INI.replace("upstream = app\n", "upstream = app\nauth = staff\n") + (
        f"\n[auth:staff]\ntype = basic\nhtpasswd = {htpasswd}\n"
    )
    reactor = Reactor()
    service = fromFile(writeIni(tmp_path, certs, text), receiver, reactor)
    service.startService()
    users = service.config.auths["staff"].users
    assert [user for user, _ in users] == ["ann"]

    htpasswd.write_text("carl:$apr1$abc$def\n")
    del events[:]
    assert result(service.reload()) is False
    assert service.config.auths["staff"].users == users
    errors = [e for e in events if e["log_level"] == LogLevel.error]
    assert len(errors) == 1
    assert f"[auth:staff] htpasswd: {htpasswd}: line 1: user 'carl'" in errors[0]["problem"]
    service.stopService()
    reactor.advance(1)


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_fastPathsDecidedAtStartAndSaid(
    tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict], setting: str
) -> None:
    """
    The process's service decides its fast paths from C{fast_paths} before
    it listens, says which in one line, and builds its TLS listeners with
    them; a reload that changes the setting says it waits for a restart.
    """
    from twisted.protocols.tls import BufferingTLSTransport

    from edgeproxy._compat import decideFastPaths, fastPaths
    from edgeproxy._compat.twisted.tls import EdgeTLSTransport
    from edgeproxy.config import load

    text = INI.replace("shutdown_timeout = 5s", f"shutdown_timeout = 5s\nfast_paths = {setting}")
    reactor = Reactor()
    service = EdgeService(
        load(str(writeIni(tmp_path, certs, text))),
        reactor,
        notifier=Notifier({"NOTIFY_SOCKET": receiver.path}),
        installSignalHandlers=True,
    )
    with using(True):
        try:
            service.privilegedStartService()
            expected = decideFastPaths(setting)
            assert fastPaths() == expected
            lines = [e for e in events if e.get("log_format", "").startswith("Fast paths")]
            assert len(lines) == 1
            assert lines[0]["summary"] == expected.summary and lines[0]["why"] == expected.why
            if setting == "off":
                assert lines[0]["summary"] == "off, Twisted's public paths throughout"
                assert lines[0]["why"] == "[edgeproxy] fast_paths = off"
            tlsFactory = reactor.tcpServers[0][1]
            assert tlsFactory.protocol is (EdgeTLSTransport if expected.tls else BufferingTLSTransport)

            other = "auto" if setting == "off" else "off"
            writeIni(tmp_path, certs, INI.replace("shutdown_timeout = 5s", f"shutdown_timeout = 5s\nfast_paths = {other}"))
            del events[:]
            assert result(service.reload()) is True
            assert fastPaths() == expected
            warnings = [e for e in events if e["log_level"] == LogLevel.warn]
            assert [e["value"] for e in warnings] == [other]
            assert "takes effect at the next restart" in warnings[0]["log_format"]
        finally:
            service.signals.restoreHangup()
            service.stopService()
            reactor.advance(1)


def test_reloadSwapsRoutesAndKeepsUnchangedPools(
    tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]
) -> None:
    reactor = Reactor()
    path = writeIni(tmp_path, certs)
    service = fromFile(path, receiver, reactor)
    service.startService()
    site = service.sites[1]  # plain
    first = service.runtime
    # A request routed before the reload: its backend connection attempt
    # goes to app (9001), and it stays in flight on app's pool.
    busy, busyTransport = connectTo(reactor, site, b"GET /x HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert reactor.tcpClients[-1][:2] == ("127.0.0.1", 9001)
    appPool = first.pools["app"]
    assert sum(appPool.balancer.inFlight(b) for b in appPool.backends) == 1

    # The route moves to api; app's keep-alive setting changes; api stays.
    writeIni(tmp_path, certs, INI.replace("upstream = app", "upstream = api").replace(
        "servers = 127.0.0.1:9001", "servers = 127.0.0.1:9001\nkeepalive = 4"))
    assert result(service.reload()) is True
    second = service.runtime
    assert second is not first
    assert second.pools["api"] is first.pools["api"]  # kept, same object
    assert second.pools["app"] is not appPool
    assert second.pools["app"].upstream.keepalive == 4
    # New requests follow the new route...
    connectTo(reactor, site, b"GET /y HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert reactor.tcpClients[-1][:2] == ("127.0.0.1", 9002)
    # ...the one in flight is still counted on the old pool, which is not
    # closed while it runs, and is once it is done.
    closed = [e for e in events if "previous configuration closed" in e.get("log_format", "")]
    reactor.advance(2)
    assert closed == [] and not busyTransport.disconnecting
    appPool.balancer.released(appPool.backends[0])
    reactor.advance(1)
    closed = [e for e in events if "previous configuration closed" in e.get("log_format", "")]
    assert [e["upstream"] for e in closed] == ["app"]
    service.stopService()
    reactor.advance(10)


def test_brokenFileChangesNothing(
    tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]
) -> None:
    reactor = Reactor()
    path = writeIni(tmp_path, certs)
    service = fromFile(path, receiver, reactor)
    service.startService()
    runtime, config, ports = service.runtime, service.config, list(service.ports)
    receiver.all()
    text = INI.replace("servers = 127.0.0.1:9002", "servers = 127.0.0.1:9002\nresponse_timeout = soon")
    text = text.replace("tcp:8081", "tcp:8082")
    writeIni(tmp_path, certs, text)
    del events[:]
    assert result(service.reload()) is False
    assert service.runtime is runtime and service.config is config
    assert service.ports == ports
    assert [port for port, _, _, _ in reactor.tcpServers] == [8443, 8080, 8081]
    errors = [e for e in events if e["log_level"] == LogLevel.error]
    assert len(errors) == 1
    problem = errors[0]["problem"]
    # file:line: [section] key: message, as edgeproxy check says it.
    assert problem.startswith(f"{path}:")
    assert "[upstream:api] response_timeout" in problem
    assert [d.split(b"\n")[0] for d in receiver.all()] == [b"RELOADING=1", b"READY=1"]
    assert b'edgeproxy_reloads_total{result="failed"} 1.0' in service.metrics.exposition()
    service.stopService()
    reactor.advance(1)


def test_reloadListeners(tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]) -> None:
    reactor = Reactor()
    service = fromFile(writeIni(tmp_path, certs), receiver, reactor)
    service.startService()
    https, plain, http = service.sites
    httpsPort, plainPort, httpPort = service.ports
    text = INI.replace(
        "[listen:http]\nendpoint = tcp:8081\nredirect_https = yes\n",
        "[listen:admin2]\nendpoint = tcp:8090\n",
    ).replace(
        "endpoint = tcp:8080:interface=127.0.0.1\n",
        "endpoint = tcp:8080:interface=127.0.0.1\nmax_headers = 7\n",
    ).replace("endpoint = tcp:8443:interface=127.0.0.1", "endpoint = tcp:8444:interface=127.0.0.1")
    writeIni(tmp_path, certs, text)
    # The https listener moves to a port that cannot be bound.
    reactor._refuse = {8444}
    assert result(service.reload()) is True
    # plain: same port and site, new limits for new connections.
    assert service.sites[1] is plain and service.ports[1] is plainPort
    assert plain.limits.max_headers == 7
    # http: removed, its port closed; admin2 added.
    assert httpPort.disconnected
    assert [o.listener.name for o in service.listeners.byName.values()].count("admin2") == 1
    assert reactor.tcpServers[-1][0] == 8090
    # https: the new port failed, the old one still listens.
    assert service.sites[0] is https and not httpsPort.disconnected
    errors = [e["message"] for e in events if e["log_level"] == LogLevel.error]
    assert any("[listen:https] endpoint 'tcp:8444:interface=127.0.0.1': cannot listen" in m for m in errors)
    # Once it can be bound, the next reload moves it, and closes the old port.
    reactor._refuse = set()
    assert result(service.reload()) is True
    assert httpsPort.disconnected
    assert reactor.tcpServers[-1][0] == 8444
    assert len(service.ports) == 3
    service.stopService()
    reactor.advance(1)


def test_reloadListenerChangedInPlaceOrRenamed(
    tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]
) -> None:
    """
    A listener that changes shape on the same endpoint, or moves to another
    name, must free the port before the new one binds it.
    """
    reactor = Reactor()
    service = fromFile(writeIni(tmp_path, certs), receiver, reactor)
    service.startService()
    plainSite, plainPort = service.sites[1], service.ports[1]
    # plain becomes TLS on the same port; http is renamed to www.
    text = INI.replace(
        "endpoint = tcp:8080:interface=127.0.0.1\n",
        "endpoint = tcp:8080:interface=127.0.0.1\ntls = yes\n",
    ).replace("[listen:http]", "[listen:www]")
    writeIni(tmp_path, certs, text)
    assert result(service.reload()) is True
    assert plainPort.disconnected
    assert service.sites[1] is not plainSite
    last8080 = [factory for port, factory, _, _ in reactor.tcpServers if port == 8080][-1]
    assert isinstance(last8080, TLSMemoryBIOFactory)
    assert sorted(service.listeners.byName) == ["https", "plain", "www"]
    assert sorted(reactor.bound) == [8080, 8081, 8443]
    errors = [e for e in events if e["log_level"] >= LogLevel.error]
    assert errors == []

    # Back to plain; then a change to TLS that cannot bind reopens the
    # plain one with its previous settings.
    writeIni(tmp_path, certs, INI.replace("[listen:http]", "[listen:www]"))
    assert result(service.reload()) is True
    reactor.refuseTLS = True
    writeIni(tmp_path, certs, text)
    assert result(service.reload()) is True
    warnings = [e for e in events if e["log_level"] == LogLevel.warn and e.get("name") == "plain"]
    assert warnings and warnings[-1]["what"] == "listens again with its previous settings"
    assert 8080 in reactor.bound
    last8080 = [factory for port, factory, _, _ in reactor.tcpServers if port == 8080][-1]
    assert not isinstance(last8080, TLSMemoryBIOFactory)
    reactor.refuseTLS = False
    service.stopService()
    reactor.advance(1)


def test_connectionsOfARemovedListenerAreDrainedAtStop(
    tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver
) -> None:
    reactor = Reactor()
    service = fromFile(writeIni(tmp_path, certs), receiver, reactor)
    service.startService()
    plain = service.sites[1]
    busy, busyTransport = connectTo(reactor, plain, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    idle, idleTransport = connect(plain)
    writeIni(tmp_path, certs, INI.replace(
        "[listen:plain]\nendpoint = tcp:8080:interface=127.0.0.1\n", ""))
    assert result(service.reload()) is True
    assert plain not in service.sites
    # The reload left them alone...
    assert not idleTransport.disconnecting and not busyTransport.disconnecting
    stopped = service.stopService()
    # ...the stop closes the idle one at once and waits for the busy one.
    assert idleTransport.disconnecting
    reactor.advance(4.9)
    assert not stopped.called and not busyTransport.disconnected
    reactor.advance(0.2)
    assert busyTransport.disconnected and stopped.called


def test_reloadReopensOrSwitchesTheAccessLog(
    tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver
) -> None:
    reactor = Reactor()
    first = tmp_path / "a.log"
    service = fromFile(writeIni(tmp_path, certs, access_log=str(first)), receiver, reactor)
    service.startService()
    # logrotate moves the file; the reload writes to a new one at the path.
    first.rename(tmp_path / "a.log.1")
    assert result(service.reload()) is True
    assert first.exists()
    second = tmp_path / "b.log"
    writeIni(tmp_path, certs, access_log=str(second))
    old = service.accessLog
    assert result(service.reload()) is True
    assert second.exists() and service.accessLog is not old
    assert all(site.accessLog is service.accessLog for site in service.sites)
    service.stopService()
    reactor.advance(1)


def test_secondSignalCutsTheDrainShort(
    tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]
) -> None:
    reactor = Reactor()
    service = fromFile(writeIni(tmp_path, certs), receiver, reactor)
    service.startService()
    busy, busyTransport = connectTo(reactor, service.sites[1], b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    stopped = service.stopService()
    reactor.advance(1)
    assert not stopped.called and not busyTransport.disconnected
    service.signals.force(signal.SIGTERM)
    reactor.advance(0.1)
    assert busyTransport.disconnected
    reactor.advance(0)
    assert stopped.called
    assert any("second signal" in e.get("log_format", "") for e in events)


def test_sigtermHandlerStopsTheReactorWithoutRecordingTheSignal(
    certs: dict[str, Any], receiver: NotifyReceiver
) -> None:
    """
    The reactor's own handler sets C{_exitSignal}, which twistd turns into
    death by SIGTERM (status 143) after the drain; ours only stops.
    """
    reactor = Reactor()
    service = EdgeService(makeConfig(certs), reactor, notifier=Notifier({"NOTIFY_SOCKET": receiver.path}))
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    service.startService()
    try:
        # Installed once the reactor runs (after the reactor's own).
        assert signal.getsignal(signal.SIGTERM) == previous[0]
        for hook, args, kwargs in reactor.whenRunningHooks:
            hook(*args, **kwargs)
        assert signal.getsignal(signal.SIGTERM) == service.signals.onTerminate
        service.signals.onTerminate(signal.SIGTERM, None)
        [(terminate, args, _)] = reactor.fromThreads
        terminate(*args)
        assert reactor.hasStopped
        assert getattr(reactor, "_exitSignal", None) is None
        # A second one forces the stop and gives the signal back to the
        # kernel's default action, so a third ends the process.
        service.signals.onTerminate(signal.SIGTERM, None)
        assert reactor.fromThreads[-1][0] == service.signals.force
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        service.stopService()
        reactor.advance(1)


def test_sighupHandlerInstalledAndRestored(certs: dict[str, Any], receiver: NotifyReceiver) -> None:
    reactor = Reactor()
    service = EdgeService(
        makeConfig(certs), reactor, notifier=Notifier({"NOTIFY_SOCKET": receiver.path})
    )
    previous = signal.getsignal(signal.SIGHUP)
    service.startService()
    try:
        handler = signal.getsignal(signal.SIGHUP)
        assert handler == service.signals.onHangup
        # The handler only schedules the reload on the reactor thread.
        handler(signal.SIGHUP, None)  # type: ignore[operator]
        assert reactor.fromThreads == [(service.reload, (), {})]
    finally:
        service.stopService()
        reactor.advance(1)
    assert signal.getsignal(signal.SIGHUP) == previous


def connect(site: Any) -> tuple[Any, StringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
    channel.makeConnection(transport)
    return channel, transport


def test_drain(certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]) -> None:
    reactor = Reactor()
    service = build(certs, receiver, reactor, shutdown=5.0)
    service.startService()
    receiver.all()
    site = service.sites[1]  # the plain proxying listener
    idle, idleTransport = connect(site)
    busy, busyTransport = connect(site)
    # The backend never answers: MemoryReactor records the connection attempt.
    busy.dataReceived(b"GET /slow HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert channelBusy(busy) and not channelBusy(idle)

    stopped = service.stopService()
    assert receiver.all() == [b"STOPPING=1"]
    reactor.advance(0)
    assert idleTransport.disconnecting
    assert not busyTransport.disconnecting
    assert not stopped.called
    reactor.advance(4.9)
    assert not stopped.called and not busyTransport.disconnecting
    reactor.advance(0.2)
    assert busyTransport.disconnected  # aborted
    assert stopped.called
    assert any("Shutdown timeout" in e.get("log_format", "") for e in events)


def test_drainEndsAsSoonAsIdle(certs: dict[str, Any], receiver: NotifyReceiver) -> None:
    reactor = Reactor()
    service = build(certs, receiver, reactor, shutdown=30.0)
    service.startService()
    site = service.sites[1]
    idle, idleTransport = connect(site)
    stopped = service.stopService()
    # No time passes: nothing was in flight, nothing to wait for.
    assert idleTransport.disconnecting
    assert stopped.called


def test_aCompleteDrainExitsZeroWhateverTheReactorRecorded(
    certs: dict[str, Any], receiver: NotifyReceiver
) -> None:
    """
    A SIGTERM that reached the reactor's own handler (before the service
    took it over) is recorded for twistd to re-raise (status 143); a drain
    that went as planned forgets it, as the supervisor's does.
    """
    reactor = Reactor()
    service = build(certs, receiver, reactor, shutdown=30.0)
    service.startService()
    reactor._exitSignal = signal.SIGTERM  # type: ignore[attr-defined]
    stopped = service.stopService()
    assert stopped.called
    assert reactor._exitSignal is None  # type: ignore[attr-defined]


class HTTP2Stub:
    """What an HTTP/2 protocol gives the drain: its streams' state, and
    its own ways to close (a GOAWAY is its business)."""

    def __init__(self) -> None:
        self.streams = 0
        self.calls: list[str] = []

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass

    def busy(self) -> bool:
        return self.streams > 0

    def closeAfterResponse(self) -> None:
        self.calls.append("closeAfterResponse")

    def closeIdle(self) -> None:
        self.calls.append("closeIdle")


def drainedConnection(http2: HTTP2Stub | None = None) -> Any:
    """An HTTP/1.1 connection (or one ALPN switched to C{http2})."""
    from twisted.internet.task import Clock

    from edgeproxy.config.model import Limits
    from tests.test_server import Connection, Echo, makeFactory

    connection = Connection()
    if http2 is not None:

        class WithHTTP2(ListenerFactory):
            def buildHTTP2(self, connection: Any) -> Any:
                return http2

        clock = Clock()
        base = makeFactory(Limits(), clock, Echo([]))
        connection.factory = WithHTTP2(base.currentRuntime, base.listener, clock)
        connection.protocol = connection.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))
        connection.transport = StringTransport()
        connection.transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        connection.protocol.makeConnection(connection.transport)
        connection.protocol.dataReceived(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    return connection


def test_channelBusyOnConnections() -> None:
    """
    A connection is busy while a request is in flight on it; an HTTP/2
    one while its protocol has streams.
    """
    connection = drainedConnection()
    assert channelBusy(connection.protocol) is False
    connection.stage.hold = True
    connection.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert channelBusy(connection.protocol) is True
    connection.stage._answer(connection.stage.held.pop(), b"")
    assert channelBusy(connection.protocol) is False

    http2 = HTTP2Stub()
    switched = drainedConnection(http2)
    assert channelBusy(switched.protocol) is False
    http2.streams = 1
    assert channelBusy(switched.protocol) is True


def test_closeAfterResponseMarksConnectionClose() -> None:
    """The response in flight says Connection: close and the connection
    closes after it."""
    connection = drainedConnection()
    connection.stage.hold = True
    connection.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    closeAfterResponse(connection.protocol)
    assert not connection.transport.disconnecting
    connection.stage._answer(connection.stage.held.pop(), b"")
    head = connection.received().partition(b"\r\n\r\n")[0]
    assert b"\r\nConnection: close" in head
    assert connection.transport.disconnecting


def test_drainOfAnHTTP2ConnectionIsItsProtocols() -> None:
    """closeAfterResponse and closeIdle of a connection switched to HTTP/2
    are its protocol's (which sends the GOAWAY)."""
    http2 = HTTP2Stub()
    switched = drainedConnection(http2)
    closeAfterResponse(switched.protocol)
    closeIdle(switched.protocol)
    assert http2.calls == ["closeAfterResponse", "closeIdle"]
    assert not switched.transport.disconnecting


def test_closeIdleLeavesNoProducerRegistered() -> None:
    """
    A TLS transport waits for its producer to go away before it closes:
    an idle connection has none registered, and one whose streamed
    response ends while it drains lets go of its producer before closing.
    """
    idle = drainedConnection()
    closeIdle(idle.protocol)
    assert idle.transport.producer is None
    assert idle.transport.disconnecting
    assert idle.received() == b""

    from edgeproxy.h1 import Fields
    from edgeproxy.pipeline.values import BODY_DONE, Response
    from tests.test_server import StreamedBody

    streaming = drainedConnection()
    streaming.stage.hold = True
    streaming.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    body = StreamedBody(b"x")
    streaming.stage.held.pop().respond(Response(200, b"OK", Fields(), None, body))
    assert streaming.transport.producer is not None
    closeIdle(streaming.protocol)  # busy: not closed
    closeAfterResponse(streaming.protocol)
    assert not streaming.transport.disconnecting
    body.protocol.connectionLost(BODY_DONE)
    assert streaming.transport.producer is None
    assert streaming.transport.disconnecting


def test_tapOptionsRejectBadConfiguration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeproxy.tap import Options

    path = tmp_path / "edge.ini"
    path.write_text("[edgeproxy]\nshutdown_timeout = forever\n")
    options = Options()
    with pytest.raises(usage.UsageError) as raised:
        options.parseOptions(["--config", str(path)])
    assert str(path) in str(raised.value)
    assert "shutdown_timeout" in str(raised.value)
    assert "shutdown_timeout" in capsys.readouterr().err


def test_tapOptionsDefaultPath() -> None:
    from edgeproxy.tap import Options

    assert Options()["config"] == "edge.ini"


def test_retiredPoolClosedAtTheShutdownTimeoutEvenIfBusy(
    tmp_path: Path, certs: dict[str, Any], receiver: NotifyReceiver, events: list[dict]
) -> None:
    reactor = Reactor()
    service = fromFile(writeIni(tmp_path, certs), receiver, reactor)
    service.startService()
    # Never answered: app's pool keeps one request in flight.
    connectTo(reactor, service.sites[1], b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    writeIni(tmp_path, certs, INI.replace("servers = 127.0.0.1:9001", "servers = 127.0.0.1:9003"))
    assert result(service.reload()) is True

    def closed() -> list[str]:
        return [e["upstream"] for e in events if "previous configuration closed" in e.get("log_format", "")]

    reactor.advance(4.0)
    assert closed() == []
    reactor.advance(1.5)  # shutdown_timeout = 5s
    assert closed() == ["app"]
    service.stopService()
    reactor.advance(10)
