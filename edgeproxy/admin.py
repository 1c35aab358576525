# -*- test-case-name: tests.test_admin -*-
"""
The admin listener: C{GET /status} (JSON), C{GET /metrics} (Prometheus
text) and the backend actions (C{POST}, bearer token), on the endpoint of
C{[edgeproxy] admin}.

It owns what an operator sees of the live proxy: L{statusDocument} (the
C{/status} document, a documented API: C{docs/operations.rst}, "Admin
API"), L{stateSamples} (the gauges of L{edgeproxy.metrics} read at scrape
time from the same objects, so C{/status} and C{/metrics} cannot disagree)
and L{AdminSite}, a small plain-HTTP C{twisted.web} site of its own (not an
L{edgeproxy.http.listener.ListenerFactory}: no routing, no access log).

Both builders read the service through a few attributes only
(C{config}, C{currentRuntime()}, C{sites}, C{ports}, C{store},
C{startedAt}), so the workers' supervisor can call them on its own view.

The site is meant for operators on loopback or a management network, but it
is bounded all the same: few connections, small heads, a header deadline,
an idle timeout, request bodies of a few KiB at most.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import json
import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

import edgeproxy
from edgeproxy.metrics import CONTENT_TYPE, StateSample
from edgeproxy.upstream import health
from edgeproxy.upstream.backend import Backend, BackendState

__all__ = [
    "AdminSite",
    "AdminResource",
    "backendStatus",
    "listenAdmin",
    "stateSamples",
    "statusDocument",
]

log = Logger()

MAX_CONNECTIONS = 32
"""Admin connections open at once; more are closed as they arrive."""
MAX_HEADER_SIZE = 8 * 1024
"""Bytes of request line plus header lines."""
MAX_HEADERS = 50
MAX_BODY_SIZE = 4 * 1024
"""Bytes of request body (the actions take none)."""
HEADER_TIMEOUT = 10.0
"""Seconds a client has to send a complete request head."""
IDLE_TIMEOUT = 30.0
"""Seconds a kept-alive admin connection may sit idle (above the usual
Prometheus scrape interval of 15 s, so a scraper keeps its connection)."""

ACTIONS: dict[str, BackendState | None] = {
    "drain": BackendState.DRAINING,
    "disable": BackendState.DISABLED,
    "enable": None,
}
"""The admin actions and the state each enters (C{enable}: back to what
health checking says)."""


# The /status document ---------------------------------------------------


def formatAddress(address: Any) -> str | None:
    """C{host:port} of a Twisted address (IPv6 in brackets); L{None} when it
    has no port (a UNIX socket: its path)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        name = getattr(address, "name", None)
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _inFlight(pool: Any, backend: Backend) -> int:
    counter = getattr(pool, "inFlight", None)
    if counter is None:
        counter = pool.balancer.inFlight
    try:
        return int(counter(backend))
    except KeyError:
        # Removed by a re-resolution between listing and counting.
        return 0


def _available(pool: Any, backend: Backend) -> bool:
    # The balancer's predicate: it knows whether an unknown backend may take
    # requests (only while none of the upstream is up).
    balancer = getattr(pool, "balancer", None)
    if balancer is not None:
        return bool(balancer.isAvailable(backend))
    return backend.isAvailable()


def backendStatus(pool: Any, backend: Backend) -> dict[str, Any]:
    """One backend's entry in C{/status} (and the answer to an action)."""
    check = backend.lastCheck
    return {
        "address": backend.address,
        "server": backend.server.address,
        "state": backend.state.value,
        "reason": backend.reason or None,
        "available": _available(pool, backend),
        "weight": backend.weight,
        "effective_weight": round(float(backend.effectiveWeight()), 3),
        "backup": backend.backup,
        "max_conns": backend.server.max_conns,
        "in_flight": _inFlight(pool, backend),
        "ejected_until": backend.ejectedUntil,
        "ejections": backend.ejections,
        "last_check": None if check is None else {
            "ok": check.ok,
            "at": check.at,
            "detail": check.detail,
            "duration": check.duration,
        },
    }


