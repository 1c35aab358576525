# -*- test-case-name: tests.test_config_security -*-
"""
Reading the keys of the security layer (L{edgeproxy.security}): the access,
rate-limit, authentication and HSTS keys of C{[route:NAME]}, the client
certificate and PROXY protocol keys of C{[listen:NAME]}, C{proxy_protocol}
of C{[upstream:NAME]}, and the C{[ratelimit:NAME]}, C{[auth:NAME]} and
C{[redis]} sections; then the rules between them (a route names limits and
an C{auth} that exist, C{key = identity} needs authentication, C{store =
redis} needs C{[redis]}...).

One self-contained function per section or group of keys, as
L{edgeproxy.config.parse} reads the rest; nothing here imports Twisted or
a subsystem.  Secret files (passwords, client secrets, cookie and HMAC
keys) are read here, through L{readRegularFile}, so that a configuration
that loads has them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from edgeproxy.config import syntax
from edgeproxy.config.files import TOKEN_LIMIT, FileProblem, readRegularFile
from edgeproxy.config.model import (
    AuthSettings,
    IPNetwork,
    Listener,
    RateLimit,
    RedisSettings,
    Route,
    Upstream,
)
from edgeproxy.config.section import Section

__all__ = [
    "AUTH_KEYS",
    "LISTEN_KEYS",
    "RATELIMIT_KEYS",
    "REDIS_KEYS",
    "ROUTE_KEYS",
    "UPSTREAM_KEYS",
    "checkSecurity",
    "readAuth",
    "readListenerSecurity",
    "readRateLimit",
    "readRedis",
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
RATELIMIT_KEYS = ("rate", "burst", "key", "concurrency", "store", "on_store_error")
REDIS_KEYS = ("url", "username", "password_file", "ca", "timeout", "prefix")

_COMMON_AUTH = ("type", "pass_authorization")
_AUTH_TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "basic": ("htpasswd", "realm", "user_header"),
    "jwt": (
        "jwks",
        "jwks_ca",
        "issuer",
        "audience",
        "algorithms",
        "secret_file",
        "leeway",
        "token_from",
        "claims_to_headers",
        "jwks_refresh",
    ),
    "forward": (
        "url",
        "ca",
        "copy_request_headers",
        "copy_response_headers",
        "cache_ttl",
        "cache_size",
        "timeout",
    ),
    "oidc": (
        "issuer",
        "ca",
        "client_id",
        "client_secret_file",
        "scopes",
        "callback_path",
        "logout_path",
        "cookie_secret_file",
        "cookie_name",
        "session_ttl",
        "allow_emails",
        "allow_domains",
        "allow_claim",
        "claims_to_headers",
        "timeout",
    ),
}
AUTH_KEYS = _COMMON_AUTH + tuple(
    sorted({key for keys in _AUTH_TYPE_KEYS.values() for key in keys})
)

_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FIELD_NAME = _METHOD
_RATE = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]*)\s*(s|sec|second|m|min|minute|h|hour)\s*\Z", re.I)
_WINDOWS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
            "h": 3600.0, "hour": 3600.0}
_CERTIFICATE_FACTS = ("subject", "san", "fingerprint")
_NO_NETWORKS: tuple[IPNetwork, ...] = ()
_NO_NAMES: tuple[str, ...] = ()
_NO_PAIRS: tuple[tuple[str, str], ...] = ()
_DEFAULT_SCOPES: tuple[str, ...] = ("openid", "email", "profile")
_HSTS_PRELOAD_MINIMUM = 365 * 86400.0
"""hstspreload.org asks for a max-age of at least a year."""


def _networks(text: str) -> tuple[IPNetwork, ...]:
    networks = tuple(syntax.checkNetwork(entry) for entry in syntax.splitList(text))
    if not networks:
        raise ValueError("expected at least one address or CIDR network")
    return networks


def _fieldName(text: str) -> str:
    name = text.strip()
    if not _FIELD_NAME.match(name):
        raise ValueError(f"expected a header field name (an HTTP token), got {text!r}")
    return name.lower()


def _fieldNames(text: str) -> tuple[str, ...]:
    return tuple(_fieldName(entry) for entry in syntax.splitList(text))


def _pairs(text: str, left: str, check: Any = None) -> tuple[tuple[str, str], ...]:
    """C{a:X-A, b:X-B} into ((a, x-a), (b, x-b))."""
    pairs: list[tuple[str, str]] = []
    for entry in syntax.splitList(text):
        name, colon, field = entry.partition(":")
        name = name.strip()
        if not colon or not name:
            raise ValueError(f"expected {left}:Header-Name entries, got {entry!r}")
        if check is not None:
            name = check(name)
        pairs.append((name, _fieldName(field)))
    if not pairs:
        raise ValueError(f"expected at least one {left}:Header-Name entry")
    return tuple(pairs)


def _certificateFact(name: str) -> str:
    if name.lower() not in _CERTIFICATE_FACTS:
        raise ValueError(f"expected {', '.join(_CERTIFICATE_FACTS)} before ':', got {name!r}")
    return name.lower()


def _methods(text: str) -> tuple[str, ...]:
    methods: list[str] = []
    for entry in syntax.splitList(text):
        if not _METHOD.match(entry):
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
        "methods": section.convert("methods", _NO_NAMES, _methods),
        "rate_limit": section.convert("rate_limit", _NO_NAMES, _names),
        "auth": auth,
        "hsts": hsts,
        "hsts_preload": preload,
        "hsts_include_subdomains": subdomains,
        "require_client_certificate": section.boolean("require_client_certificate", False),
        "client_certificate_headers": section.convert(
            "client_certificate_headers", _NO_PAIRS, lambda text: _pairs(text, "subject", _certificateFact)
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


def _rate(text: str) -> tuple[int, float]:
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"expected a rate such as 100/s, 30/m or 1000/h, got {text!r}")
    count, multiple, unit = match.groups()
    window = _WINDOWS[unit.lower()] * (int(multiple) if multiple else 1)
    if int(count) < 1 or window <= 0:
        raise ValueError(f"expected a rate of at least 1 request per window, got {text!r}")
    return int(count), window


def _rateKey(text: str) -> str:
    value = text.strip()
    if value.lower() in ("client_ip", "route", "identity"):
        return value.lower()
    return syntax.checkHashKey(value) if ":" in value else _badKey(text)


def _badKey(text: str) -> str:
    raise ValueError(
        f"expected client_ip, route, identity, header:NAME or cookie:NAME, got {text!r}"
    )


def readRateLimit(section: Section, name: str) -> RateLimit:
    """A C{[ratelimit:NAME]} section."""
    if not section.has("rate") and not section.has("concurrency"):
        raise section.error(None, "needs rate = N/s (or /m, /h), concurrency = N, or both")
    count, window = section.convert("rate", (1, 1.0), _rate)
    hasRate = section.has("rate")
    burst = section.integer("burst", max(1, count) if hasRate else 1, minimum=1)
    if section.has("burst") and not hasRate:
        section.report("burst", "only used with rate")
    store = section.choice("store", "local", {"local": "local", "redis": "redis"})
    onError = section.choice("on_store_error", "open", {"open": "open", "closed": "closed"})
    if section.has("on_store_error") and store != "redis" and section.ok("store"):
        section.report("on_store_error", "only used with store = redis")
    return RateLimit(
        name=name,
        count=count,
        window=window,
        burst=burst,
        key=section.convert("key", "client_ip", _rateKey),
        concurrency=section.integer("concurrency", 0, minimum=1),
        store=store,
        on_store_error=onError,
        rate_enabled=hasRate,
    )


def _secretText(section: Section, key: str, minimum: int = 1) -> str | None:
    if not section.has(key):
        return None

    def read(text: str) -> str:
        path = section.resolve(text)
        try:
            data = readRegularFile(path, TOKEN_LIMIT)
        except FileProblem as e:
            raise ValueError(f"{path} {e}") from None
        try:
            value = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
        if len(value) < minimum:
            raise ValueError(f"{path} holds {len(value)} characters; at least {minimum} are needed")
        return value

    return section.convert(key, None, read)


def readRedis(section: Section) -> RedisSettings:
    """The C{[redis]} section."""
    url = section.require("url", "redis://HOST:PORT/DB, rediss://... for TLS, or unix:/PATH")
    try:
        parsed = _parseRedisURL(url, section)
    except ValueError as e:
        raise section.error("url", str(e)) from None
    password = _secretText(section, "password_file")
    if password is None and parsed.get("password"):
        # A password in the URL is refused: it would be shown by `check`
        # and kept in the configuration file for anyone who reads it.
        section.report("url", "put the password in password_file, not in the URL")
    parsed.pop("password", None)
    ca = section.optionalFile("ca")
    if ca is not None and not parsed.get("tls"):
        section.report("ca", "only used with a rediss:// URL (TLS)")
    return RedisSettings(
        url=url,
        password=password,
        username=section.convert("username", parsed.pop("username", None), lambda t: t.strip()),
        ca=ca,
        timeout=section.duration("timeout", 0.25),
        prefix=section.convert("prefix", "edgeproxy", _prefix),
        **parsed,
    )


def _prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", text.strip()):
        raise ValueError(f"expected a key prefix of letters, digits, '_', '.', ':' or '-', got {text!r}")
    return text.strip()


def _parseRedisURL(url: str, section: Section) -> dict[str, Any]:
    if url.startswith("unix:"):
        path = url[5:]
        if path.startswith("//"):
            path = path[2:]
        path, _, query = path.partition("?")
        if not path:
            raise ValueError(f"expected unix:/path/to/redis.sock, got {url!r}")
        db = 0
        for part in query.split("&") if query else ():
            key, _, value = part.partition("=")
            if key == "db" and value.isdigit():
                db = int(value)
            else:
                raise ValueError(f"unknown parameter {part!r} (only db=N)")
        return {"path": section.resolve(path), "db": db}
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:/PATH, got {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"invalid port in {url!r}") from None
    number = parts.path.strip("/") or "0"
    if not number.isdigit():
        raise ValueError(f"expected a database number after the port, got {parts.path!r}")
    return {
        "host": parts.hostname,
        "port": port,
        "db": int(number),
        "tls": parts.scheme == "rediss",
        "username": unquote(parts.username) if parts.username else None,
        "password": parts.password,
    }


def _checkHTTPSURL(text: str, loopbackHTTP: bool = True) -> str:
    parts = urlsplit(text.strip())
    if not parts.hostname or parts.scheme not in ("https", "http"):
        raise ValueError(f"expected an https URL, got {text!r}")
    if parts.scheme == "http" and not (loopbackHTTP and _isLoopback(parts.hostname)):
        # A key set, a discovery document or a token fetched in clear text
        # can be replaced by anyone on the path.
        raise ValueError(f"expected an https URL (http only on a loopback address), got {text!r}")
    return text.strip()


def _isLoopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key(section: Section, key: str, minimum: int) -> bytes | None:
    text = _secretText(section, key, minimum)
    return None if text is None else text.encode("utf-8")


_JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                   "ES512", "EdDSA", "HS256", "HS384", "HS512")


def _algorithms(text: str) -> tuple[str, ...]:
    known = {name.lower(): name for name in _JWT_ALGORITHMS}
    chosen: list[str] = []
    for entry in syntax.splitList(text):
        name = known.get(entry.lower())
        if name is None:
            # "none" among them: RFC 8725 3.1, never accept unsigned tokens.
            raise ValueError(f"expected algorithms from {', '.join(_JWT_ALGORITHMS)}, got {entry!r}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError("expected at least one algorithm")
    return tuple(chosen)


def _tokenFrom(text: str) -> str:
    value = text.strip()
    if value.lower() == "header":
        return "header"
    kind, colon, name = value.partition(":")
    if colon and kind.lower() == "cookie" and _FIELD_NAME.match(name.strip()):
        return f"cookie:{name.strip()}"
    raise ValueError(f"expected header or cookie:NAME, got {text!r}")


def _claim(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:/-]+", text):
        raise ValueError(f"expected a claim name, got {text!r}")
    return text


def _callbackPath(text: str) -> str:
    path = syntax.checkOriginPath(text)
    if "?" in path:
        raise ValueError(f"expected a path without a query, got {text!r}")
    return path


def _allowClaim(text: str) -> tuple[str, str]:
    claim, colon, value = text.strip().partition(":")
    if not colon or not claim or not value:
        raise ValueError(f"expected CLAIM:VALUE such as groups:admins, got {text!r}")
    return _claim(claim.strip()), value.strip()


def _domains(text: str) -> tuple[str, ...]:
    return tuple(syntax.checkHostname(entry.lstrip("@")) for entry in syntax.splitList(text))


def _emails(text: str) -> tuple[str, ...]:
    emails = []
    for entry in syntax.splitList(text):
        if not re.fullmatch(r"[^@\s,]+@[^@\s,]+", entry):
            raise ValueError(f"expected e-mail addresses, got {entry!r}")
        emails.append(entry.lower())
    return tuple(emails)


def readAuth(section: Section, name: str) -> AuthSettings:
    """An C{[auth:NAME]} section; the keys of its C{type} only."""
    kind = section.require("type", "basic, jwt, forward or oidc").lower()
    if kind not in _AUTH_TYPE_KEYS:
        raise section.error("type", f"expected basic, jwt, forward or oidc, got {kind!r}")
    for key in section.values:
        if key in AUTH_KEYS and key not in _COMMON_AUTH and key not in _AUTH_TYPE_KEYS[kind]:
            users = [t for t, keys in _AUTH_TYPE_KEYS.items() if key in keys]
            section.report(key, f"not used with type = {kind} (only with type = {' or '.join(users)})")
    common: dict[str, Any] = {"name": name, "type": kind,
              "pass_authorization": section.boolean("pass_authorization", False)}
    reader = {"basic": _readBasic, "jwt": _readJWT, "forward": _readForward, "oidc": _readOIDC}[kind]
    return AuthSettings(**common, **reader(section))


def _readBasic(section: Section) -> dict[str, Any]:
    htpasswd = section.require("htpasswd", "a file of user:hash lines (bcrypt or argon2)")
    realm = section.convert("realm", "edgeproxy", _realm)
    return {
        "htpasswd": section.convert("htpasswd", None, lambda t: section.checkedPath(t, "file"))
        if htpasswd else None,
        "realm": realm,
        "user_header": section.convert("user_header", "x-auth-user", _fieldName),
    }


def _realm(text: str) -> str:
    if '"' in text or "\\" in text or not text.isprintable():
        raise ValueError(f"expected printable text without quotes or backslashes, got {text!r}")
    return text


def _readJWT(section: Section) -> dict[str, Any]:
    algorithms = section.convert("algorithms", ("RS256", "ES256", "EdDSA"), _algorithms)
    secret = _key(section, "secret_file", 32)
    hmac = [a for a in algorithms if a.startswith("HS")]
    if hmac and secret is None and section.ok("algorithms"):
        section.report("algorithms", f"{', '.join(hmac)} needs secret_file (a shared key)")
    if secret is not None and not hmac and section.ok("algorithms"):
        section.report("secret_file", "only used with an HS256 (HMAC) algorithm")
    if hmac and len(hmac) != len(algorithms) and section.ok("algorithms"):
        # RFC 8725 2.1 / 3.1: an HMAC key beside public keys is the key
        # confusion attack's door; one kind of key per section.
        section.report("algorithms", "HMAC (HS*) and public-key algorithms cannot be mixed")
    jwks = None
    if not hmac:
        section.require("jwks", "a JWKS file or an https URL of one")
        jwks = section.convert(
            "jwks", None,
            lambda t: _checkHTTPSURL(t) if "://" in t else section.checkedPath(t, "file"),
        )
    elif section.has("jwks"):
        section.report("jwks", "not used with HMAC algorithms (the key is secret_file)")
    return {
        "jwks": jwks,
        "jwks_ca": section.optionalFile("jwks_ca"),
        "issuer": section.convert("issuer", None, lambda t: t.strip()),
        "audience": section.convert("audience", _NO_NAMES, lambda t: tuple(syntax.splitList(t))),
        "algorithms": algorithms,
        "secret": secret,
        "leeway": section.duration("leeway", 0.0, allowZero=True),
        "token_from": section.convert("token_from", "header", _tokenFrom),
        "claims_to_headers": section.convert(
            "claims_to_headers", _NO_PAIRS, lambda t: _pairs(t, "claim", _claim)
        ),
        "jwks_refresh": section.duration("jwks_refresh", 3600.0),
    }


def _readForward(section: Section) -> dict[str, Any]:
    section.require("url", "the URL of the auth service")
    return {
        "url": section.convert("url", None, _checkHTTPSURL),
        "ca": section.optionalFile("ca"),
        "copy_request_headers": section.convert("copy_request_headers", _NO_NAMES, _fieldNames),
        "copy_response_headers": section.convert("copy_response_headers", _NO_NAMES, _fieldNames),
        "cache_ttl": section.duration("cache_ttl", 0.0, allowZero=True),
        "cache_size": section.integer("cache_size", 10000, minimum=1),
        "timeout": section.duration("timeout", 5.0),
    }


def _readOIDC(section: Section) -> dict[str, Any]:
    section.require("issuer", "the provider's issuer URL (its discovery document)")
    section.require("client_id", "the client id registered at the provider")
    section.require("cookie_secret_file", "a file of at least 32 random characters")
    callback = section.convert("callback_path", "/.edgeproxy/oidc/callback", _callbackPath)
    logout = section.convert("logout_path", "/.edgeproxy/oidc/logout", _callbackPath)
    if callback == logout and section.ok("callback_path", "logout_path"):
        section.report("logout_path", "must differ from callback_path")
    return {
        "issuer": section.convert("issuer", None, _checkHTTPSURL),
        "ca": section.optionalFile("ca"),
        "client_id": section.convert("client_id", None, lambda t: t.strip()),
        "client_secret": _secretText(section, "client_secret_file"),
        "scopes": section.convert("scopes", _DEFAULT_SCOPES, _scopes),
        "callback_path": callback,
        "logout_path": logout,
        "cookie_secret": _key(section, "cookie_secret_file", 32),
        "cookie_name": section.convert("cookie_name", "edgeproxy_session", syntax.checkToken),
        "session_ttl": section.duration("session_ttl", 8 * 3600.0),
        "allow_emails": section.convert("allow_emails", _NO_NAMES, _emails),
        "allow_domains": section.convert("allow_domains", _NO_NAMES, _domains),
        "allow_claim": section.convert("allow_claim", None, _allowClaim),
        "claims_to_headers": section.convert(
            "claims_to_headers", (("sub", "x-auth-subject"), ("email", "x-auth-email")),
            lambda t: _pairs(t, "claim", _claim),
        ),
        "timeout": section.duration("timeout", 5.0),
    }


def _scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(entry for part in syntax.splitList(text) for entry in part.split())
    for scope in scopes:
        if not re.fullmatch(r"[\x21\x23-\x5B\x5D-\x7E]+", scope):
            raise ValueError(f"invalid scope {scope!r}")
    if "openid" not in scopes:
        # OpenID Connect Core 3.1.2.1: without it the provider does plain
        # OAuth and sends no ID token.
        scopes = ("openid",) + scopes
    return scopes


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
            limit = ratelimits.get(limitName)
            if limit is not None and limit.key == "identity" and route.auth is None:
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


def htpasswdUsers(data: bytes) -> dict[str, bytes]:
    """
    The users of an htpasswd file: C{user:hash} lines, C{#} comments and
    blank lines ignored.

    @raise ValueError: a line that is not C{user:hash}, or a hash that is
        neither bcrypt (C{$2a$}, C{$2b$}, C{$2y$}) nor argon2
        (C{$argon2id$}, C{$argon2i$}, C{$argon2d$}): MD5, SHA-1 and
        crypt(3) hashes are too cheap to brute-force to be accepted.
    """
    users: dict[str, bytes] = {}
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user, colon, hashed = line.partition(b":")
        if not colon or not user:
            raise ValueError(f"line {number}: expected user:hash")
        if not hashed.startswith((b"$2a$", b"$2b$", b"$2y$", b"$argon2")):
            raise ValueError(
                f"line {number}: user {user.decode('utf-8', 'replace')!r} has a hash that is neither "
                "bcrypt nor argon2 (htpasswd -B makes bcrypt)"
            )
        users[user.decode("utf-8", "replace")] = hashed
    return users
