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


class RefreshingService(Resource):
    """An auth service that lets ann in and refreshes her session cookie
    each time, as oauth2-proxy does."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def render_GET(self, request: Any) -> bytes:
        self.asked += 1
        request.setHeader(b"x-auth-user", b"ann")
        request.addCookie(b"_oauth2_proxy", b"refreshed%d" % self.asked, path=b"/", secure=True, httpOnly=True)
        return b""


def _refreshing(**changes: Any) -> tuple[RefreshingService, StubTreq, AuthStage]:
    service = RefreshingService()
    stub = StubTreq(service)
    settings = AuthSettings(
        name="gate", type="forward", url="https://auth.internal/check",
        copy_request_headers=("cookie",), copy_response_headers=("x-auth-user",), **changes,
    )
    return service, stub, AuthStage(ROUTE, settings, ForwardAuthenticator(settings, stub, Clock()))


def test_setCookieOfALetInGoesToTheClient() -> None:
    """
    The C{Set-Cookie} of a C{2xx} verdict is added to the response the
    client gets, after the backend's own; the backend never sees it.
    """
    _, stub, stage = _refreshing()
    client = RecordingClient()
    backend = textResponse(200, b"app")
    backend = backend._replace(fields=backend.fields.withAdded(b"set-cookie", b"app=1"))
    nextStage = RecordingNext(response=backend)
    request = makeRequest(path=b"/x", fields=Fields([(b"host", b"app.example"), (b"cookie", b"_oauth2_proxy=old")]))
    Call(request, None, client, (stage, nextStage), 0.0).next()
    for _ in range(5):
        stub.flush()
    assert client.status == 200
    assert client.response.fields.getAll(b"set-cookie") == [
        b"app=1", b"_oauth2_proxy=refreshed1; Path=/; Secure; HttpOnly",
    ]
    [forwarded] = nextStage.requests
    assert forwarded.fields.get(b"set-cookie") is None


def test_setCookieNotPassedWhenToldOrFromACachedVerdict() -> None:
    """
    C{pass_cookies = no} keeps the service's cookies from the client; a
    cached verdict carries none (they were for the request that asked).
    """
    _, stub, stage = _refreshing(pass_cookies=False)
    assert send(stage, stub, [(b"cookie", b"_oauth2_proxy=old")])[0].response.fields.get(b"set-cookie") is None
    service, stub, stage = _refreshing(cache_ttl=30.0)
    first, second = (send(stage, stub, [(b"cookie", b"_oauth2_proxy=old")])[0] for _ in range(2))
    assert service.asked == 1
    assert first.response.fields.getAll(b"set-cookie") == [b"_oauth2_proxy=refreshed1; Path=/; Secure; HttpOnly"]
    assert second.status == 200 and second.response.fields.get(b"set-cookie") is None
