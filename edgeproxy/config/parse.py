# -*- test-case-name: tests.test_config -*-
"""
Reading C{edge.ini}: L{load} turns the file (and the files it includes)
into a validated, frozen L{Config}, or raises a L{ConfigError} holding every
problem it found.

The rules a careful operator wants from a parser:

  - Every key is known.  A typo (C{conect_timeout}) or an unknown section is
    an error, never a silently ignored line.
  - Every error names the file, the line, the section and the key, and says
    what was expected: C{edge.ini:12: [upstream:app] keepalive: expected a
    whole number of 0 or more, got 'lots'}.
  - One run reports every problem it can find (a L{ConfigErrors}), not only
    the first, so a broken file is fixed in one round.
  - Relative paths resolve against the directory of the main configuration
    file, and files it names must exist (their contents are the TLS
    module's job).
  - Cross-section rules (a route names an existing upstream, a TLS listener
    has certificates to serve, no two routes claim the same host and path)
    are checked here, so a L{Config} that exists is consistent.

Each kind of section is read by one self-contained function
(C{_readProxy}, C{_readTLS}, C{_readListener}, C{_readUpstream},
C{_readRoute}) from a L{Section}; a new section kind adds its keys to
L{SECTION_KEYS}, such a function, and one line in L{load}.  The file syntax
is L{edgeproxy.config.ini}'s, includes and C{${VAR}} are
L{edgeproxy.config.source}'s, the typed getters L{edgeproxy.config.section}'s.

Nothing here imports Twisted or loads certificates.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from edgeproxy.config import syntax
from edgeproxy.config.checks import crossCheck
from edgeproxy.config.files import TOKEN_LIMIT, FileProblem, readRegularFile
from edgeproxy.config.model import (
    BALANCE_POLICIES,
    ACMEChallenge,
    ACMEKeyType,
    ACMESettings,
    LETS_ENCRYPT_DIRECTORY,
    AccessLogFormat,
    CacheSettings,
    Config,
    IPNetwork,
    Limits,
    Listener,
    ProxySettings,
    Route,
    RouteCache,
    Server,
    TLSSettings,
    TLSVersion,
    Upstream,
)
from edgeproxy.config.section import Problems, Section, readSection
from edgeproxy.config.source import readSource
from edgeproxy.errors import ConfigErrors

__all__ = ["load", "SECTION_KEYS"]

_LIMIT_KEYS = (
    "client_header_timeout",
    "client_idle_timeout",
    "max_header_size",
    "max_headers",
    "max_body_size",
)

_HEALTH_KEYS = (
    "health_path",
    "health_interval",
    "health_timeout",
    "health_status",
    "health_host",
    "health_initial",
    "rise",
    "fall",
)

_ROUTE_CACHE_KEYS = ("cache", "stale_while_revalidate", "stale_if_error", "default_ttl", "cache_cookies")

SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "edgeproxy": (
        "include",
        "access_log",
        "access_log_format",
        "trusted_proxies",
        *_LIMIT_KEYS,
        "shutdown_timeout",
        "via",
        "admin",
        "admin_token",
        "admin_token_file",
        "workers",
        "log_level",
        "log_format",
    ),
    "tls": (
        "certificates",
        "keys",
        "default",
        "min_version",
        "expiry_warning",
        "session_ticket_rotation",
        "ocsp_stapling",
    ),
    "acme": (
        "directory",
        "email",
        "storage",
        "directory_ca",
        "challenges",
        "key_type",
        "renew_before",
        "eab_kid",
        "eab_hmac_key_file",
        "names",
        "on_demand",
        "ask",
        "on_demand_burst",
        "on_demand_interval",
    ),
    "listen": ("endpoint", "tls", "http2", "redirect_https", "redirect_port", *_LIMIT_KEYS),
    "upstream": (
        "servers",
        "tls",
        "ca",
        "server_name",
        "client_certificate",
        "insecure",
        "connect_timeout",
        "response_timeout",
        "idle_timeout",
        "keepalive",
        "keepalive_timeout",
        "host_header",
        "balance",
        "hash_key",
        "queue_size",
        "queue_timeout",
        "resolve_interval",
        "retries",
        "retry_budget",
        "max_fails",
        "fail_window",
        "eject_time",
        "eject_max_time",
        "fail_status",
        "slow_start",
        *_HEALTH_KEYS,
    ),
    "route": (
        "hosts", "paths", "upstream", "max_body_size", "strip_prefix", "websocket",
        *_ROUTE_CACHE_KEYS,
    ),
    "cache": (
        "memory",
        "disk",
        "disk_size",
        "max_object_size",
        "heuristic_max",
        "targeted_field",
        "key_includes",
        "purge_from",
        "name",
        "collapse_timeout",
    ),
}
"""The keys each kind of section accepts (C{listen}, C{upstream} and
C{route} stand for C{[listen:NAME]} and so on)."""

# The values edgeproxy.logs accepts (config/ imports no subsystem).
_LOG_LEVELS = ("debug", "info", "warn", "error")
_LOG_FORMATS = ("auto", "text", "journald")

_SINGLE_KINDS = ("edgeproxy", "tls", "acme", "cache")
_NAMED_KINDS = ("listen", "upstream", "route")
_SECTION_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")


def _readLimits(section: Section, base: Limits) -> Limits:
    return Limits(
        client_header_timeout=section.duration("client_header_timeout", base.client_header_timeout),
        client_idle_timeout=section.duration("client_idle_timeout", base.client_idle_timeout),
        max_header_size=section.size("max_header_size", base.max_header_size, minimum=1),
        max_headers=section.integer("max_headers", base.max_headers, minimum=1),
        max_body_size=section.size("max_body_size", base.max_body_size),
    )


def _accessLog(section: Section, text: str) -> str | None:
    if text == "-":
        return "-"
    if text.lower() == "off":
        return None
    path = section.resolve(text)
    if os.path.isdir(path):
        raise ValueError(f"expected a file, '-' or off, but {path} is a directory")
    if not os.path.isdir(os.path.dirname(path)):
        raise ValueError(f"the directory of {path} does not exist")
    return path


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"expected IP addresses or CIDR networks such as 10.0.0.0/8 or ::1, got {text!r}"
            ) from None
        raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from None


def _readTrustedProxies(section: Section) -> tuple[IPNetwork, ...]:
    if not section.values.get("trusted_proxies", "").strip():
        # Empty means "trust nobody", the default, so it is not an error.
        return ()
    return section.convert(
        "trusted_proxies",
        (),
        lambda text: tuple(_network(entry) for entry in syntax.splitList(text)),
    )


def _readProxy(section: Section) -> ProxySettings:
    defaults = ProxySettings()
    return ProxySettings(
        access_log=section.convert(
            "access_log", defaults.access_log, lambda text: _accessLog(section, text)
        ),
        access_log_format=section.choice(
            "access_log_format", defaults.access_log_format, {f.value: f for f in AccessLogFormat}
        ),
        trusted_proxies=_readTrustedProxies(section),
        limits=_readLimits(section, defaults.limits),
        shutdown_timeout=section.duration("shutdown_timeout", defaults.shutdown_timeout),
        via=section.convert("via", defaults.via, syntax.checkToken),
        admin=section.convert("admin", None, lambda text: _endpoint(section, text).description),
        admin_token=_readAdminToken(section),
        workers=section.convert("workers", defaults.workers, _parseWorkers),
        log_level=section.choice("log_level", defaults.log_level, {v: v for v in _LOG_LEVELS}),
        log_format=section.choice("log_format", defaults.log_format, {v: v for v in _LOG_FORMATS}),
    )


def _endpoint(section: Section, text: str) -> syntax.EndpointSpec:
    return syntax.checkEndpoint(text, section.base)


def _parseWorkers(text: str) -> int:
    value = text.strip().lower()
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    if not value.isdigit() or not 1 <= int(value) <= 256:
        raise ValueError(f"expected a number of processes from 1 to 256, or auto, got {text!r}")
    return int(value)


def _checkToken(token: str) -> str:
    # RFC 6750 §2.1 b64token; a short token is guessable.
    if len(token) < 16 or not re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", token):
        raise ValueError(
            "expected a bearer token of at least 16 characters from A-Z a-z 0-9 . _ ~ + / - "
            "(for example the output of: openssl rand -hex 32)"
        )
    return token


def _tokenFromFile(section: Section, text: str) -> str:
    path = section.resolve(text)
    try:
        data = readRegularFile(path, TOKEN_LIMIT)
    except FileProblem as e:
        raise ValueError(f"{path} {e}") from None
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    return _checkToken(token)


def _readAdminToken(section: Section) -> str | None:
    for key in ("admin_token", "admin_token_file"):
        if section.has(key) and not section.has("admin"):
            section.report(key, "only used with admin = ENDPOINT (there is no admin listener)")
            return None
    if section.has("admin_token") and section.has("admin_token_file"):
        section.report("admin_token_file", "give admin_token or admin_token_file, not both")
        return None
    if section.has("admin_token"):
        return section.convert("admin_token", None, _checkToken)
    return section.convert("admin_token_file", None, lambda text: _tokenFromFile(section, text))


def _paths(section: Section, key: str) -> tuple[str, ...]:
    def check(text: str) -> tuple[str, ...]:
        return tuple(section.checkedPath(entry, "either") for entry in syntax.splitList(text))

    nothing: tuple[str, ...] = ()
    return section.convert(key, nothing, check)


def _defaultCertificate(section: Section, text: str) -> str:
    path = section.checkedPath(text, "either")
    if os.path.isdir(path) and not any(
        os.path.isfile(os.path.join(path, name)) for name in ("fullchain.pem", "cert.pem")
    ):
        raise ValueError(
            f"expected a PEM file, or a directory holding fullchain.pem or cert.pem "
            f"(certbot's layout), but {path} is not a regular file and holds neither"
        )
    return path


def _readTLS(section: Section) -> TLSSettings:
    section.require("certificates", "PEM files, certificate directories, or certbot's live/")
    defaults = TLSSettings(certificates=(), default=None)
    return TLSSettings(
        certificates=_paths(section, "certificates"),
        keys=_paths(section, "keys"),
        default=section.convert("default", None, lambda text: _defaultCertificate(section, text)),
        min_version=section.choice(
            "min_version", defaults.min_version, {v.value: v for v in TLSVersion}
        ),
        expiry_warning=section.duration("expiry_warning", defaults.expiry_warning, allowZero=True),
        session_ticket_rotation=section.duration(
            "session_ticket_rotation", defaults.session_ticket_rotation
        ),
        ocsp_stapling=section.boolean("ocsp_stapling", defaults.ocsp_stapling),
    )


def defaultACMEStorage(environ: Any = os.environ) -> str:
    """
    Where C{[acme] storage} points by default: C{acme} under the first
    directory of systemd's C{StateDirectory=} (C{$STATE_DIRECTORY}), else
    under C{/var/lib/edgeproxy}.
    """
    state = (environ.get("STATE_DIRECTORY") or "").split(":")[0]
    return os.path.join(state or "/var/lib/edgeproxy", "acme")


def _checkURL(text: str, schemes: tuple[str, ...] = ("https", "http")) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text.strip())
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise ValueError(f"expected an {' or '.join(schemes)} URL, got {text!r}")
    return text.strip()


def _checkEmail(text: str) -> str:
    value = text.strip()
    if value.lower().startswith("mailto:"):
        value = value[7:]
    if not re.fullmatch(r"[^@\s,]+@[^@\s,]+\.[^@\s,]+", value):
        raise ValueError(f"expected an e-mail address such as ops@example.com, got {text!r}")
    return value


def _checkChallenges(text: str) -> tuple[ACMEChallenge, ...]:
    known = {c.value: c for c in ACMEChallenge}
    chosen: list[ACMEChallenge] = []
    for entry in syntax.splitList(text):
        challenge = known.get(entry.lower())
        if challenge is None:
            raise ValueError(f"expected challenge types from {', '.join(known)}, got {entry!r}")
        if challenge in chosen:
            raise ValueError(f"challenge {entry!r} is listed twice")
        chosen.append(challenge)
    if not chosen:
        raise ValueError("expected at least one challenge type")
    return tuple(chosen)


def _checkACMENames(text: str) -> tuple[str, ...] | None:
    if text.strip().lower() == "auto":
        return None
    # RFC 8555 §7.1.4 / 8737: one DNS name per certificate; wildcards need
    # DNS-01, which edgeproxy does not do.
    names = _uniqueList(text, syntax.checkHostname, "name")
    return names


def _readACME(section: Section) -> ACMESettings:
    if section.has("storage"):
        storage = section.resolve(section.raw("storage"))
    else:
        storage = defaultACMEStorage()
    if os.path.exists(storage) and not os.path.isdir(storage):
        raise section.error("storage", f"{storage} exists and is not a directory")
    parent = storage
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise section.error(
            "storage",
            f"{storage} cannot be created or written by this user ({parent} is not writable)",
        )
    if section.has("eab_kid") != section.has("eab_hmac_key_file"):
        missing = "eab_hmac_key_file" if section.has("eab_kid") else "eab_kid"
        present = "eab_kid" if section.has("eab_kid") else "eab_hmac_key_file"
        raise section.error(present, f"external account binding needs both eab_kid and {missing}")
    hmacKey = None
    if section.has("eab_hmac_key_file"):
        try:
            path = section.checkedPath(section.raw("eab_hmac_key_file"), "file")
        except ValueError as e:
            raise section.error("eab_hmac_key_file", str(e)) from None
        try:
            with open(path, encoding="ascii") as f:
                hmacKey = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise section.error("eab_hmac_key_file", f"cannot read {path}: {e}") from None
        if not re.fullmatch(r"[A-Za-z0-9_-]+=*", hmacKey or ""):
            raise section.error(
                "eab_hmac_key_file", "expected the base64url HMAC key the CA gave, on one line"
            )
    onDemand = section.boolean("on_demand", False)
    if onDemand and not section.has("ask"):
        # Without it, anyone pointing a name at this address makes the
        # proxy order certificates for it until the CA's limits stop it.
        raise section.error("on_demand", "on_demand = yes needs ask = URL (which names are allowed)")
    for key in ("ask", "on_demand_burst", "on_demand_interval"):
        if section.has(key) and not onDemand:
            raise section.error(key, "only used with on_demand = yes")
    defaults = ACMESettings(storage=storage)
    return ACMESettings(
        storage=storage,
        directory=section.convert("directory", LETS_ENCRYPT_DIRECTORY, _checkURL),
        email=section.convert("email", None, _checkEmail),
        directory_ca=section.optionalFile("directory_ca"),
        challenges=section.convert("challenges", defaults.challenges, _checkChallenges),
        key_type=section.choice("key_type", defaults.key_type, {k.value: k for k in ACMEKeyType}),
        renew_before=section.duration("renew_before", defaults.renew_before),
        eab_kid=section.convert("eab_kid", None, lambda text: text.strip()),
        eab_hmac_key=hmacKey,
        names=section.convert("names", None, _checkACMENames),
        on_demand=onDemand,
        ask=section.convert("ask", None, _checkURL),
        on_demand_burst=section.integer("on_demand_burst", defaults.on_demand_burst, minimum=1),
        on_demand_interval=section.duration("on_demand_interval", defaults.on_demand_interval),
    )


def _readListener(
    section: Section, name: str, limits: Limits
) -> tuple[Listener, syntax.EndpointSpec]:
    text = section.require("endpoint", "for example tcp:443 or systemd:domain=INET6:name=https")
    try:
        spec = syntax.checkEndpoint(text, section.base)
    except ValueError as e:
        # Without an endpoint there is no listener to check further.
        raise section.error("endpoint", str(e)) from None
    tls = section.boolean("tls", False)
    if section.has("http2") and section.boolean("http2", True) and not tls and section.ok("tls"):
        # RFC 9113 §3.2/§3.3: edgeproxy offers h2 through TLS ALPN only;
        # cleartext listeners speak HTTP/1.1.
        section.report(
            "http2", "HTTP/2 is offered over TLS (ALPN) only; set tls = yes or remove http2"
        )
    redirect = section.boolean("redirect_https", False)
    redirectPort = section.integer("redirect_port", None, minimum=1, maximum=65535)
    if section.has("redirect_port") and not redirect and section.ok("redirect_https"):
        section.report("redirect_port", "only used with redirect_https = yes")
    listener = Listener(
        name=name,
        endpoint=spec.description,
        tls=tls,
        http2=section.boolean("http2", True) if tls else False,
        redirect_https=redirect,
        redirect_port=redirectPort,
        limits=_readLimits(section, limits),
    )
    return listener, spec


def _readUpstream(section: Section, name: str) -> Upstream:
    section.require("servers", "host:port entries, at least one")
    noServers: tuple[Server, ...] = ()
    servers = section.convert("servers", noServers, syntax.parseServers)
    defaults = Upstream(name=name, servers=servers)
    tls = section.boolean("tls", defaults.tls)
    insecure = section.boolean("insecure", defaults.insecure)
    if not tls and section.ok("tls"):
        for key in ("ca", "server_name", "client_certificate", "insecure"):
            if section.has(key):
                # A backend setting that does nothing usually means the
                # operator believes this hop is encrypted when it is not.
                section.report(key, "only used with tls = yes (this upstream speaks plain HTTP)")
    balance = section.choice(
        "balance", defaults.balance, {policy: policy for policy in BALANCE_POLICIES}
    )
    hashKey = section.convert("hash_key", defaults.hash_key, syntax.checkHashKey)
    if section.has("hash_key") and balance != "hash" and section.ok("balance"):
        section.report("hash_key", "only used with balance = hash")
    if section.has("health_path"):
        health = _readHealth(section, defaults)
    else:
        for key in _HEALTH_KEYS[1:]:
            if section.has(key):
                section.report(key, "only used with health_path (active health checks are off)")
        health = {}
    ca = section.optionalFile("ca")
    if insecure and ca is not None:
        section.report(
            "insecure", "insecure = yes turns verification off, which contradicts ca; remove one"
        )
    return Upstream(
        name=name,
        servers=servers,
        tls=tls,
        ca=ca,
        server_name=section.convert("server_name", defaults.server_name, _checkServerName),
        client_certificate=section.optionalFile("client_certificate"),
        insecure=insecure,
        connect_timeout=section.duration("connect_timeout", defaults.connect_timeout),
        response_timeout=section.duration("response_timeout", defaults.response_timeout),
        idle_timeout=section.duration("idle_timeout", defaults.idle_timeout),
        keepalive=section.integer("keepalive", defaults.keepalive, minimum=0),
        keepalive_timeout=section.duration("keepalive_timeout", defaults.keepalive_timeout),
        host_header=section.convert("host_header", defaults.host_header, syntax.checkHostHeader),
        balance=balance,
        hash_key=hashKey,
        queue_size=section.integer("queue_size", defaults.queue_size, minimum=0),
        queue_timeout=section.duration("queue_timeout", defaults.queue_timeout),
        resolve_interval=section.duration("resolve_interval", defaults.resolve_interval),
        retries=section.integer("retries", defaults.retries, minimum=0, maximum=10),
        retry_budget=section.convert("retry_budget", defaults.retry_budget, syntax.parsePercent),
        max_fails=section.integer("max_fails", defaults.max_fails, minimum=0),
        fail_window=section.duration("fail_window", defaults.fail_window),
        eject_time=section.duration("eject_time", defaults.eject_time),
        eject_max_time=_ejectMax(section, defaults),
        fail_status=section.convert("fail_status", defaults.fail_status, _failStatus),
        slow_start=section.duration("slow_start", defaults.slow_start, allowZero=True),
        **health,
    )


def _failStatus(text: str) -> tuple[int, ...]:
    codes: list[int] = []
    for low, high in syntax.parseStatusRanges(text):
        codes.extend(code for code in range(low, high + 1) if code not in codes)
    return tuple(codes)


def _ejectMax(section: Section, defaults: Upstream) -> float:
    # Read without reporting again: eject_time's own problem is reported once.
    first = defaults.eject_time if not section.ok("eject_time") else section.duration(
        "eject_time", defaults.eject_time
    )
    cap = section.duration("eject_max_time", max(defaults.eject_max_time, first))
    if cap < first and section.ok("eject_time", "eject_max_time"):
        section.report("eject_max_time", "must be at least eject_time")
    return max(cap, first)


def _readHealth(section: Section, defaults: Upstream) -> dict[str, Any]:
    interval = section.duration("health_interval", defaults.health_interval)
    timeout = section.duration("health_timeout", min(defaults.health_timeout, interval))
    if timeout > interval and section.ok("health_interval", "health_timeout"):
        section.report(
            "health_timeout", "must not exceed health_interval (checks of one backend would overlap)"
        )
    return {
        "health_path": section.convert("health_path", None, syntax.checkOriginPath),
        "health_interval": interval,
        "health_timeout": timeout,
        "health_status": section.convert(
            "health_status", defaults.health_status, syntax.parseStatusRanges
        ),
        "health_host": section.convert("health_host", None, syntax.checkHostHeader),
        "health_initial": section.choice(
            "health_initial", defaults.health_initial, {"unknown": "unknown", "up": "up"}
        ),
        "rise": section.integer("rise", defaults.rise, minimum=1, maximum=100),
        "fall": section.integer("fall", defaults.fall, minimum=1, maximum=100),
    }


def _checkServerName(text: str) -> str:
    try:
        return ipaddress.ip_address(text.strip("[]")).compressed
    except ValueError:
        return syntax.checkHostname(text)


def _uniqueList(text: str, check: Callable[[str], str], what: str) -> tuple[str, ...]:
    entries: list[str] = []
    for raw in syntax.splitList(text):
        entry = check(raw)
        if entry in entries:
            raise ValueError(f"{what} {entry!r} is listed twice")
        entries.append(entry)
    if not entries:
        raise ValueError(f"expected at least one {what}")
    return tuple(entries)


def _readRoute(section: Section, name: str) -> Route:
    section.require("hosts", "host names, *.wildcards, IP addresses, or * for any host")
    upstream = section.require("upstream", "the name of an [upstream:NAME] section")
    noHosts: tuple[str, ...] = ()
    hosts = section.convert(
        "hosts", noHosts, lambda text: _uniqueList(text, syntax.checkRouteHost, "host")
    )
    everyPath: tuple[str, ...] = ("/",)
    paths = section.convert(
        "paths", everyPath, lambda text: _uniqueList(text, syntax.checkRoutePath, "path")
    )
    return Route(
        name=name,
        hosts=hosts,
        paths=paths,
        upstream=upstream,
        max_body_size=section.size("max_body_size", 0) if section.has("max_body_size") else None,
        strip_prefix=section.boolean("strip_prefix", False),
        websocket=section.boolean("websocket", True),
        cache=_readRouteCache(section),
    )


def _readRouteCache(section: Section) -> RouteCache | None:
    """The cache keys of a route (C{cache = yes} and its defaults)."""
    if not section.boolean("cache", False):
        for key in _ROUTE_CACHE_KEYS[1:]:
            if section.has(key) and section.ok("cache"):
                section.report(key, "only used with cache = yes")
        return None
    defaults = RouteCache()
    return RouteCache(
        stale_while_revalidate=section.duration(
            "stale_while_revalidate", defaults.stale_while_revalidate, allowZero=True
        ),
        stale_if_error=section.duration("stale_if_error", defaults.stale_if_error, allowZero=True),
        default_ttl=section.duration("default_ttl", 0.0) if section.has("default_ttl") else None,
        cache_cookies=section.boolean("cache_cookies", defaults.cache_cookies),
    )


def _checkKeyPart(text: str) -> str:
    value = syntax.checkHashKey(text)
    if not value.startswith(("header:", "cookie:")):
        raise ValueError(f"expected header:NAME or cookie:NAME, got {text!r}")
    return value


def _cacheDirectory(section: Section, text: str) -> str:
    path = section.resolve(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path} cannot be created or written by this user ({parent} is not writable)")
    return path


def _targetedField(text: str) -> str | None:
    if text.strip().lower() in ("off", "none"):
        return None
    return syntax.checkToken(text)


def _readCache(section: Section) -> CacheSettings:
    defaults = CacheSettings()
    memory = section.size("memory", defaults.memory)
    disk = section.convert("disk", None, lambda text: _cacheDirectory(section, text))
    if section.has("disk_size") and not section.has("disk"):
        section.report("disk_size", "only used with disk = PATH")
    if memory == 0 and not section.has("disk") and section.ok("memory"):
        section.report("memory", "memory = 0 needs disk = PATH (the cache would have nowhere to store)")
    return CacheSettings(
        memory=memory,
        disk=disk,
        disk_size=section.size("disk_size", defaults.disk_size, minimum=1024 * 1024),
        max_object_size=section.size("max_object_size", defaults.max_object_size, minimum=1),
        heuristic_max=section.duration("heuristic_max", defaults.heuristic_max, allowZero=True),
        targeted_field=section.convert("targeted_field", defaults.targeted_field, _targetedField),
        key_includes=section.convert(
            "key_includes", (), lambda text: _uniqueList(text, _checkKeyPart, "key part")
        ),
        purge_from=section.convert(
            "purge_from", (), lambda text: tuple(_network(entry) for entry in syntax.splitList(text))
        ),
        name=section.convert("name", defaults.name, syntax.checkToken),
        collapse_timeout=section.duration("collapse_timeout", defaults.collapse_timeout),
    )


def load(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """
    Read and validate a configuration file and the files it includes.

    @param path: the C{edge.ini} to read; relative paths inside it (and
        inside the files it includes) resolve against its directory.
    @param environ: where C{${NAME}} in values is read from; the process
        environment when L{None}.
    @return: the frozen configuration; C{Config.path} is absolute.
    @raise ConfigError: naming file, line, section and key; a
        L{ConfigErrors} when there is more than one problem.
    """
    loaded = readSource(path, os.environ if environ is None else environ)
    if not loaded.sections and loaded.errors:
        # Nothing was read (no such file, not text): nothing more to say.
        raise ConfigErrors.of(loaded.errors, loaded.source.files)
    problems = Problems()
    problems.errors.extend(loaded.errors)
    absolute = os.path.abspath(path)
    base = os.path.dirname(absolute)

    singles: dict[str, Section] = {}
    named: dict[str, list[tuple[str, Section]]] = {kind: [] for kind in _NAMED_KINDS}
    for raw in loaded.sections:
        kind, colon, label = raw.name.partition(":")
        section = Section(raw, base, kind, problems)
        if not colon and kind in _SINGLE_KINDS:
            singles[kind] = section
        elif colon and kind in _NAMED_KINDS:
            if not _SECTION_NAME.match(label):
                section.report(
                    None,
                    f"expected [{kind}:NAME] with a NAME of letters, digits, '_', '.' or '-', got {raw.name!r}",
                )
                continue
            named[kind].append((label, section))
        else:
            known = "[edgeproxy], [tls], [acme], [cache], [listen:NAME], [upstream:NAME], [route:NAME]"
            section.report(None, f"unknown section (sections are {known})")
            continue
        section.checkKeys(SECTION_KEYS[kind])

    proxySection = singles.get("edgeproxy")
    proxy = ProxySettings() if proxySection is None else _readProxy(proxySection)
    tlsSection = singles.get("tls")
    tls = None if tlsSection is None else readSection(tlsSection, _readTLS)
    cacheSection = singles.get("cache")
    cache = None if cacheSection is None else readSection(cacheSection, _readCache)
    acmeSection = singles.get("acme")
    acme = None if acmeSection is None else readSection(acmeSection, _readACME)
    if acmeSection is not None and tlsSection is None:
        acmeSection.report(
            None,
            "[acme] needs a [tls] section: its certificates (a self-signed one will do) "
            "are served to names whose ACME certificate has not arrived yet",
        )

    listeners: list[Listener] = []
    specs: dict[str, syntax.EndpointSpec] = {}
    for label, section in named["listen"]:
        read = readSection(section, lambda s: _readListener(s, label, proxy.limits))
        if read is not None:
            listeners.append(read[0])
            specs[label] = read[1]
    upstreams: dict[str, Upstream] = {}
    for label, section in named["upstream"]:
        upstream = readSection(section, lambda s: _readUpstream(s, label))
        if upstream is not None:
            upstreams[label] = upstream
    routes: list[Route] = []
    for label, section in named["route"]:
        route = readSection(section, lambda s: _readRoute(s, label))
        if route is not None:
            routes.append(route)

    crossCheck(
        path,
        problems,
        declared={kind: {label for label, _ in named[kind]} for kind in _NAMED_KINDS}
        | {kind: {kind} for kind in singles},
        tls=tls,
        listeners=listeners,
        specs=specs,
        upstreams=upstreams,
        routes=routes,
        sections={f"{kind}:{label}": section for kind in _NAMED_KINDS for label, section in named[kind]},
    )
    if problems:
        raise ConfigErrors.of(problems.errors, loaded.source.files)
    return Config(
        path=absolute,
        proxy=proxy,
        tls=tls,
        listeners=tuple(listeners),
        upstreams=upstreams,
        routes=tuple(routes),
        source=loaded.source,
        acme=acme,
        cache=cache,
    )
