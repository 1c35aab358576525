# -*- test-case-name: tests.test_cache_disk,tests.test_cache_diskrecover -*-
"""
L{DiskTier}: the stored responses on disk, one copy shared by every
process of the instance (the workers and their supervisor), bounded by
C{disk_size}, kept across restarts.

Layout of C{[cache] disk}::

    index.sqlite    the index (SQLite, WAL): key -> file, size, last use,
                    metadata; tags; the totals (kept by triggers)
    objects/ab/...  one file per stored response: a header (magic, the
                    metadata) then the body
    tmp/            objects being written
    locks           byte-range locks, one per key slot (collapsing)
    recover.lock    held by the process that checks the directory at start

Crash safety: an object is written to C{tmp/} (under an C{flock} held for
as long as its writer lives), C{fsync}ed, renamed into C{objects/}, and
only then entered in the index, so the index never names a partly written
file.  A file the index lets go of (purged, invalidated, replaced, evicted)
is named I{doomed} in the transaction that drops its row, and unlinked
after it (in a thread).  At start one process (the holder of
C{recover.lock}) removes the temporary files whose writer is gone and the
doomed files left by a crash, drops the index rows whose file is missing,
and enters in the index any other complete object file it does not name
(from the header each file carries); a damaged index is moved aside and
rebuilt from the files the same way.

I/O: the index is read and written in the reactor's thread (a lookup or a
small transaction takes tens of microseconds; WAL commits do not C{fsync});
object bodies are written in pieces as they arrive (page cache), and what
blocks (C{fsync}, renames, unlinking many files, the start-up check) runs in
a thread (L{Blocking}).

The pieces: L{edgeproxy.cache.diskindex} (the index),
L{edgeproxy.cache.diskobjects} (the object files, L{DiskWriter}),
L{edgeproxy.cache.diskrecover} (the start-up check),
L{edgeproxy.cache.blocking} (what runs in a thread).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from edgeproxy.cache.blocking import Blocking
from edgeproxy.cache.diskindex import (
    closeConnections,
    connect,
    doom,
    insertRow,
    openConnections,
    transaction,
)
from edgeproxy.cache.diskobjects import (
    DiskWriter,
    objectHeader,
    readWhole,
    unlinkDoomed,
)
from edgeproxy.cache.diskrecover import recoverDirectory
from edgeproxy.cache.entry import Entry, Variants, decodeMeta, encodeMeta
from edgeproxy.collectors import CacheCounters

__all__ = ["DiskTier"]

log = Logger()

TOUCH_DELAY = 2.0
"""Seconds between a use of a disk object and the write of its new last-use
time (uses are written in batches)."""

LOCK_SLOTS = 1 << 22
"""Byte offsets of the C{locks} file one key may lock (its slot)."""


def _keyDigest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


class DiskTier:
    """
    @ivar capacity: C{disk_size}, bytes.
    @ivar maxObject: the largest body stored.
    @ivar counters: where the bytes this process stores and evicts are
        counted.
    @ivar clock: the time of uses (the eviction order) and of problems.
    @ivar blocking: where what blocks runs (L{Blocking}).
    @ivar holders: the stores using the tier (a reload whose C{[cache]}
        changed but kept C{disk} hands it to the new stores, L{retain}); it
        is closed when the last lets go (L{close}).
    """

    def __init__(
        self,
        directory: str,
        capacity: int,
        maxObject: int,
        clock: Any,
        blocking: Blocking,
        recover: bool = True,
        counters: CacheCounters | None = None,
    ) -> None:
        self.directory = directory
        self.capacity = capacity
        self.maxObject = min(maxObject, capacity)
        self.counters = counters if counters is not None else CacheCounters()
        self.clock = clock
        self.blocking = blocking
        self._touched: dict[bytes, float] = {}
        self._touchTimer: Any = None
        self._problemLogged = 0.0
        self._serial = 0
        self.holders = 1
        self.closed = False
        for sub in ("objects", "tmp"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)
        self._indexPath = os.path.join(directory, "index.sqlite")
        try:
            self._db = connect(self._indexPath)
        except sqlite3.DatabaseError as e:
            # Damaged beyond use: set aside (for a post-mortem) and rebuilt
            # from the object files by the check below.
            aside = f"{self._indexPath}.damaged-{int(time.time())}"
            log.error(
                "cache index {path} cannot be used ({error}): moved to {aside}, rebuilding it"
                " from the stored objects",
                path=self._indexPath, error=str(e), aside=aside,
            )
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.replace(self._indexPath + suffix, aside + suffix)
                except FileNotFoundError:
                    pass
            self._db = connect(self._indexPath)
        self._locks = os.open(os.path.join(directory, "locks"), os.O_RDWR | os.O_CREAT, 0o600)
        openConnections(directory)
        self.recovered: Deferred[Any] = succeed(None)
        if recover:
            self.recovered = blocking.run(recoverDirectory, directory)
            self.recovered.addErrback(
                lambda failure: log.failure("checking the cache directory {path} failed", failure, path=directory)
            )

    # Reading -------------------------------------------------------------

    def get(self, key: bytes) -> Entry | Variants | None:
        """The object stored under C{key} (its body still in its file)."""
        try:
            row = self._db.execute(
                "SELECT file, offset, meta FROM objects WHERE key = ?", (key,)
            ).fetchone()
        except sqlite3.Error as e:
            self.problem("looking up", e)
            return None
        if row is None:
            return None
        file, offset, meta = row
        try:
            item = decodeMeta(meta, None if file is None else os.path.join(self.directory, file), offset)
        except ValueError as e:
            self.problem("reading an index row", e)
            self._delete([key])
            return None
        self.touch(key)
        return item

    def readBody(self, entry: Entry) -> bytes | None:
        """
        The whole body of a disk entry, read now (a small one: this blocks
        the caller), or L{None} when its file is gone (replaced or evicted
        by another process meanwhile; its index row goes when it still
        names that file).
        """
        assert entry.path is not None
        data = readWhole(entry.path, entry.offset, entry.length)
        if data is None:
            self._forgetFile(entry.key, entry.path)
        return data

    def readBodyLater(self, entry: Entry) -> Deferred[bytes | None]:
        """L{readBody} in a thread (a larger body, which would stall the
        reactor's thread)."""
        assert entry.path is not None
        path = entry.path

        def read(data: bytes | None) -> bytes | None:
            if data is None:
                self._forgetFile(entry.key, path)
            return data

        return self.blocking.run(readWhole, path, entry.offset, entry.length).addCallback(read)

    def open(self, entry: Entry) -> int | None:
        """A file descriptor on an entry's file (to stream its body), or
        L{None} when it is gone."""
        assert entry.path is not None
        try:
            return os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            self._forgetFile(entry.key, entry.path)
            return None

    def _forgetFile(self, key: bytes, path: str) -> None:
        relative = os.path.relpath(path, self.directory)
        try:
            self._db.execute("DELETE FROM objects WHERE key = ? AND file = ?", (key, relative))
        except sqlite3.Error as e:
            self.problem("removing a row", e)

    def touch(self, key: bytes) -> None:
        """Record a use (written within L{TOUCH_DELAY}, in one batch)."""
        if self.closed:
            return
        self._touched[key] = self.clock.seconds()
        if self._touchTimer is None:
            self._touchTimer = self.clock.callLater(TOUCH_DELAY, self.flushTouches)

    def flushTouches(self) -> None:
        self._touchTimer = None
        touched, self._touched = self._touched, {}
        if not touched:
            return
        try:
            with transaction(self._db):
                self._db.executemany(
                    "UPDATE objects SET atime = ? WHERE key = ? AND atime < ?",
                    [(when, key, when) for key, when in touched.items()],
                )
        except sqlite3.Error as e:
            self.problem("recording uses", e)

    # Writing ---------------------------------------------------------------

    def writer(self, head: Entry) -> DiskWriter | None:
        """
        Start writing an object whose metadata is C{head} (its C{length}
        not known yet); L{None} when the file cannot be made.
        """
        self._serial += 1
        digest = _keyDigest(head.key)
        name = f"{digest}.{os.getpid()}.{self._serial}.{os.urandom(4).hex()}"
        temporary = os.path.join(self.directory, "tmp", name)
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            self.problem("creating a file", e)
            return None
        # Held for the writer's life: the start-up check leaves it alone.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        header = objectHeader(head)
        final = os.path.join("objects", digest[:2], name)
        return DiskWriter(self, fd, temporary, final, head, len(header), header)

    def insert(self, item: Entry | Variants, relative: str | None, offset: int, size: int) -> list[str]:
        """
        Enter C{item} in the index (in place of what its key held); evict
        what exceeds C{disk_size}.

        @param size: the bytes of its file (0 for a marker).
        @return: the files no longer named (the caller unlinks them).
        """
        try:
            stale, evicted = insertRow(self._db, item, relative, offset, size, self.clock.seconds(), self.capacity)
        except sqlite3.Error as e:
            self.problem("storing", e)
            return [relative] if relative is not None else []
        self.counters.stored["disk"] += size
        self.counters.evicted["disk"] += evicted
        return stale

    def update(self, entry: Entry) -> bool:
        """Replace an entry's metadata (a 304 freshened it)."""
        try:
            with transaction(self._db):
                cursor = self._db.execute(
                    "UPDATE objects SET meta = ?, atime = ? WHERE key = ?",
                    (encodeMeta(entry), self.clock.seconds(), entry.key),
                )
                if entry.tags:
                    self._db.execute("DELETE FROM tags WHERE key = ?", (entry.key,))
                    self._db.executemany(
                        "INSERT OR IGNORE INTO tags (tag, key) VALUES (?, ?)",
                        [(tag, entry.key) for tag in entry.tags],
                    )
            return cursor.rowcount > 0
        except sqlite3.Error as e:
            self.problem("updating", e)
            return False

    def unlink(self, files: Iterable[str]) -> None:
        """Remove doomed files, which the index no longer names (in a
        thread)."""
        doomed = list(files)
        if doomed:
            self.blocking.run(unlinkDoomed, self.directory, doomed).addErrback(
                lambda failure: log.failure("removing cache files failed", failure)
            )

    def _delete(self, keys: list[bytes]) -> list[str]:
        files: list[str] = []
        try:
            with transaction(self._db):
                for key in keys:
                    row = self._db.execute("SELECT file FROM objects WHERE key = ?", (key,)).fetchone()
                    if row is None:
                        continue
                    if row[0] is not None:
                        files.append(row[0])
                    self._db.execute("DELETE FROM objects WHERE key = ?", (key,))
                doom(self._db, files)
        except sqlite3.Error as e:
            self.problem("removing", e)
            return []
        return files

    def remove(self, key: bytes) -> bool:
        try:
            found = self._db.execute("SELECT 1 FROM objects WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as e:
            self.problem("looking up", e)
            return False
        if found is None:
            return False
        self.unlink(self._delete([key]))
        return True

    # Purging ---------------------------------------------------------------

    def keysForURL(self, url: bytes) -> list[bytes]:
        return self._keys("SELECT key FROM objects WHERE url = ?", (url,))

    def keysForPrefix(self, prefix: bytes) -> list[bytes]:
        return self._keys(
            "SELECT key FROM objects WHERE url >= ? AND url < ?", (prefix, prefix + b"\xff" * 8)
        )

    def keysForTag(self, tag: bytes) -> list[bytes]:
        return self._keys("SELECT key FROM tags WHERE tag = ?", (tag,))

    def _keys(self, query: str, arguments: tuple[Any, ...]) -> list[bytes]:
        try:
            return [row[0] for row in self._db.execute(query, arguments).fetchall()]
        except sqlite3.Error as e:
            self.problem("purging", e)
            return []

    def purge(self, keys: list[bytes], soft: bool, expire: Callable[[Entry], Entry]) -> int:
        """
        Remove the objects of C{keys} (C{soft}: replace each entry's
        metadata by that of C{expire(entry)}).

        @return: how many entries were affected (markers not counted).
        """
        count = 0
        files: list[str] = []
        try:
            with transaction(self._db):
                for key in keys:
                    row = self._db.execute(
                        "SELECT file, offset, meta FROM objects WHERE key = ?", (key,)
                    ).fetchone()
                    if row is None:
                        continue
                    file, offset, meta = row
                    try:
                        item = decodeMeta(meta)
                    except ValueError:
                        item = None
                    if isinstance(item, Entry):
                        count += 1
                    if soft:
                        if isinstance(item, Entry):
                            self._db.execute(
                                "UPDATE objects SET meta = ? WHERE key = ?",
                                (encodeMeta(expire(item)), key),
                            )
                        continue
                    if file is not None:
                        files.append(file)
                    self._db.execute("DELETE FROM objects WHERE key = ?", (key,))
                doom(self._db, files)
        except sqlite3.Error as e:
            self.problem("purging", e)
            return 0
        self.unlink(files)
        return count

    # Collapsing ---------------------------------------------------------------

    def tryLock(self, key: bytes) -> bool:
        """
        Take the cross-process lock of C{key}'s slot without waiting: the
        process holding it is fetching that key for everyone.  Released by
        L{unlock}, or by the kernel when the process dies.

        @raise OSError: the C{locks} file cannot be locked (or the tier is
            closed): the caller collapses in this process only.
        """
        if self._locks < 0:
            raise OSError(errno.EBADF, "the cache disk tier is closed")
        slot = int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % LOCK_SLOTS
        try:
            fcntl.lockf(self._locks, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def unlock(self, key: bytes) -> None:
        if self._locks < 0:
            return
        slot = int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % LOCK_SLOTS
        try:
            fcntl.lockf(self._locks, fcntl.LOCK_UN, 1, slot)
        except OSError:
            pass

    # State -----------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """(bytes, objects) in the tier, as the index counts them."""
        try:
            row = self._db.execute("SELECT bytes, objects FROM totals WHERE id = 1").fetchone()
        except sqlite3.Error:
            return 0, 0
        return int(row[0]), int(row[1])

    def retain(self, capacity: int, maxObject: int) -> None:
        """
        One more holder (stores made by a reload that kept C{disk}), whose
        C{disk_size} and C{max_object_size} apply from now on: the
        directory is opened once per process, however many runtimes use it
        (closing a second descriptor of C{locks} would drop this process's
        locks taken through the first).
        """
        self.holders += 1
        self.capacity = capacity
        self.maxObject = min(maxObject, capacity)

    def close(self) -> None:
        """
        A holder lets go; the last one closes the tier: the uses still
        batched are written, the index and the C{locks} file closed.  What
        is asked of it afterwards (a request of a retired runtime that
        outlived its C{shutdown_timeout}) is a miss, quietly.
        """
        self.holders -= 1
        if self.holders > 0 or self.closed:
            return
        if self._touchTimer is not None and self._touchTimer.active():
            self._touchTimer.cancel()
        self._touchTimer = None
        self.flushTouches()
        self.closed = True
        self._db.close()
        closeConnections(self.directory)
        locks, self._locks = self._locks, -1
        try:
            os.close(locks)
        except OSError:
            pass

    def problem(self, what: str, error: Exception) -> None:
        """Log that C{what} failed (the request goes on without the tier)."""
        if self.closed:
            return
        # At most one line a minute: a full disk or a locked index would
        # otherwise write one per request.
        now = self.clock.seconds()
        if now - self._problemLogged >= 60.0:
            self._problemLogged = now
            log.warn(
                "cache disk tier {path}: {what} failed: {error} (the request goes on without it)",
                path=self.directory, what=what, error=str(error),
            )

