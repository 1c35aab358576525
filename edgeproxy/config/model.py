# -*- test-case-name: tests.test_config -*-
"""
The frozen values an C{edge.ini} turns into.

Everything downstream (listeners, TLS, routing, upstream pools) is built from
a L{Config} and never looks at the INI text again.  These classes do no I/O
and import no Twisted; L{edgeproxy.config.parse} fills them in and validates
them, so a value that exists is a value that is valid.

Paths are absolute: the parser resolves relative paths against the directory
of the configuration file, so the same C{edge.ini} means the same files
whatever the working directory of the process.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

from edgeproxy.config.acmemodel import ACMESettings
from edgeproxy.config.stagemodel import (
    AuthSettings,
    CacheSettings,
    CompressSettings,
    ErrorPages,
    HeaderRules,
    ImageSettings,
    IPNetwork,
    RateLimit,
    RedisSettings,
    RouteCache,
    RouteForwarding,
    RouteRedirect,
)


BALANCE_POLICIES: tuple[str, ...] = ("round_robin", "least_conn", "p2c", "hash")
"""The values C{balance =} accepts; L{edgeproxy.upstream.balance} has one
policy class for each."""


LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
"""Upper bounds, in seconds, of the duration histograms by default."""


def availableCPUs() -> int:
    """
    The CPUs this process may run on: its affinity (narrowed by
    C{taskset}, a cgroup cpuset, systemd's C{CPUAffinity=}), where the
    system has one, else every CPU; at least 1.
    """
    getAffinity = getattr(os, "sched_getaffinity", None)
    if getAffinity is not None:
        try:
            return max(1, len(getAffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def defaultImageWorkers(workers: int) -> int:
    """
    C{image_workers} when not set: the CPUs this process may run on,
    divided among the C{workers} processes (each has its own conversion
    processes), at least 1.
    """
    return max(1, availableCPUs() // max(1, workers))


class AccessLogFormat(enum.Enum):
    COMBINED = "combined"
    """The Combined Log Format with the request's C{key=value} pairs after it."""
    COMBINED_PLAIN = "combined_plain"
    """The Combined Log Format alone."""
    JSON = "json"


@dataclass(frozen=True, slots=True)
class Limits:
    """
    Per-connection protections against slow or oversized clients.  Set in
    C{[edgeproxy]} as defaults and overridable per C{[listen:NAME]}
    (C{max_body_size} also per C{[route:NAME]}).
    """

    client_header_timeout: float = 10.0
    """Seconds a client has to send a complete request head (slowloris)."""
    client_idle_timeout: float = 60.0
    """Seconds a connection may sit with no byte in either direction."""
    max_header_size: int = 16 * 1024
    """Bytes of request line plus all header lines."""
    max_headers: int = 100
    """Number of header fields in one request."""
    max_body_size: int = 100 * 1024 * 1024
    """Bytes of request body; 0 means no limit."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The C{[edgeproxy]} section."""

    access_log: str | None = "-"
    """A path, C{"-"} for standard output, or L{None} for C{off}."""
    access_log_format: AccessLogFormat = AccessLogFormat.COMBINED
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Peers whose X-Forwarded-* and Forwarded headers are appended to."""
    limits: Limits = field(default_factory=Limits)
    shutdown_timeout: float = 30.0
    """Seconds in-flight requests get to finish after SIGTERM."""
    via: str | None = None
    """Pseudonym for an added C{Via} header; L{None} adds none."""
    admin: str | None = None
    """Server endpoint description of the admin listener (C{/status},
    C{/metrics}); L{None}: no admin listener."""
    admin_token: str | None = field(default=None, repr=False)
    """Bearer token admin actions (C{POST}) require, from C{admin_token} or
    the contents of C{admin_token_file}; L{None}: admin actions are off."""
    workers: int = 1
    """Worker processes; C{auto} in the file is resolved to the CPUs this
    process may run on (L{availableCPUs})."""
    log_level: str = "info"
    """Lowest level the process log shows: C{debug}, C{info}, C{warn} or
    C{error} (see L{edgeproxy.logs})."""
    latency_buckets: tuple[float, ...] = LATENCY_BUCKETS
    """Upper bounds (seconds, ascending) of every duration histogram of
    C{/metrics}; read at start."""
    log_format: str = "auto"
    """C{text}, C{journald} (a C{<N>} priority on every line), or C{auto}:
    C{journald} when standard output is the journal."""
    image_workers: int = field(default_factory=lambda: defaultImageWorkers(1))
    """Image conversions that may run at once in each process (each worker
    process has its own conversion processes); by default the CPUs divided
    among the C{workers} (L{defaultImageWorkers})."""
    image_queue: int | None = None
    """Conversions that may wait for a worker; L{None}: twice
    C{image_workers}.  Beyond it, originals go out unconverted."""
    request_id: str | None = "X-Request-ID"
    """The field carrying each request's ID (to the backend, in the
    response, in the access log); L{None} for C{off}."""
    client_ip_header: str | None = None
    """The field the client's address is sent to backends in (such as
    C{X-Real-IP}); L{None}: none (a client's C{X-Real-IP} is removed
    either way)."""
    fast_paths: str = "auto"
    """C{auto}: the fast paths through Twisted's and pyOpenSSL's private
    surface with the releases they were tested with; C{off}: never (see
    L{edgeproxy._compat}).  Read at start."""
    error_pages: ErrorPages | None = None
    """The custom pages of the errors the proxy makes itself, for requests
    of routes without their own and requests no route took; L{None}: the
    built-in pages."""


class TLSVersion(enum.Enum):
    TLSv1_2 = "1.2"
    TLSv1_3 = "1.3"


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """The C{[tls]} section: the certificates the listeners serve."""

    certificates: tuple[str, ...]
    """Absolute paths of PEM files and/or directories."""
    default: str | None
    """PEM file (or per-name directory) served when the client sends no or
    an unknown SNI name; when L{None}, the first certificate loaded is the
    default."""
    keys: tuple[str, ...] = ()
    """Absolute paths of private key files and/or directories of them, for
    certificates with no key next to them (paired by public key), such as
    the keys systemd's C{LoadCredential=} passes in
    C{$CREDENTIALS_DIRECTORY}."""
    min_version: TLSVersion = TLSVersion.TLSv1_2
    expiry_warning: float = 14 * 86400.0
    """Warn when a certificate expires within this many seconds."""
    session_ticket_rotation: float = 3600.0
    """Seconds between session-ticket key rotations."""
    ocsp_stapling: bool = True
    """Fetch and staple OCSP responses for certificates naming a responder."""


@dataclass(frozen=True, slots=True)
class HTTP2Settings:
    """
    The C{h2_*} keys of a C{[listen:NAME]} section: what its HTTP/2
    connections advertise (RFC 9113 6.5.2) and hold for a client.
    """

    max_concurrent_streams: int = 100
    """Streams a client may have open at once; one more is refused
    (C{REFUSED_STREAM}), the others carry on."""
    initial_window_size: int = 65535
    """Bytes of request body a client may send on a stream before the
    proxy has passed them on (the stream's flow-control window)."""
    max_frame_size: int = 16384
    """Largest frame payload accepted; a frame header announcing more ends
    the connection (C{FRAME_SIZE_ERROR})."""
    max_header_list_size: int = 65536
    """Advertised, and the most a header block may decode to (RFC 7541
    4.1 sizes); more ends the connection.  The listener's C{max_headers}
    and C{max_header_size} (431) apply below it."""
    stream_buffer: int = 65536
    """Bytes of response body held for one stream whose client is not
    taking them (window closed or socket not read); past it the backend
    is paused."""
    connection_buffer: int = 1024 * 1024
    """The same for all streams of a connection together; also the
    connection's flow-control window for request bodies."""


@dataclass(frozen=True, slots=True)
class Listener:
    """A C{[listen:NAME]} section."""

    name: str
    endpoint: str
    """A Twisted server endpoint description (C{tcp:...}, C{systemd:...})."""
    tls: bool
    http2: bool = True
    redirect_https: bool = False
    """Answer everything with 308 to the https listener instead of routing."""
    redirect_port: int | None = None
    """Port put in redirect URLs; L{None}: the first TLS listener's port."""
    limits: Limits = field(default_factory=Limits)
    """Effective limits: C{[edgeproxy]} defaults with this section's keys
    applied on top."""
    h2: HTTP2Settings = field(default_factory=HTTP2Settings)
    """HTTP/2 settings (used when C{http2} is on)."""
    client_ca: str | None = None
    """PEM bundle of the CAs client certificates are verified against;
    L{None}: no client certificate is asked for."""
    client_certificates: str = "request"
    """With C{client_ca}: C{request} (asked for, verified when given) or
    C{require} (every handshake must present one)."""
    proxy_protocol: bool = False
    """Connections start with a PROXY protocol header (v1 or v2)."""
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    """The peers allowed to send one; connections from others are closed."""


@dataclass(frozen=True, slots=True)
class Server:
    """One entry of an upstream's C{servers} list."""

    host: str
    """Host name or IP literal (no brackets)."""
    port: int
    weight: int = 1
    backup: bool = False
    """Picked only when no primary server is available."""
    down: bool = False
    """Administratively off: never picked."""
    max_conns: int = 0
    """Requests in flight at most on each address of this server (0: no
    limit); more wait in the upstream's queue."""

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """An C{[upstream:NAME]} section: a pool of backends."""

    name: str
    servers: tuple[Server, ...]
    tls: bool = False
    ca: str | None = None
    """PEM bundle of trust anchors; L{None} means the system store."""
    server_name: str | None = None
    """Name verified in, and sent as SNI to, every backend; L{None} means
    each server's own host."""
    client_certificate: str | None = None
    """PEM file with certificate and key presented to backends."""
    insecure: bool = False
    """Skip certificate verification (warned about at every start)."""
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    """Seconds from the end of the request to the first response byte."""
    idle_timeout: float = 60.0
    """Seconds without a byte in either direction once a response started."""
    keepalive: int = 32
    """Idle connections kept per backend."""
    keepalive_timeout: float = 30.0
    """Seconds an idle backend connection is kept (below the backend's)."""
    host_header: str | None = None
    """When set, sent as C{Host} instead of the client's."""
    balance: str = "round_robin"
    """Balancing policy: one of L{BALANCE_POLICIES} (see
    L{edgeproxy.upstream.balance})."""
    hash_key: str = "client_ip"
    """For C{balance = hash}: C{client_ip}, C{path}, C{header:NAME} (NAME
    lower-cased) or C{cookie:NAME}."""
    queue_size: int = 100
    """Requests that may wait for a backend under C{max_conns}."""
    queue_timeout: float = 10.0
    """Seconds a queued request waits before it gets 503."""
    resolve_interval: float = 30.0
    """Seconds between re-resolutions of host names in C{servers}."""
    retries: int = 2
    """Further attempts on another backend for a request that failed
    safely (see L{edgeproxy.upstream.retry})."""
    retry_budget: float = 0.2
    """Retries allowed as a fraction of recent requests (0.2 = 20%)."""
    max_fails: int = 5
    """Failures within C{fail_window} that eject a backend (0: no passive
    health checking)."""
    fail_window: float = 10.0
    eject_time: float = 30.0
    """First ejection's length; it doubles on each repeated ejection."""
    eject_max_time: float = 300.0
    """Cap on the ejection length."""
    fail_status: tuple[int, ...] = ()
    """Response status codes that count as failures for passive health."""
    health_path: str | None = None
    """Origin-form target of active health checks; L{None}: no checks."""
    health_interval: float = 5.0
    health_timeout: float = 2.0
    health_status: tuple[tuple[int, int], ...] = ((200, 399),)
    """Accepted status codes as inclusive ranges."""
    health_host: str | None = None
    """C{Host} of health checks; L{None}: C{host_header}, else the
    server name, else the server's host."""
    health_initial: str = "unknown"
    """C{unknown}: a backend takes traffic after its first passing check;
    C{up}: it takes traffic until checks fail C{fall} times."""
    rise: int = 2
    fall: int = 3
    slow_start: float = 0.0
    """Seconds over which a recovered backend ramps up to its full weight
    (0: off)."""
    proxy_protocol: str | None = None
    """C{v1} or C{v2}: each backend connection starts with a PROXY header
    naming the client; L{None}: none."""


@dataclass(frozen=True, slots=True)
class Route:
    """A C{[route:NAME]} section."""

    name: str
    hosts: tuple[str, ...]
    """Lower-case names, C{*.suffix} wildcards, or IP literals; C{*} alone
    matches any host."""
    paths: tuple[str, ...]
    """Path prefixes, each starting with C{/}."""
    upstream: str | None
    """The upstream requests are forwarded to; L{None} for a route with
    C{redirect}."""
    max_body_size: int | None = None
    """Overrides the listener's limit for this route when set."""
    strip_prefix: bool = False
    """Remove the matched path prefix before forwarding."""
    websocket: bool = True
    """Forward C{Upgrade: websocket} requests."""
    compress: CompressSettings | None = None
    """Negotiated compression of responses; L{None}: off."""
    images: ImageSettings | None = None
    """Image conversion to AVIF/WebP; L{None}: off."""
    allow: tuple[IPNetwork, ...] = ()
    """Client networks let in (empty: everyone not denied)."""
    deny: tuple[IPNetwork, ...] = ()
    """Client networks refused (deny wins over allow)."""
    methods: tuple[str, ...] = ()
    """Methods allowed (upper case); empty: any."""
    rate_limit: tuple[str, ...] = ()
    """Names of C{[ratelimit:NAME]} sections applied, in order."""
    auth: str | None = None
    """Name of the C{[auth:NAME]} section, or L{None}."""
    hsts: float | None = None
    """C{Strict-Transport-Security} max-age in seconds on TLS responses."""
    hsts_preload: bool = False
    hsts_include_subdomains: bool = False
    require_client_certificate: bool = False
    """Refuse requests whose connection presented no verified certificate."""
    client_certificate_headers: tuple[tuple[str, str], ...] = ()
    """(C{subject}/C{san}/C{fingerprint}, field name lower case): where the
    verified certificate's facts are forwarded."""
    cache: RouteCache | None = None
    """The route's cache settings; L{None}: C{cache = no}."""
    request_headers: HeaderRules | None = None
    """Rules applied to requests before the backend; L{None}: none."""
    response_headers: HeaderRules | None = None
    """Rules applied to every response the route sends once its request
    passed the C{headers} stage; L{None}: none."""
    forwarding: RouteForwarding | None = None
    """The route's own timeouts and retries; L{None}: its upstream's."""
    redirect: RouteRedirect | None = None
    """The redirect every request of the route gets (then C{upstream} is
    L{None}); L{None}: the route forwards."""
    error_pages: ErrorPages | None = None
    """The pages of the errors the proxy makes itself for this route's
    requests: the route's own C{error_pages} over the global ones (merged
    when read); L{None}: the built-in pages."""

    @property
    def securityConfigured(self) -> bool:
        """Whether any key of the access stage is set."""
        return bool(
            self.allow or self.deny or self.methods or self.hsts is not None
            or self.require_client_certificate or self.client_certificate_headers
        )


@dataclass(frozen=True, slots=True)
class Substitution:
    """A value in which C{${NAME}} was replaced from the environment."""

    file: str
    line: int
    section: str
    key: str
    written: str
    """The value as written, C{${NAME}} and all."""
    value: str
    """The value used (C{"(secret)"} for a token)."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where a configuration came from, for messages and C{edgeproxy check}."""

    files: tuple[str, ...]
    """The main file, then the included ones, as absolute paths."""
    substitutions: tuple[Substitution, ...] = ()
    lines: dict[tuple[str, str | None], tuple[str, int]] = field(default_factory=dict)
    """C{(section, key)} (C{key} L{None} for the header) to file and line."""

    def where(self, section: str, key: str | None) -> tuple[str | None, int | None]:
        """The file and line of C{key} in C{section} (of the section when
        the key is not written), or C{(None, None)}."""
        found = self.lines.get((section, key)) or self.lines.get((section, None))
        return found if found is not None else (None, None)


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated configuration."""

    path: str
    """Absolute path of the C{edge.ini} it came from."""
    proxy: ProxySettings
    tls: TLSSettings | None
    listeners: tuple[Listener, ...]
    upstreams: dict[str, Upstream]
    routes: tuple[Route, ...]
    source: Source | None = field(default=None, compare=False, repr=False)
    """Files, lines and substitutions it was read from (L{None} when built
    in code)."""
    acme: ACMESettings | None = None
    """The C{[acme]} section, or L{None} when it is absent (ACME off)."""
    ratelimits: dict[str, RateLimit] = field(default_factory=dict)
    """C{[ratelimit:NAME]} sections by name."""
    auths: dict[str, AuthSettings] = field(default_factory=dict)
    """C{[auth:NAME]} sections by name."""
    redis: RedisSettings | None = None
    """The C{[redis]} section, or L{None}."""
    cache: CacheSettings | None = None
    """The C{[cache]} section, or L{None} when it is absent (its defaults
    then apply to routes with C{cache = yes})."""
