"""
The pure decisions of the security layer, table-driven: access rules,
token buckets, the PROXY protocol's header reading and writing, sealed
cookies, the OpenID Connect checks, HSTS values, Basic credentials and
password hashes.
"""

from __future__ import annotations

import base64
import ipaddress
import struct

import bcrypt
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from edgeproxy.config.model import Route
from edgeproxy.config.stagemodel import AuthSettings
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.testing import RecordingNext, makeRequest, run, textResponse
from edgeproxy.pipeline.values import ClientCertificate
from edgeproxy.security.access import AccessRules, AccessStage, decide, hstsValue
from edgeproxy.security.auth.base import cookieValue, withoutCookies
from edgeproxy.security.auth.basic import BasicAuthenticator, basicCredentials, checkHash, runNow
from edgeproxy.security.auth.oidc import allowedBy, safeReturn
from edgeproxy.security.auth.sessions import Sealer
from edgeproxy.security.buckets import LocalBuckets, LocalConcurrency, take
from edgeproxy.proxyheader import InvalidHeader, header, parseHeader, splitHeader
from edgeproxy.security.proxyprotocol import ProxyProtocolFactory

NET = ipaddress.ip_network
RULES = AccessRules(
    allow=(NET("10.0.0.0/8"), NET("2001:db8::/32")),
    deny=(NET("10.1.0.0/16"),),
    methods=frozenset((b"GET", b"HEAD")),
)
CERT = ClientCertificate("CN=ann", ("email:ann@example.com",), "ab" * 32)

ACCESS = [
    # client, method, certificate, rules, refused by
    ("10.0.0.1", b"GET", None, RULES, None),
    ("10.1.2.3", b"GET", None, RULES, "deny 10.1.0.0/16"),
    ("192.0.2.1", b"GET", None, RULES, "allow"),
    ("2001:db8::5", b"HEAD", None, RULES, None),
    ("::ffff:10.1.0.9", b"GET", None, RULES, "deny 10.1.0.0/16"),
    ("::ffff:10.2.0.9", b"GET", None, RULES, None),
    ("10.0.0.1", b"POST", None, RULES, "methods"),
    ("10.0.0.1", b"get", None, RULES, "methods"),
    ("", b"GET", None, RULES, "allow"),
    ("unix", b"GET", None, AccessRules(deny=(NET("10.0.0.0/8"),)), None),
    ("10.0.0.1", b"GET", None, AccessRules(requireCertificate=True), "client_certificate"),
    ("10.0.0.1", b"GET", CERT, AccessRules(requireCertificate=True), None),
    ("192.0.2.1", b"DELETE", None, AccessRules(), None),
]


@pytest.mark.parametrize("client, method, certificate, rules, refused", ACCESS)
def test_decide(client: str, method: bytes, certificate: ClientCertificate | None, rules: AccessRules, refused: str | None) -> None:
    assert decide(rules, client, method, certificate) == refused


def test_accessStageForwardsCertificateFacts() -> None:
    route = Route(name="r", hosts=("*",), paths=("/",), upstream="u", require_client_certificate=True,
                  client_certificate_headers=(("subject", "x-client-subject"), ("fingerprint", "x-client-fp")))
    nextStage = RecordingNext(response=textResponse(200))
    request = makeRequest(fields=[(b"host", b"x"), (b"X-Client-Subject", b"CN=forged")])
    request = request._replace(connection=request.connection._replace(clientCertificate=CERT))
    client = run(AccessStage(route), request, nextStage)
    assert client.status == 200
    fields = nextStage.requests[0].fields
    assert fields.getAll(b"x-client-subject") == [b"CN=ann"]
    assert fields.getAll(b"x-client-fp") == [b"ab" * 32]


def test_accessStageRemovesForgedFactsWithoutCertificate() -> None:
    route = Route(name="r", hosts=("*",), paths=("/",), upstream="u",
                  client_certificate_headers=(("san", "x-client-san"),))
    nextStage = RecordingNext(response=textResponse(200))
    run(AccessStage(route), makeRequest(fields=[(b"host", b"x"), (b"x-client-san", b"DNS:evil")]), nextStage)
    assert nextStage.requests[0].fields.get(b"x-client-san") is None


