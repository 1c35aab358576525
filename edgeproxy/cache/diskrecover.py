# -*- test-case-name: tests.test_cache_disk,tests.test_cache_diskrecover -*-
"""
The start-up check of a disk tier's directory (L{recoverDirectory}), run
by the one process that holds C{recover.lock}: it removes the temporary
files whose writer is gone and the doomed files whose unlinking a crash
cut short (their rows are gone: L{edgeproxy.cache.diskindex.doom}), drops
the index rows whose file is missing, and enters in the index any other
complete object file it does not name (from the header each file carries:
a crash between its rename and its index row), so that a crash leaves
nothing behind that the tier would serve wrongly (a purged response come
back) or never free.
"""

from __future__ import annotations

import fcntl
import os
import time

from twisted.logger import Logger

from edgeproxy.cache.diskindex import connect, transaction
from edgeproxy.cache.diskobjects import readObjectHeader, unlinkAll
from edgeproxy.cache.entry import Entry, encodeMeta

# The disk tier's namespace, as its other lines.
log = Logger(namespace="edgeproxy.cache.disk")

ORPHAN_AGE = 60.0
"""Seconds an object file must have existed before the start-up check
enters or removes it when the index does not name it (a younger one may be
between its rename and its index row in another process)."""


def recoverDirectory(directory: str, orphanAge: float = ORPHAN_AGE) -> dict[str, int]:
    """
    The start-up check of a disk tier's directory (see the module
    docstring), by the one process that gets C{recover.lock}; runs in a
    thread with its own connection to the index.

    @return: what it did (C{temporary}, C{doomed}, C{missing}, C{entered},
        C{removed} counts), or C{{}} when another process does it.
    """
    done = {"temporary": 0, "doomed": 0, "missing": 0, "entered": 0, "removed": 0}
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
        db = connect(os.path.join(directory, "index.sqlite"))
        try:
            doomed = [row[0] for row in db.execute("SELECT file FROM doomed")]
            if doomed:
                unlinkAll([os.path.join(directory, file) for file in doomed])
                with transaction(db):
                    db.executemany("DELETE FROM doomed WHERE file = ?", [(file,) for file in doomed])
                done["doomed"] = len(doomed)
            named = {}
            for key, file in db.execute("SELECT key, file FROM objects WHERE file IS NOT NULL"):
                named[file] = key
            missing = [(named[file], file) for file in named if not os.path.exists(os.path.join(directory, file))]
            if missing:
                with transaction(db):
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
                        unlinkAll([path])
                        done["removed"] += 1
                        continue
                    if not isinstance(item, Entry):
                        unlinkAll([path])
                        done["removed"] += 1
                        continue
                    entry = item._replace(length=length)
                    with transaction(db):
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
                        unlinkAll([path])
                        done["removed"] += 1
        finally:
            db.close()
        if any(done.values()):
            log.info(
                "cache directory {path} checked: {temporary} unfinished file(s) removed,"
                " {doomed} purged or evicted file(s) removed,"
                " {missing} index row(s) without a file dropped, {entered} object(s) entered,"
                " {removed} unusable file(s) removed",
                path=directory, **done,
            )
        return done
    finally:
        os.close(lock)
