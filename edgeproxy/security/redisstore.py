# -*- test-case-name: tests.integration.test_security_redis -*-
"""
Rate limits shared through Redis (C{store = redis}, the C{[redis]}
section): every edgeproxy process (workers, machines) that names the same
Redis shares the same counters.

The client is txredisapi: Twisted-native (no thread, no asyncio bridge),
reconnecting with backoff by itself, with TLS, UNIX sockets, AUTH and
SELECT, and scripts (C{EVALSHA} with a fallback to C{EVAL}); hiredis,
when installed, parses the replies.  redis-py would need a thread per
command or an asyncio reactor; hand-writing RESP would be one more
protocol to get wrong.

All limits of a request are decided by one script, atomically on the
server (L{SCRIPT}): the token buckets (the rule of
L{edgeproxy.security.buckets.take}, with the server's clock, so that
processes whose clocks differ still share one bucket) and the requests in
flight (a sorted set of request ids scored by when their lease ends);
tokens and places are taken only when every limit lets the request
through.  A place in flight is given back when the request ends
(L{RedisStore.release}); one whose process died expires with its lease.

Keys (their scope: one limit on one route; two routes naming the same
C{[ratelimit:NAME]} count separately, as they do with C{store = local}):

    <prefix>:rl:<limit>:<route>:<sha256 of the key, 32 hex digits>   a bucket (hash)
    <prefix>:rc:<limit>:<route>:<sha256 of the key, 32 hex digits>   requests in flight (sorted set)

The key is hashed: a header or cookie value (an API key) never reaches
Redis.  Buckets expire once full again, sets once their last lease ends.

An outage: a command that fails or takes longer than C{[redis]
timeout} is decided by the limit's C{on_store_error} (counted in
C{edgeproxy_ratelimit_store_errors_total}); the first failure logs one
warning and C{edgeproxy_ratelimit_store_up} goes to 0, the first success
after it one line saying it is back.  While no connection is up, requests
do not wait for the timeout.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.config.stagemodel import RedisSettings

__all__ = ["CONCURRENCY_LEASE", "RedisStore", "StoreUnavailable", "sharedStore", "storeKey"]

log = Logger()

CONCURRENCY_LEASE = 600.0
"""Seconds a place in flight is held at most (a process that died without
giving it back)."""

SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local nb = tonumber(ARGV[1])
local member = ARGV[2]
local lease = tonumber(ARGV[3])
local tokens = {}
local refused = 0
local retry = 0
for i = 1, nb do
  local rate = tonumber(ARGV[1 + 3 * i])
  local burst = tonumber(ARGV[2 + 3 * i])
  local state = redis.call('HMGET', KEYS[i], 't', 's')
  local tk = tonumber(state[1])
  local st = tonumber(state[2])
  if tk == nil or st == nil then
    tk = burst
    st = now
  end
  if now > st then
    tk = math.min(burst, tk + (now - st) * rate)
  end
  tokens[i] = tk
  if tk < 1 and refused == 0 then
    refused = i
    retry = math.ceil((1 - tk) / rate * 1000)
  end
end
local base = 3 + 3 * nb
if refused == 0 then
  for j = nb + 1, #KEYS do
    local limit = tonumber(ARGV[base + j - nb])
    redis.call('ZREMRANGEBYSCORE', KEYS[j], '-inf', string.format('%.17g', now))
    if redis.call('ZCARD', KEYS[j]) >= limit then
      refused = j
      retry = 1000
      break
    end
  end
end
if refused > 0 then
  return {refused, retry, 0}
end
local remaining = -1
for i = 1, nb do
  local rate = tonumber(ARGV[1 + 3 * i])
  local burst = tonumber(ARGV[2 + 3 * i])
  local ttl = ARGV[3 + 3 * i]
  redis.call('HSET', KEYS[i], 't', string.format('%.17g', tokens[i] - 1), 's', string.format('%.17g', now))
  redis.call('PEXPIRE', KEYS[i], ttl)
  local left = math.floor(tokens[i] - 1)
  if remaining < 0 or left < remaining then
    remaining = left
  end
end
for j = nb + 1, #KEYS do
  redis.call('ZADD', KEYS[j], string.format('%.17g', now + lease), member)
  redis.call('PEXPIRE', KEYS[j], string.format('%d', math.ceil(lease * 1000)))
end
return {0, 0, remaining}
"""
"""The decision of one request over all its shared limits.

KEYS: the buckets, then the in-flight sets.  ARGV: the number of
buckets, the request's id, the lease in seconds, then per bucket its
rate (per second), burst and expiry (ms), then per set its limit.
Returns {refused, retry after in ms, remaining}: C{refused} is 0 when the
request passes, else the 1-based index of the key that refused it."""


class StoreUnavailable(Exception):
    """The shared store cannot answer now."""


