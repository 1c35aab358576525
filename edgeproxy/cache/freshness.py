# -*- test-case-name: tests.test_cache_freshness -*-
"""
The rules of a shared cache (RFC 9111), as pure functions over values: what
may be stored (L{storability}, section 3), for how long
(L{responsePolicy}, 4.2.1 and 4.2.2), how old a stored response is
(L{initialAge} and L{currentAge}, 4.2.3), and whether a request may have
it as it is, stale, or only after validation (L{judge}, 4.2 with the
request directives of 5.2.1 and RFC 5861).

Every time is a number the caller reads from its clock: nothing here reads
one.  Worked example, a response with C{Cache-Control: max-age=60} and a
C{Date} 10 s before it arrived, stored 30 s ago::

    initialAge(...) == 10.0;  currentAge(10.0, responseTime, now) == 40.0
    judge(policy, 40.0, None, ...).how == FRESH   (ttl 20)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from edgeproxy.cache.directives import (
    INVALID,
    Directives,
    parseAge,
    parseCacheControl,
    parseHTTPDate,
    parseTargeted,
)
from edgeproxy.h1.fields import Fields

__all__ = [
    "FRESH",
    "HEURISTIC_STATUSES",
    "REVALIDATE",
    "STALE",
    "STALE_REFRESH",
    "Policy",
    "RequestDirectives",
    "Rules",
    "Storability",
    "Use",
    "currentAge",
    "directivesOf",
    "initialAge",
    "judge",
    "requestDirectives",
    "responsePolicy",
    "staleIfErrorAllows",
    "storability",
]

HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
"""RFC 9110 15.1: statuses cacheable by default (heuristically)."""

UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | frozenset({302, 303, 307})
"""The statuses whose caching rules this cache implements (for
C{must-understand}, RFC 9111 5.2.2.3)."""

HEURISTIC_FRACTION = 0.1
"""RFC 9111 4.2.2: a typical heuristic is 10% of the time since
C{Last-Modified}."""


class Rules(NamedTuple):
    """What the rules need of the configuration (C{[cache]} and the route)."""

    targetedField: bytes = b"cdn-cache-control"
    """The targeted cache-control field (lower case), or C{b""} for none."""
    heuristicMax: float = 86400.0
    """The cap on a heuristic lifetime (C{heuristic_max})."""
    defaultTTL: float | None = None
    """C{default_ttl}: the lifetime of a response that allows caching but
    gives none."""
    cacheCookies: bool = False
    """C{cache_cookies}: responses setting cookies, and responses to
    requests with cookies, may be stored."""


class Policy(NamedTuple):
    """What a stored response's directives say about serving it."""

    lifetime: float
    """Freshness lifetime, seconds (0: stale at once)."""
    mustRevalidate: bool = False
    """Never served stale (C{must-revalidate}, C{proxy-revalidate},
    C{s-maxage}: RFC 9111 4.2.4)."""
    noCache: bool = False
    """Validated before every use (C{no-cache}, RFC 9111 5.2.2.4)."""
    staleWhileRevalidate: float | None = None
    """The response's own C{stale-while-revalidate} (RFC 5861 3)."""
    staleIfError: float | None = None
    """The response's own C{stale-if-error} (RFC 5861 4)."""
    heuristic: bool = False
    """The lifetime is a guess (RFC 9111 4.2.2) or C{default_ttl}."""

    @property
    def staleForbidden(self) -> bool:
        return self.mustRevalidate or self.noCache


class Storability(NamedTuple):
    """Whether a response may be stored, and if so under which policy."""

    policy: Policy | None
    """L{None}: not stored."""
    why: str
    """Why not (for the log and C{Cache-Status}'s C{detail}); C{""} when
    stored."""


def directivesOf(fields: Fields, targetedField: bytes) -> tuple[Directives, bool]:
    """
    The directives that govern this cache: the targeted field's when it
    holds a valid one, else C{Cache-Control}'s (RFC 9213 2.1).

    @return: the directives, and whether they came from the targeted
        field (then C{Expires} is ignored too).
    """
    if targetedField:
        targeted = parseTargeted(fields.getAll(targetedField))
        if targeted is not None:
            return targeted, True
    return parseCacheControl(fields.getAll(b"cache-control")), False


def _explicitLifetime(
    directives: Directives, fields: Fields, targeted: bool, date: float
) -> float | None:
    """RFC 9111 4.2.1: s-maxage, then max-age, then Expires - Date."""
    for name in (b"s-maxage", b"max-age"):
        seconds = directives.seconds(name)
        if seconds is INVALID:
            return 0.0
        if seconds is not None:
            return float(seconds)  # type: ignore[arg-type]
    if targeted:
        return None
    expires = fields.getAll(b"expires")
    if not expires:
        return None
    if len(set(expires)) > 1:
        # RFC 9111 4.2.1: conflicting values; consider it stale.
        return 0.0
    when = parseHTTPDate(expires[0])
    if when is None:
        # RFC 9111 5.3: an invalid date, "0" in particular, is in the past.
        return 0.0
    return max(0.0, when - date)


