"""
An in-memory upstream pool for the tests of the request path, written to
the interface the forward stage uses (L{edgeproxy.pipeline.forward}) and
nothing more:

  - C{pool.send(method, target, fields, body, receiver, hashKey)} returns
    a handle whose C{cancel()} abandons the request; the receiver gets
    C{upstreamInterim(status, reason, fields)} any number of times, then
    one of C{upstreamResponded(response)} / C{upstreamFailed(failure)};
  - the response has C{status}, C{reason}, C{fields} (no hop-by-hop
    fields, no C{Content-Length}), C{length}, C{backend} (C{host:port}) and
    C{deliverBody(protocol)};
  - C{pool.upstream}, C{pool.pickServer(hashKey)} and
    C{pool.endpointFor(server)} (WebSocket tunnels);
  - C{pool.seconds()}, the clock (the reactor's).

The test answers each request through the L{Exchange} that C{send}
recorded.  L{ProxyClient} is one client connection on a real
L{ListenerFactory} whose routes end in real L{Forward} stages over such a
pool.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from edgeproxy.config.model import Config, Listener, ProxySettings, Route, Server, Upstream
from edgeproxy.errors import ProxyError
from edgeproxy.h1 import Fields
from edgeproxy.http.listener import ListenerFactory
from edgeproxy.pipeline.values import BODY_DONE
from edgeproxy.routing import Router
from edgeproxy.runtime import Runtime

UPSTREAM = Upstream(name="app", servers=(Server("10.0.0.1", 8080),), idle_timeout=30.0)
ROUTES = (
    Route(name="app", hosts=("app.example",), paths=("/",), upstream="app"),
    Route(name="small", hosts=("small.example",), paths=("/",), upstream="app", max_body_size=100),
    Route(name="api", hosts=("api.example",), paths=("/v1",), upstream="app", strip_prefix=True),
)


@implementer(IPushProducer)
class BackendTransport:
    """The backend connection as a response body's producer."""

    def __init__(self) -> None:
        self.producerState = "producing"

    def pauseProducing(self) -> None:
        self.producerState = "paused"

    def resumeProducing(self) -> None:
        self.producerState = "producing"

    def stopProducing(self) -> None:
        self.producerState = "stopped"


class MemoryResponse:
    """
    A backend's response as the pool hands it to its receiver.  The body
    given is delivered in C{deliverBody}; with C{complete} the body ends
    there too (cut short with C{cut}; ended by the backend's close with
    C{closeDelimited}), else the test goes on with L{write} and L{end}.
    """

    def __init__(
        self,
        status: int,
        fields: list[tuple[bytes, bytes]] | Fields = (),  # type: ignore[assignment]
        body: bytes = b"",
        length: int | None = None,
        reason: bytes | None = None,
        complete: bool = True,
        cut: bool = False,
        closeDelimited: bool = False,
        backend: str = "10.0.0.1:8080",
    ) -> None:
        self.status = status
        self.reason = reason if reason is not None else (b"OK" if status == 200 else b"Status")
        self.fields = fields if isinstance(fields, Fields) else Fields(fields)
        self.length = length
        self.backend = backend
        self.body = body
        self.complete = complete
        self.cut = cut
        self.closeDelimited = closeDelimited
        self.transport = BackendTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        if self.body:
            protocol.dataReceived(self.body)
        if self.cut:
            self.end(cut=True)
        elif self.complete:
            self.end()

    def write(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, cut: bool = False) -> None:
        if cut:
            reason = Failure(ResponseFailed([Failure(ConnectionError("reset"))]))
        elif self.closeDelimited:
            reason = Failure(PotentialDataLoss())
        else:
            reason = BODY_DONE
        self.protocol.connectionLost(reason)


