"""
End-to-end WebSocket tests over real sockets on 127.0.0.1.

A harness process (C{python -m tests.integration.test_websocket DIR}) runs a
small RFC 6455 echo origin (written here: no WebSocket library is a
dependency), once plain and once behind TLS, and a real L{ListenerFactory} on a TLS
listener in front of them.  The tests are blocking clients with their own
small RFC 6455 client (masking, 7/16/64-bit lengths), so what they assert is
what a browser would see on the wire; what the origin saw is read from its
JSON records, what the proxy logged from its JSON access log.

Origin paths: C{/echo} echoes every data frame (and answers a close frame
with a close frame, then hangs up); C{/bye} sends C{bye} and hangs up;
C{/quiet} never sends anything; C{/stalled} stops reading; C{/forbidden} refuses the handshake with a
403; anything without C{Upgrade: websocket} gets a plain C{200 plain}.
Every request head and every lost connection is recorded with the
C{X-Test-Id} the client sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IDLE_TIMEOUT = 1.0
"""The idle timeout of the C{idle.test} route's upstream."""
STALL = 3.0
"""Seconds the C{/stalled} origin stops reading."""

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


# RFC 6455 framing, shared by the origin and the test client --------------


def acceptFor(key: bytes) -> bytes:
    """RFC 6455 §4.2.2: the Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def _masked(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def encodeFrame(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One final frame; clients must mask (RFC 6455 §5.3), servers must not."""
    head = bytes([0x80 | opcode])
    maskBit = 0x80 if mask else 0
    length = len(payload)
    if length < 126:
        head += bytes([maskBit | length])
    elif length < 1 << 16:
        head += bytes([maskBit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([maskBit | 127]) + struct.pack("!Q", length)
    if mask:
        key = os.urandom(4)
        return head + key + _masked(payload, key)
    return head + payload


class FrameReader:
    """Bytes in, (opcode, payload, masked) out; frames may span reads."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes, bool]]:
        self.buffer += data
        frames = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> tuple[int, bytes, bool] | None:
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        opcode, masked, length = buffer[0] & 0x0F, bool(buffer[1] & 0x80), buffer[1] & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack("!H", buffer[2:4])
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack("!Q", buffer[2:10])
            offset = 10
        keyLength = 4 if masked else 0
        if len(buffer) < offset + keyLength + length:
            return None
        key = buffer[offset : offset + keyLength]
        payload = buffer[offset + keyLength : offset + keyLength + length]
        self.buffer = buffer[offset + keyLength + length :]
        return opcode, _masked(payload, key) if masked else payload, masked


# The origin and the harness (run in the harness process) --------------------


def _originFactory(directory: Path) -> Any:
    from twisted.internet.protocol import Factory, Protocol

    records = directory / "records.jsonl"

    def record(**fields: Any) -> None:
        with records.open("a") as f:
            f.write(json.dumps(fields) + "\n")

    class Origin(Protocol):
        def __init__(self) -> None:
            self.head = b""
            self.frames: FrameReader | None = None
            self.testId = ""
            self.path = ""

        def dataReceived(self, data: bytes) -> None:
            if self.frames is not None:
                self.framesReceived(self.frames.feed(data))
                return
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, rest = self.head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            self.path = lines[0].split(" ")[1]
            fields = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
            values = {name.lower(): value for name, value in fields}
            self.testId = values.get("x-test-id", "")
            record(event="request", id=self.testId, requestLine=lines[0], headers=fields)
            if values.get("upgrade", "").lower() != "websocket":
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nplain"
                )
                self.transport.loseConnection()
                return
            if self.path == "/forbidden":
                body = b"no websockets for you"
                self.transport.write(
                    b"HTTP/1.1 403 Forbidden\r\nServer: origin/1.0\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                self.transport.loseConnection()
                return
            accept = acceptFor(values["sec-websocket-key"].encode("ascii"))
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Server: origin/1.0\r\nX-Powered-By: hopes\r\nSec-WebSocket-Accept: " + accept
                + b"\r\nSec-WebSocket-Protocol: echo\r\n\r\n"
            )
            self.frames = FrameReader()
            if self.path == "/stalled":
                # Stops reading for a while: the proxy must stop reading the
                # client meanwhile.  Then it drains what was sent.
                from twisted.internet import reactor

                self.transport.pauseProducing()
                reactor.callLater(STALL, self.transport.resumeProducing)
                self.path = "/quiet"
                return
            if self.path == "/bye":
                self.transport.write(encodeFrame(TEXT, b"bye", mask=False))
                self.transport.loseConnection()
                return
            if rest:
                self.framesReceived(self.frames.feed(rest))

        def framesReceived(self, frames: list[tuple[int, bytes, bool]]) -> None:
            for opcode, payload, masked in frames:
                if not masked:
                    # RFC 6455 §5.1: an unmasked client frame fails the
                    # connection; the proxy must pass masking through as is.
                    record(event="unmasked", id=self.testId)
                    self.transport.loseConnection()
                    return
                if self.path == "/quiet":
                    continue
                if opcode == CLOSE:
                    self.transport.write(encodeFrame(CLOSE, payload, mask=False))
                    self.transport.loseConnection()
                    return
                if opcode == PING:
                    self.transport.write(encodeFrame(PONG, payload, mask=False))
                else:
                    self.transport.write(encodeFrame(opcode, payload, mask=False))

        def connectionLost(self, reason: Any = None) -> None:
            record(event="closed", id=self.testId, path=self.path)

    return Factory.forProtocol(Origin)


def runHarness(directory: Path) -> None:
    from OpenSSL import crypto
    from twisted.internet import reactor
    from twisted.internet.ssl import CertificateOptions
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from edgeproxy.accesslog import AccessLog
    from edgeproxy.config.model import (
        AccessLogFormat,
        Config,
        Limits,
        Listener,
        ProxySettings,
        Route,
        Server,
        Upstream,
    )
    from edgeproxy.http.listener import ListenerFactory
    from edgeproxy.runtime import Runtime
    from tests.certutil import CertificateAuthority

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])

    def serverOptions(issued: Any) -> CertificateOptions:
        return CertificateOptions(
            privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, issued.keyPEM),
            certificate=crypto.load_certificate(crypto.FILETYPE_PEM, issued.certificatePEM),
            # The proxy offers ALPN http/1.1 to backends; a Twisted server
            # with no ALPN list answers an ALPN offer with internal_error.
            acceptableProtocols=[b"http/1.1"],
        )

    backendCA = CertificateAuthority("websocket backend CA")
    edgeCA = CertificateAuthority("websocket edge CA")
    (directory / "backend-ca.pem").write_bytes(backendCA.certificatePEM)
    (directory / "edge-ca.pem").write_bytes(edgeCA.certificatePEM)
    origin = _originFactory(directory)
    plain = reactor.listenTCP(0, origin, interface="127.0.0.1")
    secure = reactor.listenSSL(
        0, origin, serverOptions(backendCA.issue(["backend.test", "127.0.0.1"])), interface="127.0.0.1"
    )

    def upstream(name: str, port: int, **kw: Any) -> Upstream:
        settings: dict[str, Any] = dict(connect_timeout=2.0, response_timeout=3.0, idle_timeout=30.0)
        settings.update(kw)
        return Upstream(name=name, servers=(Server("127.0.0.1", port),), **settings)

    upstreams = {
        "ws": upstream("ws", plain.getHost().port),
        "wss": upstream(
            "wss", secure.getHost().port, tls=True, ca=str(directory / "backend-ca.pem")
        ),
        "idle": upstream("idle", plain.getHost().port, idle_timeout=IDLE_TIMEOUT),
    }
    routes = (
        Route(name="ws", hosts=("ws.test",), paths=("/",), upstream="ws"),
        Route(name="wss", hosts=("wss.test",), paths=("/",), upstream="wss"),
        Route(name="idle", hosts=("idle.test",), paths=("/",), upstream="idle"),
        Route(name="nows", hosts=("nows.test",), paths=("/",), upstream="ws", websocket=False),
    )
    limits = Limits(client_idle_timeout=30.0)
    listener = Listener(name="tls", endpoint="tcp:0", tls=True, http2=False, limits=limits)
    settings = ProxySettings(
        access_log=str(directory / "access.jsonl"),
        access_log_format=AccessLogFormat.JSON,
        limits=limits,
    )
    config = Config(
        path=str(directory / "edge.ini"),
        proxy=settings,
        tls=None,
        listeners=(listener,),
        upstreams=upstreams,
        routes=routes,
    )
    runtime = Runtime.build(config, reactor)
    site = ListenerFactory(lambda: runtime, listener, reactor, AccessLog.fromSettings(settings, reactor))
    edgeCert = edgeCA.issue(["ws.test", "wss.test", "idle.test", "nows.test"])
    proxy = reactor.listenSSL(0, site, serverOptions(edgeCert), interface="127.0.0.1")
    ports = {"proxy": proxy.getHost().port, "pid": os.getpid()}
    (directory / "ports.json.tmp").write_text(json.dumps(ports))
    (directory / "ports.json.tmp").rename(directory / "ports.json")
    reactor.run()


# The test side -------------------------------------------------------------


class Harness:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        ports = json.loads((directory / "ports.json").read_text())
        self.port = ports["proxy"]
        self.pid = ports["pid"]

    def rss(self) -> int:
        """Resident memory of the harness process (proxy and origins)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def records(self, **match: Any) -> list[dict[str, Any]]:
        path = self.directory / "records.jsonl"
        if not path.exists():
            return []
        found = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [r for r in found if all(r.get(k) == v for k, v in match.items())]

    def waitRecord(self, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.records(**match)
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no origin record matching {match}")

    def waitAccess(self, target: str, timeout: float = 5.0) -> dict[str, Any]:
        path = self.directory / "access.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                for line in path.read_text().splitlines():
                    entry = json.loads(line)
                    if entry.get("target") == target:
                        return entry
            time.sleep(0.02)
        raise AssertionError(f"no access log line for {target}")

    def connect(self, host: str) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(self.directory / "edge-ca.pem"))
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        return context.wrap_socket(raw, server_hostname=host)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    directory = tmp_path_factory.mktemp("websocket")
    logPath = directory / "harness.log"
    with logPath.open("wb") as logFile:
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "tests.integration.test_websocket", str(directory)],
            cwd=str(ROOT),
            stdout=logFile,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 20
            while not (directory / "ports.json").exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "harness did not start:\n" + logPath.read_text(errors="replace")
                    )
                time.sleep(0.05)
            yield Harness(directory)
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            print(logPath.read_text(errors="replace")[-20000:])


