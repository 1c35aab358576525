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
(RFC 9111 4.4).  C{PURGE} from a C{purge_from} address purges the URL.

Every response the stage touched carries its C{Cache-Status} member
(L{edgeproxy.cache.status}); the targeted cache-control field and the tag
fields (C{Surrogate-Key}, C{Cache-Tag}) never reach the client.

The hit path is kept lean: a key made of a few byte strings, a dictionary
lookup in the memory tier, the stored fields copied with C{Age} and
C{Cache-Status}, a body in memory: no Deferred, no timer, no log line.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urljoin

from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.cache.bodies import Drain, FileBody, StoringBody
from edgeproxy.cache.collapse import RETRY, STORED, Fetch
from edgeproxy.cache.conditional import (
    CLIENT_CONDITIONALS,
    evaluate,
    hasConditionals,
    ifRangeAllows,
    merge,
    notModified,
    validating,
)
from edgeproxy.cache.directives import formatHTTPDate, parseHTTPDate
from edgeproxy.cache.entry import Entry, Variants
from edgeproxy.cache.freshness import (
    FRESH,
    REVALIDATE,
    STALE_REFRESH,
    RequestDirectives,
    Rules,
    initialAge,
    judge,
    requestDirectives,
    staleIfErrorAllows,
    storability,
    varyNames,
)
from edgeproxy.cache.key import (
    SECONDARY,
    includedParts,
    parseKeyIncludes,
    purgeURL,
    secondaryKey,
    urlOf,
    variantStages,
)
from edgeproxy.cache.ranges import parseRange, plan, sliceBody
from edgeproxy.cache.status import CacheStatus, withStatus
from edgeproxy.cache.stores import CacheStores, relay
from edgeproxy.config.model import CacheSettings, Route
from edgeproxy.errors import ProxyError
from edgeproxy.h1.fields import Fields
from edgeproxy.http.errorpages import errorResponse, pagesFor
from edgeproxy.pipeline.call import Call, discardResponse
from edgeproxy.pipeline.forwarded import isTrusted
from edgeproxy.pipeline.values import BytesBody, Request, Response

__all__ = ["TAG_FIELDS", "CacheStage", "NotCached"]

log = Logger()

TAG_FIELDS = (b"surrogate-key", b"cache-tag")
"""Response fields naming the tags a response is purged by (removed before
the client)."""

SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))

