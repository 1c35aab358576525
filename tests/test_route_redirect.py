"""
Tests for L{edgeproxy.pipeline.redirect}: the bytes a client gets from a
route with C{redirect}, through a real L{ListenerFactory} and
L{HTTP1Connection} over a memory transport (the upstream pool is never
asked).
"""

from __future__ import annotations

import pytest

from edgeproxy.config.model import Route
from edgeproxy.config.stagemodel import RouteRedirect
from edgeproxy.config.redirects import parseTemplate
from tests.memorypool import ROUTES, ProxyClient


def redirecting(
    template: str,
    status: int = 301,
    hosts: tuple[str, ...] = ("www.example.com",),
    paths: tuple[str, ...] = ("/",),
    stripPrefix: bool = False,
) -> ProxyClient:
    route = Route(
        name="redirect",
        hosts=hosts,
        paths=paths,
        upstream=None,
        strip_prefix=stripPrefix,
        websocket=False,
        redirect=RouteRedirect(location=template, parts=parseTemplate(template), status=status),
    )
    return ProxyClient(routes=ROUTES + (route,))


def answer(client: ProxyClient) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = client.wire().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        fields[name.lower()] = value
    return lines[0], fields, body


def test_wwwToApex() -> None:
    client = redirecting("https://example.com$request_uri")
    client.send(b"GET /a/b?c=d HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    status, fields, body = answer(client)
    assert status == b"HTTP/1.1 301 Moved Permanently"
    assert fields[b"location"] == b"https://example.com/a/b?c=d"
    assert body == b"301 Moved Permanently: https://example.com/a/b?c=d\n"
    assert fields[b"content-length"] == b"%d" % len(body)
    assert fields[b"content-type"] == b"text/plain; charset=utf-8"
    assert client.sent == []  # nothing forwarded
    assert not client.transport.disconnecting
    # The other routes still forward.
    client.transport.clear()
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert len(client.sent) == 1


@pytest.mark.parametrize(
    "status, phrase",
    [(301, b"Moved Permanently"), (302, b"Found"), (303, b"See Other"),
     (307, b"Temporary Redirect"), (308, b"Permanent Redirect")],
)
def test_statuses(status: int, phrase: bytes) -> None:
    client = redirecting("https://example.com/", status)
    client.send(
        b"POST /form HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /next HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
    )
    assert client.wire().count(b"HTTP/1.1 %d %s\r\n" % (status, phrase)) == 2
    assert client.sent == []


def test_headHasNoBody() -> None:
    client = redirecting("https://example.com$request_uri")
    client.send(b"HEAD /x HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    status, fields, body = answer(client)
    assert status == b"HTTP/1.1 301 Moved Permanently"
    assert fields[b"location"] == b"https://example.com/x"
    assert body == b""


def test_movedSubtreeKeepsItsRest() -> None:
    client = redirecting(
        "https://example.com/new$path$is_args$args", 308, hosts=("app.example",),
        paths=("/old/",), stripPrefix=True,
    )
    client.send(b"GET /old/a/b?x=1 HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert answer(client)[1][b"location"] == b"https://example.com/new/a/b?x=1"
    client.transport.clear()
    client.send(b"GET /old/ HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert answer(client)[1][b"location"] == b"https://example.com/new/"
    client.transport.clear()
    client.send(b"GET /other HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert len(client.sent) == 1  # the rest of the site is forwarded


def test_hostAndScheme() -> None:
    client = redirecting("$scheme://$host:8443$request_uri", hosts=("*",))
    client.send(b"GET /p HTTP/1.1\r\nHost: Shop.Example:8080\r\n\r\n")
    assert answer(client)[1][b"location"] == b"http://shop.example:8443/p"


def test_pathCannotChangeTheAuthority() -> None:
    client = redirecting("https://example.com$request_uri")
    client.send(b"GET //evil.example/x HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    assert answer(client)[1][b"location"] == b"https://example.com//evil.example/x"
    relative = redirecting("/new$request_uri")
    relative.send(b"GET //evil.example/x HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    assert answer(relative)[1][b"location"] == b"/new//evil.example/x"


def test_encodedLineBreaksStayEncoded() -> None:
    # An encoded CR/LF in the path is refused before routing; in the query
    # it stays three characters of text in the Location, never a line.
    client = redirecting("https://example.com$request_uri")
    client.send(b"GET /%0D%0ASet-Cookie:%20a=b HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    assert answer(client)[0] == b"HTTP/1.1 400 Bad Request"
    client = redirecting("https://example.com$request_uri")
    client.send(b"GET /x?%0D%0ASet-Cookie:%20a=b HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    status, fields, _ = answer(client)
    assert fields[b"location"] == b"https://example.com/x?%0D%0ASet-Cookie:%20a=b"
    assert b"set-cookie" not in fields
    assert client.wire().count(b"\r\n\r\n") == 1


def test_oddHostIs400WhenTheTemplateUsesIt() -> None:
    # A host the parser and routing take (a catch-all route), but that is
    # no plain host name: it never reaches a Location.
    client = redirecting("https://$host$request_uri", hosts=("*",))
    client.send(b"GET / HTTP/1.1\r\nHost: -x.example\r\n\r\n")
    status, fields, _ = answer(client)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert b"location" not in fields
