# -*- test-case-name: tests.test_admin -*-
"""
L{AdminResource}: every path of the admin listener.

C{GET /status} and C{GET /metrics} (from the supervisor's aggregates when
it has workers), C{POST /cache/purge} and the backend actions (L{ACTIONS}:
C{POST /upstreams/NAME/backends/ADDRESS/drain}...), the latter two behind
the bearer token of C{[edgeproxy] admin_token}.  A loopback listener
refuses a C{Host} that is a DNS name (DNS rebinding).  Actions and
refusals are logged; scrapes are not.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from edgeproxy.admin.status import backendStatus, statusDocument
from edgeproxy.logs import formatAddress
from edgeproxy.metrics import CONTENT_TYPE
from edgeproxy.upstream import health
from edgeproxy.upstream.backend import BackendState

__all__ = ["ACTIONS", "AdminResource"]

# The admin listener's namespace, as its other lines.
log = Logger(namespace="edgeproxy.admin")

ACTIONS: dict[str, BackendState | None] = {
    "drain": BackendState.DRAINING,
    "disable": BackendState.DISABLED,
    "enable": None,
}
"""The admin actions and the state each enters (C{enable}: back to what
health checking says)."""


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
