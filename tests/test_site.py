"""
Tests for L{edgeproxy.http.site}'s connection bookkeeping: every connection
it builds is in C{site.channels} while open and forgotten when lost, over
TLS with HTTP/1.1 or HTTP/2 (after Twisted's ALPN switch replaced the
channel), with or without metrics.
"""

from __future__ import annotations

import time
from pathlib import Path

import h2.config
import h2.connection
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from edgeproxy.config.model import Listener, TLSSettings
from edgeproxy.http.site import EdgeSite
from edgeproxy.metrics import Metrics
from edgeproxy.tls.store import CertificateStore

from .certutil import CertificateAuthority
from .tlsutil import handshake


@pytest.mark.parametrize("withMetrics", [False, True], ids=["plain", "metrics"])
@pytest.mark.parametrize("alpn", [b"h2", b"http/1.1"])
def test_connectionForgottenWhenLost(tmp_path: Path, alpn: bytes, withMetrics: bool) -> None:
    ca = CertificateAuthority("site test root")
    ca.issue(["a.example"]).writePEM(tmp_path / "a.pem")
    clock = Clock()
    clock.advance(time.time())
    store = CertificateStore(TLSSettings(certificates=(str(tmp_path),), default=None), clock)
    store.load()
    site = EdgeSite(
        lambda: None,
        Listener(name="https", endpoint="tcp:0", tls=True),
        MemoryReactorClock(),
        metrics=Metrics() if withMetrics else None,
    )
    result = handshake(store.serverConnectionCreator(), "a.example", ca.certificatePEM,
                       alpn=[alpn], serverFactory=site)
    assert result.negotiatedProtocol == alpn
    if alpn == b"h2":
        # The client preface makes Twisted switch the channel to HTTP/2.
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        result.send(client.data_to_send())
    else:
        result.send(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert len(site.channels) == 1
    result.client.loseConnection()
    result.pump.flush()
    assert site.channels == set()


def test_connectionsShareOneCallLaterAndStillTimeOut() -> None:
    """
    Every connection's timers go through one bound C{callLater} of the
    site's reactor (Twisted's factory makes one per connection: R4), and
    a connection that sends nothing is still closed by it after
    C{client_header_timeout}.
    """
    from twisted.internet.testing import StringTransport

    reactor = MemoryReactorClock()
    listener = Listener(name="http", endpoint="tcp:0", tls=False)
    site = EdgeSite(lambda: None, listener, reactor)
    first = site.buildProtocol(None)
    second = site.buildProtocol(None)
    assert first.callLater is second.callLater
    assert first._channel.callLater is first.callLater
    transport = StringTransport()
    first.makeConnection(transport)
    assert first in site.channels
    reactor.advance(listener.limits.client_header_timeout - 0.5)
    assert not transport.disconnecting
    reactor.advance(1)
    assert transport.disconnecting
