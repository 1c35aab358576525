"""
L{edgeproxy.acme.ondemand.OnDemand} in front of a real
L{edgeproxy.acme.manager.ACMEManager}, on a memory clock, with a fake CA
(L{tests.test_acme_manager.FakeCA}) and a fake C{ask} service: which
handshakes get a certificate ordered for their name, which get the
default certificate at once, and what the C{ask} service and the CA are
asked.  The handshakes are real, in memory, through the store's
on-demand hook.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from edgeproxy.acme.client import ACMEFailure
from edgeproxy.acme.manager import ACMEManager
from edgeproxy.acme.ondemand import REMEMBER, OnDemand
from edgeproxy.acme.setup import onDemandGate
from edgeproxy.tls.store import CertificateStore

from .test_acme_manager import DAY, FakeCA, managerFor, restarted, storedElsewhere, writeConfig
from .test_tls_store import served
from .threadutil import HeldCalls
from .tlsutil import InsecureClientCreator, connectTLS

DEFAULT = "fallback.invalid"
"""The common name of the default certificate."""


class Ask:
    """The C{ask} service: 200 for the names allowed, 403 for the others."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.asked: list[str] = []
        self.urls: list[str] = []

    def __call__(self, url: str) -> Deferred[int]:
        [name] = parse_qs(urlsplit(url).query)["domain"]
        self.asked.append(name)
        self.urls.append(url)
        return succeed(200 if name in self.allowed else 403)


@dataclass
class Edge:
    manager: ACMEManager
    ca: FakeCA
    clock: Clock
    store: CertificateStore
    ask: Ask
    gate: OnDemand

    def restart(self) -> Edge:
        """The same configuration and storage in a new process."""
        manager = restarted(self.manager, self.store, self.ca, self.clock)
        return _started(manager, self.ca, self.clock, self.store, self.ask)


def _started(manager: ACMEManager, ca: FakeCA, clock: Clock, store: CertificateStore, ask: Ask) -> Edge:
    gate = onDemandGate(manager, store, clock, ask)
    manager.startService()
    clock.advance(0)
    # The name of the configured route, ordered at start: not on demand.
    ca.orders.clear()
    return Edge(manager, ca, clock, store, ask, gate)


def onDemandLines(burst: int = 10, interval: str = "1m", ask: str = "http://ask.invalid/check") -> str:
    return f"on_demand = yes\nask = {ask}\non_demand_burst = {burst}\non_demand_interval = {interval}"


def edge(tmp_path: Path, burst: int = 10, interval: str = "1m", allowed: Iterable[str] = (),
         onDemand: bool = True) -> Edge:
    manager, ca, clock, store, _ = managerFor(tmp_path, onDemandLines(burst, interval) if onDemand else "")
    return _started(manager, ca, clock, store, Ask(set(allowed)))


def test_allowedNameOrderedDuringItsHandshake(tmp_path: Path) -> None:
    site = edge(tmp_path, allowed={"new.example"})
    assert served(site.store, "new.example") == "new.example"
    assert served(site.store, "refused.example") == DEFAULT
    assert site.ca.orders == ["new.example"]
    assert site.ask.asked == ["new.example", "refused.example"]
    # Known now: no second question, no second order.
    assert served(site.store, "new.example") == "new.example"
    assert served(site.store, "refused.example") == DEFAULT
    assert site.ask.asked == ["new.example", "refused.example"]


def test_rateLimit(tmp_path: Path) -> None:
    """
    C{on_demand_burst} orders at once, then one every
    C{on_demand_interval}: a name allowed over the limit gets the default
    certificate at once, with a log line, and nothing is ordered for it
    (for as long as a refusal is remembered).
    """
    site = edge(tmp_path, burst=2, interval="1m", allowed={"a.example", "b.example", "c.example", "d.example"})
    with capturedLogs() as events:
        assert [served(site.store, n) for n in ("a.example", "b.example", "c.example")] == [
            "a.example", "b.example", DEFAULT,
        ]
    assert site.ca.orders == ["a.example", "b.example"]
    assert "ACME on demand: c.example allowed but rate limited (2 orders, then one every 60.0s)" in [
        formatEvent(e) for e in events
    ]
    site.clock.advance(60)
    assert served(site.store, "d.example") == "d.example"
    assert served(site.store, "c.example") == DEFAULT
    assert site.ca.orders == ["a.example", "b.example", "d.example"]
    site.clock.advance(REMEMBER)
    assert served(site.store, "c.example") == "c.example"


