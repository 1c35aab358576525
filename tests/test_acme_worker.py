"""
A worker's on-demand certificates (L{edgeproxy.acme.worker}): a worker of
a supervisor orders nothing itself; a handshake for a name it has no
certificate for waits for the supervisor's answer, asked on the control
channel, when and only when its configuration says C{on_demand = yes},
and a reload of the worker follows the key either way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock, StringTransport

from edgeproxy.acme.worker import askForCertificates
from edgeproxy.config import load
from edgeproxy.serve.service import EdgeService
from edgeproxy.workers import ControlChannel

from .certutil import CertificateAuthority
from .tlsutil import InsecureClientCreator, connectTLS

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