class Client:
    """A blocking RFC 6455 client over the proxy's TLS listener."""

    def __init__(self, harness: Harness, host: str, path: str, early: bytes = b"",
                 headers: dict[str, str] | None = None) -> None:
        self.testId = uuid.uuid4().hex
        self.key = base64.b64encode(os.urandom(16))
        self.sock = harness.connect(host)
        fields = {
            "Host": host,
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": self.key.decode("ascii"),
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Protocol": "echo",
            "X-Test-Id": self.testId,
        }
        fields.update(headers or {})
        head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        self.sock.sendall(head.encode("latin-1") + b"\r\n" + early)
        self.reader = FrameReader()
        self.pending: list[tuple[int, bytes, bool]] = []
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed before a response head: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.statusLine = lines[0]
        self.status = int(lines[0].split(" ")[1])
        self.headers = [tuple(p.strip() for p in line.split(":", 1)) for line in lines[1:]]
        self.rest = rest
        self.reader.buffer = rest

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def send(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(encodeFrame(opcode, payload, mask=True))

    def receive(self) -> tuple[int, bytes]:
        self.pending.extend(self.reader.feed(b""))
        while not self.pending:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "connection closed while a frame was expected"
            self.pending.extend(self.reader.feed(chunk))
        opcode, payload, masked = self.pending.pop(0)
        assert not masked, "server frames are never masked (RFC 6455 §5.1)"
        return opcode, payload

    def readBody(self) -> bytes:
        data = self.rest
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def waitClosed(self, timeout: float) -> float:
        """@return: seconds until the proxy closed the connection."""
        started = time.monotonic()
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, ssl.SSLError):
            pass
        return time.monotonic() - started

    def close(self) -> None:
        self.sock.close()


