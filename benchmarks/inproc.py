# -*- test-case-name: tests.test_benchmark_smoke -*-
"""
CPU cost of one proxied request in edgeproxy's own code, measured in memory.

    .venv/bin/python benchmarks/inproc.py [--tls] [--h2] [--cache] [--fast-paths off] [--requests N] [--runs R] [--profile]
    .venv/bin/python benchmarks/inproc.py --h2 --instructions 2000

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

C{--h2} measures R5 instead: HTTP/2 over TLS 1.3 (ALPN C{h2}) through the
listener's L{HTTP2Connection}, ten streams in flight as C{h2load -m10}
keeps them: the client sends ten requests in one write, the ten backend
connections answer, the responses are read, and again.  The client speaks
as h2load does (its header list, C{:path} a literal without indexing,
windows of 2^30-1 and a connection C{WINDOW_UPDATE} past half of it); its
frames are built once and given fresh stream IDs, and the responses are
read by their frame headers only (the first rounds go through the C{h2}
library's client and are checked), so what the figure includes beside
edgeproxy's code and the libraries it runs on is the client's TLS (as in
C{--tls}) and a loop over frame headers.

C{--instructions N} counts instructions instead of time (valgrind's
callgrind, steadier than time on a shared machine): the same bench with
C{N} requests and with none, the difference divided by C{N}.
"""

from __future__ import annotations

import argparse
from email.utils import formatdate
import statistics
import struct
import subprocess
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
from edgeproxy.config.model import (  # noqa: E402
    Config,
    Listener,
    ProxySettings,
    Route,
    Server,
    Upstream,
)
from edgeproxy.config.stagemodel import CacheSettings, RouteCache  # noqa: E402
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

    def __init__(self, caFile: str, alpn: bytes = b"http/1.1") -> None:
        from OpenSSL import SSL

        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.load_verify_locations(caFile)
        context.set_alpn_protos([alpn])
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


H2_STREAMS = 10
"""Streams in flight per connection (C{h2load -m10})."""

H2_WINDOW = 2**30 - 1
"""h2load's windows (C{-w 30 -W 30}), per stream and for the connection."""

