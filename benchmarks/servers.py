# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
The servers of a benchmark run: the origin, edgeproxy, nginx and HAProxy.

Every configuration is generated here from the same few facts (the
certificate, the origin's port, the listening port, the CPU to pin to), so
the three proxies are configured the same way: TLS 1.3 only, the same ECDSA
P-256 certificate, HTTP/1.1 and HTTP/2 by ALPN, one process on one CPU,
access logs off, and HTTP/1.1 keep-alive to the one origin (64 idle
connections kept).  Each server runs in the foreground as our child and is
stopped by its pid in L{Server.stop}.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import httpwire, procstat

SMALL_PATH = "/1k"
LARGE_PATH = "/1m"
SMALL_SIZE = 1024
LARGE_SIZE = 1024 * 1024
IDLE_KEEPALIVE = 64
"""Idle connections to the origin every proxy keeps open."""


def freePort() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinTo(cpus: set[int] | None):
    """
    A C{preexec_fn} that pins the child (and so everything it forks, like
    nginx workers) to C{cpus}; L{None} leaves the affinity alone.
    """
    if cpus is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


@dataclass
class Server:
    """A child process we started, with its logs, stopped by pid."""

    name: str
    argv: list[str]
    logDir: Path
    cpus: set[int] | None = None
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = None
    knownPids: set[int] = field(default_factory=set)

    def start(self) -> None:
        self.logDir.mkdir(parents=True, exist_ok=True)
        out = open(self.logDir / f"{self.name}.out", "wb")
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=pinTo(self.cpus),
                # Its own session: a ^C at the terminal reaches only run.py,
                # whose finally: then stops every server by pid.
                start_new_session=True,
                env=self.env,
            )
        finally:
            out.close()
        self.knownPids.add(self.process.pid)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        """The live process tree (for CPU time: master and workers)."""
        found = procstat.tree(self.pid) if self.alive() else []
        self.knownPids.update(found)
        return found

    def servingPids(self) -> list[int]:
        """
        The processes that hold client connections, whose memory is R4: for
        nginx the workers (the master only forks and waits), for the others
        the whole tree.
        """
        found = self.pids()
        if self.name.startswith("nginx") and len(found) > 1:
            return found[1:]
        return found

    def rssKiB(self) -> int:
        return sum(procstat.rssKiB(pid) for pid in self.servingPids())

    def cpuSeconds(self) -> float:
        return procstat.cpuSeconds(self.pids())

    def logTail(self, lines: int = 30) -> str:
        try:
            text = (self.logDir / f"{self.name}.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """
        SIGTERM the pid we started, wait up to C{timeout}, then SIGKILL it
        and every descendant pid we ever saw that is still alive.
        """
        if self.process is None:
            return
        self.pids()
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
            except ProcessLookupError:
                pass
        for pid in self.knownPids - {self.process.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# --- configurations -------------------------------------------------------


def nginxOriginConfig(root: Path, port: int, prefix: Path) -> str:
    """
    nginx as the origin: static files from C{root}, plain HTTP/1.1,
    keep-alive without a request limit, no logs, sendfile.
    """
    return f"""\
worker_processes 1;
daemon off;
pid {prefix}/origin.pid;
error_log {prefix}/origin-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    open_file_cache max=16 inactive=600s;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/origin-body;
    proxy_temp_path {prefix}/origin-proxy;
    fastcgi_temp_path {prefix}/origin-fastcgi;
    uwsgi_temp_path {prefix}/origin-uwsgi;
    scgi_temp_path {prefix}/origin-scgi;
    server {{
        listen 127.0.0.1:{port} default_server backlog=4096;
        root {root};
    }}
}}
"""


CACHE_TTL = "1h"
"""How long the cache figures' proxies keep the origin's objects (which
carry no lifetime of their own)."""


def nginxProxyConfig(
    port: int,
    originPort: int,
    certificate: Path,
    key: Path,
    prefix: Path,
    workers: int = 1,
    tag: str = "nginx",
    cache: bool = False,
) -> str:
    """
    nginx as the proxy under test.  C{proxy_max_temp_file_size 0} keeps
    large responses streaming through memory buffers, as edgeproxy does,
    instead of spooling them to disk; the request limit per connection is
    lifted so that keep-alive and HTTP/2 connections live as long as the run.

    With C{cache}, the cache figures' nginx: C{proxy_cache} in a directory
    of the run (objects as files, the keys in shared memory), keeping a
    200 for L{CACHE_TTL}; it spools what it stores, as a cache must.
    """
    cachePath = (
        f"    proxy_cache_path {prefix}/{tag}-cache levels=1:2 keys_zone={tag}:10m max_size=1g"
        f" inactive=1h use_temp_path=off;\n"
        if cache
        else ""
    )
    cacheLines = (
        f"            proxy_cache {tag};\n"
        f"            proxy_cache_valid 200 {CACHE_TTL};\n"
        if cache
        else "            proxy_max_temp_file_size 0;\n"
    )
    return f"""\
