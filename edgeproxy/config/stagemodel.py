# -*- test-case-name: tests.test_config -*-
"""
The frozen values of the request stages' settings: what a route's
C{compress*}/C{image*}, C{cache*}, timeout, C{redirect}, header-rule and
C{error_pages} keys, and the C{[cache]}, C{[ratelimit:NAME]}, C{[redis]}
and C{[auth:NAME]} sections, turn into.  Part of the model
(L{edgeproxy.config.model}: L{Route}, L{ProxySettings} and L{Config} hold
these); the same rules hold: no I/O, no Twisted, valid once made.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
"""An address range of the configuration (C{allow}, C{trusted_proxies}...)."""


@dataclass(frozen=True, slots=True)
class ErrorPage:
    """One custom error page, read when the configuration was."""

    path: str
    """The file it was read from."""
    content_type: str
    """From the file's extension (C{text/html; charset=utf-8}...)."""
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ErrorPages:
    """
    The custom error pages of a route (its own over the global ones), or
    the global ones (C{error_pages} in C{[edgeproxy]}): L{page} gives the
    page for a status, by status first, then by class (C{5xx}).
    """

    exact: tuple[tuple[int, ErrorPage], ...] = ()
    """Pages of one status (C{404.html})."""
    classes: tuple[tuple[int, ErrorPage], ...] = ()
    """Pages of a class of statuses (C{5xx.html}: 5)."""
    _index: dict[int, ErrorPage] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Classes by their digit (4, 5), statuses by themselves (400-599).
        object.__setattr__(self, "_index", {**dict(self.classes), **dict(self.exact)})

    def page(self, status: int) -> ErrorPage | None:
        """The page for C{status}, or L{None} (the built-in page)."""
        index = self._index
        return index.get(status) or index.get(status // 100)


COMPRESS_ENCODINGS: tuple[str, ...] = ("zstd", "br", "gzip")
"""The content codings C{compress =} offers (RFC 9110 8.4.1, RFC 8878,
RFC 7932)."""


COMPRESS_LEVELS: dict[str, tuple[int, int, int]] = {
    "zstd": (1, 19, 3),
    "br": (0, 11, 4),
    "gzip": (1, 9, 6),
}
"""Per encoding: the lowest and highest C{compress_level} and the default.
zstd stops at 19: higher levels need windows over the 8 MiB that RFC 9659
lets HTTP clients refuse."""


DEFAULT_COMPRESS_TYPES: tuple[str, ...] = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/x-ndjson",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/xml",
    "application/*+xml",
    "image/svg+xml",
    "image/x-icon",
    "image/vnd.microsoft.icon",
    "image/bmp",
    "application/wasm",
    "font/ttf",
    "font/otf",
    "font/collection",
    "application/vnd.ms-fontobject",
    "application/x-font-ttf",
    "application/x-font-otf",
)
"""Media types compressed by default: text, JSON, JavaScript, XML, SVG,
WebAssembly, and the font formats that are not compressed already (WOFF
and WOFF2 are)."""


IMAGE_FORMATS: tuple[str, ...] = ("avif", "webp")
"""The formats C{images =} offers."""


IMAGE_QUALITY: dict[str, int] = {"avif": 60, "webp": 80}
"""The default C{image_quality} of each format (1-100)."""