def assertSwitched(client: Client) -> None:
    assert client.statusLine == "HTTP/1.1 101 Switching Protocols"
    assert client.header("Sec-WebSocket-Accept") == [acceptFor(client.key).decode("ascii")]
    assert client.header("Sec-WebSocket-Protocol") == ["echo"]
    assert [v.lower() for v in client.header("Upgrade")] == ["websocket"]
    assert [v.lower() for v in client.header("Connection")] == ["upgrade"]
    assert client.header("Server") == [] and client.header("X-Powered-By") == []
    assert client.header("Transfer-Encoding") == [] and client.header("Content-Length") == []


@pytest.mark.parametrize("host", ["ws.test", "wss.test"])
def test_echoTextAndOneMiBBinary(harness: Harness, host: str) -> None:
    client = Client(harness, host, "/echo?room=1")
    assertSwitched(client)
    record = harness.waitRecord(event="request", id=client.testId)
    assert record["requestLine"] == "GET /echo?room=1 HTTP/1.1"
    seen = {name.lower(): value for name, value in record["headers"]}
    assert seen["sec-websocket-key"] == client.key.decode("ascii")
    assert seen["upgrade"].lower() == "websocket"
    assert "upgrade" in seen["connection"].lower()
    assert seen["x-forwarded-for"] == "127.0.0.1"

    client.send(TEXT, "héllo".encode())
    assert client.receive() == (TEXT, "héllo".encode())
    big = os.urandom(1 << 20)
    client.send(BINARY, big)
    opcode, echoed = client.receive()
    assert opcode == BINARY and len(echoed) == len(big) and echoed == big
    client.send(PING, b"p")
    assert client.receive() == (PONG, b"p")

    # Polite close: close frame both ways, then the origin hangs up and the
    # proxy closes the client connection too.
    client.send(CLOSE, struct.pack("!H", 1000))
    assert client.receive() == (CLOSE, struct.pack("!H", 1000))
    assert client.waitClosed(TIMEOUT) < TIMEOUT
    client.close()
    entry = harness.waitAccess("/echo?room=1")
    assert entry["status"] == 101
    assert entry["bytes"] >= len(big)


