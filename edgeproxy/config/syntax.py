# -*- test-case-name: tests.test_config -*-
"""
The syntax of single C{edge.ini} values that are more than a number: server
endpoint descriptions, host names and route hosts, backend server lists,
route paths, header tokens.

Each function takes the text of one value and returns it checked and
normalised, or raises L{ValueError} whose message says what was expected;
L{edgeproxy.config.parse} adds the file, section, key and line.  Nothing here
does I/O or imports Twisted: endpoint descriptions are checked without
building an endpoint, so C{edgeproxy check} never binds a port.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from edgeproxy.config.model import Server
from edgeproxy.errors import BadRequest
from edgeproxy.targets import normaliseTarget

__all__ = [
    "EndpointSpec",
    "checkEndpoint",
    "checkHostname",
    "checkRouteHost",
    "checkRoutePath",
    "checkToken",
    "checkHostHeader",
    "checkHashKey",
    "checkNetwork",
    "parseServers",
    "splitList",
    "uniqueList",
]


def _isDigits(text: str) -> bool:
    """ASCII digits only: C{str.isdigit} also accepts C{"²"}, which C{int} refuses."""
    return text.isascii() and text.isdigit()


def splitList(text: str) -> list[str]:
    """
    Split a list value on commas and/or whitespace (newlines included, so a
    long list may continue on indented lines).
    """
    return [item for item in re.split(r"[\s,]+", text.strip()) if item]


def uniqueList(text: str, check: Callable[[str], str], what: str) -> tuple[str, ...]:
    """
    A list value whose entries are each checked by C{check} and may appear
    once (C{hosts}, C{paths}, C{[acme] names}).
    """
    entries: list[str] = []
    for raw in splitList(text):
        entry = check(raw)
        if entry in entries:
            raise ValueError(f"{what} {entry!r} is listed twice")
        entries.append(entry)
    if not entries:
        raise ValueError(f"expected at least one {what}")
    return tuple(entries)


def checkNetwork(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4 or IPv6 address or CIDR network, host bits clear."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"expected IP addresses or CIDR networks such as 10.0.0.0/8 or 2001:db8::/32, got {text!r}"
            ) from None
        raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from None


# Host names -------------------------------------------------------------

# RFC 1123 §2.1 labels; "_" is accepted because internal service names
# (container DNS, SRV-style names) use it and it does no harm.
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")


def checkHostname(text: str) -> str:
    """
    Check a DNS host name and return it lower-cased, without a trailing dot.

    @raise ValueError: when C{text} is not a host name (IP literals are not
        host names; callers that accept them check those first).
    """
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("expected a host name, got an empty value")
    if not name.isascii():
        raise ValueError(
            f"expected a host name, got {text!r} (write internationalised "
            "names in their xn-- ASCII form)"
        )
    if len(name) > 253:
        raise ValueError(f"expected a host name of at most 253 characters, got {len(name)}")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(
                f"expected a host name (letters, digits and '-' in dot-separated "
                f"labels of 1-63 characters), got {text!r}"
            )
    if _isDigits(labels[-1]):
        # All-numeric last label: it was meant as an IPv4 address and is not one.
        raise ValueError(f"expected a host name or IP address, got {text!r}")
    return name


def _ipLiteral(text: str) -> str | None:
    """The canonical form of an IPv4/IPv6 literal (brackets allowed), or L{None}."""
    candidate = text.strip()
    if candidate.startswith("[") and candidate.endswith("]"):
        candidate = candidate[1:-1]
    try:
        return ipaddress.ip_address(candidate).compressed
    except ValueError:
        return None


def checkRouteHost(text: str) -> str:
    """
    Check one entry of a route's C{hosts}: C{*} alone, C{*.suffix} (exactly
    one leading wildcard label), an IP literal (returned in canonical form,
    without brackets) or a host name (returned lower-case, no trailing dot).
    """
    entry = text.strip()
    if entry == "*":
        return entry
    literal = _ipLiteral(entry)
    if literal is not None:
        return literal
    if ":" in entry.strip("[]") and entry.count(":") == 1:
        raise ValueError(f"expected a host without a port, got {text!r} (routes match any port)")
    if entry.startswith("*."):
        if "*" in entry[2:]:
            raise ValueError(
                f"expected a wildcard only as the whole leftmost label ('*.example.com'), got {text!r}"
            )
        return "*." + checkHostname(entry[2:])
    if "*" in entry:
        raise ValueError(
            f"expected a wildcard only as the whole leftmost label ('*.example.com') "
            f"or '*' alone, got {text!r}"
        )
    return checkHostname(entry)


def checkRoutePath(text: str) -> str:
    """
    Check a route path prefix: it starts with C{/}, has no query, fragment,
    whitespace or dot segments, and is already in the form
    L{edgeproxy.targets.normaliseTarget} gives request paths (routing
    compares normalised paths, so any other spelling could never match;
    RFC 3986 §5.2.4, §6.2.2).
    """
    path = text.strip()
    if not path.startswith("/"):
        raise ValueError(f"expected a path starting with '/', got {text!r}")
    if any(ch in path for ch in "?#") or any(ch.isspace() for ch in path):
        raise ValueError(f"expected a path without query, fragment or spaces, got {text!r}")
    if not path.isascii():
        raise ValueError(f"expected an ASCII path (percent-encode other characters), got {text!r}")
    segments = path.split("/")
    if any(segment in (".", "..") for segment in segments):
        raise ValueError(f"expected a path without '.' or '..' segments, got {text!r}")
    try:
        normalised, _ = normaliseTarget(path.encode("ascii"))
    except BadRequest as e:
        raise ValueError(f"expected a path a request could have, got {text!r} ({e})") from None
    if normalised != path.encode("ascii"):
        canonical = normalised.decode("ascii")
        raise ValueError(
            f"requests are routed by their normalised path; write {text!r} as {canonical!r}"
        )
    return path


# RFC 9110 §5.6.2 tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def checkToken(text: str) -> str:
    """Check an HTTP token (RFC 9110 §5.6.2), such as a C{Via} pseudonym."""
    token = text.strip()
    if not _TOKEN.match(token):
        raise ValueError(
            f"expected an HTTP token (letters, digits and !#$%&'*+-.^_`|~), got {text!r}"
        )
    return token


def checkHashKey(text: str) -> str:
    """
    Check an upstream's C{hash_key}: C{client_ip}, C{path}, C{header:NAME}
    or C{cookie:NAME}.  Header names are returned lower-cased (they are
    case-insensitive, RFC 9110 §5.1); cookie names keep their case (RFC 6265
    §5.4 compares them exactly).
    """
    value = text.strip()
    if value.lower() in ("client_ip", "path"):
        return value.lower()
    kind, colon, name = value.partition(":")
    kind = kind.strip().lower()
    name = name.strip()
    if colon and kind in ("header", "cookie"):
        if not _TOKEN.match(name):
            raise ValueError(
                f"expected a {kind} name (an HTTP token) after '{kind}:', got {name!r}"
            )
        return f"{kind}:{name.lower() if kind == 'header' else name}"
    raise ValueError(
        f"expected client_ip, path, header:NAME or cookie:NAME, got {text!r}"
    )


def parseStatusRanges(text: str) -> tuple[tuple[int, int], ...]:
    """
    Parse a list of HTTP status codes and inclusive ranges, such as
    C{"200-399"} or C{"200, 204, 300-302"} (C{health_status},
    C{fail_status}).
    """
    ranges: list[tuple[int, int]] = []
    for entry in splitList(text):
        low, dash, high = entry.partition("-")
        bounds = [low.strip(), high.strip()] if dash else [low.strip()] * 2
        for bound in bounds:
            if not _isDigits(bound) or not 100 <= int(bound) <= 599:
                raise ValueError(
                    f"expected status codes (100-599) or ranges like 200-399, got {entry!r}"
                )
        first, last = int(bounds[0]), int(bounds[1])
        if first > last:
            raise ValueError(f"the range {entry!r} ends before it starts")
        ranges.append((first, last))
    if not ranges:
        raise ValueError("expected at least one status code or range")
    return tuple(ranges)


def parsePercent(text: str) -> float:
    """C{"20%"} -> C{0.2}; from 0% to 100%."""
    value = text.strip()
    number = value[:-1].strip() if value.endswith("%") else None
    try:
        fraction = float(number) / 100 if number else -1.0
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0 or number is None or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"expected a percentage from 0% to 100%, like 20%, got {text!r}")
    return fraction


def checkOriginPath(text: str) -> str:
    """A request target in origin form (RFC 9112 §3.2.1), for health checks."""
    path = text.strip()
    if not path.startswith("/") or any(not "!" <= c <= "~" or c == "#" for c in path):
        raise ValueError(
            f"expected a path starting with '/' of visible ASCII without '#', like /healthz, got {text!r}"
        )
    return path


def _checkPort(text: str, what: str, allowZero: bool = False) -> int:
    if not _isDigits(text):
        raise ValueError(f"expected a {what} port number, got {text!r}")
    port = int(text)
    low = 0 if allowZero else 1
    if not low <= port <= 65535:
        raise ValueError(f"expected a {what} port number between {low} and 65535, got {text!r}")
    return port


def _splitHostPort(text: str) -> tuple[str, str | None]:
    """Split C{host:port} / C{[v6]:port} / C{host}; the host loses its brackets."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"expected ']' closing the IPv6 address in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if _ipLiteral(host) is None or ":" not in host:
            raise ValueError(f"expected an IPv6 address inside [...], got {text!r}")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"expected ':port' after the IPv6 address in {text!r}")
        return host, rest[1:]
    if text.count(":") > 1:
        raise ValueError(f"expected IPv6 addresses in brackets, like [::1]:9001, got {text!r}")
    host, colon, port = text.partition(":")
    return host, (port if colon else None)


