# -*- test-case-name: tests.test_config_headers -*-
"""
Reading the header keys: a route's header rules (L{readRouteHeaders}:
C{request_headers_set}, C{_add}, C{_remove} and the same for
C{response_headers_}) and C{[edgeproxy] request_id} and C{client_ip_header}
(L{readProxyHeaders}), with the rule that ties them (L{checkHeaderNames}: a
route cannot set the fields the proxy sets itself).  Part of
L{edgeproxy.config.parse}; the stage is L{edgeproxy.headers}.

Syntax.  C{_set} and C{_add} take one field per line, C{Name: value}, on
indented continuation lines for more than one::

    response_headers_set = X-Content-Type-Options: nosniff
        Referrer-Policy: strict-origin-when-cross-origin

(never a comma-separated list: a comma belongs to many values, such as
C{Cache-Control: no-store, private}).  C{_remove} takes a list of names;
a name ending in C{*} removes every field whose name starts with the rest
(C{X-Internal-*}).

Every name is a token (RFC 9110 5.1, 5.6.2) and every value printable
ASCII, spaces and tabs inside (RFC 9110 5.5: no CR, LF, NUL or other
control character, which could split or forge a field), so a value that is
accepted here is written as it is.  Fields a rule cannot sensibly touch are
refused with the reason: the connection and framing fields (RFC 9110
7.6.1, RFC 9112 6), C{Host} (the upstream's C{host_header}), and on
requests the fields the proxy writes itself.
"""

from __future__ import annotations

import re
from typing import Any

from edgeproxy.config.model import ProxySettings, Route
from edgeproxy.config.stagemodel import HeaderRules
from edgeproxy.config.section import Section

__all__ = [
    "HEADER_PROXY_KEYS",
    "HEADER_ROUTE_KEYS",
    "NOT_SET_ON_REQUESTS",
    "NOT_SET_ON_RESPONSES",
    "checkHeaderNames",
    "readProxyHeaders",
    "readRouteHeaders",
]

HEADER_ROUTE_KEYS: tuple[str, ...] = (
    "request_headers_set",
    "request_headers_add",
    "request_headers_remove",
    "response_headers_set",
    "response_headers_add",
    "response_headers_remove",
)
"""The keys of C{[route:NAME]} read here."""

HEADER_PROXY_KEYS: tuple[str, ...] = ("request_id", "client_ip_header")
"""The keys of C{[edgeproxy]} read here."""

_CONNECTION_FIELDS = frozenset(
    # RFC 9110 7.6.1 (hop-by-hop) and the framing field, which the proxy
    # writes from the body it sends (RFC 9112 6).
    ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "content-length")
)

NOT_SET_ON_REQUESTS: dict[str, str] = {
    **{name: "a connection or framing field: the proxy writes its own" for name in _CONNECTION_FIELDS},
    "host": "the proxy sends the client's Host, or the upstream's host_header",
    "x-forwarded-for": "the proxy writes it (see trusted_proxies)",
    "x-forwarded-proto": "the proxy writes it (see trusted_proxies)",
    "x-forwarded-host": "the proxy writes it (see trusted_proxies)",
    "forwarded": "the proxy writes it (see trusted_proxies)",
    "via": "the proxy writes it (see [edgeproxy] via)",
    "x-real-ip": "a client's is always removed; [edgeproxy] client_ip_header = X-Real-IP sets it",
}
"""Request fields a rule may not set or add, and why (the forward stage
would drop or replace them: L{edgeproxy.pipeline.forwarded})."""

NOT_SET_ON_RESPONSES: dict[str, str] = {
    name: "a connection or framing field: the proxy writes its own" for name in _CONNECTION_FIELDS
}
"""Response fields a rule may not set, add or remove, and why."""

_NOT_REMOVED_FROM_REQUESTS: dict[str, str] = {
    **{name: "a connection or framing field: never passed on anyway" for name in _CONNECTION_FIELDS},
    "host": "every request carries a Host (RFC 9112 3.2); see host_header",
}

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?\Z")
"""RFC 9110 5.5 field-value, printable ASCII only, no leading or trailing
whitespace (a parser would strip it)."""

_NOTHING: tuple[Any, ...] = ()


def _fieldName(text: str, request: bool = True) -> str:
    if not _TOKEN.match(text):
        raise ValueError(
            f"expected a field name (letters, digits and !#$%&'*+-.^_`|~), got {text!r}"
        )
    if request and "_" in text:
        # The forward stage drops such names (CGI maps '-' and '_' alike).
        raise ValueError(f"field names with '_' are not passed on by the proxy, got {text!r}")
    return text.lower()


