# -*- test-case-name: tests.test_cache_disk -*-
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

Why SQLite for the index: it is in the standard library, its WAL lets every
worker read while one writes, a transaction makes "insert the new object,
remove the old, update the totals" one step that a crash cannot half do,
and its secondary indexes serve what the cache asks besides lookups (least
recently used first for eviction, a URL range for purge by prefix, the
objects of a tag).  LMDB would be faster per lookup but needs a fixed map
size and hand-made secondary indexes; files alone would need a scan to
evict or purge.

Crash safety: an object is written to C{tmp/} (under an C{flock} held for
as long as its writer lives), C{fsync}ed, renamed into C{objects/}, and
only then entered in the index, so the index never names a partly written
file.  At start one process (the holder of C{recover.lock}) removes the
temporary files whose writer is gone, index rows whose file is missing,
and enters in the index any complete object file it does not name (from
the header each file carries); a damaged index is moved aside and rebuilt
from the files the same way.

I/O: the index is read and written in the reactor's thread (a lookup or a
small transaction takes tens of microseconds; WAL commits do not C{fsync});
object bodies are written in pieces as they arrive (page cache), and what
blocks (C{fsync}, renames, unlinking many files, the start-up check) runs in
a thread (L{Blocking}).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from edgeproxy.cache.entry import Entry, Variants, decodeMeta, encodeMeta
from edgeproxy.metrics import CacheCounters

__all__ = ["MAGIC", "Blocking", "DiskTier", "DiskWriter", "InlineBlocking", "readObjectHeader"]

log = Logger()

MAGIC = b"EPCACHE1"
"""The first bytes of every object file."""

_HEADER = struct.Struct(">8sI")

TOUCH_DELAY = 2.0
"""Seconds between a use of a disk object and the write of its new last-use
time (uses are written in batches)."""

BUSY_TIMEOUT = 0.2
"""Seconds a statement waits for another process's write transaction (they
take well under a millisecond; past this the operation is given up as a
miss, never a stalled reactor)."""

EVICT_TO = 0.95
"""Eviction frees space down to this fraction of C{disk_size}."""

ORPHAN_AGE = 60.0
"""Seconds an object file must have existed before the start-up check
enters or removes it when the index does not name it (a younger one may be
between its rename and its index row in another process)."""

LOCK_SLOTS = 1 << 22
"""Byte offsets of the C{locks} file one key may lock (its slot)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    key BLOB PRIMARY KEY,
    url BLOB NOT NULL,
    file TEXT,
    offset INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    atime REAL NOT NULL,
    meta BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_by_atime ON objects(atime);
CREATE INDEX IF NOT EXISTS objects_by_url ON objects(url);
CREATE TABLE IF NOT EXISTS tags (
    tag BLOB NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (tag, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_by_key ON tags(key);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    bytes INTEGER NOT NULL,
    objects INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS objects_added AFTER INSERT ON objects BEGIN
    UPDATE totals SET bytes = bytes + NEW.size, objects = objects + 1 WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS objects_removed AFTER DELETE ON objects BEGIN
    UPDATE totals SET bytes = bytes - OLD.size, objects = objects - 1 WHERE id = 1;
    DELETE FROM tags WHERE key = OLD.key;
END;
CREATE TRIGGER IF NOT EXISTS objects_resized AFTER UPDATE OF size ON objects BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE id = 1;
END;
"""


class Blocking(Protocol):
    """Runs what blocks away from the reactor's thread."""

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]: ...


class InlineBlocking:
    """Runs it at once, in the caller's thread (tests; the memory reactor)."""

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        try:
            return succeed(function(*args))
        except Exception as e:
            failed: Deferred[Any] = Deferred()
            failed.errback(e)
            return failed