def _checkHost(text: str) -> str:
    literal = _ipLiteral(text)
    return literal if literal is not None else checkHostname(text)


def checkHostHeader(text: str) -> str:
    """Check a C{Host} value: C{host}, C{host:port} or C{[v6]:port}."""
    value = text.strip()
    host, port = _splitHostPort(value)
    _checkHost(host)
    if port is not None:
        _checkPort(port, "Host")
    return value


def parseServers(text: str) -> tuple[Server, ...]:
    """
    Parse an upstream's C{servers}: comma-separated C{host:port} entries,
    each optionally followed by C{weight=N}, C{max_conns=N}, C{backup}
    and/or C{down}, for example
    C{"10.0.0.1:8080 weight=3, app.internal:8080 max_conns=50, [::1]:9001 backup"}.
    """
    servers: list[Server] = []
    seen: set[tuple[str, int]] = set()
    entries = text.split(",")
    for entry in entries:
        tokens = entry.split()
        if not tokens:
            raise ValueError(
                "expected comma-separated host:port entries, got an empty entry"
                if len(entries) > 1
                else "expected at least one host:port"
            )
        host, port = _splitHostPort(tokens[0])
        if port is None:
            raise ValueError(f"expected host:port, got {tokens[0]!r} (the port is required)")
        host = _checkHost(host)
        number = _checkPort(port, "backend")
        numbers = {"weight": 1, "max_conns": 0}
        flags: set[str] = set()
        for option in tokens[1:]:
            name, equals, value = option.partition("=")
            if name in ("backup", "down") and not equals:
                if name in flags:
                    raise ValueError(f"{name!r} is given twice for {tokens[0]!r}")
                flags.add(name)
                continue
            if name not in numbers or not equals:
                raise ValueError(
                    f"expected 'weight=N', 'max_conns=N', 'backup' or 'down' after "
                    f"{tokens[0]!r}, got {option!r} (separate servers with commas)"
                )
            if name in flags:
                raise ValueError(f"{name!r} is given twice for {tokens[0]!r}")
            flags.add(name)
            if not _isDigits(value) or int(value) < 1:
                raise ValueError(f"expected a {name} of 1 or more, got {value!r}")
            numbers[name] = int(value)
        if (host, number) in seen:
            raise ValueError(
                f"{tokens[0]} is listed twice (give it a weight instead)"
            )
        seen.add((host, number))
        servers.append(
            Server(
                host=host,
                port=number,
                weight=numbers["weight"],
                backup="backup" in flags,
                down="down" in flags,
                max_conns=numbers["max_conns"],
            )
        )
    return tuple(servers)


