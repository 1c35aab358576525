"""
Tests for L{edgeproxy.serve.listeners}: what the listening ports are built
with and how their addresses are named.  Opening, keeping and closing
listeners across reloads is tested through the service, in
C{tests/test_service.py}.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock

from edgeproxy._compat.twisted.tcp import LeanServer
from edgeproxy.serve.listeners import formatAddress


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
