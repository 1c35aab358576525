# -*- test-case-name: tests.test_headers_stage -*-
"""
The C{headers} stage: a route's header rules (C{request_headers_*},
C{response_headers_*}; L{edgeproxy.headers.rules}).

Request rules change the request's fields before the stages after this one
(cache, compression, images) and the backend see them.  Response rules are
handed to the call (C{call.responseRules}) and applied by the client side
as it writes the response head, so that they apply to I{every} response of
a request that passed this stage, whoever made it: the backend's (any
status, streamed or not), a cache hit, and the proxy's own error pages for
what failed after it (502, 503, 504, 413...), as nginx's C{add_header ...
always} does.  Requests refused before it (access rules 403, rate limits
429, authentication 401: earlier in the fixed order) and requests that
matched no route (400, 404, 421) get no rules.  Nothing but the protocol
comes after them: the framing fields, C{Date} when the response has none,
and the request ID's field when the response has none.

A route without rules has no such stage, and its requests pay nothing for
it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeproxy.config.model import Config, Route
from edgeproxy.headers.rules import FieldRules
from edgeproxy.pipeline.call import Call, Stage
from edgeproxy.pipeline.stages import registerKind
from edgeproxy.pipeline.values import Request

__all__ = ["HeadersKind", "HeadersStage"]

_FIELDS = Request._fields.index("fields")
_make = Request._make


class HeadersStage:
    """
    The C{headers} stage of one route.

    @ivar requestRules: applied to the request's fields, or L{None}.
    @ivar responseRules: applied to every response's fields, or L{None}.
    """

    __slots__ = ("requestRules", "responseRules")

    def __init__(self, requestRules: FieldRules | None, responseRules: FieldRules | None) -> None:
        self.requestRules = requestRules
        self.responseRules = responseRules

    @classmethod
    def fromRoute(cls, route: Route) -> HeadersStage | None:
        """The stage of C{route}, or L{None} when it has no rules."""
        request = route.request_headers
        response = route.response_headers
        if request is None and response is None:
            return None
        return cls(
            None if request is None else FieldRules.fromConfig(request),
            None if response is None else FieldRules.fromConfig(response),
        )

    def handle(self, call: Call) -> None:
        rules = self.requestRules
        if rules is not None:
            request = call.request
            # request._replace(fields=...), without its keyword handling
            # (it would cost twice what the rest of this does).
            call.request = _make(
                (*request[:_FIELDS], rules.apply(request.fields), *request[_FIELDS + 1 :])
            )
        if self.responseRules is not None:
            call.responseRules = self.responseRules
        call.next()


class HeadersKind:
    """Builds the C{headers} stage of routes that have header rules."""

    name = "headers"

    def build(
        self, route: Route, config: Config, context: Mapping[str, Any], previous: Stage | None
    ) -> Stage | None:
        # Nothing to hand over: the stage keeps no state across requests.
        return HeadersStage.fromRoute(route)


registerKind(HeadersKind())
