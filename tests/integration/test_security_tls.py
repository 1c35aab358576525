"""
Client certificates and the PROXY protocol over real sockets on 127.0.0.1,
against a real C{twistd edgeproxy} with a CA made at test time:

  - a name whose route requires a certificate fails the handshake without
    one, and forwards the verified subject, SAN and fingerprint (the
    client's own copies removed);
  - a request whose C{Host} has another certificate policy than the SNI
    name of its connection gets 421;
  - a session made under one policy is never resumed under another;
  - PROXY protocol v1 and v2 in (the address becomes the client for access
    rules, logs and forwarding), refused from an address not listed, and
    v1 and v2 out to a backend that reads them;
  - the bypass spellings of L{tests.test_security_bypass} over HTTP/2,
    against an allow rule, authentication and a rate limit.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.proxyheader import header
from tests.certutil import CertificateAuthority
from tests.proc import NotifyReceiver, Twistd, freePort, logContaining, readResponse, startTwistd


class RawBackend:
    """
    An HTTP/1.1 origin that records every connection's bytes (the PROXY
    header included) and answers each request with 200 and C{ok}.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        self.connections: list[bytes] = []
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        data = pending = b""
        index = len(self.connections)
        self.connections.append(b"")
        conn.settimeout(5)
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
                pending += chunk
                self.connections[index] = data
                if pending.startswith(b"\r\n\r\n\x00\r\nQUIT\n") and len(pending) >= 16:
                    # A PROXY v2 header (its signature holds a blank line).
                    pending = pending[16 + struct.unpack("!H", pending[14:16])[0]:]
                while b"\r\n\r\n" in pending:
                    _, _, pending = pending.partition(b"\r\n\r\n")
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            return
        finally:
            conn.close()

    def last(self) -> bytes:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.connections and b"\r\n\r\n" in self.connections[-1]:
                return self.connections[-1]
            time.sleep(0.02)
        raise AssertionError("nothing reached the backend")

    def requests(self) -> int:
        """Requests received so far, on every connection."""
        return sum(data.count(b" HTTP/1.1\r\n") for data in self.connections)

    def close(self) -> None:
        self._stop = True
        self.sock.close()


CONFIG = """\
[edgeproxy]
access_log = access.log

[tls]
certificates = site.pem

[listen:tls]
endpoint = tcp:{tls}:interface=127.0.0.1
tls = yes
client_ca = clients.pem

[listen:proxied]
endpoint = tcp:{proxied}:interface=127.0.0.1
proxy_protocol = yes
proxy_protocol_from = 127.0.0.1

[listen:elsewhere]
endpoint = tcp:{elsewhere}:interface=127.0.0.1
tls = yes
proxy_protocol = yes
proxy_protocol_from = 10.0.0.0/8

[upstream:plain]
servers = 127.0.0.1:{backend}

[upstream:v1]
servers = 127.0.0.1:{backend}
proxy_protocol = v1

[upstream:v2]
servers = 127.0.0.1:{backend}
proxy_protocol = v2

[route:private]
hosts = private.example
upstream = plain
require_client_certificate = yes
client_certificate_headers = subject:X-Client-Subject, san:X-Client-SAN, fingerprint:X-Client-SHA256

[route:admin]
hosts = public.example
paths = /admin
upstream = plain
allow = 203.0.113.0/24, 2001:db8::/32

[auth:tokens]
type = jwt
algorithms = HS256
secret_file = jwt.secret

[ratelimit:once]
rate = 1/h
burst = 1

[route:secret]
hosts = public.example
paths = /secret
upstream = plain
auth = tokens

[route:limited]
hosts = public.example
paths = /limited
upstream = plain
rate_limit = once

[route:v1]
hosts = public.example
paths = /v1
upstream = v1

[route:v2]
hosts = public.example
paths = /v2
upstream = v2

[route:public]
hosts = public.example
upstream = plain
client_certificate_headers = subject:X-Client-Subject
"""


JWT_SECRET = "0123456789abcdef0123456789abcdef-jwt"


