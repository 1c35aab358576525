# -*- test-case-name: tests.test_security_forward -*-
"""
C{type = forward}: an auth service decides (the nginx C{auth_request},
Traefik C{forwardAuth} and Caddy C{forward_auth} model).

For each request, a C{GET} to C{url} (treq) carries what the request was:

    X-Forwarded-Method: POST
    X-Forwarded-Uri: /path?query        (the normalised path, the query as sent)
    X-Forwarded-Host: app.example
    X-Forwarded-Proto: https
    X-Forwarded-For: 203.0.113.9        (the client address)

and the request's C{copy_request_headers} (C{Cookie}, C{Authorization}...);
never its body, which waits.  A C{2xx} answer lets the request through
with the answer's C{copy_response_headers} set on it (the client's own
copies removed; the first of them present is the identity), and its
C{Set-Cookie} fields added to the response the client gets (unless
C{pass_cookies = no}: oauth2-proxy and its kind refresh their session
cookie so; nginx needs C{auth_request_set} and C{add_header} for it,
Traefik C{addAuthCookiesToResponse}); anything else
is what the client gets, status, fields and body (up to
L{edgeproxy.security.auth.http.MAX_BODY} bytes), so the service's login
redirect or error page reaches the browser.  An auth service that cannot
be reached, or not within C{timeout}, gives C{502}.

Verdicts are cached (C{cache_ttl > 0}): a C{2xx} verdict is remembered
for C{cache_ttl} seconds per credential and route, the credential being
the values of C{copy_request_headers} (hashed; a request carrying none of
them is never cached), at most C{cache_size} verdicts.  Only C{2xx}: a
denial cached would keep a user out for C{cache_ttl} after logging in.
The method and path are not part of the key: cache only when the service
decides per user, not per path.  A verdict may so outlive a logout by up
to C{cache_ttl}; none of nginx, Traefik or Caddy caches at all, which is
the choice C{cache_ttl = 0} (the default) keeps.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from edgeproxy.config.stagemodel import AuthSettings
from edgeproxy.errors import BackendUnavailable, UpstreamTimeout
from edgeproxy.h1.errors import ProtocolError
from edgeproxy.h1.fields import Fields
from edgeproxy.h1.responses import HOP_BY_HOP
from edgeproxy.pipeline.values import BytesBody, Request, Response
from edgeproxy.security.auth.base import Allowed, Answer, Outcome, Refused, fieldValue

__all__ = ["ForwardAuthenticator", "subrequestFields"]

_NOT_PASSED_BACK = HOP_BY_HOP | frozenset((b"content-length", b"content-encoding"))


def subrequestFields(request: Request, copied: tuple[bytes, ...]) -> dict[bytes, list[bytes]]:
    """The fields of the subrequest to the auth service for C{request}."""
    fields: dict[bytes, list[bytes]] = {
        b"x-forwarded-method": [request.method],
        b"x-forwarded-uri": [request.path + request.query],
        b"x-forwarded-host": [fieldValue(request.host.decode("latin-1"))],
        b"x-forwarded-proto": [request.connection.scheme],
        b"x-forwarded-for": [request.client.encode("ascii", "replace")],
    }
    for name in copied:
        values = request.fields.getAll(name)
        if values:
            fields[name] = list(values)
    return fields


def _cookieValues(values: list[bytes]) -> list[bytes]:
    """The C{Set-Cookie} values that are valid field values (others are
    dropped, as the client's response could not carry them)."""
    kept = []
    for value in values:
        try:
            Fields([(b"set-cookie", value)])
        except ProtocolError:
            continue
        kept.append(value)
    return kept


class ForwardAuthenticator:
    """One C{type = forward} section."""

    credentialCookies: frozenset[bytes] = frozenset()
    credentialPaths: frozenset[bytes] = frozenset()

    def __init__(self, settings: AuthSettings, client: Any, clock: Any, metrics: Any = None) -> None:
        assert settings.url is not None
        self.settings = settings
        self.url = settings.url.encode("ascii")
        self.client = client
        self.clock = clock
        self.metrics = metrics
        self.copied = tuple(name.encode("ascii") for name in settings.copy_request_headers)
        self.returned = tuple(name.encode("ascii") for name in settings.copy_response_headers)
        self.identityFields = frozenset(self.returned)
        self._cache: OrderedDict[bytes, tuple[float, Allowed]] = OrderedDict()

    @classmethod
    def fromSettings(cls, settings: AuthSettings, reactor: Any, metrics: Any = None) -> ForwardAuthenticator:
        from edgeproxy.security.auth.http import makeClient

        return cls(settings, makeClient(reactor, settings.ca), reactor, metrics)

    def _cacheKey(self, request: Request) -> bytes | None:
        parts = []
        present = False
        for name in self.copied:
            values = request.fields.getAll(name)
            present = present or bool(values)
            parts.append(name + b"\0" + b"\n".join(values))
        if not present:
            return None
        route = request.route.name.encode("utf-8") if request.route is not None else b""
        return hashlib.sha256(route + b"\0" + b"\0".join(parts)).digest()

    def authenticate(self, request: Request) -> Outcome | Deferred[Outcome]:
        key = None
        if self.settings.cache_ttl > 0:
            key = self._cacheKey(request)
            if key is not None:
                cached = self._cache.get(key)
                hit = cached is not None and cached[0] > self.clock.seconds()
                if self.metrics is not None:
                    self.metrics.authCacheLookup(self.settings.name, hit)
                if hit:
                    return cached[1]  # type: ignore[index]
        return ensureDeferred(self._ask(request, key))

    async def _ask(self, request: Request, key: bytes | None) -> Outcome:
        from twisted.internet.error import TimeoutError as ConnectTimeout
        from twisted.internet.defer import TimeoutError as DeferredTimeout

        from edgeproxy.security.auth.http import readBody

        try:
            response = await self.client.get(
                self.url,
                headers=subrequestFields(request, self.copied),
                timeout=self.settings.timeout,
                allow_redirects=False,
            )
            body = await readBody(response)
        except (ConnectTimeout, DeferredTimeout):
            return Refused(UpstreamTimeout("auth service timed out"), "service timed out")
        except Exception as e:
            if type(e).__name__ == "CancelledError":
                raise
            return Refused(BackendUnavailable(f"auth service: {e}"), "service unavailable")
        headers = response.headers
        if 200 <= response.code < 300:
            copied: list[tuple[bytes, bytes]] = []
            identity = ""
            for name in self.returned:
                values = headers.getRawHeaders(name)
                if values:
                    value = fieldValue(values[0].decode("latin-1"))
                    copied.append((name, value))
                    if not identity:
                        identity = value.decode("latin-1")
            allowed = Allowed(identity, tuple(copied))
            if key is not None:
                cache = self._cache
                # Without its cookies: they were for the request that
                # asked, not for the ones the verdict lets through later.
                cache[key] = (self.clock.seconds() + self.settings.cache_ttl, allowed)
                cache.move_to_end(key)
                while len(cache) > self.settings.cache_size:
                    cache.popitem(last=False)
            if self.settings.pass_cookies:
                cookies = headers.getRawHeaders(b"set-cookie")
                if cookies:
                    return allowed._replace(setCookies=tuple(_cookieValues(cookies)))
            return allowed
        raw: dict[bytes, list[bytes]] = {}
        for name, values in headers.getAllRawHeaders():
            lower = name.lower()
            if lower not in _NOT_PASSED_BACK:
                raw[lower] = list(values)
        try:
            fields = Fields([(name, value) for name, values in raw.items() for value in values])
        except Exception:
            return Refused(BackendUnavailable("auth service: unusable fields"), "service answer unusable")
        answer = Response(
            response.code,
            (response.phrase or b"").replace(b"\r", b"").replace(b"\n", b""),
            fields,
            len(body),
            BytesBody(body),
        )
        return Answer(answer, f"service answered {response.code}")