worker_processes {workers};
daemon off;
pid {prefix}/{tag}.pid;
error_log {prefix}/{tag}-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/{tag}-body;
    proxy_temp_path {prefix}/{tag}-proxy;
    fastcgi_temp_path {prefix}/{tag}-fastcgi;
    uwsgi_temp_path {prefix}/{tag}-uwsgi;
    scgi_temp_path {prefix}/{tag}-scgi;
{cachePath}    upstream app {{
        server 127.0.0.1:{originPort};
        keepalive {IDLE_KEEPALIVE};
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2 default_server;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
{cacheLines}        }}
    }}
}}
"""


def haproxyConfig(
    port: int, originPort: int, pem: Path, threads: int = 1
) -> str:
    """
    HAProxy as the proxy under test: one process, C{nbthread} threads,
    HTTP mode, keep-alive on both sides and server connections reused by
    every client (C{http-reuse always}, the closest to a keep-alive pool).
    """
    return f"""\
global
    nbthread {threads}
    maxconn 9000
    ssl-default-bind-options ssl-min-ver TLSv1.3

defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 60s
    timeout http-keep-alive 300s
    timeout http-request 10s

frontend https
    bind 127.0.0.1:{port} ssl crt {pem} alpn h2,http/1.1 ssl-min-ver TLSv1.3
    http-request set-header X-Forwarded-Proto https
    default_backend app

backend app
    server origin 127.0.0.1:{originPort} pool-max-conn {IDLE_KEEPALIVE * 4}
"""


def edgeproxyConfig(
    port: int, originPort: int, certificates: Path, workers: int | None = None, cache: bool = False
) -> str:
    """
    The C{edge.ini} of the run (the format of C{docs/configuration.rst}).
    C{workers} is written only when asked for (the whole-machine figure), so
    the single-core figures do not depend on that key.  With C{cache}, the
    cache figures' edgeproxy: the route cached, the objects kept for
    L{CACHE_TTL} (C{default_ttl}), in the memory tier.
    """
    workersLine = f"workers = {workers}\n" if workers is not None else ""
    cacheLines = (
        f"cache = yes\ndefault_ttl = {CACHE_TTL}\n\n[cache]\nmemory = 256MiB\n" if cache else ""
    )
    return f"""\
[edgeproxy]
access_log = off
{workersLine}
[tls]
certificates = {certificates}
min_version = 1.3

[listen:https]
endpoint = tcp:{port}:interface=127.0.0.1
tls = yes

[upstream:app]
servers = 127.0.0.1:{originPort}
keepalive = {IDLE_KEEPALIVE}

[route:app]
hosts = *
paths = /
upstream = app
{cacheLines}"""


def edgeproxySecuredConfig(
    port: int, originPort: int, certificates: Path, jwks: Path
) -> str:
    """
    The C{edge.ini} of the R1s figure: the run's configuration with an
    allow rule, a local rate limit (never reached) and JWT authentication
    on the route C{wrk} loads; the readiness probe (C{Host: localhost}) has
    a route of its own without them.
    """
    base = edgeproxyConfig(port, originPort, certificates).replace(
        "[route:app]\nhosts = *\npaths = /\nupstream = app\n", ""
    )
    return base + f"""[ratelimit:clients]
rate = 1000000/s
burst = 1000000

[auth:tokens]
type = jwt
jwks = {jwks}
issuer = https://bench.invalid/
audience = edgeproxy-bench
algorithms = RS256
claims_to_headers = sub:X-Auth-Subject

[route:probe]
hosts = localhost
upstream = app

[route:app]
hosts = *
paths = /
upstream = app
allow = 127.0.0.0/8
rate_limit = clients
auth = tokens
"""


def securedCredentials(directory: Path) -> tuple[str, Path]:
    """A JWKS file in C{directory} and a token it verifies (valid a day)."""
    import json
    import time

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    document = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    document["kid"] = "bench"
    path = directory / "jwks.json"
    path.write_text(json.dumps({"keys": [document]}))
    claims = {"sub": "bench", "iss": "https://bench.invalid/", "aud": "edgeproxy-bench",
              "exp": int(time.time()) + 86400}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench"}), path


# --- readiness --------------------------------------------------------------


@dataclass
class Probe:
    """What one HTTPS request to a proxy showed."""

    status: int
    bodyLength: int
    tlsVersion: str
    cipher: str
    alpn: str | None
    keyType: str
    resumption: bool
    """Whether a second connection resumed the first one's TLS session."""


