# -*- test-case-name: tests.test_security_auth -*-
"""
The C{auth} stage: the route's C{[auth:NAME]} decides who the client is
before the backend sees the request.

For every type, on every request the stage lets through:

  - the client's own copies of the fields the edge sets from the identity
    (C{claims_to_headers}, C{user_header}, C{copy_response_headers}) are
    removed, so a backend can trust them;
  - C{Authorization} is removed unless C{pass_authorization = yes};
  - the type's own cookies (the OpenID Connect session) are removed from
    C{Cookie};
  - C{Set-Cookie} fields a forward auth service answered with go on the
    client's response (L{_SetCookies});
  - the request is marked C{authenticated}: the cache stage then treats
    it as one with C{Authorization} (RFC 9111 3.5), credentials removed
    or not, and never serves one user's answer to another unless the
    backend said it may be shared.

Credentials are never logged: the access log gets the subject (C{user})
of an accepted request and, for a refused one, C{auth NAME: why}, where
C{why} names what was wrong (C{missing credentials}, C{expired token}...),
never a password or token; the target of a path whose query carries a
credential (the OpenID Connect callback's code: C{credentialPaths}) is
logged without its query, whatever answers the request (the listener
strips it, L{edgeproxy.pipeline.stages.RoutePipeline.quietPaths}).

Rate limits keyed on the identity (C{key = identity}) are applied here,
right after authentication and before the request goes on: the
C{ratelimit} stage runs earlier in the fixed order and does not know the
subject yet (see L{edgeproxy.security.ratelimit}).

Authenticators are shared by every route naming the same section, and
kept across reloads that leave the section (and the files it names)
unchanged, so that key sets, discovery documents, cached verdicts and
tokens survive a reload (L{authenticatorFor}).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.config.model import Config, Route
from edgeproxy.config.stagemodel import AuthSettings
from edgeproxy.errors import BackendUnavailable, ProxyError
from edgeproxy.h1.fields import Fields, linesWithout, noteLine
from edgeproxy.h1.syntax import linePrefix
from edgeproxy.pipeline.call import Call, Stage
from edgeproxy.pipeline.stages import registerKind
from edgeproxy.pipeline.values import Response
from edgeproxy.security.auth.base import Allowed, Answer, Authenticator, Outcome, Refused, withoutCookies
from edgeproxy.security.ratelimit import LimitSet, buildLimitSet, routeLimits

__all__ = ["AuthStage", "authenticatorFor"]

log = Logger()


class AuthStage:
    """The C{auth} stage of one route."""

    __slots__ = (
        "name", "authenticator", "identityLimits", "credentialPaths", "_strip", "_cookies", "_metrics", "_route",
    )

    def __init__(
        self,
        route: Route,
        settings: AuthSettings,
        authenticator: Authenticator,
        identityLimits: LimitSet | None = None,
        metrics: Any = None,
    ) -> None:
        self.name = settings.name
        self.authenticator = authenticator
        self.identityLimits = identityLimits
        strip = set(authenticator.identityFields)
        if not settings.pass_authorization:
            strip.add(b"authorization")
        self._strip = frozenset(strip)
        self._cookies = authenticator.credentialCookies
        self.credentialPaths = authenticator.credentialPaths
        self._metrics = metrics
        self._route = route.name

    def handle(self, call: Call) -> None:
        request = call.request
        outcome = self.authenticator.authenticate(request)
        if type(outcome) is Allowed:
            # The usual case (a cached token, a remembered password): at once.
            self._decided(outcome, call)
            return
        if isinstance(outcome, Deferred):
            call.cancelHook = outcome.cancel
            outcome.addCallbacks(self._decided, self._failed, callbackArgs=(call,), errbackArgs=(call,))
            return
        self._decided(outcome, call)

    def _decided(self, outcome: Outcome, call: Call) -> None:
        if call.over:
            return
        call.cancelHook = None
        if type(outcome) is Allowed:
            request = call.request
            strip = self._strip
            fields = request.fields
            lines = fields.lines()
            if lines is not None and not self._cookies:
                # Fields as read from the wire stay lines, as through the
                # header rules: the forward stage and the HTTP/1.1 writer
                # keep their fast paths.  The fields set (names from the
                # configuration, values through base.fieldValue) are among
                # those stripped.
                kept = linesWithout(lines, strip)
                for name, value in outcome.fields:
                    line = linePrefix(name) + value
                    noteLine(line, name, value)
                    kept.append(line)
                fields = fields.withLines(kept, strip)
            else:
                # One copy of the fields, not one per change.
                raw = {name: values for name, values in fields.raw().items() if name not in strip}
                for name, value in outcome.fields:
                    raw[name] = [value]
                fields = Fields.trusted(raw)
                if self._cookies:
                    fields = withoutCookies(fields, self._cookies)
            call.request = request._replace(fields=fields, authenticated=True)
            call.identity = outcome.identity or None
            if outcome.setCookies:
                call.onResponse(_SetCookies(outcome.setCookies))
            limits = self.identityLimits
            if limits is not None:
                limits.apply(call, outcome.identity, call.next)
            else:
                call.next()
            return
        assert not isinstance(outcome, Allowed)
        call.refusedBy = f"auth {self.name}: {outcome.why}"
        if type(outcome) is Refused:
            if self._metrics is not None:
                self._metrics.authRefused(self._route, self.name)
            call.fail(outcome.error)
            return
        assert type(outcome) is Answer
        if outcome.identity:
            call.identity = outcome.identity
        call.respond(outcome.response)

    def _failed(self, failure: Failure, call: Call) -> None:
        if call.over or failure.check(CancelledError):
            return
        call.cancelHook = None
        log.failure("[auth:{name}] failed", failure=failure, name=self.name)
        call.refusedBy = f"auth {self.name}: error"
        call.fail(BackendUnavailable(f"[auth:{self.name}] failed"))


class _SetCookies:
    """
    Adds the auth service's C{Set-Cookie} fields to the answer the client
    gets (a L{edgeproxy.pipeline.call.ResponseHandler}).  Registered by
    the auth stage, before the cache, so the cache never stores them.  An
    error the edge answers goes without them.
    """

    __slots__ = ("values",)

    def __init__(self, values: tuple[bytes, ...]) -> None:
        self.values = values

    def onResponse(self, call: Call, response: Response) -> None:
        raw = response.fields.copyRaw()
        raw[b"set-cookie"] = [*raw.get(b"set-cookie", ()), *self.values]
        call.respond(response._replace(fields=Fields.trusted(raw)))

    def onError(self, call: Call, error: ProxyError) -> None:
        call.fail(error)


_authenticators: weakref.WeakValueDictionary[tuple[Any, ...], Any] = weakref.WeakValueDictionary()


def authenticatorFor(settings: AuthSettings, reactor: Any, metrics: Any = None) -> Authenticator:
    """
    The authenticator of C{settings}: the same object for every route
    naming the section and across reloads while the section did not
    change; the settings hold what the files it names (htpasswd, a JWKS
    file) held when the configuration was read, so a SIGHUP after editing
    the htpasswd file makes a new one.
    """
    key = (id(reactor), settings)
    found = _authenticators.get(key)
    if found is not None:
        return found
    made: Any
    if settings.type == "basic":
        from edgeproxy.security.auth.basic import BasicAuthenticator

        made = BasicAuthenticator.fromSettings(settings, reactor)
    elif settings.type == "jwt":
        from edgeproxy.security.auth.jwt import JWTAuthenticator

        made = JWTAuthenticator.fromSettings(settings, reactor)
    elif settings.type == "forward":
        from edgeproxy.security.auth.forward import ForwardAuthenticator

        made = ForwardAuthenticator.fromSettings(settings, reactor, metrics)
    else:
        from edgeproxy.security.auth.oidc import OIDCAuthenticator

        made = OIDCAuthenticator.fromSettings(settings, reactor)
    _authenticators[key] = made
    return made


class AuthKind:
    """Builds the C{auth} stage of routes with C{auth = NAME}."""

    name = "auth"

    def build(
        self, route: Route, config: Config, context: Mapping[str, Any], previous: Stage | None
    ) -> Stage | None:
        if route.auth is None:
            return None
        settings = config.auths[route.auth]
        reactor = context.get("reactor")
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        metrics = context.get("metrics")
        identityLimits = tuple(limit for limit in routeLimits(route, config) if limit.key == "identity")
        limits = buildLimitSet(route, config, context, identityLimits) if identityLimits else None
        return AuthStage(route, settings, authenticatorFor(settings, reactor, metrics), limits, metrics)


registerKind(AuthKind())
