# -*- test-case-name: tests.test_acme_storage -*-
"""
What ACME keeps on disk, under C{[acme] storage}:

::

    STORAGE/
      accounts/DIRECTORY-ID/account.key     the account key (0600)
      accounts/DIRECTORY-ID/account.json    the account URL and contact
      certificates/DIRECTORY-ID/NAME/certificate.pem   leaf then chain
      certificates/DIRECTORY-ID/NAME/key.pem           its key (0600)
      certificates/DIRECTORY-ID/NAME/meta.json         issuer, order time, ARI
      locks/NAME.lock                       held while NAME is ordered

C{DIRECTORY-ID} is the directory URL's host and path (for example
C{acme-v02.api.letsencrypt.org-directory}), so a staging and a production
CA never mix their accounts or certificates.

Every file is written atomically (a temporary file in the same directory,
C{fsync}, C{rename}, C{fsync} of the directory): a reader, or a machine
sharing the directory, sees the old file or the new one, never half of
one.  The certificate is renamed into place after its key, so a reader
that finds a certificate matching no key retries later rather than serving
it (L{edgeproxy.tls.certs.loadEntry} refuses the pair).

Several machines may share C{STORAGE} on a shared filesystem: a POSIX
record lock (C{lockf}, which NFS supports) on C{locks/NAME.lock} keeps two
of them from ordering the same name at once; the one that did not get the
lock finds the new certificate in C{STORAGE} later.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Storage", "NameLock", "directoryId"]

_UNSAFE = re.compile(r"[^a-z0-9.-]+")


def directoryId(directory: str) -> str:
    """
    The folder name of a directory URL:
    C{https://acme-v02.api.letsencrypt.org/directory} ->
    C{acme-v02.api.letsencrypt.org-directory}.
    """
    parts = urlsplit(directory)
    text = (parts.netloc + parts.path).lower()
    return _UNSAFE.sub("-", text).strip("-.") or "directory"


def _checkName(name: str) -> str:
    # Names come from the configuration or from SNI (on demand): never let
    # one climb out of its folder.
    if not name or "/" in name or name.startswith(".") or _UNSAFE.sub("", name) != name:
        raise ValueError(f"not a storable name: {name!r}")
    return name


def writeAtomically(path: str, data: bytes, mode: int = 0o644) -> None:
    """
    Replace C{path} with C{data}: a temporary file beside it, written,
    flushed to disk, given C{mode}, renamed over C{path}, and the directory
    flushed so the rename survives a crash.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        # mkstemp creates the file 0600; a key never exists with wider bits.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    dirFd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirFd)
    finally:
        os.close(dirFd)


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    """The files of one stored certificate."""

    name: str
    certificatePath: str
    keyPath: str
    meta: dict[str, Any]


class NameLock:
    """
    The lock of one name, held while it is ordered.  C{lockf} locks belong
    to the process and are released when it dies, so a crashed machine
    leaves no stale lock behind.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; C{False} if someone else holds it."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        # Who holds it, for an operator looking at the shared directory.
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {int(time.time())}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


class Storage:
    """The C{[acme] storage} directory of one ACME directory URL."""

    def __init__(self, root: str, directory: str) -> None:
        self.root = root
        self.directory = directory
        self.directoryId = directoryId(directory)

    def prepare(self) -> None:
        """Create the directory (0700) if it is not there."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    # Account ----------------------------------------------------------------

    @property
    def accountFolder(self) -> str:
        return os.path.join(self.root, "accounts", self.directoryId)

    def loadAccount(self) -> tuple[bytes | None, dict[str, Any] | None]:
        """The account key (PEM) and its registration document, if stored."""
        key = _readOrNone(os.path.join(self.accountFolder, "account.key"))
        meta = _readOrNone(os.path.join(self.accountFolder, "account.json"))
        return key, (json.loads(meta) if meta else None)

    def saveAccountKey(self, keyPEM: bytes) -> None:
        writeAtomically(os.path.join(self.accountFolder, "account.key"), keyPEM, 0o600)

    def saveAccount(self, registration: dict[str, Any]) -> None:
        writeAtomically(
            os.path.join(self.accountFolder, "account.json"),
            json.dumps(registration, indent=1, sort_keys=True).encode("utf-8"),
        )

    # Certificates -----------------------------------------------------------

    def folder(self, name: str) -> str:
        return os.path.join(self.root, "certificates", self.directoryId, _checkName(name))

    def load(self, name: str) -> StoredCertificate | None:
        """The stored certificate of C{name}, if its files are there (not yet
        validated: L{edgeproxy.tls.certs.loadEntry} does that)."""
        folder = self.folder(name)
        certificatePath = os.path.join(folder, "certificate.pem")
        keyPath = os.path.join(folder, "key.pem")
        if not (os.path.isfile(certificatePath) and os.path.isfile(keyPath)):
            return None
        metaText = _readOrNone(os.path.join(folder, "meta.json"))
        try:
            meta = json.loads(metaText) if metaText else {}
        except ValueError:
            meta = {}
        return StoredCertificate(name, certificatePath, keyPath, meta)

    def save(self, name: str, certificatePEM: bytes, keyPEM: bytes, meta: dict[str, Any]) -> StoredCertificate:
        """Store a new certificate for C{name}: key first, then certificate."""
        folder = self.folder(name)
        writeAtomically(os.path.join(folder, "key.pem"), keyPEM, 0o600)
        writeAtomically(os.path.join(folder, "certificate.pem"), certificatePEM)
        self.saveMeta(name, meta)
        stored = self.load(name)
        assert stored is not None
        return stored

    def saveMeta(self, name: str, meta: dict[str, Any]) -> None:
        writeAtomically(
            os.path.join(self.folder(name), "meta.json"),
            json.dumps(meta, indent=1, sort_keys=True).encode("utf-8"),
        )

    def lock(self, name: str) -> NameLock:
        return NameLock(os.path.join(self.root, "locks", _checkName(name) + ".lock"))


def _readOrNone(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
