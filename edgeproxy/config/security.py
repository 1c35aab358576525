# -*- test-case-name: tests.test_config_security -*-
"""
Reading the keys of the security layer (L{edgeproxy.security}): the access,
rate-limit, authentication and HSTS keys of C{[route:NAME]}, the client
certificate and PROXY protocol keys of C{[listen:NAME]}, C{proxy_protocol}
of C{[upstream:NAME]}; then the rules between the sections of the layer
(a route names limits and an C{auth} that exist, C{key = identity} needs
authentication, C{store = redis} needs C{[redis]}...).

The sections of their own are read by L{edgeproxy.config.ratelimit}
(C{[ratelimit:NAME]}, C{[redis]}) and L{edgeproxy.config.auth}
(C{[auth:NAME]}); this module hands their readers and keys on, so that
L{edgeproxy.config.parse} reads the whole layer through it.

One self-contained function per section or group of keys, as
L{edgeproxy.config.parse} reads the rest; nothing here imports Twisted or
a subsystem.
"""

from __future__ import annotations

import re
from typing import Any

from edgeproxy.config import syntax
from edgeproxy.config.model import IPNetwork, Listener, Route, Upstream
from edgeproxy.config.stagemodel import AuthSettings, RateLimit, RedisSettings
from edgeproxy.config.section import Section
from edgeproxy.config.securityvalues import NO_NAMES, NO_PAIRS, TOKEN, fieldPairs

__all__ = [
    "LISTEN_KEYS",
    "ROUTE_KEYS",
    "UPSTREAM_KEYS",
    "checkSecurity",
    "readListenerSecurity",
    "readRouteSecurity",
    "readUpstreamProxyProtocol",
]

ROUTE_KEYS = (
    "allow",
    "deny",
    "methods",
    "rate_limit",
    "auth",
    "hsts",
    "hsts_preload",
    "hsts_include_subdomains",
    "require_client_certificate",
    "client_certificate_headers",
)
LISTEN_KEYS = ("client_ca", "client_certificates", "proxy_protocol", "proxy_protocol_from")
UPSTREAM_KEYS = ("proxy_protocol",)

_CERTIFICATE_FACTS = ("subject", "san", "fingerprint")
_NO_NETWORKS: tuple[IPNetwork, ...] = ()
_HSTS_PRELOAD_MINIMUM = 365 * 86400.0
"""hstspreload.org asks for a max-age of at least a year."""


def _networks(text: str) -> tuple[IPNetwork, ...]:
    networks = tuple(syntax.checkNetwork(entry) for entry in syntax.splitList(text))
    if not networks:
        raise ValueError("expected at least one address or CIDR network")
    return networks


def _certificateFact(name: str) -> str:
    if name.lower() not in _CERTIFICATE_FACTS:
        raise ValueError(f"expected {', '.join(_CERTIFICATE_FACTS)} before ':', got {name!r}")
    return name.lower()


def _methods(text: str) -> tuple[str, ...]:
    methods: list[str] = []
    for entry in syntax.splitList(text):
        if not TOKEN.match(entry):
            raise ValueError(f"expected HTTP methods such as GET, HEAD, POST, got {entry!r}")
        # RFC 9110 9.1: methods are case-sensitive; the standard ones are
        # upper case, and a lower-case "get" in a config is a typo for it.
        method = entry.upper()
        if method not in methods:
            methods.append(method)
    if not methods:
        raise ValueError("expected at least one method")
    return tuple(methods)


def _names(text: str) -> tuple[str, ...]:
    names: list[str] = []
    for entry in syntax.splitList(text):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", entry):
            raise ValueError(f"expected section names, got {entry!r}")
        if entry in names:
            raise ValueError(f"{entry!r} is listed twice")
        names.append(entry)
    if not names:
        raise ValueError("expected at least one name")
    return tuple(names)


def readRouteSecurity(section: Section) -> dict[str, Any]:
    """The security keys of a C{[route:NAME]}, as L{Route} fields."""
    hsts = section.duration("hsts", 0.0, allowZero=True) if section.has("hsts") else None
    preload = section.boolean("hsts_preload", False)
    subdomains = section.boolean("hsts_include_subdomains", preload)
    for key in ("hsts_preload", "hsts_include_subdomains"):
        if section.has(key) and hsts is None and section.ok("hsts"):
            section.report(key, "only used with hsts = DURATION")
    if preload and hsts is not None and section.ok("hsts", "hsts_preload"):
        # hstspreload.org's submission rules: a preloaded name that does
        # not meet them is refused (or removed) by the browsers' lists.
        if hsts < _HSTS_PRELOAD_MINIMUM:
            section.report("hsts_preload", "preloading needs hsts of at least 365d")
        elif section.has("hsts_include_subdomains") and not subdomains:
            section.report("hsts_include_subdomains", "preloading needs includeSubDomains")
    auth = section.convert("auth", None, _oneName)
    return {
        "allow": section.convert("allow", _NO_NETWORKS, _networks),
        "deny": section.convert("deny", _NO_NETWORKS, _networks),
        "methods": section.convert("methods", NO_NAMES, _methods),
        "rate_limit": section.convert("rate_limit", NO_NAMES, _names),
        "auth": auth,
        "hsts": hsts,
        "hsts_preload": preload,
        "hsts_include_subdomains": subdomains,
        "require_client_certificate": section.boolean("require_client_certificate", False),
        "client_certificate_headers": section.convert(
            "client_certificate_headers", NO_PAIRS, lambda text: fieldPairs(text, "subject", _certificateFact)
        ),
    }


