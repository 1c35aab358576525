"""
Tests for L{edgeproxy.serve.sites}: the Twisted attributes the drain reads and
the calls it makes on a connection, on real Twisted HTTP/1.1 and HTTP/2
objects over L{StringTransport}s (these fail if Twisted renames them).
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol

from edgeproxy.serve.sites import channelBusy, closeAfterResponse, closeIdle, transportOf


def test_channelBusyOnRealTwistedObjects() -> None:
    """
    channelBusy reads HTTPChannel.requests, H2Connection.streams and
    _GenericHTTPChannelProtocol._channel: this fails if Twisted renames them.
    """
    from twisted.web._http2 import H2Connection

    channel = HTTPChannel()
    assert channelBusy(channel) is False
    channel.requests.append(object())
    assert channelBusy(channel) is True

    generic = _GenericHTTPChannelProtocol(HTTPChannel())
    assert channelBusy(generic) is False
    generic._channel.requests.append(object())
    assert channelBusy(generic) is True

    h2 = H2Connection()
    assert h2.streams == {}
    assert channelBusy(h2) is False
    h2.streams[1] = object()
    assert channelBusy(h2) is True


def test_closeAfterResponseMarksConnectionClose() -> None:
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")

    class Pending:
        startedWriting = 0

        def __init__(self) -> None:
            from twisted.web.http_headers import Headers

            self.responseHeaders = Headers()

    pending = Pending()
    channel.requests.append(pending)
    closeAfterResponse(channel)
    assert channel.persistent is False
    assert pending.responseHeaders.getRawHeaders(b"connection") == [b"close"]


def test_closeIdleHTTP2SendsGoAway() -> None:
    import h2.connection
    import h2.events
    from twisted.web._http2 import H2Connection

    server = H2Connection(MemoryReactorClock())
    transport = StringTransport()
    server.makeConnection(transport)
    client = h2.connection.H2Connection()
    client.initiate_connection()
    server.dataReceived(client.data_to_send())
    # As Twisted's ALPN switcher does after negotiating h2.
    transport.registerProducer(server, True)
    transport.clear()
    closeIdle(server)
    assert transport.producer is None
    assert transport.disconnecting
    received = client.receive_data(transport.value())
    goaway = [e for e in received if isinstance(e, h2.events.ConnectionTerminated)]
    assert len(goaway) == 1 and goaway[0].error_code == 0


def test_closeIdleHTTP11UnregistersTheChannelFirst() -> None:
    """
    A TLS transport waits for its producer to go away before closing: the
    channel must unregister itself, which only its own loseConnection does.
    """
    channel = _GenericHTTPChannelProtocol(HTTPChannel())
    transport = StringTransport()
    channel.makeConnection(transport)
    assert transport.producer is not None
    closeIdle(channel)
    assert transport.producer is None
    assert transport.disconnecting


def test_transportOfTheChannelBehindTheALPNSwitcher() -> None:
    """
    What Site.buildProtocol returns proxies IProtocol only: the transport
    the drain closes or aborts is its inner channel's.
    """
    channel = _GenericHTTPChannelProtocol(HTTPChannel())
    transport = StringTransport()
    channel.makeConnection(transport)
    assert transportOf(channel) is transport
    assert transportOf(object()) is None
