# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
CPU cost of one proxied request in edgeproxy's own code, measured in memory.

    .venv/bin/python benchmarks/inproc.py [--tls] [--cache] [--fast-paths off] [--requests N] [--runs R] [--profile]

The whole HTTP path of a kept-alive connection runs here as in production:
the listener's L{HTTP1Connection} parses the request and routes it, the
route's stages (the forward stage alone) rewrite its fields, the real
L{UpstreamPool} and L{UpstreamClient} write it to a backend connection, the
backend's response (1 KiB, as nginx sends it) is parsed, filtered and written
back to the client, and the request is finished and counted.  What is left out is what does not depend on
edgeproxy's code: sockets, the reactor's polling, and TLS (the client and the
backend are C{StringTransport}s).

The figure is process CPU time per request (median of C{--runs} runs), so it
stays meaningful on a busy machine where wall-clock benchmarks do not: use it
for A/B comparisons of hot-path changes, and C{run.py} for the figures of
issue 5.  C{--profile} prints a cProfile of one run instead.  C{--cache}
measures a cache hit instead: the route has C{cache = yes}, the first
request stores the response, and the others are answered from the memory
tier without the backend.
"""

from __future__ import annotations

import argparse
from email.utils import formatdate
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Run as a script, this folder comes first on sys.path, and its profile.py
# would shadow the standard library's (which cProfile imports).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from edgeproxy.cache.blocking import InlineBlocking  # noqa: E402
from edgeproxy.config.model import (
    # noqa: E402     CacheSettings,
    Config,
    Listener,
    ProxySettings,
    Route,
    Server,
    Upstream,
)
from edgeproxy.config.stagemodel import RouteCache
from edgeproxy.pipeline.stages import buildPipelines  # noqa: E402
from edgeproxy.http.listener import ListenerFactory  # noqa: E402
from edgeproxy.metrics import Metrics  # noqa: E402
from edgeproxy.routing import Router  # noqa: E402
from edgeproxy.runtime import Runtime  # noqa: E402
from edgeproxy.upstream.pool import UpstreamPool  # noqa: E402

REQUEST = (
    b"GET /1k HTTP/1.1\r\nHost: localhost:8443\r\nUser-Agent: wrk\r\n"
    b"Accept: */*\r\n\r\n"
)
"""What wrk sends in R1."""

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
    b"Date: %(date)s\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: 1024\r\nLast-Modified: Fri, 27 Nov 2026 22:00:00 GMT\r\n"
    b"Connection: keep-alive\r\nETag: \"6566a0c0-400\"\r\nAccept-Ranges: bytes\r\n\r\n"
) + b"x" * 1024
"""What the nginx origin of C{run.py} answers to C{GET /1k} (C{%(date)s}:
the clock's time when the bench starts, so that a cached copy is fresh)."""


class _Backend(StringTransport):
    """A backend connection: collects requests, answers when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Any = None
        self.response = b""

    def answer(self) -> None:
        # One request in, one response out (the client does not pipeline).
        self.clear()
        self.protocol.dataReceived(self.response)


class _Endpoint:
    def __init__(self, response: bytes) -> None:
        self.backends: list[_Backend] = []
        self.response = response

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        transport = _Backend()
        transport.protocol = protocol
        transport.response = self.response
        protocol.makeConnection(transport)
        self.backends.append(transport)
        return succeed(protocol)


class _Pool(UpstreamPool):
    endpoint: _Endpoint

    def endpointFor(self, server: Any) -> Any:
        return self.endpoint


class _TLSClient:
    """
    The client's side of a TLS 1.3 connection in memory (pyOpenSSL with
    memory BIOs): what C{wrk} does to the proxy's TLS transport, without a
    socket.
    """

    def __init__(self, caFile: str) -> None:
        from OpenSSL import SSL

        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.load_verify_locations(caFile)
        context.set_alpn_protos([b"http/1.1"])
        self.connection = SSL.Connection(context, None)
        self.connection.set_tlsext_host_name(b"localhost")
        self.connection.set_connect_state()
        self._want = SSL.WantReadError

    def outgoing(self) -> bytes:
        """The TLS bytes the client has to send."""
        try:
            return self.connection.bio_read(1 << 20)
        except self._want:
            return b""

    def incoming(self, data: bytes) -> bytes:
        """Feed the proxy's TLS bytes; return the plaintext they carried."""
        if data:
            self.connection.bio_write(data)
        out = []
        while True:
            try:
                out.append(self.connection.recv(1 << 16))
            except self._want:
                break
        return b"".join(out)

    def handshake(self) -> None:
        try:
            self.connection.do_handshake()
        except self._want:
            pass


