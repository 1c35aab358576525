# -*- test-case-name: tests.test_health -*-
"""
Backend health: the state transitions of every backend, the active health
checker and passive ejection.

  - L{transition} is the only way a L{Backend}'s state changes, whoever
    decides it (a health verdict, an admin action, a supervisor's verdict
    in workers mode): it logs, counts, starts slow start and tells the
    pool's observers.
  - L{HealthChecker} sends C{GET health_path} to every backend of one
    upstream every C{health_interval} (with jitter) over the same kind of
    connection as traffic, and turns C{rise}/C{fall} runs of results into
    verdicts.
  - L{PassiveHealth} counts the failures of real traffic and ejects a
    backend for C{eject_time} (doubling on repeated ejection, capped at
    C{eject_max_time}) after C{max_fails} within C{fail_window}.
  - L{availability} is the predicate the balancer picks by: up and not
    ejected, or unknown while no backend of the upstream is up (fail open
    at start, before the first checks answered).

Health and administration are kept apart: a backend's health verdict
(C{unknown}, C{up}, C{down}) is remembered in C{backend.extra["health"]}
even while an administrative state (C{draining}, C{disabled}) is what it
shows, so L{enable} can put it back where its health says.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol as _Protocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from edgeproxy.config.model import Upstream
from edgeproxy.h1 import RemoteProtocolError, parseResponseHead, splitResponseHead
from edgeproxy.metrics import Metrics
from edgeproxy.upstream.backend import Backend, BackendState, CheckResult

__all__ = [
    "HEALTH_STATES",
    "ADMIN_STATES",
    "HealthChecker",
    "PassiveHealth",
    "availability",
    "checkHost",
    "checkRequest",
    "describeFailure",
    "enable",
    "healthState",
    "initialState",
    "transition",
]

log = Logger()

HEALTH_STATES = frozenset({BackendState.UNKNOWN, BackendState.UP, BackendState.DOWN})
"""States a health verdict sets."""

ADMIN_STATES = frozenset({BackendState.DRAINING, BackendState.DISABLED})
"""States only an administrator (or the C{down} server option) sets; health
verdicts never move a backend out of them."""

_HEALTH = "health"
"""C{backend.extra} key of the last health verdict (a L{BackendState})."""

MAX_HEAD = 16 * 1024
"""The most bytes of a check's response head read before giving up."""


class _Pool(Protocol):
    """What this module uses of an L{edgeproxy.upstream.pool.UpstreamPool}."""

    upstream: Upstream
    backends: tuple[Backend, ...]
    metrics: Metrics
    observers: list[Callable[[Backend], None]]

    def endpointFor(self, server: Backend) -> IStreamClientEndpoint: ...


# Transitions -------------------------------------------------------------------


def initialState(upstream: Upstream) -> BackendState:
    """
    @return: the state a new backend of C{upstream} starts in: L{UP
        <BackendState.UP>} without active checks or with C{health_initial =
        up}, else L{UNKNOWN <BackendState.UNKNOWN>}.
    """
    if upstream.health_path is None or upstream.health_initial == "up":
        return BackendState.UP
    return BackendState.UNKNOWN


def healthState(pool: _Pool, backend: Backend) -> BackendState:
    """
    @return: what health says of C{backend}, whatever it shows: its last
        verdict, else L{initialState}; always L{UP <BackendState.UP>} for an
        upstream without active checks.
    """
    if pool.upstream.health_path is None:
        return BackendState.UP
    verdict = backend.extra.get(_HEALTH)
    if isinstance(verdict, BackendState):
        return verdict
    return initialState(pool.upstream)


