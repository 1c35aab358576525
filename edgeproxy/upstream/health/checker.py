# -*- test-case-name: tests.test_health -*-
"""
The active health checks: L{HealthChecker} sends C{GET health_path} to every
backend of one upstream every C{health_interval} (with jitter) over the same
kind of connection as traffic, and hands each result to the rise/fall rule
(L{edgeproxy.upstream.health.rules.judgeCheck}), whose verdicts it applies
with L{edgeproxy.upstream.health.state.transition}.

This module owns the checks' I/O: the request (L{checkRequest},
L{checkHost}), reading the response head (L{_HeadReader}), the timeout, and
the words a failed check is described with (L{describeFailure}).
"""

from __future__ import annotations

import random
from typing import Any

from OpenSSL import SSL
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory
from twisted.internet.protocol import Protocol as _Protocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from edgeproxy.config.model import Upstream
from edgeproxy.h1 import RemoteProtocolError, parseResponseHead, splitResponseHead
from edgeproxy.upstream.backend import Backend, CheckResult
from edgeproxy.upstream.health.rules import (
    ADMIN_STATES,
    CheckFailedWhileUp,
    CheckRun,
    Shown,
    Verdict,
    initialState,
    judgeCheck,
)
from edgeproxy.upstream.health.state import (
    Pool,
    formatSeconds,
    healthVerdictOf,
    metricsOf,
    notifyObservers,
    rememberHealth,
    transition,
)

__all__ = ["BadResponse", "HealthChecker", "checkHost", "checkRequest", "describeFailure"]

# One namespace for the lines of backend health, whichever module says them.
log = Logger(namespace="edgeproxy.upstream.health")

MAX_HEAD = 16 * 1024
"""The most bytes of a check's response head read before giving up."""


def checkHost(upstream: Upstream, backend: Backend) -> str:
    """
    @return: the C{Host} of C{backend}'s checks: C{health_host}, else
        C{host_header}, else C{server_name}, else the server's host, with
        the port unless it is the scheme's default (RFC 9110 §7.2).
    """
    if upstream.health_host:
        return upstream.health_host
    if upstream.host_header:
        return upstream.host_header
    name = upstream.server_name or backend.server.host
    if ":" in name:
        name = f"[{name}]"
    default = 443 if upstream.tls else 80
    return name if backend.port == default else f"{name}:{backend.port}"


def checkRequest(upstream: Upstream, backend: Backend) -> bytes:
    """@return: the bytes of one check's request to C{backend}."""
    assert upstream.health_path is not None
    return (
        b"GET " + upstream.health_path.encode("ascii") + b" HTTP/1.1\r\n"
        b"Host: " + checkHost(upstream, backend).encode("idna") + b"\r\n"
        b"Connection: close\r\n"
        b"User-Agent: edgeproxy-health\r\n"
        b"\r\n"
    )


class BadResponse(Exception):
    """The backend answered the check with something that is not a usable
    HTTP/1.x response head; the message is the check's detail."""


def describeFailure(failure: Failure, timeout: float) -> str:
    """
    @return: the detail of a failed check for logs and C{/status}:
        C{"timeout after 2s"}, C{"connection refused"}, C{"TLS: ..."},
        C{"DNS: ..."}...
    """
    value = failure.value
    if failure.check(TimeoutError):
        return f"timeout after {formatSeconds(timeout)}"
    if failure.check(BadResponse):
        return str(value)
    if failure.check(netError.ConnectionRefusedError):
        return "connection refused"
    if failure.check(netError.DNSLookupError):
        return f"DNS: {value}"
    if failure.check(netError.TimeoutError):
        return "connect timeout"
    if failure.check(CancelledError):
        return "check cancelled"
    if failure.check(SSL.Error):
        # pyOpenSSL: args[0] is OpenSSL's error queue, (library, function,
        # reason) tuples; the reasons say it ("certificate verify failed").
        queue = value.args[0] if value.args and isinstance(value.args[0], list) else []
        reasons = [str(entry[-1]) for entry in queue if isinstance(entry, tuple) and entry]
        return "TLS: " + ("; ".join(reasons) or str(value) or "handshake failed")
    if type(value).__module__.startswith("service_identity"):
        return "TLS: " + _mismatch(value)
    if failure.check(netError.ConnectionDone):
        return "connection closed before a response"
    if failure.check(netError.ConnectionLost):
        return "connection lost before a response"
    if failure.check(netError.ConnectError):
        return f"connect failed: {value}"
    return f"{type(value).__name__}: {value}"


