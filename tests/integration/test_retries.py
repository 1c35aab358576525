"""
Retries, the C{max_conns} queue and host-name resolution through a real
C{twistd edgeproxy} over sockets on 127.0.0.1: what a client sees (every
request answered, or the right status) and what the log says.

The backends are threads of this process: an HTTP/1.1 origin echoing what
it received, a closed port, and a socket that resets every connection once
it has read a request head.  Every wait is bounded.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.certutil import CertificateAuthority
from tests.proc import NotifyReceiver, Twistd, freePort

START_TIMEOUT = 30.0
TIMEOUT = 10.0


class Origin:
    """An origin answering every method with what it received; C{/slow}
    answers after C{slow} seconds; over TLS when given a context."""

    def __init__(self, slow: float = 1.0, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                origin.seen.append((self.command, self.path, body))
                if self.path.startswith("/slow"):
                    time.sleep(slow)
                reply = f"{self.command} {self.path} {len(body)} bytes\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = do_PUT = answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def get_request(self) -> tuple[socket.socket, object]:
                conn, address = super().get_request()
                if tls is not None:
                    conn = tls.wrap_socket(conn, server_side=True)
                return conn, address

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1})
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


class Resetter:
    """Accepts, reads a request head (and what came with it), then resets
    the connection (RST, not FIN) without a byte of response."""

    def __init__(self) -> None:
        self.heads = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._running:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            conn.settimeout(5)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                time.sleep(0.05)  # let the body (if any) arrive too
            except OSError:
                pass
            if b"\r\n\r\n" in data:
                self.heads += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self._running = False
        self._thread.join(5)
        self._sock.close()


@dataclass
class Proxy:
    process: Twistd
    port: int

    def send(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            connection.request(method, path, body=body, headers={"Host": "app.example"})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()


def startProxy(tmp_path: Path, upstream: str) -> Iterator[Proxy]:
    config = tmp_path / "edge.ini"
    config.write_text(
        f"""
[edgeproxy]
access_log = off

[listen:plain]
endpoint = tcp:0:interface=127.0.0.1
tls = no

[upstream:app]
{upstream}

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
        match = re.search(r"Listening on 127\.0\.0\.1:(\d+) for \[listen:plain\]", process.output())
        assert match, process.output()
        yield Proxy(process, int(match.group(1)))
    finally:
        process.stop()
        notify.close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


@pytest.fixture
def resetter() -> Iterator[Resetter]:
    server = Resetter()
    yield server
    server.close()


def test_deadBackendIsInvisibleToClients(tmp_path: Path, origin: Origin) -> None:
    dead = freePort()
    # max_fails = 0: the dead backend is never ejected, so every other
    # request is first sent to it and must be retried.
    proxies = startProxy(
        tmp_path,
        f"servers = 127.0.0.1:{dead}, 127.0.0.1:{origin.port}\nmax_fails = 0\nretry_budget = 100%",
    )
    proxy = next(proxies)
    try:
        for index in range(6):
            assert proxy.send("GET", f"/get{index}")[0] == 200
        status, _, body = proxy.send("POST", "/order", b"x" * 1000)
        assert (status, body) == (200, b"POST /order 1000 bytes\n")
        status, _, body = proxy.send("PUT", "/doc", b"y" * 3000)
        assert (status, body) == (200, b"PUT /doc 3000 bytes\n")
        output = proxy.process.output()
        assert f"retrying GET after 127.0.0.1:{dead} failed (connect_failed)" in output
        assert ("POST", "/order", b"x" * 1000) in origin.seen
    finally:
        next(proxies, None)


def test_resetAfterTheRequestWasSent(tmp_path: Path, origin: Origin, resetter: Resetter) -> None:
    proxies = startProxy(
        tmp_path,
        f"servers = 127.0.0.1:{resetter.port}, 127.0.0.1:{origin.port}\n"
        "balance = least_conn\nmax_fails = 0\nretry_budget = 100%",
    )
    proxy = next(proxies)
    try:
        # least_conn on an idle upstream alternates: both kinds of request
        # meet the resetting backend within two tries.
        gets = [proxy.send("GET", f"/idempotent{i}")[0] for i in range(2)]
        assert gets == [200, 200]
        puts = [proxy.send("PUT", f"/replayed{i}", b"z" * 2000) for i in range(2)]
        assert [(s, b) for s, _, b in puts] == [
            (200, b"PUT /replayed0 2000 bytes\n"),
            (200, b"PUT /replayed1 2000 bytes\n"),
        ]
        before = resetter.heads
        posts = {f"/once{i}": proxy.send("POST", f"/once{i}", b"p" * 10)[0] for i in range(4)}
        # A POST that reached the resetting backend is never sent again: it
        # gets 502, and only the others reach the origin.
        assert 502 in posts.values() and set(posts.values()) <= {200, 502}
        answered = {path for path, status in posts.items() if status == 200}
        assert {path for method, path, _ in origin.seen if method == "POST"} == answered
        assert resetter.heads - before == 4 - len(answered)
        assert "POST not retried: POST is not idempotent" in proxy.process.output()
    finally:
        next(proxies, None)