def upstreamStatus(pool: Any) -> dict[str, Any]:
    """One upstream's entry in C{/status}."""
    upstream = pool.upstream
    return {
        "balance": upstream.balance,
        "health_checks": upstream.health_path is not None,
        "backends": [backendStatus(pool, backend) for backend in pool.backends],
    }


def _portOf(service: Any, site: Any, index: int) -> Any:
    sites = list(getattr(service, "sites", ()))
    ports = list(getattr(service, "ports", ()))
    for port in ports:
        factory = getattr(port, "factory", None)
        # A TLS listener's port serves the TLSMemoryBIOFactory wrapping the site.
        if factory is site or getattr(factory, "wrappedFactory", None) is site:
            return port
    # Ports that do not say what they serve: the service keeps them in the
    # order of its sites.
    if len(ports) == len(sites):
        return ports[index]
    return None


def listenerStatus(service: Any) -> list[dict[str, Any]]:
    """The C{listeners} of C{/status}: one per listener site."""
    listeners = []
    for index, site in enumerate(getattr(service, "sites", ())):
        listener = site.listener
        port = _portOf(service, site, index)
        listeners.append({
            "name": listener.name,
            "endpoint": listener.endpoint,
            "tls": listener.tls,
            "address": None if port is None else formatAddress(port.getHost()),
            "connections": len(site.channels),
            "in_flight": len(site.inflight),
        })
    return listeners


