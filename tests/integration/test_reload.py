"""
Whole-configuration reload and the drain, on the real C{twistd edgeproxy}
process: a route changed by C{SIGHUP} while a WebSocket, a slow download and
a kept-alive connection are open; a broken file that changes nothing; a
C{SIGTERM} that lets a download finish, closes a WebSocket at the deadline
and exits 0.

The backends are small threaded servers in this process that say who they
are in every answer.  Everything listens on 127.0.0.1 and every wait is
bounded.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.certutil import CertificateAuthority
from tests.proc import (
    startTwistd,
    NotifyReceiver,
    Twistd,
    freePort,
    refused,
    request,
    tlsConnection,
)

START_TIMEOUT = 30.0
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DOWNLOAD_CHUNKS = 30
DOWNLOAD_CHUNK = 32 * 1024
DOWNLOAD_PAUSE = 0.1
"""A download lasts DOWNLOAD_CHUNKS * DOWNLOAD_PAUSE = 3 seconds."""


class NamedBackend:
    """
    A threaded HTTP/1.1 origin that names itself in every answer:
    C{/download} streams C{DOWNLOAD_CHUNKS} chunks slowly (Content-Length),
    a WebSocket handshake gets 101 and then every byte echoed back,
    anything else C{backend NAME saw PATH} at once.  Connections are kept
    alive.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.downloadStarted = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._closed = False
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines[1:])
                }
                if headers.get("upgrade", "").lower() == "websocket":
                    accept = base64.b64encode(
                        hashlib.sha1(headers["sec-websocket-key"].encode() + GUID).digest()
                    )
                    conn.sendall(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                    )
                    if buffer:
                        conn.sendall(buffer)
                    while True:
                        data = conn.recv(65536)
                        if not data:
                            return
                        conn.sendall(data)
                if path.startswith("/download"):
                    self.downloadStarted.set()
                    total = DOWNLOAD_CHUNKS * DOWNLOAD_CHUNK
                    conn.sendall(
                        f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        f"X-Backend: {self.name}\r\nContent-Length: {total}\r\n\r\n".encode()
                    )
                    piece = self.name.encode()[:1] * DOWNLOAD_CHUNK
                    for _ in range(DOWNLOAD_CHUNKS):
                        time.sleep(DOWNLOAD_PAUSE)
                        conn.sendall(piece)
                    continue
                body = f"backend {self.name} saw {path}\n".encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body
                )
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for conn in self._connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


@dataclass
class Setup:
    workdir: Path
    config: Path
    cafile: Path
    httpsPort: int
    a: NamedBackend
    b: NamedBackend

    def write(self, upstream: str = "a", extra: str = "", shutdown: str = "10s",
              upstreamExtra: str = "") -> None:
        self.config.write_text(
            f"""
[edgeproxy]
access_log = off
shutdown_timeout = {shutdown}

[tls]
certificates = certs/

[listen:https]
endpoint = tcp:{self.httpsPort}:interface=127.0.0.1
tls = yes

[upstream:a]
servers = 127.0.0.1:{self.a.port}

[upstream:b]
servers = 127.0.0.1:{self.b.port}
{upstreamExtra}

[route:app]
hosts = *
paths = /
upstream = {upstream}
{extra}
"""
        )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    ca = CertificateAuthority("edgeproxy reload root")
    cafile = ca.writeCertificate(tmp_path / "ca.pem")
    (tmp_path / "certs").mkdir()
    ca.issue(["a.example", "localhost"]).writePEM(tmp_path / "certs" / "a.pem")
    a, b = NamedBackend("a"), NamedBackend("b")
    s = Setup(tmp_path, tmp_path / "edge.ini", cafile, freePort(), a, b)
    s.write()
    try:
        yield s
    finally:
        a.close()
        b.close()


def start(setup: Setup, notify: NotifyReceiver) -> Twistd:
    return startTwistd(setup.config, setup.workdir, notify)


def get(setup: Setup, path: str) -> tuple[int, bytes]:
    with tlsConnection(setup.httpsPort, "a.example", setup.cafile) as conn:
        status, _, body = request(conn, path, "a.example")
    return status, body


class WebSocket:
    """A tunnel through the proxy; the backend echoes raw bytes."""

    def __init__(self, setup: Setup) -> None:
        self.sock = tlsConnection(setup.httpsPort, "a.example", setup.cafile)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET /ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             f"Sec-WebSocket-Version: 13\r\n\r\n").encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, f"closed before the 101: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 "), head

    def echo(self, payload: bytes) -> bytes:
        self.sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"tunnel closed after {received!r}")
            received += chunk
        return received

    def closedWithin(self, timeout: float) -> float:
        """Seconds until the proxy closed the tunnel (raises if it did not)."""
        began = time.monotonic()
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, OSError) as e:
            if isinstance(e, socket.timeout):
                raise
        return time.monotonic() - began


