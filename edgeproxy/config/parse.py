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
(C{_readProxy}, C{_readTLS}, C{_readListener}, C{_readRoute} here,
L{edgeproxy.config.upstreams.readUpstream},
L{edgeproxy.config.acme.readACME}) from a L{Section}; a new section kind
adds its keys to L{SECTION_KEYS}, such a function, and one line in
L{load}.  The file syntax
is L{edgeproxy.config.ini}'s, includes and C{${VAR}} are
L{edgeproxy.config.source}'s, the typed getters L{edgeproxy.config.section}'s.

Nothing here imports Twisted or loads certificates.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from edgeproxy.config import syntax
from edgeproxy.config.acme import ACME_KEYS, defaultACMEStorage, readACME
from edgeproxy.config.auth import AUTH_KEYS, readAuth
from edgeproxy.config.cache import CACHE_KEYS, ROUTE_CACHE_KEYS, readCache, readRouteCache
from edgeproxy.config.checks import crossCheck
from edgeproxy.config.content import PROXY_KEYS, ROUTE_KEYS, readProxyContent, readRouteContent
from edgeproxy.config.headers import (
    HEADER_PROXY_KEYS,
    HEADER_ROUTE_KEYS,
    checkHeaderNames,
    readProxyHeaders,
    readRouteHeaders,
)
from edgeproxy.config.errorpages import ERROR_PAGES_KEYS, mergePages, readErrorPages
from edgeproxy.config.forwarding import ROUTE_FORWARDING_KEYS, readRouteForwarding
from edgeproxy.config.redirects import REDIRECT_KEYS, readRouteRedirect
from edgeproxy.config.files import readSecretText
from edgeproxy.config.http2 import H2_KEYS, readHTTP2
from edgeproxy.config.model import (
    AccessLogFormat,
    Config,
    IPNetwork,
    Limits,
    Listener,
    ProxySettings,
    Route,
    TLSSettings,
    TLSVersion,
    Upstream,
    availableCPUs,
    defaultImageWorkers,
)
from edgeproxy.config.stagemodel import ErrorPages
from edgeproxy.config.ratelimit import RATELIMIT_KEYS, REDIS_KEYS, readRateLimit, readRedis
from edgeproxy.config.section import Problems, Section, readSection
from edgeproxy.config import security
from edgeproxy.config.source import readSource
from edgeproxy.config.units import parseDuration
from edgeproxy.config.upstreams import UPSTREAM_KEYS, readUpstream
from edgeproxy.errors import ConfigErrors

__all__ = ["load", "SECTION_KEYS", "defaultACMEStorage"]

_LIMIT_KEYS = (
    "client_header_timeout",
    "client_idle_timeout",
    "max_header_size",
    "max_headers",
    "max_body_size",
)

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
        "latency_buckets",
        *PROXY_KEYS,
        *HEADER_PROXY_KEYS,
        "fast_paths",
        *ERROR_PAGES_KEYS,
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
    "acme": ACME_KEYS,
    "listen": (
        "endpoint", "tls", "http2", "redirect_https", "redirect_port", *_LIMIT_KEYS, *H2_KEYS,
        *security.LISTEN_KEYS,
    ),
    "upstream": UPSTREAM_KEYS,
    "route": (
        "hosts", "paths", "upstream", "max_body_size", "strip_prefix", "websocket", *ROUTE_KEYS,
        *security.ROUTE_KEYS, *ROUTE_CACHE_KEYS, *HEADER_ROUTE_KEYS, *ROUTE_FORWARDING_KEYS,
        *REDIRECT_KEYS, *ERROR_PAGES_KEYS,
    ),
    "ratelimit": RATELIMIT_KEYS,
    "auth": AUTH_KEYS,
    "redis": REDIS_KEYS,
    "cache": CACHE_KEYS,
}
"""The keys each kind of section accepts (C{listen}, C{upstream} and
C{route} stand for C{[listen:NAME]} and so on)."""

# The values edgeproxy.logs accepts (config/ imports no subsystem).
_LOG_LEVELS = ("debug", "info", "warn", "error")
_LOG_FORMATS = ("auto", "text", "journald")
# The values edgeproxy._compat.decideFastPaths accepts.
_FAST_PATHS = ("auto", "off")

_SINGLE_KINDS = ("edgeproxy", "tls", "acme", "redis", "cache")
_NAMED_KINDS = ("listen", "upstream", "route", "ratelimit", "auth")
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


def _readTrustedProxies(section: Section) -> tuple[IPNetwork, ...]:
    if not section.values.get("trusted_proxies", "").strip():
        # Empty means "trust nobody", the default, so it is not an error.
        return ()
    return section.convert(
        "trusted_proxies",
        (),
        lambda text: tuple(syntax.checkNetwork(entry) for entry in syntax.splitList(text)),
    )


def _readProxy(section: Section) -> ProxySettings:
    defaults = ProxySettings()
    workers = section.convert("workers", defaults.workers, _parseWorkers)
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
        workers=workers,
        log_level=section.choice("log_level", defaults.log_level, {v: v for v in _LOG_LEVELS}),
        log_format=section.choice("log_format", defaults.log_format, {v: v for v in _LOG_FORMATS}),
        latency_buckets=section.convert("latency_buckets", defaults.latency_buckets, _parseBuckets),
        **readProxyContent(section, defaultImageWorkers(workers)),
        **readProxyHeaders(section),
        fast_paths=section.choice("fast_paths", defaults.fast_paths, {v: v for v in _FAST_PATHS}),
        error_pages=readErrorPages(section),
    )


