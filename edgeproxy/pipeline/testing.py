# -*- test-case-name: tests.test_pipeline -*-
"""
Test doubles for stages, in memory, in the manner of treq's C{StubTreq}:
a stage runs between a L{RecordingClient} (what the client would get) and a
L{RecordingNext} (what reached the next stage, answered with a canned
response or held).

    stage = MyStage(...)
    nextStage = RecordingNext(response=textResponse(200, b"hi"))
    client = run(stage, makeRequest(path=b"/x"), nextStage)
    assert nextStage.requests[0].path == b"/x"
    assert client.status == 200 and client.body == b"hi"

Nothing here is used by the proxy itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from edgeproxy.config.model import Listener, Route
from edgeproxy.errors import ProxyError
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.call import Call, Stage
from edgeproxy.pipeline.values import BytesBody, ConnectionInfo, Request, Response

__all__ = [
    "RecordingClient",
    "RecordingNext",
    "makeRequest",
    "run",
    "textResponse",
]

_LISTENER = Listener(name="test", endpoint="tcp:0", tls=True)
_ROUTE = Route(name="test", hosts=("*",), paths=("/",), upstream="test")


def makeRequest(
    method: bytes = b"GET",
    path: bytes = b"/",
    query: bytes = b"",
    fields: Fields | list[tuple[bytes, bytes]] | None = None,
    host: bytes = b"example.com",
    client: str = "192.0.2.1",
    route: Route = _ROUTE,
    scheme: bytes = b"https",
    version: bytes = b"HTTP/1.1",
    length: int | None = 0,
    serverName: bytes | None = None,
) -> Request:
    """A L{Request} as a protocol would make it, with defaults for the rest."""
    if fields is None:
        fields = Fields([(b"host", host)])
    elif not isinstance(fields, Fields):
        fields = Fields(fields)
    info = ConnectionInfo(client, 40000, scheme, _LISTENER, serverName, "1.3", None)
    return Request(
        method, path, query, version, fields, host, client, info, route, b"/", length,
        path + query,
    )


def textResponse(status: int, body: bytes = b"", fields: Iterable[tuple[bytes, bytes]] = ()) -> Response:
    """A complete response with C{body} held in memory."""
    return Response(status, b"Reason", Fields(fields), len(body), BytesBody(body))


class RecordingNext:
    """
    The stage after the one under test: records every request that reaches
    it, then answers with C{response} (or fails with C{error}), or holds the
    call (both L{None}) for the test to answer through L{held}.
    """

    def __init__(self, response: Response | None = None, error: ProxyError | None = None) -> None:
        self.response = response
        self.error = error
        self.requests: list[Request] = []
        self.held: list[Call] = []

    def handle(self, call: Call) -> None:
        self.requests.append(call.request)
        if self.error is not None:
            call.fail(self.error)
        elif self.response is not None:
            call.respond(self.response)
        else:
            self.held.append(call)


class RecordingClient:
    """
    The client side of a call, in memory: records the answer, its body and
    the interim responses.

    @ivar status: the final status (C{0} before the answer).
    @ivar body: the body bytes received so far.
    @ivar complete: the body ended normally (L{None} while it flows).
    @ivar producer: the body's producer (to pause, resume, stop).
    """

    def __init__(self) -> None:
        self.response: Response | None = None
        self.error: ProxyError | None = None
        self.interims: list[tuple[int, Fields]] = []
        self.status = 0
        self.body = b""
        self.complete: bool | None = None
        self.producer: Any = None

    def respond(self, call: Call, response: Response) -> None:
        self.response = response
        self.status = response.status
        if response.body is not None:
            response.body.deliverBody(call)
        else:
            self.complete = True

    def fail(self, call: Call, error: ProxyError) -> None:
        self.error = error
        self.status = error.status

    def interim(self, call: Call, status: int, reason: bytes, fields: Fields) -> None:
        self.interims.append((status, fields))

    def bodyStarted(self, call: Call, producer: Any) -> None:
        self.producer = producer

    def bodyData(self, call: Call, data: bytes) -> None:
        self.body += data

    def bodyEnded(self, call: Call, reason: Failure) -> None:
        self.complete = isinstance(reason.value, (ResponseDone, PotentialDataLoss))

    def tunnel(self, call: Call, pool: Any, fields: Fields, path: bytes, hashKey: bytes | None) -> None:
        self.error = ProxyError("tunnel not supported by the test client")


def run(
    stage: Stage,
    request: Request,
    nextStage: Stage | None = None,
    body: Any = None,
    client: RecordingClient | None = None,
) -> RecordingClient:
    """
    Run C{request} through C{stage} then C{nextStage} (a L{RecordingNext}
    answering 200 by default), and return what the client got.
    """
    if nextStage is None:
        nextStage = RecordingNext(response=textResponse(200))
    client = client if client is not None else RecordingClient()
    call = Call(request, body, client, (stage, nextStage), 0.0)
    call.next()
    return client
