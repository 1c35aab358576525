# -*- test-case-name: tests.test_redirect -*-
"""
The stage of a plain-HTTP listener with C{redirect_https = yes}: every
request is answered with C{308 Permanent Redirect} to the same target on
C{https://}.

308 (RFC 9110 §15.4.9) rather than 301 because a client must repeat the
method and body unchanged: a POST stays a POST.

The Location is built only from the request's own C{Host} (validated: a
reg-name, an IPv4 literal or a bracketed IPv6 literal, with an optional
port, nothing else) and its origin-form target, so it always points at the
host the client asked for on this server; a target cannot smuggle another
authority in (it is always appended after C{https://host/}) and a C{Host}
with odd characters is refused with 400.  Those rules are
L{edgeproxy.locations}', which a route's C{redirect} shares.

The port in the Location is the listener's C{redirect_port} if set, else the
port of the first TLS listener of the current configuration; 443 is left
out.  The stage finds both through its listener factory (C{listener} and
C{currentRuntime().config.listeners}).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from edgeproxy.config.model import Listener
from edgeproxy.errors import BadRequest
from edgeproxy.locations import encodeURIPart, validHost
from edgeproxy.pipeline.redirect import redirectResponse
from edgeproxy.pipeline.stages import RoutePipeline

__all__ = ["RedirectStage", "endpointPort", "redirectLocation", "redirectPort", "validHost"]


def endpointPort(description: str) -> int | None:
    """
    The TCP port of a Twisted server endpoint description (C{tcp:8443},
    C{tcp6:port=443:interface=\\:\\:}, C{ssl:443:...}), or L{None} when the
    description does not say (a C{systemd:} or C{unix:} endpoint).
    """
    parts = re.split(r"(?<!\\):", description)
    if parts[0].lower() not in ("tcp", "tcp6", "ssl"):
        return None
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq and key.isdigit():
            return int(key)
        if eq and key == "port" and value.isdigit():
            return int(value)
    return None


def redirectPort(listener: Listener, listeners: Sequence[Listener]) -> int | None:
    """
    The port to put in redirect URLs from C{listener}: its C{redirect_port},
    else the first TLS listener's port, else L{None} (the https default).
    """
    if listener.redirect_port is not None:
        return listener.redirect_port
    for candidate in listeners:
        if candidate.tls:
            return endpointPort(candidate.endpoint)
    return None


def redirectLocation(host: str, port: int | None, target: bytes) -> bytes:
    """C{https://host[:port]/target}, the target percent-encoded where needed
    (L{edgeproxy.locations.encodeURIPart})."""
    authority = host if port in (None, 443) else f"{host}:{port}"
    return f"https://{authority}".encode("ascii") + encodeURIPart(target)


class RedirectStage:
    """
    Answers every request of a C{redirect_https} listener with 308 to the
    same target on https, whatever its method (or 400 for a C{Host} that
    cannot be put in a URL).

    It is also what the listener selects for every request in place of a
    route (C{route} L{None}, C{prefix} empty, its own one-stage pipeline).
    """

    route = None
    prefix = b""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self.pipeline = RoutePipeline((("redirect", self),), 0.0)

    def handle(self, call: Any) -> None:
        request = call.request
        host = validHost(request.host)
        target = request.target
        if host is None or not target.startswith(b"/"):
            call.fail(BadRequest("redirect_https: missing or invalid Host"))
            return
        factory = self._factory
        listeners = factory.currentRuntime().config.listeners
        location = redirectLocation(host, redirectPort(factory.listener, listeners), target)
        call.respond(redirectResponse(308, location))
