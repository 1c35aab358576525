# -*- test-case-name: tests.test_cache_disk,tests.test_cache_diskrecover,tests.test_cache_operate -*-
"""
The object files of the disk tier (L{edgeproxy.cache.disk}): one file
per stored response, a header (L{MAGIC}, the metadata) then the body.

This module owns the header (L{objectHeader}, L{readObjectHeader}),
L{DiskWriter}, one object being written: to C{tmp/} under an C{flock}
held for as long as its writer lives, then synced, renamed into
C{objects/} and entered in the index, in that order (in a thread), so
the index never names a partly written file; and L{unlinkDoomed}, the
removal of the files the index let go of.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed

from edgeproxy.cache.blocking import Blocking
from edgeproxy.cache.diskindex import indexConnection, insertRow, transaction
from edgeproxy.cache.entry import Entry, Variants, decodeMeta, encodeMeta
from edgeproxy.collectors import CacheCounters

MAGIC = b"EPCACHE1"
"""The first bytes of every object file."""

_HEADER = struct.Struct(">8sI")


def objectHeader(head: Entry) -> bytes:
    """The header an object file whose metadata is C{head} starts with."""
    meta = encodeMeta(head._replace(length=-1))
    return _HEADER.pack(MAGIC, len(meta)) + meta


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


class _Tier(Protocol):
    """What a writer asks of its tier (a L{edgeproxy.cache.disk.DiskTier})."""

    directory: str
    capacity: int
    maxObject: int
    counters: CacheCounters
    blocking: Blocking
    clock: Any

    def problem(self, what: str, error: Exception) -> None: ...

    def unlink(self, files: list[str]) -> None: ...


class DiskWriter:
    """
    One object being written: its body arrives in pieces (L{write}), then
    L{finish} makes it durable and enters it in the index, or L{abort}
    drops it.  The file is never visible under C{objects/} before it is
    complete and synced.
    """

    def __init__(
        self,
        tier: _Tier,
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
            self.tier.problem("writing", e)
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
        done = tier.blocking.run(
            _commit, tier.directory, fd, self._temporary, self._final, stored, self._offset, size,
            tier.clock.seconds(), tier.capacity,
        )

        def committed(result: tuple[list[str], int]) -> Entry | None:
            stale, evicted = result
            tier.counters.stored["disk"] += size
            tier.counters.evicted["disk"] += evicted
            tier.unlink(stale)
            if self._final in stale:
                return None
            return stored

        def failed(failure: Any) -> None:
            tier.problem("storing", failure.value)
            unlinkAll([self._temporary])

        return done.addCallbacks(committed, failed)


def readWhole(path: str, offset: int, length: int) -> bytes | None:
    """The C{length} bytes of a file's body at C{offset}, or L{None} when
    the file is gone or shorter (replaced or evicted meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    return data if len(data) == length else None


def unlinkAll(paths: list[str]) -> None:
    """Remove these files (those already gone are not missed)."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def unlinkDoomed(directory: str, files: list[str]) -> None:
    """
    Remove the doomed C{files} (relative to C{directory}), then their names
    from C{doomed} (L{edgeproxy.cache.diskindex.doom}); in a thread.  A
    crash before the second step leaves names the start-up check clears.
    """
    unlinkAll([os.path.join(directory, file) for file in files])
    with indexConnection(directory) as db, transaction(db):
        db.executemany("DELETE FROM doomed WHERE file = ?", [(file,) for file in files])


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
    file.  Returns what L{insertRow} does: the old and evicted files, doomed,
    are the caller's to unlink (L{unlinkDoomed}).
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
        with indexConnection(directory) as db:
            return insertRow(db, entry, relative, offset, size, now, capacity)
    except sqlite3.Error:
        unlinkAll([final])
        raise

