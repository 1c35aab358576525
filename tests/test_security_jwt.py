"""
JWT authentication (L{edgeproxy.security.auth.jwt}) with keys made at test
time: every way a token can be wrong is refused with 401 and a reason for
the log, and a rotated key set is picked up from its URL (served by a real
HTTP server on 127.0.0.1, fetched by treq).
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from edgeproxy.config.stagemodel import AuthSettings
from edgeproxy.errors import Unauthorized
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.testing import makeRequest
from edgeproxy.security.auth.base import Allowed, Refused
from edgeproxy.security.auth.jwt import JWTAuthenticator, KeySet

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()


def jwk(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    document = json.loads(algorithm.to_jwk(key.public_key()))
    document["kid"] = kid
    if alg:
        document["alg"] = alg
    return document


def edJWK(key: Any, kid: str) -> dict[str, Any]:
    document = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    document["kid"] = kid
    return document


def now() -> int:
    return int(time.time())


ISSUER = "https://idp.example/"
SETTINGS = AuthSettings(
    name="tokens", type="jwt", issuer=ISSUER, audience=("edge",),
    algorithms=("RS256", "ES256", "EdDSA"),
    claims_to_headers=(("sub", "x-auth-subject"), ("groups", "x-auth-groups")),
)


def keySet(*keys: dict[str, Any]) -> KeySet:
    made = KeySet(Clock())
    made.load({"keys": list(keys)})
    return made


KEYS = keySet(jwk(RSA, "r1"), jwk(EC, "e1"), edJWK(ED, "d1"))


def make(key: Any = RSA, alg: str = "RS256", kid: str | None = "r1", **claims: Any) -> bytes:
    body: dict[str, Any] = {"sub": "ann", "iss": ISSUER, "aud": "edge", "exp": now() + 300, "groups": ["a", "b"]}
    body.update(claims)
    for name in [name for name, value in body.items() if value is None]:
        del body[name]
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(body, key, algorithm=alg, headers=headers).encode()


def authenticator(settings: AuthSettings = SETTINGS, keys: KeySet | None = KEYS) -> JWTAuthenticator:
    clock = Clock()
    clock.advance(time.time())
    return JWTAuthenticator(settings, keys, clock)


def outcome(token: bytes | None, auth: JWTAuthenticator | None = None, field: bytes = b"authorization") -> Any:
    pairs = [(b"host", b"app.example")]
    if token is not None:
        pairs.append((field, b"Bearer " + token if field == b"authorization" else token))
    return (auth or authenticator()).authenticate(makeRequest(fields=Fields(pairs)))


def test_validTokensOfEachAlgorithm() -> None:
    for token in (make(), make(EC, "ES256", "e1"), make(ED, "EdDSA", "d1")):
        result = outcome(token)
        assert isinstance(result, Allowed), result
        assert result.identity == "ann"
        assert result.fields == ((b"x-auth-subject", b"ann"), (b"x-auth-groups", b"a, b"))


def _noneToken() -> bytes:
    import base64

    def part(document: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=")

    return part({"alg": "none", "typ": "JWT", "kid": "r1"}) + b"." + part(
        {"sub": "ann", "iss": ISSUER, "aud": "edge", "exp": now() + 300}
    ) + b"."


def _hsWithPublicKey() -> bytes:
    # The key confusion attack: HS256 signed with the RSA public key's PEM.
    from cryptography.hazmat.primitives import serialization

    import hmac
    import hashlib
    import base64

    pem = RSA.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def part(document: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=")

    signing = part({"alg": "HS256", "typ": "JWT", "kid": "r1"}) + b"." + part(
        {"sub": "ann", "iss": ISSUER, "aud": "edge", "exp": now() + 300}
    )
    signature = base64.urlsafe_b64encode(hmac.new(pem, signing, hashlib.sha256).digest()).rstrip(b"=")
    return signing + b"." + signature


REFUSED = [
    ("expired", lambda: make(exp=now() - 120), "expired token"),
    ("not yet valid", lambda: make(nbf=now() + 120), "token not yet valid"),
    ("wrong issuer", lambda: make(iss="https://evil.example/"), "wrong issuer"),
    ("no issuer", lambda: make(iss=None), "no iss claim"),
    ("wrong audience", lambda: make(aud="other"), "wrong audience"),
    ("no expiry", lambda: make(exp=None), "no exp claim"),
    ("alg none", _noneToken, "algorithm not allowed"),
    ("HS256 with the RSA public key", _hsWithPublicKey, "algorithm not allowed"),
    ("unknown kid", lambda: make(kid="nope"), "unknown key id"),
    ("signed by another key", lambda: make(RSA2), "bad signature"),
    ("ES256 token naming the RSA key", lambda: make(EC, "ES256", "r1"), "key not for this algorithm"),
    ("RS384 not allowed", lambda: make(alg="RS384"), "algorithm not allowed"),
    ("garbage", lambda: b"not.a.token", "malformed token"),
]


@pytest.mark.parametrize("what, token, why", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused(what: str, token: Any, why: str) -> None:
    result = outcome(token())
    assert isinstance(result, Refused), result
    assert result.why == why
    assert isinstance(result.error, Unauthorized)
    assert dict(result.error.fields)[b"www-authenticate"] == b'Bearer realm="edgeproxy", error="invalid_token"'


def test_leewayAcceptsSmallSkew() -> None:
    settings = AuthSettings(**_fields(SETTINGS, leeway=180.0))
    assert isinstance(outcome(make(exp=now() - 60), authenticator(settings)), Allowed)


def _fields(settings: AuthSettings, **changes: Any) -> dict[str, Any]:
    import dataclasses

    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    values.update(changes)
    return values


def test_missingTokenChallenge() -> None:
    result = outcome(None)
    assert isinstance(result, Refused) and result.why == "missing token"
    assert dict(result.error.fields)[b"www-authenticate"] == b'Bearer realm="edgeproxy"'


def test_tokenFromCookie() -> None:
    settings = AuthSettings(**_fields(SETTINGS, token_from="cookie:token"))
    auth = authenticator(settings)
    assert auth.credentialCookies == frozenset({b"token"})
    assert isinstance(outcome(b"token=" + make(), auth, b"cookie"), Allowed)
    assert isinstance(outcome(b"token=" + make() + b"; token=x", auth, b"cookie"), Refused)


def test_hmacSection() -> None:
    secret = b"s" * 40
    settings = AuthSettings(name="h", type="jwt", algorithms=("HS256",), secret=secret)
    auth = authenticator(settings, None)
    good = jwt.encode({"sub": "bob", "exp": now() + 60}, secret, algorithm="HS256").encode()
    assert isinstance(outcome(good, auth), Allowed)
    assert isinstance(outcome(make(), auth), Refused)  # an RS256 token: not allowed here


def test_verifiedTokensCachedUntilExpiry() -> None:
    auth = authenticator(keys=keySet(jwk(RSA, "r1")))
    token = make(exp=now() + 5)
    assert isinstance(outcome(token, auth), Allowed)
    assert token in auth._cache
    # Served from the cache: the key is not looked at again.
    assert auth.keys is not None
    auth.keys.keys = {}
    assert isinstance(outcome(token, auth), Allowed)
    # Past its expiry it is verified again (and now refused).
    auth.clock.advance(10)
    result = outcome(token, auth)
    assert isinstance(result, Refused) and result.why == "unknown key id"


class JWKSResource(Resource):
    """A key set served by twisted.web, reached through treq's in-memory
    StubTreq (treq's own test double: the real client code runs)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.document: dict[str, Any] = {"keys": []}
        self.hits = 0

    def render_GET(self, request: Any) -> bytes:
        self.hits += 1
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.document).encode()