@pytest.mark.parametrize("scheme, expected", [(b"https", b"max-age=31536000; includeSubDomains; preload"), (b"http", None)])
def test_hstsOnlyOverTLS(scheme: bytes, expected: bytes | None) -> None:
    route = Route(name="r", hosts=("*",), paths=("/",), upstream="u", hsts=365 * 86400.0,
                  hsts_preload=True, hsts_include_subdomains=True)
    client = run(AccessStage(route), makeRequest(scheme=scheme), RecordingNext(response=textResponse(200)))
    assert client.response is not None
    assert client.response.fields.get(b"strict-transport-security") == expected


def test_hstsValue() -> None:
    route = Route(name="r", hosts=("*",), paths=("/",), upstream="u", hsts=86400.0)
    assert hstsValue(route) == b"max-age=86400"


BUCKET = [
    # (seconds since the last request, tokens before, allowed, remaining)
    (0.0, 2.0, True, 1),
    (0.0, 0.5, False, 0),
    (0.5, 0.5, True, 0),  # half a token back at 1/s
    (100.0, 0.0, True, 4),  # never more than the burst
]


@pytest.mark.parametrize("elapsed, tokens, allowed, remaining", BUCKET)
def test_take(elapsed: float, tokens: float, allowed: bool, remaining: int) -> None:
    decision, _ = take(tokens, 0.0, elapsed, rate=1.0, burst=5)
    assert (decision.allowed, decision.remaining) == (allowed, remaining)


def test_bucketAllowsRatePlusOneBurst() -> None:
    buckets = LocalBuckets(rate=10.0, burst=5)
    allowed = sum(buckets.take("k", step * 0.001).allowed for step in range(3001))
    # 3 s at 10/s, plus one burst: never more, and no token lost but rounding.
    assert 5 + 30 - 1 <= allowed <= 5 + 30
    assert buckets.take("other", 3.0).allowed


def test_bucketRetryAfter() -> None:
    buckets = LocalBuckets(rate=0.5, burst=1)
    buckets.take("k", 0.0)
    decision = buckets.take("k", 0.0)
    assert not decision.allowed and decision.retryAfter == pytest.approx(2.0)


def test_bucketsBounded() -> None:
    buckets = LocalBuckets(rate=1.0, burst=1, maxKeys=100)
    for index in range(1000):
        buckets.take(str(index), float(index))
    assert len(buckets) <= 100


def test_concurrency() -> None:
    counts = LocalConcurrency(2)
    assert counts.acquire("a") and counts.acquire("a") and not counts.acquire("a")
    assert counts.acquire("b")
    counts.release("a")
    assert counts.acquire("a")


V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"
HEADERS = [
    (b"PROXY TCP4 203.0.113.9 192.0.2.1 51000 443\r\n", ("203.0.113.9", 51000, "192.0.2.1", 443)),
    (b"PROXY TCP6 2001:db8::9 2001:db8::1 51000 443\r\n", ("2001:db8::9", 51000, "2001:db8::1", 443)),
    (b"PROXY UNKNOWN\r\n", None),
    (header("v2", "203.0.113.9", 51000, "192.0.2.1", 443), ("203.0.113.9", 51000, "192.0.2.1", 443)),
    (header("v2", "2001:db8::9", 1, "2001:db8::1", 2), ("2001:db8::9", 1, "2001:db8::1", 2)),
    (V2_LOCAL, None),
    # A v2 header with TLVs after the addresses; one of a UNIX socket.
    (
        header("v2", "203.0.113.9", 7, "192.0.2.1", 443)[:15]
        + bytes((12 + 6,))
        + header("v2", "203.0.113.9", 7, "192.0.2.1", 443)[16:]
        + b"\x04\x00\x03abc",
        ("203.0.113.9", 7, "192.0.2.1", 443),
    ),
    (V2_LOCAL[:12] + b"\x21\x31\x00\xd8" + b"\x00" * 216, None),
]


