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

from dataclasses import replace
from typing import Any

from twisted.logger import Logger

from edgeproxy.acme.ondemand import WAIT
from edgeproxy.acme.storage import Storage
from edgeproxy.errors import CertificateError
from edgeproxy.tls.certs import CertificateEntry, loadEntry

__all__ = ["applyCertificates", "askForCertificates"]

log = Logger(namespace="edgeproxy.acme.worker")


def applyCertificates(service: Any, names: list[str]) -> None:
    """Serve the stored ACME certificates of C{names}, in place of the
    previous ones (one swap); one that cannot be loaded keeps what this
    process served for that name."""
    store = getattr(service, "store", None)
    settings = service.config.acme
    if store is None or settings is None:
        return
    storage = Storage(settings.storage, settings.directory)
    served = {entry.names[0] if entry.names else "": entry for entry in store.managed}
    entries: list[CertificateEntry] = []
    now = service._reactor.seconds()
    for name in names:
        try:
            stored = storage.load(name)
            if stored is None:
                raise CertificateError("not in storage", file=storage.folder(name), section="acme", key="storage")
            entry = replace(loadEntry(stored.certificatePath, stored.keyPath, now, section="acme", key="storage"),
                            source="acme")
        except (CertificateError, OSError, ValueError) as e:
            log.warn("ACME: the certificate of {name} is not swapped in: {why}", name=name, why=str(e))
            previous = served.get(name)
            if previous is not None:
                entries.append(previous)
            continue
        previous = served.get(name)
        if previous is not None and previous.certificate == entry.certificate:
            entries.append(previous)
        else:
            entries.append(entry)
            log.info("ACME: certificate for {name} swapped in, valid until {notAfter}",
                     name=name, notAfter=entry.notAfter.isoformat())
    try:
        store.setManaged(entries)
    except Exception:
        log.failure("ACME: the certificates from the supervisor were refused; serving the previous ones")


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
        return channel.ask("acme-demand", WAIT, name=name).addErrback(lambda _: None)

    def follow(config: Any) -> None:
        store = service.store
        if store is not None:
            store.onDemand = wait if config.acme is not None and config.acme.on_demand else None

    follow(service.config)
    service.configListeners.append(follow)
