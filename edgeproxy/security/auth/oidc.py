# -*- test-case-name: tests.test_security_oidc -*-
"""
C{type = oidc}: an OpenID Connect relying party built in, so that a
private tool can be published behind a login without a VPN or a sidecar.

The authorization code flow (OpenID Connect Core 3.1) with PKCE (RFC
7636, C{S256}):

  1. A request without a valid session cookie, from a browser (its
     C{Accept} names C{text/html}) with C{GET} or C{HEAD}, is redirected
     (302) to the provider's authorization endpoint with a fresh C{state},
     C{nonce} and code challenge; those and the page asked for travel in a
     sealed login cookie (L{edgeproxy.security.auth.sessions}) scoped to
     C{callback_path} for ten minutes.  Any other request gets C{401}: an
     API client or a script cannot follow a login page.
  2. The provider sends the browser back to C{callback_path} with a code.
     The C{state} must equal the login cookie's (compared in constant
     time) and must not have been used before in this process (a
     replayed callback is refused); the code is exchanged at the token
     endpoint (treq) with the verifier; the ID token must be signed by a
     key of the provider's key set (C{jwks_uri}), with an asymmetric
     algorithm that the provider lists for ID tokens
     (C{id_token_signing_alg_values_supported}) and that the key is for
     (its C{alg}, when it states one; keys for encryption are not in the
     key set), issued by C{issuer}, for C{client_id}, unexpired, and
     carry the login's C{nonce}.
  3. C{allow_emails}, C{allow_domains} and C{allow_claim} decide who of
     those the provider knows may in (C{403} otherwise; an e-mail address
     the provider says is not verified never matches).
  4. The session is a sealed cookie (C{Secure} on https, C{HttpOnly},
     C{SameSite=Lax}) holding the subject, the claims C{claims_to_headers}
     sends and its expiry (C{session_ttl}); the browser goes back to the
     page it asked for (a path on this site, never another site).
  5. C{logout_path} clears the session and sends the browser to the
     provider's C{end_session_endpoint} when it has one, else to C{/}.

A session cookie that was changed, made for another cookie, made by
another C{[auth:NAME]} section or expired is no session (the flow starts
again): the cookie key is bound to the section (L{sessionPurpose}), so
that the allow rules checked at the callback hold for every request the
session lets in.  The provider's discovery document
(C{issuer}/.well-known/openid-configuration, whose C{issuer} must be the
configured one) is fetched at start and again when it failed; requests
that need it wait for it.  The session and login cookies are removed from
the request the backend gets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import jwt as pyjwt
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from edgeproxy.config.stagemodel import AuthSettings
from edgeproxy.errors import BackendUnavailable, Forbidden, Unauthorized
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.values import BytesBody, Request, Response
from edgeproxy.security.auth.base import Allowed, Answer, Outcome, Refused, claimFields, cookieValue
from edgeproxy.security.auth.jwt import KeySet, TokenRefused, keyFor
from edgeproxy.security.auth.sessions import Sealer

__all__ = ["OIDCAuthenticator", "allowedBy", "safeReturn", "sessionPurpose"]

log = Logger()

LOGIN_SECONDS = 600.0
"""How long a login (from the redirect to the callback) may take."""
DISCOVERY_WAIT = 10.0
DISCOVERY_RETRY = 10.0
"""Seconds after a failed discovery before a request may start another:
while the provider is unreachable, logins get 502 at once, and the
provider is asked (and the failure logged) at most this often."""
USED_STATES = 100_000
_ASYMMETRIC = frozenset(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                         "ES256", "ES384", "ES512", "EdDSA"))


def _random() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")


def safeReturn(target: bytes) -> bytes:
    """
    Where to send the browser after login: the page it asked for, when
    it is a path on this site; C{/} for anything that could leave it
    (C{//evil.example}, a backslash, a scheme).
    """
    if not target.startswith(b"/") or target.startswith(b"//") or b"\\" in target:
        return b"/"
    return target


def wantsPage(request: Request) -> bool:
    """Whether a login page makes sense for C{request}: a browser's page
    load (C{GET}/C{HEAD} accepting C{text/html})."""
    if request.method not in (b"GET", b"HEAD"):
        return False
    return any(b"text/html" in value.lower() for value in request.fields.getAll(b"accept"))


def allowedBy(settings: AuthSettings, claims: dict[str, Any]) -> str | None:
    """
    Why the ID token's C{claims} are not let in (C{allow_emails},
    C{allow_domains}, C{allow_claim}), or L{None}.
    """
    if settings.allow_emails or settings.allow_domains:
        email = claims.get("email")
        if not isinstance(email, str) or claims.get("email_verified") is False:
            return "no verified e-mail address"
        email = email.lower()
        domain = email.rpartition("@")[2]
        if email not in settings.allow_emails and domain not in settings.allow_domains:
            return "e-mail address not allowed"
    if settings.allow_claim is not None:
        claim, wanted = settings.allow_claim
        value = claims.get(claim)
        values = value if isinstance(value, list) else [value]
        if wanted not in [str(item) for item in values if item is not None]:
            return f"claim {claim} not allowed"
    return None


def sessionPurpose(settings: AuthSettings) -> bytes:
    """
    What the section's cookie key is derived for (the HKDF C{info}): its
    name and a digest of what decides who its sessions are for (the
    provider, the client, the allow rules).  Two sections sharing
    C{cookie_secret_file} and C{cookie_name} on one host do not accept
    each other's sessions (one section's allow rules would otherwise let
    in whom the other's refused), and changing the provider or the rules
    ends the section's sessions: everyone logs in again, under the rules
    now configured.
    """
    bound = json.dumps(
        [settings.issuer, settings.client_id, sorted(settings.allow_emails),
         sorted(settings.allow_domains), settings.allow_claim],
        separators=(",", ":"),
    ).encode("utf-8")
    return b"edgeproxy oidc cookies\0%s\0%s" % (
        settings.name.encode("utf-8"), hashlib.sha256(bound).hexdigest().encode("ascii"),
    )


def _cookie(name: bytes, value: bytes, path: bytes, maxAge: int, secure: bool) -> bytes:
    parts = [name + b"=" + value, b"Path=" + path, b"Max-Age=%d" % (maxAge,), b"HttpOnly", b"SameSite=Lax"]
    if secure:
        parts.append(b"Secure")
    return b"; ".join(parts)


def _redirect(location: bytes, cookies: list[bytes]) -> Response:
    body = b"Redirecting\n"
    pairs = [
        (b"location", location),
        (b"cache-control", b"no-store"),
        (b"content-type", b"text/plain; charset=utf-8"),
    ] + [(b"set-cookie", cookie) for cookie in cookies]
    return Response(302, b"Found", Fields(pairs), len(body), BytesBody(body))


class OIDCAuthenticator:
    """One C{type = oidc} section."""

    def __init__(self, settings: AuthSettings, reactor: Any, client: Any) -> None:
        assert settings.cookie_secret is not None and settings.issuer is not None
        self.settings = settings
        self.reactor = reactor
        self.client = client
        self.sealer = Sealer(settings.cookie_secret, sessionPurpose(settings))
        self.sessionName = settings.cookie_name.encode("ascii")
        self.flowName = self.sessionName + b"_login"
        self.callback = settings.callback_path.encode("ascii")
        self.logout = settings.logout_path.encode("ascii")
        self.identityFields = frozenset(name.encode("ascii") for _, name in settings.claims_to_headers)
        self.credentialCookies = frozenset((self.sessionName, self.flowName))
        # The callback's query holds the authorization code and state.
        self.credentialPaths = frozenset((self.callback,))
        self.metadata: dict[str, Any] | None = None
        self.keys: KeySet | None = None
        self._discovering: Deferred[None] | None = None
        self._discoveryFailedAt: float | None = None
        self._used: OrderedDict[str, float] = OrderedDict()
        self._unauthorized = ((b"www-authenticate", b'Bearer realm="edgeproxy"'),)

    @classmethod
    def fromSettings(cls, settings: AuthSettings, reactor: Any) -> OIDCAuthenticator:
        from edgeproxy.security.auth.http import makeClient

        made = cls(settings, reactor, makeClient(reactor, settings.ca))
        made.discover()
        return made

    # Discovery -------------------------------------------------------------

    def discover(self) -> Deferred[None]:
        """Fetch the discovery document (once at a time, and not again within
        L{DISCOVERY_RETRY} of a failure); never fails."""
        discovering = self._discovering
        if discovering is None:
            failedAt = self._discoveryFailedAt
            if failedAt is not None and 0 <= self.reactor.seconds() - failedAt < DISCOVERY_RETRY:
                return succeed(None)
            discovering = ensureDeferred(self._discover())
            discovering.addErrback(self._discoveryFailed)
            if not discovering.called:
                # (One that is over already, a URL refused before any
                # connection, cleared the attribute itself: not kept.)
                self._discovering = discovering
        waiter: Deferred[None] = Deferred()

        def done(result: object) -> object:
            if not waiter.called:
                waiter.callback(None)
            return result

        discovering.addBoth(done)
        return waiter

    async def _discover(self) -> None:
        from edgeproxy.security.auth.http import getJSON

        issuer = self.settings.issuer
        assert issuer is not None
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await getJSON(self.client, url, self.settings.timeout)
        if not isinstance(document, dict) or str(document.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
            # OpenID Connect Discovery 4.3: a document for another issuer
            # is an impersonation attempt.
            raise ValueError(f"the discovery document names issuer {document.get('issuer')!r}")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(document.get(key), str):
                raise ValueError(f"the discovery document has no {key}")
        keys = KeySet(
            self.reactor, document["jwks_uri"], self.settings.ca, 3600.0, self.settings.timeout, self.client
        )
        await keys.fetch()
        if not keys.loaded:
            raise ValueError("the provider's key set could not be fetched")
        self.keys = keys
        self.metadata = document
        self._discovering = None
        self._discoveryFailedAt = None
        log.info("[auth:{name}] OpenID provider {issuer} discovered", name=self.settings.name, issuer=issuer)

    def _discoveryFailed(self, failure: Any) -> None:
        log.warn(
            "[auth:{name}] cannot discover the OpenID provider {issuer}: {why}",
            name=self.settings.name, issuer=self.settings.issuer, why=failure.getErrorMessage(),
        )
        self._discoveryFailedAt = self.reactor.seconds()
        self._discovering = None

    # Requests ---------------------------------------------------------------

    def authenticate(self, request: Request) -> Outcome | Deferred[Outcome]:
        path = request.path
        if path == self.callback:
            return self._withMetadata(lambda: ensureDeferred(self._callback(request)))
        if path == self.logout:
            return self._logout(request)
        now = self.reactor.seconds()
        session = self.sealer.open(self.sessionName, cookieValue(request.fields, self.sessionName), now)
        if session is not None and isinstance(session.get("sub"), str):
            claims = session.get("c") or {}
            return Allowed(session["sub"], claimFields(claims, self.settings.claims_to_headers))
        if not wantsPage(request):
            error = Unauthorized("no session")
            error.fields = self._unauthorized
            return Refused(error, "no session")
        return self._withMetadata(lambda: self._login(request))

    def _withMetadata(self, then: Any) -> Outcome | Deferred[Outcome]:
        if self.metadata is not None:
            return then()
        waiting = self.discover()
        waiting.addTimeout(DISCOVERY_WAIT, self.reactor)

        def go(_: object) -> Any:
            if self.metadata is None:
                return Refused(BackendUnavailable("OpenID provider unavailable"), "provider unavailable")
            return then()

        return waiting.addBoth(go)

    def _secure(self, request: Request) -> bool:
        return request.connection.scheme == b"https"

    def _redirectURI(self, request: Request) -> str:
        host = request.host.decode("latin-1")
        return f"{request.connection.scheme.decode('ascii')}://{host}{self.settings.callback_path}"

    def _login(self, request: Request) -> Outcome:
        assert self.metadata is not None
        state, nonce, verifier = _random(), _random(), _random()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=")
        returnTo = safeReturn(request.path + request.query).decode("latin-1")
        flow = self.sealer.seal(
            self.flowName,
            {"s": state, "n": nonce, "v": verifier, "r": returnTo},
            self.reactor.seconds() + LOGIN_SECONDS,
        )
        query = urlencode({
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": self._redirectURI(request),
            "scope": " ".join(self.settings.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge.decode("ascii"),
            "code_challenge_method": "S256",
        }, quote_via=quote)
        endpoint = self.metadata["authorization_endpoint"]
        location = f"{endpoint}{'&' if '?' in endpoint else '?'}{query}".encode("ascii")
        cookie = _cookie(self.flowName, flow, self.callback, int(LOGIN_SECONDS), self._secure(request))
        return Answer(_redirect(location, [cookie]), "login redirect")

    def _forbidden(self, why: str) -> Refused:
        return Refused(Forbidden(why), why)

    async def _callback(self, request: Request) -> Outcome:
        query = dict(parse_qsl(request.query[1:].decode("latin-1"), keep_blank_values=True))
        now = self.reactor.seconds()
        flow = self.sealer.open(self.flowName, cookieValue(request.fields, self.flowName), now)
        if flow is None:
            return self._forbidden("no login in progress")
        state = query.get("state", "")
        if not hmac.compare_digest(state.encode("latin-1"), str(flow.get("s", "")).encode("latin-1")):
            return self._forbidden("state mismatch")
        used = self._used
        while used and next(iter(used.values())) < now:
            used.popitem(last=False)
        if state in used:
            return self._forbidden("state replayed")
        used[state] = now + LOGIN_SECONDS
        while len(used) > USED_STATES:
            used.popitem(last=False)
        if "error" in query or "code" not in query:
            return self._forbidden("provider refused the login")
        try:
            tokens = await self._exchange(query["code"], flow["v"], request)
            claims = await self._verifiedIDToken(tokens.get("id_token"), flow["n"])
        except TokenRefused as e:
            return self._forbidden(f"ID token refused: {e}")
        except Exception as e:
            if type(e).__name__ == "CancelledError":
                raise
            log.warn("[auth:{name}] code exchange failed: {why}", name=self.settings.name, why=str(e))
            return Refused(BackendUnavailable("token exchange failed"), "token exchange failed")
        refused = allowedBy(self.settings, claims)
        if refused is not None:
            return self._forbidden(refused)
        subject = claims["sub"]
        kept = {claim: claims[claim] for claim, _ in self.settings.claims_to_headers if claim in claims}
        session = self.sealer.seal(
            self.sessionName, {"sub": subject, "c": kept}, now + self.settings.session_ttl
        )
        secure = self._secure(request)
        cookies = [
            _cookie(self.sessionName, session, b"/", int(self.settings.session_ttl), secure),
            _cookie(self.flowName, b"", self.callback, 0, secure),
        ]
        location = safeReturn(str(flow.get("r", "/")).encode("latin-1"))
        return Answer(_redirect(location, cookies), "login", subject)

    async def _exchange(self, code: str, verifier: str, request: Request) -> dict[str, Any]:
        from edgeproxy.security.auth.http import readBody

        assert self.metadata is not None
        settings = self.settings
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._redirectURI(request),
            "code_verifier": verifier,
        }
        headers = {b"accept": [b"application/json"],
                   b"content-type": [b"application/x-www-form-urlencoded"]}
        if settings.client_secret is not None:
            # RFC 6749 2.3.1: both form-urlencoded, then Basic.
            pair = f"{quote(settings.client_id or '', safe='')}:{quote(settings.client_secret, safe='')}"
            headers[b"authorization"] = [b"Basic " + base64.b64encode(pair.encode("utf-8"))]
        else:
            form["client_id"] = settings.client_id or ""
        response = await self.client.post(
            self.metadata["token_endpoint"],
            data=urlencode(form).encode("ascii"),
            headers=headers,
            timeout=settings.timeout,
            allow_redirects=False,
        )
        body = await readBody(response)
        if response.code != 200:
            raise ValueError(f"token endpoint answered {response.code}")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("token endpoint answer is not an object")
        return document

    async def _verifiedIDToken(self, token: Any, nonce: str) -> dict[str, Any]:
        """
        The claims of the ID token (L{_verifyIDToken}); a key id the key
        set does not hold has the key set fetched again first, at most
        once a minute (L{KeySet.mayRefetch}): the provider rotated its
        keys since they were fetched.
        """
        keys = self.keys
        assert keys is not None
        try:
            return self._verifyIDToken(token, nonce)
        except KeyError:
            if not keys.mayRefetch():
                raise TokenRefused("unknown key id") from None
        await keys.fetch()
        try:
            return self._verifyIDToken(token, nonce)
        except KeyError:
            raise TokenRefused("unknown key id") from None

    def _verifyIDToken(self, token: Any, nonce: str) -> dict[str, Any]:
        """
        The claims of the ID token when it passes.

        @raise TokenRefused: it does not; the message says why.
        @raise KeyError: its C{kid} is not in the key set.
        """
        if not isinstance(token, str):
            raise TokenRefused("no ID token")
        keys = self.keys
        assert keys is not None and self.metadata is not None
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.exceptions.DecodeError:
            raise TokenRefused("malformed") from None
        algorithm = header.get("alg")
        if algorithm not in _ASYMMETRIC:
            raise TokenRefused("algorithm not allowed")
        supported = self.metadata.get("id_token_signing_alg_values_supported")
        if isinstance(supported, list) and algorithm not in supported:
            raise TokenRefused("algorithm not the provider's")
        key = keyFor(keys, header, algorithm)
        try:
            claims = pyjwt.decode(
                token, key, algorithms=[algorithm], audience=self.settings.client_id,
                issuer=self.metadata["issuer"], leeway=self.settings.leeway,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except pyjwt.exceptions.PyJWTError as e:
            raise TokenRefused(type(e).__name__) from None
        audience = claims.get("aud")
        if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != self.settings.client_id:
            raise TokenRefused("azp is not this client")
        if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            raise TokenRefused("nonce mismatch")
        if not isinstance(claims.get("sub"), str):
            raise TokenRefused("no subject")
        return claims

    def _logout(self, request: Request) -> Outcome:
        secure = self._secure(request)
        cookies = [_cookie(self.sessionName, b"", b"/", 0, secure)]
        location = b"/"
        if self.metadata is not None and isinstance(self.metadata.get("end_session_endpoint"), str):
            location = (
                self.metadata["end_session_endpoint"]
                + "?" + urlencode({"client_id": self.settings.client_id})
            ).encode("ascii")
        return Answer(_redirect(location, cookies), "logout")
