# -*- test-case-name: tests.test_acme_ondemand -*-
"""
On-demand certificates (C{[acme] on_demand = yes}): a name first seen in
a ClientHello gets its certificate ordered while that handshake waits, if
the C{ask} service allows the name and the rate limit has room; otherwise
(and on any failure, or after L{WAIT}) the handshake goes on with the
default certificate.

L{OnDemand.wait} is what the TLS layer calls with the SNI name of every
new connection (L{edgeproxy.tls.store.CertificateStore.onDemand}); it
returns L{None} at once for every name that needs no wait (served already,
refused recently, not a DNS name), so ordinary handshakes pay one
dictionary lookup.

For a new name, in this order: a valid certificate C{storage} holds for it
(from before a restart; its files read in a thread) is served, without
asking anyone or spending the rate limit; a name whose last order failed
is refused until its back-off (and the CA's C{Retry-After}) is over; then
the C{ask} service, then the rate limit, then the order.

The C{ask} service is asked C{GET ASK?domain=NAME} (the convention Caddy
uses): a 2xx answer allows the name, anything else refuses it.  Answers are
remembered for L{REMEMBER} seconds, so a client retrying a refused name
does not hammer the service or the CA.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit, urlunsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from edgeproxy.acme.policy import TokenBucket
from edgeproxy.config import syntax
from edgeproxy.config.acmemodel import ACMESettings

__all__ = ["OnDemand", "askURL"]

log = Logger()

WAIT = 60.0
"""Seconds a handshake waits for its certificate at most."""

ASK_TIMEOUT = 5.0
"""Seconds the C{ask} service has to answer."""

REMEMBER = 600.0
"""Seconds a refusal (by C{ask}, or a failed order) is remembered."""

MAX_REMEMBERED = 10000


def askURL(ask: str, name: str) -> str:
    """C{ask} with C{domain=NAME} added to its query."""
    parts = urlsplit(ask)
    query = parts.query + ("&" if parts.query else "") + urlencode({"domain": name})
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))


Ask = Callable[[str], "Deferred[int]"]
"""GET a URL; fires with the response status."""


def treqAsk(reactor: Any) -> Ask:
    import treq

    async def ask(url: str) -> int:
        response = await treq.get(url, timeout=ASK_TIMEOUT, reactor=reactor, persistent=False)
        await treq.content(response)
        return int(response.code)

    return lambda url: Deferred.fromCoroutine(ask(url))


class _Manager(Protocol):
    """What the gate asks of the L{edgeproxy.acme.manager.ACMEManager}."""

    def serves(self, name: str) -> bool: ...

    def adoptStored(self, name: str) -> Deferred[bool]: ...

    def backingOff(self, name: str) -> float | None: ...

    def obtain(self, name: str) -> Deferred[None]: ...


class OnDemand:
    def __init__(self, settings: ACMESettings, manager: _Manager, clock: Any, ask: Ask | None = None) -> None:
        """
        @param manager: the L{edgeproxy.acme.manager.ACMEManager} of the
            process that orders (the single process, or the supervisor).
        """
        self.settings = settings
        self.manager = manager
        self._clock = clock
        self._ask = ask if ask is not None else treqAsk(clock)
        self._bucket = TokenBucket(settings.on_demand_burst, settings.on_demand_interval, clock.seconds())
        self._refused: OrderedDict[str, float] = OrderedDict()
        self._inProgress: dict[str, Deferred[None]] = {}

    def wait(self, name: str | None) -> Deferred[None] | None:
        """
        Called with the SNI name of a new connection.

        @return: L{None} to go on now (always, while C{on_demand} is
            off), or a Deferred that fires (never fails) when the
            handshake may go on.
        """
        if not name or not self.settings.on_demand or self.manager.serves(name):
            return None
        now = self._clock.seconds()
        refusedAt = self._refused.get(name)
        if refusedAt is not None:
            if now - refusedAt < REMEMBER:
                return None
            del self._refused[name]
        pending = self._inProgress.get(name)
        if pending is None:
            try:
                syntax.checkHostname(name)
            except ValueError:
                return None
            if "." not in name:
                return None
            pending = Deferred.fromCoroutine(self._obtain(name))
            self._inProgress[name] = pending

            def forget(_: object) -> None:
                self._inProgress.pop(name, None)

            pending.addBoth(forget)
        waiter: Deferred[None] = Deferred()
        pending.addBoth(lambda _: None if waiter.called else waiter.callback(None))
        timer = self._clock.callLater(WAIT, lambda: None if waiter.called else waiter.callback(None))
        waiter.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return waiter

    def reconfigure(self, settings: ACMESettings) -> None:
        """
        Follow a reload: C{on_demand}, C{ask} and the rate limit from now on
        (the tokens saved up are kept, up to the new burst).  When any of
        them changed, the refusals remembered are forgotten: they were
        decided under the old ones.
        """
        old = self.settings
        self.settings = settings
        keys = ("on_demand", "ask", "on_demand_burst", "on_demand_interval")
        if all(getattr(old, key) == getattr(settings, key) for key in keys):
            return
        self._bucket.resize(settings.on_demand_burst, settings.on_demand_interval, self._clock.seconds())
        self._refused.clear()

    def _refuse(self, name: str) -> None:
        self._refused[name] = self._clock.seconds()
        while len(self._refused) > MAX_REMEMBERED:
            self._refused.popitem(last=False)

    async def _obtain(self, name: str) -> None:
        if await self.manager.adoptStored(name):
            return
        left = self.manager.backingOff(name)
        if left is not None:
            log.info("ACME on demand: {name} refused: its last order failed; the next one in {left:.0f}s",
                     name=name, left=left)
            self._refuse(name)
            return
        url = askURL(self.settings.ask or "", name)
        try:
            status = await self._ask(url)
        except Exception as e:
            log.warn("ACME on demand: {name} refused: the ask service failed: {why}", name=name, why=str(e) or type(e).__name__)
            self._refuse(name)
            return
        if not 200 <= status < 300:
            log.info("ACME on demand: {name} refused by the ask service (HTTP {status})", name=name, status=status)
            self._refuse(name)
            return
        if not self._bucket.take(self._clock.seconds()):
            log.warn(
                "ACME on demand: {name} allowed but rate limited ({burst} orders, then one every {interval}s)",
                name=name, burst=self.settings.on_demand_burst, interval=self.settings.on_demand_interval,
            )
            self._refuse(name)
            return
        log.info("ACME on demand: {name} allowed by the ask service; ordering", name=name)
        await self.manager.obtain(name)
        if not self.manager.serves(name):
            self._refuse(name)
