"""
Bypass attempts against access rules, authentication and rate limits,
table-driven, through the real request path in memory (a L{ListenerFactory}
and L{HTTP1Connection} over a memory transport, the real stages, an
in-memory upstream pool): what the client gets on the wire, and whether
anything reached the backend.

Each attempt spells a protected request another way: percent-encodings,
C{//}, dot segments, C{;} parameters, header case and duplicates,
pipelining, absolute-form targets, a trusted-proxy chain with a spoofed
C{X-Forwarded-For}.  HTTP/2 spellings are in
L{tests.integration.test_security_tls}.
"""

from __future__ import annotations

import ipaddress
import time

import jwt
import pytest
from twisted.internet.testing import MemoryReactorClock

from edgeproxy.config.model import Config, ProxySettings, Route
from edgeproxy.config.stagemodel import AuthSettings, RateLimit
from edgeproxy.pipeline.stages import buildPipelines
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime
from edgeproxy.security.paths import backendView
from tests.memorypool import MemoryResponse, ProxyClient

SECRET = b"k" * 40
NET = ipaddress.ip_network

ROUTES = (
    Route(name="admin", hosts=("app.example",), paths=("/admin",), upstream="app",
          allow=(NET("10.0.0.0/8"),)),
    Route(name="api", hosts=("app.example",), paths=("/api",), upstream="app", methods=("GET", "HEAD")),
    Route(name="private", hosts=("app.example",), paths=("/private",), upstream="app", auth="tokens"),
    Route(name="limited", hosts=("app.example",), paths=("/limited",), upstream="app", rate_limit=("two",)),
    Route(name="peruser", hosts=("app.example",), paths=("/peruser",), upstream="app",
          auth="tokens", rate_limit=("user",)),
    Route(name="public", hosts=("app.example",), paths=("/",), upstream="app"),
)
AUTHS = {"tokens": AuthSettings(name="tokens", type="jwt", algorithms=("HS256",), secret=SECRET)}
LIMITS = {
    "two": RateLimit(name="two", count=2, window=60.0, burst=2),
    "user": RateLimit(name="user", count=2, window=60.0, burst=2, key="identity"),
}


def token(**claims: object) -> str:
    body = {"sub": "ann", "exp": int(time.time()) + 300}
    body.update(claims)
    return jwt.encode(body, SECRET, algorithm="HS256")


def makeClient(trusted: tuple[str, ...] = (), peer: str = "192.0.2.7") -> ProxyClient:
    from twisted.internet.address import IPv4Address

    clock = MemoryReactorClock()
    clock.advance(1000)
    proxy = ProxySettings(trusted_proxies=tuple(NET(t) for t in trusted))
    client = ProxyClient(clock=clock, proxy=proxy, peer=IPv4Address("TCP", peer, 5555))
    pools = {"app": client.pool}
    config = Config(
        path="/etc/edge.ini", proxy=proxy, tls=None, listeners=(), upstreams={"app": client.pool.upstream},
        routes=ROUTES, auths=AUTHS, ratelimits=LIMITS,
    )
    client.runtime = Runtime(
        config=config, router=Router(ROUTES), pools=pools,
        pipelines=buildPipelines(config, pools, None, {"reactor": clock}),
    )
    return client


def status(client: ProxyClient) -> int:
    wire = client.wire()
    return int(wire.split(b" ", 2)[1]) if wire.startswith(b"HTTP/1.1 ") else 0


