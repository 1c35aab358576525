"""
Tests for L{edgeproxy.cache.freshness}: what a shared cache may store, for
how long, how old it is, and what a request may have, as tables of cases
with the clock given (RFC 9111 3, 4.2, 5.2; RFC 5861; RFC 9213).
"""

from __future__ import annotations

import pytest

from edgeproxy.cache.directives import formatHTTPDate
from edgeproxy.cache.freshness import (
    FRESH,
    REVALIDATE,
    STALE,
    STALE_REFRESH,
    Policy,
    RequestDirectives,
    Rules,
    currentAge,
    initialAge,
    judge,
    requestDirectives,
    responsePolicy,
    staleIfErrorAllows,
    storability,
    varyNames,
)
from edgeproxy.h1.fields import Fields

NOW = 1_700_000_000.0
RULES = Rules()


def date(offset: float) -> bytes:
    return formatHTTPDate(NOW + offset)


def F(*pairs: tuple[bytes, bytes]) -> Fields:
    return Fields(pairs)


CACHEABLE = (b"cache-control", b"max-age=60")


@pytest.mark.parametrize(
    "method, request_, status, response, rules, stored, why",
    [
        (b"GET", F(), 200, F(CACHEABLE), RULES, True, ""),
        (b"HEAD", F(), 200, F(CACHEABLE), RULES, False, "method"),
        (b"POST", F(), 200, F(CACHEABLE), RULES, False, "method"),
        (b"GET", F(), 206, F(CACHEABLE), RULES, False, "status"),
        (b"GET", F(), 304, F(CACHEABLE), RULES, False, "status"),
        (b"GET", F(), 101, F(CACHEABLE), RULES, False, "status"),
        (b"GET", F(), 200, F((b"cache-control", b"no-store, max-age=60")), RULES, False, "no-store"),
        (b"GET", F(), 200, F((b"cache-control", b"private")), RULES, False, "private"),
        (b"GET", F(), 200, F((b"cache-control", b'private="x", max-age=9')), RULES, False, "private"),
        # RFC 9111 5.2.2.3: must-understand overrides no-store for a known status...
        (b"GET", F(), 200, F((b"cache-control", b"must-understand, no-store, max-age=60")), RULES, True, ""),
        # ... and refuses an unknown one.
        (b"GET", F(), 299, F((b"cache-control", b"must-understand, no-store, max-age=60")), RULES, False,
         "must-understand"),
        # Request no-store.
        (b"GET", F((b"cache-control", b"no-store")), 200, F(CACHEABLE), RULES, False, "request no-store"),
        # RFC 9111 3.5: Authorization only with public, s-maxage or must-revalidate.
        (b"GET", F((b"authorization", b"Bearer x")), 200, F(CACHEABLE), RULES, False, "authorization"),
        (b"GET", F((b"authorization", b"Bearer x")), 200, F((b"cache-control", b"public, max-age=60")), RULES,
         True, ""),
        (b"GET", F((b"authorization", b"Bearer x")), 200, F((b"cache-control", b"s-maxage=60")), RULES, True, ""),
        (b"GET", F((b"authorization", b"Bearer x")), 200,
         F((b"cache-control", b"must-revalidate, max-age=60")), RULES, True, ""),
        # Cookies: never by default; with cache_cookies, yes.
        (b"GET", F((b"cookie", b"s=1")), 200, F(CACHEABLE), RULES, False, "cookie"),
        (b"GET", F((b"cookie", b"s=1")), 200, F((b"cache-control", b"public, max-age=60")), RULES, True, ""),
        (b"GET", F((b"cookie", b"s=1")), 200, F(CACHEABLE), Rules(cacheCookies=True), True, ""),
        (b"GET", F(), 200, F(CACHEABLE, (b"set-cookie", b"s=1")), RULES, False, "set-cookie"),
        (b"GET", F(), 200, F(CACHEABLE, (b"set-cookie", b"s=1")), Rules(cacheCookies=True), True, ""),
        # Vary: * never matches (RFC 9111 4.1).
        (b"GET", F(), 200, F(CACHEABLE, (b"vary", b"accept, *")), RULES, False, "vary"),
        (b"GET", F(), 200, F(CACHEABLE, (b"vary", b"accept")), RULES, True, ""),
        # An invalid Age is not 0: the response is not trusted.
        (b"GET", F(), 200, F(CACHEABLE, (b"age", b"-3")), RULES, False, "age"),
        # Error statuses that are not heuristically cacheable: never.
        (b"GET", F(), 500, F(CACHEABLE), RULES, False, "status"),
        (b"GET", F(), 503, F(CACHEABLE), RULES, False, "status"),
        (b"GET", F(), 403, F(CACHEABLE), RULES, False, "status"),
        (b"GET", F(), 404, F(CACHEABLE), RULES, True, ""),
        (b"GET", F(), 410, F(), RULES, False, "no lifetime"),
        # Redirects with an explicit lifetime are stored.
        (b"GET", F(), 302, F(CACHEABLE), RULES, True, ""),
        (b"GET", F(), 302, F(), RULES, False, "no lifetime"),
        # Nothing to serve from: no lifetime, no validator.
        (b"GET", F(), 200, F(), RULES, False, "no lifetime"),
        (b"GET", F(), 200, F((b"cache-control", b"max-age=0")), RULES, False, "no lifetime"),
        # ... but a validator makes it worth keeping (revalidated on use).
        (b"GET", F(), 200, F((b"cache-control", b"no-cache"), (b"etag", b'"a"')), RULES, True, ""),
        (b"GET", F(), 200, F((b"last-modified", date(-10))), RULES, True, ""),
        # The targeted field wins over Cache-Control (RFC 9213).
        (b"GET", F(), 200, F((b"cache-control", b"no-store"), (b"cdn-cache-control", b"max-age=60")), RULES,
         True, ""),
        (b"GET", F(), 200, F(CACHEABLE, (b"cdn-cache-control", b"no-store")), RULES, False, "no-store"),
        (b"GET", F(), 200, F(CACHEABLE, (b"cdn-cache-control", b"private")), RULES, False, "private"),
        # default_ttl makes a response with no lifetime storable.
        (b"GET", F(), 200, F(), Rules(defaultTTL=30.0), True, ""),
    ],
)
def test_storability(
    method: bytes, request_: Fields, status: int, response: Fields, rules: Rules, stored: bool, why: str
) -> None:
    verdict = storability(method, request_, requestDirectives(request_), status, response, rules, NOW)
    assert (verdict.policy is not None) is stored
    assert verdict.why == why