class Edge:
    def __init__(self, directory: Path, process: Twistd, ports: dict[str, int], ca: CertificateAuthority,
                 client: Any, stranger: Any) -> None:
        self.directory = directory
        self.process = process
        self.ports = ports
        self.ca = ca
        self.client = client
        self.stranger = stranger

    def context(self, certificate: Any = None, version: Any = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.directory / "root.pem"))
        if version is not None:
            context.minimum_version = context.maximum_version = version
        if certificate is not None:
            context.load_cert_chain(str(certificate))
        return context

    def accessLog(self) -> str:
        return (self.directory / "access.log").read_text()


@pytest.fixture(scope="module")
def backend() -> Iterator[RawBackend]:
    served = RawBackend()
    yield served
    served.close()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, backend: RawBackend) -> Iterator[Edge]:
    directory = tmp_path_factory.mktemp("edge-security-tls")
    root = CertificateAuthority("edge test root")
    root.writeCertificate(directory / "root.pem")
    root.issue(["public.example", "private.example"]).writePEM(directory / "site.pem")
    clients = CertificateAuthority("edge client CA")
    clients.writeCertificate(directory / "clients.pem")
    client = clients.issue(["ann.example"], clientAuth=True)
    client.writePEM(directory / "client.pem")
    stranger = CertificateAuthority("someone else").issue(["mallory.example"], clientAuth=True)
    stranger.writePEM(directory / "stranger.pem")
    (directory / "jwt.secret").write_text(JWT_SECRET + "\n")
    ports = {"tls": freePort(), "proxied": freePort(), "elsewhere": freePort()}
    (directory / "edge.ini").write_text(CONFIG.format(backend=backend.port, **ports))
    notify = NotifyReceiver()
    process = startTwistd(directory / "edge.ini", directory, notify)
    try:
        yield Edge(directory, process, ports, root, client, stranger)
    finally:
        process.stop()
        notify.close()