def _mismatch(error: Exception) -> str:
    """
    service_identity's C{VerificationError} (the certificate is valid but
    not for the name verified) as C{certificate does not match NAME}.
    """
    names = []
    for mismatch in getattr(error, "errors", None) or ():
        identity = getattr(mismatch, "mismatched_id", None)
        name = getattr(identity, "hostname", None) or getattr(identity, "ip", None)
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if name is not None:
            names.append(str(name))
    if not names:
        return f"certificate verification failed: {error}"
    return "certificate does not match " + ", ".join(names)


class _HeadReader(_Protocol):
    """
    Sends one check request and reads the response head; whatever follows
    is discarded and the connection closed.
    """

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buffer = b""
        self.status: Deferred[int] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[int]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        self.transport.write(self._request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        # The head is read as every response is (edgeproxy.h1): a check
        # passes or fails on what traffic would see.
        if self.status.called:
            return
        self._buffer += data
        buffer = self._buffer
        try:
            found = splitResponseHead(buffer, MAX_HEAD)
        except RemoteProtocolError:
            return self._fail(BadResponse(f"response head larger than {MAX_HEAD} bytes"))
        lineEnd = buffer.find(b"\n")
        if lineEnd < 0:
            return
        line = buffer[:lineEnd].rstrip(b"\r")
        try:
            # What is not HTTP is refused from its first line on.
            parseResponseHead(line)
        except RemoteProtocolError:
            return self._fail(BadResponse(f"not an HTTP response: {line[:60]!r}"))
        while found is not None:
            try:
                status = parseResponseHead(found[0]).status
            except RemoteProtocolError as error:
                return self._fail(BadResponse(f"invalid response head: {error}"))
            if status >= 200 or status == 101:
                self.transport.loseConnection()  # type: ignore[union-attr]
                self.status.callback(status)
                return
            # An interim response (100, 103 Early Hints...) is passed over,
            # as traffic's reader does: the check is on the final status.
            buffer = self._buffer = buffer[found[1] :]
            try:
                found = splitResponseHead(buffer, MAX_HEAD)
            except RemoteProtocolError:
                return self._fail(BadResponse(f"response head larger than {MAX_HEAD} bytes"))

    def _fail(self, error: Exception) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.status.errback(error)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.status.called:
            self.status.errback(reason)


class _Track:
    """The checker's bookkeeping for one backend."""

    __slots__ = ("passes", "fails", "timer", "running")

    def __init__(self) -> None:
        self.passes = 0
        self.fails = 0
        self.timer: IDelayedCall | None = None
        self.running: Deferred[CheckResult] | None = None


class HealthChecker:
    """
    The active health checks of one upstream (C{health_path} set).

    Follows C{pool.backends}: a backend that appears (DNS) is checked at
    once, one that leaves is no longer checked.  L{backendsChanged} makes
    that immediate; without it the set is looked at again after every
    check.
    """

    def __init__(
        self, reactor: Any, pool: Pool, rng: random.Random | None = None
    ) -> None:
        """
        @param reactor: provides C{IReactorTime} (and is what the pool's
            endpoints connect with).
        @param rng: the jitter's randomness (tests seed it).
        """
        if pool.upstream.health_path is None:
            raise ValueError(f"upstream {pool.upstream.name} has no health_path")
        self._reactor = reactor
        self._pool = pool
        self._random = rng if rng is not None else random.Random()
        self._tracks: dict[Backend, _Track] = {}
        self._running = False

    def start(self) -> None:
        """Check every backend at once, then every C{health_interval} ± 10%."""
        self._running = True
        self.backendsChanged()

    def stop(self) -> Deferred[None]:
        """
        Cancel the timers and the checks in progress.

        @return: fires when every check in progress has ended.
        """
        self._running = False
        tracks = list(self._tracks.values())
        self._tracks.clear()
        for track in tracks:
            # A cancelled check's Deferred fires at once (its connection is
            # aborted), so nothing is left running when this returns.
            self._cancelTrack(track)
        return succeed(None)

    def backendsChanged(self) -> None:
        """
        Follow C{pool.backends}: start checking new backends at once, stop
        checking removed ones.
        """
        if not self._running:
            return
        current = self._pool.backends
        kept = set(current)
        for backend in [b for b in self._tracks if b not in kept]:
            self._cancelTrack(self._tracks.pop(backend))
        for backend in current:
            if backend not in self._tracks:
                self._tracks[backend] = _Track()
                self._initialise(backend)
                self._runCheck(backend)

    def _cancelTrack(self, track: _Track) -> None:
        if track.timer is not None and track.timer.active():
            track.timer.cancel()
        track.timer = None
        running, track.running = track.running, None
        if running is not None:
            running.cancel()

    def _initialise(self, backend: Backend) -> None:
        if healthVerdictOf(backend) is not None:
            return  # known from before (a restarted checker, a reload)
        initial = initialState(self._pool.upstream)
        rememberHealth(backend, initial)
        if backend.state not in ADMIN_STATES and backend.state is not initial:
            # Where checking starts, not a change of health: a pool makes its
            # backends up (right without checks), and a logged "up ->
            # unknown" per backend at every start would only puzzle.  Still
            # told to observers, so workers hear it like any state.
            backend.state = initial
            backend.reason = "not checked yet"
            notifyObservers(self._pool, backend)

    # One check -------------------------------------------------------------

    def check(self, backend: Backend) -> Deferred[CheckResult]:
        """
        Check C{backend} once, bounded by C{health_timeout} (connect, TLS
        and response head).

        @return: fires with the result (never fails); cancelling it aborts
            the check.
        """
        upstream = self._pool.upstream
        started = self._reactor.seconds()
        reader = _HeadReader(checkRequest(upstream, backend))

        async def probe() -> int:
            endpoint = self._pool.endpointFor(backend)
            await endpoint.connect(_OneProtocolFactory(reader))
            return await reader.status

        def timedOut(result: object, timeout: float) -> object:
            # Cancelling a connection attempt fails with
            # ConnectingCancelledError rather than CancelledError, which
            # addTimeout's default translation does not recognise.
            if isinstance(result, Failure):
                return Failure(TimeoutError(f"no response head within {timeout}s"))
            return result

        attempt = Deferred.fromCoroutine(probe())
        attempt.addTimeout(upstream.health_timeout, self._reactor, onTimeoutCancel=timedOut)

        def passed(status: int) -> CheckResult:
            ok = any(low <= status <= high for low, high in upstream.health_status)
            return CheckResult(
                ok,
                self._reactor.seconds(),
                str(status) if ok else f"status {status}",
                self._reactor.seconds() - started,
            )

        def failed(failure: Failure) -> CheckResult:
            return CheckResult(
                False,
                self._reactor.seconds(),
                describeFailure(failure, upstream.health_timeout),
                self._reactor.seconds() - started,
            )

        return attempt.addCallbacks(passed, failed)

    def _runCheck(self, backend: Backend) -> None:
        track = self._tracks.get(backend)
        if track is None or not self._running:
            return
        track.timer = None
        started = self._reactor.seconds()
        attempt = track.running = self.check(backend)

        def done(result: CheckResult) -> None:
            if self._tracks.get(backend) is not track or track.running is not attempt:
                return  # stopped, or the backend left the pool meanwhile
            track.running = None
            self._record(backend, track, result)
            self.backendsChanged()
            if self._tracks.get(backend) is track:
                interval = self._pool.upstream.health_interval
                jitter = self._random.uniform(-0.1, 0.1) * interval
                # The cadence counts from the start of a check, so a slow
                # answer does not stretch the interval.
                delay = max(0.0, interval + jitter - (self._reactor.seconds() - started))
                track.timer = self._reactor.callLater(delay, self._runCheck, backend)

        attempt.addCallback(done)
        attempt.addErrback(
            lambda f: log.failure(
                "recording the health check of {backend} failed", f, backend=backend.address
            )
        )

    def _record(self, backend: Backend, track: _Track, result: CheckResult) -> None:
        upstream = self._pool.upstream
        backend.lastCheck = result
        metrics = metricsOf(self._pool)
        if metrics is not None:
            metrics.healthChecked(upstream.name, backend.address, result.ok)
        before = Shown(backend.state, healthVerdictOf(backend), backend.reason)
        run, effects = judgeCheck(before, CheckRun(track.passes, track.fails), result, upstream)
        track.passes, track.fails = run.passes, run.fails
        for effect in effects:
            if isinstance(effect, Verdict):
                transition(self._pool, backend, effect.state, effect.reason, health=True)
            elif isinstance(effect, CheckFailedWhileUp):
                log.info(
                    "upstream {upstream} backend {backend} check failed"
                    " ({fails} of {fall}): {detail}",
                    upstream=upstream.name,
                    backend=backend.address,
                    fails=effect.fails,
                    fall=effect.fall,
                    detail=effect.detail,
                )


@implementer(IProtocolFactory)
class _OneProtocolFactory:
    """A client factory handing out one given protocol (what
    C{connectProtocol} does, kept here to keep the protocol object)."""

    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> _Protocol:
        return self._protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass
