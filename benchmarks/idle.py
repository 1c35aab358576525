# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
Hold many idle TLS connections open against a proxy, for figure R4.

    python benchmarks/idle.py PORT COUNT HOLD_SECONDS [queued]

Each connection completes the TLS handshake, sends one C{GET /1k} over
HTTP/1.1 and reads the whole response, so the proxy holds what it holds for
a real kept-alive client between requests.  At most C{WINDOW} connections
are being set up at once (the others wait), which keeps the burst inside
every server's listen backlog.  When all are idle it prints
C{READY <open> <failed>} and holds them until standard input closes or
C{HOLD_SECONDS} pass, then closes them all and exits.

With C{queued} (figure R4b), the first C{WINDOW} connections are all
connected before any of them starts its handshake, as the clients queued
in the listen backlog of a proxy that restarts into traffic: the server
has accepted all of them before the first handshake ends.

One process, non-blocking sockets and a selector: 2,000 connections need no
threads.
"""

from __future__ import annotations

import resource
import selectors
import socket
import ssl
import sys
import time

import httpwire  # beside this script, which is run by path

WINDOW = 64
REQUEST = b"GET /1k HTTP/1.1\r\nHost: localhost\r\n\r\n"


class Connection:
    def __init__(self, context: ssl.SSLContext, port: int) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        self.sock = context.wrap_socket(
            raw, server_hostname="localhost", do_handshake_on_connect=False
        )
        # Non-blocking: EINPROGRESS here; the first EVENT_WRITE means
        # connected, and only then may the handshake start.
        self.sock.connect_ex(("127.0.0.1", port))
        self.state = "handshake"
        self.toSend = REQUEST
        self.received = b""

    def step(self) -> int:
        """
        Advance as far as the socket allows; return the selector events to
        wait for, or 0 when the connection is idle (done) or raise on error.
        """
        while True:
            try:
                if self.state == "handshake":
                    self.sock.do_handshake()
                    self.state = "send"
                elif self.state == "send":
                    sent = self.sock.send(self.toSend)
                    self.toSend = self.toSend[sent:]
                    if not self.toSend:
                        self.state = "read"
                elif self.state == "read":
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed by the server")
                    self.received += chunk
                    if self._complete():
                        self.state = "idle"
                        return 0
                else:
                    return 0
            except ssl.SSLWantReadError:
                return selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                return selectors.EVENT_WRITE
            except (BlockingIOError, InterruptedError):
                return (
                    selectors.EVENT_WRITE
                    if self.state in ("handshake", "send")
                    else selectors.EVENT_READ
                )

    def _complete(self) -> bool:
        parsed = httpwire.parse(self.received)
        if parsed is None:
            return False
        if parsed[0] != 200:
            raise ConnectionError(f"unexpected status {parsed[0]}")
        return True


def hold(port: int, count: int, holdSeconds: float, setupTimeout: float = 60.0, queued: bool = False) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    selector = selectors.DefaultSelector()
    idle: list[Connection] = []
    failed = 0
    started = 0
    inFlight = 0
    deadline = time.monotonic() + setupTimeout
    if queued:
        waiting = [Connection(context, port) for _ in range(min(WINDOW, count))]
        connecting = selectors.DefaultSelector()
        for conn in waiting:
            connecting.register(conn.sock, selectors.EVENT_WRITE, conn)
        left = len(waiting)
        while left and time.monotonic() < deadline:
            for key, _ in connecting.select(timeout=1.0):
                connecting.unregister(key.fileobj)
                left -= 1
        connecting.close()
        # Time for the server to accept them all.
        time.sleep(0.5)
        for conn in waiting:
            started += 1
            inFlight += 1
            selector.register(conn.sock, selectors.EVENT_WRITE, conn)
    while (started < count or inFlight) and time.monotonic() < deadline:
        while started < count and inFlight < WINDOW:
            conn = Connection(context, port)
            started += 1
            inFlight += 1
            selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        for key, _ in selector.select(timeout=1.0):
            conn = key.data
            try:
                events = conn.step()
            except (OSError, ConnectionError, ValueError):
                selector.unregister(conn.sock)
                conn.sock.close()
                failed += 1
                inFlight -= 1
                continue
            if events:
                selector.modify(conn.sock, events, conn)
            else:
                selector.unregister(conn.sock)
                idle.append(conn)
                inFlight -= 1
    failed += inFlight
    print(f"READY {len(idle)} {failed}", flush=True)
    # Hold until the parent closes our stdin (it has measured) or time is up.
    end = time.monotonic() + holdSeconds
    stdinSelector = selectors.DefaultSelector()
    stdinSelector.register(sys.stdin, selectors.EVENT_READ)
    while time.monotonic() < end:
        if stdinSelector.select(timeout=max(0.0, end - time.monotonic())):
            if not sys.stdin.buffer.read1(4096):
                break
    for conn in idle:
        conn.sock.close()


if __name__ == "__main__":
    hold(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), queued=sys.argv[4:] == ["queued"])