def _isoUTC(when: datetime.datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def certificateStatus(store: Any, now: float, acme: Any = None) -> list[dict[str, Any]]:
    """
    The C{certificates} of C{/status}: every certificate served, with where
    it came from (C{file} or C{acme}), its issuer, its renewal (ACME) and
    its OCSP staple.
    """
    if store is None:
        return []
    stapler = getattr(store, "ocsp", None)
    documents = []
    for entry in store.current.entries:
        document: dict[str, Any] = {
            "names": list(entry.names),
            "file": entry.path,
            "source": getattr(entry, "source", "file"),
            "issuer": entry.certificate.issuer.rfc4514_string(),
            "default": entry.isDefault,
            "not_after": _isoUTC(entry.notAfter),
            "not_after_timestamp": entry.notAfter.timestamp(),
            "expires_in_days": round(entry.secondsLeft(now) / 86400.0, 2),
            "next_renewal": None,
            "last_error": None,
            "ocsp": None if stapler is None else stapler.status(entry, now),
        }
        state = None if acme is None else acme.statusFor(entry)
        if state is not None:
            document["next_renewal"] = state["next_renewal"]
            document["last_error"] = state["last_error"]
        documents.append(document)
    return documents


def acmeStatus(acme: Any) -> dict[str, Any] | None:
    """The C{acme} of C{/status}: the directory and every managed name."""
    if acme is None:
        return None
    return {
        "directory": acme.settings.directory,
        "storage": acme.settings.storage,
        "names": [state.status() for state in acme.states.values()],
    }


def statusDocument(service: Any, now: float | None = None) -> dict[str, Any]:
    """
    The C{GET /status} document of C{service} (an
    L{edgeproxy.serve.service.EdgeService} or anything with the same attributes),
    built from the live objects.  Its shape is documented in
    C{docs/operations.rst} ("Admin API").

    @param now: POSIX time for the certificates' C{expires_in_days}
        (default: the wall clock).
    """
    if now is None:
        now = time.time()
    runtime = service.currentRuntime()
    return {
        "version": edgeproxy.__version__,
        "pid": os.getpid(),
        "started": getattr(service, "startedAt", None),
        "workers": service.config.proxy.workers,
        "listeners": listenerStatus(service),
        "certificates": certificateStatus(getattr(service, "store", None), now, getattr(service, "acme", None)),
        "acme": acmeStatus(getattr(service, "acme", None)),
        "upstreams": {name: upstreamStatus(pool) for name, pool in runtime.pools.items()},
        "cache": _cacheStatus(runtime),
    }


def _cacheStatus(runtime: Any) -> dict[str, Any] | None:
    from edgeproxy.cache.operate import statusOf

    return statusOf(runtime)


# The scrape-time gauges -------------------------------------------------


def stateSamples(service: Any) -> Iterator[StateSample]:
    """
    The gauges of the live state, for L{edgeproxy.metrics.Metrics.setStateSource}
    (names without the C{edgeproxy_} prefix).
    """
    yield ("info", "Always 1; the version in a label.", {"version": edgeproxy.__version__}, 1.0)
    started = getattr(service, "startedAt", None)
    if started is not None:
        yield ("start_time_seconds", "POSIX time the proxy started.", {}, float(started))
    for site in getattr(service, "sites", ()):
        labels = {"listener": site.listener.name}
        yield ("connections_active", "Open client connections, by listener.",
               labels, float(len(site.channels)))
        yield ("requests_in_flight", "Requests received and not yet answered, by listener.",
               labels, float(len(site.inflight)))
    for name, pool in service.currentRuntime().pools.items():
        for backend in pool.backends:
            labels = {"upstream": name, "backend": backend.address}
            for state in BackendState:
                yield (
                    "backend_state",
                    "1 for the state a backend is in, 0 for the others.",
                    {**labels, "state": state.value},
                    1.0 if backend.state is state else 0.0,
                )
            yield ("backend_in_flight", "Requests in flight to a backend.",
                   labels, float(_inFlight(pool, backend)))
            yield ("backend_ejected", "1 while passive health keeps a backend ejected.",
                   labels, 0.0 if backend.ejectedUntil is None else 1.0)
    from edgeproxy.cache.operate import samples as cacheSamples

    yield from cacheSamples(service.currentRuntime())
    store = getattr(service, "store", None)
    if store is not None:
        for entry in store.current.entries:
            for certificateName in entry.names:
                yield (
                    "certificate_expiry_timestamp_seconds",
                    "POSIX time a served certificate expires, by name and file.",
                    {"name": certificateName, "file": entry.path},
                    entry.notAfter.timestamp(),
                )


# The HTTP side ------------------------------------------------------------


def _isLocalName(host: bytes) -> bool:
    """
    Whether a C{Host} value names this machine without DNS: an IP literal,
    C{localhost} or a C{.localhost} name (RFC 6761 §6.3), with or without a
    port.
    """
    text = host.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        name = text[1:].partition("]")[0]
    else:
        name = text.rpartition(":")[0] if text.count(":") == 1 else text
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _rebindingRefused(request: Any) -> bool:
    """
    On a loopback admin listener, refuse a C{Host} that is a DNS name.

    A web page can make a browser on this machine send requests to
    127.0.0.1 under a name its attacker controls (DNS rebinding), and read
    the answers as same-origin.  Real clients of a loopback listener (curl,
    a local Prometheus or agent) name it by address or C{localhost}; only
    such a rebound page uses another name.  Listeners on other addresses
    are not reachable that way and accept any C{Host}.
    """
    local = getattr(request.getHost(), "host", None)
    try:
        loopback = ipaddress.ip_address(local).is_loopback  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False  # a UNIX socket: no browser reaches it
    host = request.getHeader(b"host")
    return loopback and host is not None and not _isLocalName(host)


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _json(request: Any, status: int, document: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, indent=1, sort_keys=False).encode("ascii") + b"\n"


def _peer(request: Any) -> str:
    return formatAddress(request.getClientAddress()) or "?"


class AdminResource(Resource):
    """
    Every path of the admin listener.

    @ivar service: the service whose state is shown and acted on.
    """

    isLeaf = True

    def __init__(self, service: Any, clock: Any) -> None:
        super().__init__()
        self.service = service
        self._clock = clock

    def render(self, request: Any) -> bytes:
        # The proxy's listeners send no Server header; nor does this one.
        request.responseHeaders.removeHeader(b"server")
        try:
            segments = [unquote(s, errors="strict") for s in request.path.decode("ascii").split("/")[1:]]
        except UnicodeError:
            segments = []
        try:
            if _rebindingRefused(request):
                log.warn(
                    "admin: refused {method} {path} from {peer} for Host {host}"
                    " (a loopback admin listener answers only IP addresses and localhost)",
                    method=request.method.decode("ascii", "replace"),
                    path=request.path.decode("ascii", "replace"),
                    peer=_peer(request),
                    host=(request.getHeader(b"host") or b"").decode("ascii", "replace"),
                )
                raise _Refused(403, "this admin listener answers only Host localhost or an IP address")
            if segments == ["status"]:
                self._allow(request, b"GET", b"HEAD")
                # A workers' supervisor asks its workers first (see
                # edgeproxy.serve.aggregate): the answer comes later.
                aggregate = getattr(self.service, "aggregateStatus", None)
                if aggregate is not None:
                    return self._later(
                        request, aggregate(self._clock.seconds()), lambda d: _json(request, 200, d)
                    )
                return _json(request, 200, statusDocument(self.service, self._clock.seconds()))
            if segments == ["metrics"]:
                self._allow(request, b"GET", b"HEAD")
                request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
                request.setHeader(b"cache-control", b"no-store")
                aggregate = getattr(self.service, "aggregateMetrics", None)
                if aggregate is not None:
                    return self._later(request, aggregate(), lambda body: body)
                return self.service.metrics.exposition()
            if segments == ["cache", "purge"]:
                self._allow(request, b"POST")
                self._authorize(request)
                return self._purgeCache(request)
            if (
                len(segments) == 5
                and segments[0] == "upstreams"
                and segments[2] == "backends"
                and segments[4] in ACTIONS
            ):
                self._allow(request, b"POST")
                self._authorize(request)
                return self._act(request, segments[1], segments[3], segments[4])
            raise _Refused(404, "not found")
        except _Refused as refused:
            for name, value in refused.headers.items():
                request.setHeader(name, value)
            return _json(request, refused.status, {"error": str(refused)})
        except Exception:
            log.failure("admin: {method} {path} failed", method=request.method.decode("ascii", "replace"),
                        path=request.path.decode("ascii", "replace"))
            return _json(request, 500, {"error": "internal error, see the log"})

    def _later(self, request: Any, result: Deferred[Any], render: Any) -> Any:
        """
        Answer C{request} with C{render(value)} once C{result} fires with
        the value (500 if it fails; nothing if the client went away).
        """
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def write(value: Any) -> None:
            if gone:
                return
            try:
                body = render(value)
            except Exception:
                log.failure("admin: rendering {path} failed", path=request.path.decode("ascii", "replace"))
                body = _json(request, 500, {"error": "internal error, see the log"})
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("admin: {path} failed", failure, path=request.path.decode("ascii", "replace"))
            if not gone:
                body = _json(request, 500, {"error": "internal error, see the log"})
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
                request.finish()

        result.addCallbacks(write, failed)
        return server.NOT_DONE_YET

    def _allow(self, request: Any, *methods: bytes) -> None:
        if request.method not in methods:
            raise _Refused(405, "method not allowed", {b"allow": b", ".join(methods)})

    def _authorize(self, request: Any) -> None:
        token = self.service.config.proxy.admin_token
        if token is None:
            log.warn(
                "admin: {peer} asked for {path}: admin actions are off (no admin_token)",
                peer=_peer(request), path=request.path.decode("ascii", "replace"),
            )
            raise _Refused(403, "admin actions are off: no admin_token is configured")
        # RFC 6750 §3: the challenge, on a missing or a wrong token alike.
        challenge = {b"www-authenticate": b'Bearer realm="edgeproxy admin"'}
        presented = request.getHeader(b"authorization")
        scheme, _, credentials = (presented or b"").partition(b" ")
        # RFC 9110 §11.1: the scheme is case-insensitive.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(
            credentials.strip(), token.encode("ascii")
        ):
            log.warn(
                "admin: {peer} refused for {path}: {why}",
                peer=_peer(request),
                path=request.path.decode("ascii", "replace"),
                why="no bearer token" if presented is None else "wrong token",
            )
            raise _Refused(401, "a valid bearer token is required", challenge)

    def _purgeCache(self, request: Any) -> Any:
        """C{POST /cache/purge?url=|prefix=|tag=[&soft=1]} (L{edgeproxy.cache.operate})."""
        from edgeproxy.cache.operate import adminPurge, parsePurge

        try:
            arguments = {
                key.decode("utf-8"): [value.decode("utf-8") for value in values]
                for key, values in request.args.items()
            }
            purge = parsePurge(arguments)
        except (UnicodeDecodeError, ValueError) as e:
            raise _Refused(400, str(e)) from None
        log.info(
            "admin: {peer} purges the cache: {kind} {value}",
            peer=_peer(request), kind=purge.kind, value=purge.value.decode("latin-1"),
        )
        return self._later(request, adminPurge(self.service, purge), lambda d: _json(request, 200, d))

    def _act(self, request: Any, upstreamName: str, address: str, action: str) -> bytes:
        pool = self.service.currentRuntime().pools.get(upstreamName)
        if pool is None:
            raise _Refused(404, f"no upstream {upstreamName}")
        backend = next((b for b in pool.backends if b.address == address), None)
        if backend is None:
            raise _Refused(404, f"no backend {address} in upstream {upstreamName}")
        peer = _peer(request)
        state = ACTIONS[action]
        reason = f"admin: {action} by {peer}"
        before = backend.state
        if state is None:
            health.enable(pool, backend, reason)
        else:
            health.transition(pool, backend, state, reason)
        log.info(
            "admin: {peer} {action} backend {backend} of upstream {upstream}: {old} -> {new}",
            peer=peer, action=action, backend=address, upstream=upstreamName,
            old=before.value, new=backend.state.value,
        )
        return _json(request, 200, backendStatus(pool, backend))


