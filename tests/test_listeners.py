"""
Tests for L{edgeproxy.serve.listeners}: what the listening ports are built
with and how their addresses are named.  Opening, keeping and closing
listeners across reloads is tested through the service, in
C{tests/test_service.py}.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from edgeproxy._compat.twisted.tcp import LeanServer, acceptAsLeanServer
from edgeproxy.logs import formatAddress
from edgeproxy.serve.listeners import tlsServerFactory
from tests.fastpaths import SHOW_DEPRECATIONS, fastPaths  # noqa: F401 (fixture)

pytestmark = SHOW_DEPRECATIONS


def test_addressesAsLogLinesName() -> None:
    assert formatAddress(IPv4Address("TCP", "127.0.0.1", 8443)) == "127.0.0.1:8443"
    assert formatAddress(IPv6Address("TCP", "::1", 8443)) == "[::1]:8443"
    assert formatAddress(UNIXAddress("/run/edge.sock")) == "/run/edge.sock"
    assert formatAddress(UNIXAddress(b"/run/edge.sock")) == "/run/edge.sock"


def test_acceptedConnectionsDescribeThemselvesWithoutStoringIt() -> None:
    """
    L{LeanServer} (what TCP listeners accept connections as) gives the same
    log prefix and repr as Twisted's C{tcp.Server}, made when asked for,
    not two strings kept per connection; and it carries bytes as usual.
    """
    class Echo(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

    class Listening:
        _realPortNumber = 8443

    reactor = MemoryReactorClock()
    mine, theirs = socket.socketpair()
    try:
        lean = LeanServer(mine, Echo(), ("192.0.2.7", 40000), Listening(), 7, reactor)
        twisted = tcp.Server(mine, Echo(), ("192.0.2.7", 40000), Listening(), 7, reactor)
        assert lean.logPrefix() == twisted.logPrefix() == "Echo,7,192.0.2.7"
        assert repr(lean) == repr(twisted) == "<Echo #7 on 8443>"
        assert "logstr" not in vars(lean) and "repstr" not in vars(lean)
        lean.protocol.makeConnection(lean)
        lean.protocol.dataReceived(b"ping")
        lean.doWrite()
        assert theirs.recv(10) == b"ping"
    finally:
        mine.close()
        theirs.close()


def test_leanServerCountsWhatItSendsOnce() -> None:
    """
    L{LeanServer} counts the bytes it is given once, whether they leave at
    once (writeNow with nothing queued), partly (the kernel took some), or
    through its queue; nothing after the connection is lost.
    """

    class Traffic:
        sent = 0

    class Listening:
        _realPortNumber = 8443

    reactor = MemoryReactorClock()
    mine, theirs = socket.socketpair()
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        lean = LeanServer(mine, Protocol(), ("192.0.2.7", 40000), Listening(), 7, reactor)
        lean.protocol.makeConnection(lean)
        lean.traffic = traffic = Traffic()
        lean.writeNow(b"now")
        assert theirs.recv(10) == b"now" and traffic.sent == 3
        big = b"x" * 1_000_000
        lean.writeNow(big)  # the kernel takes part of it, the rest is queued
        assert lean._tempDataBuffer or lean.dataBuffer
        lean.write(b"after")
        lean.writeSequence(iter([b"a", b"b"]))
        assert traffic.sent == 3 + len(big) + 7
        theirs.setblocking(False)
        received = b""
        while len(received) < len(big) + 7:
            lean.doWrite()
            try:
                received += theirs.recv(1 << 20)
            except BlockingIOError:
                pass
        assert received == big + b"afterab"
        lean.connectionLost(Failure(ConnectionDone()))
        lean.write(b"late")
        lean.writeNow(b"later")
        assert traffic.sent == 3 + len(big) + 7
    finally:
        mine.close()
        theirs.close()


def test_portsAndTLSFactoriesFollowTheFastPaths(fastPaths: bool) -> None:
    """
    With the fast paths the TCP ports a L{ListenerSet} opens accept
    L{LeanServer}s and a TLS listener's factory builds L{EdgeTLSTransport}s;
    without them, Twisted's own classes.
    """
    from twisted.internet.ssl import CertificateOptions
    from twisted.protocols.tls import BufferingTLSTransport

    from edgeproxy._compat.twisted.tls import EdgeTLSTransport
    from edgeproxy.config.model import Config, Listener, ProxySettings
    from edgeproxy.serve.listeners import ListenerSet

    class Reactor(MemoryReactorClock):
        def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            listening = super().listenTCP(port, factory, backlog, interface)
            listening.transport = tcp.Server  # what tcp.Port builds connections from
            return listening

    reactor = Reactor()
    config = Config(
        path="edge.ini", proxy=ProxySettings(), tls=None,
        listeners=(Listener(name="web", endpoint="tcp:8080:interface=127.0.0.1", tls=False),),
        upstreams={}, routes=(),
    )
    listeners = ListenerSet(reactor, lambda: config, lambda listener: Factory(), lambda: None)
    listeners.listenAll()
    [port] = listeners.ports
    assert port.transport is (LeanServer if fastPaths else tcp.Server)
    if fastPaths:
        assert acceptAsLeanServer(port) is False  # only Twisted's own class is replaced
    factory = tlsServerFactory(CertificateOptions(), Factory(), reactor)
    assert factory.protocol is (EdgeTLSTransport if fastPaths else BufferingTLSTransport)
