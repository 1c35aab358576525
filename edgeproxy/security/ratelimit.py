# -*- test-case-name: tests.test_security_bypass,tests.integration.test_security_redis -*-
"""
The C{ratelimit} stage: the C{[ratelimit:NAME]} sections a route names
(C{rate_limit = NAME, ...}), applied per key.

Each limit is a token bucket (C{rate}, C{burst}; see
L{edgeproxy.security.buckets}) and/or a bound on requests in flight
(C{concurrency}), per key: the client address (C{client_ip}), a header
or cookie value (C{header:NAME}, C{cookie:NAME}; a request without it is
keyed on its client address), the route as a whole (C{route}), or the
authenticated subject (C{identity}).  Counters belong to one limit on one
route (two routes naming the same section count apart), in this process
(C{store = local}; with C{workers = N} each worker counts for itself) or
in Redis (C{store = redis}, shared by every process using it).

A request over a limit gets C{429} with C{Retry-After} and the fields of
the IETF httpapi draft (draft-ietf-httpapi-ratelimit-headers-10)::

    RateLimit-Policy: "api";q=100;w=60, "burst";q=5
    RateLimit: "api";r=0;t=3

(C{q} the quota per window C{w} seconds, or the places in flight of a
C{concurrency} limit; C{r} what is left, C{t} seconds until there is
more), and the access log names the limit (C{ratelimit api}).

Limits keyed on the identity cannot be applied here: this stage comes
before authentication in the fixed order (so that unauthenticated floods
are limited before any credential is checked).  The C{auth} stage applies
them itself, with the same L{LimitSet}, as soon as it knows the subject
and before the request goes on (L{edgeproxy.security.auth.stage}).

With C{store = redis}, the request is held while the one script that
decides all of a route's shared limits runs (L{edgeproxy.security.redisstore});
an unreachable Redis lets the request through (C{on_store_error =
open}) or refuses it with C{503} (C{closed}).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.config.model import Config, Route
from edgeproxy.config.stagemodel import RateLimit
from edgeproxy.errors import ServiceUnavailable, TooManyRequests
from edgeproxy.pipeline.call import Call, Stage
from edgeproxy.pipeline.stages import registerKind
from edgeproxy.pipeline.values import Request
from edgeproxy.security.buckets import LocalBuckets, LocalConcurrency, retryAfterSeconds
from edgeproxy.security.redisstore import RedisStore, StoreUnavailable, sharedStore, storeKey
from edgeproxy.upstream.balance import requestHashKey

__all__ = ["LimitSet", "RateLimitStage", "limitKey", "policyField"]

log = Logger()


def limitKey(limit: RateLimit, request: Request, identity: str | None) -> str:
    """The key C{request} is counted under for C{limit}."""
    kind = limit.key
    if kind == "client_ip":
        return request.client
    if kind == "route":
        return ""
    if kind == "identity":
        return identity or ""
    return requestHashKey(kind, request.client, request.fields, request.path).decode("latin-1")


def _windowText(window: float) -> bytes:
    return b"%d" % (math.ceil(window),)


def policyItem(limit: RateLimit) -> bytes:
    """One limit's item of C{RateLimit-Policy}."""
    name = _sfString(limit.name)
    items = []
    if limit.rate_enabled:
        # The bucket lets C{burst} through at once, then C{count} per
        # window: the quota a client can plan with is the steady one.
        items.append(b'%s;q=%d;w=%s' % (name, limit.count, _windowText(limit.window)))
    if limit.concurrency:
        items.append(b'%s;q=%d' % (_sfString(limit.name + "-concurrency"), limit.concurrency))
    return b", ".join(items)


def policyField(limits: tuple[RateLimit, ...]) -> bytes:
    """C{RateLimit-Policy} of a set of limits."""
    return b", ".join(policyItem(limit) for limit in limits)


def _sfString(text: str) -> bytes:
    # RFC 8941 3.3.3; section names are letters, digits and _.-
    return b'"' + text.encode("ascii") + b'"'


def _refusal(policy: bytes, limit: RateLimit, concurrency: bool, retry: float) -> TooManyRequests:
    error = TooManyRequests(f"rate limit {limit.name}")
    seconds = retryAfterSeconds(retry)
    error.retryAfter = seconds
    name = _sfString(limit.name + "-concurrency" if concurrency else limit.name)
    error.fields = (
        (b"ratelimit-policy", policy),
        (b"ratelimit", b"%s;r=0;t=%d" % (name, seconds)),
    )
    return error


