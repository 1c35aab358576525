"""
A worker's ACME certificates (L{edgeproxy.acme.worker}): a worker of a
supervisor orders nothing itself; a handshake for a name it has no
certificate for waits for the supervisor's answer, asked on the control
channel, when and only when its configuration says C{on_demand = yes},
and a reload of the worker follows the key either way.  The certificates
the supervisor names are read from storage in a thread, only those whose
files changed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from edgeproxy.acme.storage import Storage
from edgeproxy.acme.worker import CertificateFollower, applyCertificates, askForCertificates
from edgeproxy.config import load
from edgeproxy.serve.service import EdgeService
from edgeproxy.workers import ControlChannel, answer

from .certutil import CertificateAuthority
from .threadutil import HeldCalls
from .tlsutil import InsecureClientCreator, TLSConnection, connectTLS

INI = """\
[edgeproxy]
access_log = off

[tls]
certificates = {certs}
default = {certs}/default.pem

[listen:https]
endpoint = tcp:8443:interface=127.0.0.1
tls = yes

[upstream:app]
servers = 127.0.0.1:9

[route:app]
hosts = *
upstream = app

[acme]
storage = {storage}
{onDemand}
"""

ON = "on_demand = yes\nask = https://127.0.0.1:9/ask"


def writeConfig(tmp_path: Path, onDemand: bool) -> str:
    path = tmp_path / "edge.ini"
    path.write_text(
        INI.format(certs=tmp_path / "certs", storage=tmp_path / "acme", onDemand=ON if onDemand else "")
    )
    return str(path)


def demands(transport: StringTransport) -> list[str]:
    """The names the worker asked the supervisor for (C{acme-demand})."""
    messages = [json.loads(line) for line in transport.value().splitlines()]
    return [message["name"] for message in messages if message.get("op") == "acme-demand"]


def test_reloadTurnsTheWaitsOnAndOff(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "acme").mkdir()
    CertificateAuthority().issue(["localhost"]).writePEM(tmp_path / "certs" / "default.pem")
    path = writeConfig(tmp_path, onDemand=False)
    reactor = MemoryReactorClock()
    reactor.advance(time.time())
    service = EdgeService(load(path), reactor, installSignalHandlers=False, orderCertificates=False)
    channel = ControlChannel(lambda message: None, reactor, "supervisor")
    wire = StringTransport()
    channel.makeConnection(wire)
    askForCertificates(service, channel)
    assert service.store is not None

    def connect() -> bool:
        """Whether a handshake for a new name completed at once."""
        return connectTLS(service.store.serverConnectionCreator(), InsecureClientCreator("new.example")).established

    # Off: served the default certificate at once, nothing asked.
    assert connect()
    assert demands(wire) == []

    writeConfig(tmp_path, onDemand=True)
    service.reload()
    assert not connect()
    assert demands(wire) == ["new.example"]

    writeConfig(tmp_path, onDemand=False)
    service.reload()
    assert connect()
    assert demands(wire) == ["new.example"]


class Worker:
    """A worker's service (C{onDemand} as its configuration says), its
    control channel to the supervisor, and its ACME storage."""

    def __init__(self, tmp_path: Path, onDemand: bool = False) -> None:
        (tmp_path / "certs").mkdir()
        (tmp_path / "acme").mkdir()
        self.ca = CertificateAuthority()
        self.ca.issue(["localhost"]).writePEM(tmp_path / "certs" / "default.pem")
        self.reactor = MemoryReactorClock()
        self.reactor.advance(time.time())
        self.service = EdgeService(
            load(writeConfig(tmp_path, onDemand)), self.reactor, installSignalHandlers=False, orderCertificates=False
        )
        settings = self.service.config.acme
        self.storage = Storage(settings.storage, settings.directory)
        self.held = HeldCalls()
        self.service.acmeFollower = CertificateFollower(self.service, runInThread=self.held)
        self.channel = ControlChannel(lambda message: None, self.reactor, "supervisor")
        self.wire = StringTransport()
        self.channel.makeConnection(self.wire)
        askForCertificates(self.service, self.channel)

    def store(self, name: str) -> x509.Certificate:
        """Issue a certificate for C{name} and store it as the supervisor does."""
        issued = self.ca.issue([name])
        self.storage.save(name, issued.certificatePEM + issued.chainPEM, issued.keyPEM, {})
        return issued.certificate

    def connect(self, name: str) -> TLSConnection:
        return connectTLS(self.service.store.serverConnectionCreator(), InsecureClientCreator(name))


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The worker's warnings, as the log shows them."""
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "edgeproxy.acme.worker" and event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_storedCertificatesAreReadInAThread(tmp_path: Path) -> None:
    """
    The certificates the supervisor names are read from storage off the
    reactor: until that read is over the worker serves what it served (its
    default certificate for the new name), then the stored one.
    """
    worker = Worker(tmp_path)
    stored = worker.store("a.example")
    applyCertificates(worker.service, ["a.example"])
    assert len(worker.held.calls) == 1
    assert worker.connect("a.example").commonNames == ["localhost"]
    worker.held.releaseHeld()
    assert worker.connect("a.example").peerCertificate == stored


