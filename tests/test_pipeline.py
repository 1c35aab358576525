"""
Tests for L{edgeproxy.pipeline.call}, L{edgeproxy.pipeline.values} and
L{edgeproxy.pipeline.stages}: the contract every stage relies on, run in
memory with the doubles of L{edgeproxy.pipeline.testing} (what reaches the
next stage, what the client gets).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from edgeproxy.bodies import BodyPipe
from edgeproxy.config.model import Config, ProxySettings, Route, Server, Upstream
from edgeproxy.errors import BackendUnavailable, ProxyError, ServiceUnavailable
from edgeproxy.h1 import Fields
from edgeproxy.pipeline import stages as stagesModule
from edgeproxy.pipeline.call import Call
from edgeproxy.pipeline.forward import Forward
from edgeproxy.pipeline.stages import ORDER, buildPipelines, registerKind
from edgeproxy.pipeline.testing import RecordingClient, RecordingNext, makeRequest, run, textResponse
from edgeproxy.pipeline.values import BODY_DONE, Response
from tests.memorypool import MemoryPool


class Answering:
    """Answers every request itself."""

    def __init__(self, response: Response) -> None:
        self.response = response

    def handle(self, call: Call) -> None:
        call.respond(self.response)


class Rewriting:
    """Changes the request's path, then passes it on."""

    def handle(self, call: Call) -> None:
        call.request = call.request._replace(path=b"/rewritten" + call.request.path)
        call.next()


class Holding:
    """Holds every call until the test answers it; what it started is
    stopped through the call's cancelHook."""

    def __init__(self) -> None:
        self.held: list[Call] = []
        self.cancelled = 0

    def handle(self, call: Call) -> None:
        self.held.append(call)
        call.cancelHook = self.cancel

    def cancel(self) -> None:
        self.cancelled += 1


class Tagging:
    """Wraps the answer: adds C{x-seen: name} to a response; on an error,
    records it and passes it on (or answers with C{rescue})."""

    def __init__(self, name: bytes, seen: list[Any], rescue: Response | None = None) -> None:
        self.name = name
        self.seen = seen
        self.rescue = rescue

    def handle(self, call: Call) -> None:
        call.onResponse(self)
        call.next()

    def onResponse(self, call: Call, response: Response) -> None:
        self.seen.append((self.name, response.status))
        call.respond(response._replace(fields=response.fields.withAdded(b"x-seen", self.name)))

    def onError(self, call: Call, error: ProxyError) -> None:
        self.seen.append((self.name, error.status))
        if self.rescue is not None:
            call.respond(self.rescue)
        else:
            call.fail(error)


class Failing:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def handle(self, call: Call) -> None:
        raise self.error


class Tracked:
    """A body whose delivery can be seen stopped."""

    def __init__(self) -> None:
        self.stopped = False

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self)
        protocol.dataReceived(b"never read")
        protocol.connectionLost(BODY_DONE)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


def callThrough(*stages: Any, body: Any = None) -> tuple[Call, RecordingClient]:
    client = RecordingClient()
    call = Call(makeRequest(path=b"/x"), body, client, stages, 0.0)
    call.next()
    return call, client


def test_answerAtOnce() -> None:
    """A stage that answers ends the way in: the next stage never runs."""
    nextStage = RecordingNext(response=textResponse(200, b"from next"))
    client = run(Answering(textResponse(403, b"no", [(b"x-a", b"1")])), makeRequest(), nextStage)
    assert (client.status, client.body, client.complete) == (403, b"no", True)
    assert client.response is not None and client.response.fields.get(b"x-a") == b"1"
    assert nextStage.requests == []


def test_passOnAChangedRequest() -> None:
    """A stage that changes the request hands a new value on; the old one
    (which another stage may hold) is unchanged."""
    original = makeRequest(path=b"/a", query=b"?q")
    nextStage = RecordingNext(response=textResponse(200, b"hi"))
    client = run(Rewriting(), original, nextStage)
    [seen] = nextStage.requests
    assert (seen.path, seen.query) == (b"/rewritten/a", b"?q")
    assert original.path == b"/a"
    assert (client.status, client.body) == (200, b"hi")


def test_holdThenAnswer() -> None:
    """A held call goes on when its stage is done; its cancelHook is let
    go with the answer (a client leaving afterwards stops nothing)."""
    holding = Holding()
    nextStage = RecordingNext()  # holds the call too, until answered
    call, client = callThrough(holding, nextStage)
    assert client.status == 0 and nextStage.requests == []
    assert call.cancelHook is not None
    call.next()
    [held] = nextStage.held
    held.respond(textResponse(201, b"made"))
    assert (client.status, client.body) == (201, b"made")
    assert call.cancelHook is None
    call.cancel()
    assert holding.cancelled == 0