# Server endpoint descriptions -------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """A checked server endpoint description."""

    kind: str
    """C{tcp}, C{tcp6}, C{unix} or C{systemd}."""
    description: str
    """The description to hand to C{serverFromString} (UNIX paths made
    absolute)."""
    port: int | None
    """The TCP port, when the description says it."""
    interface: str | None
    """The TCP interface, when the description says it (canonical form)."""


# Parameter names, in positional order, of the endpoint types Twisted 26.10
# registers (twisted/internet/endpoints.py: _parseTCP, _TCP6ServerParser,
# _parseUNIX, _SystemdParser).
_ENDPOINT_PARAMETERS: dict[str, tuple[str, ...]] = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
}

_ENDPOINT_EXPECTED = (
    "expected a server endpoint: tcp:PORT[:interface=ADDRESS], "
    "tcp6:PORT[:interface=ADDRESS], unix:PATH or systemd:domain=INET6:name=NAME"
)


def _tokenizeEndpoint(text: str) -> tuple[list[str], dict[str, str]]:
    """
    Split a description the way Twisted's C{endpoints._parse} does: C{:}
    separates parameters, the first C{=} of a parameter separates name and
    value, and a backslash escapes the next character.  Unlike Twisted, a
    parameter given twice is an error instead of the last one winning.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    parts: list[str] = []
    current = ""
    operators = ":="
    characters = iter(text)

    def add(pieces: list[str]) -> None:
        if len(pieces) == 1:
            args.append(pieces[0])
            return
        name, value = pieces
        if name in kwargs:
            raise ValueError(f"{_ENDPOINT_EXPECTED}; {name!r} is given twice in {text!r}")
        kwargs[name] = value

    for character in characters:
        if character in operators:
            parts.append(current)
            current = ""
            if character == ":":
                add(parts)
                parts = []
                operators = ":="
            else:
                operators = ":"
        elif character == "\\":
            escaped = next(characters, None)
            if escaped is None:
                raise ValueError(f"{_ENDPOINT_EXPECTED}; {text!r} ends with a lone backslash")
            current += escaped
        else:
            current += character
    parts.append(current)
    add(parts)
    return args, kwargs


def _escapeEndpointValue(value: str) -> str:
    return re.sub(r"([\\:=])", r"\\\1", value)


def checkEndpoint(text: str, base: str) -> EndpointSpec:
    """
    Check a server endpoint description without creating the endpoint.

    Only plain stream endpoints are accepted: edgeproxy terminates TLS
    itself (with SNI, ALPN and reloadable certificates), so Twisted's C{ssl:}
    and C{tls:} endpoints would bypass all of that and are refused.

    @param base: directory against which a relative C{unix:} path resolves.
    """
    description = text.strip()
    if not description:
        raise ValueError(f"{_ENDPOINT_EXPECTED}, got an empty value")
    if "=" in description.split(":", 1)[0]:
        # Twisted would take the first positional argument as the type, so
        # "weight=abc" (a server option in the wrong key) has none at all.
        raise ValueError(
            f"{_ENDPOINT_EXPECTED}, got {text!r} (it starts with a parameter, "
            "not an endpoint type such as tcp)"
        )
    args, kwargs = _tokenizeEndpoint(description)
    kind = args[0].lower() if args else ""
    if kind in ("ssl", "tls", "txsni"):
        raise ValueError(
            f"{kind}: endpoints are not accepted: edgeproxy terminates TLS itself; "
            f"use tcp:PORT with 'tls = yes' and the certificates of [tls]"
        )
    parameters = _ENDPOINT_PARAMETERS.get(kind)
    if parameters is None:
        raise ValueError(f"{_ENDPOINT_EXPECTED}, got {text!r} (unknown endpoint type {args[0]!r})")
    positional = args[1:]
    if "" in positional:
        hint = ""
        if kind in ("tcp", "tcp6"):
            hint = " (escape the colons of an IPv6 interface: interface=\\:\\:1)"
        raise ValueError(f"{_ENDPOINT_EXPECTED}, got {text!r}: an empty ':' part{hint}")
    if len(positional) > len(parameters):
        hint = ""
        if kind in ("tcp", "tcp6"):
            hint = " (escape the colons of an IPv6 interface: interface=\\:\\:1)"
        raise ValueError(f"{_ENDPOINT_EXPECTED}, got {text!r}: too many ':' parts{hint}")
    values = dict(zip(parameters, positional))
    for name, value in kwargs.items():
        if name not in parameters:
            raise ValueError(
                f"{kind}: endpoints take {', '.join(parameters)}; got unknown parameter {name!r} in {text!r}"
            )
        if name in values:
            raise ValueError(f"{kind}: endpoint parameter {name!r} is given twice in {text!r}")
        values[name] = value

    port: int | None = None
    interface: str | None = None
    if "backlog" in values:
        backlog = values["backlog"]
        if not _isDigits(backlog) or int(backlog) < 1:
            raise ValueError(f"expected a backlog of 1 or more, got {backlog!r} in {text!r}")

    if kind in ("tcp", "tcp6"):
        if "port" not in values:
            raise ValueError(f"{kind}: endpoint needs a port, like {kind}:8443, got {text!r}")
        port = _checkPort(values["port"], "listening", allowZero=True)
        if "interface" in values and values["interface"] != "":
            literal = _ipLiteral(values["interface"])
            if literal is None:
                # Binding to a name would make the listening address depend on
                # the resolver at start time.
                raise ValueError(
                    f"expected interface to be an IP address such as 127.0.0.1 or \\:\\:1, "
                    f"got {values['interface']!r} in {text!r}"
                )
            if kind == "tcp6" and ":" not in literal:
                raise ValueError(
                    f"tcp6: endpoints listen on IPv6 addresses, got interface "
                    f"{values['interface']!r}; use tcp: for IPv4"
                )
            interface = literal
        return EndpointSpec(kind, description, port, interface)

    if kind == "unix":
        address = values.get("address", "")
        if not address:
            raise ValueError(f"unix: endpoint needs a socket path, like unix:/run/edgeproxy.sock, got {text!r}")
        if "mode" in values and not re.fullmatch(r"[0-7]{1,4}", values["mode"]):
            raise ValueError(f"expected an octal mode such as 660, got {values['mode']!r} in {text!r}")
        if "lockfile" in values and values["lockfile"] not in ("0", "1"):
            raise ValueError(f"expected lockfile=0 or lockfile=1, got {values['lockfile']!r} in {text!r}")
        absolute = os.path.normpath(os.path.join(base, address))
        directory = os.path.dirname(absolute)
        if not os.path.isdir(directory):
            raise ValueError(f"the directory of the unix socket {absolute!r} does not exist")
        rebuilt = ["unix", _escapeEndpointValue(absolute)]
        rebuilt += [f"{name}={_escapeEndpointValue(values[name])}" for name in parameters[1:] if name in values]
        return EndpointSpec(kind, ":".join(rebuilt), None, None)

    # systemd
    domain = values.get("domain")
    if domain not in ("INET", "INET6", "UNIX"):
        raise ValueError(
            f"expected systemd:domain=INET|INET6|UNIX:name=NAME, got {text!r}"
        )
    if ("index" in values) == ("name" in values):
        raise ValueError(
            f"systemd: endpoints need exactly one of index=N or name=NAME "
            f"(the FileDescriptorName of the socket unit), got {text!r}"
        )
    if "index" in values and not _isDigits(values["index"]):
        raise ValueError(f"expected index to be a whole number, got {values['index']!r} in {text!r}")
    if "name" in values and not values["name"]:
        raise ValueError(f"expected a non-empty name=, got {text!r}")
    return EndpointSpec(kind, description, None, None)