class _AdminRequest(server.Request):
    """A request whose body may not exceed L{MAX_BODY_SIZE} (chunked ones
    are counted as they arrive)."""

    _bodySize = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._bodySize += len(data)
        if self._bodySize > MAX_BODY_SIZE:
            channel = self.channel
            if channel is not None and not getattr(channel, "_refused", False):
                channel.refuse(413, b"Content Too Large")
            return
        super().handleContentChunk(data)


class _AdminChannel(http.HTTPChannel):
    """
    Twisted's HTTP/1.1 channel with small limits and a deadline for each
    request head (Twisted's own idle timeout restarts on every byte, so a
    client trickling a head would hold a connection forever).
    """

    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_SIZE
    MAX_LENGTH = MAX_HEADER_SIZE
    _deadline: Any = None
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        self._deadline = self.callLater(HEADER_TIMEOUT, self.refuse, 408, b"Request Timeout")

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def lineReceived(self, line: bytes) -> None:
        if self._deadline is None:
            # The first line of the next request on a kept-alive connection.
            self._arm()
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver would close without a word.
        self.refuse(431, b"Request Header Fields Too Large")

    def allHeadersReceived(self) -> None:
        self._disarm()
        if self.length is not None and self.length > MAX_BODY_SIZE:
            self.refuse(413, b"Content Too Large")
            return
        super().allHeadersReceived()

    def refuse(self, status: int, phrase: bytes) -> None:
        """Answer with C{status} outside any request, and close."""
        self._disarm()
        if self._refused:
            return
        self._refused = True
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (status, phrase)
        )
        self.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)