def transition(
    pool: _Pool,
    backend: Backend,
    state: BackendState,
    reason: str,
    *,
    health: bool = False,
    logged: bool = True,
) -> None:
    """
    Move C{backend} to C{state}: the only way a backend's state changes.

    Logs one line (upstream, backend, old and new state, reason), counts
    C{edgeproxy_backend_transitions}, starts slow start when the backend
    becomes available again, then calls every C{pool.observers} callable
    with the backend.  Nothing of that happens when the state is unchanged
    (only C{backend.reason} is updated).

    @param state: the new state.  A health state (C{unknown}, C{up},
        C{down}) is also remembered as the backend's health verdict.
    @param reason: why, for the log and C{/status}.
    @param health: C{True} for the verdicts of this process's own health
        checks: they do not move a backend out of an administrative state
        (C{draining}, C{disabled}), they are only remembered for L{enable}.
        Everything else (an admin action, a supervisor's verdict) is
        authoritative.
    @param logged: C{False} for a verdict a supervisor decided and logged
        already: a worker applying it would repeat the line once per worker.
    """
    if state in HEALTH_STATES:
        backend.extra[_HEALTH] = state
        if health and backend.state in ADMIN_STATES:
            log.debug(
                "upstream {upstream} backend {backend} health {verdict} ({reason}), "
                "stays {state}",
                upstream=pool.upstream.name,
                backend=backend.address,
                verdict=state.value,
                reason=reason,
                state=backend.state.value,
            )
            return
    old = backend.state
    backend.reason = reason
    if old is state:
        return
    backend.state = state
    if logged:
        emit = log.warn if state is BackendState.DOWN else log.info
        emit(
            "upstream {upstream} backend {backend}: {old} -> {new} ({reason})",
            upstream=pool.upstream.name,
            backend=backend.address,
            old=old.value,
            new=state.value,
            reason=reason,
        )
    metrics = _metrics(pool)
    if metrics is not None:
        metrics.backendTransition(pool.upstream.name, backend.address, state.value)
    # "Becomes available again": a first verdict (from unknown) is not a
    # recovery; an upstream starting up has nothing to protect it from.
    if state is BackendState.UP and old is not BackendState.UNKNOWN:
        backend.startSlowStart(pool.upstream.slow_start)
    if state is BackendState.UP and old is BackendState.DOWN:
        # Health checks have seen it recover since whatever got it
        # ejected (Envoy's successful_active_health_check_uneject_host).
        passive = getattr(pool, "passive", None)
        if isinstance(passive, PassiveHealth):
            passive.readmit(backend, reason)
    _notify(pool, backend)


def _metrics(pool: _Pool) -> Metrics | None:
    # A pool-like object without metrics (a test's, an older pool) still
    # gets its transitions; it just is not counted.
    return getattr(pool, "metrics", None)


def _notify(pool: _Pool, backend: Backend) -> None:
    for observer in list(getattr(pool, "observers", ())):
        try:
            observer(backend)
        except Exception:
            # One broken observer must not stop the others nor the caller
            # (a health check or an admin request).
            log.failure(
                "observer {observer} failed for backend {backend}",
                observer=observer,
                backend=backend.address,
            )


def enable(pool: _Pool, backend: Backend, reason: str = "admin: enable") -> None:
    """
    The admin action C{enable}: end C{draining} or C{disabled} and show
    what health says (L{healthState}).  A backend in a health state is left
    alone.
    """
    if backend.state in ADMIN_STATES:
        transition(pool, backend, healthState(pool, backend), reason)


def availability(pool: _Pool) -> Callable[[Backend], bool]:
    """
    The balancer's predicate for C{pool}'s backends (its C{available=}).

    A backend is available when it is up and not ejected.  An unknown
    backend (not checked yet) is available, unless ejected, only while no
    backend of the upstream is up and not ejected: at start every backend
    is unknown for the few milliseconds the first checks take, and they all
    take traffic rather than none; once one has passed, the unknown ones
    wait for their own verdict.
    """

    def available(backend: Backend) -> bool:
        if backend.ejectedUntil is not None:
            return False
        state = backend.state
        if state is BackendState.UP:
            return True
        if state is not BackendState.UNKNOWN:
            return False
        for other in pool.backends:
            if other.state is BackendState.UP and other.ejectedUntil is None:
                return False
        return True

    return available


