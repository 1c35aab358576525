# -*- test-case-name: tests.test_pipeline -*-
"""
L{Call}: one request on its way through the stages of its route, and its
answer on the way back.

The stages of a route run in their fixed order (L{edgeproxy.pipeline.stages}).
Each gets the call in C{handle(call)} and does one of:

  - answer: C{call.respond(response)} (a synthetic or stored response) or
    C{call.fail(error)} (a L{ProxyError}: the client gets its status);
  - pass on: C{call.next()}, after changing C{call.request} if it wants
    (a new value: requests are immutable);
  - hold: start something asynchronous (a subrequest, Redis, a lock) and
    call one of the above when it is done, setting C{call.cancelHook} to
    what stops it should the client go away meanwhile.  The client's body
    waits in C{call.body}, which buffers at most a read and pauses the
    client (no byte lost, none buffered beyond that bound);
  - wrap the answer: C{call.onResponse(handler)} before passing on.  Answers
    travel back through the handlers of the stages that ran, the last one
    registered first: C{handler.onResponse(call, response)} and
    C{handler.onError(call, error)} each end in C{call.respond} or
    C{call.fail} again (at once or later: a handler may read a bounded body,
    convert it, and answer with the result), and the answer reaches the
    client once no handler is left.

The last stage of every route forwards to the upstream pool
(L{edgeproxy.pipeline.forward}); nothing else talks to a pool.  Interim
responses (1xx) go straight to the client.

A call is also what the client side delivers the final body to (the
C{deliverBody} protocol: C{makeConnection}, C{dataReceived},
C{connectionLost}), and what the forward stage's pool reports to
(C{upstreamResponded}, C{upstreamFailed}, C{upstreamInterim}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.errors import ProxyError
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.values import Request, Response

__all__ = ["Call", "ClientSide", "ResponseHandler", "Stage", "discardResponse"]

log = Logger()


class Stage(Protocol):
    """One stage of a route's pipeline."""

    def handle(self, call: Call) -> None:
        """Answer, pass on, hold or wrap (see the module docstring)."""


class ResponseHandler(Protocol):
    """What L{Call.onResponse} registers."""

    def onResponse(self, call: Call, response: Response) -> None:
        """Pass C{response} on (changed or not) with C{call.respond}."""

    def onError(self, call: Call, error: ProxyError) -> None:
        """Pass C{error} on with C{call.fail}, or answer with C{call.respond}."""


class ClientSide(Protocol):
    """
    The protocol a call answers (an HTTP/1.1 connection, an HTTP/2 stream).
    """

    def respond(self, call: Call, response: Response) -> None: ...

    def fail(self, call: Call, error: ProxyError) -> None: ...

    def interim(self, call: Call, status: int, reason: bytes, fields: Fields) -> None: ...

    def bodyStarted(self, call: Call, producer: Any) -> None: ...

    def bodyData(self, call: Call, data: bytes) -> None: ...

    def bodyEnded(self, call: Call, reason: Failure) -> None: ...

    def tunnel(self, call: Call, pool: Any, fields: Fields, path: bytes, hashKey: bytes | None) -> None:
        """Hand the call's connection (or stream) to a WebSocket tunnel to
        a backend of C{pool} (the forward stage, for an upgrade)."""


def _internal(why: str) -> ProxyError:
    error = ProxyError(why)
    error.status = 500
    return error


