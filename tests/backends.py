"""
Real origin servers for the integration tests, and the harness process that
runs them behind a real edgeproxy.

L{OriginFactory} is a deliberately small raw HTTP/1.1 server (not
twisted.web: the tests need the request exactly as it arrived: request
line, header fields in order with their original case and repetitions, the
body's framing).  Every request is recorded as one JSON line in
C{records.jsonl} of a directory, so a test in another process can read what
a backend saw.  The path picks the behaviour:

  - C{/echo}: 200 with the request body as the response body;
  - C{/upload}: reads the body (of any size) without keeping it, answers
    a JSON summary (length, sha256);
  - C{/download/N}: 200 with N bytes generated on the fly, written only when
    the socket can take them (a pull producer: backpressure), with
    Content-Length; C{/download-chunked/N}: the same, chunked;
  - C{/slow/S}: answers after S seconds;
  - C{/close-early/N}: announces Content-Length N, sends half, closes;
    C{/close-early-chunked/N}: one chunk of a chunked body, then closes;
  - C{/status/C}: answers status C (204, 304...) with no body;
  - C{/headers}: a response carrying Server, X-Powered-By, hop-by-hop
    fields and a Connection-named field, for response filtering tests;
  - C{/cache/NAME?...}: a response for the cache's tests, shaped by its
    query: C{cc} (Cache-Control), C{etag}, C{lm} (Last-Modified, seconds
    ago), C{vary}, C{sk} (Surrogate-Key), C{size} (body bytes, default 16:
    the name repeated), C{delay} (seconds before answering), C{pause}
    (seconds between the two halves of the body); C{If-None-Match} with the
    C{etag} gets a 304;
  - anything else: 200 C{ok}.
A request with C{Expect: 100-continue} gets C{100 Continue} when its target
ends in C{?continue}, C{417} (and a close) without its body read when it
ends in C{?refuse}, and no interim answer otherwise.
C{HEAD} is answered with the GET headers and no body.

Run C{python -m tests.backends --origin DIR} to start the plain origin
alone (it writes its port to C{DIR/ports.json}), or C{python -m
tests.backends DIR} to start the harness: backends (plain,
TLS, TLS with a wrong certificate, a dead port) and edgeproxy listeners
(plain and TLS with ALPN h2) in one process; it writes C{DIR/ports.json}
when everything listens and serves until killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

CHUNK = 64 * 1024


class Recorder:
    """Appends one JSON object per line to C{DIR/records.jsonl}."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "records.jsonl"

    def record(self, **fields: Any) -> None:
        fields.setdefault("at", time.time())
        with self.path.open("a") as f:
            f.write(json.dumps(fields) + "\n")


def readRecords(directory: Path | str) -> list[dict[str, Any]]:
    """All records written so far (for the test side)."""
    path = Path(directory) / "records.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@implementer(IPullProducer)