def test_clientGoneStopsTheHoldOnce() -> None:
    """
    The client going away calls the cancelHook of the stage holding the
    call, once; an answer that still comes goes nowhere, and its body is
    stopped rather than read.
    """
    holding = Holding()
    call, client = callThrough(holding)
    call.cancel()
    call.cancel()
    assert holding.cancelled == 1
    assert call.over
    body = Tracked()
    call.respond(Response(200, b"OK", Fields(), None, body))
    assert client.status == 0 and client.response is None
    assert body.stopped
    call.fail(BackendUnavailable("late"))
    assert client.error is None


def test_stopIsNotTheEnd() -> None:
    """stop() lets go of the hold (the client side answers itself, a body
    over its limit) without marking the call over."""
    holding = Holding()
    call, client = callThrough(holding)
    call.stop()
    assert holding.cancelled == 1 and not call.over
    call.fail(ProxyError("too large"))
    assert client.error is not None


def test_heldBodyIsNotLostNorBufferedBeyondARead() -> None:
    """
    While a stage holds the call the client's body waits in call.body:
    the client is paused at the first piece, nothing is lost, and the next
    stage reads it all once the hold ends.
    """

    class Reader:
        paused = False

        def pause(self) -> None:
            self.paused = True

        def resume(self) -> None:
            self.paused = False

    reader = Reader()
    pipe = BodyPipe(6, reader, Clock(), 0, lambda: None)
    holding = Holding()

    class ReadingNext:
        def __init__(self) -> None:
            self.data = b""

        def handle(self, call: Call) -> None:
            class Consumer:
                def write(inner, data: bytes) -> None:  # noqa: N805
                    self.data += data

            done = call.body.startProducing(Consumer())
            done.addCallback(lambda _: call.respond(textResponse(200, self.data)))

    reading = ReadingNext()
    call, client = callThrough(holding, reading, body=pipe)
    pipe.write(b"abc")
    assert reader.paused
    pipe.write(b"def")
    pipe.finish()
    assert client.status == 0
    call.next()
    assert (client.status, client.body) == (200, b"abcdef")
    assert not reader.paused


def test_responseHandlersRunLastRegisteredFirst() -> None:
    seen: list[Any] = []
    call, client = callThrough(
        Tagging(b"outer", seen), Tagging(b"inner", seen), RecordingNext(response=textResponse(200, b"ok"))
    )
    assert seen == [(b"inner", 200), (b"outer", 200)]
    assert client.response is not None
    assert client.response.fields.getAll(b"x-seen") == [b"inner", b"outer"]
    assert client.body == b"ok"


def test_errorsTravelBackThroughOnError() -> None:
    """
    A failure passes the handlers in the same reverse order, through
    onError; a handler may pass it on, or answer instead (and the handlers
    before it then see that answer as a response).
    """
    seen: list[Any] = []
    callThrough(Tagging(b"outer", seen), Tagging(b"inner", seen), RecordingNext(error=ServiceUnavailable("down")))
    assert seen == [(b"inner", 503), (b"outer", 503)]

    seen = []
    rescue = textResponse(200, b"stale copy")
    call, client = callThrough(
        Tagging(b"outer", seen), Tagging(b"cache", seen, rescue=rescue), RecordingNext(error=BackendUnavailable("x"))
    )
    assert seen == [(b"cache", 502), (b"outer", 200)]
    assert (client.status, client.body) == (200, b"stale copy")
    assert client.response is not None and client.response.fields.getAll(b"x-seen") == [b"outer"]


def test_interimResponsesGoStraightToTheClient() -> None:
    """
    1xx pass no handler and reach the client side at once (which drops
    one that comes after its final answer: tests.test_server), and none
    reaches a client that went away.
    """
    seen: list[Any] = []
    holding = RecordingNext()
    call, client = callThrough(Tagging(b"outer", seen), holding)
    held = holding.held[0]
    held.interim(103, b"Early Hints", Fields([(b"link", b"</a>")]))
    assert [(status, fields.get(b"link")) for status, fields in client.interims] == [(103, b"</a>")]
    assert seen == []
    held.respond(textResponse(200))
    assert seen == [(b"outer", 200)]
    other, otherClient = callThrough(RecordingNext())
    other.cancel()
    other.interim(103, b"Early Hints", Fields())
    assert otherClient.interims == []