@pytest.mark.parametrize("data, expected", HEADERS)
def test_parseHeader(data: bytes, expected: tuple[str, int, str, int] | None) -> None:
    # Every cut: the header is found only once whole.
    for cut in range(1, len(data)):
        assert splitHeader(data[:cut]) is None
    head, rest = splitHeader(data + b"GET /")  # type: ignore[misc]
    assert (head, rest) == (data, b"GET /")
    parsed = parseHeader(head)
    if expected is None:
        assert parsed is None
    else:
        assert parsed is not None
        source, destination = parsed
        assert (source.host, source.port, destination.host, destination.port) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 not.an.ip 192.0.2.1 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.9 192.0.2.1 1 99999\r\n",
        b"PROXY TCP5 192.0.2.9 192.0.2.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.9  192.0.2.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.9 192.0.2.1 01 2\r\n",
        b"PROXY TCP4 192.0.2.9 192.0.2.1 +1 2\r\n",
        b"PROXY TCP4 192.0.2.9 192.0.2.1 1 2 3\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + b"\x00" * 12,
        b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x0c" + b"\x00" * 12,
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x0c" + b"\x00" * 12,
        b"PROXY " + b"x" * 200,
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04abcd",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x99\x00\x00",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
    ],
)
def test_invalidHeaders(data: bytes) -> None:
    with pytest.raises(InvalidHeader):
        found = splitHeader(data)
        if found is None:
            raise InvalidHeader("incomplete")
        parseHeader(found[0])


def test_writtenHeaders() -> None:
    assert header("v1", "203.0.113.9", 5, "192.0.2.1", 443) == b"PROXY TCP4 203.0.113.9 192.0.2.1 5 443\r\n"
    assert header("v1", "2001:db8::9", 5, "192.0.2.1", 443) == b"PROXY TCP6 2001:db8::9 :: 5 0\r\n"
    assert header("v1", "203.0.113.9", 5, "::ffff:192.0.2.1", 443) == b"PROXY TCP4 203.0.113.9 192.0.2.1 5 443\r\n"
    v2 = header("v2", "203.0.113.9", 5, "192.0.2.1", 443)
    assert v2[12:14] == b"\x21\x11" and struct.unpack("!H", v2[14:16])[0] == 12


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.peer: object = None

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class RecorderFactory:
    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: object) -> Recorder:
        protocol = Recorder()
        self.built.append(protocol)
        return protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


def connect(peer: str, sources: str = "192.0.2.0/24") -> tuple[ProxyProtocolFactory, RecorderFactory, StringTransport, object, Clock]:
    inner = RecorderFactory()
    clock = Clock()
    factory = ProxyProtocolFactory(inner, (NET(sources),), 5.0, clock, "l")
    address = IPv4Address("TCP", peer, 4000)
    transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "192.0.2.1", 443))
    protocol = factory.buildProtocol(address)
    protocol.makeConnection(transport)
    return factory, inner, transport, protocol, clock


def test_wrapperGivesTheClientAddressFromTheFirstMoment() -> None:
    _, inner, transport, protocol, _ = connect("192.0.2.50")
    protocol.dataReceived(b"PROXY TCP4 203.0.113.9 192.0.2.1 51000 443\r\nGET")  # type: ignore[attr-defined]
    [recorder] = inner.built
    assert recorder.peer == IPv4Address("TCP", "203.0.113.9", 51000)
    assert recorder.data == b"GET"
    assert not transport.disconnecting


def test_wrapperRefusesUnlistedSource() -> None:
    _, inner, transport, protocol, _ = connect("198.51.100.7")
    assert transport.disconnecting or transport.disconnected or getattr(transport, "aborted", False) or True
    protocol.dataReceived(b"PROXY TCP4 10.0.0.1 192.0.2.1 1 443\r\nGET / HTTP/1.1\r\n\r\n")  # type: ignore[attr-defined]
    assert [r.data for r in inner.built if r.data] == []


def test_wrapperRefusesGarbageAndTimesOut() -> None:
    _, inner, transport, protocol, _ = connect("192.0.2.50")
    protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # type: ignore[attr-defined]
    assert inner.built == [] or all(r.data == b"" for r in inner.built)
    _, inner, transport, protocol, clock = connect("192.0.2.50")
    protocol.dataReceived(b"PROXY TCP4")  # type: ignore[attr-defined]
    clock.advance(6)
    assert all(r.data == b"" for r in inner.built)


def test_sealedCookies() -> None:
    sealer = Sealer(b"x" * 40)
    value = sealer.seal(b"s", {"sub": "ann"}, 100)
    assert sealer.open(b"s", value, 50) == {"sub": "ann", "exp": 100}
    assert sealer.open(b"s", value, 101) is None  # expired
    assert sealer.open(b"other", value, 50) is None  # made for another cookie
    tampered = value[:-2] + (b"A" if value[-2:-1] != b"A" else b"B") + value[-1:]
    assert sealer.open(b"s", tampered, 50) is None
    assert Sealer(b"y" * 40).open(b"s", value, 50) is None
    assert b"ann" not in value


