"""
Tests for L{edgeproxy.http.redirect}: the bytes a client gets from a
plain-HTTP listener with C{redirect_https = yes}, through a real
L{ListenerFactory} and L{HTTP1Connection} over a memory transport (the
redirect is the listener's one stage).
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from edgeproxy.config.model import Config, Listener, ProxySettings
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.http.redirect import (
    endpointPort,
    redirectLocation,
    redirectPort,
    validHost,
)
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime

HTTP = Listener(name="http", endpoint="tcp:8080", tls=False, redirect_https=True)
HTTPS = Listener(name="https", endpoint="tcp:8443:interface=127.0.0.1", tls=True)


def exchange(
    data: bytes,
    listener: Listener = HTTP,
    listeners: tuple[Listener, ...] = (HTTP, HTTPS),
) -> tuple[bytes, StringTransport]:
    config = Config(
        path="/etc/edge.ini", proxy=ProxySettings(), tls=None, listeners=listeners, upstreams={}, routes=(),
    )
    runtime = Runtime(config=config, router=Router(()), pools={})
    factory = ListenerFactory(lambda: runtime, listener, MemoryReactorClock())
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    return transport.value(), transport


def head(response: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    rawHead, _, body = response.partition(b"\r\n\r\n")
    lines = rawHead.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        headers[name.lower()] = value
    return lines[0], headers, body


def test_redirectToFirstTLSListenerPort() -> None:
    response, transport = exchange(b"GET /a/b?c=d HTTP/1.1\r\nHost: www.example:8080\r\n\r\n")
    status, headers, body = head(response)
    assert status == b"HTTP/1.1 308 Permanent Redirect"
    assert headers[b"location"] == b"https://www.example:8443/a/b?c=d"
    assert body == b"308 Permanent Redirect: https://www.example:8443/a/b?c=d\n"
    assert headers[b"content-length"] == b"%d" % len(body)
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert b"server" not in headers
    # Keep-alive is unaffected: the connection stays open for the next one.
    assert not transport.disconnecting


def test_keepAliveServesTheNextRequest() -> None:
    response, transport = exchange(
        b"GET /1 HTTP/1.1\r\nHost: a.example\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert response.count(b"HTTP/1.1 308 Permanent Redirect") == 2
    assert b"Location: https://a.example:8443/1\r\n" in response
    assert b"Location: https://a.example:8443/2\r\n" in response
    assert not transport.disconnecting


def test_connectionCloseHonoured() -> None:
    response, transport = exchange(
        b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"
    )
    assert response.startswith(b"HTTP/1.1 308 ")
    assert transport.disconnecting


def test_explicitRedirectPortAndDefault443() -> None:
    listener = Listener(name="http", endpoint="tcp:80", tls=False, redirect_https=True, redirect_port=443)
    response, _ = exchange(b"GET /x HTTP/1.1\r\nHost: Example.COM\r\n\r\n", listener, (listener,))
    assert head(response)[1][b"location"] == b"https://example.com/x"
    listener = Listener(name="http", endpoint="tcp:80", tls=False, redirect_https=True, redirect_port=4443)
    response, _ = exchange(b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n", listener, (listener,))
    assert head(response)[1][b"location"] == b"https://example.com:4443/x"


def test_systemdTLSListenerMeansDefaultPort() -> None:
    https = Listener(name="https", endpoint="systemd:domain=INET6:name=https", tls=True)
    response, _ = exchange(b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n", HTTP, (HTTP, https))
    assert head(response)[1][b"location"] == b"https://example.com/x"


def test_ipLiterals() -> None:
    response, _ = exchange(b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]:8080\r\n\r\n")
    assert head(response)[1][b"location"] == b"https://[2001:db8::1]:8443/"
    response, _ = exchange(b"GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n")
    assert head(response)[1][b"location"] == b"https://192.0.2.1:8443/"


def test_headHasNoBody() -> None:
    response, _ = exchange(b"HEAD /x HTTP/1.1\r\nHost: a.example\r\n\r\n")
    status, headers, body = head(response)
    assert status == b"HTTP/1.1 308 Permanent Redirect"
    assert body == b""


@pytest.mark.parametrize(
    "host",
    [
        b"evil.example/@good",
        b"a b",
        b"good.example\\@evil",
        b"good.example:80:80",
        b"good.example:99999",
        b"good.example:",
        b"[::1",
        b"[not-ip]",
        b"%65vil",
        b"",
        b"-leading.example",
    ],
)
def test_oddHostIs400(host: bytes) -> None:
    response, _ = exchange(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    status, headers, body = head(response)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert b"location" not in headers
    assert headers[b"content-length"] == b"%d" % len(body)


def test_missingHostIs400() -> None:
    response, _ = exchange(b"GET / HTTP/1.0\r\n\r\n")
    assert head(response)[0] == b"HTTP/1.0 400 Bad Request"


def test_absoluteFormUsesItsAuthority() -> None:
    """
    An absolute-form target names the host (RFC 9112 3.2.2); one whose
    authority is not the Host is refused by the parser (h1's one policy:
    two hosts in one request is a smuggling vector), never redirected.
    """
    response, _ = exchange(b"GET http://B.example/p?q HTTP/1.1\r\nHost: b.example\r\n\r\n")
    assert head(response)[1][b"location"] == b"https://b.example:8443/p?q"
    response, transport = exchange(b"GET http://b.example/p?q HTTP/1.1\r\nHost: a.example\r\n\r\n")
    status, headers, _ = head(response)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert b"location" not in headers
    assert transport.disconnecting


def test_targetCannotChangeAuthority() -> None:
    # A target starting with // stays a path on the requested host.
    response, _ = exchange(b"GET //evil.example/x HTTP/1.1\r\nHost: good.example\r\n\r\n")
    assert head(response)[1][b"location"] == b"https://good.example:8443//evil.example/x"


def test_asteriskFormIs400() -> None:
    response, _ = exchange(b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert head(response)[0] == b"HTTP/1.1 400 Bad Request"


def test_helpers() -> None:
    assert validHost(b"WWW.Example.com.") == "www.example.com."
    assert validHost(None) is None
    assert endpointPort("tcp:8443") == 8443
    assert endpointPort("tcp6:port=443:interface=\\:\\:") == 443
    assert endpointPort("tcp:interface=127.0.0.1:port=9443") == 9443
    assert endpointPort("unix:/run/edge.sock") is None
    assert redirectPort(HTTP, (HTTP,)) is None
    assert redirectLocation("h", 443, b"/\x7f\xff") == b"https://h/%7F%FF"