PROTECTED = [
    # (what, request bytes): each must be refused, nothing forwarded.
    ("plain", b"GET /admin HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("percent-encoded letter", b"GET /%61dmin HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("percent-encoded lower hex", b"GET /%61%64min/x HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("double slash", b"GET //admin HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("inner double slash", b"GET /x/..//admin HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("dot segment", b"GET /public/../admin HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("encoded dot segment", b"GET /public/%2e%2E/admin HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("single dot", b"GET /./admin HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("semicolon parameter", b"GET /admin;jsessionid=1 HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("semicolon then slash", b"GET /admin;x/panel HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("encoded slash", b"GET /admin%2fpanel HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("encoded backslash", b"GET /public%5c..%5cadmin HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("host case", b"GET /admin HTTP/1.1\r\nHost: APP.Example\r\n\r\n"),
    ("host with port and dot", b"GET /admin HTTP/1.1\r\nHost: app.example.:80\r\n\r\n"),
    ("absolute form", b"GET http://app.example/admin HTTP/1.1\r\nHost: app.example\r\n\r\n"),
    ("absolute form other host", b"GET http://app.example/admin HTTP/1.1\r\nHost: other.example\r\n\r\n"),
    ("spoofed forwarded-for", b"GET /admin HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"),
    ("spoofed forwarded", b"GET /admin HTTP/1.1\r\nHost: app.example\r\nForwarded: for=10.0.0.1\r\n\r\n"),
    ("spoofed real-ip", b"GET /admin HTTP/1.1\r\nHost: app.example\r\nX-Real-IP: 10.0.0.1\r\n\r\n"),
    ("two hosts", b"GET /admin HTTP/1.1\r\nHost: app.example\r\nHost: x\r\n\r\n"),
]


@pytest.mark.parametrize("what, data", PROTECTED, ids=[p[0] for p in PROTECTED])
def test_allowDenyNotBypassed(what: str, data: bytes) -> None:
    client = makeClient()
    client.send(data)
    assert status(client) in (400, 403), client.wire()
    assert client.sent == []


def test_allowedNetworkPasses() -> None:
    client = makeClient(peer="10.1.2.3")
    client.send(b"GET /%61dmin HTTP/1.1\r\nHost: app.example\r\n\r\n")
    [exchange] = client.sent
    assert exchange.target == b"/admin"


def test_refusalIsBareAndNamesNoRule() -> None:
    client = makeClient()
    client.send(b"GET /admin HTTP/1.1\r\nHost: app.example\r\n\r\n")
    head, _, body = client.wire().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert body == b"403 Forbidden\n"
    assert b"10.0.0.0" not in client.wire() and b"allow" not in client.wire()


TRUSTED_CHAINS = [
    # (X-Forwarded-For lines from the trusted proxy 192.0.2.7, expected status)
    ([b"10.0.0.5"], 200),
    ([b"10.0.0.5, 198.51.100.9"], 403),  # the client spoofed 10.0.0.5; the proxy saw 198.51.100.9
    ([b"10.0.0.5", b"198.51.100.9"], 403),  # the same over two field lines
    ([b"198.51.100.9, 10.0.0.5"], 200),
    ([b"garbage"], 403),
]


@pytest.mark.parametrize("chain, expected", TRUSTED_CHAINS)
def test_trustedProxyChain(chain: list[bytes], expected: int) -> None:
    client = makeClient(trusted=("192.0.2.7/32",))
    lines = b"".join(b"X-Forwarded-For: " + line + b"\r\n" for line in chain)
    client.send(b"GET /admin HTTP/1.1\r\nHost: app.example\r\n" + lines + b"\r\n")
    if expected == 200:
        assert len(client.sent) == 1
    else:
        assert status(client) == 403 and client.sent == []


def test_untrustedPeerCannotClaimAnAddress() -> None:
    client = makeClient(trusted=("203.0.113.0/24",))
    client.send(b"GET /admin HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 10.0.0.5\r\n\r\n")
    assert status(client) == 403


def test_pipelinedRequestChecked() -> None:
    client = makeClient()
    client.send(
        b"GET /public HTTP/1.1\r\nHost: app.example\r\n\r\n"
        b"GET /admin HTTP/1.1\r\nHost: app.example\r\n\r\n"
        b"GET //admin HTTP/1.1\r\nHost: app.example\r\n\r\n"
    )
    [first] = client.sent
    first.respond(MemoryResponse(200, [], b"ok", length=2))
    wire = client.wire()
    assert wire.count(b"HTTP/1.1 200 ") == 1
    assert wire.count(b"HTTP/1.1 403 ") == 1
    assert len(client.sent) == 1


METHODS = [
    (b"GET", True), (b"HEAD", True), (b"get", False), (b"Get", False), (b"POST", False),
    (b"PUT", False), (b"OPTIONS", False), (b"TRACE", False),
]


@pytest.mark.parametrize("method, allowed", METHODS)
def test_methods(method: bytes, allowed: bool) -> None:
    client = makeClient()
    client.send(method + b" /api/x HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert (len(client.sent) == 1) is allowed
    if not allowed:
        assert status(client) in (400, 403, 501)


AUTH_ATTEMPTS = [
    ("no credentials", b"", False),
    ("valid", b"Authorization: Bearer %s\r\n", True),
    ("scheme case", b"authorization: bEaReR %s\r\n", True),
    ("two authorization fields", b"Authorization: Bearer %s\r\nAuthorization: Bearer x\r\n", False),
    ("basic scheme", b"Authorization: Basic %s\r\n", False),
    ("token in query only", b"", False),
]


@pytest.mark.parametrize("what, extra, allowed", AUTH_ATTEMPTS, ids=[a[0] for a in AUTH_ATTEMPTS])
def test_authNotBypassed(what: str, extra: bytes, allowed: bool) -> None:
    client = makeClient()
    value = token().encode()
    target = b"/private/x?access_token=" + value if what == "token in query only" else b"/private/x"
    client.send(b"GET " + target + b" HTTP/1.1\r\nHost: app.example\r\n" + extra.replace(b"%s", value) + b"\r\n")
    if allowed:
        [exchange] = client.sent
        assert exchange.fields.get(b"authorization") is None
    else:
        assert status(client) == 401 and client.sent == []
        assert b"WWW-Authenticate: Bearer" in client.wire()


@pytest.mark.parametrize(
    "spelling",
    [b"/private/x", b"/%70rivate/x", b"//private/x", b"/private;a=b/x", b"/x/../private/x"],
)
def test_authRouteSpellings(spelling: bytes) -> None:
    client = makeClient()
    client.send(b"GET " + spelling + b" HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert status(client) in (400, 401) and client.sent == []


def test_identityFieldsFromTheClientRemoved() -> None:
    client = makeClient()
    client.send(
        b"GET /private/x HTTP/1.1\r\nHost: app.example\r\nAuthorization: Bearer "
        + token().encode()
        + b"\r\n\r\n"
    )
    [exchange] = client.sent
    assert exchange.fields.get(b"authorization") is None


RATE_SPELLINGS = [
    b"X-Forwarded-For: 10.0.0.%d\r\n",
    b"x-forwarded-for: 203.0.113.%d\r\n",
    b"Forwarded: for=198.51.100.%d\r\n",
]


@pytest.mark.parametrize("spoof", RATE_SPELLINGS)
def test_rateLimitKeyNotSpoofed(spoof: bytes) -> None:
    """From an untrusted peer, changing forwarding fields is the same client."""
    client = makeClient()
    statuses = []
    for index in range(4):
        client.transport.clear()
        client.send(
            b"GET /limited HTTP/1.1\r\nHost: app.example\r\n" + (spoof % (index,)) + b"\r\n"
        )
        if client.sent and len(client.sent) > len(statuses) - statuses.count(429):
            client.sent[-1].respond(MemoryResponse(200, [], b"", length=0))
        statuses.append(status(client))
    assert statuses == [200, 200, 429, 429]


@pytest.mark.parametrize("spelling", [b"/limited", b"/%6cimited", b"//limited", b"/limited;x", b"/a/../limited"])
def test_rateLimitSpellingsShareABucket(spelling: bytes) -> None:
    client = makeClient()
    got = []
    for path in (b"/limited", b"/limited", spelling):
        client.transport.clear()
        client.send(b"GET " + path + b" HTTP/1.1\r\nHost: app.example\r\n\r\n")
        if status(client) == 0 and client.sent:
            client.sent[-1].respond(MemoryResponse(200, [], b"", length=0))
        got.append(status(client))
    assert got[:2] == [200, 200]
    assert got[2] in (400, 429)


def test_tooManyRequestsFields() -> None:
    client = makeClient()
    for _ in range(3):
        client.transport.clear()
        client.send(b"GET /limited HTTP/1.1\r\nHost: app.example\r\n\r\n")
        if status(client) == 0:
            client.sent[-1].respond(MemoryResponse(200, [], b"", length=0))
    head = client.wire().partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"\r\nRetry-After: 30\r\n" in head
    assert b'\r\nRatelimit-Policy: "two";q=2;w=60\r\n' in head
    assert b'\r\nRatelimit: "two";r=0;t=30\r\n' in head


@pytest.mark.parametrize(
    "path, view",
    [(b"//a", b"/a"), (b"/a;b", b"/a"), (b"/a;b/c;d=e//f", b"/a/c/f"), (b"/a", b"/a")],
)
def test_backendView(path: bytes, view: bytes) -> None:
    assert backendView(path) == view


def test_doubleSlashWithinOneRoutePasses() -> None:
    """A path whose merged form routes alike is forwarded as sent."""
    client = makeClient()
    client.send(b"GET /public//file;v=2 HTTP/1.1\r\nHost: app.example\r\n\r\n")
    [exchange] = client.sent
    assert exchange.target == b"/public//file;v=2"


def test_identityLimitAppliedAfterAuthentication() -> None:
    """key = identity: counted per subject by the auth stage, whatever the client address."""
    client = makeClient()
    got: dict[str, list[int]] = {"ann": [], "bob": []}
    for subject in ("ann", "bob", "ann", "bob", "ann"):
        client.transport.clear()
        client.send(
            b"GET /peruser HTTP/1.1\r\nHost: app.example\r\nAuthorization: Bearer "
            + token(sub=subject).encode() + b"\r\n\r\n"
        )
        if status(client) == 0:
            client.sent[-1].respond(MemoryResponse(200, [], b"", length=0))
        got[subject].append(status(client))
    assert got == {"ann": [200, 200, 429], "bob": [200, 200]}
    # Unauthenticated requests never reach the identity limit.
    client.transport.clear()
    client.send(b"GET /peruser HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert status(client) == 401
