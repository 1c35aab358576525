"""
The C{auth} stage (L{edgeproxy.security.auth.stage}) on the request path,
in memory: a configuration read by the real loader, the real listener,
auth and cache stages, and an in-memory upstream pool the test answers
(L{tests.memorypool}).  Assertions are on the bytes the clients get and on
what reached the backend.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bcrypt
import jwt
import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from edgeproxy.cache.blocking import InlineBlocking
from edgeproxy.config.model import Config
from edgeproxy.config.parse import load
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.pipeline.stages import buildPipelines
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime
from tests.memorypool import PEER, Exchange, MemoryPool, MemoryResponse

SECRET = "0123456789abcdef0123456789abcdef-secret"

CONFIG = """\
[listen:web]
endpoint = tcp:0

[upstream:app]
servers = 127.0.0.1:9001

[auth:staff]
type = basic
htpasswd = users.htpasswd

[auth:tokens]
type = jwt
algorithms = HS256
secret_file = secret.txt

[route:basic]
hosts = basic.example
upstream = app
auth = staff
cache = yes

[route:jwt]
hosts = jwt.example
upstream = app
auth = tokens
cache = yes
"""


class _InlineThreadPool:
    """Runs what is given to the thread pool at once (the hash checks)."""

    def callInThreadWithCallback(self, onResult: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ThreadedClock(MemoryReactorClock):
    """A memory reactor with a thread pool that runs work inline."""

    def getThreadPool(self) -> _InlineThreadPool:
        return _InlineThreadPool()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def response(transport: StringTransport) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split(b" ")[1]), fields, body


class Edge:
    """The configuration C{CONFIG} served in memory; every L{get} is a new
    client connection."""

    def __init__(self, directory: Path, text: str = CONFIG) -> None:
        (directory / "secret.txt").write_text(SECRET + "\n")
        lines = [f"{user.decode()}:{bcrypt.hashpw(password, bcrypt.gensalt(4)).decode()}"
                 for user, password in ((b"ann", b"ann-pw"), (b"bob", b"bob-pw"))]
        (directory / "users.htpasswd").write_text("\n".join(lines) + "\n")
        (directory / "edge.ini").write_text(text)
        self.config: Config = load(str(directory / "edge.ini"))
        self.clock = ThreadedClock()
        self.clock.advance(time.time())
        self.pool = MemoryPool(clock=self.clock)
        pools = {"app": self.pool}
        pipelines = buildPipelines(
            self.config, pools, context={"reactor": self.clock, "blocking": InlineBlocking()}
        )
        self.runtime = Runtime(
            config=self.config, router=Router(self.config.routes), pools=pools, pipelines=pipelines
        )
        self.factory = ListenerFactory(lambda: self.runtime, self.config.listeners[0], self.clock)

    def get(self, host: bytes, headers: Sequence[tuple[bytes, bytes]] = (), target: bytes = b"/page") -> StringTransport:
        transport = StringTransport(peerAddress=PEER)
        protocol = self.factory.buildProtocol(PEER)
        protocol.makeConnection(transport)
        lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        protocol.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + lines + b"\r\n")
        return transport

    @property
    def sent(self) -> list[Exchange]:
        return self.pool.sent

    def answer(self, exchange: Exchange, body: bytes, fields: list[tuple[bytes, bytes]]) -> None:
        exchange.respond(MemoryResponse(200, fields, body, length=len(body)))


def basic(user: bytes, password: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", b"Basic " + base64.b64encode(user + b":" + password))]


def bearer(subject: str) -> list[tuple[bytes, bytes]]:
    # Made when the tests are collected (USERS): valid for a day, not
    # minutes, so that a slow suite reaching these tests late still finds
    # them valid.
    token = jwt.encode({"sub": subject, "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256")
    return [(b"Authorization", b"Bearer " + token.encode("ascii"))]


USERS = [
    (b"basic.example", basic(b"ann", b"ann-pw"), basic(b"bob", b"bob-pw")),
    (b"jwt.example", bearer("ann"), bearer("bob")),
]


@pytest.mark.parametrize("host, ann, bob", USERS, ids=["basic", "jwt"])
def test_oneUsersPageIsNotServedToAnother(tmp_path: Path, host: bytes, ann: Any, bob: Any) -> None:
    """
    RFC 9111 3.5: the answer to an authenticated request is not stored
    unless the origin says it may be shared, though the auth stage removed
    C{Authorization} before the cache stage saw the request.
    """
    edge = Edge(tmp_path)
    first = edge.get(host, ann)
    [exchange] = edge.sent
    assert exchange.fields.get(b"authorization") is None
    edge.answer(exchange, b"ann's page", [(b"Cache-Control", b"max-age=60")])
    status, fields, body = response(first)
    assert (status, body) == (200, b"ann's page")
    assert fields[b"cache-status"] == [b"edgeproxy; fwd=uri-miss; fwd-status=200; detail=authorization"]

    second = edge.get(host, bob)
    assert len(edge.sent) == 2, "bob was answered from ann's copy"
    edge.answer(edge.sent[1], b"bob's page", [(b"Cache-Control", b"max-age=60")])
    assert response(second)[2] == b"bob's page"


@pytest.mark.parametrize("directive", [b"public, max-age=60", b"s-maxage=60", b"max-age=60, must-revalidate"])
def test_sharedWhenTheOriginSaysSo(tmp_path: Path, directive: bytes) -> None:
    """
    RFC 9111 3.5 (and issue 11): C{public}, C{s-maxage} or
    C{must-revalidate} let the answer to an authenticated request be
    stored and served to other authenticated users.
    """
    edge = Edge(tmp_path)
    first = edge.get(b"jwt.example", bearer("ann"))
    edge.answer(edge.sent[0], b"for everyone", [(b"Cache-Control", directive)])
    status, fields, _ = response(first)
    assert fields[b"cache-status"][0].startswith(b"edgeproxy; fwd=uri-miss; fwd-status=200; stored")

    status, fields, body = response(edge.get(b"jwt.example", bearer("bob")))
    assert (status, body) == (200, b"for everyone")
    assert fields[b"cache-status"][0].startswith(b"edgeproxy; hit")
    assert len(edge.sent) == 1


def test_storedCopyIsNotServedWithoutCredentials(tmp_path: Path) -> None:
    """A shared copy is served only after authentication: an anonymous
    request is refused before the cache stage."""
    edge = Edge(tmp_path)
    first = edge.get(b"basic.example", basic(b"ann", b"ann-pw"))
    edge.answer(edge.sent[0], b"for staff", [(b"Cache-Control", b"public, max-age=60")])
    assert response(first)[0] == 200
    status, fields, body = response(edge.get(b"basic.example"))
    assert status == 401 and b"for staff" not in body
    status, _, _ = response(edge.get(b"basic.example", basic(b"ann", b"wrong")))
    assert status == 401


@pytest.mark.parametrize("host, ann, bob", USERS, ids=["basic", "jwt"])
def test_theBackendGetsTheIdentityNotTheCredentials(tmp_path: Path, host: bytes, ann: Any, bob: Any) -> None:
    """
    What reaches the backend of an authenticated route: the client's own
    fields in their order, without C{Authorization} and without a copy of
    the identity field the client sent itself; the identity field once,
    as the auth stage found it.
    """
    edge = Edge(tmp_path, CONFIG.replace(
        "algorithms = HS256\n", "algorithms = HS256\nclaims_to_headers = sub:X-Auth-User\n"
    ))
    spoofed = [(b"X-Auth-User", b"mallory"), (b"Accept", b"text/html"), (b"x-auth-user", b"eve")]
    edge.get(host, [spoofed[0], *ann, *spoofed[1:], (b"X-Other", b"1")])
    [exchange] = edge.sent
    pairs = [(name.lower(), value) for name, value in exchange.fields.pairs()]
    assert [pair for pair in pairs if pair[0] == b"x-auth-user"] == [(b"x-auth-user", b"ann")]
    assert b"authorization" not in exchange.fields
    assert exchange.fields.get(b"x-auth-user") == b"ann"
    kept = [pair for pair in pairs if pair[0] in (b"accept", b"x-other")]
    assert kept == [(b"accept", b"text/html"), (b"x-other", b"1")]