class Bench:
    """One client connection through the whole proxy, in memory."""

    def __init__(self, tls: bool = False, cache: bool = False) -> None:
        reactor = MemoryReactorClock()
        # Certificates are checked against the clock, and cached responses
        # are fresh by it: make it now.
        reactor.advance(time.time())
        upstream = Upstream(name="origin", servers=(Server("127.0.0.1", 8080),))
        route = Route(
            name="all", hosts=("*",), paths=("/",), upstream="origin",
            cache=RouteCache(default_ttl=3600.0) if cache else None,
        )
        config = Config(
            path="edge.ini",
            proxy=ProxySettings(),
            tls=None,
            listeners=(),
            upstreams={"origin": upstream},
            routes=(route,),
            cache=CacheSettings() if cache else None,
        )
        metrics = Metrics()
        pool = _Pool(reactor, upstream, None, metrics=metrics)
        pool.endpoint = _Endpoint(
            RESPONSE % {b"date": formatdate(reactor.seconds(), usegmt=True).encode()}
        )
        self.pool = pool
        pools: Any = {"origin": pool}
        runtime = Runtime(
            config=config, router=Router((route,)), pools=pools,
            pipelines=buildPipelines(
                config, pools, context={"reactor": reactor, "metrics": metrics, "blocking": InlineBlocking()}
            ),
        )
        listener = Listener(name="https", endpoint="tcp:0", tls=tls)
        site = ListenerFactory(lambda: runtime, listener, reactor, metrics=metrics)
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        self.tls: _TLSClient | None = None
        if tls:
            site = self._tlsFactory(site, reactor)
        self.protocol = site.buildProtocol(peer)
        self.client = StringTransport(peerAddress=peer)
        self.protocol.makeConnection(self.client)
        self.reactor = reactor
        if tls:
            self._handshake()

    def _tlsFactory(self, site: Any, reactor: Any) -> Any:
        """The listener's factory in the TLS factory a TLS listener uses."""
        import tempfile

        from edgeproxy.config.model import TLSSettings
        from edgeproxy.serve.listeners import tlsServerFactory
        from edgeproxy.tls.store import CertificateStore
        from tests.certutil import CertificateAuthority

        directory = Path(tempfile.mkdtemp(prefix="inproc-tls-"))
        ca = CertificateAuthority("inproc root")
        leaf = ca.issue(["localhost"])
        pem = leaf.writePEM(directory / "leaf.pem")
        caFile = ca.writeCertificate(directory / "ca.pem")
        store = CertificateStore(TLSSettings(certificates=(str(pem),), default=None), reactor)
        store.load()
        self.tls = _TLSClient(str(caFile))
        return tlsServerFactory(store.serverConnectionCreator((b"http/1.1",)), site, reactor)

    def _handshake(self) -> None:
        tls = self.tls
        assert tls is not None
        for _ in range(10):
            tls.handshake()
            data = tls.outgoing()
            if data:
                self.protocol.dataReceived(data)
            self.reactor.advance(0)
            reply = self.client.value()
            self.client.clear()
            tls.incoming(reply)
            if tls.connection.get_protocol_version_name() == "TLSv1.3" and not data and not reply:
                break

    def once(self) -> bytes:
        tls = self.tls
        if tls is None:
            self.protocol.dataReceived(REQUEST)
        else:
            tls.connection.send(REQUEST)
            self.protocol.dataReceived(tls.outgoing())
        for backend in self.pool.endpoint.backends:
            if backend.value():
                backend.answer()
        if tls is not None:
            # What the TLS layer held for the reactor's next turn.
            self.reactor.advance(0)
        wire = self.client.value()
        self.client.clear()
        if tls is not None:
            wire = tls.incoming(wire)
        return wire

    def check(self) -> None:
        wire = self.once()
        if not wire.startswith(b"HTTP/1.1 200 OK\r\n") or not wire.endswith(b"x" * 1024):
            raise SystemExit(f"unexpected response: {wire[:200]!r}")
        if len(self.pool.endpoint.backends) != 1:
            raise SystemExit("the backend connection was not kept alive")

    def run(self, n: int) -> float:
        """CPU seconds for C{n} requests."""
        once = self.once
        start = time.process_time()
        for _ in range(n):
            once()
        return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per run")
    parser.add_argument("--runs", type=int, default=5, help="runs (the median is printed)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one run")
    parser.add_argument(
        "--tls", action="store_true",
        help="the client over TLS 1.3 (the listener's TLS transport, in memory too)",
    )
    parser.add_argument("--cache", action="store_true", help="measure cache hits instead")
    parser.add_argument(
        "--fast-paths", choices=("auto", "off"), default="auto",
        help="[edgeproxy] fast_paths: off measures Twisted's public paths (docs/operations.rst)",
    )
    args = parser.parse_args(argv)
    from edgeproxy._compat import decideFastPaths, useFastPaths

    useFastPaths(decideFastPaths(args.fast_paths))
    bench = Bench(tls=args.tls, cache=args.cache)
    for _ in range(3):
        bench.check()
    bench.run(min(2000, args.requests))  # warm-up
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(bench.run, args.requests)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(35)
        return 0
    perRequest = sorted(
        bench.run(args.requests) / args.requests * 1e6 for _ in range(args.runs)
    )
    print(
        f"in-memory {'cache hit' if args.cache else 'proxied request'} "
        f"(HTTP/1.1{' over TLS' if args.tls else ''} keep-alive, 1 KiB"
        f"{', fast_paths = off' if args.fast_paths == 'off' else ''}): "
        f"median {statistics.median(perRequest):.1f} us CPU per request "
        f"(runs: {', '.join(f'{x:.1f}' for x in perRequest)}; "
        f"{args.requests} requests each)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
