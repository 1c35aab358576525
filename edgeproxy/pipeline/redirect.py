# -*- test-case-name: tests.test_route_redirect -*-
"""
The C{redirect} stage kind: a route with C{redirect = URL} answers every
request with that redirect (C{redirect_status}, 301 by default), whatever
its method, and forwards nothing.  It is the first kind of the order
(L{edgeproxy.pipeline.stages.ORDER}) and a redirect route's only stage.

The Location is the route's template filled from the request
(L{edgeproxy.locations.expand}): the path as routing saw it (after the
route's prefix with C{strip_prefix}, so that a moved subtree keeps its
rest), the query as sent, the host when the template asks for it (a
C{Host} that is not a plain host name or IP literal gets 400, as on a
C{redirect_https} listener).  What may reach the Location, and why a
request cannot move it to another host, is L{edgeproxy.locations}'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeproxy.config.model import Config, Route
from edgeproxy.errors import BadRequest
from edgeproxy.h1.fields import Fields
from edgeproxy.locations import REDIRECT_PHRASES, expand, validHost
from edgeproxy.pipeline.call import Call, Stage
from edgeproxy.pipeline.forward import stripPrefix
from edgeproxy.pipeline.stages import registerKind
from edgeproxy.pipeline.values import BytesBody, Response

__all__ = ["Redirect", "RedirectKind", "redirectResponse"]


def redirectResponse(status: int, location: bytes) -> Response:
    """
    The answer of a redirect: C{status}, C{Location}, and a short plain text
    body that says where to (C{301 Moved Permanently: https://...}).  Both
    redirects answer with it: a route's (here) and a C{redirect_https}
    listener's (L{edgeproxy.http.redirect}).
    """
    phrase = REDIRECT_PHRASES[status]
    body = b"%d %s: %s\n" % (status, phrase, location)
    return Response(
        status,
        phrase,
        Fields.trusted({b"location": [location], b"content-type": [b"text/plain; charset=utf-8"]}),
        len(body),
        BytesBody(body),
    )


class Redirect:
    """Answers every request of a route with its redirect."""

    __slots__ = ("_parts", "_status", "_strip", "_host")

    def __init__(self, route: Route) -> None:
        redirect = route.redirect
        assert redirect is not None
        self._parts = redirect.parts
        self._status = redirect.status
        self._strip = route.strip_prefix
        self._host = ("var", "host") in redirect.parts

    def handle(self, call: Call) -> None:
        request = call.request
        host = None
        if self._host:
            host = validHost(request.host)
            if host is None:
                call.fail(BadRequest("redirect: missing or invalid Host"))
                return
        path = request.path
        if self._strip:
            path = stripPrefix(path, request.prefix)
        location = expand(self._parts, request.connection.scheme, host, path, request.query)
        call.respond(redirectResponse(self._status, location))


class RedirectKind:
    """The C{redirect} stage of every route with C{redirect}."""

    name = "redirect"

    def build(
        self, route: Route, config: Config, context: Mapping[str, Any], previous: Stage | None
    ) -> Stage | None:
        if route.redirect is None:
            return None
        return Redirect(route)


registerKind(RedirectKind())