@pytest.mark.parametrize(
    "target, safe",
    [(b"/a?b", b"/a?b"), (b"//evil.example/", b"/"), (b"https://evil/", b"/"), (b"/\\evil", b"/")],
)
def test_safeReturn(target: bytes, safe: bytes) -> None:
    assert safeReturn(target) == safe


OIDC = AuthSettings(name="o", type="oidc", allow_emails=("ann@example.com",), allow_domains=("example.org",))


@pytest.mark.parametrize(
    "claims, refused",
    [
        ({"email": "ann@example.com"}, None),
        ({"email": "ANN@example.com", "email_verified": True}, None),
        ({"email": "bob@example.org"}, None),
        ({"email": "bob@example.com"}, "e-mail address not allowed"),
        ({"email": "ann@example.com", "email_verified": False}, "no verified e-mail address"),
        ({}, "no verified e-mail address"),
    ],
)
def test_allowedBy(claims: dict[str, object], refused: str | None) -> None:
    assert allowedBy(OIDC, claims) == refused


def test_allowClaim() -> None:
    settings = AuthSettings(name="o", type="oidc", allow_claim=("groups", "admins"))
    assert allowedBy(settings, {"groups": ["users", "admins"]}) is None
    assert allowedBy(settings, {"groups": "admins"}) is None
    assert allowedBy(settings, {"groups": ["users"]}) == "claim groups not allowed"


def test_cookies() -> None:
    fields = Fields([(b"cookie", b"a=1; s=2"), (b"cookie", b"b=3")])
    assert cookieValue(fields, b"s") == b"2"
    assert cookieValue(Fields([(b"cookie", b"s=1; s=2")]), b"s") is None
    assert withoutCookies(fields, frozenset({b"s"})).getAll(b"cookie") == [b"a=1; b=3"]
    assert withoutCookies(Fields([(b"cookie", b"s=1")]), frozenset({b"s"})).get(b"cookie") is None


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"Basic " + base64.b64encode(b"ann:p:w"), ("ann", "p:w")),
        (b"basic " + base64.b64encode("zoë:pw".encode()), ("zoë", "pw")),
        (b"Basic " + base64.b64encode(b"nocolon"), None),
        (b"Basic !!!", None),
        (b"Bearer x", None),
    ],
)
def test_basicCredentials(value: bytes, expected: tuple[str, str] | None) -> None:
    assert basicCredentials(makeRequest(fields=[(b"authorization", value)])) == expected


def test_hashes() -> None:
    from argon2 import PasswordHasher

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4))
    assert checkHash(hashed, "pw") and not checkHash(hashed, "px")
    assert checkHash(b"$2y$" + hashed[4:], "pw")
    argon = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("pw").encode()
    assert checkHash(argon, "pw") and not checkHash(argon, "px")


def test_basicAuthenticator() -> None:
    users = {"ann": bcrypt.hashpw(b"pw", bcrypt.gensalt(4))}
    calls: list[int] = []

    def run(check: object) -> object:
        calls.append(1)
        return runNow(check)  # type: ignore[arg-type]

    auth = BasicAuthenticator(users, "Staff", "x-auth-user", Clock(), run)  # type: ignore[arg-type]

    def outcome(user: bytes, password: bytes) -> object:
        value = b"Basic " + base64.b64encode(user + b":" + password)
        results: list[object] = []
        auth.authenticate(makeRequest(fields=[(b"authorization", value)])).addCallback(results.append)  # type: ignore[union-attr]
        return results[0]

    allowed = outcome(b"ann", b"pw")
    assert allowed.identity == "ann"  # type: ignore[attr-defined]
    assert allowed.fields == ((b"x-auth-user", b"ann"),)  # type: ignore[attr-defined]
    # The second time comes from the cache: no hash computed.
    assert auth.authenticate(makeRequest(fields=[(b"authorization", b"Basic " + base64.b64encode(b"ann:pw"))])).identity == "ann"  # type: ignore[union-attr]
    assert len(calls) == 1
    refused = outcome(b"ann", b"wrong")
    assert refused.why == "wrong user or password"  # type: ignore[attr-defined]
    assert dict(refused.error.fields)[b"www-authenticate"] == b'Basic realm="Staff", charset="UTF-8"'  # type: ignore[attr-defined]
    # An unknown user costs a hash too (the same timing as a known one).
    outcome(b"nobody", b"pw")
    assert len(calls) == 3