def test_framesSentRightAfterTheHead(harness: Harness) -> None:
    """Frames pipelined before the 101 reach the origin, in order."""
    early = encodeFrame(TEXT, b"first", mask=True) + encodeFrame(TEXT, b"second", mask=True)
    client = Client(harness, "ws.test", "/echo", early=early)
    assertSwitched(client)
    assert client.receive() == (TEXT, b"first")
    assert client.receive() == (TEXT, b"second")
    client.close()


def test_stalledOriginStopsTheClient(harness: Harness) -> None:
    """
    Backpressure end to end: when the origin stops reading, the proxy stops
    reading the client (its sends block) instead of buffering the flood.
    The idle timeout then closes the client at once, and the origin once
    what was queued for it could be flushed.
    """
    client = Client(harness, "idle.test", "/stalled")
    assertSwitched(client)
    before = harness.rss()
    frame = encodeFrame(BINARY, os.urandom(1 << 20), mask=True)
    sent = [0]

    def flood() -> None:
        try:
            for _ in range(128):
                client.sock.sendall(frame)
                sent[0] += len(frame)
        except OSError:
            pass

    sender = threading.Thread(target=flood, daemon=True)
    started = time.monotonic()
    sender.start()
    sender.join(IDLE_TIMEOUT * 0.8)
    assert sender.is_alive(), "128 MiB went through a backend that reads nothing"
    assert sent[0] < 64 * len(frame)
    assert harness.rss() - before < 48 * 1024 * 1024
    # The proxy closes the client once idle (from then on it reads and
    # drops what the client still sends, so the sender gets unstuck)...
    sender.join(IDLE_TIMEOUT + 5)
    assert not sender.is_alive()
    assert client.waitClosed(TIMEOUT) < TIMEOUT
    assert time.monotonic() - started < IDLE_TIMEOUT + 5
    client.close()
    # ...and the origin when it reads again and the queue drains.
    harness.waitRecord(timeout=STALL + 5, event="closed", id=client.testId)