@pytest.mark.parametrize(
    "response, stored",
    [
        (F(CACHEABLE), False),
        (F((b"cache-control", b"public, max-age=60")), True),
        (F((b"cache-control", b"s-maxage=60")), True),
        (F((b"cache-control", b"must-revalidate, max-age=60")), True),
    ],
)
def test_authenticatedCountsAsAuthorization(response: Fields, stored: bool) -> None:
    """
    A request the edge authenticated (its Authorization or session cookie
    removed since) is one with Authorization for RFC 9111 3.5.
    """
    verdict = storability(b"GET", F(), None, 200, response, RULES, NOW, authenticated=True)
    assert (verdict.policy is not None, verdict.why) == (stored, "" if stored else "authorization")


@pytest.mark.parametrize(
    "response, status, rules, lifetime, heuristic",
    [
        (F((b"cache-control", b"max-age=60")), 200, RULES, 60.0, False),
        (F((b"cache-control", b"max-age=60, s-maxage=10")), 200, RULES, 10.0, False),
        (F((b"cache-control", b"max-age=60"), (b"expires", date(3600))), 200, RULES, 60.0, False),
        (F((b"expires", date(3600)), (b"date", date(0))), 200, RULES, 3600.0, False),
        # Expires relative to Date, not to the cache's clock (RFC 9111 4.2.1).
        (F((b"expires", date(3600)), (b"date", date(-1000))), 200, RULES, 4600.0, False),
        (F((b"expires", b"0")), 200, RULES, 0.0, False),
        (F((b"expires", date(10)), (b"expires", date(20))), 200, RULES, 0.0, False),
        (F((b"cache-control", b"max-age=abc")), 200, RULES, 0.0, False),
        (F((b"cache-control", b"max-age=5, max-age=6")), 200, RULES, 0.0, False),
        # The targeted field over s-maxage over max-age over Expires...
        (F((b"cache-control", b"s-maxage=10"), (b"cdn-cache-control", b"max-age=99")), 200, RULES, 99.0, False),
        # ... and Expires is ignored when it is used.
        (F((b"cdn-cache-control", b"no-cache"), (b"expires", date(3600))), 200, RULES, 0.0, True),
        # Another targeted field name, and none at all.
        (F((b"edge-cache-control", b"max-age=7")), 200, Rules(targetedField=b"edge-cache-control"), 7.0, False),
        (F((b"cdn-cache-control", b"max-age=7"), (b"cache-control", b"max-age=3")), 200, Rules(targetedField=b""),
         3.0, False),
        # Heuristic: 10% of (Date - Last-Modified), capped.
        (F((b"last-modified", date(-1000)), (b"date", date(0))), 200, RULES, 100.0, True),
        (F((b"last-modified", date(-10**7)), (b"date", date(0))), 200, RULES, 86400.0, True),
        (F((b"last-modified", date(-10**7)), (b"date", date(0))), 200, Rules(heuristicMax=60.0), 60.0, True),
        (F((b"last-modified", date(100)), (b"date", date(0))), 200, RULES, 0.0, True),
        (F((b"last-modified", date(-1000))), 302, RULES, 0.0, True),
        (F(), 200, RULES, 0.0, True),
        # default_ttl in place of the heuristic, for heuristic statuses only.
        (F((b"last-modified", date(-1000)), (b"date", date(0))), 200, Rules(defaultTTL=5.0), 5.0, True),
        (F(), 302, Rules(defaultTTL=5.0), 0.0, True),
    ],
)
def test_lifetime(response: Fields, status: int, rules: Rules, lifetime: float, heuristic: bool) -> None:
    policy = responsePolicy(response, status, rules, NOW)
    assert policy.lifetime == lifetime
    assert policy.heuristic is heuristic