def _oneName(text: str) -> str:
    names = _names(text)
    if len(names) != 1:
        raise ValueError(f"expected the name of one [auth:NAME] section, got {text!r}")
    return names[0]


def readListenerSecurity(section: Section, tls: bool) -> dict[str, Any]:
    """The client certificate and PROXY protocol keys of a C{[listen:NAME]}."""
    clientCA = section.optionalFile("client_ca")
    if clientCA is not None and not tls and section.ok("tls"):
        section.report("client_ca", "client certificates need tls = yes")
    mode = section.choice(
        "client_certificates", "request", {"request": "request", "require": "require"}
    )
    if section.has("client_certificates") and not section.has("client_ca"):
        section.report("client_certificates", "only used with client_ca = FILE")
    proxy = section.boolean("proxy_protocol", False)
    sources = section.convert("proxy_protocol_from", _NO_NETWORKS, _networks)
    if proxy and not section.has("proxy_protocol_from") and section.ok("proxy_protocol"):
        # Whoever may send the header may claim any address.
        section.report(
            "proxy_protocol",
            "proxy_protocol = yes needs proxy_protocol_from = the load balancers' addresses",
        )
    if section.has("proxy_protocol_from") and not proxy and section.ok("proxy_protocol"):
        section.report("proxy_protocol_from", "only used with proxy_protocol = yes")
    return {
        "client_ca": clientCA,
        "client_certificates": mode,
        "proxy_protocol": proxy,
        "proxy_protocol_from": sources,
    }


def readUpstreamProxyProtocol(section: Section) -> str | None:
    """C{proxy_protocol} of an C{[upstream:NAME]}: C{v1}, C{v2} or L{None}."""
    return section.choice("proxy_protocol", None, {"v1": "v1", "v2": "v2", "no": None, "off": None})


def checkSecurity(
    *,
    routes: list[Route],
    listeners: list[Listener],
    upstreams: dict[str, Upstream],
    ratelimits: dict[str, RateLimit],
    auths: dict[str, AuthSettings],
    redis: RedisSettings | None,
    declared: dict[str, set[str]],
    sections: dict[str, Section],
) -> None:
    """
    The rules between sections of the security layer; each problem is
    reported on the section and key at fault.
    """
    anyClientCA = any(listener.client_ca for listener in listeners)
    for name, limit in ratelimits.items():
        if limit.store == "redis" and redis is None and "redis" not in declared.get("redis", set()):
            sections[f"ratelimit:{name}"].report("store", "store = redis needs a [redis] section")
    for route in routes:
        section = sections[f"route:{route.name}"]
        for limitName in route.rate_limit:
            if limitName not in declared.get("ratelimit", set()):
                known = ", ".join(sorted(declared.get("ratelimit", ()))) or "none are defined"
                section.report("rate_limit", f"no [ratelimit:{limitName}] section (rate limits: {known})")
                continue
            rateLimit = ratelimits.get(limitName)
            if rateLimit is not None and rateLimit.key == "identity" and route.auth is None:
                section.report(
                    "rate_limit",
                    f"[ratelimit:{limitName}] has key = identity, which needs auth = NAME on the route",
                )
        if route.auth is not None and route.auth not in declared.get("auth", set()):
            known = ", ".join(sorted(declared.get("auth", ()))) or "none are defined"
            section.report("auth", f"no [auth:{route.auth}] section (auth sections: {known})")
        auth = auths.get(route.auth) if route.auth is not None else None
        if auth is not None and auth.type == "oidc":
            for path in (auth.callback_path, auth.logout_path):
                if not any(_under(path, prefix) for prefix in route.paths):
                    section.report(
                        "auth",
                        f"[auth:{auth.name}] answers {path}, which is not under this route's paths",
                    )
        if route.require_client_certificate and not anyClientCA and listeners:
            section.report(
                "require_client_certificate",
                "no [listen:NAME] has client_ca = FILE, so no request could have a certificate",
            )


def _under(path: str, prefix: str) -> bool:
    """Whether routing sends C{path} to a route with C{prefix}."""
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")

