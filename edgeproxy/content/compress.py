# -*- test-case-name: tests.test_content_compress -*-
"""
L{Compress}: the stage that compresses responses with the best content
coding the client accepts (C{compress = zstd, br, gzip} on a route).

It picks the coding from the request alone (L{Compress.variant}) and wraps
the answer: a response the rules of L{edgeproxy.content.rules} let it
transform gets a L{CompressedBody} streaming through the chosen encoder,
C{Content-Encoding}, no C{Content-Length} (the length is known only at the
end: chunked on HTTP/1.1), C{Vary: Accept-Encoding} and a weak C{ETag}.
Nothing is buffered: the body streams with the backend's backpressure.

A response it handles (compressed, or sent as it is to a client taking
none of the codings offered) is marked C{chosenOn} C{Accept-Encoding}, so
the cache keys it on the coding chosen; one it leaves alone (encoded by
the backend, of another type) is not, and is keyed on the field itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from edgeproxy.config.model import Config, Route
from edgeproxy.config.stagemodel import CompressSettings
from edgeproxy.content.body import CompressedBody
from edgeproxy.content.encoders import makeEncoder
from edgeproxy.content.negotiate import IDENTITY, chooseEncoding
from edgeproxy.content.rules import compressDecision, hasNoTransform, transformedFields, withVary
from edgeproxy.errors import ProxyError
from edgeproxy.pipeline.call import Call, Stage
from edgeproxy.pipeline.stages import registerKind
from edgeproxy.pipeline.values import Request, Response

__all__ = ["Compress", "CompressKind"]

_VARY = b"Accept-Encoding"


class Compress:
    """
    The compression stage of one route; also its own response handler (it
    keeps no state per request: the choice is made again from the request).
    """

    __slots__ = ("settings", "_offered", "_types", "_levels", "_metrics")

    varyField = b"accept-encoding"
    """The request field the variant depends on (for the cache)."""

    def __init__(self, settings: CompressSettings, metrics: Any = None) -> None:
        self.settings = settings
        self._offered = tuple(name.encode("ascii") for name in settings.encodings)
        self._types = tuple(pattern.encode("ascii") for pattern in settings.types)
        self._levels = {name.encode("ascii"): level for name, level in settings.levels}
        self._metrics = metrics

    def variant(self, request: Request) -> bytes:
        """
        The coding this stage gives the response to C{request}: C{b"zstd"},
        C{b"br"}, C{b"gzip"} or C{b"identity"} (which is also what a
        response that is not compressed at all gets).
        """
        fields = request.fields
        if request.method == b"HEAD" or hasNoTransform(fields):
            return IDENTITY
        return chooseEncoding(fields.getAll(b"accept-encoding"), self._offered)

    def handle(self, call: Call) -> None:
        call.onResponse(self)
        call.next()

    def onResponse(self, call: Call, response: Response) -> None:
        request = call.request
        encoding = self.variant(request)
        decision = compressDecision(
            request.method,
            response.status,
            request.fields,
            response.fields,
            response.length,
            response.body is not None,
            self._types,
            self.settings.min_size,
            encoding,
        )
        if not decision.vary:
            # Not one this stage compresses (encoded by the backend, another
            # type, too small): whatever it varies on is the backend's doing.
            call.respond(response)
            return
        # What this client gets depends on its coding alone.
        chosenOn = (*response.chosenOn, self.varyField)
        if not decision.transform:
            call.respond(response._replace(fields=withVary(response.fields, _VARY), chosenOn=chosenOn))
            return
        assert response.body is not None
        # Counted once the whole body is through (read and written sizes).
        done = None if self._metrics is None else partial(self._metrics.compressed, encoding.decode("ascii"))
        call.respond(
            response._replace(
                fields=transformedFields(response.fields, _VARY, ((b"content-encoding", encoding),)),
                length=None,
                body=CompressedBody(response.body, makeEncoder(encoding, self._levels[encoding]), done),
                chosenOn=chosenOn,
            )
        )

    def onError(self, call: Call, error: ProxyError) -> None:
        call.fail(error)


class CompressKind:
    """Builds the C{compress} stage of routes that set C{compress}."""

    name = "compress"

    def build(
        self, route: Route, config: Config, context: Mapping[str, Any], previous: Stage | None
    ) -> Stage | None:
        if route.compress is None:
            return None
        return Compress(route.compress, context.get("metrics"))


registerKind(CompressKind())
