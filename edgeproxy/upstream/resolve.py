# -*- test-case-name: tests.test_resolve -*-
"""
Resolution of the host names in an upstream's C{servers}, at start and
every C{resolve_interval}, without blocking the reactor.

Names are resolved through an C{IHostnameResolver} (the reactor's
C{nameResolver} in production: C{getaddrinfo} in the reactor's thread pool),
for both A and AAAA records.  L{PeriodicResolver} reports each name's
addresses, or that resolving it failed; what becomes of them (one backend
per address, the previous set kept on failure) is
L{edgeproxy.upstream.pool}'s business.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["PeriodicResolver", "isIPLiteral", "resolveAddresses"]

log = Logger()


def isIPLiteral(host: str) -> bool:
    """
    @return: whether C{host} is an IPv4 or IPv6 address (without brackets)
        rather than a name to resolve.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IResolutionReceiver)
class _Collector:
    """Gathers the addresses of one resolution, in the resolver's order."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.addresses: list[str] = []
        self.done: Deferred[tuple[str, ...]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self.addresses and isIPLiteral(host):
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        if self.done.called:
            return
        if self.addresses:
            self.done.callback(tuple(self.addresses))
        else:
            # Twisted's getaddrinfo resolver reports a failed lookup as a
            # resolution without addresses.
            self.done.errback(DNSLookupError(f"no A or AAAA record for {self._name}"))


def resolveAddresses(resolver: IHostnameResolver, name: str) -> Deferred[tuple[str, ...]]:
    """
    Resolve C{name} to its IPv4 and IPv6 addresses.

    @return: fires with the addresses (each once, in the resolver's order),
        or fails with C{DNSLookupError} when there is none.
    """
    collector = _Collector(name)
    try:
        resolver.resolveHostName(
            collector, name, 0, addressTypes=[IPv4Address, IPv6Address], transportSemantics="TCP"
        )
    except Exception as error:
        if not collector.done.called:
            collector.done.errback(DNSLookupError(f"resolving {name}: {error}"))
    return collector.done


class PeriodicResolver:
    """
    Resolves a set of names now and every C{interval} seconds, reporting
    each outcome.

    A name whose previous resolution has not ended yet (a slow DNS server:
    C{getaddrinfo} can take its time) is not asked again until it has, so
    resolutions never pile up in the thread pool.
    """

    def __init__(
        self,
        clock: Any,
        resolver: IHostnameResolver,
        names: Iterable[str],
        interval: float,
        resolved: Callable[[str, tuple[str, ...]], None],
        failed: Callable[[str, str], None],
    ) -> None:
        """
        @param clock: the reactor (C{IReactorTime}).
        @param resolved: called with a name and its addresses after every
            successful resolution (changed or not).
        @param failed: called with a name and why, after every failed one.
        """
        self._clock = clock
        self._resolver = resolver
        self._names = tuple(names)
        self._interval = interval
        self._resolved = resolved
        self._failed = failed
        self._pending: set[str] = set()
        self._loop: LoopingCall | None = None
        self._running = False

    def start(self) -> None:
        """Resolve every name now, then every C{interval} seconds."""
        if self._running:
            return
        self._running = True
        loop = self._loop = LoopingCall(self.resolveAll)
        loop.clock = self._clock
        done = loop.start(self._interval, now=True)
        done.addErrback(
            lambda failure: log.failure("host name re-resolution stopped", failure=failure)
        )

    def stop(self) -> None:
        """Stop resolving; the outcome of resolutions under way is ignored."""
        self._running = False
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def resolveAll(self) -> None:
        """Resolve every name that is not being resolved already."""
        for name in self._names:
            if name in self._pending:
                continue
            self._pending.add(name)
            resolveAddresses(self._resolver, name).addBoth(self._ended, name)

    def _ended(self, result: tuple[str, ...] | Failure, name: str) -> None:
        self._pending.discard(name)
        if not self._running:
            return
        try:
            if isinstance(result, Failure):
                self._failed(name, result.getErrorMessage())
            else:
                self._resolved(name, result)
        except Exception:
            log.failure("handling the resolution of {name} failed", name=name)