@dataclass(frozen=True, slots=True)
class CompressSettings:
    """A route's C{compress*} keys (see C{docs/configuration.rst})."""

    encodings: tuple[str, ...]
    """Offered encodings, preferred first (where the client's q-values tie)."""
    types: tuple[str, ...] = DEFAULT_COMPRESS_TYPES
    """Media types (lower case; C{type/*} and C{type/*+suffix} patterns)."""
    min_size: int = 1024
    """Bodies of a known length below this are sent as they are."""
    levels: tuple[tuple[str, int], ...] = tuple(
        (name, levels[2]) for name, levels in COMPRESS_LEVELS.items()
    )
    """The level of each encoding."""

    def level(self, encoding: str) -> int:
        return dict(self.levels)[encoding]


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """A route's C{image*} keys (see C{docs/configuration.rst})."""

    formats: tuple[str, ...]
    """Offered formats, preferred first (where the client's q-values tie)."""
    quality: tuple[tuple[str, int], ...] = tuple(IMAGE_QUALITY.items())
    max_pixels: int = 25_000_000
    """Images of more pixels (width x height, times frames) go out as they are."""
    max_bytes: int = 10 * 1024 * 1024
    """Bodies larger than this go out as they are (and are never buffered
    beyond it)."""
    resize: bool = False
    """Accept C{w}, C{h}, C{fit}, C{q}, C{fmt} in the query string."""
    signing_key: bytes | None = field(default=None, repr=False)
    """HMAC-SHA256 key resize parameters must be signed with, from
    C{image_signing_key_file}; L{None}: no signature needed."""

    def qualityOf(self, fmt: str) -> int:
        return dict(self.quality)[fmt]


@dataclass(frozen=True, slots=True)
class RouteCache:
    """The cache settings of a route with C{cache = yes}."""

    stale_while_revalidate: float = 0.0
    """Seconds a stale response may be served while it is refreshed in the
    background, when the response does not say (RFC 5861 3)."""
    stale_if_error: float = 0.0
    """Seconds a stale response may be served in place of an error, when
    the response does not say (RFC 5861 4)."""
    default_ttl: float | None = None
    """Lifetime of a response that allows caching but gives none; L{None}:
    the heuristic of RFC 9111 4.2.2."""
    cache_cookies: bool = False
    """Store responses that set cookies (without their C{Set-Cookie}) and
    responses to requests that carry cookies."""


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """
    A route's header rules for one direction (C{request_headers_*} or
    C{response_headers_*}), applied in this order: remove, set, add.
    Names are lower case; values are checked field values.
    """

    remove: tuple[str, ...] = ()
    """Names; one ending in C{*} removes every field whose name starts
    with the rest."""
    set: tuple[tuple[str, str], ...] = ()
    """(name, value): replaces every field of that name (several entries
    of one name give it several values)."""
    add: tuple[tuple[str, str], ...] = ()
    """(name, value): one more field line, after those of that name."""


@dataclass(frozen=True, slots=True)
class RouteForwarding:
    """
    A route's own timeouts and retries, over its upstream's (see
    C{docs/configuration.rst}); each L{None} takes the upstream's value
    (for C{request_timeout}: one attempt's worth, see
    L{edgeproxy.upstream.terms}).
    """

    connect_timeout: float | None = None
    response_timeout: float | None = None
    retries: int | None = None
    request_timeout: float | None = None
    """Seconds, across the queue and every attempt, from the moment the
    proxy has the whole request to the response head."""