def test_clientCloseClosesOrigin(harness: Harness) -> None:
    client = Client(harness, "wss.test", "/echo")
    client.send(TEXT, b"x")
    assert client.receive() == (TEXT, b"x")
    # Hang up without a close frame (a browser tab killed).
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    harness.waitRecord(event="closed", id=client.testId)


def test_originCloseClosesClient(harness: Harness) -> None:
    client = Client(harness, "ws.test", "/bye")
    assertSwitched(client)
    assert client.receive() == (TEXT, b"bye")
    assert client.waitClosed(TIMEOUT) < TIMEOUT
    client.close()


def test_idleTimeoutClosesBoth(harness: Harness) -> None:
    client = Client(harness, "idle.test", "/quiet")
    assertSwitched(client)
    # /quiet never answers: the only traffic is this frame.
    client.send(TEXT, b"anyone?")
    waited = client.waitClosed(IDLE_TIMEOUT + 5)
    assert IDLE_TIMEOUT * 0.8 <= waited < IDLE_TIMEOUT + 3
    harness.waitRecord(event="closed", id=client.testId)
    client.close()


def test_originRefusalRelayed(harness: Harness) -> None:
    client = Client(harness, "ws.test", "/forbidden")
    assert client.status == 403
    assert client.header("Server") == []
    assert client.header("Content-Type") == ["text/plain"]
    assert [v.lower() for v in client.header("Connection")] == ["close"]
    assert client.readBody() == b"no websockets for you"
    client.close()


def test_h2cUpgradeNotForwarded(harness: Harness) -> None:
    client = Client(
        harness,
        "ws.test",
        "/plain",
        headers={
            "Upgrade": "h2c",
            "Connection": "Upgrade, HTTP2-Settings",
            "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
        },
    )
    assert client.status == 200
    record = harness.waitRecord(event="request", id=client.testId)
    names = {name.lower() for name, _ in record["headers"]}
    assert "upgrade" not in names and "http2-settings" not in names
    client.close()


@pytest.mark.parametrize(
    "headers, early",
    [
        ({"Connection": "keep-alive"}, b""),
        ({"Content-Length": "5"}, b"hello"),
    ],
    ids=["no-connection-upgrade", "with-body"],
)
def test_notAHandshakeNotTunnelled(
    harness: Harness, headers: dict[str, str], early: bytes
) -> None:
    """
    Upgrade: websocket without "Connection: upgrade", or on a request with a
    body, is an ordinary request: the backend sees no Upgrade and the body
    (if any) as a body, never as frames.
    """
    client = Client(harness, "ws.test", "/plain", early=early, headers=headers)
    assert client.status == 200
    record = harness.waitRecord(event="request", id=client.testId)
    assert "upgrade" not in {name.lower() for name, _ in record["headers"]}
    client.close()


def test_routeWithoutWebSocket(harness: Harness) -> None:
    client = Client(harness, "nows.test", "/echo")
    assert client.status != 101
    record = harness.waitRecord(event="request", id=client.testId)
    assert "upgrade" not in {name.lower() for name, _ in record["headers"]}
    client.close()


if __name__ == "__main__":
    runHarness(Path(sys.argv[1]))