H2_REQUEST = [
    (b":path", b"/1k"),
    (b":scheme", b"https"),
    (b":authority", b"127.0.0.1:8443"),
    (b":method", b"GET"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]
"""What h2load sends in R5 (nghttp2 never indexes C{:path})."""

_FRAME = struct.Struct(">BHBBL")


class _H2Client:
    """
    The client of R5 over a L{_TLSClient}: the C{h2} library's client for
    the connection's start and the checked rounds, then frames built once
    (L{batch}) and responses read by their frame headers (L{read}).
    """

    def __init__(self, tls: _TLSClient) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection
        from h2.settings import SettingCodes

        self.tls = tls
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.local_settings.update({
            SettingCodes.INITIAL_WINDOW_SIZE: H2_WINDOW, SettingCodes.ENABLE_PUSH: 0,
        })
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(H2_WINDOW - 65535)
        self._template: bytes | None = None
        self._offsets: list[int] = []
        self._nextStream = 0
        self._buffer = b""
        self._consumed = 0
        self._windowUpdate = b""

    def start(self) -> bytes:
        """What the client sends first (its preface and settings)."""
        return self.h2.data_to_send()

    def received(self, plaintext: bytes) -> tuple[list[Any], bytes]:
        """Through the library: its events, and what it answers."""
        events = self.h2.receive_data(plaintext) if plaintext else []
        return events, self.h2.data_to_send()

    def requests(self) -> bytes:
        """H2_STREAMS requests through the library."""
        from hpack import NeverIndexedHeaderTuple

        h2 = self.h2
        headers = [NeverIndexedHeaderTuple(*H2_REQUEST[0])] + H2_REQUEST[1:]
        for _ in range(H2_STREAMS):
            h2.send_headers(h2.get_next_available_stream_id(), headers, end_stream=True)
        return h2.data_to_send()

    def prepare(self) -> None:
        """
        Build the batch of requests from here on: the library's HPACK
        block for the request (fields already in both tables, C{:path} as
        a literal without indexing), in C{H2_STREAMS} HEADERS frames.
        """
        from hyperframe.frame import WindowUpdateFrame

        from edgeproxy.http.h2.hpackcache import indexedOnly

        h2 = self.h2
        table = h2.encoder.header_table
        before = len(table.dynamic_entries)
        rest = h2.encoder.encode(H2_REQUEST[1:])
        assert indexedOnly(rest) and len(table.dynamic_entries) == before, rest
        # RFC 7541 6.2.2: a literal without indexing, indexed name 4.
        path = H2_REQUEST[0][1]
        block = bytes([0x04, len(path)]) + path + rest
        frame = _FRAME.pack(0, len(block), 0x1, 0x5, 0) + block
        self._template = frame * H2_STREAMS
        self._offsets = [i * len(frame) + 5 for i in range(H2_STREAMS)]
        self._nextStream = h2.get_next_available_stream_id()
        self._windowUpdate = WindowUpdateFrame(0, window_increment=H2_WINDOW // 2).serialize()

    def batch(self) -> bytes:
        """C{H2_STREAMS} requests on fresh streams (and a WINDOW_UPDATE when due)."""
        assert self._template is not None
        data = bytearray(self._template)
        stream = self._nextStream
        pack = struct.pack_into
        for offset in self._offsets:
            pack(">L", data, offset, stream)
            stream += 2
        self._nextStream = stream
        if self._consumed > H2_WINDOW // 2:
            self._consumed -= H2_WINDOW // 2
            data += self._windowUpdate
        return bytes(data)

    def read(self, plaintext: bytes) -> tuple[int, int]:
        """
        Frame headers only: how many streams ended, and how many DATA
        bytes came.
        """
        data = self._buffer + plaintext if self._buffer else plaintext
        ended = received = 0
        pos = 0
        size = len(data)
        unpack = _FRAME.unpack_from
        while size - pos >= 9:
            high, low, kind, flags, _ = unpack(data, pos)
            length = (high << 16) | low
            if size - pos - 9 < length:
                break
            if kind == 0x0:
                received += length
                if flags & 0x1:
                    ended += 1
            elif kind == 0x1 and flags & 0x1:
                ended += 1
            elif kind == 0x7 or kind == 0x3:
                raise SystemExit(f"GOAWAY or RST_STREAM from the proxy: {data[pos:pos + 9 + length]!r}")
            pos += 9 + length
        self._buffer = data[pos:]
        self._consumed += received
        return ended, received


class Bench:
    """One client connection through the whole proxy, in memory."""

    def __init__(self, tls: bool = False, cache: bool = False, h2: bool = False) -> None:
        # HTTP/2 is chosen by ALPN: over TLS only, as in R5.
        tls = tls or h2
        self.h2: _H2Client | None = None
        self._early = b""
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
            site = self._tlsFactory(site, reactor, b"h2" if h2 else b"http/1.1")
        self.protocol = site.buildProtocol(peer)
        self.client = StringTransport(peerAddress=peer)
        self.protocol.makeConnection(self.client)
        self.reactor = reactor
        if tls:
            self._handshake()
        if h2:
            self._startH2()

    def _tlsFactory(self, site: Any, reactor: Any, alpn: bytes) -> Any:
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
        self.tls = _TLSClient(str(caFile), alpn)
        return tlsServerFactory(store.serverConnectionCreator((b"h2", b"http/1.1")), site, reactor)

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
            # (HTTP/2: the server's preface comes with the handshake.)
            self._early += tls.incoming(reply)
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

    def _send(self, plaintext: bytes) -> None:
        tls = self.tls
        assert tls is not None
        tls.connection.send(plaintext)
        self.protocol.dataReceived(tls.outgoing())

    def _answerAndReceive(self) -> bytes:
        for backend in self.pool.endpoint.backends:
            if backend.value():
                backend.answer()
        self.reactor.advance(0)
        wire = self.client.value()
        self.client.clear()
        assert self.tls is not None
        return self.tls.incoming(wire)

    def _startH2(self) -> None:
        client = self.h2 = _H2Client(self.tls)  # type: ignore[arg-type]
        self._send(client.start())
        plaintext, self._early = self._early, b""
        for _ in range(10):
            plaintext += self._answerAndReceive()
            _, reply = client.received(plaintext)
            plaintext = b""
            if not reply:
                break
            self._send(reply)

    def _checkH2(self) -> None:
        """A round through the h2 library's client, every response checked."""
        from h2.events import DataReceived, ResponseReceived, StreamEnded

        client = self.h2
        assert client is not None
        self._send(client.requests())
        events, reply = client.received(self._answerAndReceive())
        if reply:
            self._send(reply)
        statuses = [dict(e.headers).get(b":status") for e in events if type(e) is ResponseReceived]
        body: dict[int, bytes] = {}
        for event in events:
            if type(event) is DataReceived:
                body[event.stream_id] = body.get(event.stream_id, b"") + event.data
        ended = sum(type(e) is StreamEnded for e in events)
        if statuses != [b"200"] * H2_STREAMS or ended != H2_STREAMS or any(
            b != b"x" * 1024 for b in body.values()
        ):
            raise SystemExit(f"unexpected HTTP/2 responses: {events!r}"[:2000])
        if len(self.pool.endpoint.backends) != H2_STREAMS:
            raise SystemExit("the backend connections were not kept alive")

    def onceH2(self) -> int:
        """One batch of requests: how many responses ended."""
        client = self.h2
        assert client is not None
        self._send(client.batch())
        ended, _ = client.read(self._answerAndReceive())
        return ended

    def check(self) -> None:
        if self.h2 is not None:
            self._checkH2()
            return
        wire = self.once()
        if not wire.startswith(b"HTTP/1.1 200 OK\r\n") or not wire.endswith(b"x" * 1024):
            raise SystemExit(f"unexpected response: {wire[:200]!r}")
        if len(self.pool.endpoint.backends) != 1:
            raise SystemExit("the backend connection was not kept alive")

    def run(self, n: int) -> float:
        """CPU seconds for C{n} requests."""
        if self.h2 is not None:
            return self._runH2(n)
        once = self.once
        start = time.process_time()
        for _ in range(n):
            once()
        return time.process_time() - start


    def _runH2(self, n: int) -> float:
        """CPU seconds for C{n} requests (rounded up to whole batches)."""
        client = self.h2
        assert client is not None
        if client._template is None:
            client.prepare()
        once = self.onceH2
        batches = -(-n // H2_STREAMS)
        ended = 0
        start = time.process_time()
        for _ in range(batches):
            ended += once()
        spent = time.process_time() - start
        if ended != batches * H2_STREAMS:
            raise SystemExit(f"{ended} responses ended for {batches * H2_STREAMS} requests")
        return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per run")
    parser.add_argument("--runs", type=int, default=5, help="runs (the median is printed)")
    parser.add_argument("--warmup", type=int, default=2000, help="requests before the runs")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one run")
    parser.add_argument("--sort", default="tottime", help="--profile's order (tottime, cumtime...)")
    parser.add_argument("--top", type=int, default=35, help="--profile's lines")
    parser.add_argument(
        "--tls", action="store_true",
        help="the client over TLS 1.3 (the listener's TLS transport, in memory too)",
    )
    parser.add_argument(
        "--h2", action="store_true",
        help="HTTP/2 over TLS, 10 streams in flight (R5) instead of HTTP/1.1",
    )
    parser.add_argument("--cache", action="store_true", help="measure cache hits instead")
    parser.add_argument(
        "--fast-paths", choices=("auto", "off"), default="auto",
        help="[edgeproxy] fast_paths: off measures Twisted's public paths (docs/operations.rst)",
    )
    parser.add_argument(
        "--instructions", type=int, metavar="N",
        help="count instructions per request under valgrind (N requests against none)",
    )
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.instructions:
        return _countInstructions(args, argv if argv is not None else sys.argv[1:])
    from edgeproxy._compat import decideFastPaths, useFastPaths

    useFastPaths(decideFastPaths(args.fast_paths))
    bench = Bench(tls=args.tls, cache=args.cache, h2=args.h2)
    for _ in range(3):
        bench.check()
    bench.run(args.warmup)
    if args.bare:
        # Under valgrind (--instructions): the requests, nothing else.
        if args.requests:
            bench.run(args.requests)
        return 0
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(bench.run, args.requests)
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)
        return 0
    perRequest = sorted(
        bench.run(args.requests) / args.requests * 1e6 for _ in range(args.runs)
    )
    print(
        f"in-memory {'cache hit' if args.cache else 'proxied request'} "
        f"({_what(args)}): "
        f"median {statistics.median(perRequest):.1f} us CPU per request "
        f"(runs: {', '.join(f'{x:.1f}' for x in perRequest)}; "
        f"{args.requests} requests each)"
    )
    return 0


def _what(args: argparse.Namespace) -> str:
    if args.h2:
        what = f"HTTP/2 over TLS, {H2_STREAMS} streams in flight"
    else:
        what = f"HTTP/1.1{' over TLS' if args.tls else ''} keep-alive"
    return f"{what}, 1 KiB{', fast_paths = off' if args.fast_paths == 'off' else ''}"


def _countInstructions(args: argparse.Namespace, argv: list[str]) -> int:
    """
    Instructions per request: the bench under callgrind with
    C{--instructions} requests and with none (the same set-up and warm-up),
    the difference divided by the requests.
    """
    import re

    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--instructions" or arg == "--requests":
            skip = True
        elif not arg.startswith(("--instructions=", "--requests=")):
            rest.append(arg)
    counts = []
    for requests in (args.instructions, 0):
        process = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
             sys.executable, __file__, *rest, "--bare", "--requests", str(requests)],
            check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600,
        )
        found = re.search(r"Collected : (\d+)", process.stdout)
        if process.returncode or found is None:
            raise SystemExit(f"valgrind failed: {process.stdout[-2000:]}")
        counts.append(int(found.group(1)))
    perRequest = (counts[0] - counts[1]) / args.instructions
    print(
        f"in-memory {'cache hit' if args.cache else 'proxied request'} ({_what(args)}): "
        f"{perRequest / 1e3:.0f} k instructions per request "
        f"({args.instructions} requests against none, after {args.warmup} of warm-up)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
