"""
ACME in a worker of a supervisor (C{workers = N}): the worker never talks
to the CA.  The supervisor's control messages fill its challenge store
(C{acme-challenges}) and name the certificates to serve
(C{acme-certificates}), which the worker loads from C{[acme] storage} and
validates as it does every file before swapping them in; a handshake for a
new on-demand name asks the supervisor (C{acme-demand}) and waits for the
answer.  See L{edgeproxy.workers} for the messages.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from edgeproxy.acme.ondemand import WAIT
from edgeproxy.acme.storage import Storage
from edgeproxy.errors import CertificateError
from edgeproxy.tls.certs import CertificateEntry, loadEntry

__all__ = ["CertificateFollower", "applyCertificates", "askForCertificates", "followerOf"]

log = Logger(namespace="edgeproxy.acme.worker")


Signature = tuple[tuple[int, int, int], tuple[int, int, int]]
"""A stored certificate's two files as C{os.stat} saw them (inode, size,
modification time of the certificate, then of the key)."""


def _signature(certificatePath: str, keyPath: str) -> Signature:
    cert, key = os.stat(certificatePath), os.stat(keyPath)
    return (cert.st_ino, cert.st_size, cert.st_mtime_ns), (key.st_ino, key.st_size, key.st_mtime_ns)


@dataclass(frozen=True)
class _Read:
    """What one name's files gave: an entry, or why not."""

    name: str
    signature: Signature | None
    entry: CertificateEntry | None
    why: str | None = None
    again: bool = True
    """Whether the files were read (not the same as last time)."""


def _readStored(settings: Any, names: list[str], known: dict[str, tuple[Signature, CertificateEntry]],
                now: float) -> list[_Read]:
    """
    Read the stored certificates of C{names} (in a thread: files and
    parsing only, no logging, nothing of the reactor's), except those whose
    files are the ones C{known} says were read before.
    """
    storage = Storage(settings.storage, settings.directory)
    results = []
    for name in names:
        try:
            stored = storage.load(name)
            if stored is None:
                raise CertificateError("not in storage", file=storage.folder(name), section="acme", key="storage")
            signature = _signature(stored.certificatePath, stored.keyPath)
            previous = known.get(name)
            if previous is not None and previous[0] == signature:
                results.append(_Read(name, signature, previous[1], again=False))
                continue
            entry = replace(loadEntry(stored.certificatePath, stored.keyPath, now, section="acme", key="storage"),
                            source="acme")
        except (CertificateError, OSError, ValueError) as e:
            results.append(_Read(name, None, None, str(e)))
            continue
        results.append(_Read(name, signature, entry))
    return results


def _deferToThread(reactor: Any) -> Callable[..., Deferred[Any]]:
    from twisted.internet.threads import deferToThreadPool

    return lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)