class Call:
    """
    One request through its route's stages.

    @ivar request: the request as the next stage will see it.
    @ivar body: the client's body (a L{edgeproxy.bodies.BodyPipe}), or
        L{None} when there is none.
    @ivar cancelHook: what stops the stage holding the call (a subrequest,
        the upstream exchange), called once if the client goes away.
    @ivar over: the client went away, or the answer reached it.
    @ivar upstreamName: the upstream the call was forwarded to (access log).
    @ivar backend: the address of the backend that answered, or of the
        last one tried when the request failed on the upstream side
        (access log; never sent to the client).
    @ivar upstreamHead: when the backend's response head reached the
        forward stage (the clock's time; the access log's C{ttfb}), or
        L{None}.
    @ivar status: the status the client got (set by the client side).
    @ivar sent: response body bytes sent to the client.
    @ivar started: when the request's head was complete (the clock's time).
    @ivar firstByte: when the response head reached the client side, or
        L{None}.
    @ivar idleTimeout: seconds a body may go without a byte before the
        request is aborted (the route's upstream C{idle_timeout}).
    @ivar refusedBy: what refused the request at the edge (an access rule,
        a rate limit, an authentication), for the access log; L{None}.
    @ivar identity: the authenticated subject (access log, C{key =
        identity} rate limits), or L{None}.
    @ivar responseRules: the route's response header rules
        (L{edgeproxy.headers.rules.FieldRules}) the client side applies to
        the final response it writes, whoever made it; set by the
        C{headers} stage, else L{None}.
    """

    __slots__ = (
        "request", "body", "client", "stages", "index", "handlers", "cancelHook",
        "over", "forwarder", "upstreamName", "backend", "status", "sent", "started",
        "firstByte", "logged", "idleTimeout", "refusedBy", "identity", "endHooks",
        "upstreamHead", "responseRules",
    )

    def __init__(
        self,
        request: Request,
        body: Any,
        client: ClientSide,
        stages: tuple[Stage, ...],
        started: float,
    ) -> None:
        self.request = request
        self.body = body
        self.client = client
        self.stages = stages
        self.index = 0
        self.handlers: list[ResponseHandler] | None = None
        self.cancelHook: Callable[[], None] | None = None
        self.over = False
        self.forwarder: Any = None
        self.upstreamName: str | None = None
        self.backend: str | None = None
        self.status = 0
        self.sent = 0
        self.started = started
        self.firstByte: float | None = None
        self.logged = False
        self.idleTimeout = 0.0
        self.refusedBy: str | None = None
        self.identity: str | None = None
        self.endHooks: list[Callable[[], None]] | None = None
        self.upstreamHead: float | None = None
        self.responseRules: Any = None

    # The way in -------------------------------------------------------------

    def next(self) -> None:
        """Hand the call to the next stage."""
        stage = self.stages[self.index]
        self.index += 1
        try:
            stage.handle(self)
        except ProxyError as error:
            self.fail(error)
        except Exception:
            log.failure("stage {stage} failed", stage=type(stage).__name__)
            self.fail(_internal("internal error"))

    def onResponse(self, handler: ResponseHandler) -> None:
        """Have C{handler} see the answer before the stages that ran earlier."""
        if self.handlers is None:
            self.handlers = [handler]
        else:
            self.handlers.append(handler)

    # The way back ------------------------------------------------------------

    def respond(self, response: Response) -> None:
        """Answer with C{response} (through the handlers left)."""
        self.cancelHook = None
        handlers = self.handlers
        if handlers:
            handler = handlers.pop()
            try:
                handler.onResponse(self, response)
            except Exception:
                log.failure("response handler {handler} failed", handler=type(handler).__name__)
                discardResponse(response)
                self.fail(_internal("internal error"))
            return
        if self.over:
            discardResponse(response)
            return
        self.client.respond(self, response)

    def fail(self, error: ProxyError) -> None:
        """Answer with the status of C{error} (through the handlers left)."""
        self.cancelHook = None
        handlers = self.handlers
        if handlers:
            handler = handlers.pop()
            try:
                handler.onError(self, error)
            except Exception:
                log.failure("response handler {handler} failed", handler=type(handler).__name__)
                self.fail(_internal("internal error"))
            return
        if not self.over:
            self.client.fail(self, error)

    def interim(self, status: int, reason: bytes, fields: Fields) -> None:
        """Pass an interim (1xx) response straight to the client."""
        if not self.over:
            self.client.interim(self, status, reason, fields)

    def stop(self) -> None:
        """
        Stop whatever holds the call (the client side is about to answer it
        itself: a body over its limit, say).
        """
        hook, self.cancelHook = self.cancelHook, None
        if hook is not None:
            hook()

    def cancel(self) -> None:
        """The client went away: stop whatever holds the call, for good."""
        self.over = True
        self.stop()

    def whenEnded(self, hook: Callable[[], None]) -> None:
        """
        Have C{hook} called once when the request is over for the client
        side (answered completely, or cut short): what a stage counting
        requests in flight releases then.
        """
        if self.endHooks is None:
            self.endHooks = [hook]
        else:
            self.endHooks.append(hook)

    def ended(self) -> None:
        """The client side is done with the call: run the L{whenEnded} hooks."""
        hooks, self.endHooks = self.endHooks, None
        if hooks:
            for hook in hooks:
                try:
                    hook()
                except Exception:
                    log.failure("end of request hook failed")

    # The upstream pool's receiver (for the forward stage) --------------------

    def upstreamResponded(self, response: Any) -> None:
        self.forwarder.responded(self, response)

    def upstreamFailed(self, failure: Failure) -> None:
        self.forwarder.failed(self, failure)

    def upstreamInterim(self, status: int, reason: bytes, fields: Fields) -> None:
        self.interim(status, reason, fields)

    # The final body's protocol (the client side writes it) -------------------

    def makeConnection(self, producer: Any) -> None:
        self.client.bodyStarted(self, producer)

    def dataReceived(self, data: bytes) -> None:
        self.client.bodyData(self, data)

    def connectionLost(self, reason: Failure) -> None:
        self.client.bodyEnded(self, reason)


class _Discarding:
    """Receives a body nobody wants by stopping it."""

    __slots__ = ()

    def makeConnection(self, producer: Any) -> None:
        producer.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


_DISCARDING = _Discarding()


def discardResponse(response: Response) -> None:
    """Stop the body of a response nobody will read."""
    body = response.body
    if body is not None:
        try:
            body.deliverBody(_DISCARDING)
        except Exception:
            # A body already being delivered stops with its reader.
            pass