def _fieldLines(text: str, refused: dict[str, str], request: bool) -> tuple[tuple[str, str], ...]:
    """C{Name: value} per line, checked, names lower-cased."""
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        where = "" if "\n" not in text else f" (line {number} of the value)"
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip(" \t")
        if not colon or not name:
            raise ValueError(f"expected 'Name: value', one field per line{where}, got {line!r}")
        try:
            lower = _fieldName(name, request)
        except ValueError as e:
            raise ValueError(f"{e}{where}") from None
        if lower in refused:
            raise ValueError(f"{name} cannot be set by a rule: {refused[lower]}{where}")
        if not value:
            raise ValueError(
                f"{name} has no value{where} (an empty field is not sent; "
                "use the _remove key to remove one)"
            )
        if not _VALUE.match(value):
            raise ValueError(
                f"the value of {name}{where} must be printable ASCII "
                f"(no control characters, RFC 9110 5.5), got {value!r}"
            )
        pairs.append((lower, value))
    return tuple(pairs)


def _removed(text: str, refused: dict[str, str], request: bool) -> tuple[str, ...]:
    """Names and C{Prefix-*} patterns, lower-cased, each once."""
    names: list[str] = []
    for entry in re.split(r"[\s,]+", text.strip()):
        if not entry:
            continue
        stem = entry.removesuffix("*")
        if not stem or "*" in stem:
            raise ValueError(
                f"expected field names, or a name's start followed by '*' "
                f"(X-Internal-*), got {entry!r}"
            )
        lower = _fieldName(stem, request) + ("*" if entry.endswith("*") else "")
        if lower in refused:
            raise ValueError(f"{entry} cannot be removed by a rule: {refused[lower]}")
        if lower not in names:
            names.append(lower)
    return tuple(names)


def _readRules(section: Section, direction: str) -> HeaderRules | None:
    request = direction == "request"
    refused = NOT_SET_ON_REQUESTS if request else NOT_SET_ON_RESPONSES
    notRemoved = _NOT_REMOVED_FROM_REQUESTS if request else NOT_SET_ON_RESPONSES
    keys = [f"{direction}_headers_{verb}" for verb in ("set", "add", "remove")]
    if not any(section.has(key) for key in keys):
        return None
    setKey, addKey, removeKey = keys
    rules = HeaderRules(
        set=section.convert(setKey, _NOTHING, lambda text: _fieldLines(text, refused, request)),
        add=section.convert(addKey, _NOTHING, lambda text: _fieldLines(text, refused, request)),
        remove=section.convert(
            removeKey, _NOTHING, lambda text: _removed(text, notRemoved, request)
        ),
    )
    return rules if rules.set or rules.add or rules.remove else None


def readRouteHeaders(section: Section) -> dict[str, Any]:
    """The route's header rules, as keyword arguments of L{Route}."""
    return {
        "request_headers": _readRules(section, "request"),
        "response_headers": _readRules(section, "response"),
    }


def _ownField(text: str) -> str | None:
    if text.strip().lower() == "off":
        return None
    name = text.strip()
    lower = _fieldName(name)
    if lower in NOT_SET_ON_REQUESTS and lower != "x-real-ip":
        raise ValueError(f"{name} cannot be used: {NOT_SET_ON_REQUESTS[lower]}")
    return name


def readProxyHeaders(section: Section) -> dict[str, Any]:
    """C{request_id} and C{client_ip_header}, as keyword arguments of L{ProxySettings}."""
    defaults = ProxySettings()
    requestId = section.convert("request_id", defaults.request_id, _ownField)
    clientIp = section.convert("client_ip_header", defaults.client_ip_header, _ownField)
    if requestId is not None and requestId.lower() == "x-real-ip":
        section.report("request_id", "X-Real-IP carries an address (see client_ip_header)")
        requestId = defaults.request_id
    if (
        requestId is not None
        and clientIp is not None
        and requestId.lower() == clientIp.lower()
        and section.ok("request_id", "client_ip_header")
    ):
        section.report("client_ip_header", f"{clientIp} is the request ID's field (request_id)")
        clientIp = None
    return {"request_id": requestId, "client_ip_header": clientIp}


def checkHeaderNames(
    proxy: ProxySettings, routes: list[Route], sections: dict[str, Section]
) -> None:
    """
    A route's rules cannot set or add the fields the proxy sets itself from
    C{[edgeproxy]}: on requests the request ID and the client address (the
    forward stage would replace them), on responses the request ID (every
    response carries the request's own).
    """
    own = {
        name.lower(): f"the proxy sets it ([edgeproxy] {key} = {name})"
        for key, name in (("request_id", proxy.request_id), ("client_ip_header", proxy.client_ip_header))
        if name is not None
    }
    if not own:
        return
    requestId = None if proxy.request_id is None else proxy.request_id.lower()
    for route in routes:
        section = sections.get(f"route:{route.name}")
        if section is None:
            continue
        keys = []
        if route.request_headers is not None:
            rules = route.request_headers
            keys += [("request_headers_set", rules.set, own), ("request_headers_add", rules.add, own)]
        if route.response_headers is not None and requestId is not None:
            # The client side writes the request's ID in every response.
            rules = route.response_headers
            theirs = {requestId: own[requestId]}
            keys += [("response_headers_set", rules.set, theirs), ("response_headers_add", rules.add, theirs)]
        for key, pairs, refused in keys:
            for name, _ in pairs:
                if name in refused:
                    section.report(key, f"{name} cannot be set by a rule: {refused[name]}")
                    break
