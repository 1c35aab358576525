"""
Request IDs (L{edgeproxy.headers.requestid}): what an ID looks like, when
a received one is kept, and, through the request path (a real listener and
forward stage over an in-memory pool, HTTP/1.1 and HTTP/2), that the
backend gets the ID the client gets back, and that a client's own never
gets through.
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from edgeproxy.config.model import ProxySettings
from edgeproxy.errors import UpstreamTimeout
from edgeproxy.h1 import Fields
from edgeproxy.headers.requestid import MAX_LENGTH, RequestIds, isWellFormed
from tests.memorypool import MemoryResponse, ProxyClient, fixedIds

TRUSTED = ProxySettings(trusted_proxies=(ipaddress.ip_network("192.0.2.0/24"),))
"""The test client's peer (192.0.2.7) is a trusted proxy."""

HEX32 = re.compile(rb"[0-9a-f]{32}\Z")


def test_generatedIdsAre128RandomBits() -> None:
    ids = RequestIds("X-Request-ID")
    made = [ids.generate() for _ in range(1000)]
    assert all(HEX32.match(value) for value in made)
    assert len(set(made)) == len(made)


def test_randomnessIsInjected() -> None:
    """The random source is read in batches, one ID per 16 bytes."""
    reads: list[int] = []

    def source(size: int) -> bytes:
        reads.append(size)
        return bytes(range(16)) * (size // 16)

    ids = RequestIds("X-Request-ID", randomBytes=source)
    made = {ids.generate() for _ in range(200)}
    assert made == {b"000102030405060708090a0b0c0d0e0f"}
    assert len(reads) == 2 and reads[0] % 16 == 0


def test_names() -> None:
    ids = RequestIds("X-Request-ID")
    assert (ids.name, ids.line(b"ab")) == (b"x-request-id", b"X-Request-ID: ab")
    other = RequestIds("x-correlation-id")
    assert (other.name, other.line(b"ab")) == (b"x-correlation-id", b"X-Correlation-Id: ab")


@pytest.mark.parametrize(
    "value, kept",
    [
        (b"abc", True),
        (b"4bf92f35-77b3-4da6-a3ce-929d0e0e4736", True),
        (b"YWJj+/ZA==", True),
        (b"a" * MAX_LENGTH, True),
        (b"a" * (MAX_LENGTH + 1), False),
        (b"", False),
        (b"a b", False),
        (b'a"b', False),
        (b"a\\b", False),
        (b"a,b", False),
        (b"a\tb", False),
        (b"caf\xc3\xa9", False),
    ],
)
def test_wellFormed(value: bytes, kept: bool) -> None:
    assert isWellFormed(value) is kept


def test_forRequest() -> None:
    """
    A trusted peer's single well-formed ID is kept; anything else (an
    untrusted peer, two values, a bad one) gets a fresh ID.
    """
    ids = fixedIds()
    fresh = b"1" * 32
    one = Fields([(b"X-Request-ID", b"upstream-1")])
    assert ids.forRequest(one, trustedPeer=True) == b"upstream-1"
    assert ids.forRequest(one, trustedPeer=False) == fresh
    two = Fields([(b"X-Request-ID", b"a"), (b"X-Request-ID", b"b")])
    assert ids.forRequest(two, trustedPeer=True) == fresh
    bad = Fields([(b"X-Request-ID", b"a b")])
    assert ids.forRequest(bad, trustedPeer=True) == fresh
    assert ids.forRequest(Fields(), trustedPeer=True) == fresh


def exchange(
    client: ProxyClient, request: bytes, response: MemoryResponse | None = None
) -> tuple[Fields, bytes]:
    """Send C{request}; what the backend got, and the client's head."""
    client.transport.clear()
    client.send(request)
    sent = client.sent[-1]
    sent.respond(response or MemoryResponse(200, [], b"ok", length=2))
    return sent.fields, client.wire().partition(b"\r\n\r\n")[0]


def idLines(head: bytes, name: bytes = b"x-request-id") -> list[bytes]:
    return [line for line in head.split(b"\r\n") if line.lower().startswith(name + b":")]


def test_theBackendGetsTheIdTheClientGetsBack() -> None:
    client = ProxyClient()
    fields, head = exchange(client, b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    [sent] = fields.getAll(b"x-request-id")
    assert HEX32.match(sent)
    assert idLines(head) == [b"X-Request-ID: " + sent]
    again, head = exchange(client, b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert again.getAll(b"x-request-id") != [sent]


def test_aClientsOwnIdIsReplaced() -> None:
    """From an untrusted peer, in any spelling, any number of times."""
    client = ProxyClient()
    fields, head = exchange(
        client,
        b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Request-ID: mine\r\nx-request-id: mine2\r\n\r\n",
    )
    [sent] = fields.getAll(b"x-request-id")
    assert HEX32.match(sent)
    assert idLines(head) == [b"X-Request-ID: " + sent]
    assert b"mine" not in head


def test_aTrustedProxysIdIsKept() -> None:
    client = ProxyClient(proxy=TRUSTED)
    fields, head = exchange(
        client, b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Request-ID: lb-7f3a\r\n\r\n"
    )
    assert fields.getAll(b"x-request-id") == [b"lb-7f3a"]
    assert idLines(head) == [b"X-Request-ID: lb-7f3a"]
    # A malformed one is not.
    fields, head = exchange(
        client, b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Request-ID: a\"b\r\n\r\n"
    )
    [sent] = fields.getAll(b"x-request-id")
    assert HEX32.match(sent) and idLines(head) == [b"X-Request-ID: " + sent]


def test_theBackendsIdIsReplacedByTheRequests() -> None:
    """
    The client gets the ID of its request (the one the backend was sent and
    the access log has), never a second one from the backend.
    """
    client = ProxyClient(requestIds=fixedIds())
    _, head = exchange(
        client,
        b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n",
        MemoryResponse(200, [(b"X-Request-ID", b"backend-own")], b"ok", length=2),
    )
    assert idLines(head) == [b"X-Request-ID: " + b"1" * 32]


def test_errorPagesCarryTheId() -> None:
    """The proxy's own answers (a 404, a 504) carry the request's ID too."""
    client = ProxyClient(requestIds=fixedIds())
    client.send(b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n")
    head = client.wire().partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 404 ") and idLines(head) == [b"X-Request-ID: " + b"1" * 32]
    client.transport.clear()
    client.send(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
    client.sent[-1].fail(UpstreamTimeout("no answer"))
    head = client.wire().partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 504 ") and idLines(head) == [b"X-Request-ID: " + b"1" * 32]


def test_renamed() -> None:
    client = ProxyClient(proxy=ProxySettings(request_id="X-Correlation-ID"))
    fields, head = exchange(
        client, b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Request-ID: passes\r\n\r\n"
    )
    [sent] = fields.getAll(b"x-correlation-id")
    assert fields.getAll(b"x-request-id") == [b"passes"]
    assert idLines(head, b"x-correlation-id") == [b"X-Correlation-Id: " + sent]
    assert idLines(head) == []


def test_off() -> None:
    """With request_id = off nothing is added, and a client's field is an
    ordinary field (passed on as it came)."""
    client = ProxyClient(proxy=ProxySettings(request_id=None))
    fields, head = exchange(
        client, b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Request-ID: theirs\r\n\r\n"
    )
    assert fields.getAll(b"x-request-id") == [b"theirs"]
    assert idLines(head) == []