def tlsRequest(edge: Edge, sni: str, host: str, certificate: Any = None, path: str = "/",
               extra: str = "", version: Any = None, session: Any = None) -> tuple[int, dict[str, str], bytes, ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", edge.ports["tls"]), timeout=5)
    sock = edge.context(certificate, version).wrap_socket(raw, server_hostname=sni, session=session)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    status, headers, body = readResponse(sock)
    return status, headers, body, sock


def refusedHandshake(edge: Edge, sni: str, certificate: Any = None) -> bool:
    raw = socket.create_connection(("127.0.0.1", edge.ports["tls"]), timeout=5)
    try:
        sock = edge.context(certificate).wrap_socket(raw, server_hostname=sni)
        # TLS 1.3: the server's refusal of the (missing) certificate comes
        # after the client's side of the handshake is done.
        sock.sendall(b"GET / HTTP/1.1\r\nHost: " + sni.encode() + b"\r\n\r\n")
        return sock.recv(100) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
    finally:
        raw.close()


def test_requiredCertificateRefusedWithoutOne(edge: Edge) -> None:
    assert refusedHandshake(edge, "private.example")


def test_certificateOfAnotherCARefused(edge: Edge) -> None:
    assert refusedHandshake(edge, "private.example", edge.directory / "stranger.pem")
    assert refusedHandshake(edge, "public.example", edge.directory / "stranger.pem")


def test_verifiedFactsForwardedForgedOnesRemoved(edge: Edge, backend: RawBackend) -> None:
    status, _, _, sock = tlsRequest(
        edge, "private.example", "private.example", edge.directory / "client.pem",
        extra="X-Client-Subject: CN=admin\r\nX-Client-SHA256: 00\r\n",
    )
    sock.close()
    assert status == 200
    seen = backend.last().decode("latin-1").lower()
    assert "x-client-subject: cn=ann.example\r\n" in seen
    assert "x-client-san: dns:ann.example\r\n" in seen
    assert "cn=admin" not in seen
    from cryptography.hazmat.primitives.serialization import Encoding
    import hashlib

    fingerprint = hashlib.sha256(edge.client.certificate.public_bytes(Encoding.DER)).hexdigest()
    assert f"x-client-sha256: {fingerprint}\r\n" in seen


def test_publicNameWithoutCertificate(edge: Edge, backend: RawBackend) -> None:
    status, _, _, sock = tlsRequest(edge, "public.example", "public.example", extra="X-Client-Subject: CN=admin\r\n")
    sock.close()
    assert status == 200
    assert b"cn=admin" not in backend.last().lower()


@pytest.mark.parametrize("certificate", [None, "client.pem"])
def test_hostWithOtherPolicyThanSNIIs421(edge: Edge, certificate: str | None) -> None:
    status, _, _, sock = tlsRequest(
        edge, "public.example", "private.example",
        None if certificate is None else edge.directory / certificate,
    )
    sock.close()
    assert status == 421


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumptionNeverCrossesPolicies(edge: Edge, version: Any) -> None:
    context = edge.context(None, version)
    raw = socket.create_connection(("127.0.0.1", edge.ports["tls"]), timeout=5)
    sock = context.wrap_socket(raw, server_hostname="public.example")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: public.example\r\n\r\n")
    assert readResponse(sock)[0] == 200
    session = sock.session
    sock.close()
    # The same name: resumed (so resumption is on, and the test means something).
    raw = socket.create_connection(("127.0.0.1", edge.ports["tls"]), timeout=5)
    again = context.wrap_socket(raw, server_hostname="public.example", session=session)
    again.sendall(b"GET / HTTP/1.1\r\nHost: public.example\r\n\r\n")
    assert readResponse(again)[0] == 200
    assert again.session_reused
    again.close()
    # The name that requires a certificate: not resumed, and refused.
    raw = socket.create_connection(("127.0.0.1", edge.ports["tls"]), timeout=5)
    try:
        crossed = context.wrap_socket(raw, server_hostname="private.example", session=session)
        crossed.sendall(b"GET / HTTP/1.1\r\nHost: private.example\r\n\r\n")
        assert not crossed.session_reused
        assert crossed.recv(100) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        raw.close()


def proxiedRequest(edge: Edge, listener: str, proxyHeader: bytes, path: str) -> tuple[int, dict[str, str], bytes]:
    sock = socket.create_connection(("127.0.0.1", edge.ports[listener]), timeout=5)
    sock.sendall(proxyHeader + f"GET {path} HTTP/1.1\r\nHost: public.example\r\n\r\n".encode())
    try:
        return readResponse(sock)
    finally:
        sock.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxyProtocolIn(edge: Edge, backend: RawBackend, version: str) -> None:
    proxyHeader = header(version, "203.0.113.9", 51000, "127.0.0.1", edge.ports["proxied"])
    status, _, _ = proxiedRequest(edge, "proxied", proxyHeader, "/admin")
    assert status == 200
    assert b"X-Forwarded-For: 203.0.113.9\r\n" in backend.last()
    time.sleep(0.1)
    assert '203.0.113.9 - - ' in logContaining(edge.directory / "access.log", '203.0.113.9 - - ')
    # The balancer's own address is not let in by the rule.
    status, _, _ = proxiedRequest(
        edge, "proxied", header(version, "198.51.100.1", 1, "127.0.0.1", 2), "/admin"
    )
    assert status == 403


def test_proxyProtocolIPv6(edge: Edge, backend: RawBackend) -> None:
    status, _, _ = proxiedRequest(edge, "proxied", header("v2", "2001:db8::9", 1, "2001:db8::1", 80), "/admin")
    assert status == 200
    assert b"X-Forwarded-For: 2001:db8::9\r\n" in backend.last()


def test_missingOrBrokenHeaderClosed(edge: Edge) -> None:
    for data in (b"GET /admin HTTP/1.1\r\nHost: public.example\r\n\r\n", b"PROXY TCP4 x y 1 2\r\n\r\n"):
        sock = socket.create_connection(("127.0.0.1", edge.ports["proxied"]), timeout=5)
        sock.sendall(data)
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
        sock.close()


def test_headerFromAnUnlistedAddressRefused(edge: Edge) -> None:
    # Closed at once, before any byte is read (possibly while the client
    # is still connecting: a reset is a refusal too).
    try:
        with socket.create_connection(("127.0.0.1", edge.ports["elsewhere"]), timeout=5) as sock:
            sock.sendall(header("v1", "203.0.113.9", 1, "127.0.0.1", 2))
            assert sock.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxyProtocolOut(edge: Edge, backend: RawBackend, version: str) -> None:
    # Through the PROXY listener, so the client is 203.0.113.9.
    proxyHeader = header("v1", "203.0.113.9", 51000, "192.0.2.1", 443)
    status, _, _ = proxiedRequest(edge, "proxied", proxyHeader, f"/{version}/x")
    assert status == 200
    seen = backend.last()
    if version == "v1":
        assert seen.startswith(b"PROXY TCP4 203.0.113.9 192.0.2.1 51000 443\r\nGET /v1/x HTTP/1.1\r\n")
    else:
        assert seen.startswith(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c")
        assert socket.inet_ntoa(seen[16:20]) == "203.0.113.9"
        assert struct.unpack("!HH", seen[24:28]) == (51000, 443)
        assert b"GET /v2/x HTTP/1.1\r\n" in seen


H2_SPELLINGS = [
    # An allow rule.
    ("/admin", 403),
    ("/%61dmin", 403),
    ("/x/../admin", 403),
    ("/%2e/admin", 403),
    ("//admin", 400),
    ("/admin;x=1", 400),
    # Authentication (no token).
    ("/secret", 401),
    ("/%73ecret/x", 401),
    ("/x/../secret", 401),
    ("/%2e/secret", 401),
    ("//secret", 400),
    ("/secret;x=1", 400),
]


def h2Client(edge: Edge) -> Any:
    """An HTTP/2 client of the TLS listener (the test skipped while no
    listener offers h2)."""
    from tests.proc import H2Client

    context = edge.context()
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", edge.ports["tls"]), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="public.example") as probe:
            if probe.selected_alpn_protocol() != "h2":
                pytest.skip("HTTP/2 is not offered yet")
    client: Any = H2Client(edge.ports["tls"], "public.example", edge.directory / "root.pem")
    return client


@pytest.mark.parametrize("path, status", H2_SPELLINGS)
def test_http2BypassAttempts(edge: Edge, backend: RawBackend, path: str, status: int) -> None:
    """The spellings of the HTTP/1.1 bypass tables
    (L{tests.test_security_bypass}) over HTTP/2: nothing reaches the backend."""
    before = backend.requests()
    client = h2Client(edge)
    try:
        for authority in ("public.example", "PUBLIC.example."):
            got, _ = client.get(path, authority)
            assert got == status
    finally:
        client.close()
    assert backend.requests() == before


def test_http2TokenLetsIn(edge: Edge, backend: RawBackend) -> None:
    """The authenticated route does let a valid token in over HTTP/2 (so
    its 401s above are the auth stage's)."""
    import jwt

    token = jwt.encode({"sub": "ann", "exp": int(time.time()) + 300}, JWT_SECRET, algorithm="HS256")
    client = h2Client(edge)
    try:
        got, body = client.get("/%73ecret/x", "public.example", (("authorization", f"Bearer {token}"),))
    finally:
        client.close()
    assert (got, body) == (200, b"ok")
    assert any(b"GET /secret/x HTTP/1.1\r\n" in data for data in backend.connections)


H2_LIMITED = [
    ("/limited", 429),
    ("/%6cimited", 429),
    ("/x/../limited", 429),
    ("/%2e/limited/x", 429),
    ("//limited", 400),
    ("/limited;x=1", 400),
]


def test_http2RateLimitNotBypassed(edge: Edge, backend: RawBackend) -> None:
    """
    A limit of one request an hour: once it is spent, no spelling over
    HTTP/2, on a new stream or a new connection, reaches the backend.
    """
    client = h2Client(edge)
    try:
        assert client.get("/limited", "public.example")[0] == 200
        before = backend.requests()
        for path, status in H2_LIMITED:
            for authority in ("public.example", "PUBLIC.example."):
                assert (path, client.get(path, authority)[0]) == (path, status)
    finally:
        client.close()
    again = h2Client(edge)
    try:
        assert again.get("/%6cimited", "public.example")[0] == 429
    finally:
        again.close()
    assert backend.requests() == before
