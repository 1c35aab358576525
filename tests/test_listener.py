"""
Tests for L{edgeproxy.http.listener.ListenerFactory}'s connection
bookkeeping and what it offers and tells over TLS: every connection it
builds is in C{factory.channels} while open and forgotten when lost, with
or without metrics; ALPN offers only what the listener serves; the TLS facts
of a connection reach the stages; a listener's connections share its
timers; a reload's settings apply to new connections.  TLS runs in memory
(L{tests.tlsutil}) with the real certificate store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from edgeproxy.config.model import Config, Limits, Listener, ProxySettings, Route, TLSSettings
from edgeproxy.http.errorpages import rejection
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.metrics import Metrics
from edgeproxy.pipeline.stages import RoutePipeline
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime
from edgeproxy.tls.store import CertificateStore
from tests.test_server import UPSTREAM, Echo

from .certutil import CertificateAuthority
from .fastpaths import fastPaths  # noqa: F401 (fixture)
from .tlsutil import handshake
from tests.wireutil import undated

HTTPS = Listener(name="https", endpoint="tcp:0", tls=True)


class TLSListener:
    """A TLS listener whose one route (C{a.example}) is an L{Echo} stage."""

    def __init__(self, root: Path, metrics: Metrics | None = None, listener: Listener = HTTPS) -> None:
        self.ca = CertificateAuthority("listener test root")
        directory = root / "certs"
        directory.mkdir(parents=True)
        self.ca.issue(["a.example", "b.example"]).writePEM(directory / "a.pem")
        clock = Clock()
        clock.advance(time.time())
        self.store = CertificateStore(TLSSettings(certificates=(str(directory),), default=None), clock)
        self.store.load()
        self.events: list[Any] = []
        self.stage = Echo(self.events)
        route = Route(name="a", hosts=("a.example",), paths=("/",), upstream="app")
        config = Config(
            path="/etc/edge.ini", proxy=ProxySettings(), tls=None, listeners=(listener,),
            upstreams={"app": UPSTREAM}, routes=(route,),
        )
        runtime = Runtime(
            config=config, router=Router((route,)), pools={},
            pipelines={"a": RoutePipeline((("forward", self.stage),), 30.0)},
        )
        self.factory = ListenerFactory(lambda: runtime, listener, MemoryReactorClock(), metrics=metrics)

    def connect(self, sni: str = "a.example", alpn: list[bytes] | None = None) -> Any:
        return handshake(
            self.store.serverConnectionCreator(), sni, self.ca.certificatePEM, alpn=alpn,
            serverFactory=self.factory,
        )


@pytest.mark.parametrize("withMetrics", [False, True], ids=["plain", "metrics"])
@pytest.mark.parametrize("alpn", [b"h2", b"http/1.1"])
def test_connectionForgottenWhenLost(tmp_path: Path, alpn: bytes, withMetrics: bool) -> None:
    listener = TLSListener(tmp_path, Metrics() if withMetrics else None)
    offered = alpn in listener.factory.acceptableProtocols()
    result = listener.connect(alpn=[alpn])
    if alpn == b"h2" and offered:
        assert result.negotiatedProtocol == alpn
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        result.send(client.data_to_send())
    else:
        # Not offered (HTTP/2 until its protocol feeds the pipeline): the
        # handshake goes on without ALPN and the connection is HTTP/1.1.
        assert result.negotiatedProtocol == (alpn if offered else None)
        result.send(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert result.clientApp.received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(listener.factory.channels) == 1
    result.client.loseConnection()
    result.pump.flush()
    assert listener.factory.channels == set()


def test_alpnOffersWhatTheListenerServes(tmp_path: Path) -> None:
    """
    A client offering h2 and http/1.1 gets http/1.1 while HTTP/2 has no
    protocol here, and its requests are served over TLS.
    """
    listener = TLSListener(tmp_path)
    result = listener.connect(alpn=[b"h2", b"http/1.1"])
    assert result.established
    expected = listener.factory.acceptableProtocols()[0]
    assert result.negotiatedProtocol == expected
    if expected == b"http/1.1":
        result.send(b"GET /x HTTP/1.1\r\nHost: a.example\r\n\r\n")
        assert result.clientApp.received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert result.clientApp.received.endswith(b"GET /x ")
    off = TLSListener(tmp_path / "off", listener=Listener(name="https", endpoint="tcp:0", tls=True, http2=False))
    assert off.factory.acceptableProtocols() == [b"http/1.1"]
    result = off.connect(alpn=[b"h2", b"http/1.1"])
    assert result.negotiatedProtocol == b"http/1.1"


def test_tlsFactsReachTheStages(tmp_path: Path) -> None:
    """The scheme, SNI name, TLS version and ALPN protocol of the
    connection are in every request's ConnectionInfo."""
    listener = TLSListener(tmp_path)
    result = listener.connect(alpn=[b"http/1.1"])
    result.send(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    result.send(b"GET /2 HTTP/1.1\r\nHost: A.Example\r\n\r\n")
    first, second = listener.stage.seen
    info = first.connection
    assert (info.scheme, info.serverName, info.tlsVersion, info.alpn) == (b"https", b"a.example", "1.3", b"http/1.1")
    assert info.listener is listener.factory.listener
    assert second.connection is info


def test_connectionsShareWhatTheyHaveAlike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Connections with the same SNI name, TLS version, ALPN protocol and
    local address hold one copy of each (an idle connection's memory,
    R4), up to a bound past which the facts are still right, only not
    shared: names sent at random cannot grow the table.
    """
    listener = TLSListener(tmp_path)
    infos = []
    for name in ("A.example", "a.example"):
        result = listener.connect(sni=name, alpn=[b"http/1.1"])
        result.send(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        infos.append(listener.stage.seen[-1].connection)
    first, second = infos
    assert first is not second
    assert (first.serverName, first.tlsVersion, first.alpn) == (b"a.example", "1.3", b"http/1.1")
    for field in ("serverName", "tlsVersion", "alpn", "local"):
        assert getattr(first, field) is getattr(second, field), field

    monkeypatch.setattr(type(listener.factory._shared), "LIMIT", len(listener.factory._shared._values))
    result = listener.connect(sni="b.example", alpn=[b"http/1.1"])
    result.send(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    info = listener.stage.seen[-1].connection
    assert (info.serverName, info.tlsVersion, info.alpn) == (b"b.example", "1.3", b"http/1.1")
    assert b"b.example" not in listener.factory._shared._values


def test_anotherHostsNameIs421(tmp_path: Path) -> None:
    """
    RFC 9110 15.5.20: a request for a host that no route serves on a
    connection whose TLS name is another host's is misdirected (421, the
    client may retry on a connection of its own); without that name
    difference it is 404.  Neither reaches a stage.
    """
    listener = TLSListener(tmp_path)
    result = listener.connect(sni="b.example", alpn=[b"http/1.1"])
    result.send(b"GET / HTTP/1.1\r\nHost: c.example\r\n\r\n")
    assert result.clientApp.received.startswith(b"HTTP/1.1 421 Misdirected Request\r\n")
    result = listener.connect(sni="b.example", alpn=[b"http/1.1"])
    result.send(b"GET / HTTP/1.1\r\nHost: b.example\r\n\r\n")
    assert result.clientApp.received.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert listener.stage.seen == []


def test_connectionsShareTheListenersTimersAndStillTimeOut() -> None:
    """
    Every connection's timeouts are entries in the listener's queues (one
    timer per timeout, not one per connection), and a connection that sends
    nothing is still closed after C{client_header_timeout}.
    """
    reactor = MemoryReactorClock()
    listener = Listener(name="http", endpoint="tcp:0", tls=False)
    factory = ListenerFactory(lambda: None, listener, reactor)
    transports = []
    for port in (1, 2):
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        transports.append(transport)
        assert protocol in factory.channels
    assert len(factory.headQueue.entries) == 2
    assert len(reactor.getDelayedCalls()) == 2  # the head queue's, the idle queue's
    reactor.advance(listener.limits.client_header_timeout - 0.5)
    assert not any(transport.disconnecting for transport in transports)
    reactor.advance(1)
    assert all(undated(transport.value()) == undated(rejection(408)) for transport in transports)
    assert all(transport.disconnecting for transport in transports)


def test_reloadedSettingsApplyToNewConnections() -> None:
    """
    A reload that keeps the port reconfigures the factory: connections
    opened from then on get the new limits and timeouts, those already open
    keep theirs.
    """
    reactor = MemoryReactorClock()
    before = Listener(name="http", endpoint="tcp:0", tls=False, limits=Limits(client_header_timeout=5, max_headers=7))
    after = Listener(name="http", endpoint="tcp:0", tls=False, limits=Limits(client_header_timeout=20, max_headers=9))
    factory = ListenerFactory(lambda: None, before, reactor)
    old = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))
    oldTransport = StringTransport()
    old.makeConnection(oldTransport)
    factory.reconfigure(after)
    new = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 2))
    newTransport = StringTransport()
    new.makeConnection(newTransport)
    assert old.limits.max_headers == 7 and new.limits.max_headers == 9
    reactor.advance(5)
    assert undated(oldTransport.value()) == undated(rejection(408))
    assert not newTransport.disconnecting
    reactor.advance(15)
    assert undated(newTransport.value()) == undated(rejection(408))


def test_http2OfferedOnlyWhenSomethingServesIt() -> None:
    """
    h2 is offered on a listener with C{http2} on whose factory builds an
    HTTP/2 protocol; one that cannot is never offered (a client choosing it
    would find nothing serving it).
    """
    reactor = MemoryReactorClock()

    class WithHTTP2(ListenerFactory):
        def buildHTTP2(self, connection: Any) -> Any:
            return object()

    assert WithHTTP2(lambda: None, HTTPS, reactor).acceptableProtocols() == [b"h2", b"http/1.1"]
    off = Listener(name="https", endpoint="tcp:0", tls=True, http2=False)
    assert WithHTTP2(lambda: None, off, reactor).acceptableProtocols() == [b"http/1.1"]
    base = ListenerFactory(lambda: None, HTTPS, reactor)
    try:
        base.buildHTTP2(base.buildProtocol(None))
    except NotImplementedError:
        assert base.acceptableProtocols() == [b"http/1.1"]


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_responsesAreNotHeldByNagle(tmp_path: Path, fastPaths: bool, tls: bool) -> None:
    """
    Every accepted connection sends without waiting for the client's ACK
    (C{TCP_NODELAY}): with Nagle's algorithm, the last short TLS record of
    a large response waited for the client's delayed ACK, up to 40 ms per
    response.  Checked on a real TCP connection, through the TLS transport
    (which passes the option on to the socket) and without TLS, with the
    fast paths and without them.
    """
    import socket

    from twisted.internet import tcp

    from edgeproxy._compat.twisted.tcp import LeanServer
    from edgeproxy.serve.listeners import tlsServerFactory

    listener = TLSListener(tmp_path, listener=HTTPS if tls else Listener(name="http", endpoint="tcp:0", tls=False))
    factory: Any = listener.factory
    if tls:
        factory = tlsServerFactory(listener.store.serverConnectionCreator(), factory, MemoryReactorClock())

    class Listening:
        _realPortNumber = 8443

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, address = server.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        protocol = factory.buildProtocol(IPv4Address("TCP", *address))
        kind = LeanServer if fastPaths else tcp.Server
        transport = kind(accepted, protocol, address, Listening(), 1, MemoryReactorClock())
        protocol.makeConnection(transport)
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert len(listener.factory.channels) == 1
    finally:
        client.close()
        accepted.close()
        server.close()