_SPECIAL = frozenset((b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since", b"range"))

_ERRORS_SERVED_STALE = frozenset((500, 502, 503, 504))
"""RFC 5861 4: an error is a 500, 502, 503 or 504 (or no answer at all)."""

_PHRASES = {206: b"Partial Content", 416: b"Range Not Satisfiable"}

MAX_RETRIES = 3
"""Lookups a request makes while other processes fetch its key in turn."""

SMALL_ERROR_BODY = 64 * 1024
"""A discarded response body up to this size is read to its end (its
backend connection is kept); a larger one is stopped."""


class NotCached(ProxyError):
    """C{only-if-cached} and nothing stored fits (RFC 9111 5.2.1.7)."""

    status = 504


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
                call.onResponse(_Passing(self, request, b"bypass"))
                call.next()
                return
            if b"upgrade" in request.fields.raw():
                # A WebSocket handshake: nothing to cache.
                call.next()
                return
            self._lookup(call)
            return
        if method == b"PURGE":
            self._purge(call)
            return
        call.onResponse(_Passing(self, request))
        call.next()

    def _key(self, request: Request) -> tuple[bytes, bytes]:
        url = urlOf(request.connection.scheme, request.host, request.path, request.query)
        if self.keyParts:
            return url + includedParts(self.keyParts, request.fields), url
        return url, url

    def _variantStagesOf(self, call: Call) -> dict[bytes, Any]:
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
        raw = fields.raw()
        primary, url = self._key(request)
        directives = (
            requestDirectives(fields) if b"cache-control" in raw or b"pragma" in raw else None
        )
        stores = self.stores
        item = stores.lookup(primary)
        key = primary
        reason = b"uri-miss"
        if type(item) is Variants:
            key = primary + secondaryKey(item.names, request, self._variantStagesOf(call))
            item = stores.lookup(key)
            reason = b"vary-miss"
        if item is None:
            if directives is not None and directives.onlyIfCached:
                call.fail(NotCached("only-if-cached and nothing stored"))
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
            self._serve(call, entry, self.status.hit(ttl), age)
            return
        use = judge(policy, age, directives, self.staleWhileRevalidate)
        how = use.how
        if how == FRESH:
            self.counters.hits += 1
            if collapsed:
                member = self.status.forward(collapsed, entry.status, collapsed=True, ttl=use.ttl)
            else:
                member = self.status.hit(use.ttl)
            self._serve(call, entry, member, age)
            return
        if how != REVALIDATE:
            self.counters.staleServed += 1
            if how == STALE_REFRESH:
                self._refresh(call, primary, entry)
            self._serve(call, entry, self.status.hit(use.ttl), age)
            return
        if directives is not None and directives.onlyIfCached:
            call.fail(NotCached("only-if-cached and what is stored must be validated"))
            return
        if stores.failing(entry.key) and staleIfErrorAllows(entry.policy, age, self.staleIfError):
            self.counters.staleServed += 1
            self._serve(call, entry, self.status.hit(use.ttl, detail=b"stale-if-error"), age)
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
        handler = _Fetch(self, request, primary, key, url, reason, directives, leader, mayStore)
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
                call.fail(_internal())

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
        handler = _Revalidation(self, request, primary, entry, reason, directives, leader)
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
        background = Call(request, None, _Background(), call.stages[call.index :], self.clock.seconds())
        background.idleTimeout = call.idleTimeout
        handler = _Revalidation(self, request, primary, entry, b"stale", None, leader, background=True)
        handler.forward(background)

    # Answers from the store -------------------------------------------------------

    def _serve(self, call: Call, entry: Entry, member: bytes, age: float) -> None:
        request = call.request
        raw = request.fields.raw()
        fields = entry.fields
        stored = dict(fields.raw())
        stored[b"age"] = [b"%d" % (age,)]
        existing = stored.get(b"cache-status")
        stored[b"cache-status"] = [*existing, member] if existing else [member]
        served = Fields.trusted(stored)
        if not _SPECIAL.isdisjoint(raw):
            if hasConditionals(request.fields):
                verdict = evaluate(request.method, request.fields, fields)
                if verdict == 304:
                    call.respond(Response(304, b"Not Modified", notModified(served), None, None))
                    return
                if verdict == 412:
                    call.respond(
                        Response(412, b"Precondition Failed", _statusOnly(served), 0, BytesBody(b""))
                    )
                    return
            ranges = raw.get(b"range")
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
                        data = sliceBody(entry.body or b"", answer)
                        call.respond(
                            Response(answer.status, _PHRASES[answer.status], answer.fields, len(data), BytesBody(data))
                        )
                        return
                    body = self._fileBody(entry, answer.segments, answer.trailer)
                    if body is None:
                        self._gone(call, entry)
                        return
                    call.respond(Response(206, b"Partial Content", answer.fields, answer.length, body))
                    return
        if entry.body is not None:
            call.respond(Response(entry.status, entry.reason, served, entry.length, BytesBody(entry.body)))
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
        request = call.request
        if not self.purgeFrom or not isTrusted(request.client, self.purgeFrom):
            call.respond(errorResponse(405, pagesFor(request.route)))
            return
        _, url = self._key(request)
        counts = self.stores.purge("url", url, soft=False)
        self.counters.purges["url"] += 1
        relay({"kind": "url", "value": url.decode("latin-1"), "soft": False})
        body = json.dumps({"purged": sum(counts.values()), **counts}).encode("ascii") + b"\n"
        call.respond(
            Response(
                200,
                b"OK",
                Fields.trusted(
                    {b"content-type": [b"application/json"], b"cache-control": [b"no-store"]}
                ),
                len(body),
                BytesBody(body),
            )
        )

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


def _statusOnly(fields: Fields) -> Fields:
    return Fields.trusted({b"cache-status": list(fields.getAll(b"cache-status"))})


def _internal() -> ProxyError:
    error = ProxyError("internal error")
    error.status = 500
    return error


def _split(fields: Fields, targeted: bytes) -> tuple[Fields, tuple[bytes, ...] | None, tuple[bytes, ...] | None]:
    """
    A response's fields without the targeted field and the tag fields,
    and their values (L{None} for what it did not carry).
    """
    raw = fields.raw()
    tagged = any(name in raw for name in TAG_FIELDS)
    if not tagged and (not targeted or targeted not in raw):
        return fields, None, None
    tags: tuple[bytes, ...] | None = None
    if tagged:
        found: list[bytes] = []
        for value in raw.get(b"surrogate-key", ()):
            # Surrogate-Key: space-separated; Cache-Tag: comma-separated.
            found.extend(tag for tag in value.split() if tag)
        for value in raw.get(b"cache-tag", ()):
            found.extend(tag.strip(b" \t") for tag in value.split(b",") if tag.strip(b" \t"))
        tags = tuple(dict.fromkeys(found))
    targetedValues = tuple(raw[targeted]) if targeted and targeted in raw else None
    return fields.without(*TAG_FIELDS, *((targeted,) if targeted else ())), tags, targetedValues


def _finish(call: Call, clock: Any, response: Response) -> None:
    """Let go of a body nobody reads: read to its end when small (the
    backend connection is kept), else stopped."""
    body = response.body
    if body is None:
        return
    if response.length is not None and response.length <= SMALL_ERROR_BODY:
        body.deliverBody(Drain(clock, call.idleTimeout))
    else:
        discardResponse(response)


class _Passing:
    """The answer to a request the cache does not handle (other methods,
    C{fwd=method}; a C{GET} with a body, C{fwd=bypass})."""

    __slots__ = ("reason", "request", "stage")

    def __init__(self, stage: CacheStage, request: Request, reason: bytes = b"method") -> None:
        self.stage = stage
        self.request = request
        self.reason = reason

    def onResponse(self, call: Call, response: Response) -> None:
        stage = self.stage
        request = self.request
        if request.method not in SAFE_METHODS and 200 <= response.status < 400:
            stage.invalidateAfter(request, response)
        fields, _, _ = _split(response.fields, stage.rules.targetedField)
        call.respond(
            response._replace(fields=withStatus(fields, stage.status.forward(self.reason, response.status)))
        )

    def onError(self, call: Call, error: ProxyError) -> None:
        call.fail(error)


class _Background:
    """The client side of a background refresh: nobody (the stores are
    updated by the refresh's handler)."""

    def respond(self, call: Call, response: Response) -> None:
        discardResponse(response)

    def fail(self, call: Call, error: ProxyError) -> None:
        pass

    def interim(self, call: Call, status: int, reason: bytes, fields: Fields) -> None:
        pass

    def bodyStarted(self, call: Call, producer: Any) -> None:
        pass

    def bodyData(self, call: Call, data: bytes) -> None:
        pass

    def bodyEnded(self, call: Call, reason: Failure) -> None:
        pass

    def tunnel(self, call: Call, pool: Any, fields: Fields, path: bytes, hashKey: bytes | None) -> None:
        pass


class _Fetch:
    """
    The answer to a request forwarded on a miss: stored while it streams
    to the client when it may be stored, and the waiters of its key told
    when that is over.
    """

    def __init__(
        self,
        stage: CacheStage,
        request: Request,
        primary: bytes,
        key: bytes,
        url: bytes,
        reason: bytes,
        directives: RequestDirectives | None,
        leader: Fetch | None,
        mayStore: bool,
        background: bool = False,
    ) -> None:
        self.stage = stage
        self.request = request
        self.primary = primary
        self.key = key
        self.url = url
        self.reason = reason
        self.directives = directives
        self.leader = leader
        self.mayStore = mayStore
        self.background = background
        self.conditional = False
        self.answered = False
        self.requestTime = stage.clock.seconds()
        self.marker: Variants | None = None

    def forward(self, call: Call) -> None:
        call.onResponse(self)
        call.next()
        if self.leader is not None and not self.answered and call.cancelHook is not None:
            # The client may go before the answer: the waiters must not
            # wait for a fetch that was abandoned.
            cancel = call.cancelHook

            def abandon() -> None:
                self.release(False)
                cancel()

            call.cancelHook = abandon

    def release(self, stored: bool) -> None:
        leader, self.leader = self.leader, None
        if leader is not None:
            self.stage.stores.collapsing.done(self.key, stored, leader)

    def onError(self, call: Call, error: ProxyError) -> None:
        self.answered = True
        self.release(False)
        call.request = self.request
        call.fail(error)

    def onResponse(self, call: Call, response: Response) -> None:
        self.answered = True
        # The stages before this one see the request as they passed it on.
        call.request = self.request
        stage = self.stage
        stores = stage.stores
        now = stage.clock.seconds()
        status = response.status
        fields, tags, targeted = _split(response.fields, stage.rules.targetedField)
        body = response.body
        stored = False
        detail = b""
        ttl = None
        if self.mayStore:
            verdict = storability(
                b"GET", self.request.fields, self.directives, status, response.fields, stage.rules, now
            )
            if verdict.policy is None:
                detail = verdict.why.encode("ascii").replace(b" ", b"-")
            else:
                if parseHTTPDate(response.fields.get(b"date")) is None:
                    # RFC 9110 6.6.1: stored with the time it was received.
                    fields = fields.withField(b"date", formatHTTPDate(now))
                if not stage.rules.cacheCookies or b"set-cookie" not in fields:
                    storedFields = fields
                else:
                    # A cookie is for the client it was set for, never for
                    # those served from the store.
                    storedFields = fields.without(b"set-cookie")
                age = initialAge(response.fields, self.requestTime, now)
                key = self.primary
                names = varyNames(response.fields.getAll(b"vary"))
                if names:
                    key = self.primary + secondaryKey(names, self.request, stage._variantStagesOf(call))
                    self.marker = Variants(self.primary, self.url, names)
                head = Entry(
                    key=key,
                    url=self.url,
                    status=status,
                    reason=response.reason,
                    fields=storedFields,
                    length=-1,
                    responseTime=now,
                    initialAge=age,
                    policy=verdict.policy,
                    tags=tags or (),
                    targeted=targeted or (),
                )
                writer = stores.writer(head, response.length if body is not None else 0, self._stored)
                if writer is None:
                    detail = b"too-large"
                else:
                    stored = True
                    ttl = verdict.policy.lifetime - age
                    if body is None:
                        writer.finish()
                    else:
                        body = StoringBody(body, writer)
        if not stored:
            self.notStored()
        member = stage.status.forward(self.reason, status, stored=stored, ttl=ttl, detail=detail)
        if self.background:
            if body is not None:
                body.deliverBody(Drain(stage.clock, call.idleTimeout))
            call.respond(Response(status, response.reason, fields, 0, None))
            return
        if self.conditional and status == 200:
            verdictC = evaluate(self.request.method, self.request.fields, fields)
            if verdictC is not None:
                if body is not None:
                    if stored:
                        # Stored all the same, as it comes.
                        body.deliverBody(Drain(stage.clock, call.idleTimeout))
                    else:
                        _finish(call, stage.clock, response)
                served = withStatus(fields, member)
                if verdictC == 304:
                    call.respond(Response(304, b"Not Modified", notModified(served), None, None))
                else:
                    call.respond(Response(412, b"Precondition Failed", _statusOnly(served), 0, BytesBody(b"")))
                return
        call.respond(Response(status, response.reason, withStatus(fields, member), response.length, body))

    def notStored(self) -> None:
        """The response is not stored: the waiters fetch on their own."""
        self.release(False)

    def _stored(self, entry: Entry | None) -> None:
        if entry is not None and self.marker is not None:
            self.stage.stores.putVariants(self.marker)
        self.release(entry is not None)


class _Revalidation(_Fetch):
    """
    The answer to a conditional request validating a stored entry (or,
    C{background}, to a refresh nobody waits for).
    """

    def __init__(
        self,
        stage: CacheStage,
        request: Request,
        primary: bytes,
        entry: Entry,
        reason: bytes,
        directives: RequestDirectives | None,
        leader: Fetch | None,
        background: bool = False,
    ) -> None:
        super().__init__(
            stage, request, primary, entry.key, entry.url, reason, directives, leader,
            mayStore=request.method == b"GET", background=background,
        )
        self.entry = entry
        self.replacing = False

    def onResponse(self, call: Call, response: Response) -> None:
        stage = self.stage
        stores = stage.stores
        counters = stage.counters
        status = response.status
        entry = self.entry
        if status == 304:
            self.answered = True
            _finish(call, stage.clock, response)
            now = stage.clock.seconds()
            fields, tags, targeted = _split(response.fields, stage.rules.targetedField)
            merged = merge(entry, fields, self.requestTime, now, stage.rules, targeted, tags)
            stores.refresh(merged)
            counters.revalidations["not_modified"] += 1
            self.release(True)
            if self.background:
                call.respond(Response(304, b"Not Modified", fields, None, None))
                return
            call.request = self.request
            age = merged.age(now)
            member = stage.status.forward(self.reason, 304, ttl=merged.policy.lifetime - age)
            stage._serve(call, merged, member, age)
            return
        if status in _ERRORS_SERVED_STALE and self._staleAllowed():
            self.answered = True
            _finish(call, stage.clock, response)
            self._serveStale(call, status)
            return
        if status >= 500:
            counters.revalidations["failed"] += 1
        else:
            counters.revalidations["replaced"] += 1
            self.replacing = self.request.method == b"GET"
        super().onResponse(call, response)

    def notStored(self) -> None:
        if self.replacing:
            # What was stored is out of date, and its replacement may not
            # be stored.
            self.stage.stores.remove(self.entry.key)
        super().notStored()

    def onError(self, call: Call, error: ProxyError) -> None:
        if self._staleAllowed():
            self.answered = True
            self._serveStale(call, error.status)
            return
        self.stage.counters.revalidations["failed"] += 1
        super().onError(call, error)

    def _staleAllowed(self) -> bool:
        stage = self.stage
        return staleIfErrorAllows(self.entry.policy, self.entry.age(stage.clock.seconds()), stage.staleIfError)

    def _serveStale(self, call: Call, status: int) -> None:
        stage = self.stage
        stage.counters.revalidations["failed"] += 1
        stage.stores.failed(self.entry.key)
        # The waiters look again, and find it served stale too.
        self.release(True)
        if self.background:
            call.fail(_internal())
            return
        stage.counters.staleServed += 1
        call.request = self.request
        now = stage.clock.seconds()
        age = self.entry.age(now)
        member = stage.status.forward(self.reason, status, detail=b"stale-if-error")
        stage._serve(call, self.entry, member, age)