@pytest.mark.parametrize(
    "cacheControl, mustRevalidate, noCache, swr, sie",
    [
        (b"max-age=5", False, False, None, None),
        (b"max-age=5, must-revalidate", True, False, None, None),
        (b"max-age=5, proxy-revalidate", True, False, None, None),
        # RFC 9111 5.2.2.10: s-maxage implies proxy-revalidate.
        (b"s-maxage=5", True, False, None, None),
        (b"no-cache", False, True, None, None),
        (b"max-age=5, stale-while-revalidate=30, stale-if-error=600", False, False, 30.0, 600.0),
        (b"max-age=5, stale-while-revalidate=x", False, False, None, None),
    ],
)
def test_policyFlags(cacheControl: bytes, mustRevalidate: bool, noCache: bool, swr: float | None,
                     sie: float | None) -> None:
    policy = responsePolicy(F((b"cache-control", cacheControl)), 200, RULES, NOW)
    assert (policy.mustRevalidate, policy.noCache, policy.staleWhileRevalidate, policy.staleIfError) == (
        mustRevalidate, noCache, swr, sie,
    )


@pytest.mark.parametrize(
    "response, requestTime, responseTime, expected",
    [
        # Date = receipt: no apparent age; the response delay counts.
        (F((b"date", date(0))), NOW - 2, NOW, 2.0),
        # Apparent age: received 10 s after its Date.
        (F((b"date", date(-10))), NOW - 1, NOW, 10.0),
        # Age plus the response delay when larger.
        (F((b"date", date(-10)), (b"age", b"100")), NOW - 1, NOW, 101.0),
        # A Date in the future (a skewed origin clock): no negative age.
        (F((b"date", date(3600))), NOW, NOW, 0.0),
        # No Date, or a wrong one: as if dated when received.
        (F(), NOW - 0.5, NOW, 0.5),
        (F((b"date", b"garbage")), NOW, NOW, 0.0),
        # An invalid Age (refused by storability) counts as none here.
        (F((b"date", date(0)), (b"age", b"x")), NOW, NOW, 0.0),
    ],
)
def test_initialAge(response: Fields, requestTime: float, responseTime: float, expected: float) -> None:
    assert initialAge(response, requestTime, responseTime) == expected


def test_currentAgeAddsResidentTime() -> None:
    assert currentAge(10.0, NOW, NOW + 30) == 40.0
    assert currentAge(10.0, NOW, NOW - 5) == 10.0