class ThreadBlocking:
    """Runs it in the reactor's thread pool."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), function, *args)


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # WAL with NORMAL: a commit is durable against a crash of the process
    # (not of the machine, where the last commits may be lost, but the index
    # stays consistent); no fsync per commit.
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    return db


def _keyDigest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def readObjectHeader(path: str) -> tuple[Entry | Variants, int, int]:
    """
    The metadata an object file starts with, the offset of its body and
    the body's length (what the file holds after the header).

    @raise ValueError: not an object file.
    @raise OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size:
            raise ValueError("short file")
        magic, length = _HEADER.unpack(head)
        if magic != MAGIC or length > 16 * 1024 * 1024:
            raise ValueError("not an object file")
        meta = f.read(length)
        if len(meta) != length:
            raise ValueError("short header")
        size = os.fstat(f.fileno()).st_size
    offset = _HEADER.size + length
    item = decodeMeta(meta, path, offset)
    return item, offset, size - offset


class DiskTier:
    """
    @ivar capacity: C{disk_size}, bytes.
    @ivar maxObject: the largest body stored.
    @ivar counters: where the bytes this process stores and evicts are
        counted.
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
        self._clock = clock
        self._blocking = blocking
        self._touched: dict[bytes, float] = {}
        self._touchTimer: Any = None
        self._problemLogged = 0.0
        self._serial = 0
        for sub in ("objects", "tmp"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)
        self._indexPath = os.path.join(directory, "index.sqlite")
        try:
            self._db = _connect(self._indexPath)
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
            self._db = _connect(self._indexPath)
        self._locks = os.open(os.path.join(directory, "locks"), os.O_RDWR | os.O_CREAT, 0o600)
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
            self._problem("looking up", e)
            return None
        if row is None:
            return None
        file, offset, meta = row
        try:
            item = decodeMeta(meta, None if file is None else os.path.join(self.directory, file), offset)
        except ValueError as e:
            self._problem("reading an index row", e)
            self._delete([key])
            return None
        self.touch(key)
        return item

    def readBody(self, entry: Entry) -> bytes | None:
        """
        The whole body of a disk entry (for small ones, promoted to
        memory), or L{None} when its file is gone (replaced or evicted by
        another process meanwhile; its index row goes when it still names
        that file).
        """
        assert entry.path is not None
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            self._forgetFile(entry.key, entry.path)
            return None
        try:
            data = os.pread(fd, entry.length, entry.offset)
        finally:
            os.close(fd)
        if len(data) != entry.length:
            self._forgetFile(entry.key, entry.path)
            return None
        return data

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
            self._problem("removing a row", e)

    def touch(self, key: bytes) -> None:
        """Record a use (written within L{TOUCH_DELAY}, in one batch)."""
        self._touched[key] = self._clock.seconds()
        if self._touchTimer is None:
            self._touchTimer = self._clock.callLater(TOUCH_DELAY, self.flushTouches)

    def flushTouches(self) -> None:
        self._touchTimer = None
        touched, self._touched = self._touched, {}
        if not touched:
            return
        try:
            with _transaction(self._db):
                self._db.executemany(
                    "UPDATE objects SET atime = ? WHERE key = ? AND atime < ?",
                    [(when, key, when) for key, when in touched.items()],
                )
        except sqlite3.Error as e:
            self._problem("recording uses", e)

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
            self._problem("creating a file", e)
            return None
        # Held for the writer's life: the start-up check leaves it alone.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        meta = encodeMeta(head._replace(length=-1))
        header = _HEADER.pack(MAGIC, len(meta)) + meta
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
            stale, evicted = _insert(self._db, item, relative, offset, size, self._clock.seconds(), self.capacity)
        except sqlite3.Error as e:
            self._problem("storing", e)
            return [relative] if relative is not None else []
        self.counters.stored["disk"] += size
        self.counters.evicted["disk"] += evicted
        return stale

    def update(self, entry: Entry) -> bool:
        """Replace an entry's metadata (a 304 freshened it)."""
        try:
            with _transaction(self._db):
                cursor = self._db.execute(
                    "UPDATE objects SET meta = ?, atime = ? WHERE key = ?",
                    (encodeMeta(entry), self._clock.seconds(), entry.key),
                )
                if entry.tags:
                    self._db.execute("DELETE FROM tags WHERE key = ?", (entry.key,))
                    self._db.executemany(
                        "INSERT OR IGNORE INTO tags (tag, key) VALUES (?, ?)",
                        [(tag, entry.key) for tag in entry.tags],
                    )
            return cursor.rowcount > 0
        except sqlite3.Error as e:
            self._problem("updating", e)
            return False

    def unlink(self, files: Iterable[str]) -> None:
        """Remove files the index no longer names (in a thread)."""
        paths = [os.path.join(self.directory, file) for file in files]
        if paths:
            self._blocking.run(_unlinkAll, paths).addErrback(
                lambda failure: log.failure("removing cache files failed", failure)
            )

    def _delete(self, keys: list[bytes]) -> list[str]:
        files: list[str] = []
        try:
            with _transaction(self._db):
                for key in keys:
                    row = self._db.execute("SELECT file FROM objects WHERE key = ?", (key,)).fetchone()
                    if row is None:
                        continue
                    if row[0] is not None:
                        files.append(row[0])
                    self._db.execute("DELETE FROM objects WHERE key = ?", (key,))
        except sqlite3.Error as e:
            self._problem("removing", e)
        return files

    def remove(self, key: bytes) -> bool:
        try:
            found = self._db.execute("SELECT 1 FROM objects WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as e:
            self._problem("looking up", e)
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
            self._problem("purging", e)
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
            with _transaction(self._db):
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
        except sqlite3.Error as e:
            self._problem("purging", e)
        self.unlink(files)
        return count

    # Collapsing ---------------------------------------------------------------

    def tryLock(self, key: bytes) -> bool:
        """
        Take the cross-process lock of C{key}'s slot without waiting: the
        process holding it is fetching that key for everyone.  Released by
        L{unlock}, or by the kernel when the process dies.
        """
        slot = int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % LOCK_SLOTS
        try:
            fcntl.lockf(self._locks, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def unlock(self, key: bytes) -> None:
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

    def close(self) -> None:
        if self._touchTimer is not None and self._touchTimer.active():
            self._touchTimer.cancel()
        self.flushTouches()
        self._db.close()
        try:
            os.close(self._locks)
        except OSError:
            pass

    def _problem(self, what: str, error: Exception) -> None:
        # At most one line a minute: a full disk or a locked index would
        # otherwise write one per request.
        now = self._clock.seconds()
        if now - self._problemLogged >= 60.0:
            self._problemLogged = now
            log.warn(
                "cache disk tier {path}: {what} failed: {error} (the request goes on without it)",
                path=self.directory, what=what, error=str(error),
            )


def _insert(
    db: sqlite3.Connection,
    item: Entry | Variants,
    relative: str | None,
    offset: int,
    size: int,
    now: float,
    capacity: int,
) -> tuple[list[str], int]:
    """
    The index side of storing C{item} (see L{DiskTier.insert}), on
    connection C{db}: (files no longer named, bytes evicted).
    """
    meta = encodeMeta(item)
    tags = item.tags if isinstance(item, Entry) else ()
    stale: list[str] = []
    with _transaction(db):
        old = db.execute("SELECT file FROM objects WHERE key = ?", (item.key,)).fetchone()
        if old is not None:
            if old[0] is not None and old[0] != relative:
                stale.append(old[0])
            db.execute("DELETE FROM objects WHERE key = ?", (item.key,))
        db.execute(
            "INSERT INTO objects (key, url, file, offset, size, atime, meta) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (item.key, item.url, relative, offset, size + len(meta), now, meta),
        )
        if tags:
            db.executemany(
                "INSERT OR IGNORE INTO tags (tag, key) VALUES (?, ?)", [(tag, item.key) for tag in tags]
            )
    evictedFiles, evicted = _evict(db, capacity)
    return stale + evictedFiles, evicted


def _evict(db: sqlite3.Connection, capacity: int) -> tuple[list[str], int]:
    """Remove the least recently used objects past C{capacity}: (their
    files, bytes freed)."""
    files: list[str] = []
    evicted = 0
    total = db.execute("SELECT bytes FROM totals WHERE id = 1").fetchone()[0]
    if total <= capacity:
        return files, evicted
    goal = int(capacity * EVICT_TO)
    with _transaction(db):
        total = db.execute("SELECT bytes FROM totals WHERE id = 1").fetchone()[0]
        while total > goal:
            rows = db.execute("SELECT key, file, size FROM objects ORDER BY atime LIMIT 64").fetchall()
            if not rows:
                break
            victims = []
            for key, file, size in rows:
                victims.append((key,))
                if file is not None:
                    files.append(file)
                total -= size
                evicted += size
                if total <= goal:
                    break
            db.executemany("DELETE FROM objects WHERE key = ?", victims)
    return files, evicted


_local = threading.local()


def _threadConnection(directory: str) -> sqlite3.Connection:
    """
    The index connection of the calling thread (one per thread and index
    file: a connection is never shared between threads, and one to an
    index since moved aside is not used again).
    """
    connections: dict[str, tuple[int, sqlite3.Connection]] | None = getattr(_local, "connections", None)
    if connections is None:
        connections = _local.connections = {}
    path = os.path.join(directory, "index.sqlite")
    inode = os.stat(path).st_ino
    found = connections.get(directory)
    if found is not None and found[0] == inode:
        return found[1]
    if found is not None:
        found[1].close()
    db = _connect(path)
    connections[directory] = (inode, db)
    return db


def _commit(
    directory: str,
    fd: int,
    temporary: str,
    relative: str,
    entry: Entry,
    offset: int,
    size: int,
    now: float,
    capacity: int,
) -> tuple[list[str], int]:
    """
    Make a written object durable and enter it in the index (in a thread:
    a process told to stop finishes it before it exits).  The file is
    synced, then renamed, then indexed: the index never names a partial
    file.  Returns what L{_insert} does, the old and evicted files removed.
    """
    final = os.path.join(directory, relative)
    try:
        os.fsync(fd)
    finally:
        # Closing releases the writer's flock: the file is complete.
        os.close(fd)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.rename(temporary, final)
    try:
        stale, evicted = _insert(_threadConnection(directory), entry, relative, offset, size, now, capacity)
    except sqlite3.Error:
        _unlinkAll([final])
        raise
    _unlinkAll([os.path.join(directory, file) for file in stale])
    return stale, evicted


class _transaction:
    """C{BEGIN IMMEDIATE} ... C{COMMIT} (or C{ROLLBACK} on an error)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self._db.execute("COMMIT")
        else:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass


class DiskWriter:
    """
    One object being written: its body arrives in pieces (L{write}), then
    L{finish} makes it durable and enters it in the index, or L{abort}
    drops it.  The file is never visible under C{objects/} before it is
    complete and synced.
    """

    def __init__(
        self,
        tier: DiskTier,
        fd: int,
        temporary: str,
        final: str,
        head: Entry,
        offset: int,
        header: bytes,
    ) -> None:
        self.tier = tier
        self.head = head
        self.written = 0
        self._fd: int | None = fd
        self._temporary = temporary
        self._final = final
        self._offset = offset
        self._write(header)

    def _write(self, data: bytes) -> bool:
        fd = self._fd
        if fd is None:
            return False
        try:
            view = memoryview(data)
            while view:
                done = os.write(fd, view)
                view = view[done:]
        except OSError as e:
            self.tier._problem("writing", e)
            self.abort()
            return False
        return True

    def write(self, data: bytes) -> bool:
        """
        Add a piece of the body.

        @return: whether the object is still being written (not past
            C{max_object_size}, no write error).
        """
        if self._fd is None:
            return False
        self.written += len(data)
        if self.written > self.tier.maxObject:
            self.abort()
            return False
        return self._write(data)

    def abort(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        os.close(fd)
        try:
            os.unlink(self._temporary)
        except OSError:
            pass

    def finish(self, entry: Entry) -> Deferred[Entry | None]:
        """
        The body is complete: sync and rename the file and enter C{entry}
        (the complete metadata) in the index, in a thread.

        @return: fires with the entry as the disk holds it, or L{None}
            when it could not be stored.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return succeed(None)
        tier = self.tier
        final = os.path.join(tier.directory, self._final)
        stored = entry._replace(body=None, path=final, offset=self._offset, length=self.written)
        size = self.written + self._offset
        done = tier._blocking.run(
            _commit, tier.directory, fd, self._temporary, self._final, stored, self._offset, size,
            tier._clock.seconds(), tier.capacity,
        )

        def committed(result: tuple[list[str], int]) -> Entry | None:
            stale, evicted = result
            tier.counters.stored["disk"] += size
            tier.counters.evicted["disk"] += evicted
            if self._final in stale:
                return None
            return stored

        def failed(failure: Any) -> None:
            tier._problem("storing", failure.value)
            _unlinkAll([self._temporary])

        return done.addCallbacks(committed, failed)


def _unlinkAll(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def recoverDirectory(directory: str, orphanAge: float = ORPHAN_AGE) -> dict[str, int]:
    """
    The start-up check of a disk tier's directory (see the module
    docstring), by the one process that gets C{recover.lock}; runs in a
    thread with its own connection to the index.

    @return: what it did (C{temporary}, C{missing}, C{entered},
        C{removed} counts), or C{{}} when another process does it.
    """
    done = {"temporary": 0, "missing": 0, "entered": 0, "removed": 0}
    lock = os.open(os.path.join(directory, "recover.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return {}
        tmp = os.path.join(directory, "tmp")
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer lives
            finally:
                os.close(fd)
            try:
                os.unlink(path)
                done["temporary"] += 1
            except OSError:
                pass
        db = _connect(os.path.join(directory, "index.sqlite"))
        try:
            named = {}
            for key, file in db.execute("SELECT key, file FROM objects WHERE file IS NOT NULL"):
                named[file] = key
            missing = [(named[file], file) for file in named if not os.path.exists(os.path.join(directory, file))]
            if missing:
                with _transaction(db):
                    db.executemany("DELETE FROM objects WHERE key = ? AND file = ?", missing)
                done["missing"] = len(missing)
            objects = os.path.join(directory, "objects")
            now = time.time()
            for sub in sorted(os.listdir(objects)):
                folder = os.path.join(objects, sub)
                if not os.path.isdir(folder):
                    continue
                for name in os.listdir(folder):
                    relative = os.path.join("objects", sub, name)
                    if relative in named:
                        continue
                    path = os.path.join(directory, relative)
                    try:
                        if now - os.stat(path).st_mtime < orphanAge:
                            continue
                        item, offset, length = readObjectHeader(path)
                    except (OSError, ValueError):
                        _unlinkAll([path])
                        done["removed"] += 1
                        continue
                    if not isinstance(item, Entry):
                        _unlinkAll([path])
                        done["removed"] += 1
                        continue
                    entry = item._replace(length=length)
                    with _transaction(db):
                        if db.execute("SELECT 1 FROM objects WHERE key = ?", (entry.key,)).fetchone():
                            # A newer copy is indexed: this one is garbage.
                            entered = False
                        else:
                            meta = encodeMeta(entry)
                            db.execute(
                                "INSERT INTO objects (key, url, file, offset, size, atime, meta)"
                                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (entry.key, entry.url, relative, offset, offset + length + len(meta),
                                 os.stat(path).st_mtime, meta),
                            )
                            db.executemany(
                                "INSERT OR IGNORE INTO tags (tag, key) VALUES (?, ?)",
                                [(tag, entry.key) for tag in entry.tags],
                            )
                            entered = True
                    if entered:
                        done["entered"] += 1
                    else:
                        _unlinkAll([path])
                        done["removed"] += 1
        finally:
            db.close()
        if any(done.values()):
            log.info(
                "cache directory {path} checked: {temporary} unfinished file(s) removed,"
                " {missing} index row(s) without a file dropped, {entered} object(s) entered,"
                " {removed} unusable file(s) removed",
                path=directory, **done,
            )
        return done
    finally:
        os.close(lock)
