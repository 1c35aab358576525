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
with odd characters is refused with 400.

The port in the Location is the listener's C{redirect_port} if set, else the
port of the first TLS listener of the current configuration; 443 is left
out.  The stage finds both through its listener factory (C{listener} and
C{currentRuntime().config.listeners}).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from edgeproxy.config.model import Listener
from edgeproxy.h1.fields import Fields
from edgeproxy.pipeline.values import BytesBody, Response

# RFC 3986 §3.2.2 reg-name restricted to what DNS names use (letters, digits,
# hyphen, dot; underscore too, as seen in the wild), RFC 1035 length limits.
_REG_NAME = re.compile(rb"[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?\.?\Z")
_PORT = re.compile(rb"[0-9]{1,5}\Z")
# Bytes kept as they are in the Location target; anything else is
# percent-encoded (RFC 3986 §2.1) so the header stays printable ASCII.
_TARGET_SAFE = frozenset(range(0x21, 0x7F))


def validHost(raw: bytes | None) -> str | None:
    """
    The host part of a C{Host} header value, lower-cased and without port,
    or L{None} when the value is not a plain host name or IP literal with an
    optional port (RFC 9110 §7.2, RFC 3986 §3.2.2).
    """
    if raw is None:
        return None
    value = raw.strip(b" \t").lower()
    if not value or len(value) > 261:
        return None
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        try:
            ipaddress.IPv6Address(host.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        name = "[" + host.decode("ascii") + "]"
    else:
        host, sep, port = value.partition(b":")
        rest = b":" + port if sep else b""
        if not _REG_NAME.match(host):
            return None
        name = host.decode("ascii")
    if rest:
        if not rest.startswith(b":") or not _PORT.match(rest[1:]) or int(rest[1:]) > 65535:
            return None
    return name


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
    """C{https://host[:port]/target}, the target percent-encoded where needed."""
    authority = host if port in (None, 443) else f"{host}:{port}"
    path = "".join(chr(b) if b in _TARGET_SAFE else f"%{b:02X}" for b in target)
    return f"https://{authority}{path}".encode("ascii")


class _Pipeline:
    """The stages of a redirecting listener: the redirect alone."""

    __slots__ = ("stages", "idleTimeout")

    def __init__(self, stage: RedirectStage) -> None:
        self.stages = (stage,)
        self.idleTimeout = 0.0


_PLAIN = b"text/plain; charset=utf-8"


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
        self.pipeline = _Pipeline(self)

    def handle(self, call: Any) -> None:
        request = call.request
        host = validHost(request.host)
        target = request.target
        if host is None or not target.startswith(b"/"):
            body = b"400 Bad Request: missing or invalid Host.\n"
            call.respond(
                Response(400, b"Bad Request", Fields.trusted({b"content-type": [_PLAIN]}), len(body), BytesBody(body))
            )
            return
        factory = self._factory
        listeners = factory.currentRuntime().config.listeners
        location = redirectLocation(host, redirectPort(factory.listener, listeners), target)
        body = b"308 Permanent Redirect: " + location + b"\n"
        call.respond(
            Response(
                308,
                b"Permanent Redirect",
                Fields.trusted({b"location": [location], b"content-type": [_PLAIN]}),
                len(body),
                BytesBody(body),
            )
        )
