"""
L{edgeproxy.upstream.client} over real TCP sockets on 127.0.0.1, with the
real reactor, in a child process (C{python -m
tests.integration.test_client_sockets}) that prints what it saw as JSON.

The in-memory tests (C{tests/test_client.py}) cannot reach the path that
sends a request head straight to the socket (it only applies to a real
C{tcp.Client}), nor the kernel's partial writes; these requests do, sent
with C{send} and a receiver as the pool sends them, over the
C{LeanClient} connections the pools dial with.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60
BIG = 3 * 1024 * 1024 + 17


def _run() -> None:  # pragma: no cover - runs in the child process
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, inlineCallbacks
    from twisted.internet.endpoints import HostnameEndpoint
    from twisted.internet.protocol import Protocol
    from twisted.web.client import FileBodyProducer
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from io import BytesIO

    import gc

    from edgeproxy._compat.twisted.tcp import LeanClient, connectingLean
    from edgeproxy.config.model import Server
    from edgeproxy.h1 import Fields
    from edgeproxy.upstream.backend import Backend
    from edgeproxy.upstream.client import UpstreamClient

    connections: list[int] = [0]

    class Origin(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            if request.path == b"/big":
                return b"b" * BIG
            return b"small " + request.uri

        def render_POST(self, request: Any) -> bytes:
            body = request.content.read()
            return json.dumps(
                {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            ).encode()

    class CountingSite(Site):
        def buildProtocol(self, addr: Any) -> Any:
            connections[0] += 1
            return super().buildProtocol(addr)

    port = reactor.listenTCP(0, CountingSite(Origin()), interface="127.0.0.1")
    origin = port.getHost().port

    backend = Backend(Server("127.0.0.1", origin), "127.0.0.1", origin)

    class Endpoints:
        def endpointFor(self, backend: Backend) -> Any:
            # The reactor as edgeproxy.upstream.dialing gives it to the
            # endpoints: its connections are LeanClients.
            return HostnameEndpoint(connectingLean(reactor), backend.host, backend.port, timeout=5)

    client = UpstreamClient(reactor, Endpoints(), maxPersistentPerHost=4, cachedConnectionTimeout=30)

    class Receiver:
        def __init__(self) -> None:
            self.done: Deferred[Any] = Deferred()

        def upstreamInterim(self, status: int, reason: bytes, fields: Fields) -> None:
            pass

        def upstreamResponded(self, response: Any) -> None:
            self.done.callback(response)

        def upstreamFailed(self, failure: Any) -> None:
            self.done.errback(failure)

    class Collect(Protocol):
        def __init__(self) -> None:
            self.data = []
            self.done: Deferred[bytes] = Deferred()

        def dataReceived(self, data: bytes) -> None:
            self.data.append(data)

        def connectionLost(self, reason: Any = None) -> None:
            self.done.callback(b"".join(self.data))

    @inlineCallbacks
    def fetch(method: bytes, path: bytes, body: Any = None) -> Any:
        receiver = Receiver()
        client.send(backend, method, path, Fields([(b"host", b"origin.test")]), body, receiver)
        response = yield receiver.done
        collect = Collect()
        response.deliverBody(collect)
        data = yield collect.done
        return response.status, data

    @inlineCallbacks
    def main() -> Any:
        out: dict[str, Any] = {}
        smalls = []
        for i in range(20):
            code, data = yield fetch(b"GET", b"/small?%d" % i)
            smalls.append([code, data.decode()])
        out["small"] = smalls
        out["connectionsAfterSmall"] = connections[0]
        out["leanClients"] = sum(type(o) is LeanClient for o in gc.get_objects())
        code, data = yield fetch(b"GET", b"/big")
        out["big"] = [code, len(data), hashlib.sha256(data).hexdigest()]
        upload = bytes(range(256)) * 4096  # 1 MiB
        code, data = yield fetch(b"POST", b"/up", FileBodyProducer(BytesIO(upload)))
        out["upload"] = [code, json.loads(data), hashlib.sha256(upload).hexdigest()]

        class Unknown(FileBodyProducer):
            pass

        chunked = Unknown(BytesIO(upload))
        from twisted.web.iweb import UNKNOWN_LENGTH

        chunked.length = UNKNOWN_LENGTH
        code, data = yield fetch(b"POST", b"/up", chunked)
        out["chunkedUpload"] = [code, json.loads(data)]
        out["connections"] = connections[0]
        yield client.closeCachedConnections()
        print(json.dumps(out))

    def finish(result: Any) -> None:
        if hasattr(result, "getTraceback"):
            print(json.dumps({"error": result.getTraceback()}))
        reactor.stop()

    reactor.callWhenRunning(lambda: main().addBoth(finish))
    reactor.callLater(TIMEOUT - 10, reactor.stop)
    reactor.run()


def test_realSockets() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_client_sockets"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    assert lines, process.stdout + process.stderr
    out = json.loads(lines[-1])
    assert "error" not in out, out.get("error")
    assert out["small"] == [[200, f"small /small?{i}"] for i in range(20)]
    # Twenty requests in a row on one kept-alive connection.
    assert out["connectionsAfterSmall"] == 1
    assert out["leanClients"] == 1
    assert out["big"] == [200, BIG, hashlib.sha256(b"b" * BIG).hexdigest()]
    code, summary, digest = out["upload"]
    assert code == 200 and summary == {"length": 1024 * 1024, "sha256": digest}
    assert out["chunkedUpload"] == [200, {"length": 1024 * 1024, "sha256": digest}]
    assert out["connections"] == 1


if __name__ == "__main__":
    _run()
