"""
Starting the real C{twistd edgeproxy} process for integration tests, and the
things those tests talk to it with: a C{NOTIFY_SOCKET} receiver, free ports,
TLS handshakes, and a tiny threaded HTTP backend with a slow path.

Every wait here is bounded; nothing sleeps longer than it must.
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

REPO = Path(__file__).resolve().parent.parent


def twistdCommand() -> list[str]:
    """
    The twistd of the running interpreter's environment.  C{python -m
    twisted} would be C{twist}, another runner with other options.
    """
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def processEnvironment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """
    The environment for a child: this checkout first on C{sys.path}, so the
    child runs this code and finds this checkout's
    C{twisted/plugins/edgeproxy_plugin.py} even when the environment holds
    an older installed copy.
    """
    env = dict(os.environ)
    for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def logContaining(path: Path, *needles: str, timeout: float = 5.0) -> str:
    """
    The text of the log at C{path} once it holds every one of C{needles}
    (or when C{timeout} runs out): the proxy writes a request's access-log
    line when it has sent the response, so a client may read the log an
    instant before its line is there.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if all(needle in text for needle in needles) or time.monotonic() > deadline:
            return text
        time.sleep(0.02)


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:C{port} is refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


class NotifyReceiver:
    """A bound C{AF_UNIX} datagram socket standing in for systemd."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="edgen")
        self.path = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self.received: list[bytes] = []

    def next(self, timeout: float) -> bytes:
        """The next datagram; C{TimeoutError} after C{timeout} seconds."""
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(65536)
        except socket.timeout:
            raise TimeoutError(f"no notification within {timeout}s; got so far: {self.received!r}")
        self.received.append(data)
        return data

    def all(self) -> list[bytes]:
        """
        Every datagram queued now, without waiting: for a service in the
        test's own process, whose notifications are sent synchronously.
        """
        self._sock.setblocking(False)
        out = []
        while True:
            try:
                out.append(self._sock.recv(65536))
            except BlockingIOError:
                self.received.extend(out)
                return out

    def waitFor(self, field: bytes, timeout: float, alive: Callable[[], bool] = lambda: True) -> bytes:
        """Datagrams until one has the line C{field}; return that one."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {field!r} within {timeout}s; got {self.received!r}")
            try:
                data = self.next(min(left, 0.5))
            except TimeoutError:
                if not alive():
                    raise RuntimeError(f"process exited before sending {field!r}")
                continue
            if field in data.split(b"\n"):
                return data

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class Twistd:
    """
    One C{twistd --nodaemon --pidfile= edgeproxy --config PATH} process,
    output in files (a pipe nobody reads could block it).
    """

    def __init__(
        self,
        config: Path,
        workdir: Path,
        notify: NotifyReceiver | None = None,
        prefix: Sequence[str] = (),
        extraEnv: dict[str, str] | None = None,
        passFds: Sequence[int] = (),
    ) -> None:
        self.stdoutPath = workdir / "twistd.out"
        self.stderrPath = workdir / "twistd.err"
        env = processEnvironment(extraEnv)
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify.path
        command = [
            *prefix,
            *twistdCommand(),
            "--nodaemon",
            "--pidfile=",
            "edgeproxy",
            "--config",
            str(config),
        ]
        with open(self.stdoutPath, "wb") as out, open(self.stderrPath, "wb") as err:
            self.process = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                pass_fds=tuple(passFds),
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.stdoutPath.read_text(errors="replace") + self.stderrPath.read_text(errors="replace")

    def waitForOutput(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged within {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Make sure the process is gone (SIGTERM, then SIGKILL)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


START_TIMEOUT = 30.0
"""Seconds a twistd started by a test has to send READY=1."""


def startTwistd(config: Path, workdir: Path, notify: NotifyReceiver, **kwargs: Any) -> Twistd:
    """
    Start C{twistd edgeproxy} and wait for its READY=1.

    @raise AssertionError: it did not become ready; the message has its output.
    """
    proc = Twistd(config, workdir, notify=notify, **kwargs)
    try:
        notify.waitFor(b"READY=1", START_TIMEOUT, alive=proc.alive)
    except Exception:
        proc.stop()
        raise AssertionError(f"twistd did not become ready:\n{proc.output()}")
    return proc


def handshake(
    port: int,
    serverName: str | None,
    cafile: Path,
    alpn: Sequence[str] = ("h2", "http/1.1"),
    timeout: float = 5,
    host: str = "127.0.0.1",
) -> tuple[x509.Certificate, str | None]:
    """
    A TLS handshake with 127.0.0.1:C{port}, sending C{serverName} as SNI
    (none when L{None}); returns the certificate served and the ALPN
    protocol chosen.  The chain must verify against C{cafile}; the name is
    not checked (an unknown name gets the default certificate on purpose).
    """
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False
    context.set_alpn_protocols(list(alpn))
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=serverName) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der), tls.selected_alpn_protocol()


