# -*- test-case-name: tests.test_acme_policy -*-
"""
The decisions of automatic certificates, as pure functions of their inputs
and of an injected time: which names to order, when a certificate is due
for renewal, how long to wait after a failure, whether an on-demand order
is allowed now.  Nothing here does I/O; L{edgeproxy.acme.manager} acts on
what these return.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from edgeproxy.config.model import Config

__all__ = [
    "FIRST_RETRY",
    "MAX_RETRY",
    "RenewalWindow",
    "TokenBucket",
    "Decision",
    "wantedNames",
    "renewalTime",
    "retryDelay",
    "decide",
]

FIRST_RETRY = 60.0
"""Seconds before the first retry after a failed order."""

MAX_RETRY = 24 * 3600.0
"""Cap of the retry delay: a CA unreachable for days is asked once a day."""

ARI_RECHECK = 6 * 3600.0
"""Seconds between two looks at a certificate's ARI window (RFC 9773 §4.3.3
suggests a default Retry-After of six hours)."""


def _covers(name: str, served: Iterable[str]) -> bool:
    names = set(served)
    if name in names:
        return True
    _, dot, parent = name.partition(".")
    # RFC 6125 §6.4.3: a wildcard covers exactly one label.
    return bool(dot) and f"*.{parent}" in names


def _isIP(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def wantedNames(config: Config, fileNames: Iterable[str]) -> tuple[str, ...]:
    """
    The names ACME orders a certificate for, one certificate each, in a
    stable order.

    With C{names = auto} (the default): every exact host name of every
    route (wildcards need DNS-01, IP literals and C{*} cannot be ordered),
    except those a configured certificate file already covers.  With an
    explicit list: that list, whatever the files cover.

    >>> # [route:a] hosts = a.example, *.b.example, 192.0.2.1
    >>> # a file covers www.example      -> ("a.example",)

    @param fileNames: the names the certificate files serve (wildcards as
        C{*.suffix}).
    """
    acme = config.acme
    if acme is None:
        return ()
    if acme.names is not None:
        return acme.names
    served = tuple(fileNames)
    names: list[str] = []
    for route in config.routes:
        for host in route.hosts:
            if host == "*" or host.startswith("*.") or _isIP(host):
                continue
            if host in names or _covers(host, served):
                continue
            names.append(host)
    return tuple(names)


@dataclass(frozen=True, slots=True)
class RenewalWindow:
    """The CA's suggested window of RFC 9773 §4.2, POSIX times."""

    start: float
    end: float


def renewalTime(
    notBefore: float,
    notAfter: float,
    renewBefore: float,
    window: RenewalWindow | None = None,
    rng: random.Random | None = None,
) -> float:
    """
    When a certificate should be renewed (POSIX time).

    Without an ARI window: C{renewBefore} seconds before C{notAfter}; for a
    certificate whose whole lifetime is shorter than that margin, two
    thirds into its lifetime (a 6-day certificate with C{renew_before =
    30d} is renewed after 4 days, not at once over and over).

    With a window (RFC 9773 §4.2): a random moment in it, when that is
    later than the margin says; a window that starts earlier (the CA
    wants the certificate replaced, e.g. before revoking it) wins too: the
    CA knows something we do not.

    >>> renewalTime(0, 90 * 86400, 30 * 86400) / 86400
    60.0
    """
    lifetime = max(0.0, notAfter - notBefore)
    # A margin as long as the whole lifetime would renew every new
    # certificate at once, forever.
    margin = renewBefore if renewBefore < lifetime else lifetime / 3.0
    byMargin = notAfter - margin
    if window is None:
        return byMargin
    rng = rng or random.Random()
    start, end = window.start, max(window.start, window.end)
    chosen = start + rng.random() * (end - start)
    # RFC 9773 §4.2: the window is the CA's word; clamp to the validity.
    return min(chosen, notAfter)


def retryDelay(failures: int, retryAfter: float | None = None) -> float:
    """
    Seconds to wait before attempt C{failures + 1}: doubling from
    L{FIRST_RETRY} up to L{MAX_RETRY}, and never sooner than a
    C{Retry-After} the CA sent (RFC 8555 §6.6: rate limits say when).

    >>> [retryDelay(n) for n in (1, 2, 3)]
    [60.0, 120.0, 240.0]
    """
    if failures <= 0:
        delay = 0.0
    else:
        delay = min(MAX_RETRY, FIRST_RETRY * 2 ** min(failures - 1, 30))
    if retryAfter is not None and retryAfter > delay:
        delay = min(retryAfter, 7 * 86400.0)
    return delay


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do about one name now (see L{decide})."""

    order: bool
    """Order a certificate now."""
    at: float
    """When to look at this name again (POSIX time)."""
    why: str
    """For the log and C{/status}."""


def decide(
    now: float,
    notAfter: float | None,
    renewAt: float | None,
    retryAt: float | None = None,
) -> Decision:
    """
    Whether to order a certificate for one name now.

    @param notAfter: the end of validity of the certificate held (served
        or stored), L{None} when there is none.
    @param renewAt: when it is due for renewal (L{renewalTime}).
    @param retryAt: no attempt before this time (a back-off after a
        failure); L{None}: no back-off running.

    >>> decide(100.0, None, None).why
    'no certificate yet'
    >>> decide(100.0, 500.0, 400.0)
    Decision(order=False, at=400.0, why='valid')
    """
    if retryAt is not None and now < retryAt:
        return Decision(False, retryAt, "backing off after a failure")
    if notAfter is None or renewAt is None:
        return Decision(True, now, "no certificate yet")
    if notAfter <= now:
        return Decision(True, now, "the certificate expired")
    if renewAt <= now:
        return Decision(True, now, "renewal due")
    return Decision(False, renewAt, "valid")


class TokenBucket:
    """
    The on-demand rate limit: C{burst} orders at once, then one more every
    C{interval} seconds.  Pure: the caller passes the time.
    """

    def __init__(self, burst: int, interval: float, now: float) -> None:
        self.burst = burst
        self.interval = interval
        self._tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) / self.interval)
            self._at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; C{False} when rate limited."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def resize(self, burst: int, interval: float, now: float) -> None:
        """
        Follow new settings: the tokens saved up until C{now} are kept (up
        to the new C{burst}), so that a reload does not reset the limit.
        """
        self._refill(now)
        self.burst = burst
        self.interval = interval
        self._tokens = min(float(burst), self._tokens)