_localBuckets: weakref.WeakValueDictionary[tuple[Any, ...], LocalBuckets] = weakref.WeakValueDictionary()
_localConcurrency: weakref.WeakValueDictionary[tuple[Any, ...], LocalConcurrency] = (
    weakref.WeakValueDictionary()
)


def localBuckets(limit: RateLimit, route: str, clock: Any = None) -> LocalBuckets:
    """
    The buckets of C{limit} on C{route}: the same object for as long as a
    stage uses it, so that a reload keeping the limit keeps its counts.
    """
    key = (id(clock), limit.count, limit.window, limit.burst, limit.key, limit.name, route)
    buckets = _localBuckets.get(key)
    if buckets is None:
        buckets = _localBuckets[key] = LocalBuckets(limit.rate, limit.burst)
    return buckets


def localConcurrency(limit: RateLimit, route: str, clock: Any = None) -> LocalConcurrency:
    key = (id(clock), limit.concurrency, limit.key, limit.name, route)
    counts = _localConcurrency.get(key)
    if counts is None:
        counts = _localConcurrency[key] = LocalConcurrency(limit.concurrency)
    return counts


class _Release:
    """Gives a request's places in flight back when it ends."""

    __slots__ = ("local", "store", "keys", "member")

    def __init__(self) -> None:
        self.local: list[tuple[LocalConcurrency, str]] = []
        self.store: RedisStore | None = None
        self.keys: list[str] = []
        self.member = ""

    def __call__(self) -> None:
        for counts, key in self.local:
            counts.release(key)
        self.local = []
        if self.store is not None and self.keys:
            self.store.release(self.keys, self.member)
            self.keys = []


class LimitSet:
    """
    The limits one route applies at one point (the C{ratelimit} stage, or
    the C{auth} stage for those keyed on the identity).
    """

    __slots__ = (
        "route", "limits", "policy", "_local", "_localConcurrency", "_shared", "_store",
        "_clock", "_metrics", "_closed", "_refusedBy",
    )

    def __init__(
        self,
        route: Route,
        limits: tuple[RateLimit, ...],
        clock: Any,
        metrics: Any = None,
        store: RedisStore | None = None,
        policyLimits: tuple[RateLimit, ...] | None = None,
    ) -> None:
        """
        @param policyLimits: the limits C{RateLimit-Policy} lists (all of
            the route's); C{limits} when L{None}.
        """
        self.route = route
        self.limits = limits
        self.policy = policyField(policyLimits if policyLimits is not None else limits)
        self._clock = clock
        self._metrics = metrics
        self._store = store
        self._local = tuple(
            (limit, localBuckets(limit, route.name, clock))
            for limit in limits if limit.store == "local" and limit.rate_enabled
        )
        self._localConcurrency = tuple(
            (limit, localConcurrency(limit, route.name, clock))
            for limit in limits if limit.store == "local" and limit.concurrency
        )
        self._shared = tuple(limit for limit in limits if limit.store == "redis")
        # Shared limits of one route are decided by one script: the
        # strictest on_store_error of them applies to the request.
        self._closed = any(limit.on_store_error == "closed" for limit in self._shared)
        self._refusedBy = {limit.name: f"ratelimit {limit.name}" for limit in limits}

    def apply(self, call: Call, identity: str | None, proceed: Callable[[], None]) -> None:
        """
        Count C{call} against every limit: C{proceed()} when it may go on
        (now, or once the shared store answered), else fail it with 429
        (or 503 for a shared store that is down and C{closed}).
        """
        request = call.request
        local = self._local
        if local:
            now = self._clock.seconds()
            if len(local) == 1:
                limit, buckets = local[0]
                decision = buckets.take(limitKey(limit, request, identity), now)
                if not decision.allowed:
                    self._refuse(call, limit, False, decision.retryAfter)
                    return
            else:
                keys = [limitKey(limit, request, identity) for limit, _ in local]
                for (limit, buckets), key in zip(local, keys):
                    decision = buckets.peek(key, now)
                    if not decision.allowed:
                        self._refuse(call, limit, False, decision.retryAfter)
                        return
                for (_, buckets), key in zip(local, keys):
                    buckets.take(key, now)
        release = None
        if self._localConcurrency:
            release = _Release()
            call.whenEnded(release)
            for limit, counts in self._localConcurrency:
                key = limitKey(limit, request, identity)
                if not counts.acquire(key):
                    self._refuse(call, limit, True, 1.0)
                    return
                release.local.append((counts, key))
        if self._shared:
            self._applyShared(call, identity, proceed, release)
            return
        proceed()

    def _applyShared(
        self, call: Call, identity: str | None, proceed: Callable[[], None], release: _Release | None
    ) -> None:
        store = self._store
        assert store is not None
        request = call.request
        route = self.route.name
        prefix = store.prefix
        buckets: list[tuple[str, float, int]] = []
        sets: list[tuple[str, int]] = []
        order: list[tuple[RateLimit, bool]] = []
        for limit in self._shared:
            if limit.rate_enabled:
                key = storeKey(prefix, "rl", limit.name, route, limitKey(limit, request, identity))
                buckets.append((key, limit.rate, limit.burst))
                order.append((limit, False))
        for limit in self._shared:
            if limit.concurrency:
                key = storeKey(prefix, "rc", limit.name, route, limitKey(limit, request, identity))
                sets.append((key, limit.concurrency))
                order.append((limit, True))
        member = store.requestId() if sets else ""
        if sets:
            if release is None:
                release = _Release()
                call.whenEnded(release)
        cancelled = []

        def cancel() -> None:
            cancelled.append(True)

        def answered(result: tuple[int, int, int]) -> None:
            refused, retryMs, _ = result
            if refused == 0 and sets and release is not None:
                # Taken: given back when the request ends, even if it
                # ended while the script ran.
                release.store = store
                release.keys = [key for key, _ in sets]
                release.member = member
                if call.over or cancelled:
                    release()
            if call.over or cancelled:
                return
            call.cancelHook = None
            if refused:
                limit, concurrency = order[refused - 1]
                self._refuse(call, limit, concurrency, retryMs / 1000.0)
                return
            proceed()

        def failed(reason: Failure) -> None:
            if call.over or cancelled:
                return
            call.cancelHook = None
            if not reason.check(StoreUnavailable):
                # A bug, not an outage: the same rule applies.
                log.failure("shared rate limit check failed", failure=reason)
            metrics = self._metrics
            if self._closed:
                if metrics is not None:
                    metrics.rateLimitStoreFailed(route, "closed")
                call.refusedBy = "ratelimit store unavailable"
                error = ServiceUnavailable("rate limit store unavailable")
                error.retryAfter = 1
                call.fail(error)
                return
            if metrics is not None:
                metrics.rateLimitStoreFailed(route, "open")
            proceed()

        call.cancelHook = cancel
        store.check(buckets, sets, member).addCallbacks(answered, failed)

    def _refuse(self, call: Call, limit: RateLimit, concurrency: bool, retry: float) -> None:
        call.refusedBy = self._refusedBy[limit.name]
        if self._metrics is not None:
            self._metrics.rateLimited(self.route.name, limit.name)
        call.fail(_refusal(self.policy, limit, concurrency, retry))