def tlsConnection(port: int, serverName: str, cafile: Path, timeout: float = 10) -> ssl.SSLSocket:
    """An open, verified HTTP/1.1 TLS connection (the caller closes it)."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return context.wrap_socket(raw, server_hostname=serverName)


def readResponse(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked) from C{sock}."""
    buffer = bytearray()

    def fill() -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {bytes(buffer)!r}")
        buffer.extend(chunk)

    def line() -> bytes:
        while b"\r\n" not in buffer:
            fill()
        end = buffer.index(b"\r\n")
        value = bytes(buffer[:end])
        del buffer[: end + 2]
        return value

    def exactly(count: int) -> bytes:
        while len(buffer) < count:
            fill()
        value = bytes(buffer[:count])
        del buffer[:count]
        return value

    statusLine = line().decode("latin-1")
    status = int(statusLine.split(" ", 2)[1])
    headers: dict[str, str] = {}
    while True:
        header = line()
        if not header:
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int(line().split(b";")[0], 16)
            if size == 0:
                while line():
                    pass
                break
            body += exactly(size)
            line()
        return status, headers, body
    return status, headers, exactly(int(headers.get("content-length", "0")))


def request(sock: socket.socket, target: str, host: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1"))
    return readResponse(sock)


def payload(size: int) -> bytes:
    """C{size} bytes that show any loss, repetition or reordering."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


class Backend:
    """
    A threaded HTTP/1.1 origin on 127.0.0.1 for the proxy to forward to:
    C{/slow} answers after C{slowSeconds} (and sets L{slowStarted} when the
    request arrived), C{/bytes/N} answers with N bytes (L{payload}),
    anything else answers at once with the path.

    @ivar paths: every request target received, in order.
    """

    def __init__(self, slowSeconds: float = 1.5) -> None:
        self.slowStarted = threading.Event()
        self.slowSeconds = slowSeconds
        self.paths: list[str] = []
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                backend.paths.append(self.path)
                if self.path.startswith("/slow"):
                    backend.slowStarted.set()
                    time.sleep(backend.slowSeconds)
                body = f"backend saw {self.path}\n".encode()
                if self.path.startswith("/bytes/"):
                    body = payload(int(self.path.split("/")[2]))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1})
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


SOCKET_ACTIVATION_WRAPPER = r"""
import fcntl, os, socket, sys
# Stand-in for systemd's socket activation: open the listening sockets,
# put them at fd 3, 4, ... and exec the service with LISTEN_* describing
# them; LISTEN_PID is this process, which exec keeps.
names = []
sockets = []
for spec in sys.argv[1].split(","):
    name, host, port = spec.split("=")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(128)
    names.append(name)
    sockets.append(s)
# Move them out of the way first, so that putting one at 3 + i cannot
# close another that happens to sit there.
high = [os.dup(s.fileno()) for s in sockets]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in high]
for s in sockets:
    s.close()
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index, inheritable=True)
    os.close(fd)
    os.set_inheritable(3 + index, True)
os.environ["LISTEN_FDS"] = str(len(sockets))
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDNAMES"] = ":".join(names)
command = sys.argv[2:]
os.execv(command[0], command)
"""


def socketActivationPrefix(
    workdir: Path, sockets: dict[str, int], host: str = "127.0.0.1"
) -> list[str]:
    """
    The command prefix that runs twistd under the socket-activation
    wrapper with C{sockets} (name -> port, on C{host}) at fds 3, 4, ...
    """
    script = workdir / "activate.py"
    script.write_text(SOCKET_ACTIVATION_WRAPPER)
    spec = ",".join(f"{name}={host}={port}" for name, port in sockets.items())
    return [sys.executable, str(script), spec]


class H2Client:
    """
    A minimal HTTP/2 client over a verified TLS socket (ALPN h2), enough to
    make one request and then watch the connection being closed.
    """

    def __init__(self, port: int, serverName: str, cafile: Path, timeout: float = 10) -> None:
        import h2.config
        import h2.connection

        context = ssl.create_default_context(cafile=str(cafile))
        context.check_hostname = False
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname=serverName)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def events(self) -> list:
        """The events of the next bytes received ([] at end of stream)."""
        data = self.sock.recv(65536)
        if not data:
            return []
        events = self.conn.receive_data(data)
        pending = self.conn.data_to_send()
        if pending:
            self.sock.sendall(pending)
        return events

    def get(self, path: str, authority: str, headers: tuple[tuple[str, str], ...] = ()) -> tuple[int, bytes]:
        import h2.events

        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream,
            [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path), *headers],
            end_stream=True,
        )
        self.sock.sendall(self.conn.data_to_send())
        status, body = 0, b""
        while True:
            events = self.events()
            if not events and not status:
                raise ConnectionError("connection closed before the response")
            for event in events:
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    self.sock.sendall(self.conn.data_to_send())
                    return status, body

    def close(self) -> None:
        self.sock.close()