# Passive health ---------------------------------------------------------------

_FAILURES = "passive.failures"
_STREAK = "passive.streak"
_LAST_END = "passive.lastEnd"
_LAST_LENGTH = "passive.lastLength"


class PassiveHealth:
    """
    Ejection of backends by the results of real traffic (C{max_fails}
    failures within C{fail_window}).

    Never ejects the last backend of an upstream that could take traffic:
    failures counted from traffic may come from the requests themselves (a
    C{fail_status} a bad request provokes), and turning a partial failure
    into every request getting 503 helps nobody (Envoy's
    C{max_ejection_percent} and nginx's reset of an all-failed upstream do
    the same).  The active checker still takes such a backend down.
    """

    def __init__(self, pool: _Pool, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock
        self._timers: dict[Backend, IDelayedCall] = {}

    def failure(self, backend: Backend, reason: str) -> None:
        """
        A request to C{backend} failed: connect failure, reset, timeout,
        unparseable response.
        """
        upstream = self._pool.upstream
        if upstream.max_fails <= 0 or backend.ejectedUntil is not None:
            return
        if backend.state not in (BackendState.UP, BackendState.UNKNOWN):
            return  # takes no new requests anyway: an in-flight one ending
        now = self._clock.seconds()
        failures = backend.extra.get(_FAILURES)
        if not isinstance(failures, deque):
            failures = backend.extra[_FAILURES] = deque()
        failures.append(now)
        while failures and failures[0] <= now - upstream.fail_window:
            failures.popleft()
        if len(failures) < upstream.max_fails:
            return
        failures.clear()
        if not self._othersAvailable(backend):
            log.warn(
                "upstream {upstream} backend {backend}: {count} failures within "
                "{window} (last: {reason}), not ejected: it is the last "
                "available backend",
                upstream=upstream.name,
                backend=backend.address,
                count=upstream.max_fails,
                window=_seconds(upstream.fail_window),
                reason=reason,
            )
            return
        self._eject(backend, now, reason)

    def responded(self, backend: Backend, status: int) -> None:
        """
        C{backend} answered a response head with C{status}: a failure when
        C{status} is in C{fail_status}.
        """
        if status in self._pool.upstream.fail_status:
            self.failure(backend, f"status {status}")

    def readmit(self, backend: Backend, why: str) -> None:
        """
        End C{backend}'s ejection now (L{transition} does when health
        checks bring it back up); nothing when it is not ejected.
        """
        if backend.ejectedUntil is None:
            return
        timer = self._timers.pop(backend, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._readmit(backend, why)

    def stop(self) -> None:
        """Cancel the timers ending ejections (a retired pool)."""
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def _othersAvailable(self, backend: Backend) -> bool:
        return any(
            other is not backend
            and other.ejectedUntil is None
            and other.state in (BackendState.UP, BackendState.UNKNOWN)
            for other in self._pool.backends
        )

    def _eject(self, backend: Backend, now: float, reason: str) -> None:
        upstream = self._pool.upstream
        lastEnd = backend.extra.get(_LAST_END)
        lastLength = backend.extra.get(_LAST_LENGTH)
        streak = 0
        if isinstance(lastEnd, float) and isinstance(lastLength, float):
            # "Without a healthy period in between": back in service for
            # less time than it was last kept out.
            if now - lastEnd < lastLength:
                streak = int(backend.extra.get(_STREAK, 0)) + 1  # type: ignore[call-overload]
        length = float(upstream.eject_time)
        for _ in range(streak):
            if length >= upstream.eject_max_time:
                break
            length *= 2
        length = min(length, max(upstream.eject_max_time, upstream.eject_time))
        backend.extra[_STREAK] = streak
        backend.extra[_LAST_LENGTH] = length
        backend.ejectedUntil = now + length
        backend.ejections += 1
        metrics = _metrics(self._pool)
        if metrics is not None:
            metrics.ejected(upstream.name, backend.address)
        log.warn(
            "upstream {upstream} backend {backend} ejected for {length}: {count} "
            "failures within {window}, last: {reason}",
            upstream=upstream.name,
            backend=backend.address,
            length=_seconds(length),
            count=upstream.max_fails,
            window=_seconds(upstream.fail_window),
            reason=reason,
        )
        self._timers[backend] = self._clock.callLater(length, self._readmit, backend)

    def _readmit(self, backend: Backend, why: str | None = None) -> None:
        self._timers.pop(backend, None)
        backend.ejectedUntil = None
        backend.extra[_LAST_END] = float(self._clock.seconds())
        backend.startSlowStart(self._pool.upstream.slow_start)
        if why is None:
            log.info(
                "upstream {upstream} backend {backend}: ejection over after {length}",
                upstream=self._pool.upstream.name,
                backend=backend.address,
                length=_seconds(float(backend.extra.get(_LAST_LENGTH, 0.0))),  # type: ignore[arg-type]
            )
        else:
            log.info(
                "upstream {upstream} backend {backend}: ejection ended early ({why})",
                upstream=self._pool.upstream.name,
                backend=backend.address,
                why=why,
            )


# Active health checks ------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:g}s"


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
        return f"timeout after {_seconds(timeout)}"
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
        if found is None:
            return
        try:
            status = parseResponseHead(found[0]).status
        except RemoteProtocolError as error:
            return self._fail(BadResponse(f"invalid response head: {error}"))
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.status.callback(status)

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
        self, reactor: Any, pool: _Pool, rng: random.Random | None = None
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
        if _HEALTH in backend.extra:
            return  # known from before (a restarted checker, a reload)
        initial = initialState(self._pool.upstream)
        backend.extra[_HEALTH] = initial
        if backend.state not in ADMIN_STATES and backend.state is not initial:
            # Where checking starts, not a change of health: a pool makes its
            # backends up (right without checks), and a logged "up ->
            # unknown" per backend at every start would only puzzle.  Still
            # told to observers, so workers hear it like any state.
            backend.state = initial
            backend.reason = "not checked yet"
            _notify(self._pool, backend)

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

        attempt.addCallbacks(passed, failed)
        return attempt

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
        metrics = _metrics(self._pool)
        if metrics is not None:
            metrics.healthChecked(upstream.name, backend.address, result.ok)
        verdict = healthState(self._pool, backend)
        if result.ok:
            track.passes += 1
            track.fails = 0
            if verdict is BackendState.UNKNOWN:
                transition(self._pool, backend, BackendState.UP,
                           f"first check passed: {result.detail}", health=True)
            elif verdict is BackendState.DOWN and track.passes >= upstream.rise:
                transition(self._pool, backend, BackendState.UP,
                           f"{_count(track.passes, 'passing check')} in a row: "
                           f"{result.detail}", health=True)
        else:
            track.fails += 1
            track.passes = 0
            if verdict is BackendState.UNKNOWN:
                transition(self._pool, backend, BackendState.DOWN,
                           f"first check failed: {result.detail}", health=True)
            elif verdict is BackendState.UP and track.fails >= upstream.fall:
                transition(self._pool, backend, BackendState.DOWN,
                           f"{_count(track.fails, 'failed check')} in a row: "
                           f"{result.detail}", health=True)
        # A passing check is not logged: twistd shows every level, and a line
        # per backend every interval would bury the lines that matter (state
        # changes, above); /status and the metrics show every result.  A
        # failing one is, so the log explains a coming "down".
        if not result.ok and backend.state is BackendState.UP:
            log.info(
                "upstream {upstream} backend {backend} check failed"
                " ({fails} of {fall}): {detail}",
                upstream=upstream.name,
                backend=backend.address,
                fails=track.fails,
                fall=upstream.fall,
                detail=result.detail,
            )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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