class Exchange:
    """One request the pool was asked to send, and the test's way to answer it."""

    def __init__(
        self, method: bytes, target: bytes, fields: Fields, body: Any, receiver: Any,
        hashKey: bytes | None,
    ) -> None:
        self.method = method
        self.target = target
        self.fields = fields
        self.body = body
        self.receiver = receiver
        self.hashKey = hashKey
        self.cancelled = False
        self.consumer = StringTransport()

    def cancel(self) -> None:
        self.cancelled = True

    def startBody(self) -> Deferred[None]:
        """Read the request body as a backend connection does."""
        return self.body.startProducing(self.consumer)

    def respond(self, response: MemoryResponse) -> MemoryResponse:
        self.receiver.upstreamResponded(response)
        return response

    def fail(self, error: ProxyError) -> None:
        self.receiver.upstreamFailed(Failure(error))

    def interim(self, status: int, reason: bytes, fields: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
        self.receiver.upstreamInterim(status, reason, Fields(fields))


class MemoryPool:
    """
    Stands in for an upstream pool: records what it is asked to send, the
    test answers.

    @ivar failAtOnce: fail every request before C{send} returns (as a pool
        with no backend available does).
    """

    def __init__(
        self,
        upstream: Upstream = UPSTREAM,
        failAtOnce: ProxyError | None = None,
        endpoint: Any = None,
        clock: MemoryReactorClock | None = None,
    ) -> None:
        self.upstream = upstream
        self.clock = clock if clock is not None else MemoryReactorClock()
        self.seconds = self.clock.seconds
        self.failAtOnce = failAtOnce
        self.endpoint = endpoint
        self.sent: list[Exchange] = []
        self.picked: list[bytes | None] = []

    def send(
        self, method: bytes, target: bytes, fields: Fields, body: Any, receiver: Any,
        hashKey: bytes | None = None,
    ) -> Exchange:
        exchange = Exchange(method, target, fields, body, receiver, hashKey)
        self.sent.append(exchange)
        if self.failAtOnce is not None:
            exchange.fail(self.failAtOnce)
        return exchange

    def pickServer(self, hashKey: bytes | None = None) -> Server:
        self.picked.append(hashKey)
        return self.upstream.servers[0]

    def endpointFor(self, server: Server) -> Any:
        return self.endpoint


def makeRuntime(
    pools: dict[str, Any],
    routes: tuple[Route, ...] = ROUTES,
    proxy: ProxySettings | None = None,
    listeners: tuple[Listener, ...] = (),
) -> Runtime:
    config = Config(
        path="/etc/edge.ini",
        proxy=proxy or ProxySettings(),
        tls=None,
        listeners=listeners,
        upstreams={name: pool.upstream for name, pool in pools.items()},
        routes=routes,
    )
    return Runtime(config=config, router=Router(routes), pools=pools)


PEER = IPv4Address("TCP", "192.0.2.7", 5555)


def fixedIds(name: str = "X-Request-ID", byte: int = 0x11) -> Any:
    """
    Request IDs that are all the same (C{1111...} by default): for
    assertions on whole lines and heads.
    """
    from edgeproxy.headers.requestid import RequestIds

    return RequestIds(name, randomBytes=lambda size: bytes([byte]) * size)


class ProxyClient:
    """
    One client connection to a plain listener whose routes (L{ROUTES}
    unless given) forward to a L{MemoryPool}.
    """

    def __init__(
        self,
        listener: Listener | None = None,
        pool: MemoryPool | None = None,
        routes: tuple[Route, ...] = ROUTES,
        proxy: ProxySettings | None = None,
        clock: MemoryReactorClock | None = None,
        accessLog: Any = None,
        metrics: Any = None,
        transport: StringTransport | None = None,
        peer: Any = PEER,
        requestIds: Any = None,
    ) -> None:
        """
        @param requestIds: the L{edgeproxy.headers.requestid.RequestIds}
            requests get their ID from instead of the runtime's (a seeded
            one, for lines and bytes a test can spell out).
        """
        self.clock = clock if clock is not None else MemoryReactorClock()
        self.pool = pool if pool is not None else MemoryPool(clock=self.clock)
        if pool is not None:
            # The pool's clock is the client's (the backend's answer is
            # timed with it).
            self.pool.seconds = self.clock.seconds
        self.runtime = makeRuntime({self.pool.upstream.name: self.pool}, routes, proxy)
        if requestIds is not None:
            object.__setattr__(self.runtime, "requestIds", requestIds)
        self.listener = listener or Listener(name="l", endpoint="tcp:0", tls=False)
        self.factory = ListenerFactory(
            lambda: self.runtime, self.listener, self.clock, accessLog=accessLog, metrics=metrics
        )
        self.protocol: Any = None
        self.transport: StringTransport = transport or StringTransport(peerAddress=peer)
        self.connect(self.transport, peer)

    def connect(self, transport: StringTransport, peer: Any = PEER) -> None:
        """Open (another) connection on C{transport}; it becomes this client's."""
        self.protocol = self.factory.buildProtocol(peer)
        self.transport = transport
        self.protocol.makeConnection(transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def wire(self) -> bytes:
        return self.transport.value()

    def lose(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ConnectionError("gone")))

    @property
    def sent(self) -> list[Exchange]:
        return self.pool.sent