def test_maxConnsQueueAndItsTimeout(tmp_path: Path, origin: Origin) -> None:
    proxies = startProxy(
        tmp_path,
        f"servers = 127.0.0.1:{origin.port} max_conns=1\nqueue_size = 1\nqueue_timeout = 0.4s",
    )
    proxy = next(proxies)
    try:
        results: dict[str, tuple[int, dict[str, str], bytes]] = {}

        def send(name: str, path: str) -> None:
            results[name] = proxy.send("GET", path)

        slow = threading.Thread(target=send, args=("slow", "/slow"))
        slow.start()
        time.sleep(0.3)  # the slow one holds the only place
        waiting = threading.Thread(target=send, args=("waiting", "/waiting"))
        waiting.start()
        time.sleep(0.1)
        full = proxy.send("GET", "/full")  # the queue (1) is taken: at once
        waiting.join(TIMEOUT)
        slow.join(TIMEOUT)
        assert full[0] == 503 and full[1].get("retry-after") == "5"
        assert results["waiting"][0] == 503  # waited 0.4 s, the slow one takes 1 s
        assert results["slow"][0] == 200
        assert proxy.send("GET", "/after")[0] == 200
        assert "no backend below max_conns within 0.4s" in proxy.process.output()
    finally:
        next(proxies, None)


def test_queuedRequestIsServedWhenAPlaceFrees(tmp_path: Path, origin: Origin) -> None:
    proxies = startProxy(
        tmp_path,
        f"servers = 127.0.0.1:{origin.port} max_conns=1\nqueue_timeout = 5s",
    )
    proxy = next(proxies)
    try:
        results: dict[str, int] = {}

        def send(name: str, path: str) -> None:
            results[name] = proxy.send("GET", path)[0]

        threads = [threading.Thread(target=send, args=("slow", "/slow"))]
        threads[0].start()
        time.sleep(0.3)
        threads.append(threading.Thread(target=send, args=("next", "/next")))
        threads[1].start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert results == {"slow": 200, "next": 200}
        paths = [path for _, path, _ in origin.seen]
        assert paths.index("/slow") < paths.index("/next")
    finally:
        next(proxies, None)


def test_hostNameIsResolved(tmp_path: Path, origin: Origin) -> None:
    proxies = startProxy(tmp_path, f"servers = localhost:{origin.port}\nresolve_interval = 1s")
    proxy = next(proxies)
    try:
        proxy.process.waitForOutput("upstream app: localhost resolves to", TIMEOUT)
        # localhost may also resolve to ::1, where nothing listens: that
        # backend's refusals are retried on 127.0.0.1.
        for index in range(4):
            assert proxy.send("GET", f"/named{index}")[0] == 200
    finally:
        next(proxies, None)


def test_resolvedAddressIsVerifiedAgainstTheConfiguredName(tmp_path: Path) -> None:
    ca = CertificateAuthority("retries integration root")
    cafile = ca.writeCertificate(tmp_path / "ca.pem")
    certfile = ca.issue(["localhost"]).writePEM(tmp_path / "localhost.pem")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile)
    origin = Origin(tls=context)
    proxies = startProxy(
        tmp_path,
        f"servers = localhost:{origin.port}\ntls = yes\nca = {cafile}\nresolve_interval = 1s",
    )
    proxy = next(proxies)
    try:
        proxy.process.waitForOutput("upstream app: localhost resolves to", TIMEOUT)
        # Dialled by address, verified (and SNI sent) as "localhost": the
        # certificate names no address, so only the name can pass.
        for index in range(3):
            status, _, body = proxy.send("GET", f"/tls{index}")
            assert (status, body) == (200, f"GET /tls{index} 0 bytes\n".encode())
    finally:
        next(proxies, None)
        origin.close()