def storeKey(prefix: str, kind: str, limit: str, route: str, key: str) -> str:
    """The Redis key of one limit's counter (see the module docstring)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"{prefix}:{kind}:{limit}:{route}:{digest}"


def _connect(settings: RedisSettings) -> Any:
    import txredisapi

    common: dict[str, Any] = {
        "dbid": settings.db or None,
        "password": settings.password,
        "username": settings.username if settings.password else None,
        "connectTimeout": max(1.0, settings.timeout * 4),
        "replyTimeout": settings.timeout,
        "convertNumbers": True,
    }
    if settings.path is not None:
        return txredisapi.lazyUnixConnection(settings.path, **common)
    contextFactory: Any = False
    if settings.tls:
        from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

        trust: Any = platformTrust()
        if settings.ca is not None:
            with open(settings.ca, "rb") as f:
                trust = Certificate.loadPEM(f.read())
        contextFactory = optionsForClientTLS(settings.host or "", trustRoot=trust)
    return txredisapi.lazyConnection(
        settings.host or "127.0.0.1", settings.port, ssl_context_factory=contextFactory, **common
    )


class RedisStore:
    """
    One connection to the C{[redis]} of the configuration, shared by every
    limit with C{store = redis} (see L{sharedStore}).

    @ivar up: whether the last command succeeded (L{False} during an
        outage).
    """

    def __init__(self, settings: RedisSettings, reactor: Any, metrics: Any = None) -> None:
        self.settings = settings
        self._reactor = reactor
        self._metrics = metrics
        self._handler = _connect(settings)
        self.up = True
        self._downSince: float | None = None
        self._decidedDown = 0
        self._sequence = 0
        self._member = f"{os.getpid()}-{os.urandom(4).hex()}"
        if metrics is not None:
            metrics.rateLimitStoreUp(True)

    @property
    def prefix(self) -> str:
        return self.settings.prefix

    def requestId(self) -> str:
        """A name for one request's places in flight, unique across processes."""
        self._sequence += 1
        return f"{self._member}-{self._sequence}"

    def _connected(self) -> bool:
        factory = getattr(self._handler, "_factory", None)
        return factory is None or factory.size > 0

    def check(
        self,
        buckets: list[tuple[str, float, int]],
        sets: list[tuple[str, int]],
        member: str,
    ) -> Deferred[tuple[int, int, int]]:
        """
        Decide one request over its shared limits (L{SCRIPT}).

        @param buckets: (key, rate per second, burst) of each token bucket.
        @param sets: (key, limit) of each bound on requests in flight.
        @return: fires with (refused index, 0 for none, else 1-based over
            C{buckets} then C{sets}; retry after in ms; remaining), or
            fails with L{StoreUnavailable}.
        """
        if not self.up and not self._connected():
            # Down and not reconnected: no request waits for a timeout.
            self._decidedDown += 1
            return fail(StoreUnavailable("no connection"))
        args: list[Any] = [len(buckets), member, CONCURRENCY_LEASE]
        for _, rate, burst in buckets:
            ttl = int((burst / rate) * 1000) + 1000
            args.extend((repr(rate), burst, ttl))
        args.extend(limit for _, limit in sets)
        keys = [key for key, _, _ in buckets] + [key for key, _ in sets]
        try:
            d = self._handler.eval(SCRIPT, keys, args)
        except Exception:
            return fail(StoreUnavailable("cannot send"))
        d.addTimeout(self.settings.timeout * 2, self._reactor)
        d.addCallbacks(self._answered, self._failed)
        return d

    def _answered(self, reply: Any) -> tuple[int, int, int]:
        refused, retry, remaining = (int(value) for value in reply)
        if not self.up:
            now = self._reactor.seconds()
            log.info(
                "Redis of the rate limits answers again after {seconds:.1f}s"
                " ({count} requests were decided by on_store_error)",
                seconds=now - (self._downSince or now),
                count=self._decidedDown,
            )
            self.up = True
            self._downSince = None
            self._decidedDown = 0
            if self._metrics is not None:
                self._metrics.rateLimitStoreUp(True)
        return refused, retry, remaining

    def _failed(self, reason: Failure) -> Failure:
        self._decidedDown += 1
        if self.up:
            self.up = False
            self._downSince = self._reactor.seconds()
            where = self.settings.path or f"{self.settings.host}:{self.settings.port}"
            log.warn(
                "Redis of the rate limits ({where}) does not answer ({why}):"
                " limits with store = redis follow on_store_error until it does",
                where=where,
                why=reason.getErrorMessage() or type(reason.value).__name__,
            )
            if self._metrics is not None:
                self._metrics.rateLimitStoreUp(False)
        return Failure(StoreUnavailable(reason.getErrorMessage()))

    def release(self, keys: list[str], member: str) -> None:
        """Give back a request's places in flight (errors ignored: the
        lease ends them anyway)."""
        if not keys or not self._connected():
            return
        try:
            for key in keys:
                self._handler.zrem(key, member).addErrback(lambda _: None)
        except Exception:
            pass

    def close(self) -> Any:
        try:
            return self._handler.disconnect()
        except Exception:
            return None


_stores: weakref.WeakValueDictionary[tuple[Any, RedisSettings], RedisStore] = (
    weakref.WeakValueDictionary()
)


def sharedStore(settings: RedisSettings, reactor: Any, metrics: Any = None) -> RedisStore:
    """
    The store of C{settings}: the same object for every limit and route
    (and across reloads that keep the section), while any stage uses it;
    closed once none does.
    """
    key = (id(reactor), settings)
    store = _stores.get(key)
    if store is None:
        store = RedisStore(settings, reactor, metrics)
        _stores[key] = store
        weakref.finalize(store, _close, store._handler)
    return store


def _close(handler: Any) -> None:
    try:
        handler.disconnect()
    except Exception:
        pass
