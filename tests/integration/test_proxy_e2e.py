"""
End-to-end tests of the streaming proxy core over real sockets on 127.0.0.1.

The proxy and its backends run in one separate process (C{python -m
tests.backends DIR}, see L{tests.backends}); the tests here are plain
blocking clients (http.client, ssl, h2) so what they assert is what a real
client sees on the wire, and what the backend saw is read from its
records.  The proxy process's memory is read from C{/proc/PID/status}.
"""

from __future__ import annotations

import hashlib
import shutil
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.backends import readRecords

ROOT = Path(__file__).resolve().parents[2]
BIG = int(os.environ.get("EDGE_E2E_BIG", str(256 * 1024 * 1024)))
"""Bytes uploaded and downloaded by the streaming tests (CI: 256 MiB)."""
MEMORY_BOUND = 64 * 1024 * 1024
TIMEOUT = 15.0


class Harness:
    def __init__(self, directory: Path, process: subprocess.Popen[bytes]) -> None:
        self.directory = directory
        self.process = process
        self.ports: dict[str, int] = json.loads((directory / "ports.json").read_text())

    def records(self, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in readRecords(self.directory)
            if all(r.get(k) == v for k, v in match.items())
        ]

    def waitRecord(self, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.records(**match)
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no backend record matching {match}")

    def rss(self) -> int:
        status = Path(f"/proc/{self.ports['pid']}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def connection(self, timeout: float = TIMEOUT) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.ports["proxy"], timeout=timeout)

    def tlsContext(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.directory / "edge-ca.pem"))
        if alpn:
            context.set_alpn_protocols(alpn)
        return context


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    directory = tmp_path_factory.mktemp("edge-e2e")
    logFile = (directory / "harness.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "tests.backends", str(directory)],
        cwd=str(ROOT),
        stdout=logFile,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while not (directory / "ports.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = (directory / "harness.log").read_text(errors="replace")
            raise AssertionError(f"harness did not start:\n{output}")
        time.sleep(0.05)
    try:
        yield Harness(directory, process)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
        logFile.close()
        print((directory / "harness.log").read_text(errors="replace")[-20000:])


def get(harness: Harness, host: str, target: str, method: str = "GET", body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    connection = harness.connection()
    allHeaders = {"Host": host}
    allHeaders.update(headers or {})
    connection.request(method, target, body=body, headers=allHeaders)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response, data


def assertGeneric(harness: Harness, body: bytes) -> None:
    text = body.decode("latin-1")
    assert "127.0.0.1" not in text
    for port in ("plain", "tls", "wrong", "dead"):
        assert str(harness.ports[port]) not in text
    for leak in ("Error", "error", "SSL", "certificate", "refused", "Traceback"):
        assert leak not in text


# Backends and failures ---------------------------------------------------


def test_plainBackend(harness: Harness) -> None:
    response, body = get(harness, "plain.test", "/hello?x=1")
    assert (response.status, body) == (200, b"ok")
    record = harness.waitRecord(event="request", target="/hello?x=1")
    assert record["backend"] == "plain"
    assert record["requestLine"] == "GET /hello?x=1 HTTP/1.1"
    assert [v for n, v in record["headers"] if n.lower() == "host"] == ["plain.test"]


def test_tlsBackend(harness: Harness) -> None:
    response, body = get(harness, "tls.test", "/over-tls")
    assert (response.status, body) == (200, b"ok")
    assert harness.waitRecord(event="request", target="/over-tls")["backend"] == "tls"


def test_wrongCertificate(harness: Harness) -> None:
    response, body = get(harness, "wrong.test", "/wrong-cert")
    assert response.status == 502
    assert body == b"502 Bad Gateway\n"
    assert response.getheader("Cache-Control") == "no-store"
    assertGeneric(harness, body + str(response.headers).encode())
    assert not harness.records(event="request", target="/wrong-cert")


def test_deadBackend(harness: Harness) -> None:
    response, body = get(harness, "dead.test", "/")
    assert response.status == 502
    assertGeneric(harness, body + str(response.headers).encode())


def test_slowBackend(harness: Harness) -> None:
    started = time.monotonic()
    response, body = get(harness, "slow.test", "/slow/3")
    assert response.status == 504
    assert time.monotonic() - started < 2.5
    assertGeneric(harness, body)


def test_noRoute(harness: Harness) -> None:
    response, body = get(harness, "unknown.test", "/")
    assert response.status == 404


def test_misdirected(harness: Harness) -> None:
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxyTLS"]), timeout=TIMEOUT)
    tls = harness.tlsContext().wrap_socket(raw, server_hostname="a.edge.test")
    tls.sendall(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
    assert tls.recv(100).startswith(b"HTTP/1.1 421 ")
    tls.close()


def test_stripPrefix(harness: Harness) -> None:
    response, body = get(harness, "strip.test", "/api/x/y?q=1")
    assert response.status == 200
    harness.waitRecord(event="request", target="/x/y?q=1")


def test_hostOverride(harness: Harness) -> None:
    get(harness, "renamed.test", "/renamed")
    record = harness.waitRecord(event="request", target="/renamed")
    assert [v for n, v in record["headers"] if n.lower() == "host"] == ["internal.test"]


# Headers -------------------------------------------------------------------


def test_requestHeaderRewriting(harness: Harness) -> None:
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxy"]), timeout=TIMEOUT)
    raw.sendall(
        b"GET /rewrite HTTP/1.1\r\n"
        b"Host: plain.test\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\n"
        b"Connection: keep-alive, X-Secret-Hop\r\n"
        b"X-Secret-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X_Under: 1\r\n"
        b"X-Rep: first\r\n"
        b"X-Other: between\r\n"
        b"X-Rep: second\r\n"
        b"\r\n"
    )
    response = http.client.HTTPResponse(raw)
    response.begin()
    response.read()
    raw.close()
    record = harness.waitRecord(event="request", target="/rewrite")
    names = [n.lower() for n, v in record["headers"]]
    values = lambda name: [v for n, v in record["headers"] if n.lower() == name]  # noqa: E731
    assert values("host") == ["plain.test"]
    assert values("x-forwarded-for")[-1].split(",")[-1].strip() == "127.0.0.1"
    assert "203.0.113.9" not in ",".join(values("x-forwarded-for"))
    assert any("for=127.0.0.1" in v or 'for="127.0.0.1"' in v for v in values("forwarded"))
    assert values("x-forwarded-proto") == ["http"]
    assert values("x-forwarded-host") == ["plain.test"]
    for hop in ("keep-alive", "proxy-connection", "x-secret-hop", "x_under"):
        assert hop not in names
    assert ",".join(values("x-rep")).replace(" ", "") == "first,second"


def test_responseHeaderFiltering(harness: Harness) -> None:
    response, body = get(harness, "plain.test", "/headers")
    assert body == b"filtered"
    assert response.getheader("Server") is None
    assert response.getheader("X-Powered-By") is None
    assert response.getheader("X-Hop") is None
    assert response.getheader("Keep-Alive") is None
    assert response.getheader("Content-Length") == "8"
    assert response.getheader("Date")
    assert response.getheader("X-Kept").replace(" ", "") == "one,two"


# Bodies ----------------------------------------------------------------------


class RSSWatch:
    """Samples the proxy process's RSS in a thread; keeps the maximum."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.start = harness.rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.harness.rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.start


def test_bigUploadStreams(harness: Harness) -> None:
    watch = RSSWatch(harness)
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxy"]), timeout=TIMEOUT * 4)
    raw.sendall(
        b"POST /upload?big HTTP/1.1\r\nHost: plain.test\r\nContent-Length: %d\r\n\r\n" % BIG
    )
    digest = hashlib.sha256()
    piece = b"u" * (256 * 1024)
    sent = 0
    while sent < BIG:
        chunk = piece[: BIG - sent]
        raw.sendall(chunk)
        digest.update(chunk)
        sent += len(chunk)
    finishedSending = time.time()
    response = http.client.HTTPResponse(raw)
    response.begin()
    summary = json.loads(response.read())
    raw.close()
    growth = watch.stop()
    assert response.status == 200
    assert summary == {"length": BIG, "sha256": digest.hexdigest()}
    record = harness.waitRecord(event="request", target="/upload?big")
    assert record["firstBodyAt"] < finishedSending
    print(f"upload of {BIG / 2**20:.0f} MiB: proxy RSS growth {growth / 2**20:.2f} MiB")
    assert growth < MEMORY_BOUND, growth


def test_bigDownloadStreams(harness: Harness) -> None:
    watch = RSSWatch(harness)
    connection = harness.connection(timeout=TIMEOUT * 4)
    connection.request("GET", f"/download/{BIG}", headers={"Host": "plain.test"})
    response = connection.getresponse()
    assert response.getheader("Content-Length") == str(BIG)
    total = 0
    while True:
        data = response.read(1024 * 1024)
        if not data:
            break
        total += len(data)
    connection.close()
    growth = watch.stop()
    assert total == BIG
    print(f"download of {BIG / 2**20:.0f} MiB: proxy RSS growth {growth / 2**20:.2f} MiB")
    assert growth < MEMORY_BOUND, growth


def test_slowReaderPausesBackendAndDisconnectClosesIt(harness: Harness) -> None:
    size = 1024 * 1024 * 1024
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxy"]), timeout=TIMEOUT)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.sendall(b"GET /download/%d?slow-reader HTTP/1.1\r\nHost: plain.test\r\n\r\n" % size)
    received = 0
    while received < 1024 * 1024:
        received += len(raw.recv(65536))
    time.sleep(1.0)  # a client that stops reading
    request = harness.waitRecord(event="request", target=f"/download/{size}?slow-reader")
    raw.close()  # and then goes away mid-body
    lost = harness.waitRecord(event="lost", conn=request["conn"], timeout=5.0)
    # Only socket buffers' worth beyond what the client read was produced.
    assert lost["produced"] < 64 * 1024 * 1024, lost["produced"]


def test_backendClosesEarly(harness: Harness) -> None:
    connection = harness.connection()
    connection.request("GET", "/close-early/100000", headers={"Host": "plain.test"})
    response = connection.getresponse()
    # Either way an error, never a short body that looks complete.
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        response.read()


def test_backendClosesEarlyChunkedToClient(harness: Harness) -> None:
    # A close-delimited or chunked origin body relayed chunked must not end
    # with the terminating zero chunk when the origin fails mid-body.
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxy"]), timeout=TIMEOUT)
    raw.sendall(b"GET /close-early-chunked/1 HTTP/1.1\r\nHost: plain.test\r\n\r\n")
    data = b""
    try:
        while True:
            piece = raw.recv(65536)
            if not piece:
                break
            data += piece
    except ConnectionResetError:
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert b"x" * 0x400 in body or body == b""
    assert not body.endswith(b"0\r\n\r\n")


def test_chunkedUpload(harness: Harness) -> None:
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxy"]), timeout=TIMEOUT)
    body = [b"hello ", b"chunked ", b"world"]
    raw.sendall(
        b"POST /upload?chunked HTTP/1.1\r\nHost: plain.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in body)
        + b"0\r\n\r\n"
    )
    response = http.client.HTTPResponse(raw)
    response.begin()
    summary = json.loads(response.read())
    raw.close()
    whole = b"".join(body)
    assert summary == {"length": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}


def test_noBodyResponses(harness: Harness) -> None:
    connection = harness.connection()
    connection.request("HEAD", "/download/1000", headers={"Host": "plain.test"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Length") == "1000"
    assert response.read() == b""
    for status in (204, 304):
        connection.request("GET", f"/status/{status}", headers={"Host": "plain.test"})
        response = connection.getresponse()
        assert response.status == status
        assert response.getheader("Transfer-Encoding") is None
        assert response.read() == b""
    # The connection is still in sync: no stray body bytes were sent.
    connection.request("GET", "/after-no-body", headers={"Host": "plain.test"})
    response = connection.getresponse()
    assert (response.status, response.read()) == (200, b"ok")
    connection.close()


def test_pipelinedRequestsAnsweredInOrder(harness: Harness) -> None:
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxy"]), timeout=TIMEOUT)
    raw.sendall(
        b"GET /slow/0.3 HTTP/1.1\r\nHost: plain.test\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: plain.test\r\nContent-Length: 5\r\n\r\nfirst"
        b"GET /download/10 HTTP/1.1\r\nHost: plain.test\r\n\r\n"
    )
    shared = raw.makefile("rb")

    class KeepOpen:
        def __getattr__(self, name: str) -> Any:
            return getattr(shared, name)

        def close(self) -> None:
            pass

    class OneReader:
        # http.client reads ahead: all responses must share one buffer.
        def makefile(self, mode: str) -> Any:
            return KeepOpen()

    bodies = []
    for _ in range(3):
        response = http.client.HTTPResponse(OneReader())  # type: ignore[arg-type]
        response.begin()
        bodies.append(response.read())
    raw.close()
    assert bodies == [b"slow", b"first", b"a" * 10]


def test_declaredBodyTooLarge(harness: Harness) -> None:
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxy"]), timeout=TIMEOUT)
    raw.sendall(
        b"POST /upload?declared-too-large HTTP/1.1\r\nHost: small.test\r\n"
        b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    )
    response = http.client.HTTPResponse(raw)
    response.begin()
    assert response.status == 413  # and not a 100 Continue first
    assert response.getheader("Connection") == "close"
    raw.close()
    time.sleep(0.2)
    assert not harness.records(event="request", target="/upload?declared-too-large")


def test_streamedBodyTooLarge(harness: Harness) -> None:
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxy"]), timeout=TIMEOUT)
    raw.sendall(
        b"POST /upload?streamed-too-large HTTP/1.1\r\nHost: small.test\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    try:
        for _ in range(10):
            raw.sendall(b"200\r\n" + b"z" * 0x200 + b"\r\n")
            time.sleep(0.02)
        raw.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    data = b""
    try:
        while True:
            piece = raw.recv(65536)
            if not piece:
                break
            data += piece
    except OSError:
        pass
    assert data == b"" or data.startswith(b"HTTP/1.1 413 ")
    time.sleep(0.3)
    assert not harness.records(event="request", target="/upload?streamed-too-large")


# HTTP/2 ----------------------------------------------------------------------


def h2Exchange(harness: Harness, requests: list[tuple[list[tuple[str, str]], bytes]]) -> list[tuple[dict[str, str], bytes]]:
    h2connection = pytest.importorskip("h2.connection")
    h2events = pytest.importorskip("h2.events")
    h2config = pytest.importorskip("h2.config")
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxyTLS"]), timeout=TIMEOUT)
    tls = harness.tlsContext(["h2"]).wrap_socket(raw, server_hostname="plain.test")
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2connection.H2Connection(config=h2config.H2Configuration(client_side=True))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    results: dict[int, dict[str, Any]] = {}

    def receive() -> None:
        data = tls.recv(65536)
        if not data:
            raise AssertionError("proxy closed the HTTP/2 connection")
        for event in conn.receive_data(data):
            if isinstance(event, h2events.ResponseReceived):
                results[event.stream_id]["headers"] = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h2events.DataReceived):
                results[event.stream_id]["body"] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2events.StreamEnded):
                results[event.stream_id]["done"] = True
            elif isinstance(event, h2events.StreamReset):
                results[event.stream_id]["done"] = True
                results[event.stream_id]["reset"] = True
        tls.sendall(conn.data_to_send())

    for headers, body in requests:
        stream = conn.get_next_available_stream_id()
        results[stream] = {"headers": {}, "body": b"", "done": False}
        conn.send_headers(stream, headers, end_stream=not body)
        tls.sendall(conn.data_to_send())
        pending = body
        # A stream answered early may be reset (NO_ERROR, RFC 9113 8.1): the
        # rest of its body is not wanted.
        while pending and not results[stream].get("reset"):
            # Respect the proxy's flow-control windows while sending.
            window = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size)
            if window <= 0:
                receive()
                continue
            conn.send_data(stream, pending[:window], end_stream=len(pending) <= window)
            pending = pending[window:]
            tls.sendall(conn.data_to_send())
    deadline = time.monotonic() + TIMEOUT
    while not all(r["done"] for r in results.values()) and time.monotonic() < deadline:
        receive()
    tls.close()
    return [(r["headers"], r["body"]) for r in results.values()]


def test_http2GetAndPost(harness: Harness) -> None:
    body = os.urandom(300 * 1024)
    base = [(":scheme", "https"), (":authority", "plain.test")]
    (getHeaders, getBody), (postHeaders, postBody) = h2Exchange(
        harness,
        [
            ([(":method", "GET"), (":path", "/h2-get")] + base, b""),
            (
                [(":method", "POST"), (":path", "/upload?h2")] + base + [("content-length", str(len(body)))],
                body,
            ),
        ],
    )
    assert getHeaders[":status"] == "200" and getBody == b"ok"
    assert postHeaders[":status"] == "200"
    assert json.loads(postBody) == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    record = harness.waitRecord(event="request", target="/h2-get")
    assert [v for n, v in record["headers"] if n.lower() == "host"] == ["plain.test"]


def test_http2EarlyAnswersLeaveConnectionUsable(harness: Harness) -> None:
    body = b"q" * (200 * 1024)
    size = 5 * 1024 * 1024
    answers = h2Exchange(
        harness,
        [
            # No route for this name on a connection whose SNI is plain.test.
            ([(":method", "POST"), (":path", "/x"), (":scheme", "https"), (":authority", "unknown.test"),
              ("content-length", str(len(body)))], body),
            ([(":method", "POST"), (":path", "/upload?h2-small"), (":scheme", "https"),
              (":authority", "small.test"), ("content-length", "5000")], b"s" * 5000),
            # The backend is down while the body is still being sent.
            ([(":method", "POST"), (":path", "/dead"), (":scheme", "https"), (":authority", "dead.test"),
              ("content-length", str(len(body)))], body),
            ([(":method", "GET"), (":path", f"/download/{size}"), (":scheme", "https"),
              (":authority", "plain.test")], b""),
        ],
    )
    (misdirected, _), (tooLarge, _), (dead, deadBody), (download, data) = answers
    assert dead[":status"] == "502" and deadBody == b"502 Bad Gateway\n"
    assert misdirected[":status"] == "421"
    assert tooLarge[":status"] == "413"
    assert "connection" not in tooLarge
    assert download[":status"] == "200" and len(data) == size
    assert not harness.records(event="request", target="/upload?h2-small")


def _expectUpload(harness: Harness, target: bytes) -> tuple[socket.socket, bytes]:
    raw = socket.create_connection(("127.0.0.1", harness.ports["proxy"]), timeout=TIMEOUT)
    raw.sendall(
        b"PUT " + target + b" HTTP/1.1\r\nHost: plain.test\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    return raw, raw.recv(100)


def test_expectContinueAnsweredByTheBackend(harness: Harness) -> None:
    """
    Expect: 100-continue reaches the backend, and the client's 100 is the
    backend's own; the body follows it.
    """
    raw, interim = _expectUpload(harness, b"/upload?continue")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    raw.sendall(b"hello")
    response = http.client.HTTPResponse(raw)
    response.begin()
    assert json.loads(response.read())["length"] == 5
    raw.close()
    record = harness.waitRecord(event="request", target="/upload?continue")
    assert ("Expect", "100-continue") in [tuple(field) for field in record["headers"]]


def test_expectRefusedByTheBackend(harness: Harness) -> None:
    """A backend's final status instead of 100 reaches the client at once,
    and the body is never sent."""
    raw, interim = _expectUpload(harness, b"/upload?refuse")
    assert interim.startswith(b"HTTP/1.1 417 ")
    raw.close()
    harness.waitRecord(event="refused", target="/upload?refuse")
    assert not harness.records(event="request", target="/upload?refuse")


def test_expectContinueFromTheProxyWhenTheBackendIsSilent(harness: Harness) -> None:
    """
    A backend that never answers the expectation (HTTP/1.0 servers): after
    the bounded wait the client gets a 100 from the proxy and its body goes
    through.
    """
    started = time.monotonic()
    raw, interim = _expectUpload(harness, b"/upload?expect")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert 0.5 < time.monotonic() - started < 5
    raw.sendall(b"hello")
    response = http.client.HTTPResponse(raw)
    response.begin()
    assert json.loads(response.read())["length"] == 5
    raw.close()


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
@pytest.mark.parametrize("target", ["/close-early/100000", "/close-early-chunked/1"])
def test_curlReportsTruncatedResponse(harness: Harness, target: str) -> None:
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "--max-time", "10",
         "-H", "Host: plain.test", f"http://127.0.0.1:{harness.ports['proxy']}{target}"],
        capture_output=True,
        timeout=15,
    )
    # 18: partial file; 56: failure receiving (reset).  Never 0.
    assert result.returncode in (18, 56), result


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curlHTTP2(harness: Harness) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--http2", "--max-time", "10", "--cacert", str(harness.directory / "edge-ca.pem"),
         "--resolve", f"plain.test:{harness.ports['proxyTLS']}:127.0.0.1",
         "-w", "%{http_version} %{http_code}", "--data-binary", "curl-body",
         f"https://plain.test:{harness.ports['proxyTLS']}/echo"],
        capture_output=True,
        timeout=15,
    )
    assert result.returncode == 0, result
    assert result.stdout == b"curl-body2 200"