@pytest.mark.parametrize(
    "error,status",
    [(RuntimeError("bug"), 500), (KeyError("bug"), 500), (ServiceUnavailable("busy"), 503)],
)
def test_failingStage(error: Exception, status: int) -> None:
    """A stage that raises: its ProxyError's status, or 500 for anything
    else (the bug is logged, never shown)."""
    seen: list[Any] = []
    call, client = callThrough(Tagging(b"outer", seen), Failing(error))
    assert client.status == status
    assert seen == [(b"outer", status)]


def test_failingHandler() -> None:
    """A response handler that raises turns the answer into a 500, and
    the body it was given is stopped, not read."""

    class Broken:
        def handle(self, call: Call) -> None:
            call.onResponse(self)
            call.next()

        def onResponse(self, call: Call, response: Response) -> None:
            raise RuntimeError("bug")

        def onError(self, call: Call, error: ProxyError) -> None:
            raise RuntimeError("bug")

    body = Tracked()
    call, client = callThrough(Broken(), RecordingNext(response=Response(200, b"OK", Fields(), None, body)))
    assert client.status == 500
    assert body.stopped
    call, client = callThrough(Broken(), RecordingNext(error=BackendUnavailable("x")))
    assert client.status == 500


def test_upstreamOutcomeReachesTheForwarder() -> None:
    """The pool reports to the call; the call passes it to its forwarder."""
    outcomes: list[Any] = []

    class Forwarder:
        def responded(self, call: Call, response: Any) -> None:
            outcomes.append(("responded", response))

        def failed(self, call: Call, failure: Failure) -> None:
            outcomes.append(("failed", failure.value))

    call, client = callThrough(RecordingNext())
    call.forwarder = Forwarder()
    call.upstreamInterim(103, b"Early Hints", Fields())
    call.upstreamResponded("response")
    error = BackendUnavailable("x")
    call.upstreamFailed(Failure(error))
    assert outcomes == [("responded", "response"), ("failed", error)]
    assert [status for status, _ in client.interims] == [103]


# Building the stages of each route ---------------------------------------------

UPSTREAM = Upstream(name="app", servers=(Server("10.0.0.1", 8080),), idle_timeout=12.0)


def config(*routes: Route) -> Config:
    return Config(
        path="/etc/edge.ini", proxy=ProxySettings(), tls=None, listeners=(),
        upstreams={"app": UPSTREAM}, routes=routes,
    )


def test_aRouteWithNoStagesIsForwardAlone() -> None:
    route = Route(name="r", hosts=("*",), paths=("/",), upstream="app")
    pool = MemoryPool(UPSTREAM)
    [(name, pipeline)] = buildPipelines(config(route), {"app": pool}).items()
    assert name == "r"
    [forward] = pipeline.stages
    assert isinstance(forward, Forward) and forward.pool is pool
    assert pipeline.idleTimeout == 12.0
    assert ORDER[0] == "redirect" and ORDER[-1] == "forward"


def test_stagesInTheirFixedOrderAndTakenOverOnReload(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The stage kinds a route uses run in the documented order, whatever
    order they were registered in, before Forward; a reload hands each
    kind its previous stage of the same route.
    """
    monkeypatch.setattr(stagesModule, "_KINDS", {})
    built: list[tuple[str, str, Any]] = []

    class Kind:
        def __init__(self, name: str) -> None:
            self.name = name

        def build(self, route: Route, config: Config, context: Any, previous: Any) -> Any:
            if route.name == "bare":
                return None
            stage = (self.name, route.name, previous)
            built.append(stage)
            return stage

    for name in ("cache", "auth", "redirect"):
        registerKind(Kind(name))
    with pytest.raises(ValueError):
        registerKind(Kind("forward"))
    with pytest.raises(ValueError):
        registerKind(Kind("teleport"))
    routes = (
        Route(name="r", hosts=("*",), paths=("/",), upstream="app"),
        Route(name="bare", hosts=("b",), paths=("/",), upstream="app"),
    )
    pools = {"app": MemoryPool(UPSTREAM)}
    first = buildPipelines(config(*routes), pools)
    assert [stage[0] for stage in first["r"].stages[:-1]] == ["redirect", "auth", "cache"]
    assert isinstance(first["r"].stages[-1], Forward)
    assert len(first["bare"].stages) == 1
    second = buildPipelines(config(*routes), pools, previous=first)
    assert [stage[2] for stage in second["r"].stages[:-1]] == list(first["r"].stages[:-1])