class RateLimitStage:
    """The C{ratelimit} stage of one route: its limits not keyed on the identity."""

    __slots__ = ("limits",)

    def __init__(self, limits: LimitSet) -> None:
        self.limits = limits

    def handle(self, call: Call) -> None:
        self.limits.apply(call, None, call.next)


def routeLimits(route: Route, config: Config) -> tuple[RateLimit, ...]:
    """The limits C{route} names, in its order."""
    return tuple(config.ratelimits[name] for name in route.rate_limit if name in config.ratelimits)


def buildLimitSet(
    route: Route,
    config: Config,
    context: Mapping[str, Any],
    limits: tuple[RateLimit, ...],
) -> LimitSet:
    """A L{LimitSet} of C{limits} on C{route}, with the runtime's clock,
    metrics and (when one of them needs it) the shared store."""
    reactor = context.get("reactor")
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    metrics = context.get("metrics")
    store = None
    if any(limit.store == "redis" for limit in limits) and config.redis is not None:
        store = sharedStore(config.redis, reactor, metrics)
    return LimitSet(route, limits, reactor, metrics, store, policyLimits=routeLimits(route, config))


class RateLimitKind:
    """Builds the C{ratelimit} stage of routes that name limits."""

    name = "ratelimit"

    def build(
        self, route: Route, config: Config, context: Mapping[str, Any], previous: Stage | None
    ) -> Stage | None:
        # State (buckets, places in flight, the Redis connection) lives in
        # registries keyed by the settings (localBuckets, sharedStore), so
        # a stage built for unchanged settings finds it: previous is not
        # needed.
        limits = tuple(limit for limit in routeLimits(route, config) if limit.key != "identity")
        if not limits:
            return None
        return RateLimitStage(buildLimitSet(route, config, context, limits))


registerKind(RateLimitKind())