class _Generator:
    """N bytes made up on demand, one chunk per resumeProducing."""

    def __init__(self, origin: OriginProtocol, total: int, chunked: bool) -> None:
        self.origin = origin
        self.remaining = total
        self.chunked = chunked
        self.produced = 0

    def resumeProducing(self) -> None:
        transport = self.origin.transport
        if transport is None or self.origin.lost:
            return
        size = min(CHUNK, self.remaining)
        if size:
            data = bytes([0x61 + (self.produced // CHUNK) % 26]) * size
            self.remaining -= size
            self.produced += size
            self.origin.produced = self.produced
            transport.write(b"%x\r\n%s\r\n" % (size, data) if self.chunked else data)
        if not self.remaining:
            transport.unregisterProducer()
            if self.chunked:
                transport.write(b"0\r\n\r\n")
            self.origin.responseDone()

    def stopProducing(self) -> None:
        self.remaining = 0


class OriginProtocol(Protocol):
    """One connection to an origin server (HTTP/1.1, keep-alive)."""

    def __init__(self, name: str, recorder: Recorder, reactor: Any) -> None:
        self.name = name
        self.recorder = recorder
        self.reactor = reactor
        self.buffer = b""
        self.state = "head"
        self.lost = False
        self.produced = 0
        self.connectionId = f"{name}-{id(self):x}"

    # parsing ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self.recorder.record(event="connect", backend=self.name, conn=self.connectionId)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._parse()

    def _parse(self) -> None:
        while not self.lost:
            if self.state == "head":
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
                lines = head.split(b"\r\n")
                self.requestLine = lines[0].decode("latin-1")
                self.method, self.target, self.version = self.requestLine.split(" ", 2)
                self.headers = []
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    self.headers.append(
                        [name.decode("latin-1"), value.strip().decode("latin-1")]
                    )
                self.bodyHash = hashlib.sha256()
                self.bodyLength = 0
                self.bodyHead = b""
                self.firstBodyAt: float | None = None
                self.rawChunked = False
                lowered = {n.lower(): v for n, v in self.headers}
                if lowered.get("expect", "").lower() == "100-continue":
                    # ?continue: answer the expectation as a server should;
                    # ?refuse: refuse the body with a final status at once;
                    # otherwise say nothing (as HTTP/1.0 servers do).
                    if self.target.endswith("?continue"):
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    elif self.target.endswith("?refuse"):
                        self.recorder.record(
                            event="refused", backend=self.name, target=self.target,
                            headers=self.headers,
                        )
                        self.state = "responding"
                        self._send("417 Expectation Failed", [("Content-Length", "0"), ("Connection", "close")])
                        self.transport.loseConnection()
                        return
                if lowered.get("transfer-encoding", "").lower() == "chunked":
                    self.rawChunked = True
                    self.state = "chunk-size"
                elif int(lowered.get("content-length", "0") or 0) > 0:
                    self.toRead = int(lowered["content-length"])
                    self.state = "body"
                else:
                    self._requestDone()
                    continue
            elif self.state == "body":
                if not self.buffer:
                    return
                piece = self.buffer[: self.toRead]
                self.buffer = self.buffer[len(piece) :]
                self._body(piece)
                self.toRead -= len(piece)
                if not self.toRead:
                    self._requestDone()
            elif self.state == "chunk-size":
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(self.buffer[:end].split(b";")[0], 16)
                self.buffer = self.buffer[end + 2 :]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.toRead = size
                    self.state = "chunk-data"
            elif self.state == "chunk-data":
                if not self.buffer:
                    return
                piece = self.buffer[: self.toRead]
                self.buffer = self.buffer[len(piece) :]
                self._body(piece)
                self.toRead -= len(piece)
                if not self.toRead:
                    self.state = "chunk-crlf"
            elif self.state == "chunk-crlf":
                if len(self.buffer) < 2:
                    return
                self.buffer = self.buffer[2:]
                self.state = "chunk-size"
            elif self.state == "trailer":
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return
                line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
                if not line:
                    self._requestDone()
            else:  # "responding": wait for the response to finish
                return

    def _body(self, piece: bytes) -> None:
        if self.firstBodyAt is None and piece:
            self.firstBodyAt = time.time()
        self.bodyHash.update(piece)
        self.bodyLength += len(piece)
        if len(self.bodyHead) < 4096:
            self.bodyHead += piece[: 4096 - len(self.bodyHead)]
        if self.target == "/echo":
            self._echoed = getattr(self, "_echoed", b"") + piece

    def _requestDone(self) -> None:
        self.state = "responding"
        self.recorder.record(
            event="request",
            backend=self.name,
            conn=self.connectionId,
            requestLine=self.requestLine,
            method=self.method,
            target=self.target,
            headers=self.headers,
            bodyLength=self.bodyLength,
            bodySha256=self.bodyHash.hexdigest(),
            bodyHead=self.bodyHead.decode("latin-1"),
            chunked=self.rawChunked,
            firstBodyAt=self.firstBodyAt,
        )
        self._respond()

    # responding ----------------------------------------------------------

    def _send(self, status: str, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        head = [f"HTTP/1.1 {status}"] + [f"{n}: {v}" for n, v in headers]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if self.method != "HEAD":
            data += body
        self.transport.write(data)

    def _respond(self) -> None:
        target = self.target
        parts = target.split("?")[0].strip("/").split("/")
        kind = parts[0]
        arg = parts[1] if len(parts) > 1 else "0"
        if kind == "echo":
            body = getattr(self, "_echoed", b"")
            self._echoed = b""
            self._send("200 OK", [("Content-Length", str(len(body))), ("Content-Type", "application/octet-stream")], body)
            self.responseDone()
        elif kind == "upload":
            body = json.dumps({"length": self.bodyLength, "sha256": self.bodyHash.hexdigest()}).encode()
            self._send("200 OK", [("Content-Length", str(len(body))), ("Content-Type", "application/json")], body)
            self.responseDone()
        elif kind in ("download", "download-chunked"):
            total = int(arg)
            chunked = kind == "download-chunked"
            framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(total))
            self._send("200 OK", [framing, ("Content-Type", "application/octet-stream")])
            if self.method == "HEAD" or total == 0:
                if chunked and self.method != "HEAD":
                    self.transport.write(b"0\r\n\r\n")
                self.responseDone()
                return
            self.generator = _Generator(self, total, chunked)
            self.transport.registerProducer(self.generator, False)
        elif kind == "slow":
            self.reactor.callLater(float(arg), self._slowAnswer)
        elif kind == "close-early":
            total = int(arg)
            self._send("200 OK", [("Content-Length", str(total))], b"x" * (total // 2))
            self.transport.loseConnection()
        elif kind == "close-early-chunked":
            self._send("200 OK", [("Transfer-Encoding", "chunked")], b"400\r\n" + b"x" * 0x400 + b"\r\n")
            self.transport.loseConnection()
        elif kind == "status":
            code = int(arg)
            phrase = {204: "No Content", 304: "Not Modified"}.get(code, "Status")
            headers = [("ETag", '"v1"')] if code == 304 else []
            self._send(f"{code} {phrase}", headers)
            self.responseDone()
        elif kind == "cache":
            from urllib.parse import parse_qs

            query = parse_qs(target.partition("?")[2])
            delay = float(query.get("delay", ["0"])[0])
            if delay:
                self.reactor.callLater(delay, self._cacheAnswer, arg, query)
            else:
                self._cacheAnswer(arg, query)
        elif kind == "headers":
            body = b"filtered"
            self._send(
                "200 OK",
                [
                    ("Content-Length", str(len(body))),
                    ("Server", "SecretOrigin/1.0"),
                    ("X-Powered-By", "PHP/4"),
                    ("Connection", "X-Hop"),
                    ("X-Hop", "should-not-pass"),
                    ("Keep-Alive", "timeout=5"),
                    ("X-Kept", "one"),
                    ("X-Kept", "two"),
                ],
                body,
            )
            self.responseDone()
        else:
            self._send("200 OK", [("Content-Length", "2"), ("Content-Type", "text/plain")], b"ok")
            self.responseDone()

    def _cacheAnswer(self, name: str, query: dict[str, list[str]]) -> None:
        import email.utils

        if self.lost:
            return

        def get(key: str) -> str | None:
            values = query.get(key)
            return values[0] if values else None

        headers = [("Content-Type", "application/octet-stream")]
        for key, field in (("cc", "Cache-Control"), ("vary", "Vary"), ("sk", "Surrogate-Key")):
            if get(key) is not None:
                headers.append((field, get(key)))  # type: ignore[arg-type]
        etag = get("etag")
        if etag is not None:
            headers.append(("ETag", f'"{etag}"'))
        if get("lm") is not None:
            headers.append(("Last-Modified", email.utils.formatdate(time.time() - float(get("lm")), usegmt=True)))  # type: ignore[arg-type]
        lowered = {n.lower(): v for n, v in self.headers}
        if etag is not None and lowered.get("if-none-match") == f'"{etag}"':
            self._send("304 Not Modified", headers)
            self.responseDone()
            return
        size = int(get("size") or 16)
        body = (name.encode() * (size // max(1, len(name)) + 1))[:size]
        pause = float(get("pause") or 0)
        headers.append(("Content-Length", str(size)))
        if not pause or self.method == "HEAD":
            self._send("200 OK", headers, body)
            self.responseDone()
            return
        half = size // 2
        self._send("200 OK", headers, body[:half])

        def rest() -> None:
            if not self.lost:
                self.transport.write(body[half:])
                self.responseDone()

        self.reactor.callLater(pause, rest)

    def _slowAnswer(self) -> None:
        if self.lost:
            return
        self._send("200 OK", [("Content-Length", "4")], b"slow")
        self.responseDone()

    def responseDone(self) -> None:
        self.state = "head"
        if self.buffer:
            self.reactor.callLater(0, self._parse)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self.recorder.record(
            event="lost", backend=self.name, conn=self.connectionId, produced=self.produced
        )


class OriginFactory(Factory):
    def __init__(self, name: str, recorder: Recorder, reactor: Any) -> None:
        self.name = name
        self.recorder = recorder
        self.reactor = reactor

    def buildProtocol(self, addr: Any) -> OriginProtocol:
        protocol = OriginProtocol(self.name, self.recorder, self.reactor)
        protocol.factory = self
        return protocol


# The harness -------------------------------------------------------------


def _serverOptions(issued: Any, alpn: list[bytes] | None = None) -> Any:
    from OpenSSL import crypto
    from twisted.internet.ssl import CertificateOptions

    key = crypto.load_privatekey(crypto.FILETYPE_PEM, issued.keyPEM)
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, issued.certificatePEM)
    kwargs: dict[str, Any] = {}
    if alpn is not None:
        kwargs["acceptableProtocols"] = alpn
    return CertificateOptions(privateKey=key, certificate=cert, **kwargs)


def runHarness(directory: Path) -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    from edgeproxy.config.model import (
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

    recorder = Recorder(directory)
    ca = CertificateAuthority("harness backend CA")
    otherCA = CertificateAuthority("some other CA")
    edgeCA = CertificateAuthority("harness edge CA")
    (directory / "backend-ca.pem").write_bytes(ca.certificatePEM)
    (directory / "edge-ca.pem").write_bytes(edgeCA.certificatePEM)
    good = ca.issue(["backend.test", "127.0.0.1"])
    wrong = otherCA.issue(["backend.test", "127.0.0.1"])
    edge = edgeCA.issue(["edge.test", "*.edge.test", "plain.test", "127.0.0.1"])

    plainPort = reactor.listenTCP(0, OriginFactory("plain", recorder, reactor), interface="127.0.0.1")
    tlsPort = reactor.listenSSL(
        0, OriginFactory("tls", recorder, reactor), _serverOptions(good, [b"http/1.1"]), interface="127.0.0.1"
    )
    wrongPort = reactor.listenSSL(
        0, OriginFactory("wrong", recorder, reactor), _serverOptions(wrong, [b"http/1.1"]), interface="127.0.0.1"
    )
    deadPort = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    deadNumber = deadPort.getHost().port
    deadPort.stopListening()

    def upstream(name: str, port: int, **kw: Any) -> Upstream:
        base: dict[str, Any] = dict(
            connect_timeout=2.0, response_timeout=1.0, idle_timeout=3.0, keepalive_timeout=5.0
        )
        base.update(kw)
        return Upstream(name=name, servers=(Server("127.0.0.1", port),), **base)

    upstreams = {
        "plain": upstream("plain", plainPort.getHost().port, response_timeout=10.0),
        "slow": upstream("slow", plainPort.getHost().port, response_timeout=0.5),
        "tls": upstream("tls", tlsPort.getHost().port, tls=True, ca=str(directory / "backend-ca.pem")),
        "wrong": upstream("wrong", wrongPort.getHost().port, tls=True, ca=str(directory / "backend-ca.pem")),
        "dead": upstream("dead", deadNumber),
        "renamed": upstream("renamed", plainPort.getHost().port, host_header="internal.test"),
    }
    routes = (
        Route(name="plain", hosts=("plain.test", "127.0.0.1"), paths=("/",), upstream="plain"),
        Route(name="strip", hosts=("strip.test",), paths=("/api",), upstream="plain", strip_prefix=True),
        Route(name="small", hosts=("small.test",), paths=("/",), upstream="plain", max_body_size=1000),
        Route(name="slow", hosts=("slow.test",), paths=("/",), upstream="slow"),
        Route(name="tls", hosts=("tls.test",), paths=("/",), upstream="tls"),
        Route(name="wrong", hosts=("wrong.test",), paths=("/",), upstream="wrong"),
        Route(name="dead", hosts=("dead.test",), paths=("/",), upstream="dead"),
        Route(name="renamed", hosts=("renamed.test",), paths=("/",), upstream="renamed"),
        Route(name="sub", hosts=("a.edge.test",), paths=("/",), upstream="plain"),
    )
    # Room for the streaming tests' uploads (EDGE_E2E_BIG, 256 MiB in CI).
    big = int(os.environ.get("EDGE_E2E_BIG", str(256 * 1024 * 1024)))
    limits = Limits(client_idle_timeout=30.0, max_body_size=max(512 * 1024 * 1024, 2 * big))
    plainListener = Listener(name="plain", endpoint="tcp:0", tls=False, limits=limits)
    tlsListener = Listener(name="tls", endpoint="tcp:0", tls=True, limits=limits)
    config = Config(
        path=str(directory / "edge.ini"),
        proxy=ProxySettings(access_log=None, via="edge", limits=limits),
        tls=None,
        listeners=(plainListener, tlsListener),
        upstreams=upstreams,
        routes=routes,
    )
    runtime = Runtime.build(config, reactor)
    plainSite = ListenerFactory(lambda: runtime, plainListener, reactor)
    tlsSite = ListenerFactory(lambda: runtime, tlsListener, reactor)
    proxyPlain = reactor.listenTCP(0, plainSite, interface="127.0.0.1")
    proxyTLS = reactor.listenSSL(0, tlsSite, _serverOptions(edge), interface="127.0.0.1")

    ports = {
        "proxy": proxyPlain.getHost().port,
        "proxyTLS": proxyTLS.getHost().port,
        "plain": plainPort.getHost().port,
        "tls": tlsPort.getHost().port,
        "wrong": wrongPort.getHost().port,
        "dead": deadNumber,
        "pid": os.getpid(),
    }
    tmp = directory / "ports.json.tmp"
    tmp.write_text(json.dumps(ports))
    tmp.rename(directory / "ports.json")
    reactor.run()


def runOrigin(directory: Path) -> None:
    """
    The plain origin alone (for tests that run edgeproxy with twistd):
    C{DIR/ports.json} says its port.
    """
    from twisted.internet import reactor

    recorder = Recorder(directory)
    port = reactor.listenTCP(0, OriginFactory("plain", recorder, reactor), interface="127.0.0.1")
    tmp = directory / "ports.json.tmp"
    tmp.write_text(json.dumps({"plain": port.getHost().port, "pid": os.getpid()}))
    tmp.rename(directory / "ports.json")
    reactor.run()


if __name__ == "__main__":
    if sys.argv[1] == "--origin":
        runOrigin(Path(sys.argv[2]))
    else:
        runHarness(Path(sys.argv[1]))
