# -*- test-case-name: tests.test_cache_stores -*-
"""
L{CacheStores}: what every route's cache stage of a runtime shares: the
memory tier (this process), the disk tier (all processes), the collapsing
table, and the counters.  A reload whose C{[cache]} did not change hands
the same object to the new runtime (L{edgeproxy.cache.kind}); one that
changed it but kept C{disk} hands the open disk tier to the new stores.
Stores a runtime no longer uses are closed (L{CacheStores.close}) once
their writes are done (L{CacheStores.inFlight}): by the service when it
retires a runtime, and at stop.

A lookup tries memory, then disk; an object found on disk that fits the
memory tier is copied there: read at once when it is small
(L{PROMOTE_INLINE}, no more than a piece of a streamed body), else read in
a thread while this request streams it from its file, and kept if the index
still has it as it was (not purged or replaced meanwhile).  L{StoreWriter}
stores a response as its body passes
(L{edgeproxy.cache.bodies.StoringBody}): in memory while it fits, on disk
until C{max_object_size}.

Purges (L{CacheStores.purge}) remove, or mark stale (C{soft}), every
object of a URL (all its variants), of a URL prefix, or of a tag, in both
tiers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from edgeproxy.cache.blocking import Blocking
from edgeproxy.cache.bodies import PIECE
from edgeproxy.cache.collapse import CollapseTable
from edgeproxy.cache.disk import DiskTier
from edgeproxy.cache.diskobjects import DiskWriter
from edgeproxy.cache.entry import Entry, Variants
from edgeproxy.cache.memory import MemoryTier
from edgeproxy.collectors import CacheCounters
from edgeproxy.config.stagemodel import CacheSettings

__all__ = ["PROMOTE_INLINE", "PURGE_KINDS", "CacheStores", "StoreWriter", "expired", "relay", "setRelay"]

log = Logger()

PURGE_KINDS = ("url", "prefix", "tag")

PROMOTE_INLINE = PIECE
"""Bytes of a body found on disk read at once, in the reactor's thread,
to be kept in memory (a file body reads this much per piece anyway); a
larger one is read in a thread."""

ERROR_HOLD = 2.0
"""Seconds after a failed validation during which a stale entry that may
be served in place of an error is served without asking the origin again
(a failing origin is not asked once per request)."""


_relay: list[Callable[[dict[str, Any]], None]] = []


def setRelay(send: Callable[[dict[str, Any]], None] | None) -> None:
    """
    Where this process sends the purges it makes itself (a C{PURGE}
    request, an invalidation): a worker to its supervisor, which has the
    other workers make them too; L{None}: nowhere (a single process).
    """
    _relay[:] = [] if send is None else [send]


def relay(message: dict[str, Any]) -> None:
    """Tell the other processes of a purge made here (C{kind}, C{value},
    C{soft}), which they make in their memory tiers."""
    for send in _relay:
        send(message)


def expired(entry: Entry) -> Entry:
    """C{entry} made stale at once (a soft purge): validated before its next
    use, or served stale where the rules allow."""
    return entry._replace(policy=entry.policy._replace(lifetime=0.0), initialAge=max(entry.initialAge, 1.0))


class CacheStores:
    """
    @ivar settings: the C{[cache]} section they were made from.
    @ivar memory: the memory tier, or L{None} (C{memory = 0}).
    @ivar disk: the disk tier, or L{None} (no C{disk}).
    @ivar collapsing: the fetches in flight, and who waits for them.
    @ivar counters: the process's cache counters.
    """

    def __init__(
        self,
        settings: CacheSettings,
        clock: Any,
        blocking: Blocking,
        counters: CacheCounters | None = None,
        previous: CacheStores | None = None,
    ) -> None:
        """
        @param previous: the stores these replace (a reload): their disk
            tier is taken over when it is the same directory.
        """
        self.settings = settings
        self.clock = clock
        self.counters = counters if counters is not None else CacheCounters()
        self.memory = (
            MemoryTier(settings.memory, settings.max_object_size, self.counters) if settings.memory else None
        )
        old = None if previous is None else previous.disk
        self.disk: DiskTier | None
        if settings.disk is None:
            self.disk = None
        elif old is not None and not old.closed and old.directory == settings.disk:
            old.retain(settings.disk_size, settings.max_object_size)
            self.disk = old
        else:
            self.disk = DiskTier(
                settings.disk, settings.disk_size, settings.max_object_size, clock, blocking,
                counters=self.counters,
            )
        self.collapsing = CollapseTable(clock, settings.collapse_timeout, self.disk)
        self.buffered = 0
        """Bytes held by writers for the memory tier (responses still
        arriving): bounded by half the tier, so that many large misses at
        once cannot hold more than the tier itself."""
        self.writing = 0
        """Writers not done yet (L{StoreWriter})."""
        self._promoting: set[bytes] = set()
        self.closed = False
        self._failed: dict[bytes, float] = {}

    # Lookups ---------------------------------------------------------------

    def lookup(self, key: bytes) -> Entry | Variants | None:
        counters = self.counters
        memory = self.memory
        disk = self.disk
        if memory is not None:
            counters.lookups["memory"] += 1
            item = memory.get(key)
            if item is not None:
                counters.found["memory"] += 1
                if disk is not None:
                    # The disk tier's least-recently-used order counts uses
                    # served from memory too (written in batches).
                    disk.touch(key)
                return item
        if disk is None:
            return None
        counters.lookups["disk"] += 1
        item = disk.get(key)
        if item is None:
            return None
        counters.found["disk"] += 1
        if memory is not None:
            if isinstance(item, Variants):
                memory.put(item)
            elif item.length + 4096 <= memory.maxObject:
                if item.length > PROMOTE_INLINE:
                    self._promote(item)
                    return item
                body = disk.readBody(item)
                if body is None:
                    return None
                item = item._replace(body=body, path=None)
                memory.put(item)
        return item

    def _promote(self, entry: Entry) -> None:
        """
        Copy a disk entry into the memory tier, read in a thread; the
        bytes being read count in L{buffered}, whose bound they share.
        """
        memory = self.memory
        disk = self.disk
        assert memory is not None and disk is not None
        key = entry.key
        length = entry.length
        if key in self._promoting or self.buffered + length > memory.capacity // 2:
            return
        self._promoting.add(key)
        self.buffered += length

        def read(body: bytes | None) -> None:
            self._promoting.discard(key)
            self.buffered -= length
            if body is None or self.closed:
                return
            # Kept only as the index has it now: a purge, a soft purge, a
            # 304 or a replacement meanwhile wins.
            current = disk.get(key)
            if isinstance(current, Entry) and current.path == entry.path and current.length == length:
                memory.put(current._replace(body=body, path=None))

        def failed(failure: Any) -> None:
            self._promoting.discard(key)
            self.buffered -= length
            disk.problem("reading", failure.value)

        disk.readBodyLater(entry).addCallbacks(read, failed)

    # Storing ---------------------------------------------------------------

    def writer(self, head: Entry, length: int | None, done: Callable[[Entry | None], None]) -> StoreWriter | None:
        """
        A writer for the response C{head} describes (its body to come, of
        C{length} bytes when known), or L{None} when no tier would keep it.

        @param done: called once with the entry as stored (in memory if it
            went there, else on disk), or L{None} when it was not.
        """
        settings = self.settings
        if length is not None and length > settings.max_object_size:
            return None
        memory = self.memory
        inMemory = memory is not None and (length is None or length <= memory.maxObject)
        diskWriter = None
        disk = self.disk
        if disk is not None and (length is None or length <= disk.maxObject):
            diskWriter = disk.writer(head)
        if not inMemory and diskWriter is None:
            return None
        return StoreWriter(self, head, inMemory, diskWriter, done)

    def putVariants(self, marker: Variants) -> None:
        if self.memory is not None:
            self.memory.put(marker)
        if self.disk is not None:
            current = self.disk.get(marker.key)
            if current != marker:
                self.disk.unlink(self.disk.insert(marker, None, 0, 0))

    def refresh(self, entry: Entry) -> None:
        """Keep C{entry}, freshened by a 304 (same body, new metadata)."""
        self._failed.pop(entry.key, None)
        if self.memory is not None and entry.body is not None:
            self.memory.put(entry)
        elif self.memory is not None:
            self.memory.remove(entry.key)
        if self.disk is not None:
            self.disk.update(entry._replace(body=None))

    def remove(self, key: bytes) -> None:
        if self.memory is not None:
            self.memory.remove(key)
        if self.disk is not None:
            self.disk.remove(key)

    # Failing origins -----------------------------------------------------------

    def failed(self, key: bytes) -> None:
        """A validation of C{key} failed now (see L{ERROR_HOLD})."""
        self._failed[key] = self.clock.seconds() + ERROR_HOLD
        if len(self._failed) > 4096:
            now = self.clock.seconds()
            self._failed = {k: until for k, until in self._failed.items() if until > now}

    def failing(self, key: bytes) -> bool:
        until = self._failed.get(key)
        if until is None:
            return False
        if until <= self.clock.seconds():
            del self._failed[key]
            return False
        return True

    # Purging ---------------------------------------------------------------

    def keysForURL(self, url: bytes) -> set[bytes]:
        """The keys stored for C{url} in either tier (its variants and marker)."""
        keys: set[bytes] = set()
        for tier in (self.memory, self.disk):
            if tier is not None:
                keys.update(tier.keysForURL(url))
        return keys

    def purge(self, kind: str, value: bytes, soft: bool, tiers: tuple[str, ...] = ("memory", "disk")) -> dict[str, int]:
        """
        Remove (or, C{soft}, mark stale) every object of a URL, prefix or
        tag in the given tiers.

        @param kind: one of L{PURGE_KINDS}.
        @param value: the URL part of a key (L{edgeproxy.cache.key.purgeURL}),
            a prefix of one, or a tag.
        @return: tier -> entries affected.
        """
        counts = {}
        for name, tier in (("memory", self.memory), ("disk", self.disk)):
            if tier is None or name not in tiers:
                continue
            if kind == "url":
                keys = tier.keysForURL(value)
            elif kind == "prefix":
                keys = tier.keysForPrefix(value)
            else:
                keys = tier.keysForTag(value)
            counts[name] = tier.purge(keys, soft, expired)
        self.counters.purged += sum(counts.values())
        return counts

    def invalidate(self, url: bytes) -> None:
        """
        RFC 9111 4.4: every stored response of C{url} goes, here (both
        tiers) and, relayed (L{relay}), from the other workers' memory
        tiers.
        """
        self.purge("url", url, soft=False)
        relay({"kind": "url", "value": url.decode("latin-1"), "soft": False})

    # State -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The C{cache} of C{/status}: each tier's size, objects, hit ratio."""
        counters = self.counters
        document: dict[str, Any] = {"name": self.settings.name}
        memory = self.memory
        if memory is not None:
            document["memory"] = {
                "bytes": memory.bytes,
                "capacity": memory.capacity,
                "objects": len(memory),
                "lookups": counters.lookups["memory"],
                "hits": counters.found["memory"],
                "hit_ratio": _ratio(counters.found["memory"], counters.lookups["memory"]),
            }
        disk = self.disk
        if disk is not None:
            size, objects = disk.totals()
            document["disk"] = {
                "path": disk.directory,
                "bytes": size,
                "capacity": disk.capacity,
                "objects": objects,
                "lookups": counters.lookups["disk"],
                "hits": counters.found["disk"],
                "hit_ratio": _ratio(counters.found["disk"], counters.lookups["disk"]),
            }
        document["collapsing"] = len(self.collapsing)
        return document

    def inFlight(self) -> int:
        """Writes and fetches not over yet: retired stores are closed when
        this is 0."""
        return self.writing + len(self.collapsing)

    def close(self) -> None:
        """Let go of the disk tier (closed with its last holder, the uses
        batched written first); idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.disk is not None:
            self.disk.close()


def _ratio(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole, 4)


class StoreWriter:
    """
    Stores one response as its body passes (a
    L{edgeproxy.cache.bodies.Sink}): the pieces kept in memory while the
    body fits the memory tier, written to the disk tier while it fits
    C{max_object_size}.
    """

    __slots__ = ("_chunks", "_disk", "_done", "_head", "_held", "_over", "_size", "_stores")

    def __init__(
        self,
        stores: CacheStores,
        head: Entry,
        inMemory: bool,
        disk: DiskWriter | None,
        done: Callable[[Entry | None], None],
    ) -> None:
        self._stores = stores
        self._head = head
        self._chunks: list[bytes] | None = [] if inMemory else None
        self._size = 0
        self._held = 0
        self._disk = disk
        self._done: Callable[[Entry | None], None] | None = done
        self._over = False
        stores.writing += 1

    def write(self, data: bytes) -> bool:
        if self._over:
            return False
        stores = self._stores
        size = self._size = self._size + len(data)
        chunks = self._chunks
        if chunks is not None:
            memory = stores.memory
            if (
                memory is None
                or size > memory.maxObject
                or stores.buffered + len(data) > memory.capacity // 2
            ):
                self._letGo()
            else:
                chunks.append(data)
                self._held += len(data)
                stores.buffered += len(data)
        disk = self._disk
        if disk is not None and not disk.write(data):
            self._disk = None
        if self._chunks is None and self._disk is None:
            self._end(None)
            return False
        return True

    def finish(self) -> None:
        if self._over:
            return
        self._over = True
        entry = self._head._replace(length=self._size)
        stored = None
        memory = self._stores.memory
        if self._chunks is not None and memory is not None:
            withBody = entry._replace(body=b"".join(self._chunks))
            self._letGo()
            if memory.put(withBody):
                stored = withBody
        disk, self._disk = self._disk, None
        if disk is None:
            self._report(stored)
            return
        written: Deferred[Entry | None] = disk.finish(entry)

        def onDisk(result: Entry | None) -> None:
            self._report(stored if stored is not None else result)

        written.addCallback(onDisk)
        written.addErrback(lambda failure: log.failure("storing a response failed", failure))

    def _letGo(self) -> None:
        self._chunks = None
        self._stores.buffered -= self._held
        self._held = 0

    def abort(self) -> None:
        if self._over:
            return
        self._letGo()
        disk, self._disk = self._disk, None
        if disk is not None:
            disk.abort()
        self._end(None)

    def _end(self, result: Entry | None) -> None:
        self._over = True
        self._letGo()
        self._report(result)

    def _report(self, result: Entry | None) -> None:
        done, self._done = self._done, None
        if done is not None:
            self._stores.writing -= 1
            done(result)

