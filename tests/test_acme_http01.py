"""
The ACME HTTP-01 hook (L{edgeproxy.http.acmehook}) in the listener
factory: a pending token is answered before the redirect of a
C{redirect_https} listener and before routing, with the key authorization
as the body; anything else goes on as before.  Raw bytes into a real
L{ListenerFactory}'s connection, as C{tests/test_server.py} does.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from edgeproxy.acme.challenges import ChallengeStore
from edgeproxy.config.model import Limits, Listener

from .test_server import Echo, makeFactory

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTHORIZATION = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
PATH = f"/.well-known/acme-challenge/{TOKEN}"


def challenges() -> ChallengeStore:
    store = ChallengeStore()
    store.addHTTP01("app.example", TOKEN, KEY_AUTHORIZATION)
    return store


def exchange(request: bytes, redirect: bool = False, tls: bool = False, acme: bool = True) -> tuple[bytes, list[Any]]:
    events: list[Any] = []
    listener = Listener(name="http", endpoint="tcp:0", tls=tls, redirect_https=redirect)
    factory = makeFactory(Limits(), Clock(), Echo(events), listener)
    if acme:
        factory.acmeChallenges = challenges()
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(request)
    return transport.value(), events


def test_answeredBeforeTheRedirect() -> None:
    response, _ = exchange(f"GET {PATH} HTTP/1.1\r\nHost: app.example\r\n\r\n".encode(), redirect=True)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\n" + KEY_AUTHORIZATION.encode())
    assert b"content-length: %d\r\n" % len(KEY_AUTHORIZATION) in response.lower()
    # Another name, or another token: redirected as usual.
    response, _ = exchange(f"GET {PATH} HTTP/1.1\r\nHost: other.example\r\n\r\n".encode(), redirect=True)
    assert response.startswith(b"HTTP/1.1 308 ")
    response, _ = exchange(b"GET /.well-known/acme-challenge/nope HTTP/1.1\r\nHost: app.example\r\n\r\n", redirect=True)
    assert response.startswith(b"HTTP/1.1 308 ")


def test_answeredBeforeRouting() -> None:
    """The token is answered without the route's stages; other requests reach them."""
    response, events = exchange(
        f"GET {PATH} HTTP/1.1\r\nHost: app.example:80\r\n\r\nGET /x HTTP/1.1\r\nHost: app.example\r\n\r\n".encode()
    )
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert KEY_AUTHORIZATION.encode() in response
    assert [event[1][1] for event in events if event[0] == "head"] == [b"/x"]


def test_notOnTLSNorWithoutACME() -> None:
    for kwargs in ({"tls": True}, {"acme": False}):
        _, events = exchange(f"GET {PATH} HTTP/1.1\r\nHost: app.example\r\n\r\n".encode(), **kwargs)
        assert [event[1][1] for event in events if event[0] == "head"] == [PATH.encode()]
