# -*- test-case-name: tests.test_cache_stage,tests.test_cache_variants -*-
"""
The answers to the requests the cache stage (L{edgeproxy.cache.stage})
passes on: what it does with each response before the client has it.

  - L{Fetching}: the response to a miss, stored while it streams to the
    client when it may be stored (RFC 9111 3), the waiters of its key told
    when that is over;
  - L{Revalidation}: the response to a conditional request validating a
    stored entry: a C{304} freshens it (RFC 9111 3.2), a 5xx or a
    failure is answered with it stale when C{stale-if-error} allows (RFC
    5861 4), anything else replaces it;
  - L{Passing}: the response to a request the cache does not handle, an
    unsafe method's success invalidating what is stored (RFC 9111 4.4);
  - L{Background}: the client side of a background refresh, nobody.

Each marks the response with its C{Cache-Status} member and removes the
targeted cache-control field and the tag fields (L{TAG_FIELDS}) before the
client sees it.  An error in place of a response (the pool's 502, 503 or
504, a later stage's failure) goes on as an error carrying its member
(L{edgeproxy.cache.status.marked}, C{detail=no-response}): the client side
makes its page as for any error.  They ask the stage only for what L{_Stage} names.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.python.failure import Failure

from edgeproxy.cache.bodies import Drain, StoringBody
from edgeproxy.cache.collapse import Fetch
from edgeproxy.cache.conditional import evaluate, merge, notModified
from edgeproxy.cache.directives import formatHTTPDate, parseHTTPDate
from edgeproxy.cache.entry import Entry, Variants
from edgeproxy.cache.freshness import (
    RequestDirectives,
    Rules,
    initialAge,
    staleIfErrorAllows,
    storability,
    varyNames,
)
from edgeproxy.cache.key import SECONDARY, secondaryKey, variedOn
from edgeproxy.cache.status import CacheStatus, marked, withStatus
from edgeproxy.cache.stores import CacheStores
from edgeproxy.collectors import CacheCounters
from edgeproxy.errors import ProxyError
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.call import Call, discardResponse
from edgeproxy.pipeline.values import BytesBody, Request, Response

__all__ = ["TAG_FIELDS", "Background", "Fetching", "Passing", "Revalidation"]

TAG_FIELDS = (b"surrogate-key", b"cache-tag")
"""Response fields naming the tags a response is purged by (removed before
the client)."""

SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))

_ERRORS_SERVED_STALE = frozenset((500, 502, 503, 504))
"""RFC 5861 4: an error is a 500, 502, 503 or 504 (or no answer at all)."""

NO_RESPONSE = b"no-response"
"""The C{detail} of an error that came back in place of a response: the
status is the proxy's own (RFC 9211 2.3: without it, the absent
C{fwd-status} would say the next hop answered so)."""

MAX_VARIANTS = 32
"""The variants of one URL stored at most when a response varies on a
request field as the client wrote it (C{Vary: Accept} with no C{images}
stage to choose, C{Vary: User-Agent}...): past it a new variant is passed
on unstored (C{detail=too-many-variants}), so that clients writing a field
in ever new ways cannot fill the store with copies of one URL.  The fields
a stage chooses on are bounded by its choices and not counted."""

SMALL_ERROR_BODY = 64 * 1024
"""A discarded response body up to this size is read to its end (its
backend connection is kept); a larger one is stopped."""


class _Stage(Protocol):
    """What the answers ask of their stage (a L{edgeproxy.cache.stage.CacheStage})."""

    stores: CacheStores
    clock: Any
    rules: Rules
    status: CacheStatus
    counters: CacheCounters
    staleIfError: float

    def variantStagesOf(self, call: Call) -> dict[bytes, Any]: ...

    def serve(self, call: Call, entry: Entry, member: bytes, age: float) -> None: ...

    def invalidateAfter(self, request: Request, response: Response) -> None: ...


def statusOnly(fields: Fields) -> Fields:
    """Only the C{Cache-Status} of C{fields} (a 412 carries nothing else)."""
    return Fields.trusted({b"cache-status": list(fields.getAll(b"cache-status"))})


def internalError() -> ProxyError:
    """The error of a stage that failed itself (500)."""
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


class Passing:
    """The answer to a request the cache does not handle (other methods,
    C{fwd=method}; a C{GET} with a body, C{fwd=bypass})."""

    __slots__ = ("reason", "request", "stage")

    def __init__(self, stage: _Stage, request: Request, reason: bytes = b"method") -> None:
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
        call.fail(marked(error, self.stage.status.forward(self.reason, detail=NO_RESPONSE)))


class Background:
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


class Fetching:
    """
    The answer to a request forwarded on a miss: stored while it streams
    to the client when it may be stored, and the waiters of its key told
    when that is over.
    """

    def __init__(
        self,
        stage: _Stage,
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
        call.fail(marked(error, self.stage.status.forward(self.reason, detail=NO_RESPONSE)))

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
        if self.mayStore and response.transient:
            # A one-off fallback of a later stage (the original image while
            # the conversion pool was full): the next request gets a new try.
            detail = b"transient"
        elif self.mayStore:
            request = self.request
            verdict = storability(
                b"GET", request.fields, self.directives, status, response.fields, stage.rules, now,
                request.authenticated,
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
                    variants = stage.variantStagesOf(call)
                    # Keyed on a stage's choice only where that stage made
                    # the response what it is; elsewhere on the field.
                    chosen = tuple(name for name in names if name in response.chosenOn and name in variants)
                    key = self.primary + secondaryKey(names, self.request, variants, chosen)
                    self.marker = Variants(self.primary, self.url, names, chosen)
                    if len(chosen) < len(names):
                        known = stores.keysForURL(self.url)
                        # The marker is one of the URL's keys.
                        if key not in known and len(known) > MAX_VARIANTS:
                            detail = b"too-many-variants"
                            self.marker = None
                if not detail:
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
                    call.respond(Response(412, b"Precondition Failed", statusOnly(served), 0, BytesBody(b"")))
                return
        call.respond(Response(status, response.reason, withStatus(fields, member), response.length, body))

    def notStored(self) -> None:
        """The response is not stored: the waiters fetch on their own."""
        self.release(False)

    def _stored(self, entry: Entry | None) -> None:
        if entry is not None:
            self._forgetUnreachable(entry.key)
            if self.marker is not None:
                self.stage.stores.putVariants(self.marker)
        self.release(entry is not None)

    def _forgetUnreachable(self, stored: bytes) -> None:
        """
        What was looked up was a variant (a C{Vary} was stored) and the
        response stored now (under C{stored}) varies on other fields, or on
        none: no lookup reaches the variants made under the old C{Vary} any
        more (the URL's marker lists the new one), so they go now rather
        than when they are evicted.
        """
        prefix = self.primary + SECONDARY
        if not self.key.startswith(prefix):
            return
        names = self.marker.names if self.marker is not None else ()
        if variedOn(self.key[len(prefix):]) == names:
            return
        stores = self.stage.stores
        for key in stores.keysForURL(self.url):
            if key != stored and key.startswith(prefix) and variedOn(key[len(prefix):]) != names:
                stores.remove(key)


class Revalidation(Fetching):
    """
    The answer to a conditional request validating a stored entry (or,
    C{background}, to a refresh nobody waits for).
    """

    def __init__(
        self,
        stage: _Stage,
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
            stage.serve(call, merged, member, age)
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
            call.fail(internalError())
            return
        stage.counters.staleServed += 1
        call.request = self.request
        now = stage.clock.seconds()
        age = self.entry.age(now)
        member = stage.status.forward(self.reason, status, detail=b"stale-if-error")
        stage.serve(call, self.entry, member, age)
