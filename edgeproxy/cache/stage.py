# -*- test-case-name: tests.test_cache_stage -*-
"""
L{CacheStage}: the C{cache} stage of a route with C{cache = yes}.

For C{GET} and C{HEAD} it looks the request's key up (L{edgeproxy.cache.key};
memory, then disk) and, by the rules of L{edgeproxy.cache.freshness}:

  - I{hit}: answers from the stored response (the client's own
    conditionals answered with C{304}/C{412}, a C{Range} with C{206}/C{416});
  - I{stale}: answers from it stale when C{max-stale} or
    C{stale-while-revalidate} allow, the latter starting one background
    refresh (a L{Call} of its own through the rest of the route);
  - I{revalidate}: passes on a conditional request built from the stored
    validators; a C{304} freshens the stored response (RFC 9111 3.2) which
    then answers, a 5xx or a failure is answered with the stale response
    when C{stale-if-error} allows;
  - I{miss}: passes the request on (one fetch per key: the concurrent
    misses wait for it, L{edgeproxy.cache.collapse}), and stores the
    response while it streams to the client when it may be stored.

Other methods pass through; an unsafe one that succeeds invalidates what is
stored for its URL and the same-origin C{Location}/C{Content-Location}
(RFC 9111 4.4), in this process and, relayed, in the other workers.
C{PURGE} from a C{purge_from} address purges the URL in both schemes.

Every response the stage touched carries its C{Cache-Status} member
(L{edgeproxy.cache.status}), the errors too: an error the stage makes
(C{only-if-cached}'s 504, C{PURGE}'s 405) or passes on goes on as an error
carrying its member (L{edgeproxy.cache.status.marked}), so that the client
side makes its page (the route's own, if any) as for any other error.  The
targeted cache-control field and the tag fields (C{Surrogate-Key},
C{Cache-Tag}) never reach the client.

The hit path is kept lean: a key made of a few byte strings, a dictionary
lookup in the memory tier, the stored field lines (made once, when the
memory tier took the response) followed by C{Age} and C{Cache-Status}, a
body in memory: no Deferred, no timer, no log line.

What becomes of the responses to what the stage passes on (stored while
they stream, revalidations, stale-if-error, invalidation) is
L{edgeproxy.cache.responses}.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urljoin

from twisted.logger import Logger

from edgeproxy.cache.bodies import FileBody, SliceBody, StoredBody
from edgeproxy.cache.collapse import RETRY, STORED
from edgeproxy.cache.conditional import (
    CLIENT_CONDITIONALS,
    evaluate,
    hasConditionals,
    ifRangeAllows,
    notModified,
    validating,
)
from edgeproxy.cache.entry import Entry, Variants
from edgeproxy.cache.freshness import (
    FRESH,
    REVALIDATE,
    STALE_REFRESH,
    RequestDirectives,
    Rules,
    judge,
    requestDirectives,
    staleIfErrorAllows,
)
from edgeproxy.cache.key import (
    SECONDARY,
    hostOf,
    includedParts,
    parseKeyIncludes,
    purgeURL,
    secondaryKey,
    urlOf,
    variantStages,
)
from edgeproxy.cache.ranges import parseRange, plan
from edgeproxy.cache.responses import (
    Background,
    Fetching,
    Passing,
    Revalidation,
    internalError,
    statusOnly,
)
from edgeproxy.cache.status import CacheStatus, marked
from edgeproxy.cache.stores import CacheStores, relay
from edgeproxy.config.model import Route
from edgeproxy.config.stagemodel import CacheSettings
from edgeproxy.errors import ProxyError
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.forwarded import isTrusted
from edgeproxy.pipeline.values import BytesBody, Request, Response

__all__ = ["PURGE_ALLOW", "CacheStage", "NotCached", "PurgeNotAllowed"]

log = Logger()

_DIRECTIVES = frozenset((b"cache-control", b"pragma"))

_SPECIAL = frozenset((b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since", b"range"))

_PHRASES = {206: b"Partial Content", 416: b"Range Not Satisfiable"}

MAX_RETRIES = 3
"""Lookups a request makes while other processes fetch its key in turn."""


PURGE_ALLOW = b"GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"
"""The C{Allow} of the 405 a C{PURGE} from elsewhere gets (RFC 9110
15.5.6): the methods the route passes on to its origin."""

_SCHEMES = (b"https", b"http")


class NotCached(ProxyError):
    """C{only-if-cached} and nothing stored fits (RFC 9111 5.2.1.7)."""

    status = 504


class PurgeNotAllowed(ProxyError):
    """C{PURGE} from an address not in C{purge_from}."""

    status = 405


class CacheStage:
    """
    The cache stage of one route (see the module docstring).

    @ivar stores: the stores shared by every route of the runtime.
    @ivar settings: the C{[cache]} section.
    @ivar routeSettings: the route's own cache settings.
    """

    __slots__ = (
        "_variants",
        "clock",
        "counters",
        "keyParts",
        "purgeFrom",
        "routeSettings",
        "rules",
        "settings",
        "staleIfError",
        "staleWhileRevalidate",
        "status",
        "stores",
    )

    def __init__(self, route: Route, settings: CacheSettings, stores: CacheStores, clock: Any) -> None:
        routeCache = route.cache
        assert routeCache is not None
        self.stores = stores
        self.settings = settings
        self.routeSettings = routeCache
        self.clock = clock
        self.rules = Rules(
            targetedField=(settings.targeted_field or "").lower().encode("ascii"),
            heuristicMax=settings.heuristic_max,
            defaultTTL=routeCache.default_ttl,
            cacheCookies=routeCache.cache_cookies,
        )
        self.staleWhileRevalidate = routeCache.stale_while_revalidate
        self.staleIfError = routeCache.stale_if_error
        self.keyParts = parseKeyIncludes(settings.key_includes)
        self.status = CacheStatus(settings.name.encode("ascii"))
        self.purgeFrom = settings.purge_from
        self.counters = stores.counters
        self._variants: dict[bytes, Any] | None = None

    # The way in -------------------------------------------------------------

    def handle(self, call: Call) -> None:
        if self._variants is None:
            # The stages after this one are the same for every call of the
            # route: looked at once.
            self._variants = variantStages(call.stages[call.index :])
        request = call.request
        method = request.method
        if method == b"GET" or method == b"HEAD":
            if request.length != 0:
                # A GET with a body: what it asks is not the URL alone.
                call.onResponse(Passing(self, request, b"bypass"))
                call.next()
                return
            if b"upgrade" in request.fields:
                # A WebSocket handshake: nothing to cache.
                call.next()
                return
            self._lookup(call)
            return
        if method == b"PURGE":
            self._purge(call)
            return
        call.onResponse(Passing(self, request))
        call.next()

    def _key(self, request: Request) -> tuple[bytes, bytes]:
        url = urlOf(request.connection.scheme, request.host, request.path, request.query)
        if self.keyParts:
            return url + includedParts(self.keyParts, request.fields), url
        return url, url

    def variantStagesOf(self, call: Call) -> dict[bytes, Any]:
        return self._variants or {}

    def _lookup(
        self,
        call: Call,
        collapse: bool = True,
        collapsed: bytes = b"",
        deadline: float | None = None,
        attempts: int = 0,
    ) -> None:
        request = call.request
        fields = request.fields
        primary, url = self._key(request)
        directives = requestDirectives(fields) if fields.hasAny(_DIRECTIVES) else None
        stores = self.stores
        item = stores.lookup(primary)
        key = primary
        reason = b"uri-miss"
        if type(item) is Variants:
            key = primary + secondaryKey(item.names, request, self.variantStagesOf(call), item.chosen)
            item = stores.lookup(key)
            reason = b"vary-miss"
        if item is None:
            if directives is not None and directives.onlyIfCached:
                error = NotCached("only-if-cached and nothing stored")
                call.fail(marked(error, self.status.own(b"only-if-cached")))
                return
            self._miss(call, primary, key, url, directives, reason, collapse, collapsed, deadline, attempts)
            return
        entry: Entry = item  # type: ignore[assignment]
        now = self.clock.seconds()
        policy = entry.policy
        age = entry.initialAge + max(0.0, now - entry.responseTime)
        ttl = policy.lifetime - age
        if ttl > 0 and directives is None and not policy.noCache and not collapsed:
            # The hit path: what judge() would say, without its values.
            self.counters.hits += 1
            self.serve(call, entry, self.status.hit(ttl), age)
            return
        use = judge(policy, age, directives, self.staleWhileRevalidate)
        how = use.how
        if how == FRESH:
            self.counters.hits += 1
            if collapsed:
                member = self.status.forward(collapsed, entry.status, collapsed=True, ttl=use.ttl)
            else:
                member = self.status.hit(use.ttl)
            self.serve(call, entry, member, age)
            return
        if how != REVALIDATE:
            self.counters.staleServed += 1
            if how == STALE_REFRESH:
                self._refresh(call, primary, entry)
            self.serve(call, entry, self.status.hit(use.ttl), age)
            return
        if directives is not None and directives.onlyIfCached:
            error = NotCached("only-if-cached and what is stored must be validated")
            call.fail(marked(error, self.status.own(b"only-if-cached")))
            return
        if stores.failing(entry.key) and staleIfErrorAllows(entry.policy, age, self.staleIfError):
            self.counters.staleServed += 1
            self.serve(call, entry, self.status.hit(use.ttl, detail=b"stale-if-error"), age)
            return
        self._revalidate(call, primary, entry, use.forward, directives, collapse, deadline, attempts)

    # Misses ------------------------------------------------------------------

    def _miss(
        self,
        call: Call,
        primary: bytes,
        key: bytes,
        url: bytes,
        directives: RequestDirectives | None,
        reason: bytes,
        collapse: bool,
        collapsed: bytes,
        deadline: float | None,
        attempts: int,
    ) -> None:
        request = call.request
        fields = request.fields
        mayStore = (
            request.method == b"GET"
            and b"range" not in fields.raw()
            and not (directives is not None and directives.noStore)
        )
        leader = None
        if mayStore and collapse:
            leader = self.stores.collapsing.lead(key)
            if leader is None:
                self._wait(call, key, reason, deadline, attempts)
                return
        self.counters.misses += 1
        handler = Fetching(self, request, primary, key, url, reason, directives, leader, mayStore)
        if mayStore and hasConditionals(fields):
            # The full response is what can be stored; the client's own
            # conditionals are answered from it afterwards.
            handler.conditional = True
            call.request = request._replace(fields=fields.without(*CLIENT_CONDITIONALS))
        handler.forward(call)

    def _wait(self, call: Call, key: bytes, reason: bytes, deadline: float | None, attempts: int) -> None:
        collapsing = self.stores.collapsing
        if attempts == 0:
            self.counters.collapsed += 1
        if deadline is None:
            deadline = self.clock.seconds() + collapsing.timeout

        def woken(outcome: str) -> None:
            call.cancelHook = None
            if call.over:
                return
            try:
                if outcome == STORED:
                    self._lookup(call, collapse=False, collapsed=reason)
                elif outcome == RETRY and attempts < MAX_RETRIES:
                    self._lookup(call, True, b"", deadline, attempts + 1)
                else:
                    self._lookup(call, collapse=False)
            except Exception:
                log.failure("cache lookup after a collapsed wait failed")
                call.fail(marked(internalError(), self.status.own(b"internal-error")))

        call.cancelHook = collapsing.wait(key, woken, deadline)

    # Validation ----------------------------------------------------------------

    def _revalidate(
        self,
        call: Call,
        primary: bytes,
        entry: Entry,
        reason: bytes,
        directives: RequestDirectives | None,
        collapse: bool,
        deadline: float | None,
        attempts: int,
    ) -> None:
        leader = None
        if collapse and reason == b"stale":
            leader = self.stores.collapsing.lead(entry.key)
            if leader is None:
                self._wait(call, entry.key, reason, deadline, attempts)
                return
        request = call.request
        handler = Revalidation(self, request, primary, entry, reason, directives, leader)
        # The client's own conditionals are answered from what comes back.
        handler.conditional = hasConditionals(request.fields)
        call.request = request._replace(fields=validating(request.fields, entry))
        handler.forward(call)

    def _refresh(self, call: Call, primary: bytes, entry: Entry) -> None:
        """Start one background refresh of a stale entry (RFC 5861 3)."""
        leader = self.stores.collapsing.lead(entry.key)
        if leader is None:
            return  # one is under way (here or in another process)
        original = call.request
        request = original._replace(
            method=b"GET", fields=validating(original.fields, entry), length=0
        )
        background = Call(request, None, Background(), call.stages[call.index :], self.clock.seconds())
        background.idleTimeout = call.idleTimeout
        handler = Revalidation(self, request, primary, entry, b"stale", None, leader, background=True)
        handler.forward(background)

    # Answers from the store -------------------------------------------------------

    def serve(self, call: Call, entry: Entry, member: bytes, age: float) -> None:
        """Answer C{call} from C{entry} (its own conditionals and C{Range} too)."""
        request = call.request
        fields = entry.fields
        if fields.lines() is not None and b"age" not in fields and b"cache-status" not in fields:
            # Held as lines in the memory tier (MemoryTier.put): the two
            # lines added go last, where the dictionary's order puts them.
            served = fields.withLinesAfter([b"Age: %d" % (age,), b"Cache-Status: " + member])
        else:
            stored = dict(fields.raw())
            stored[b"age"] = [b"%d" % (age,)]
            existing = stored.get(b"cache-status")
            stored[b"cache-status"] = [*existing, member] if existing else [member]
            served = Fields.trusted(stored)
        if request.fields.hasAny(_SPECIAL):
            if hasConditionals(request.fields):
                verdict = evaluate(request.method, request.fields, fields)
                if verdict == 304:
                    call.respond(Response(304, b"Not Modified", notModified(served), None, None))
                    return
                if verdict == 412:
                    call.respond(
                        Response(412, b"Precondition Failed", statusOnly(served), 0, BytesBody(b""))
                    )
                    return
            ranges = request.fields.raw().get(b"range")
            if (
                ranges is not None
                and len(ranges) == 1
                and request.method == b"GET"
                and entry.status == 200
                and ifRangeAllows(request.fields, entry)
            ):
                wanted = parseRange(ranges[0], entry.length)
                if wanted is not None:
                    answer = plan(wanted, served, entry.length)
                    if answer.status == 416 or entry.body is not None:
                        sliced = SliceBody(entry.body or b"", answer)
                        call.respond(
                            Response(answer.status, _PHRASES[answer.status], answer.fields, answer.length, sliced)
                        )
                        return
                    body = self._fileBody(entry, answer.segments, answer.trailer)
                    if body is None:
                        self._gone(call, entry)
                        return
                    call.respond(Response(206, b"Partial Content", answer.fields, answer.length, body))
                    return
        if entry.body is not None:
            call.respond(Response(entry.status, entry.reason, served, entry.length, StoredBody(entry.body)))
            return
        if request.method == b"HEAD" or entry.length == 0:
            call.respond(Response(entry.status, entry.reason, served, entry.length, None))
            return
        body = self._fileBody(entry, ((b"", 0, entry.length),), b"")
        if body is None:
            self._gone(call, entry)
            return
        call.respond(Response(entry.status, entry.reason, served, entry.length, body))

    def _gone(self, call: Call, entry: Entry) -> None:
        """
        A disk entry whose file went (another process replaced or evicted
        it) between its lookup and its answer: a miss.
        """
        self.stores.remove(entry.key)
        primary = entry.key.partition(SECONDARY)[0]
        self._miss(call, primary, entry.key, entry.url, None, b"uri-miss", True, b"", None, 0)

    def _fileBody(self, entry: Entry, segments: Any, trailer: bytes) -> FileBody | None:
        """A body reading C{segments} (counted from the body's start) of
        a disk entry's file; L{None} when the file is gone."""
        disk = self.stores.disk
        if disk is None:
            return None
        fd = disk.open(entry)
        if fd is None:
            return None
        offset = entry.offset
        return FileBody(
            fd, tuple((prefix, offset + start, count) for prefix, start, count in segments), trailer, self.clock
        )

    # Purging ---------------------------------------------------------------

    def _purge(self, call: Call) -> None:
        """
        C{PURGE}: every stored response of the URL goes, in both schemes
        (a purger on plain http means the https copy as much: the key's
        scheme is the connection's, not a property of the resource).
        """
        request = call.request
        if not self.purgeFrom or not isTrusted(request.client, self.purgeFrom):
            error = PurgeNotAllowed("PURGE from an address not in purge_from")
            error.fields = ((b"allow", PURGE_ALLOW),)
            call.fail(marked(error, self.status.own(b"purge-not-allowed")))
            return
        # The host as the request's own scheme keys it (its default port
        # gone), then under each scheme.
        host = hostOf(request.connection.scheme, request.host)
        counts: dict[str, int] = {}
        for scheme in _SCHEMES:
            url = urlOf(scheme, host, request.path, request.query)
            for tier, count in self.stores.purge("url", url, soft=False).items():
                counts[tier] = counts.get(tier, 0) + count
            relay({"kind": "url", "value": url.decode("latin-1"), "soft": False})
        self.counters.purges["url"] += 1
        body = json.dumps({"purged": sum(counts.values()), **counts}).encode("ascii") + b"\n"
        fields = {
            b"content-type": [b"application/json"],
            b"cache-control": [b"no-store"],
            b"cache-status": [self.status.own(b"purged")],
        }
        call.respond(Response(200, b"OK", Fields.trusted(fields), len(body), BytesBody(body)))

    def invalidateAfter(self, request: Request, response: Response) -> None:
        """
        RFC 9111 4.4: an unsafe request answered with a non-error status
        invalidates its target, and the C{Location} and
        C{Content-Location} of the answer when they are of the same origin.
        """
        _, url = self._key(request)
        stores = self.stores
        stores.invalidate(url)
        origin = url[: len(url) - len(request.path) - len(request.query)]
        base = url.decode("latin-1")
        for name in (b"location", b"content-location"):
            value = response.fields.get(name)
            if value is None:
                continue
            try:
                target = purgeURL(urljoin(base, value.decode("latin-1")))
            except ValueError:
                continue
            if target.startswith(origin + b"/") and target != url:
                stores.invalidate(target)