def _readResponse(sock: socket.socket, deadline: float) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response; (status, body)."""
    data = b""
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"incomplete response: {data[:200]!r}")
        chunk = sock.recv(65536)
        data += chunk
        parsed = httpwire.parse(data, closed=not chunk)
        if parsed is not None:
            return parsed
        if not chunk:
            raise ConnectionError(f"closed mid-response: {data[:200]!r}")


def probe(port: int, caFile: Path, timeout: float = 5.0) -> Probe:
    """
    One verified HTTPS request for C{/1k} (ALPN offering h2 and http/1.1,
    SNI C{localhost}), then a second connection offering the first one's
    session, to record whether the server resumes TLS sessions.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    context = ssl.create_default_context(cafile=str(caFile))
    context.set_alpn_protocols(["h2", "http/1.1"])
    deadline = time.monotonic() + timeout
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        alpn = sock.selected_alpn_protocol()
        version = sock.version() or "?"
        cipher = sock.cipher()[0]
        der = sock.getpeercert(binary_form=True)
        # HTTP/1.1 for the probe itself, on a connection that did not offer h2.
    context11 = ssl.create_default_context(cafile=str(caFile))
    context11.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with context11.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(
            f"GET {SMALL_PATH} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
        )
        status, body = _readResponse(sock, deadline)
        session = sock.session
    resumed = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        with context11.wrap_socket(
            raw, server_hostname="localhost", session=session
        ) as sock:
            resumed = sock.session_reused
    except (OSError, ValueError):
        resumed = False
    publicKey = x509.load_der_x509_certificate(der).public_key()
    if isinstance(publicKey, ec.EllipticCurvePublicKey):
        keyType = f"ECDSA {publicKey.curve.name}"
    else:
        keyType = type(publicKey).__name__
    return Probe(status, len(body), version, cipher, alpn, keyType, resumed)


def waitReady(server: Server, port: int, caFile: Path, timeout: float) -> Probe:
    """
    Probe C{port} until it answers 200 with the 1 KiB body, the server
    exits, or C{timeout} passes; raise C{RuntimeError} with the log tail.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.name} exited with {server.process.returncode}:\n"
                + server.logTail()
            )
        try:
            result = probe(port, caFile, timeout=min(5.0, timeout))
        except (OSError, ValueError, TimeoutError, ConnectionError) as e:
            last = e
            time.sleep(0.2)
            continue
        if result.status == 200 and result.bodyLength == SMALL_SIZE:
            return result
        last = RuntimeError(f"status {result.status}, {result.bodyLength} bytes")
        time.sleep(0.2)
    raise RuntimeError(
        f"{server.name} not ready on port {port} after {timeout}s ({last}):\n"
        + server.logTail()
    )


def waitListening(server: Server, port: int, timeout: float) -> None:
    """
    Wait until something listens on C{port}, without connecting to it:
    a server that has accepted no connection yet (figure R4b).  Linux's
    C{/proc/net/tcp}; elsewhere a TCP connect, closed at once.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n" + server.logTail())
        if _listening(port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} not listening on port {port} after {timeout}s:\n" + server.logTail())


def _listening(port: int) -> bool:
    try:
        with open("/proc/net/tcp") as table:
            lines = table.read().splitlines()[1:]
    except OSError:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            return False
    wanted = f":{port:04X}"
    # Fields: sl, local address (hex ip:port), remote address, state (0A: LISTEN).
    return any(f[1].endswith(wanted) and f[3] == "0A" for f in (line.split() for line in lines) if len(f) > 3)


def waitOrigin(server: Server, port: int, timeout: float) -> None:
    """Wait until the plain-HTTP origin serves the 1 KiB file."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"origin exited:\n{server.logTail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(f"GET {SMALL_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                status, body = _readResponse(s, time.monotonic() + 2)
                if status == 200 and len(body) == SMALL_SIZE:
                    return
                last = RuntimeError(f"status {status}, {len(body)} bytes")
        except (OSError, TimeoutError, ConnectionError) as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"origin not ready after {timeout}s ({last}):\n{server.logTail()}")
