# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
A load generator of new TLS connections, each a full handshake, for R2.

    python benchmarks/handshakes.py PORT CONCURRENCY SECONDS

Why not wrk with C{Connection: close}: wrk keeps the TLS session of a
connection it closes and offers it on the next one (it calls C{SSL_clear},
which keeps the session), so against a server that issues TLS 1.3 session
tickets every connection after the first is a resumption, not a full
handshake; that is figure R2r.  And h2load never opens a second connection
per client.  This client starts every connection without a session, so each
one costs the server an ECDHE key exchange and an ECDSA P-256 signature.

C{CONCURRENCY} connections are in progress at any time; each connects,
handshakes (TLS 1.3, ALPN http/1.1), sends C{GET /1k} with
C{Connection: close}, reads the whole response and closes; a new one
replaces it at once.  After C{SECONDS} it stops starting new ones, waits up
to 5 s for those in progress, and prints one JSON line: connections
completed, seconds, errors, non-2xx responses, p50 and p99 in milliseconds
(connect to last response byte).

One process, non-blocking sockets and a selector.  It is pure Python, so on
a fast server it can be the limit: the suite records its CPU use next to
the figure.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import ssl
import statistics
import sys
import time

import httpwire  # beside this script, which is run by path

REQUEST = b"GET /1k HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


class Attempt:
    def __init__(self, context: ssl.SSLContext, port: int) -> None:
        self.started = time.monotonic()
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        self.sock = context.wrap_socket(
            raw, server_hostname="localhost", do_handshake_on_connect=False
        )
        self.sock.connect_ex(("127.0.0.1", port))
        self.state = "handshake"
        self.toSend = REQUEST
        self.received = bytearray()

    def step(self) -> int:
        """Selector events to wait for, or 0 once the response is complete."""
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
                else:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        return 0
                    self.received += chunk
                    # Done at the last byte of the response: the server's
                    # close is not waited for (it does not change the work
                    # the server did for this connection).
                    if httpwire.parse(bytes(self.received)) is not None:
                        return 0
            except ssl.SSLWantReadError:
                return selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                return selectors.EVENT_WRITE
            except ssl.SSLZeroReturnError:
                return 0
            except (BlockingIOError, InterruptedError):
                return (
                    selectors.EVENT_WRITE
                    if self.state in ("handshake", "send")
                    else selectors.EVENT_READ
                )

    def succeeded(self) -> bool | None:
        """True for a complete 2xx/3xx, False for another status, None if
        the response is incomplete (the server closed too early)."""
        parsed = httpwire.parse(bytes(self.received), closed=True)
        if parsed is None:
            return None
        return 200 <= parsed[0] < 400


def run(port: int, concurrency: int, seconds: float) -> dict[str, float | int | None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    selector = selectors.DefaultSelector()
    latencies: list[float] = []
    errors = bad = 0
    begin = time.monotonic()
    stopStarting = begin + seconds
    hardStop = stopStarting + 5.0
    inFlight = 0

    def finish(attempt: Attempt, outcome: bool | None) -> None:
        nonlocal errors, bad, inFlight
        selector.unregister(attempt.sock)
        attempt.sock.close()
        inFlight -= 1
        if outcome is None:
            errors += 1
        elif outcome:
            latencies.append((time.monotonic() - attempt.started) * 1000.0)
        else:
            bad += 1

    while True:
        now = time.monotonic()
        if now >= hardStop or (now >= stopStarting and not inFlight):
            break
        while now < stopStarting and inFlight < concurrency:
            attempt = Attempt(context, port)
            selector.register(attempt.sock, selectors.EVENT_WRITE, attempt)
            inFlight += 1
        for key, _ in selector.select(timeout=0.5):
            attempt = key.data
            try:
                events = attempt.step()
            except (OSError, ValueError):
                finish(attempt, None)
                continue
            if events:
                selector.modify(attempt.sock, events, attempt)
            else:
                finish(attempt, attempt.succeeded())
    elapsed = time.monotonic() - begin
    errors += inFlight
    p50 = p99 = None
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        p50, p99 = cuts[49], cuts[98]
    return {
        "connections": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed if elapsed else 0.0,
        "errors": errors,
        "bad": bad,
        "p50ms": p50,
        "p99ms": p99,
    }


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))))
