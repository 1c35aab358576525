"""
OpenID Connect (L{edgeproxy.security.auth.oidc}) in memory: a small
provider written with twisted.web (discovery, key set, token endpoint,
keys made at test time) reached through treq's C{StubTreq}, and the
C{auth} stage in front of a recording next stage.  What the browser gets
(status, C{Location}, C{Set-Cookie}) is asserted on.

The whole browser flow against a certified provider on 127.0.0.1 is in
L{tests.integration.test_security_oidc}; these are the cases that need a
provider doing something a real one does only now and then (rotating its
keys) or several sections at once.
"""

from __future__ import annotations

import io
import ipaddress
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource

from edgeproxy.accesslog import AccessLog, LineWriter, formatCombined, formatJSON
from edgeproxy.config.model import Config, Route
from edgeproxy.config.stagemodel import AuthSettings
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.testing import RecordingClient, RecordingNext, makeRequest, textResponse
from edgeproxy.security.auth.oidc import DISCOVERY_RETRY, OIDCAuthenticator
from edgeproxy.pipeline.stages import RoutePipeline, buildPipelines
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime
from edgeproxy.security.auth.stage import AuthStage
from tests.memorypool import ProxyClient

ISSUER = "https://idp.example"
SETTINGS = AuthSettings(
    name="staff", type="oidc", issuer=ISSUER, client_id="edge", cookie_secret=b"c" * 32,
    allow_emails=("ann@example.com",),
)
ROUTE = Route(name="app", hosts=("*",), paths=("/",), upstream="u", auth="staff")
PAGE = [(b"accept", b"text/html")]


class Provider(Resource):
    """
    Discovery, a key set and a token endpoint; the ID token is signed with
    L{signer} and carries the nonce and e-mail address the test sets.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[str, Any] = {}
        self.signer = self.addKey("k1")
        self.published = ["k1"]
        self.jwksFetches = 0
        self.nonce = ""
        self.email = "ann@example.com"
        self.keyFields: dict[str, Any] = {"use": "sig", "alg": "ES256"}
        self.lifetime = 300
        self.discovery: dict[str, Any] = {}
        self.discoveryFetches = 0

    def addKey(self, kid: str) -> str:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        return kid

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/.well-known/openid-configuration":
            self.discoveryFetches += 1
            return json.dumps({
                "issuer": ISSUER, "authorization_endpoint": ISSUER + "/auth",
                "token_endpoint": ISSUER + "/token", "jwks_uri": ISSUER + "/jwks",
                **self.discovery,
            }).encode()
        assert request.path == b"/jwks"
        self.jwksFetches += 1
        keys = []
        for kid in self.published:
            key = jwt.algorithms.ECAlgorithm.to_jwk(self.keys[kid].public_key(), as_dict=True)
            keys.append({**key, "kid": kid, **self.keyFields})
        return json.dumps({"keys": keys}).encode()

    def render_POST(self, request: Any) -> bytes:
        assert request.path == b"/token"
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "edge", "sub": self.email.partition("@")[0], "iat": now,
                  "exp": now + self.lifetime, "nonce": self.nonce, "email": self.email, "email_verified": True}
        token = jwt.encode(claims, self.keys[self.signer], algorithm="ES256", headers={"kid": self.signer})
        return json.dumps({"id_token": token, "token_type": "Bearer"}).encode()


class Edge:
    """One C{[auth:NAME]} section's stage, its provider and its clock."""

    def __init__(self, provider: Provider, settings: AuthSettings = SETTINGS, clock: Clock | None = None) -> None:
        self.provider = provider
        self.stub = StubTreq(provider)
        self.clock = clock or Clock()
        self.authenticator = OIDCAuthenticator(settings, self.clock, self.stub)
        self.stage = AuthStage(ROUTE, settings, self.authenticator)
        self.authenticator.discover()
        self.flush()

    def flush(self) -> None:
        for _ in range(10):
            self.stub.flush()

    def send(
        self, path: bytes = b"/page", query: bytes = b"", fields: Sequence[tuple[bytes, bytes]] = ()
    ) -> RecordingClient:
        client = RecordingClient()
        request = makeRequest(path=path, query=query, fields=Fields([(b"host", b"app.example"), *fields]))
        call = Call(request, None, client, (self.stage, RecordingNext(response=textResponse(200, b"app"))), 0.0)
        self.lastCall = call
        call.next()
        self.flush()
        return client

    def login(self) -> RecordingClient:
        """Follow the browser from a page to the callback; the callback's answer."""
        redirect = self.send(fields=PAGE)
        assert redirect.status == 302
        location = urlsplit(redirect.response.fields.get(b"location").decode())  # type: ignore[union-attr]
        query = parse_qs(location.query)
        self.provider.nonce = query["nonce"][0]
        flow = cookieOf(redirect)
        state = query["state"][0].encode()
        return self.send(b"/.edgeproxy/oidc/callback", b"?code=c0de&state=" + state, [(b"cookie", flow)])


