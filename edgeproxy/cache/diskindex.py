# -*- test-case-name: tests.test_cache_disk,tests.test_cache_diskrecover -*-
"""
The index of the disk tier (L{edgeproxy.cache.disk}): C{index.sqlite} in
its directory.

This module owns the schema (key -> file, size, last use, metadata; tags;
the totals, kept by triggers; the doomed files), how a connection to it is
opened (WAL, a short busy timeout; those of the threads kept in a pool per
directory, L{indexConnection}, closed with the tier, L{closeConnections}),
L{transaction}, and entering an object (L{insertRow}) with the eviction of
the least recently used past the tier's size.

A file leaves the index as I{doomed} (L{doom}): the transaction that drops
its row (a purge, an invalidation, a replacement, an eviction) names it in
C{doomed}, and the thread that unlinks it clears the name
(L{edgeproxy.cache.diskobjects.unlinkDoomed}).  A crash in between leaves
the name, and the start-up check unlinks the file instead of entering it
again as an object the index lost (which would bring a purged response
back).

Why SQLite for the index: it is in the standard library, its WAL lets every
worker read while one writes, a transaction makes "insert the new object,
remove the old, update the totals" one step that a crash cannot half do,
and its secondary indexes serve what the cache asks besides lookups (least
recently used first for eviction, a URL range for purge by prefix, the
objects of a tag).  LMDB would be faster per lookup but needs a fixed map
size and hand-made secondary indexes; files alone would need a scan to
evict or purge.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from edgeproxy.cache.entry import Entry, Variants, encodeMeta

BUSY_TIMEOUT = 0.2
"""Seconds a statement waits for another process's write transaction (they
take well under a millisecond; past this the operation is given up as a
miss, never a stalled reactor)."""

EVICT_TO = 0.95
"""Eviction frees space down to this fraction of C{disk_size}."""

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
CREATE TABLE IF NOT EXISTS doomed (
    file TEXT PRIMARY KEY
) WITHOUT ROWID;
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


def connect(path: str) -> sqlite3.Connection:
    """A connection to the index file C{path}, its schema made if need be."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # WAL with NORMAL: a commit is durable against a crash of the process
    # (not of the machine, where the last commits may be lost, but the index
    # stays consistent); no fsync per commit.
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(_SCHEMA)
    return db


class transaction:
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


def doom(db: sqlite3.Connection, files: list[str]) -> None:
    """Name C{files} as doomed (in the caller's transaction, the one that
    drops their rows)."""
    if files:
        db.executemany("INSERT OR IGNORE INTO doomed (file) VALUES (?)", [(file,) for file in files])


def insertRow(
    db: sqlite3.Connection,
    item: Entry | Variants,
    relative: str | None,
    offset: int,
    size: int,
    now: float,
    capacity: int,
) -> tuple[list[str], int]:
    """
    The index side of storing C{item} (see
    L{edgeproxy.cache.disk.DiskTier.insert}), on
    connection C{db}: (files no longer named, doomed, for the caller to
    unlink; bytes evicted).
    """
    meta = encodeMeta(item)
    tags = item.tags if isinstance(item, Entry) else ()
    stale: list[str] = []
    with transaction(db):
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
        doom(db, stale)
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
    with transaction(db):
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
        doom(db, files)
    return files, evicted


_pools: dict[str, list[Any]] = {}
"""Directory -> [tiers open on it, idle (inode, connection) pairs]."""
_poolsLock = threading.Lock()


def openConnections(directory: str) -> None:
    """A tier opened C{directory}: its threads' connections are pooled
    until L{closeConnections}."""
    with _poolsLock:
        _pools.setdefault(directory, [0, []])[0] += 1


def closeConnections(directory: str) -> None:
    """A tier on C{directory} closed: with the last one, so are the idle
    connections (one in use is closed when it is given back)."""
    with _poolsLock:
        pool = _pools.get(directory)
        if pool is None:
            return
        pool[0] -= 1
        if pool[0] > 0:
            return
        del _pools[directory]
    for _, db in pool[1]:
        db.close()


@contextmanager
def indexConnection(directory: str) -> Iterator[sqlite3.Connection]:
    """
    A connection to the index of C{directory} for the calling thread's
    work, taken from the pool of idle ones (opened when there is none) and
    given back afterwards: a connection is used by one thread at a time,
    and one to an index since moved aside is not used again.  Without an
    open tier on the directory, it is closed after use.
    """
    path = os.path.join(directory, "index.sqlite")
    inode = os.stat(path).st_ino
    db = None
    stale = []
    with _poolsLock:
        pool = _pools.get(directory)
        idle = [] if pool is None else pool[1]
        while idle and db is None:
            known, candidate = idle.pop()
            if known == inode:
                db = candidate
            else:
                stale.append(candidate)
    for old in stale:
        old.close()
    if db is None:
        db = connect(path)
    try:
        yield db
    finally:
        with _poolsLock:
            pool = _pools.get(directory)
            if pool is not None:
                pool[1].append((inode, db))
                db = None
        if db is not None:
            db.close()
