"""
Tests for L{edgeproxy.serve.sites}: the service's seams onto the HTTP server,
driven through a real L{ListenerFactory} and L{HTTP1Connection}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from edgeproxy.config.model import Limits, Listener
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.serve.sites import (
    channelBusy,
    closeAfterResponse,
    closeIdle,
    connectionsOf,
    inFlightOf,
    makeSite,
    reconfigureSite,
    transportOf,
    useAccessLog,
)
from tests.test_server import Echo, makeFactory

H = b"Host: example.com\r\n"


def _open(factory: ListenerFactory) -> tuple[Any, StringTransport]:
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def test_makeSiteAndReconfigure() -> None:
    listener = Listener(name="l", endpoint="tcp:0", tls=False, limits=Limits(max_headers=5))
    site = makeSite(lambda: None, listener, Clock(), None, None)  # type: ignore[arg-type]
    assert isinstance(site, ListenerFactory)
    assert site.limits.max_headers == 5
    reconfigureSite(site, Listener(name="l", endpoint="tcp:0", tls=False, limits=Limits(max_headers=9)))
    assert site.limits.max_headers == 9
    useAccessLog(site, "log")
    assert site.accessLog == "log"


def test_connectionSeams() -> None:
    """
    What the drain sees of a connection: busy while a request is answered,
    closed after the response when asked, closed at once when idle.
    """
    events: list[Any] = []
    stage = Echo(events)
    stage.hold = True
    factory = makeFactory(Limits(), Clock(), stage)
    busy, busyTransport = _open(factory)
    idle, idleTransport = _open(factory)
    busy.dataReceived(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert connectionsOf(factory) and set(connectionsOf(factory)) == {busy, idle}
    assert inFlightOf(factory) == 1
    assert channelBusy(busy) and not channelBusy(idle)
    assert transportOf(busy) is busyTransport
    closeAfterResponse(busy)
    closeIdle(idle)
    assert idleTransport.disconnecting and not busyTransport.disconnecting
    stage._answer(stage.held.pop(), b"")
    assert b"Connection: close" in busyTransport.value()
    assert busyTransport.disconnecting
    assert inFlightOf(factory) == 0
