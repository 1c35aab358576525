# -*- test-case-name: tests.test_backend -*-
"""
L{Backend}: one address of an upstream that requests can be sent to, and
everything the proxy knows about it right now.

A C{servers =} entry of the configuration (a L{Server}) becomes one backend
per address: an IP literal is one backend, a host name is one backend per
address it resolves to (see L{edgeproxy.upstream.pool}).  A backend is the
unit that is balanced over, health-checked, ejected, drained, disabled,
counted in C{/status} and in the metrics.

This module is pure: no Twisted.  Time-dependent transitions (health
checks, ejection expiry) are driven by L{edgeproxy.upstream.health}, the
only module that changes L{Backend.state}; the slow-start weight is read
through the injected L{Backend.clock}.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeproxy.config.model import Server

__all__ = ["Backend", "BackendState", "CheckResult"]


class BackendState(enum.Enum):
    """
    The states C{/status} reports, part of its documented API.

    A backend that is not health-checked is L{UP} from the start.  A
    health-checked one starts L{UNKNOWN}.  L{DRAINING} and L{DISABLED} are
    administrative (the C{down} server option or an admin action) and win
    over whatever health checking concludes.
    """

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"
    DISABLED = "disabled"


@dataclass(slots=True)
class CheckResult:
    """The outcome of one active health check, as C{/status} shows it."""

    ok: bool
    at: float
    """POSIX time the check ended."""
    detail: str
    """C{"200"}, C{"timeout"}, C{"connection refused"}, C{"TLS: ..."}..."""
    duration: float = 0.0


@dataclass(eq=False, slots=True)
class Backend:
    """
    One dialable address of an upstream.

    Identity, not value, equality: two backends with the same address in
    different pools (or before and after a reload) are different objects
    with their own counters.

    @ivar server: the configuration entry this backend comes from.
    @ivar host: what is dialled: an IP literal once resolved, else the
        configured host name.
    @ivar port: the port dialled.
    @ivar state: see L{BackendState}.
    @ivar reason: why the backend is in its state (for logs and C{/status}).
    @ivar lastCheck: the last active health check, if any.
    @ivar ejectedUntil: POSIX time passive health ejection ends, or
        L{None} when not ejected.
    @ivar ejections: how many times passive health ejected this backend.
    """

    server: Server
    host: str
    port: int
    state: BackendState = BackendState.UP
    reason: str = ""
    lastCheck: CheckResult | None = None
    ejectedUntil: float | None = None
    ejections: int = 0
    clock: Callable[[], float] | None = None
    """The pool's C{reactor.seconds}, for time-dependent answers such as the
    slow-start weight; L{None} in tests that need no time."""
    slowStartAt: float | None = None
    """When the current slow start began (L{clock} time), or L{None}."""
    slowStartTime: float = 0.0
    """How long the current slow start lasts, in seconds."""
    extra: dict[str, object] = field(default_factory=dict)
    """Owners' extra per-backend bookkeeping (kept out of the fields above
    so this class stays the shared contract)."""
    address: str = field(init=False, default="")
    """C{host:port}, IPv6 in brackets: how logs, metrics and C{/status}
    name it (made once: it is read on every request)."""

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"{host}:{self.port}"
        if self.server.down:
            self.state = BackendState.DISABLED
            self.reason = "down in configuration"

    # What balancing needs (the same names as on Server) ----------------------

    @property
    def weight(self) -> int:
        return self.server.weight

    @property
    def backup(self) -> bool:
        return self.server.backup

    @property
    def serverName(self) -> str:
        """The configured host: what TLS verifies and sends as SNI unless
        the upstream sets C{server_name}."""
        return self.server.host

    def isAvailable(self, failOpen: bool = False) -> bool:
        """
        Whether a new request may be sent here, judging by this backend
        alone: up and not ejected.

        @param failOpen: also accept an L{BackendState.UNKNOWN} backend
            (not ejected).  Whether to is a question about the whole
            upstream (is any backend up?), which
            L{edgeproxy.upstream.health.availability} answers.
        """
        if self.ejectedUntil is not None:
            return False
        state = self.state
        return state is BackendState.UP or (failOpen and state is BackendState.UNKNOWN)

    # Slow start ----------------------------------------------------------------

    def startSlowStart(self, duration: float) -> None:
        """
        Ramp this backend's share up from a tenth of its weight to all of it
        over C{duration} seconds from now (C{slow_start}).  Does nothing when
        C{duration} is 0 or there is no L{clock}.
        """
        if duration > 0 and self.clock is not None:
            self.slowStartAt = self.clock()
            self.slowStartTime = duration

    def rampFactor(self) -> float:
        """
        @return: the fraction of its weight this backend gets now: 1.0 out
            of slow start, else from 0.1 rising linearly to 1.0.
        """
        startedAt = self.slowStartAt
        if startedAt is None or self.clock is None:
            return 1.0
        elapsed = self.clock() - startedAt
        if elapsed >= self.slowStartTime:
            # Over: later calls take the fast path above.
            self.slowStartAt = None
            return 1.0
        return 0.1 + 0.9 * max(elapsed, 0.0) / self.slowStartTime

    def effectiveWeight(self) -> float:
        """
        @return: L{weight} scaled by L{rampFactor}: what the balancers
            weigh this backend by (the hash ring keeps the configured
            weight, see L{edgeproxy.upstream.balance}).
        """
        if self.slowStartAt is None:
            return self.server.weight
        return self.server.weight * self.rampFactor()

    def __repr__(self) -> str:
        return f"<Backend {self.address} {self.state.value}>"