@pytest.mark.parametrize(
    "fields, expected",
    [
        (F(), None),
        (F((b"pragma", b"no-cache")), RequestDirectives(noCache=True)),
        # Pragma is ignored when Cache-Control is there (RFC 9111 5.4).
        (F((b"pragma", b"no-cache"), (b"cache-control", b"max-age=5")), RequestDirectives(maxAge=5.0)),
        (F((b"cache-control", b"no-cache")), RequestDirectives(noCache=True)),
        (F((b"cache-control", b"no-store")), RequestDirectives(noStore=True)),
        (F((b"cache-control", b"max-stale")), RequestDirectives(maxStale=2147483648.0)),
        (F((b"cache-control", b"max-stale=10, min-fresh=5")), RequestDirectives(maxStale=10.0, minFresh=5.0)),
        (F((b"cache-control", b"only-if-cached")), RequestDirectives(onlyIfCached=True)),
        (F((b"cache-control", b"max-age=abc")), RequestDirectives()),
    ],
)
def test_requestDirectives(fields: Fields, expected: RequestDirectives | None) -> None:
    assert requestDirectives(fields) == expected


P60 = Policy(60.0)


@pytest.mark.parametrize(
    "policy, age, request_, routeSWR, how, forward",
    [
        (P60, 10, None, 0, FRESH, b""),
        (P60, 60, None, 0, REVALIDATE, b"stale"),
        (P60, 70, None, 0, REVALIDATE, b"stale"),
        # The request's no-cache and max-age: fresh but not acceptable.
        (P60, 10, RequestDirectives(noCache=True), 0, REVALIDATE, b"request"),
        (P60, 10, RequestDirectives(maxAge=5.0), 0, REVALIDATE, b"request"),
        (P60, 10, RequestDirectives(maxAge=20.0), 0, FRESH, b""),
        (P60, 10, RequestDirectives(minFresh=55.0), 0, REVALIDATE, b"request"),
        (P60, 10, RequestDirectives(minFresh=40.0), 0, FRESH, b""),
        # max-stale accepts a stale response...
        (P60, 70, RequestDirectives(maxStale=20.0), 0, STALE, b""),
        (P60, 90, RequestDirectives(maxStale=20.0), 0, REVALIDATE, b"stale"),
        # ... unless the response forbids it.
        (Policy(60.0, mustRevalidate=True), 70, RequestDirectives(maxStale=20.0), 0, REVALIDATE, b"stale"),
        # The response's no-cache: always validated.
        (Policy(60.0, noCache=True), 1, None, 0, REVALIDATE, b"stale"),
        # stale-while-revalidate: the response's, else the route's.
        (Policy(60.0, staleWhileRevalidate=30.0), 80, None, 0, STALE_REFRESH, b""),
        (Policy(60.0, staleWhileRevalidate=30.0), 95, None, 0, REVALIDATE, b"stale"),
        (P60, 80, None, 30.0, STALE_REFRESH, b""),
        (Policy(60.0, staleWhileRevalidate=0.0), 80, None, 30.0, REVALIDATE, b"stale"),
        (Policy(60.0, mustRevalidate=True), 80, None, 30.0, REVALIDATE, b"stale"),
        (P60, 80, RequestDirectives(noCache=True), 30.0, REVALIDATE, b"request"),
    ],
)
def test_judge(policy: Policy, age: float, request_: RequestDirectives | None, routeSWR: float, how: int,
               forward: bytes) -> None:
    use = judge(policy, age, request_, routeSWR)
    assert (use.how, use.forward) == (how, forward)
    assert use.ttl == policy.lifetime - age


@pytest.mark.parametrize(
    "policy, age, routeSIE, allowed",
    [
        (P60, 30, 0, True),
        (P60, 70, 0, False),
        (P60, 70, 60, True),
        (P60, 130, 60, False),
        (Policy(60.0, staleIfError=600.0), 300, 0, True),
        (Policy(60.0, staleIfError=0.0), 70, 60, False),
        (Policy(60.0, mustRevalidate=True), 70, 60, False),
        (Policy(60.0, noCache=True), 10, 60, False),
    ],
)
def test_staleIfError(policy: Policy, age: float, routeSIE: float, allowed: bool) -> None:
    assert staleIfErrorAllows(policy, age, routeSIE) is allowed


def test_varyNames() -> None:
    assert varyNames([b"Accept-Encoding, accept", b" X-A ,"]) == (b"accept-encoding", b"accept", b"x-a")
    assert varyNames([]) == ()