def test_onlyChangedFilesAreReadAgain(tmp_path: Path, warnings: list[str]) -> None:
    """
    Every message names every certificate; a renewed one is read and
    swapped in, one whose files are those read before is not read again
    (here its certificate file was overwritten in place with garbage of the
    same size and time, which a read would refuse with a warning).
    """
    worker = Worker(tmp_path)
    worker.store("a.example")
    unchanged = worker.store("b.example")
    applyCertificates(worker.service, ["a.example", "b.example"])
    worker.held.releaseHeld()
    assert warnings == []

    path = Path(worker.storage.folder("b.example")) / "certificate.pem"
    before = path.stat()
    path.write_bytes(b"x" * before.st_size)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    renewed = worker.store("a.example")

    applyCertificates(worker.service, ["a.example", "b.example"])
    worker.held.releaseHeld()
    assert worker.connect("a.example").peerCertificate == renewed
    assert worker.connect("b.example").peerCertificate == unchanged
    assert warnings == []


def test_messagesDuringAReadAreReadOnceAfterIt(tmp_path: Path) -> None:
    """
    Messages that come while storage is read wait for that read; of them
    only the last (which names everything) is read, once.
    """
    worker = Worker(tmp_path)
    certificates = {name: worker.store(name) for name in ("a.example", "b.example", "c.example")}
    applyCertificates(worker.service, ["a.example"])
    applyCertificates(worker.service, ["a.example", "b.example"])
    applyCertificates(worker.service, ["a.example", "b.example", "c.example"])
    assert len(worker.held.calls) == 1
    worker.held.releaseHeld()
    assert len(worker.held.calls) == 1
    worker.held.releaseHeld()
    assert worker.held.calls == []
    for name, certificate in certificates.items():
        assert worker.connect(name).peerCertificate == certificate


def test_onDemandHandshakeWaitsForTheCertificateToBeRead(tmp_path: Path) -> None:
    """
    A handshake for a new on-demand name waits for the supervisor's answer;
    the supervisor names the new certificate before it answers, and the
    handshake goes on once that certificate is read and served (not with
    the default one while storage is still being read).
    """
    worker = Worker(tmp_path, onDemand=True)
    connection = worker.connect("new.example")
    assert not connection.established
    [question] = [json.loads(line) for line in worker.wire.value().splitlines()]
    assert question["op"] == "acme-demand" and question["name"] == "new.example"

    stored = worker.store("new.example")
    applyCertificates(worker.service, ["new.example"])
    worker.channel.dataReceived(json.dumps(answer(question)).encode() + b"\n")
    connection.pump.flush()
    assert not connection.established

    worker.held.releaseHeld()
    connection.pump.flush()
    assert connection.established
    assert connection.peerCertificate == stored


def test_initialStateIsReadAtOnce(tmp_path: Path) -> None:
    """
    The certificates named in a starting worker's initial state are read
    before it accepts a connection, not in a thread after.
    """
    worker = Worker(tmp_path)
    stored = worker.store("a.example")
    worker.service.acmeFollower.followNow(["a.example"])
    assert worker.held.calls == []
    assert worker.connect("a.example").peerCertificate == stored