class AdminSite(server.Site):
    """
    The site of the admin listener.

    @ivar channels: the connections open now (at most L{MAX_CONNECTIONS}).
    """

    protocol = _AdminChannel
    requestFactory = _AdminRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, service: Any, reactor: Any) -> None:
        super().__init__(AdminResource(service, reactor), timeout=IDLE_TIMEOUT, reactor=reactor)
        self.requestFactory = _AdminRequest
        self.channels: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.channels) >= MAX_CONNECTIONS:
            log.warn(
                "admin: connection from {peer} refused: {count} admin connections open",
                peer=formatAddress(addr), count=len(self.channels),
            )
            return None
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        connectionLost = channel.connectionLost

        def lost(reason: Any) -> None:
            self.channels.discard(channel)
            connectionLost(reason)

        channel.connectionLost = lost
        return channel

    def log(self, request: Any) -> None:
        # Scrapes every few seconds are not worth a line each; actions and
        # refusals are logged by AdminResource.
        pass

    def startFactory(self) -> None:
        # No once-a-second timestamp timer: log() writes nothing.
        pass

    def stopFactory(self) -> None:
        pass


def listenAdmin(service: Any, reactor: Any, description: str) -> Deferred[IListeningPort]:
    """
    Listen with a new L{AdminSite} for C{service} on the server endpoint
    C{description} (C{[edgeproxy] admin}).

    @return: fires with the port, or fails with why it cannot listen.
    """
    site = AdminSite(service, reactor)
    return maybeDeferred(lambda: serverFromString(reactor, description).listen(site))