def _endpoint(section: Section, text: str) -> syntax.EndpointSpec:
    return syntax.checkEndpoint(text, section.base)


def _parseBuckets(text: str) -> tuple[float, ...]:
    bounds = tuple(parseDuration(entry) for entry in syntax.splitList(text))
    if not 1 <= len(bounds) <= 50:
        raise ValueError(f"expected 1 to 50 durations, got {len(bounds)}")
    if bounds[0] <= 0 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"expected durations greater than zero in increasing order, like 5ms, 50ms, 500ms, 5s; got {text!r}"
        )
    return bounds


def _parseWorkers(text: str) -> int:
    value = text.strip().lower()
    if value == "auto":
        return availableCPUs()
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
    return _checkToken(readSecretText(section.resolve(text)))


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
    http2 = section.boolean("http2", True) if tls else False
    listener = Listener(
        name=name,
        endpoint=spec.description,
        tls=tls,
        http2=http2,
        redirect_https=redirect,
        redirect_port=redirectPort,
        limits=_readLimits(section, limits),
        h2=readHTTP2(section, http2),
        **security.readListenerSecurity(section, tls),
    )
    return listener, spec


def _readRoute(section: Section, name: str, pages: ErrorPages | None) -> Route:
    """
    @param pages: the global error pages, under the route's own.
    """
    section.require("hosts", "host names, *.wildcards, IP addresses, or * for any host")
    pages = mergePages(readErrorPages(section), pages)
    redirect = readRouteRedirect(section)
    if not section.has("redirect"):
        upstream = section.require(
            "upstream", "the name of an [upstream:NAME] section, or redirect = URL"
        )
    noHosts: tuple[str, ...] = ()
    hosts = section.convert(
        "hosts", noHosts, lambda text: syntax.uniqueList(text, syntax.checkRouteHost, "host")
    )
    everyPath: tuple[str, ...] = ("/",)
    paths = section.convert(
        "paths", everyPath, lambda text: syntax.uniqueList(text, syntax.checkRoutePath, "path")
    )
    if section.has("redirect"):
        # Its other keys were reported by readRouteRedirect, once.
        return Route(
            name=name,
            hosts=hosts,
            paths=paths,
            upstream=None,
            strip_prefix=section.boolean("strip_prefix", False),
            websocket=False,
            redirect=redirect,
            error_pages=pages,
        )
    return Route(
        name=name,
        hosts=hosts,
        paths=paths,
        upstream=upstream,
        max_body_size=section.size("max_body_size", 0) if section.has("max_body_size") else None,
        strip_prefix=section.boolean("strip_prefix", False),
        websocket=section.boolean("websocket", True),
        **readRouteContent(section),
        **security.readRouteSecurity(section),
        cache=readRouteCache(section),
        **readRouteHeaders(section),
        forwarding=readRouteForwarding(section),
        error_pages=pages,
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
            known = (
                "[edgeproxy], [tls], [acme], [redis], [cache], [listen:NAME], [upstream:NAME], "
                "[route:NAME], [ratelimit:NAME], [auth:NAME]"
            )
            section.report(None, f"unknown section (sections are {known})")
            continue
        section.checkKeys(SECTION_KEYS[kind])

    proxySection = singles.get("edgeproxy")
    proxy = ProxySettings() if proxySection is None else _readProxy(proxySection)
    tlsSection = singles.get("tls")
    tls = None if tlsSection is None else readSection(tlsSection, _readTLS)
    cacheSection = singles.get("cache")
    cache = None if cacheSection is None else readSection(cacheSection, readCache)
    acmeSection = singles.get("acme")
    acme = None if acmeSection is None else readSection(acmeSection, readACME)
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
        upstream = readSection(section, lambda s: readUpstream(s, label))
        if upstream is not None:
            upstreams[label] = upstream
    routes: list[Route] = []
    for label, section in named["route"]:
        route = readSection(section, lambda s: _readRoute(s, label, proxy.error_pages))
        if route is not None:
            routes.append(route)
    ratelimits = {
        label: limit
        for label, section in named["ratelimit"]
        if (limit := readSection(section, lambda s: readRateLimit(s, label))) is not None
    }
    auths = {
        label: auth
        for label, section in named["auth"]
        if (auth := readSection(section, lambda s: readAuth(s, label))) is not None
    }
    redisSection = singles.get("redis")
    redis = None if redisSection is None else readSection(redisSection, readRedis)

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
    security.checkSecurity(
        routes=routes,
        listeners=listeners,
        upstreams=upstreams,
        ratelimits=ratelimits,
        auths=auths,
        redis=redis,
        declared={kind: {label for label, _ in named[kind]} for kind in _NAMED_KINDS}
        | {kind: {kind} for kind in singles},
        sections={f"{kind}:{label}": section for kind in _NAMED_KINDS for label, section in named[kind]},
    )
    checkHeaderNames(
        proxy, routes, {f"route:{label}": section for label, section in named["route"]}
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
        ratelimits=ratelimits,
        auths=auths,
        redis=redis,
        cache=cache,
    )
