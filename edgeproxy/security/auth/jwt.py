# -*- test-case-name: tests.test_security_jwt -*-
"""
C{type = jwt}: bearer tokens (RFC 6750) that are signed JWTs (RFC 7519),
verified with PyJWT (over C{cryptography}).

What a token must be to pass (RFC 8725, the JWT best current practices):

  - signed with one of C{algorithms}: C{none} is never among them, and a
    section has either public-key algorithms with a key set (C{jwks}) or
    HMAC ones with a C{secret_file}, never both, so that a public key can
    never be used as an HMAC secret (the key confusion attack);
  - signed by the key its C{kid} names in the key set, whose type and
    C{alg} (when the key states one) fit the token's algorithm;
  - not expired (C{exp} is required), not used before C{nbf}, within
    C{leeway} seconds of clock skew;
  - issued by C{issuer} and for one of C{audience}, when they are set.

A key set from an https URL is fetched with treq at start, refreshed
every C{jwks_refresh}, and fetched again when a token names a C{kid} it
does not hold, at most once a minute (L{REFETCH_INTERVAL}): a provider's
key rotation is picked up at once, and tokens with made-up C{kid}s cannot
make the proxy hammer the provider.  Requests that arrive before the
first key set wait for it (L{KEYS_WAIT} at most).

A verified token is remembered until it expires (at most
L{CACHE_SIZE} of them, emptied when the key set changes): a client sends
the same token with every request, and a signature check costs more than
the rest of the request.

The identity is the C{sub} claim; C{claims_to_headers} sends claims to the
backend.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import jwt as pyjwt
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from edgeproxy.config.stagemodel import AuthSettings
from edgeproxy.errors import Unauthorized
from edgeproxy.pipeline.values import Request
from edgeproxy.security.auth.base import Allowed, Outcome, Refused, bearerToken, claimFields, cookieValue

__all__ = ["JWTAuthenticator", "KeySet", "TokenRefused", "keyFor", "verifyToken"]

log = Logger()

REFETCH_INTERVAL = 60.0
KEYS_WAIT = 10.0
CACHE_SIZE = 10_000


class TokenRefused(Exception):
    """A token that does not pass; the message says why (never the token)."""


class KeySet:
    """
    The keys tokens are checked with: a JWKS (RFC 7517) from a file or an
    https URL, by C{kid}.
    """

    def __init__(self, reactor: Any, url: str | None = None, ca: str | None = None,
                 refresh: float = 3600.0, timeout: float = 10.0, client: Any = None) -> None:
        """
        @param client: the treq client the URL is fetched with (the
            OpenID Connect section's own); by default one of its own,
            trusting C{ca}.
        """
        self.reactor = reactor
        self.url = url
        self.ca = ca
        self.refresh = refresh
        self.timeout = timeout
        self.keys: dict[str | None, dict[str, Any]] = {}
        self.loaded = False
        self.version = 0
        """Goes up whenever the keys change (caches of verified tokens
        are emptied then)."""
        self._lastFetch = -REFETCH_INTERVAL
        self._fetching: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self._client: Any = client
        self._timer: Any = None

    @classmethod
    def fromDocument(cls, reactor: Any, document: bytes) -> KeySet:
        """The keys of a JWKS file (read and checked with the
        configuration, L{edgeproxy.config.auth.checkJWKS})."""
        keys = cls(reactor)
        keys.load(json.loads(document))
        return keys

    def load(self, document: Any) -> None:
        """Take the keys of a JWKS document."""
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWKS document (no keys list)")
        keys: dict[str | None, dict[str, Any]] = {}
        for key in document["keys"]:
            if not isinstance(key, dict) or key.get("use", "sig") != "sig":
                continue
            keys[key.get("kid")] = key
        if keys != self.keys:
            self.keys = keys
            self.version += 1
        self.loaded = True

    # Fetching ---------------------------------------------------------------

    def start(self) -> None:
        """Fetch the URL's keys now and every C{refresh} seconds."""
        if self.url is not None and self._timer is None and self._fetching is None:
            self.fetch()

    def fetch(self) -> Deferred[None]:
        """Fetch the keys (once at a time); fires when done, never fails."""
        if self._fetching is not None:
            waiter: Deferred[None] = Deferred()
            self._waiters.append(waiter)
            return waiter
        self._lastFetch = self.reactor.seconds()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # The waiter first: the fetch may be over before ensureDeferred returns.
        waiter = Deferred()
        self._waiters.append(waiter)
        fetching = self._fetching = ensureDeferred(self._fetch())
        fetching.addBoth(self._fetched)
        return waiter

    async def _fetch(self) -> None:
        from edgeproxy.security.auth.http import getJSON, makeClient

        if self._client is None:
            self._client = makeClient(self.reactor, self.ca)
        assert self.url is not None
        self.load(await getJSON(self._client, self.url, self.timeout))

    def _fetched(self, result: Any) -> None:
        self._fetching = None
        if hasattr(result, "getErrorMessage"):
            log.warn("Cannot fetch the key set {url}: {why}", url=self.url, why=result.getErrorMessage())
        self._timer = self.reactor.callLater(
            self.refresh if self.loaded else min(self.refresh, 30.0), self.fetch
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def mayRefetch(self) -> bool:
        return self.url is not None and self.reactor.seconds() - self._lastFetch >= REFETCH_INTERVAL

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def keyFor(keys: KeySet, header: dict[str, Any], algorithm: str) -> Any:
    """
    The key of C{keys} that checks a token with C{header} signed with
    C{algorithm}: the one its C{kid} names (or the only one, when it names
    none; L{KeySet} holds only keys for signatures), if that key is for
    C{algorithm} (its C{alg}, when it states one, and its type).

    @raise KeyError: no key has that C{kid} (the caller may refetch).
    @raise TokenRefused: the key is not for this token.
    """
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenRefused("malformed token")
    jwk = keys.keys.get(kid)
    if jwk is None and kid is None and len(keys.keys) == 1:
        # A key set of one key whose tokens name none.
        jwk = next(iter(keys.keys.values()))
    if jwk is None:
        raise KeyError(kid)
    stated = jwk.get("alg")
    if stated is not None and stated != algorithm:
        raise TokenRefused("key not for this algorithm")
    try:
        return pyjwt.PyJWK(jwk, algorithm=algorithm).key
    except (pyjwt.exceptions.PyJWKError, pyjwt.exceptions.InvalidKeyError, ValueError, TypeError):
        raise TokenRefused("key not for this algorithm") from None


def verifyToken(token: bytes, settings: AuthSettings, keys: KeySet | None) -> dict[str, Any]:
    """
    The claims of C{token} when it passes (see the module docstring).

    @raise TokenRefused: it does not; the message says why.
    @raise KeyError: its C{kid} is not in C{keys} (the caller may fetch
        them again and retry).
    """
    try:
        header = pyjwt.get_unverified_header(token)
    except pyjwt.exceptions.DecodeError:
        raise TokenRefused("malformed token") from None
    algorithm = header.get("alg")
    if algorithm not in settings.algorithms:
        # "none", HS256 with a public key, anything not configured.
        raise TokenRefused("algorithm not allowed")
    if algorithm.startswith("HS"):
        key: Any = settings.secret
    else:
        assert keys is not None
        key = keyFor(keys, header, algorithm)
    try:
        return pyjwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=list(settings.audience) or None,
            issuer=settings.issuer,
            leeway=settings.leeway,
            options={"require": ["exp"], "verify_aud": bool(settings.audience)},
        )
    except pyjwt.exceptions.ExpiredSignatureError:
        raise TokenRefused("expired token") from None
    except pyjwt.exceptions.ImmatureSignatureError:
        raise TokenRefused("token not yet valid") from None
    except pyjwt.exceptions.InvalidAudienceError:
        raise TokenRefused("wrong audience") from None
    except pyjwt.exceptions.InvalidIssuerError:
        raise TokenRefused("wrong issuer") from None
    except pyjwt.exceptions.InvalidSignatureError:
        raise TokenRefused("bad signature") from None
    except pyjwt.exceptions.MissingRequiredClaimError as e:
        raise TokenRefused(f"no {e.claim} claim") from None
    except (pyjwt.exceptions.InvalidTokenError, pyjwt.exceptions.InvalidKeyError, ValueError, TypeError):
        raise TokenRefused("invalid token") from None


class JWTAuthenticator:
    """One C{type = jwt} section."""

    credentialCookies: frozenset[bytes]
    credentialPaths: frozenset[bytes] = frozenset()

    def __init__(self, settings: AuthSettings, keys: KeySet | None, clock: Any) -> None:
        self.settings = settings
        self.keys = keys
        self.clock = clock
        self.identityFields = frozenset(name.encode("ascii") for _, name in settings.claims_to_headers)
        cookie = settings.token_from[7:] if settings.token_from.startswith("cookie:") else None
        self._cookie = None if cookie is None else cookie.encode("ascii")
        self.credentialCookies = frozenset(() if self._cookie is None else (self._cookie,))
        self._cache: OrderedDict[bytes, tuple[float, Allowed]] = OrderedDict()
        self._cacheVersion = keys.version if keys is not None else 0
        self._missing = self._challenge(None)
        self._invalid = self._challenge(b"invalid_token")

    @classmethod
    def fromSettings(cls, settings: AuthSettings, reactor: Any) -> JWTAuthenticator:
        keys = None
        if settings.jwks is not None:
            if "://" in settings.jwks:
                keys = KeySet(reactor, settings.jwks, settings.jwks_ca, settings.jwks_refresh)
                keys.start()
            else:
                assert settings.jwks_document is not None
                keys = KeySet.fromDocument(reactor, settings.jwks_document)
        return cls(settings, keys, reactor)

    def _challenge(self, error: bytes | None) -> tuple[tuple[bytes, bytes], ...]:
        value = b'Bearer realm="edgeproxy"'
        if error is not None:
            value += b', error="%s"' % (error,)
        return ((b"www-authenticate", value),)

    def _refused(self, why: str, presented: bool) -> Refused:
        error = Unauthorized(why)
        error.fields = self._invalid if presented else self._missing
        return Refused(error, why)

    def token(self, request: Request) -> bytes | None:
        if self._cookie is not None:
            return cookieValue(request.fields, self._cookie)
        return bearerToken(request.fields)

    def authenticate(self, request: Request) -> Outcome | Deferred[Outcome]:
        token = self.token(request)
        if token is None:
            return self._refused("missing token", False)
        keys = self.keys
        if keys is not None and keys.version != self._cacheVersion:
            self._cache.clear()
            self._cacheVersion = keys.version
        cached = self._cache.get(token)
        if cached is not None:
            expires, allowed = cached
            if self.clock.seconds() <= expires:
                return allowed
            del self._cache[token]
        if keys is not None and not keys.loaded:
            # Only a key set from a URL is ever not loaded.
            return self._later(token, keys.fetch())
        return self._verify(token, retry=True)

    def _verify(self, token: bytes, retry: bool) -> Outcome | Deferred[Outcome]:
        try:
            claims = verifyToken(token, self.settings, self.keys)
        except TokenRefused as e:
            return self._refused(str(e), True)
        except KeyError:
            keys = self.keys
            if retry and keys is not None and keys.mayRefetch():
                return self._later(token, keys.fetch())
            return self._refused("unknown key id", True)
        subject = claims.get("sub")
        allowed = Allowed(
            subject if isinstance(subject, str) else "",
            claimFields(claims, self.settings.claims_to_headers),
        )
        expires = claims.get("exp")
        if isinstance(expires, (int, float)):
            cache = self._cache
            cache[token] = (float(expires) + self.settings.leeway, allowed)
            while len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
        return allowed

    def _later(self, token: bytes, fetched: Deferred[None]) -> Deferred[Outcome]:
        fetched.addTimeout(KEYS_WAIT, self.clock)

        def verify(_: object) -> Outcome | Deferred[Outcome]:
            if self.keys is not None and not self.keys.loaded:
                return self._refused("key set unavailable", True)
            return self._verify(token, retry=False)

        return fetched.addBoth(verify)