@dataclass(frozen=True, slots=True)
class RouteRedirect:
    """A route's C{redirect}: every request of the route answered with a
    redirect (see L{edgeproxy.locations})."""

    location: str
    """The template as written (C{https://example.com$request_uri})."""
    parts: tuple[tuple[str, str], ...]
    """The template read: C{("text", TEXT)} and C{("var", NAME)} in order."""
    status: int = 301
    """301, 302, 303, 307 or 308."""


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The C{[cache]} section: the stores every route with C{cache = yes}
    shares (see L{edgeproxy.cache})."""

    memory: int = 256 * 1024 * 1024
    """Bytes of the memory tier of each process; 0: none."""
    disk: str | None = None
    """Absolute path of the disk tier's directory; L{None}: none."""
    disk_size: int = 10 * 1024 * 1024 * 1024
    """Bytes the disk tier may hold."""
    max_object_size: int = 64 * 1024 * 1024
    """The largest body stored."""
    heuristic_max: float = 86400.0
    """Cap on a heuristic lifetime (RFC 9111 4.2.2)."""
    targeted_field: str | None = "CDN-Cache-Control"
    """The targeted cache-control field honoured (RFC 9213); L{None}: none."""
    key_includes: tuple[str, ...] = ()
    """Extra parts of the key: C{header:NAME} (NAME lower case) or
    C{cookie:NAME}."""
    purge_from: tuple[IPNetwork, ...] = ()
    """Client addresses allowed to send the C{PURGE} method."""
    name: str = "edgeproxy"
    """The cache's name in C{Cache-Status} (RFC 9211)."""
    collapse_timeout: float = 10.0
    """Seconds a request waits for another's fetch of the same key."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A C{[ratelimit:NAME]} section: a token bucket per key."""

    name: str
    count: int
    """Requests per C{window} (the steady rate)."""
    window: float
    """Seconds: 1, 60 or 3600 (C{/s}, C{/m}, C{/h})."""
    burst: int
    """The bucket's size: requests allowed at once."""
    key: str = "client_ip"
    """C{client_ip}, C{route}, C{identity}, C{header:NAME} (lower case) or
    C{cookie:NAME}."""
    concurrency: int = 0
    """Requests in flight per key at most (0: no bound)."""
    store: str = "local"
    """C{local} (this process) or C{redis} (shared)."""
    on_store_error: str = "open"
    """With C{redis} unreachable: C{open} lets requests through, C{closed}
    refuses them (503 with C{Retry-After})."""
    rate_enabled: bool = True
    """Whether C{rate} was given (a section may bound concurrency alone)."""

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.count / self.window


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """The C{[redis]} section."""

    url: str
    """C{redis://host:port/db}, C{rediss://...} (TLS) or C{unix:/path}."""
    host: str | None = None
    port: int = 6379
    path: str | None = None
    """The UNIX socket, for C{unix:}."""
    db: int = 0
    tls: bool = False
    ca: str | None = None
    """PEM bundle trusted for C{rediss://}; L{None}: the system store."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    """From C{password_file}."""
    timeout: float = 0.25
    """Seconds a command may take before the store counts as failed."""
    prefix: str = "edgeproxy"
    """Prefix of every key (see docs: the scope of counters)."""


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """
    An C{[auth:NAME]} section.  C{type} says which of the other fields
    apply; L{edgeproxy.config.security} fills only those.
    """

    name: str
    type: str
    """C{basic}, C{jwt}, C{forward} or C{oidc}."""
    pass_authorization: bool = False
    # basic
    htpasswd: str | None = None
    users: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    """The (user, hash) lines of C{htpasswd}, read with the configuration
    (at start and on every reload)."""
    realm: str = "edgeproxy"
    user_header: str = "x-auth-user"
    """Lower-case field the authenticated user name is sent to the backend in."""
    # jwt
    jwks: str | None = None
    """A file path or an https URL."""
    jwks_document: bytes | None = field(default=None, repr=False)
    """The JWKS of a C{jwks} file, read and checked with the configuration
    (at start and on every reload); L{None} for a URL."""
    jwks_ca: str | None = None
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    secret: bytes | None = field(default=None, repr=False)
    """HS256 key from C{secret_file}."""
    leeway: float = 0.0
    token_from: str = "header"
    """C{header} (C{Authorization: Bearer}) or C{cookie:NAME}."""
    claims_to_headers: tuple[tuple[str, str], ...] = ()
    """(claim, lower-case field name)."""
    jwks_refresh: float = 3600.0
    # forward
    url: str | None = None
    copy_request_headers: tuple[str, ...] = ()
    copy_response_headers: tuple[str, ...] = ()
    pass_cookies: bool = True
    """C{Set-Cookie} of a C{2xx} answer goes on to the client's response."""
    cache_ttl: float = 0.0
    cache_size: int = 10000
    timeout: float = 5.0
    # oidc
    ca: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    callback_path: str = "/.edgeproxy/oidc/callback"
    logout_path: str = "/.edgeproxy/oidc/logout"
    cookie_secret: bytes | None = field(default=None, repr=False)
    cookie_name: str = "edgeproxy_session"
    session_ttl: float = 8 * 3600.0
    allow_emails: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()
    allow_claim: tuple[str, str] | None = None
    """(claim, value): the claim (or a list claim) must hold the value."""
