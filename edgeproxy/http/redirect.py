# -*- test-case-name: tests.test_redirect -*-
"""
The request of a plain-HTTP listener with C{redirect_https = yes}: every
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
out.  The request finds both through its site (C{EdgeSite.listener} and
C{EdgeSite.currentRuntime().config.listeners}).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from twisted.web.http import datetimeToString
from twisted.web.server import Request

from edgeproxy.config.model import Listener

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


class RedirectRequest(Request):
    """
    A request answered with 308 to https, whatever its method and target.
    The site it arrives on must have C{listener} and C{currentRuntime()}
    (as L{edgeproxy.http.site.EdgeSite} has).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        site = getattr(self.channel, "site", None)
        reactor = getattr(site, "reactor", None)
        if reactor is not None:
            # The access log's duration starts here (see edgeproxy.accesslog).
            self.edgeStarted = reactor.seconds()

    def process(self) -> None:
        self.site = self.channel.site
        self.setHeader(b"Date", datetimeToString())
        host = validHost(self.getHeader(b"host"))
        target = self.uri
        if target.startswith(b"http://") or target.startswith(b"https://"):
            # absolute-form (RFC 9112 §3.2.2): its authority replaces Host.
            scheme, _, rest = target.partition(b"://")
            authority, slash, path = rest.partition(b"/")
            host = validHost(authority)
            target = slash + path if slash else b"/"
        if host is None or not target.startswith(b"/"):
            self._answer(400, b"Bad Request", None)
            return
        listener = self.site.listener
        listeners = self.site.currentRuntime().config.listeners
        location = redirectLocation(host, redirectPort(listener, listeners), target)
        self._answer(308, b"Permanent Redirect", location)

    def _answer(self, code: int, message: bytes, location: bytes | None) -> None:
        if location is None:
            body = b"400 Bad Request: missing or invalid Host.\n"
        else:
            self.setHeader(b"Location", location)
            body = b"308 Permanent Redirect: " + location + b"\n"
        self.setResponseCode(code, message)
        self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        self.setHeader(b"Content-Length", b"%d" % (len(body),))
        self.write(body)
        self.finish()
