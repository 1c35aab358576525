# -*- test-case-name: tests.test_security_units -*-
"""
Rate-limit state in this process: token buckets and requests in flight,
per key.  Pure: the time is passed in.

A token bucket holds at most C{burst} tokens and gains C{rate} per second;
a request takes one, and is refused when less than one is left.  Over any
span of C{T} seconds a key is therefore let through at most C{burst + rate
* T} times: the steady rate plus one burst.

L{take} is the rule itself (the Redis script of
L{edgeproxy.security.redisstore} is the same rule, run on the server);
L{LocalBuckets} keeps one bucket per key with a bound on their number.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["Decision", "LocalBuckets", "LocalConcurrency", "take"]

MAX_KEYS = 100_000
"""Keys one limit of one route keeps in memory at most; past it, buckets
that are full again (indistinguishable from new ones) are dropped, then
the oldest."""


class Decision(NamedTuple):
    """The outcome of one bucket for one request."""

    allowed: bool
    remaining: int
    """Whole tokens left after this request."""
    retryAfter: float
    """Seconds until a token is there again (0 when allowed)."""
    reset: float
    """Seconds until the bucket is full again."""


def take(tokens: float, stamp: float, now: float, rate: float, burst: int) -> tuple[Decision, float]:
    """
    Take one token from a bucket that held C{tokens} at C{stamp}.

    @return: the decision, and the tokens the bucket holds at C{now}
        afterwards.
    """
    elapsed = now - stamp
    if elapsed > 0:
        tokens = min(float(burst), tokens + elapsed * rate)
    if tokens < 1.0:
        return Decision(False, 0, (1.0 - tokens) / rate, (burst - tokens) / rate), tokens
    tokens -= 1.0
    return Decision(True, int(tokens), 0.0, (burst - tokens) / rate), tokens


class LocalBuckets:
    """
    The token buckets of one limit on one route, by key.
    """

    __slots__ = ("rate", "burst", "_buckets", "maxKeys", "__weakref__")

    def __init__(self, rate: float, burst: int, maxKeys: int = MAX_KEYS) -> None:
        self.rate = rate
        self.burst = burst
        self.maxKeys = maxKeys
        self._buckets: dict[str, list[float]] = {}

    def peek(self, key: str, now: float) -> Decision:
        """What L{take} would decide, without taking."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return Decision(True, self.burst - 1, 0.0, 1.0 / self.rate)
        decision, _ = take(bucket[0], bucket[1], now, self.rate, self.burst)
        return decision

    def take(self, key: str, now: float) -> Decision:
        """Take a token for C{key}."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.maxKeys:
                self._shrink(now)
            bucket = buckets[key] = [float(self.burst), now]
        decision, tokens = take(bucket[0], bucket[1], now, self.rate, self.burst)
        bucket[0] = tokens
        bucket[1] = now
        return decision

    def _shrink(self, now: float) -> None:
        full = self.burst / self.rate
        buckets = self._buckets
        for key in [k for k, (_, stamp) in buckets.items() if now - stamp >= full]:
            del buckets[key]
        if len(buckets) >= self.maxKeys:
            # Every bucket is in use: the oldest half goes (a key dropped
            # starts full again: a bound on memory costs one burst).
            for key in list(buckets)[: len(buckets) // 2]:
                del buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class LocalConcurrency:
    """Requests in flight per key, for one limit on one route."""

    __slots__ = ("limit", "_counts", "__weakref__")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        count = self._counts.get(key, 0)
        if count >= self.limit:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def inFlight(self, key: str) -> int:
        return self._counts.get(key, 0)


def retryAfterSeconds(seconds: float) -> int:
    """A C{Retry-After} value: whole seconds, at least 1 (RFC 9110 10.2.3)."""
    return max(1, math.ceil(seconds))
