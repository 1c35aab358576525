"""
HTTP/2 through a real C{twistd edgeproxy} on 127.0.0.1: a client that stops
reading (the process's memory stays bounded while a 256 MiB response is
pending), a header block trickled byte by byte (cut at the header
deadline), a WebSocket over HTTP/2 (RFC 8441) to an HTTP/1.1 backend, and
the TLS alert for a client whose ALPN offer has nothing we speak.

The backend is a small raw HTTP/1.1 server in a thread (below): it counts
the bytes it managed to send, so a test sees whether the proxy paused it.
"""

from __future__ import annotations

import base64
import hashlib
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tests.certutil import CertificateAuthority
from tests.proc import NotifyReceiver, Twistd

START_TIMEOUT = 30.0
TIMEOUT = 10.0
HEADER_TIMEOUT = 2.0
BIG = 256 * 1024 * 1024
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Backend:
    """
    C{GET /big/N}: N bytes (Content-Length), written as fast as the socket
    takes them; C{GET /slow/S}: C{slow} after S seconds; a WebSocket
    handshake: C{101}, then every byte echoed; anything else: C{ok}.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = connection.recv(4096)
                if not data:
                    return
                head += data
            lines = head.split(b"\r\n\r\n")[0].split(b"\r\n")
            target = lines[0].split(b" ")[1]
            fields = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in lines[1:])
            }
            if fields.get(b"upgrade", b"").lower() == b"websocket":
                accept = base64.b64encode(hashlib.sha1(fields[b"sec-websocket-key"] + GUID).digest())
                connection.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
                while True:
                    data = connection.recv(65536)
                    if not data:
                        return
                    connection.sendall(data)
            if target.startswith(b"/slow/"):
                time.sleep(float(target[6:]))
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nslow")
                return
            if target.startswith(b"/big/"):
                total = int(target[5:])
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % total
                )
                chunk = b"b" * 65536
                left = total
                while left > 0 and not self.closed:
                    piece = chunk[: min(left, len(chunk))]
                    connection.sendall(piece)
                    left -= len(piece)
                    self.sent += len(piece)
                return
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except OSError:
            pass
        finally:
            connection.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@dataclass
class Proxy:
    process: Twistd
    cafile: Path
    backend: Backend
    port: int

    def rss(self) -> int:
        """The process's resident memory, in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def tls(self, alpn: list[str]) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(self.cafile))
        context.check_hostname = False
        context.set_alpn_protocols(alpn)
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        return context.wrap_socket(raw, server_hostname="localhost")


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    ca = CertificateAuthority("h2 integration root")
    cafile = ca.writeCertificate(tmp_path / "ca.pem")
    certdir = tmp_path / "certs"
    certdir.mkdir()
    ca.issue(["localhost", "127.0.0.1"]).writePEM(certdir / "default.pem")
    backend = Backend()
    config = tmp_path / "edge.ini"
    config.write_text(
        f"""
[edgeproxy]
access_log = off

[tls]
certificates = certs/
default = certs/default.pem

[listen:https]
endpoint = tcp:0:interface=127.0.0.1
tls = yes
client_header_timeout = {HEADER_TIMEOUT}s
max_body_size = 0

[upstream:app]
servers = 127.0.0.1:{backend.port}
idle_timeout = 60s

[route:app]
hosts = *
paths = /
upstream = app
"""
    )
    notify = NotifyReceiver()
    process = Twistd(config, tmp_path, notify=notify)
    try:
        try:
            notify.waitFor(b"READY=1", START_TIMEOUT, alive=process.alive)
        except Exception:
            raise AssertionError(f"twistd did not start:\n{process.output()}")
        import re

        match = re.search(r"Listening on 127\.0\.0\.1:(\d+) for \[listen:https\]", process.output())
        assert match, process.output()
        yield Proxy(process, cafile, backend, int(match.group(1)))
    finally:
        process.stop()
        notify.close()
        backend.close()


def h2Client(proxy: Proxy, window: int | None = None) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    sock = proxy.tls(["h2"])
    assert sock.selected_alpn_protocol() == "h2"
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    conn = h2.connection.H2Connection(config)
    if window is not None:
        conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
    conn.initiate_connection()
    if window is not None:
        conn.increment_flow_control_window(window - 65535)
    sock.sendall(conn.data_to_send())
    return sock, conn


def receive(sock: ssl.SSLSocket, conn: h2.connection.H2Connection) -> list[h2.events.Event]:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("closed")
    events = conn.receive_data(data)
    pending = conn.data_to_send()
    if pending:
        sock.sendall(pending)
    return events