def test_rotatedKeySetFetchedAgain() -> None:
    from treq.testing import StubTreq

    served = JWKSResource()
    served.document = {"keys": [jwk(RSA, "r1")]}
    stub = StubTreq(served)
    clock = Clock()
    clock.advance(1000)
    url = "https://idp.example/jwks.json"
    keys = KeySet(clock, url)
    keys._client = stub
    auth = JWTAuthenticator(AuthSettings(**_fields(SETTINGS, jwks=url)), keys, clock)

    def settle(result: Any) -> Any:
        if not isinstance(result, Deferred):
            return result
        got: list[Any] = []
        result.addBoth(got.append)
        for _ in range(5):
            stub.flush()
        assert got, "no outcome"
        return got[0]

    # Before the first fetch, the request waits for it.
    assert isinstance(settle(outcome(make(), auth)), Allowed)
    assert served.hits == 1
    # The provider rotates to r2: a token naming it makes one fetch.
    served.document = {"keys": [jwk(RSA2, "r2")]}
    clock.advance(61)
    assert isinstance(settle(outcome(make(RSA2, kid="r2"), auth)), Allowed)
    assert served.hits == 2
    # r1 is gone: its tokens are refused (and the cache was emptied).
    result = settle(outcome(make(), auth))
    assert isinstance(result, Refused) and result.why == "unknown key id"
    # Made-up kids do not make the proxy fetch more than once a minute.
    for index in range(5):
        settle(outcome(make(kid=f"x{index}"), auth))
    assert served.hits == 2
    # The refresh timer fetches again after jwks_refresh.
    clock.advance(3600)
    stub.flush()
    assert served.hits == 3
    keys.stop()