def _seconds(directives: Directives, name: bytes) -> float | None:
    value = directives.seconds(name)
    if value is None or value is INVALID:
        return None
    return float(value)  # type: ignore[arg-type]


def responsePolicy(fields: Fields, status: int, rules: Rules, received: float) -> Policy:
    """
    The freshness policy of a response (assumed storable): its lifetime
    from the targeted field, C{s-maxage}, C{max-age}, C{Expires}, then
    C{default_ttl}, then the heuristic (heuristically cacheable statuses
    with a C{Last-Modified}: 10% of its age, at most C{heuristicMax}).

    @param received: when it was received: its C{Date} when it has none
        or an invalid one (RFC 9110 6.6.1).
    """
    date = parseHTTPDate(fields.get(b"date"))
    if date is None:
        date = received
    directives, targeted = directivesOf(fields, rules.targetedField)
    lifetime = _explicitLifetime(directives, fields, targeted, date)
    heuristic = False
    if lifetime is None:
        heuristic = True
        if status not in HEURISTIC_STATUSES:
            lifetime = 0.0
        elif rules.defaultTTL is not None:
            lifetime = rules.defaultTTL
        else:
            lastModified = parseHTTPDate(fields.get(b"last-modified"))
            if lastModified is None or lastModified >= date:
                lifetime = 0.0
            else:
                lifetime = min(HEURISTIC_FRACTION * (date - lastModified), rules.heuristicMax)
    return Policy(
        lifetime=lifetime,
        mustRevalidate=(
            b"must-revalidate" in directives
            or b"proxy-revalidate" in directives
            # RFC 9111 5.2.2.10: s-maxage implies proxy-revalidate.
            or b"s-maxage" in directives
        ),
        noCache=b"no-cache" in directives,
        staleWhileRevalidate=_seconds(directives, b"stale-while-revalidate"),
        staleIfError=_seconds(directives, b"stale-if-error"),
        heuristic=heuristic,
    )


def storability(
    method: bytes,
    requestFields: Fields,
    request: RequestDirectives | None,
    status: int,
    fields: Fields,
    rules: Rules,
    received: float,
    authenticated: bool = False,
) -> Storability:
    """
    Whether a shared cache may store this response (RFC 9111 3, 3.5, and
    the stricter defaults of the edge: no cookies, no error statuses that
    are not heuristically cacheable), and its policy if so.

    @param received: when it was received (see L{responsePolicy}).
    @param authenticated: the edge authenticated the request (and may have
        removed its C{Authorization} or session cookie before this
        stage): it counts as a request with C{Authorization}.
    """
    if method != b"GET":
        return Storability(None, "method")
    if status < 200 or status in (206, 304):
        return Storability(None, "status")
    directives, _ = directivesOf(fields, rules.targetedField)
    understood = status in UNDERSTOOD_STATUSES
    if b"must-understand" in directives:
        if not understood:
            return Storability(None, "must-understand")
    elif b"no-store" in directives:
        return Storability(None, "no-store")
    if request is not None and request.noStore:
        return Storability(None, "request no-store")
    if b"private" in directives:
        # Qualified or not: this cache keeps no copy with fields left out.
        return Storability(None, "private")
    if status >= 400 and status not in HEURISTIC_STATUSES:
        return Storability(None, "status")
    explicitlyShared = (
        b"public" in directives or b"s-maxage" in directives or b"must-revalidate" in directives
    )
    if (authenticated or b"authorization" in requestFields) and not explicitlyShared:
        # RFC 9111 3.5.
        return Storability(None, "authorization")
    if not rules.cacheCookies:
        if b"cookie" in requestFields and not explicitlyShared:
            # As with Authorization: an answer to a request with a session
            # is personal unless the origin says otherwise (cache deception).
            return Storability(None, "cookie")
        if b"set-cookie" in fields:
            return Storability(None, "set-cookie")
    varied = fields.getAll(b"vary")
    if any(b"*" in [name.strip(b" \t") for name in value.split(b",")] for value in varied):
        # RFC 9111 4.1: Vary: * never matches.
        return Storability(None, "vary")
    if parseAge(fields.getAll(b"age")) is INVALID:
        return Storability(None, "age")
    policy = responsePolicy(fields, status, rules, received)
    if (
        policy.lifetime <= 0
        and b"etag" not in fields
        and b"last-modified" not in fields
        and policy.staleWhileRevalidate is None
        and policy.staleIfError is None
    ):
        # Nothing could ever be served from it.
        return Storability(None, "no lifetime")
    return Storability(policy, "")


def initialAge(fields: Fields, requestTime: float, responseTime: float) -> float:
    """
    RFC 9111 4.2.3: the corrected initial age of a response received at
    C{responseTime} for a request sent at C{requestTime}: the larger of
    its apparent age (receipt minus C{Date}) and its C{Age} plus the
    response delay.  A missing or invalid C{Date} counts as the receipt
    time (RFC 9110 6.6.1); an invalid C{Age} is the caller's to refuse
    (L{storability}), here it counts as 0.
    """
    date = parseHTTPDate(fields.get(b"date"))
    apparent = 0.0 if date is None else max(0.0, responseTime - date)
    age = parseAge(fields.getAll(b"age"))
    ageValue = 0 if age is None or age is INVALID else age
    delay = max(0.0, responseTime - requestTime)
    return max(apparent, ageValue + delay)  # type: ignore[operator]