def cookieOf(client: RecordingClient) -> bytes:
    """The first C{Set-Cookie}'s C{name=value}."""
    assert client.response is not None
    return client.response.fields.getAll(b"set-cookie")[0].split(b";")[0]


def test_sessionLetsIn() -> None:
    edge = Edge(Provider())
    callback = edge.login()
    assert callback.status == 302
    session = cookieOf(callback)
    assert session.startswith(b"edgeproxy_session=")
    assert edge.send(fields=[(b"cookie", session)]).status == 200


def test_sessionOfAnotherSectionRefused() -> None:
    """
    Two sections sharing cookie_secret_file and cookie_name: a session
    made by one lets nobody into the other, whose allow rules refused
    that user; the same section (another worker, a reload that changed
    nothing) accepts it.
    """
    provider = Provider()
    staff = Edge(provider)
    session = cookieOf(staff.login())
    admins = Edge(provider, replace(SETTINGS, name="admins", allow_emails=("bob@example.com",)))
    refused = admins.send(fields=[(b"cookie", session)])
    assert refused.status == 401
    assert admins.send(fields=[(b"cookie", session), *PAGE]).status == 302  # to the login page
    assert Edge(provider).send(fields=[(b"cookie", session)]).status == 200


def test_sessionEndsWhenTheRulesChange() -> None:
    """A reload that changes the allow rules ends the section's sessions:
    everyone logs in again, under the new rules."""
    provider = Provider()
    session = cookieOf(Edge(provider).login())
    changed = replace(SETTINGS, allow_emails=("bob@example.com",))
    assert Edge(provider, changed).send(fields=[(b"cookie", session)]).status == 401
    assert Edge(provider, replace(SETTINGS, allow_claim=("groups", "admins"))).send(
        fields=[(b"cookie", session)]).status == 401


def test_rotatedKeyFetchedAgain() -> None:
    """
    An ID token signed with a key the key set fetched does not hold has
    the key set fetched again (the provider rotated its keys), at most
    once a minute.
    """
    provider = Provider()
    edge = Edge(provider)
    assert provider.jwksFetches == 1
    provider.signer = provider.addKey("k2")
    provider.published = ["k1", "k2"]
    edge.clock.advance(61)
    callback = edge.login()
    assert callback.status == 302 and cookieOf(callback).startswith(b"edgeproxy_session=")
    assert provider.jwksFetches == 2

    # Made-up (or not yet published) key ids: refused without asking the
    # provider again within the minute.
    provider.signer = provider.addKey("k3")
    edge.clock.advance(30)
    refused = edge.login()
    assert refused.status == 403
    assert provider.jwksFetches == 2
    provider.published = ["k2", "k3"]
    edge.clock.advance(31)
    assert edge.login().status == 302
    assert provider.jwksFetches == 3


def test_idTokenKeyMustBeForItsAlgorithm() -> None:
    """
    The ID token's key must be for signatures and for the token's
    algorithm when the key set says what it is for, and the algorithm one
    the provider lists for ID tokens: else the login is refused (403), no
    session cookie.
    """
    for keyFields, discovery, status in (
        ({"use": "sig", "alg": "ES256"}, {"id_token_signing_alg_values_supported": ["ES256"]}, 302),
        ({}, {}, 302),
        ({"use": "sig", "alg": "ES384"}, {}, 403),
        ({"use": "enc"}, {}, 403),
        ({"use": "sig", "alg": "ES256"}, {"id_token_signing_alg_values_supported": ["RS256"]}, 403),
    ):
        provider = Provider()
        provider.keyFields = keyFields
        provider.discovery = discovery
        callback = Edge(provider).login()
        assert callback.status == status, (keyFields, discovery)
        cookies = callback.response.fields.getAll(b"set-cookie") if callback.response is not None else []
        assert (status == 302) == any(c.startswith(b"edgeproxy_session=") for c in cookies)


