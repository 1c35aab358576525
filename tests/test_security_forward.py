"""
Forward authentication (L{edgeproxy.security.auth.forward}): an auth
service written with twisted.web, reached through treq's in-memory
C{StubTreq} (treq's own test double: the real client code runs), and the
C{auth} stage in front of a recording next stage.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from edgeproxy.config.model import Route
from edgeproxy.config.stagemodel import AuthSettings
from edgeproxy.h1.fields import Fields
from edgeproxy.metrics import Metrics
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.testing import RecordingClient, RecordingNext, makeRequest, textResponse
from edgeproxy.security.auth.forward import ForwardAuthenticator
from edgeproxy.security.auth.stage import AuthStage

SETTINGS = AuthSettings(
    name="gate", type="forward", url="https://auth.internal/check",
    copy_request_headers=("cookie", "authorization"), copy_response_headers=("x-auth-user",),
    cache_ttl=30.0,
)
ROUTE = Route(name="app", hosts=("*",), paths=("/",), upstream="u", auth="gate")


class AuthService(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[bytes, list[bytes]]] = []

    def render_GET(self, request: Any) -> bytes:
        self.seen.append(dict(request.requestHeaders.getAllRawHeaders()))
        cookie = request.getHeader(b"cookie") or b""
        if b"session=good" in cookie:
            request.setHeader(b"x-auth-user", b"ann")
            return b""
        request.setResponseCode(302)
        request.setHeader(b"location", b"https://login.example/?next=/x")
        request.setHeader(b"content-type", b"text/plain")
        return b"log in first"


def setUp() -> tuple[AuthService, StubTreq, AuthStage, Clock, Metrics]:
    service = AuthService()
    stub = StubTreq(service)
    clock = Clock()
    metrics = Metrics()
    authenticator = ForwardAuthenticator(SETTINGS, stub, clock, metrics)
    return service, stub, AuthStage(ROUTE, SETTINGS, authenticator, None, metrics), clock, metrics


def send(stage: AuthStage, stub: StubTreq, fields: list[tuple[bytes, bytes]]) -> tuple[RecordingClient, RecordingNext, Call]:
    client = RecordingClient()
    nextStage = RecordingNext(response=textResponse(200, b"app"))
    request = makeRequest(method=b"POST", path=b"/x", query=b"?a=1", fields=Fields([(b"host", b"app.example"), *fields]))
    call = Call(request, None, client, (stage, nextStage), 0.0)
    call.next()
    for _ in range(5):
        stub.flush()
    return client, nextStage, call


def test_allowedWithIdentityAndNoForgedCopy() -> None:
    service, stub, stage, _, _ = setUp()
    client, nextStage, call = send(stage, stub, [(b"cookie", b"session=good"), (b"x-auth-user", b"root"),
                                                 (b"authorization", b"Basic eA==")])
    assert client.status == 200
    [forwarded] = nextStage.requests
    assert forwarded.fields.getAll(b"x-auth-user") == [b"ann"]
    assert forwarded.fields.get(b"authorization") is None
    assert call.identity == "ann"
    [asked] = service.seen
    assert asked[b"X-Forwarded-Method"] == [b"POST"]
    assert asked[b"X-Forwarded-Uri"] == [b"/x?a=1"]
    assert asked[b"X-Forwarded-For"] == [b"192.0.2.1"]
    assert asked[b"Cookie"] == [b"session=good"]


def test_deniedGetsTheServicesAnswer() -> None:
    _, stub, stage, _, metrics = setUp()
    client, nextStage, call = send(stage, stub, [(b"cookie", b"session=bad")])
    assert nextStage.requests == []
    assert client.status == 302
    assert client.response is not None
    assert client.response.fields.get(b"location") == b"https://login.example/?next=/x"
    assert client.body == b"log in first"
    assert call.refusedBy == "auth gate: service answered 302"


def test_verdictsCachedPerCredential() -> None:
    service, stub, stage, clock, metrics = setUp()
    for _ in range(3):
        assert send(stage, stub, [(b"cookie", b"session=good")])[0].status == 200
    assert len(service.seen) == 1
    # Another credential is asked again; so is the same one after cache_ttl.
    send(stage, stub, [(b"cookie", b"session=good; other=1")])
    assert len(service.seen) == 2
    clock.advance(31)
    send(stage, stub, [(b"cookie", b"session=good")])
    assert len(service.seen) == 3
    # Denials are never cached, nor requests without any credential.
    send(stage, stub, [(b"cookie", b"session=bad")])
    send(stage, stub, [(b"cookie", b"session=bad")])
    send(stage, stub, [])
    send(stage, stub, [])
    assert len(service.seen) == 7
    exposition = metrics.exposition().decode()
    assert 'edgeproxy_auth_cache_total{auth="gate",result="hit"} 2.0' in exposition


class CookieSettingService(Resource):
    """An auth service that sets a session cookie when it lets a user in
    (as many login services do)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes | None] = []

    def render_GET(self, request: Any) -> bytes:
        cookie = request.getHeader(b"cookie")
        self.seen.append(cookie)
        if cookie is not None and b"session=ann" in cookie:
            request.addCookie(b"session", b"ann", path=b"/")
            request.setHeader(b"x-auth-user", b"ann")
            return b""
        request.setResponseCode(401)
        return b"who are you?"


def test_subrequestsCarryNoCookieOfEarlierAnswers() -> None:
    """
    The client the section's subrequests go through keeps no cookie: a
    cookie the service set in its answer to ann never goes with the
    subrequest of a client that sent none (who would be let in as ann).
    """
    from treq.testing import RequestTraversalAgent

    from edgeproxy.security.auth.http import clientOver

    service = CookieSettingService()
    agent = RequestTraversalAgent(service)
    settings = AuthSettings(
        name="gate", type="forward", url="https://auth.internal/check",
        copy_request_headers=("cookie",), copy_response_headers=("x-auth-user",),
    )
    stage = AuthStage(ROUTE, settings, ForwardAuthenticator(settings, clientOver(agent), Clock()))

    def send(fields: list[tuple[bytes, bytes]]) -> RecordingClient:
        client = RecordingClient()
        request = makeRequest(path=b"/x", fields=Fields([(b"host", b"app.example"), *fields]))
        Call(request, None, client, (stage, RecordingNext(response=textResponse(200, b"app"))), 0.0).next()
        for _ in range(5):
            agent.flush()
        return client

    assert send([(b"cookie", b"session=ann")]).status == 200
    anonymous = send([])
    assert service.seen == [b"session=ann", None]
    assert anonymous.status == 401