def test_failedOrderWaitsForItsRetryAfter(tmp_path: Path) -> None:
    """
    An order the CA refused with a C{Retry-After} of a day: handshakes for
    that name get the default certificate at once until then, with no
    question to the C{ask} service and no order (also once a refusal is
    no longer remembered); then the name is ordered again.
    """
    site = edge(tmp_path, allowed={"new.example"})
    site.ca.failures.append(ACMEFailure("the CA refused: rateLimited", "urn:ietf:params:acme:error:rateLimited", DAY))
    assert served(site.store, "new.example") == DEFAULT
    assert site.ca.orders == ["new.example"] and site.ask.asked == ["new.example"]
    site.clock.advance(REMEMBER + 1)
    assert served(site.store, "new.example") == DEFAULT
    assert site.ca.orders == ["new.example"] and site.ask.asked == ["new.example"]
    site.clock.advance(DAY - REMEMBER)
    assert site.ca.orders == ["new.example", "new.example"]
    assert served(site.store, "new.example") == "new.example"


def test_storedNamesServedAfterARestartOutsideTheRateLimit(tmp_path: Path) -> None:
    """
    After a restart, a name whose certificate storage holds is served it at
    its first handshake: not asked about, not ordered, and not counted
    against the rate limit (one order at once, here).
    """
    names = ["one.example", "two.example", "three.example"]
    site = edge(tmp_path, burst=1, interval="1m", allowed={*names, "four.example"})
    for name in names:
        assert served(site.store, name) == name
        site.clock.advance(60)
    assert site.ca.orders == names

    again = site.restart()
    site.ask.asked.clear()
    assert [served(again.store, name) for name in names] == names
    assert again.ca.orders == [] and again.ask.asked == []
    # The one order the limit allows at once is still there.
    assert served(again.store, "four.example") == "four.example"
    assert again.ca.orders == ["four.example"]


def test_storedCertificateReadInAThreadWhileHandshakesGoOn(tmp_path: Path) -> None:
    """
    A handshake for a name whose certificate storage holds waits while the
    files are read through C{runInThread}, not on the reactor thread:
    meanwhile other handshakes are served, and the waiting one is sent
    nothing; once the read is over it gets the stored certificate, with no
    question to the C{ask} service and no order.
    """
    held = HeldCalls()
    manager, ca, clock, store, _ = managerFor(tmp_path, onDemandLines(), runInThread=held)
    storedElsewhere(manager, ca, "stored.example")
    site = _started(manager, ca, clock, store, Ask({"stored.example"}))
    held.release()  # the order, at start, of the configured route's name
    ca.orders.clear()

    waiting = connectTLS(store.serverConnectionCreator(), InsecureClientCreator("stored.example"))
    assert len(held.calls) == 1 and waiting.peerCertificate is None
    assert served(store, "app.example") == "app.example"
    held.release()
    waiting.pump.flush()
    assert waiting.established and waiting.commonNames == ["stored.example"]
    assert site.ca.orders == [] and site.ask.asked == []


def test_settingsFollowAReload(tmp_path: Path) -> None:
    """
    C{on_demand}, C{ask}, C{on_demand_burst} and C{on_demand_interval}
    follow a reload: turned on, the next handshake for a new name gets its
    certificate; a new C{ask} URL is the one asked; a new rate limit
    applies at once (without refilling what was spent); turned off, new
    names get the default certificate and nobody is asked.
    """
    names = {"a.example", "b.example", "c.example", "d.example", "e.example"}
    site = edge(tmp_path, allowed=names, onDemand=False)
    assert served(site.store, "a.example") == DEFAULT
    assert site.ask.asked == [] and site.ca.orders == []

    site.manager.reconfigure(writeConfig(tmp_path, onDemandLines(1, "1h", "http://ask.invalid/first")))
    assert served(site.store, "a.example") == "a.example"
    assert served(site.store, "b.example") == DEFAULT  # one order an hour
    assert site.ca.orders == ["a.example"]
    assert all(url.startswith("http://ask.invalid/first?") for url in site.ask.urls)

    site.manager.reconfigure(writeConfig(tmp_path, onDemandLines(1, "10s", "http://ask.invalid/second")))
    assert served(site.store, "e.example") == DEFAULT  # nothing saved up yet
    site.clock.advance(10)
    assert served(site.store, "c.example") == "c.example"
    assert site.ask.urls[-1].startswith("http://ask.invalid/second?")

    site.manager.reconfigure(writeConfig(tmp_path))
    asked = list(site.ask.asked)
    site.clock.advance(3600)
    assert served(site.store, "d.example") == DEFAULT
    assert site.ask.asked == asked and site.ca.orders == ["a.example", "c.example"]
    # A name served stays served.
    assert served(site.store, "c.example") == "c.example"