def currentAge(initial: float, responseTime: float, now: float) -> float:
    """RFC 9111 4.2.3: corrected initial age plus resident time."""
    return initial + max(0.0, now - responseTime)


class RequestDirectives(NamedTuple):
    """What a request's C{Cache-Control} (or C{Pragma}) asks of a cache."""

    noCache: bool = False
    noStore: bool = False
    maxAge: float | None = None
    maxStale: float | None = None
    minFresh: float | None = None
    onlyIfCached: bool = False


def requestDirectives(fields: Fields) -> RequestDirectives | None:
    """
    The request directives (RFC 9111 5.2.1), with C{Pragma: no-cache}
    when there is no C{Cache-Control} (5.4); L{None} when there are none.
    An argument that is not a number is ignored.
    """
    values = fields.getAll(b"cache-control")
    if not values:
        pragma = fields.getAll(b"pragma")
        if pragma and any(
            token.strip(b" \t").lower() == b"no-cache" for value in pragma for token in value.split(b",")
        ):
            return RequestDirectives(noCache=True)
        return None
    directives = parseCacheControl(values)
    if not directives:
        return None

    def seconds(name: bytes, optional: bool = False) -> float | None:
        value = directives.optionalSeconds(name) if optional else directives.seconds(name)
        if value is None or value is INVALID:
            return None
        return float(value)  # type: ignore[arg-type]

    return RequestDirectives(
        noCache=b"no-cache" in directives,
        noStore=b"no-store" in directives,
        maxAge=seconds(b"max-age"),
        maxStale=seconds(b"max-stale", optional=True),
        minFresh=seconds(b"min-fresh"),
        onlyIfCached=b"only-if-cached" in directives,
    )


FRESH = 0
"""Serve it."""
STALE = 1
"""Serve it stale (the request's C{max-stale} accepts it)."""
STALE_REFRESH = 2
"""Serve it stale and refresh it in the background (C{stale-while-revalidate})."""
REVALIDATE = 3
"""Validate it with the origin first."""


class Use(NamedTuple):
    """How a stored response may answer a request."""

    how: int
    """L{FRESH}, L{STALE}, L{STALE_REFRESH} or L{REVALIDATE}."""
    ttl: float
    """Freshness left, seconds (negative: stale for that long)."""
    forward: bytes = b""
    """For L{REVALIDATE}, C{Cache-Status}'s C{fwd}: C{stale} (it is
    stale) or C{request} (fresh, but the request would not have it)."""


def judge(
    policy: Policy,
    age: float,
    request: RequestDirectives | None,
    routeStaleWhileRevalidate: float = 0.0,
) -> Use:
    """
    How a stored response of this C{policy} and C{age} may answer a
    request with these directives (RFC 9111 4.2, 4.2.4, 5.2.1; RFC 5861 3).
    """
    ttl = policy.lifetime - age
    if request is not None:
        if request.noCache:
            return Use(REVALIDATE, ttl, b"request")
        if request.maxAge is not None and age > request.maxAge:
            return Use(REVALIDATE, ttl, b"request")
        if request.minFresh is not None and ttl < request.minFresh:
            return Use(REVALIDATE, ttl, b"request" if ttl > 0 else b"stale")
    if policy.noCache:
        return Use(REVALIDATE, ttl, b"stale")
    if ttl > 0:
        return Use(FRESH, ttl)
    if policy.mustRevalidate:
        return Use(REVALIDATE, ttl, b"stale")
    staleness = -ttl
    if request is not None and request.maxStale is not None and staleness <= request.maxStale:
        return Use(STALE, ttl)
    window = policy.staleWhileRevalidate
    if window is None:
        window = routeStaleWhileRevalidate
    if window > 0 and staleness <= window:
        return Use(STALE_REFRESH, ttl)
    return Use(REVALIDATE, ttl, b"stale")


def staleIfErrorAllows(policy: Policy, age: float, routeStaleIfError: float = 0.0) -> bool:
    """
    Whether a stored response of this age may answer in place of an
    error (a 5xx, a failed connection, a timeout): RFC 5861 4, from the
    response's C{stale-if-error} or the route's default, never when the
    response forbids stale answers (RFC 9111 4.2.4).
    """
    if policy.staleForbidden:
        return False
    staleness = age - policy.lifetime
    if staleness <= 0:
        return True
    window = policy.staleIfError
    if window is None:
        window = routeStaleIfError
    return staleness <= window


def varyNames(values: Sequence[bytes]) -> tuple[bytes, ...]:
    """The field names a C{Vary} lists, lower case, in order, once each."""
    names: list[bytes] = []
    for value in values:
        for name in value.split(b","):
            name = name.strip(b" \t").lower()
            if name and name not in names:
                names.append(name)
    return tuple(names)
