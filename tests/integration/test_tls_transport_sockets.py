"""
The server TLS transport (L{edgeproxy._compat.twisted.tls} with the fast
paths, Twisted's own without them) over real TCP sockets on 127.0.0.1, with
the real reactor, in a child process (C{python -m
tests.integration.test_tls_transport_sockets}) that prints what it saw as
JSON.

The in-memory tests (C{tests/test_tls_transport.py}) cannot reach the path
that sends TLS records straight to the socket (it only applies to a real
C{tcp.Server}), nor the kernel's partial writes, nor the pause of a
producer when a client stops reading; these transfers do.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60
BIG = 6 * 1024 * 1024 + 17


def _payload(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(range(size % 256))


def _run(directory: str, fast: bool) -> None:  # pragma: no cover - runs in the child process
    import socket
    import time

    from edgeproxy._compat import FastPaths, useFastPaths

    useFastPaths(FastPaths.on() if fast else FastPaths.off())

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, inlineCallbacks
    from twisted.internet.endpoints import (
        TCP4ClientEndpoint,
        TCP4ServerEndpoint,
        wrapClientTLS,
        wrapServerTLS,
    )
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.internet.task import deferLater
    from zope.interface import implementer
    from twisted.internet.interfaces import IPushProducer

    from edgeproxy.config.model import TLSSettings
    from edgeproxy.tls.store import CertificateStore

    from tests.certutil import CertificateAuthority

    root = Path(directory)
    ca = CertificateAuthority("socket test root")
    ca.issue(["a.example"]).writePEM(root / "a.pem")
    store = CertificateStore(
        TLSSettings(certificates=(str(root / "a.pem"),), default=str(root / "a.pem")), reactor
    )
    store.load()
    payload = _payload(BIG)
    servers: list[Any] = []

    @implementer(IPushProducer)
    class Streamer(Protocol):
        """Sends the payload 64 KiB at a time while not paused."""

        def connectionMade(self) -> None:
            # Small kernel buffers, so that what a stalled client leaves
            # unread is mostly what this process holds.
            self.transport.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            self.offset = 0
            self.paused = False
            self.pauses = 0
            servers.append(self)

        def dataReceived(self, data: bytes) -> None:
            self.transport.registerProducer(self, True)
            self.resumeProducing()

        def pauseProducing(self) -> None:
            self.paused = True
            self.pauses += 1

        def resumeProducing(self) -> None:
            self.paused = False
            while not self.paused and self.offset < len(payload):
                self.transport.write(payload[self.offset : self.offset + 65536])
                self.offset += 65536
            if self.offset >= len(payload) and self.transport is not None:
                self.transport.unregisterProducer()
                self.transport.loseConnection()

        def stopProducing(self) -> None:
            self.paused = True

    class Reader(Protocol):
        def __init__(self, stallAfter: int | None) -> None:
            self.data: list[bytes] = []
            self.received = 0
            self.stallAfter = stallAfter
            self.producedAtStall: int | None = None
            self.done: Deferred[bytes] = Deferred()

        def connectionMade(self) -> None:
            self.transport.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)

        def dataReceived(self, data: bytes) -> None:
            self.data.append(data)
            self.received += len(data)
            if self.stallAfter is not None and self.received >= self.stallAfter:
                self.stallAfter = None
                # A client that stops reading for a while: the server's
                # producer must be paused, not buffer the rest.
                self.transport.pauseProducing()
                reactor.callLater(1.0, self._resume)

        def _resume(self) -> None:
            self.producedAtStall = servers[-1].offset - self.received
            self.transport.resumeProducing()

        def connectionLost(self, reason: Any = None) -> None:
            self.done.callback(b"".join(self.data))

    @inlineCallbacks
    def main() -> Any:
        out: dict[str, Any] = {}
        port = yield wrapServerTLS(
            store.serverConnectionCreator([b"http/1.1"]),
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        ).listen(Factory.forProtocol(Streamer))
        creator = optionsForClientTLS("a.example", Certificate.loadPEM(ca.certificatePEM))
        for name, stall in (("fast", None), ("stalled", 1024 * 1024)):
            reader = Reader(stall)
            endpoint = wrapClientTLS(
                creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=5)
            )
            client = yield endpoint.connect(Factory.forProtocol(lambda: reader))
            client.transport.write(b"go")
            data = yield reader.done
            server = servers[-1]
            out[name] = {
                "length": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "transport": type(server.transport).__name__,
                "pauses": server.pauses,
                "aheadAtStall": reader.producedAtStall,
            }
        yield port.stopListening()
        yield deferLater(reactor, 0, lambda: None)
        print(json.dumps(out))

    def finish(result: Any) -> None:
        if hasattr(result, "getTraceback"):
            print(json.dumps({"error": result.getTraceback()}))
        reactor.stop()

    started = time.monotonic()
    reactor.callWhenRunning(lambda: main().addBoth(finish))
    reactor.callLater(TIMEOUT - 10, reactor.stop)
    reactor.run()
    assert time.monotonic() - started < TIMEOUT


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "public"])
def test_realSockets(tmp_path: Path, fast: bool) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_tls_transport_sockets", str(tmp_path), "fast" if fast else "public"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    assert lines, process.stdout + process.stderr
    out = json.loads(lines[-1])
    assert "error" not in out, out.get("error")
    digest = hashlib.sha256(_payload(BIG)).hexdigest()
    for name in ("fast", "stalled"):
        assert out[name]["length"] == BIG, out
        assert out[name]["sha256"] == digest, out
        assert out[name]["transport"] == ("EdgeTLSTransport" if fast else "BufferingTLSTransport"), out
    # The client that stopped reading paused the server's producer, and what
    # the server had produced beyond what the client read stayed within
    # socket buffers and one transport buffer (far below the 5 MiB left).
    assert out["stalled"]["pauses"] >= 1, out
    assert out["stalled"]["aheadAtStall"] < 1024 * 1024, out


if __name__ == "__main__":  # pragma: no cover
    _run(sys.argv[1], sys.argv[2] == "fast")