class CertificateFollower:
    """
    Serve the stored ACME certificates the supervisor names
    (C{acme-certificates}), in place of the previous ones (one swap per
    message); one that cannot be loaded keeps what this process served for
    that name.

    Storage is read in a thread, so a worker serving thousands of names
    does not stop serving while it reads them, and only the names whose
    files changed since they were last read are read again: the supervisor
    names every certificate in every message (each issuance, each
    renewal).  A message that comes while a read is under way waits for it;
    of several such, only the last is read (each names all there is).
    """

    def __init__(self, service: Any, runInThread: Callable[..., Deferred[Any]] | None = None) -> None:
        self._service = service
        self._inThread = runInThread or _deferToThread(service._reactor)
        self._known: dict[str, tuple[Signature, CertificateEntry]] = {}
        self._reading: Deferred[None] | None = None
        self._next: list[str] | None = None
        self._settled: list[Deferred[None]] = []

    def follow(self, names: list[str]) -> None:
        """The supervisor serves the certificates of C{names} now."""
        if self._reading is not None:
            self._next = names
            return
        self._start(names)

    def followNow(self, names: list[str]) -> None:
        """L{follow}, reading storage at once: for a worker's initial state,
        read before its first connection is accepted (as the supervisor's
        manager reads storage at start)."""
        arguments = self._readArguments(names)
        if arguments is not None:
            self._apply(_readStored(*arguments))

    def settled(self) -> Deferred[None]:
        """Fires once no message is being read (at once when none is): a
        handshake that waited for a name's certificate goes on then."""
        waiter: Deferred[None] = Deferred()
        if self._reading is None:
            waiter.callback(None)
        else:
            self._settled.append(waiter)
        return waiter

    def _readArguments(self, names: list[str]) -> tuple[Any, list[str], dict[str, Any], float] | None:
        """What L{_readStored} reads C{names} with now; L{None} when this
        process serves no ACME certificates (no store, no C{[acme]})."""
        service = self._service
        settings = service.config.acme
        if getattr(service, "store", None) is None or settings is None:
            return None
        return settings, names, dict(self._known), service._reactor.seconds()

    def _start(self, names: list[str]) -> None:
        arguments = self._readArguments(names)
        if arguments is None:
            return
        reading = self._inThread(_readStored, *arguments)
        self._reading = reading
        reading.addCallback(self._apply)
        reading.addErrback(lambda failure: log.failure("ACME: reading the stored certificates failed", failure))
        reading.addBoth(self._done)

    def _done(self, _: object) -> None:
        self._reading = None
        names, self._next = self._next, None
        if names is not None:
            self._start(names)
        if self._reading is None:
            waiters, self._settled = self._settled, []
            for waiter in waiters:
                waiter.callback(None)

    def _apply(self, results: list[_Read]) -> None:
        store = self._service.store
        if store is None:
            return
        served = {entry.names[0] if entry.names else "": entry for entry in store.managed}
        entries: list[CertificateEntry] = []
        known: dict[str, tuple[Signature, CertificateEntry]] = {}
        for read in results:
            name = read.name
            previous = served.get(name)
            if read.entry is None or read.signature is None:
                log.warn("ACME: the certificate of {name} is not swapped in: {why}", name=name, why=read.why)
                if previous is not None:
                    entries.append(previous)
                continue
            entry = read.entry
            if previous is not None and previous.certificate == entry.certificate:
                entry = previous
            elif read.again:
                log.info("ACME: certificate for {name} swapped in, valid until {notAfter}",
                         name=name, notAfter=entry.notAfter.isoformat())
            entries.append(entry)
            known[name] = (read.signature, entry)
        self._known = known
        try:
            store.setManaged(entries)
        except Exception:
            log.failure("ACME: the certificates from the supervisor were refused; serving the previous ones")


def followerOf(service: Any) -> CertificateFollower:
    """The service's L{CertificateFollower} (made on first use)."""
    follower = getattr(service, "acmeFollower", None)
    if follower is None:
        follower = service.acmeFollower = CertificateFollower(service)
    return follower


def applyCertificates(service: Any, names: list[str]) -> None:
    """Follow the supervisor's C{acme-certificates} message (see
    L{CertificateFollower})."""
    followerOf(service).follow(names)


def askForCertificates(service: Any, channel: Any) -> None:
    """
    With on-demand certificates, make the worker's handshakes for new
    names wait for the supervisor's answer (which follows C{ask} and the
    rate limit at a reload).  Every reload of the worker turns the waits
    on or off as its C{on_demand} says (without it, handshakes are not held
    at all: no ClientHello is read before OpenSSL's).
    """

    def wait(name: str | None) -> Any:
        acme = service.config.acme
        store = service.store
        if not name or acme is None or not acme.on_demand or store is None:
            return None
        for entry in store.managed:
            if name in entry.names:
                return None
        # The supervisor answers after it sent the names with the new
        # certificate: the handshake goes on once they are read and served.
        asked = channel.ask("acme-demand", WAIT, name=name).addErrback(lambda _: None)
        return asked.addCallback(lambda _: followerOf(service).settled())

    def follow(config: Any) -> None:
        store = service.store
        if store is not None:
            store.onDemand = wait if config.acme is not None and config.acme.on_demand else None

    follow(service.config)
    service.configListeners.append(follow)
