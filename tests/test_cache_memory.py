"""
Tests for L{edgeproxy.cache.memory} (least recently used first, an exact
bound on the bytes charged) and L{edgeproxy.cache.status} (the
C{Cache-Status} members).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.cache.entry import OVERHEAD, Entry, Variants
from edgeproxy.cache.freshness import Policy
from edgeproxy.cache.memory import MemoryTier
from edgeproxy.cache.status import CacheStatus, withStatus
from edgeproxy.cache.stores import expired
from edgeproxy.collectors import CacheCounters
from edgeproxy.h1.fields import Fields


def entry(key: bytes, size: int, url: bytes | None = None, tags: tuple[bytes, ...] = ()) -> Entry:
    return Entry(
        key=key, url=url or key, status=200, reason=b"OK", fields=Fields(), length=size,
        responseTime=0.0, initialAge=0.0, policy=Policy(60.0), tags=tags, body=b"x" * size,
    )


def test_leastRecentlyUsedGoesFirst() -> None:
    a, b, c, d, e = (entry(key, 100) for key in (b"a", b"b", b"c", b"d", b"e"))
    tier = MemoryTier(capacity=a.size * 4 + 10, maxObject=10**9)
    for item in (a, b, c, d):
        tier.put(item)
    assert tier.get(b"a") == a  # a is now the most recent
    tier.put(e)
    assert tier.get(b"b") is None
    assert [tier.get(key) for key in (b"a", b"c", b"d", b"e")] == [a, c, d, e]
    assert tier.counters.evicted["memory"] == b.size


def test_replacingAKeyChargesOnce() -> None:
    tier = MemoryTier(capacity=10**6, maxObject=10**6)
    tier.put(entry(b"a", 100))
    tier.put(entry(b"a", 200))
    assert len(tier) == 1 and tier.bytes == entry(b"a", 200).size


def test_tooLargeIsNotKeptAndDropsTheOldCopy() -> None:
    tier = MemoryTier(capacity=4000, maxObject=10**6)
    assert tier.maxObject == 1000
    assert tier.put(entry(b"a", 10))
    assert not tier.put(entry(b"a", 2000))
    assert tier.get(b"a") is None and tier.bytes == 0


@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c", b"d", b"e"]), st.integers(0, 600)), max_size=40))
def test_boundIsExact(puts: list[tuple[bytes, int]]) -> None:
    """Whatever is stored, the bytes charged never pass the capacity and
    always equal the sum of what is held."""
    tier = MemoryTier(capacity=4 * (OVERHEAD + 700), maxObject=10**9)
    for key, size in puts:
        tier.put(entry(key, size))
        assert tier.bytes <= tier.capacity
        assert tier.bytes == sum(size for _, size in tier._items.values())


def test_purgeByURLPrefixAndTag() -> None:
    counters = CacheCounters()
    tier = MemoryTier(capacity=10**6, maxObject=10**6, counters=counters)
    tier.put(entry(b"https://a/x", 1, tags=(b"t1",)))
    tier.put(entry(b"https://a/x\x01accept=gzip", 1, url=b"https://a/x", tags=(b"t1",)))
    tier.put(Variants(b"https://a/x", b"https://a/x", (b"accept",)))
    tier.put(entry(b"https://a/y", 1, tags=(b"t2",)))
    tier.put(entry(b"https://b/y", 1))
    # The marker (the first entry's key now) goes with its URL.
    assert sorted(tier.keysForURL(b"https://a/x")) == [b"https://a/x", b"https://a/x\x01accept=gzip"]
    assert sorted(tier.keysForPrefix(b"https://a/")) == [
        b"https://a/x", b"https://a/x\x01accept=gzip", b"https://a/y",
    ]
    assert sorted(tier.keysForTag(b"t1")) == [b"https://a/x\x01accept=gzip"]
    assert tier.purge(tier.keysForTag(b"t2"), soft=True, expire=expired) == 1
    soft = tier.get(b"https://a/y")
    assert isinstance(soft, Entry) and soft.policy.lifetime == 0.0
    assert tier.purge(tier.keysForPrefix(b"https://a/"), soft=False, expire=expired) == 2
    assert tier.get(b"https://a/y") is None and tier.get(b"https://b/y") is not None


@pytest.mark.parametrize(
    "name, call, expected",
    [
        (b"edge", lambda s: s.hit(42.7), b"edge; hit; ttl=42"),
        (b"edge", lambda s: s.hit(-3.2), b"edge; hit; ttl=-4"),
        (b"edge", lambda s: s.hit(-3.2, detail=b"stale-if-error"), b"edge; hit; ttl=-4; detail=stale-if-error"),
        (b"edge", lambda s: s.forward(b"uri-miss", 200, stored=True, ttl=60), b"edge; fwd=uri-miss; fwd-status=200; stored; ttl=60"),
        (b"edge", lambda s: s.forward(b"uri-miss", 200, collapsed=True), b"edge; fwd=uri-miss; fwd-status=200; collapsed"),
        (b"edge", lambda s: s.forward(b"method", 201), b"edge; fwd=method; fwd-status=201"),
        (b"edge", lambda s: s.forward(b"stale", 503, detail=b"stale if error"), b'edge; fwd=stale; fwd-status=503; detail="stale if error"'),
        # A name that is not an sf-token is written as an sf-string.
        (b"1edge", lambda s: s.hit(1), b'"1edge"; hit; ttl=1'),
    ],
)
def test_cacheStatus(name: bytes, call: object, expected: bytes) -> None:
    assert call(CacheStatus(name)) == expected  # type: ignore[operator]


def test_withStatusAppendsAfterTheOriginsCaches() -> None:
    fields = withStatus(Fields([(b"cache-status", b"origin-cache; hit")]), b"edge; fwd=uri-miss")
    assert fields.getAll(b"cache-status") == [b"origin-cache; hit", b"edge; fwd=uri-miss"]