def headers(path: str, method: str = "GET", extra: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", "https"), (":authority", "localhost"), (":path", path), *extra]


def test_slowReaderKeepsMemoryBounded(proxy: Proxy) -> None:
    """
    A client that opens its windows wide and stops reading its socket while
    a 256 MiB response is pending: the proxy's memory grows by a few MiB
    (what it holds is bounded by h2_connection_buffer), and the backend is
    paused (it sends no more than the socket buffers hold); reading again
    resumes it.
    """
    sock, conn = h2Client(proxy, window=2**31 - 1)
    try:
        # Warm up: the process's memory with one HTTP/2 request done.
        conn.send_headers(1, headers("/warm"), end_stream=True)
        sock.sendall(conn.data_to_send())
        while not any(isinstance(e, h2.events.StreamEnded) for e in receive(sock, conn)):
            pass
        before = proxy.rss()
        conn.send_headers(3, headers(f"/big/{BIG}"), end_stream=True)
        sock.sendall(conn.data_to_send())
        status = None
        while True:
            events = receive(sock, conn)
            for event in events:
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
            if any(isinstance(e, h2.events.DataReceived) for e in events):
                break
        assert status == b"200"
        assert proxy.backend.sent > 0
        # Stop reading: wait until the backend stops getting anywhere.
        deadline = time.monotonic() + 20
        last = -1
        while time.monotonic() < deadline:
            time.sleep(1.0)
            if proxy.backend.sent == last:
                break
            last = proxy.backend.sent
        grown = proxy.rss() - before
        assert proxy.backend.sent < 64 * 1024 * 1024, proxy.backend.sent
        assert grown < 24 * 1024 * 1024, grown
        # Reading again lets the backend go on.
        stalled = proxy.backend.sent
        received = 0
        while received < 32 * 1024 * 1024:
            for event in receive(sock, conn):
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)
        assert proxy.backend.sent > stalled
    finally:
        sock.close()


def test_headerTrickleIsCut(proxy: Proxy) -> None:
    """
    A header block sent a byte every quarter second is cut at
    client_header_timeout, long before it would be complete.
    """
    sock, conn = h2Client(proxy)
    try:
        receive(sock, conn)  # the server's SETTINGS
        conn.send_headers(1, headers("/trickle", extra=[("x-pad", "p" * 60)]), end_stream=True)
        frame = conn.data_to_send()
        assert len(frame) > 60
        start = time.monotonic()
        closed = None
        for index in range(len(frame)):
            try:
                sock.sendall(frame[index:index + 1])
            except OSError:
                closed = time.monotonic() - start
                break
            sock.settimeout(0.25)
            try:
                data = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                closed = time.monotonic() - start
                break
            if not data:
                closed = time.monotonic() - start
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    closed = time.monotonic() - start
            if closed is not None:
                break
        assert closed is not None, "the trickle went through"
        assert HEADER_TIMEOUT - 0.5 <= closed <= HEADER_TIMEOUT + 2.0, closed
    finally:
        sock.close()


def test_webSocketOverHTTP2(proxy: Proxy) -> None:
    """
    RFC 8441: the proxy offers extended CONNECT, and a WebSocket opened with
    it reaches the HTTP/1.1 backend as an Upgrade; bytes go both ways.
    """
    sock, conn = h2Client(proxy)
    try:
        while conn.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL) != 1:
            receive(sock, conn)
        conn.send_headers(
            1,
            headers("/chat", "CONNECT", [(":protocol", "websocket"), ("sec-websocket-version", "13")]),
        )
        sock.sendall(conn.data_to_send())
        status = None
        while status is None:
            for event in receive(sock, conn):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
        assert status == b"200"
        conn.send_data(1, b"\x81\x05hello")
        sock.sendall(conn.data_to_send())
        echoed = b""
        while len(echoed) < 7:
            for event in receive(sock, conn):
                if isinstance(event, h2.events.DataReceived):
                    echoed += event.data
        assert echoed == b"\x81\x05hello"
    finally:
        sock.close()


def test_noApplicationProtocolAlert(proxy: Proxy) -> None:
    """A client offering only protocols we do not speak gets the alert."""
    with pytest.raises(ssl.SSLError) as raised:
        proxy.tls(["spdy/3", "h3"])
    assert "alert no application protocol" in str(raised.value).lower()
    # One offering no ALPN at all still gets HTTP/1.1.
    context = ssl.create_default_context(cafile=str(proxy.cafile))
    context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def readFrames(sock: ssl.SSLSocket, until: float) -> Iterator[Any]:
    """Frames as they come (read without the client library, which takes
    nothing after a GOAWAY), until the connection closes or C{until}."""
    from hyperframe.frame import Frame

    buffer = b""
    while time.monotonic() < until:
        try:
            data = sock.recv(65536)
        except (TimeoutError, socket.timeout):
            continue
        if not data:
            return
        buffer += data
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(buffer[9:9 + length]))
            buffer = buffer[9 + length:]
            yield frame


def test_drainSendsGoAwayAndFinishesTheStream(proxy: Proxy) -> None:
    """
    SIGTERM with a request in flight on an HTTP/2 connection: GOAWAY naming
    that stream (RFC 9113 6.8), its response still arrives, then the
    connection closes and the process exits 0.
    """
    from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame

    sock, conn = h2Client(proxy)
    try:
        conn.send_headers(1, headers("/slow/1.5"), end_stream=True)
        sock.sendall(conn.data_to_send())
        time.sleep(0.3)
        proxy.process.signal(signal.SIGTERM)
        sock.settimeout(0.5)
        seen = []
        for frame in readFrames(sock, time.monotonic() + TIMEOUT):
            seen.append(frame)
        kinds = [type(f) for f in seen]
        goaways = [f for f in seen if isinstance(f, GoAwayFrame)]
        assert goaways and goaways[0].last_stream_id == 1 and goaways[0].error_code == 0
        assert HeadersFrame in kinds[kinds.index(GoAwayFrame):]
        assert b"".join(f.data for f in seen if isinstance(f, DataFrame) and f.stream_id == 1) == b"slow"
    finally:
        sock.close()
    assert proxy.process.wait(TIMEOUT) == 0