def test_idTokenLeeway() -> None:
    """
    An ID token that expired a moment ago (the provider's clock behind
    ours) passes within the section's C{leeway}, not past it.
    """
    for leeway, status in ((120.0, 302), (30.0, 403)):
        provider = Provider()
        provider.lifetime = -60
        assert Edge(provider, replace(SETTINGS, leeway=leeway)).login().status == status, leeway


def test_callbackLoggedWithoutTheCode() -> None:
    """
    The access log records the callback's target without its query: the
    authorization code (and state) never reach a log file, whether the
    auth stage answers the callback or a stage before it refuses it (an
    access rule).
    """
    edge = Edge(Provider())
    callbacks = []
    for ruled in (False, True):
        route = replace(ROUTE, upstream="app", allow=(ipaddress.ip_network("10.0.0.0/8"),) if ruled else ())
        lines = io.StringIO()
        client = ProxyClient(accessLog=AccessLog(edge.clock, LineWriter(formatJSON, stream=lines)))
        pools = {"app": client.pool}
        config = Config(
            path="/etc/edge.ini", proxy=client.runtime.config.proxy, tls=None, listeners=(),
            upstreams={"app": client.pool.upstream}, routes=(route,), auths={"staff": SETTINGS},
        )
        # The access rule's route: its own stages; the other: the auth
        # stage of the provider's edge alone, which answers the callback.
        pipeline = (
            buildPipelines(config, pools, None, {"reactor": edge.clock})["app"]
            if ruled
            else RoutePipeline((("auth", edge.stage),), 0.0)
        )
        client.runtime = Runtime(config=config, router=Router((route,)), pools=pools, pipelines={"app": pipeline})
        client.send(b"GET /.edgeproxy/oidc/callback?code=c0de&state=s1 HTTP/1.1\r\nHost: app.example\r\n\r\n")
        edge.flush()
        callbacks.append((client.wire().split(b" ", 2)[1], lines.getvalue()))
    for status, line in callbacks:
        assert '"target":"/.edgeproxy/oidc/callback",' in line, line
        assert "c0de" not in line and "s1" not in line
    assert [status for status, _ in callbacks] == [b"403", b"403"]
    assert '"rule":"auth staff' in callbacks[0][1] and '"rule":"allow' in callbacks[1][1]


def test_discoveryRefusedBeforeAnyConnection() -> None:
    """
    An issuer whose discovery URL the HTTP client refuses at once (here a
    host name with an empty label) is a discovery failure like any other:
    logged, and the request answered (502), not an exception out of the
    stage.
    """
    settings = replace(SETTINGS, issuer="https://idp..example")
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        edge = Edge(Provider(), settings)
        client = edge.send(fields=PAGE)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert client.status == 502
    lines = [formatEvent(event) for event in events]
    assert any("cannot discover the OpenID provider https://idp..example" in line for line in lines)


def test_failedDiscoveryIsNotRetriedAtOnce() -> None:
    """
    While the provider cannot be discovered (here its document names
    another issuer), logins get 502 at once and the provider is asked again
    (and the failure logged) at most every L{DISCOVERY_RETRY} seconds, not
    once per request.
    """
    provider = Provider()
    provider.discovery = {"issuer": "https://impostor.example"}
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        edge = Edge(provider)
        statuses = [edge.send(fields=PAGE).status for _ in range(3)]
        fetchesMeanwhile = provider.discoveryFetches
        edge.clock.advance(DISCOVERY_RETRY)
        provider.discovery = {}
        redirect = edge.send(fields=PAGE)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert statuses == [502, 502, 502]
    assert fetchesMeanwhile == 1
    warnings = [formatEvent(e) for e in events if "cannot discover the OpenID provider" in formatEvent(e)]
    assert len(warnings) == 1
    assert redirect.status == 302
    assert provider.discoveryFetches == 2
