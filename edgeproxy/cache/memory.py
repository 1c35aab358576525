# -*- test-case-name: tests.test_cache_memory -*-
"""
L{MemoryTier}: the stored responses of one process, in memory, evicted by
least recent use with an exact bound on the bytes they are charged
(L{edgeproxy.cache.entry.Entry.size}: body, fields, key and a fixed
overhead per object).

A lookup is one dictionary access and a move to the recent end: the hit
path of the cache.  An object larger than L{MemoryTier.maxObject} (a
quarter of the tier, at most C{max_object_size}) is not kept here: it
would push out everything else for one URL.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from edgeproxy.cache.entry import Entry, Variants
from edgeproxy.collectors import CacheCounters

__all__ = ["MemoryTier"]

Item = Entry | Variants


class MemoryTier:
    """
    @ivar capacity: the bound, bytes.
    @ivar bytes: bytes charged now (never above C{capacity}).
    @ivar counters: where the bytes stored and evicted are counted.
    """

    def __init__(self, capacity: int, maxObject: int, counters: CacheCounters | None = None) -> None:
        self.capacity = capacity
        self.maxObject = min(maxObject, capacity // 4)
        self.bytes = 0
        self.counters = counters if counters is not None else CacheCounters()
        self._items: OrderedDict[bytes, tuple[Item, int]] = OrderedDict()
        self._byURL: dict[bytes, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> Item | None:
        found = self._items.get(key)
        if found is None:
            return None
        self._items.move_to_end(key)
        return found[0]

    def put(self, item: Item) -> bool:
        """
        Keep C{item} (in place of what its key held), evicting the least
        recently used until the bound holds.

        @return: whether it is kept (not when larger than L{maxObject}:
            then what its key held goes too, being out of date).
        """
        size = item.size
        key = item.key
        self.remove(key)
        if size > self.maxObject or size > self.capacity:
            return False
        if type(item) is Entry:
            # Kept as it is served: its field lines made once, not per hit.
            item = item._replace(fields=item.fields.asLines())
        self._items[key] = (item, size)
        self.bytes += size
        self.counters.stored["memory"] += size
        self._byURL.setdefault(item.url, set()).add(key)
        items = self._items
        while self.bytes > self.capacity:
            oldKey, (old, oldSize) = items.popitem(last=False)
            self.bytes -= oldSize
            self.counters.evicted["memory"] += oldSize
            self._forgetURL(old.url, oldKey)
        return True

    def remove(self, key: bytes) -> bool:
        found = self._items.pop(key, None)
        if found is None:
            return False
        item, size = found
        self.bytes -= size
        self._forgetURL(item.url, key)
        return True

    def _forgetURL(self, url: bytes, key: bytes) -> None:
        keys = self._byURL.get(url)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._byURL[url]

    # Purging ---------------------------------------------------------------

    def keysForURL(self, url: bytes) -> list[bytes]:
        return list(self._byURL.get(url, ()))

    def keysForPrefix(self, prefix: bytes) -> list[bytes]:
        return [key for url, keys in self._byURL.items() if url.startswith(prefix) for key in keys]

    def keysForTag(self, tag: bytes) -> list[bytes]:
        return [
            key
            for key, (item, _) in self._items.items()
            if isinstance(item, Entry) and tag in item.tags
        ]

    def purge(self, keys: Iterable[bytes], soft: bool, expire: Callable[[Entry], Entry]) -> int:
        """
        Remove the objects of C{keys} (or, C{soft}, replace each entry by
        C{expire(entry)}, leaving markers alone).

        @return: how many entries were affected (markers not counted).
        """
        count = 0
        for key in keys:
            found = self._items.get(key)
            if found is None:
                continue
            item = found[0]
            if isinstance(item, Entry):
                count += 1
            if soft:
                if isinstance(item, Entry):
                    self._items[key] = (expire(item), found[1])
            else:
                self.remove(key)
        return count