class Download(threading.Thread):
    """C{/download} in a thread: the backend's name, the bytes, the time."""

    def __init__(self, setup: Setup) -> None:
        super().__init__(daemon=True)
        self.setup = setup
        self.result: tuple[int, dict[str, str], bytes] | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with tlsConnection(self.setup.httpsPort, "a.example", self.setup.cafile, timeout=20) as c:
                self.result = request(c, "/download", "a.example")
        except BaseException as e:  # reported by the test
            self.error = e

    def outcome(self, timeout: float) -> tuple[int, dict[str, str], bytes]:
        self.join(timeout)
        assert not self.is_alive(), "the download did not finish"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result


def test_changedRouteKeepsWhatIsInFlight(setup: Setup, notify: NotifyReceiver) -> None:
    proc = start(setup, notify)
    try:
        alive = proc.alive
        assert get(setup, "/first") == (200, b"backend a saw /first\n")
        websocket = WebSocket(setup)
        assert websocket.echo(b"before") == b"before"
        kept = tlsConnection(setup.httpsPort, "a.example", setup.cafile)
        assert request(kept, "/k1", "a.example")[2] == b"backend a saw /k1\n"
        download = Download(setup)
        assert setup.a.downloadStarted.wait(10), "the download never reached backend a"

        # The route moves to b, and a plain listener is added.
        plainPort = freePort()
        setup.write(
            upstream="b",
            extra=f"\n[listen:plain]\nendpoint = tcp:{plainPort}:interface=127.0.0.1\n",
        )
        proc.signal(signal.SIGHUP)
        notify.waitFor(b"RELOADING=1", 10, alive)
        notify.waitFor(b"READY=1", 10, alive)
        proc.waitForOutput("Reloaded", 5)

        # New requests follow the new route, on new connections...
        assert get(setup, "/new") == (200, b"backend b saw /new\n")
        # ...and on the kept-alive one.
        assert request(kept, "/k2", "a.example")[2] == b"backend b saw /k2\n"
        kept.close()
        # The added listener listens.
        with socket.create_connection(("127.0.0.1", plainPort), timeout=5) as plain:
            assert request(plain, "/p", "a.example")[2] == b"backend b saw /p\n"
        # The WebSocket carries on, still on a.
        assert websocket.echo(b"after the reload") == b"after the reload"
        websocket.sock.close()
        # The download finishes complete, from the backend it started on.
        status, headers, body = download.outcome(15)
        assert status == 200 and headers["x-backend"] == "a"
        assert body == b"a" * (DOWNLOAD_CHUNKS * DOWNLOAD_CHUNK)
        assert proc.alive()
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()


def test_brokenFileChangesNothing(setup: Setup, notify: NotifyReceiver) -> None:
    proc = start(setup, notify)
    try:
        alive = proc.alive
        plainPort = freePort()
        # A new route target, a new listener, and one bad value: all refused.
        setup.write(
            upstream="b",
            upstreamExtra="response_timeout = soon",
            extra=f"\n[listen:plain]\nendpoint = tcp:{plainPort}:interface=127.0.0.1\n",
        )
        proc.signal(signal.SIGHUP)
        notify.waitFor(b"RELOADING=1", 10, alive)
        notify.waitFor(b"READY=1", 10, alive)
        proc.waitForOutput("Reload refused", 5)
        output = proc.output()
        # file:line: [section] key: message
        assert f"{setup.config}:" in output
        assert "[upstream:b] response_timeout" in output
        assert get(setup, "/still") == (200, b"backend a saw /still\n")
        assert refused(plainPort)
        assert proc.alive()
    finally:
        proc.stop()


def test_drainFinishesTheDownloadClosesTheTunnelAtTheDeadlineAndExits0(
    setup: Setup, notify: NotifyReceiver
) -> None:
    deadline = 5.0
    setup.write(shutdown=f"{deadline}s")
    proc = start(setup, notify)
    try:
        websocket = WebSocket(setup)
        assert websocket.echo(b"hello") == b"hello"
        download = Download(setup)
        assert setup.a.downloadStarted.wait(10)
        began = time.monotonic()
        proc.signal(signal.SIGTERM)
        notify.waitFor(b"STOPPING=1", 5)
        # The download (about 3 s) completes within the deadline.
        status, headers, body = download.outcome(deadline + 5)
        assert status == 200
        assert len(body) == DOWNLOAD_CHUNKS * DOWNLOAD_CHUNK
        # The tunnel is closed at the deadline, not before.
        websocket.closedWithin(deadline + 5)
        closedAfter = time.monotonic() - began
        assert deadline - 0.5 <= closedAfter <= deadline + 3, closedAfter
        assert proc.wait(10) == 0, proc.output()
        assert time.monotonic() - began < deadline + 5
    finally:
        proc.stop()


def test_secondSigtermStopsAtOnce(setup: Setup, notify: NotifyReceiver) -> None:
    setup.write(shutdown="30s")
    proc = start(setup, notify)
    try:
        download = Download(setup)
        assert setup.a.downloadStarted.wait(10)
        proc.signal(signal.SIGTERM)
        notify.waitFor(b"STOPPING=1", 5)
        time.sleep(0.3)
        began = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.output()
        assert time.monotonic() - began < 5
        download.join(10)
        # Aborted mid-body: the client never sees a complete response.
        assert download.error is not None or download.result is None
        assert "Stop forced by a second signal" in proc.output()
    finally:
        proc.stop()
